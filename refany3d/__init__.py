"""refany3d: 3D asset-referenced image generation (RefAny3D) as a library, a CLI and an app.

The data path, one module per step: `mesh` (load an asset) -> `views` (render reference views)
-> `conditions` (turn views into model inputs) -> `pipeline` (sample image + point map)
-> `outputs` (point clouds, files) -> `alignment` (measure the result).

Attributes are imported lazily so that `import refany3d` stays light (no torch for rendering).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RefAny3DError": "errors",
    "MeshError": "errors",
    "InputError": "errors",
    "ModelLoadError": "errors",
    "AlignmentError": "errors",
    "RenderError": "errors",
    "RefAny3DPipeline": "pipeline",
    "RefAny3DOutput": "pipeline",
    "build_tiny_model": "tiny",
    # issue 3: meshes, cameras, reference views
    "Camera": "cameras",
    "look_at": "cameras",
    "orbit_camera": "cameras",
    "reference_azimuths": "cameras",
    "load_mesh": "mesh",
    "as_mesh": "mesh",
    "Normalization": "mesh",
    "normalization_of": "mesh",
    "Renderer": "views",
    "RenderedView": "views",
    "ReferenceViews": "views",
    "render_views": "views",
    "render_at": "views",
    "as_float_image": "images",
    "to_rgb_image": "images",
    # issue 8: fast sampler
    "FastSampler": "fast",
    "fast_sampler": "fast",
    # issue 6: alignment analysis
    "align": "alignment",
    "align_runs": "alignment",
    "AlignmentReport": "alignment",
    "estimate_pose": "alignment",
    "frustum_segments": "alignment",
    "overlay_image": "alignment",
    # issue 5: outputs of a generation
    "PointCloud": "outputs",
    "pointcloud_from_pointmap": "outputs",
    "pointcloud_figure": "outputs",
    "write_ply": "outputs",
    "write_settings_json": "outputs",
    # issue 7: training data and trainer
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
