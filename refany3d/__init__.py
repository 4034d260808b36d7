"""refany3d: 3D asset-referenced image generation (RefAny3D) as a library, a CLI and an app.

The data path, one module per step: `mesh` (load an asset) -> `views` (render reference views)
-> `conditions` (turn views into model inputs) -> `pipeline` (sample image + point map, with the
weights of `weights`) -> `outputs` (point clouds, files) -> `alignment` (measure the result).

Attributes are imported lazily so that `import refany3d` stays light (no torch for rendering).
"""
from __future__ import annotations

import importlib

from refany3d.library_noise import drop_harmless_library_messages

__version__ = "0.1.0"
drop_harmless_library_messages()

# public name -> module that defines it, along the data path
_EXPORTS = {
    # errors: every failure a user can cause, and the warning for input that runs but likely not as meant
    "RefAny3DError": "errors",
    "MeshError": "errors",
    "InputError": "errors",
    "ModelLoadError": "errors",
    "AlignmentError": "errors",
    "RenderError": "errors",
    "RefAny3DWarning": "errors",
    # meshes, cameras, reference views, image inputs
    "load_mesh": "mesh",
    "as_mesh": "mesh",
    "Normalization": "mesh",
    "normalization_of": "mesh",
    "Camera": "cameras",
    "look_at": "cameras",
    "orbit_camera": "cameras",
    "reference_azimuths": "cameras",
    "Renderer": "views",
    "RenderedView": "views",
    "ReferenceViews": "views",
    "render_views": "views",
    "render_at": "views",
    "as_float_image": "images",
    "to_rgb_image": "images",
    # the model: weights in the published layout, the sampler and its encoding caches
    "resolve_ref_weights": "weights",
    "save_refany3d_weights": "weights",
    "RefAny3DPipeline": "pipeline",
    "RefAny3DOutput": "pipeline",
    "CachedEncoders": "fast",
    "cached_encoders": "fast",
    "build_tiny_model": "tiny",
    # outputs of a generation
    "PointCloud": "outputs",
    "pointcloud_from_pointmap": "outputs",
    "pointcloud_figure": "outputs",
    "write_ply": "outputs",
    "write_settings_json": "outputs",
    # measuring a generation
    "align": "alignment",
    "align_runs": "alignment",
    "AlignmentReport": "alignment",
    "estimate_pose": "alignment",
    "frustum_segments": "alignment",
    "overlay_image": "alignment",
    # training data and the trainer
    "make_dataset": "data",
    "write_real_sample": "data",
    "SampleDataset": "data",
    "TrainConfig": "train",
    "preset_config": "train",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refany3d' has no attribute {name!r}")
    return getattr(importlib.import_module(f"refany3d.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
