"""Reference views as the published model saw them: unlit albedo RGB + exact point maps on an orbit.

Rendering uses pyrender offscreen (EGL when there is no display, OSMesa as fallback). Each view is
two passes over the same GPU buffers: a FLAT pass for RGB (multisampled, like the release) and a
pass with multisampling disabled whose depth, read at each pixel centre and unprojected through
the camera, gives the visible surface point exactly. Colour-encoded coordinates would be blended
at silhouettes and quantized to 8 bits; a depth sample from a non-multisampled pass is neither.
"""
from __future__ import annotations

import ctypes.util
import json
import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from refany3d.cameras import ORBIT_RADIUS, Camera, orbit_camera, reference_azimuths
from refany3d.errors import InputError, RenderError, require_finite, require_whole_number
from refany3d.images import MAX_IMAGE_SIDE
from refany3d.mesh import Normalization, as_mesh, normalization_of



def _choose_gl_platform() -> None:
    """Pick a headless OpenGL platform before PyOpenGL is imported (it reads this once)."""
    if os.environ.get("PYOPENGL_PLATFORM") or os.environ.get("DISPLAY"):
        return
    if ctypes.util.find_library("EGL"):
        os.environ["PYOPENGL_PLATFORM"] = "egl"
    elif ctypes.util.find_library("OSMesa"):
        os.environ["PYOPENGL_PLATFORM"] = "osmesa"


_choose_gl_platform()
import pyrender  # noqa: E402  (must follow the platform choice)
from pyrender.constants import GLTF, RenderFlags  # noqa: E402


def _keep_egl_display_alive() -> None:
    """Make deleting one pyrender renderer leave the others working.

    pyrender's EGL platform calls eglTerminate on the display when a renderer is deleted (also when
    one is garbage-collected). eglGetDisplay hands every renderer in the process the same display,
    so that breaks every other live renderer (EGL_BAD_DISPLAY). Destroy only the context instead.
    """
    if os.environ.get("PYOPENGL_PLATFORM") != "egl":
        return
    from pyrender.platforms import egl

    def delete_context(platform) -> None:
        from OpenGL.EGL import eglDestroyContext

        if platform._egl_display is not None and platform._egl_context is not None:
            eglDestroyContext(platform._egl_display, platform._egl_context)
        platform._egl_context = None
        platform._egl_display = None

    egl.EGLPlatform.delete_context = delete_context


_keep_egl_display_alive()

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class RenderedView:
    """One rendered view. `pointmap_xyz` is 1.0 (white) on the background, where `mask` is False."""

    rgb: np.ndarray  # uint8 HxWx3
    pointmap_xyz: np.ndarray  # float32 HxWx3 in [0, 1]
    mask: np.ndarray  # bool HxW
    camera: Camera


def pointmap_image(pointmap_xyz: np.ndarray) -> Image.Image:
    """8-bit RGB picture of a float point map."""
    return Image.fromarray(np.round(np.clip(pointmap_xyz, 0.0, 1.0) * 255.0).astype(np.uint8))


@dataclass
class ReferenceViews:
    """The N reference views of one asset, with everything needed to interpret them."""

    rgb: list[Image.Image]
    pointmap: list[Image.Image]
    pointmap_xyz: list[np.ndarray]
    masks: list[np.ndarray]
    azimuths: list[float]
    cameras: list[Camera]
    normalization: Normalization
    pitch: float = 0.0
    radius: float = ORBIT_RADIUS
    y_rotation: float = 0.0
    source: str | None = field(default=None)

    def require_visible(self) -> None:
        """Refuse views that show nothing of the asset (sampling on them would waste a GPU call),
        naming why: a flat asset circled edge-on, or a camera too far away."""
        if any(mask.any() for mask in self.masks):
            return
        camera = self.cameras[0]
        extent = self.normalization.extent * self.normalization.scale  # normalized: the largest axis spans 2
        if extent[1] <= 1e-3 * extent.max():
            raise InputError(f"the asset is not visible in any reference view: it is flat (no height) and the views "
                             f"circle it edge-on at pitch {self.pitch:g}°; give a pitch such as 30")
        raise InputError(f"the asset is not visible in any reference view: radius {self.radius:g} is too far for "
                         f"{camera.width} px views")

    def blind_views_note(self, min_share: float = 1e-3) -> str | None:
        """Name the views that show (almost) nothing of the asset while others show it, or None.

        A thin asset (a sign, a card) is seen edge-on by some views of an orbit: those condition
        images are blank and tell the model nothing. That still samples, so it is a note, not an
        error; `require_visible` refuses the case where every view is blank."""
        blind = [azimuth for azimuth, mask in zip(self.azimuths, self.masks) if mask.mean() < min_share]
        if not blind or len(blind) == len(self.masks):
            return None
        where = ", ".join(f"{azimuth:g}°" for azimuth in blind)
        return (f"{len(blind)} of {len(self.masks)} reference views (azimuth {where}) show almost nothing of "
                "the asset: it is thin and seen edge-on there, so only the other views show the model what it "
                "looks like. The views' azimuths are fixed: the mesh turned about its vertical axis in its file "
                "(by 45°, say) is seen in every view")

    def to_dict(self) -> dict:
        """JSON-ready description of the views (no pixels)."""
        return {
            "source": self.source,
            "n_views": len(self.rgb),
            "azimuths": self.azimuths,
            "pitch": self.pitch,
            "radius": self.radius,
            "y_rotation": self.y_rotation,
            "normalization": self.normalization.to_dict(),
            "cameras": [c.to_dict() for c in self.cameras],
        }

    def contact_sheet(self, tile: int = 256, columns: int = 8) -> Image.Image:
        """RGB views above their point maps, `columns` views per row, on white."""
        return contact_sheet([self.rgb, self.pointmap], tile=tile, columns=columns)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write rgb_XX.png, pointmap_XX.png, contact_sheet.png and views.json; return the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, (rgb, pmap) in enumerate(zip(self.rgb, self.pointmap)):
            for name, image in ((f"rgb_{i:02d}.png", rgb), (f"pointmap_{i:02d}.png", pmap)):
                image.save(out / name)
                written.append(out / name)
        self.contact_sheet().save(out / "contact_sheet.png")
        (out / "views.json").write_text(json.dumps(self.to_dict(), indent=2))
        return written + [out / "contact_sheet.png", out / "views.json"]


def contact_sheet(rows: list[list[Image.Image]], tile: int = 256, columns: int = 8) -> Image.Image:
    """Grid of image lists: each list starts on a new row and wraps after `columns` images."""
    columns = max(1, min(columns, max(len(r) for r in rows)))
    grid_rows = [r[i : i + columns] for r in rows for i in range(0, len(r), columns)]
    sheet = Image.new("RGB", (columns * tile, len(grid_rows) * tile), (255, 255, 255))
    for y, row in enumerate(grid_rows):
        for x, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((tile, tile), Image.LANCZOS), (x * tile, y * tile))
    return sheet


# --------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------


def _pyrender_mesh(mesh: trimesh.Trimesh, norm: Normalization) -> pyrender.Mesh:
    """Unlit-ready primitive in the normalized frame: one texture (bilinear, clamped: it is an atlas)
    or vertex colours.

    Vertices are normalized in float64 before the GPU's float32: a scan placed far from the origin
    (1e6 units) would otherwise lose its shape to rounding. Every face is also listed reversed and
    culling keeps whichever copy faces the camera, so both sides are drawn in every pass: pyrender
    always culls back faces in the pass that gives depth, whatever the material says, and would
    drop open surfaces seen from behind and the sides of meshes wound inside out.
    """
    positions = norm.to_normalized(np.asarray(mesh.vertices, dtype=np.float64)).astype(np.float32)
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    indices = np.concatenate([faces, faces[:, ::-1]])
    visual = mesh.visual
    material_options = dict(baseColorFactor=[1.0, 1.0, 1.0, 1.0], doubleSided=False)
    if isinstance(visual, trimesh.visual.TextureVisuals) and visual.uv is not None:
        image = np.asarray(visual.material.baseColorTexture.convert("RGB"), dtype=np.uint8)
        sampler = pyrender.Sampler(
            magFilter=GLTF.LINEAR, minFilter=GLTF.LINEAR,
            wrapS=GLTF.CLAMP_TO_EDGE, wrapT=GLTF.CLAMP_TO_EDGE,
        )
        texture = pyrender.Texture(source=image, source_channels="RGB", sampler=sampler)
        material = pyrender.MetallicRoughnessMaterial(baseColorTexture=texture, **material_options)
        primitive = pyrender.Primitive(
            positions=positions, indices=indices, material=material,
            texcoord_0=np.asarray(visual.uv, dtype=np.float32),
        )
    else:
        colors = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0
        colors = np.concatenate([colors, np.ones((len(colors), 1), np.float32)], axis=1)
        material = pyrender.MetallicRoughnessMaterial(**material_options)
        primitive = pyrender.Primitive(positions=positions, indices=indices, material=material, color_0=colors)
    return pyrender.Mesh(primitives=[primitive])


class Renderer:
    """Reusable offscreen renderer; keeps the last mesh on the GPU so views of it are cheap.

    An OpenGL context belongs to one thread: use one Renderer per thread.
    """

    def __init__(self) -> None:
        self._offscreen: pyrender.OffscreenRenderer | None = None
        self._mesh_ref = None
        self._normalization: Normalization | None = None
        self._scene: pyrender.Scene | None = None
        self._mesh_node = None
        self._camera_node = None

    def _ensure_size(self, width: int, height: int) -> pyrender.OffscreenRenderer:
        if self._offscreen is None:
            try:
                self._offscreen = pyrender.OffscreenRenderer(width, height)
            except Exception as err:  # no usable GL: say what to install instead of a GL traceback
                platform = os.environ.get("PYOPENGL_PLATFORM", "default")
                raise RenderError(
                    f"cannot create an offscreen OpenGL context (PYOPENGL_PLATFORM={platform}): {err}. "
                    "Install EGL (libegl1, libegl-mesa0) or OSMesa (libosmesa6)."
                ) from err
        elif (self._offscreen.viewport_width, self._offscreen.viewport_height) != (width, height):
            self._offscreen.viewport_width, self._offscreen.viewport_height = width, height
        return self._offscreen

    def _prepare(self, mesh: trimesh.Trimesh, normalization: Normalization | None) -> Normalization:
        if self._mesh_ref is None or self._mesh_ref() is not mesh:
            self._normalization = normalization_of(mesh)
            scene = pyrender.Scene(bg_color=[1.0, 1.0, 1.0, 1.0], ambient_light=[1.0, 1.0, 1.0])
            self._mesh_node = scene.add(_pyrender_mesh(mesh, self._normalization))
            self._camera_node = scene.add(pyrender.IntrinsicsCamera(1.0, 1.0, 0.0, 0.0))
            self._scene = scene
            self._mesh_ref = weakref.ref(mesh)
        norm = normalization or self._normalization
        own = self._normalization  # the GPU holds the mesh normalized by its own; move it to `norm`'s
        pose = np.eye(4)
        pose[:3, :3] *= norm.scale / own.scale
        pose[:3, 3] = (own.center - norm.center) * norm.scale
        self._scene.set_pose(self._mesh_node, pose)
        return norm

    def render(
        self,
        mesh: trimesh.Trimesh,
        camera: Camera,
        y_rotation: float = 0.0,
        normalization: Normalization | None = None,
    ) -> RenderedView:
        """Render `mesh` (placed in the normalized frame) from `camera`.

        `normalization` defaults to the mesh's own; pass one to place the mesh differently.
        """
        norm = self._prepare(mesh, normalization)
        renderer = self._ensure_size(camera.width, camera.height)
        # pyrender's principal point is in window coordinates, where pixel centres sit at +0.5
        self._camera_node.camera = pyrender.IntrinsicsCamera(
            camera.fx, camera.fy, camera.cx + 0.5, camera.cy + 0.5, znear=camera.znear, zfar=camera.zfar
        )
        self._scene.set_pose(self._camera_node, camera.pose)
        rgb, _ = renderer.render(self._scene, flags=RenderFlags.FLAT)
        _, depth = renderer.render(
            self._scene, flags=RenderFlags.SEG, seg_node_map={self._mesh_node: (255, 255, 255)}
        )
        mask = depth > 0
        pointmap = np.ones((camera.height, camera.width, 3), dtype=np.float32)
        rows, cols = np.nonzero(mask)
        if len(rows):
            z = depth[rows, cols].astype(np.float64)
            cam_cv = np.stack([(cols - camera.cx) / camera.fx * z, (rows - camera.cy) / camera.fy * z, z], 1)
            rot, t = camera.world_to_camera_cv()
            normalized = (cam_cv - t) @ rot  # inverse of x_cv = R X + t
            own = norm.from_normalized(normalized)
            pointmap[rows, cols] = norm.pointmap_from_own(own, y_rotation)
        return RenderedView(rgb=np.array(rgb[..., :3], dtype=np.uint8), pointmap_xyz=pointmap, mask=mask, camera=camera)

    def close(self) -> None:
        """Free the GL context (also happens when the Renderer is garbage-collected)."""
        if self._offscreen is not None:
            self._offscreen.delete()
        self._offscreen = None
        self._scene = self._mesh_ref = self._mesh_node = self._camera_node = None

    def __enter__(self) -> "Renderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_thread_local = threading.local()


def thread_renderer() -> Renderer:
    """This thread's shared Renderer, so repeated previews reuse one GL context."""
    renderer = getattr(_thread_local, "renderer", None)
    if renderer is None:
        renderer = _thread_local.renderer = Renderer()
    return renderer


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _finite(name: str, value) -> float:
    require_finite(name, value)
    return float(value)


def render_at(
    mesh_or_path: trimesh.Trimesh | trimesh.Scene | str | os.PathLike,
    camera: Camera,
    y_rotation: float = 0.0,
    normalization: Normalization | None = None,
    renderer: Renderer | None = None,
) -> RenderedView:
    """Render one view at any camera (any intrinsics, off-centre principal point, fx != fy)."""
    mesh = as_mesh(mesh_or_path)
    y_rotation = _finite("y_rotation", y_rotation)
    return (renderer or thread_renderer()).render(mesh, camera, y_rotation, normalization)


def render_views(
    mesh_or_path: trimesh.Trimesh | trimesh.Scene | str | os.PathLike,
    n_views: int = 8,
    resolution: int = 512,
    radius: float = ORBIT_RADIUS,
    pitch: float = 0.0,
    y_rotation: float = 0.0,
    renderer: Renderer | None = None,
) -> ReferenceViews:
    """The release's N reference views: orbit frames i*floor(60/N), RGB + point maps."""
    require_whole_number("resolution", resolution, minimum=8, maximum=MAX_IMAGE_SIDE)
    radius = _finite("radius", radius)
    pitch = _finite("pitch", pitch)
    y_rotation = _finite("y_rotation", y_rotation)
    closest = math.sqrt(3.0) + Camera.znear  # the normalized asset's corners, plus the near plane
    if radius <= closest:
        raise InputError(f"radius must exceed {closest:.2f} so the camera is outside the object")
    azimuths = reference_azimuths(n_views)
    cameras = [orbit_camera(a, pitch, radius, resolution) for a in azimuths]
    mesh = as_mesh(mesh_or_path)
    renderer = renderer or thread_renderer()
    views = [renderer.render(mesh, cam, y_rotation) for cam in cameras]
    return ReferenceViews(
        rgb=[Image.fromarray(v.rgb) for v in views],
        pointmap=[pointmap_image(v.pointmap_xyz) for v in views],
        pointmap_xyz=[v.pointmap_xyz for v in views],
        masks=[v.mask for v in views],
        azimuths=azimuths,
        cameras=cameras,
        normalization=normalization_of(mesh),
        pitch=pitch,
        radius=radius,
        y_rotation=y_rotation,
        source=str(mesh_or_path) if isinstance(mesh_or_path, (str, os.PathLike)) else None,
    )
