"""Does an image show the asset? The asset's renders fitted to an image that has no point map.

`refany3d.alignment` measures a generation from its point map. An image alone (the no-point-map
ablation's output, or any photo) is measured here instead: the asset is rendered from a grid of
directions once (`asset_templates`), and each render is slid over the image at several sizes
with a free brightness gain (`fit_asset_to_image`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from refany3d.alignment import psnr_from_mse
from refany3d.errors import InputError, require_finite, require_whole_number
from refany3d.images import as_float_image


FIT_AZIMUTHS = tuple(range(0, 360, 15))  # degrees: the orbit directions templates are rendered from
FIT_PITCHES = (-5, 10, 25, 40, 55)
FIT_SIZES = tuple(np.geomspace(0.3, 0.75, 9))  # image-width fractions spanned by the bounding sphere
FIT_GAIN = (0.8, 1.2)  # brightness the fit may apply to a template (scenes dim or brighten the asset)
_FIT_SPHERE = 1.25  # radius, in normalized units, that a template's width spans
_FIT_FOV_DEG = 28.0  # templates are seen from ~5 units away: the middle of the training targets' 2.6-7.9
_FIT_MAX_SIDE = 2  # images are fitted at most this many times the templates' size: more adds time, not detail
_FIT_MIN_TEMPLATE = 8  # px: a smaller placed template matches any image too well to mean anything


@dataclass
class AssetTemplates:
    """The asset's unlit renders and silhouettes from a grid of orbit directions, each framed so a
    sphere of radius 1.25 around it spans the template: what `fit_asset_to_image` slides over an image."""

    rgb: np.ndarray  # (D, T, T, 3) float in [0, 1]
    mask: np.ndarray  # (D, T, T) bool
    directions: list[tuple[float, float]]  # (azimuth, pitch) in degrees, orbit_camera's convention


def asset_templates(mesh: Any, resolution: int = 64, azimuths=FIT_AZIMUTHS, pitches=FIT_PITCHES,
                    renderer: Any = None) -> AssetTemplates:
    """Render the templates of `mesh` (a trimesh mesh or a path) once; fit them to many images."""
    from refany3d.cameras import orbit_camera
    from refany3d.mesh import as_mesh
    from refany3d.views import render_at

    require_whole_number("template resolution", resolution, minimum=16, maximum=512)
    if not len(azimuths) or not len(pitches):
        raise InputError("give at least one azimuth and one pitch to render templates from")
    for angle in (*azimuths, *pitches):
        require_finite("a template direction's angle", angle)
    mesh = as_mesh(mesh)
    fov = _FIT_FOV_DEG
    radius = _FIT_SPHERE / math.tan(math.radians(fov) / 2.0)
    directions = [(float(a), float(p)) for p in pitches for a in azimuths]
    views = [render_at(mesh, orbit_camera(a, p, radius, resolution, fov), renderer=renderer) for a, p in directions]
    return AssetTemplates(np.stack([v.rgb for v in views]).astype(np.float32) / 255.0,
                          np.stack([v.mask for v in views]), directions)


@dataclass
class ImageFit:
    """The asset template that best explains an image, and where: see `fit_asset_to_image`."""

    psnr: float  # dB between the image and the placed template (times `gain`) inside its silhouette
    azimuth_deg: float
    pitch_deg: float
    size: float  # fraction of the image width the template spans
    gain: float
    mask: np.ndarray = field(repr=False)  # HxW bool: the placed silhouette


def fit_asset_to_image(templates: AssetTemplates, image: Any, sizes=FIT_SIZES) -> ImageFit:
    """Find the direction, size, position and brightness at which the asset's render best matches
    the image (least squares inside the silhouette), for images that come without a point map.

    It asks "does this image show this asset anywhere, from some side?". The best of many
    placements flatters any image a little, so compare it with the fit of another asset's
    templates to the same image. Placements keep the whole template inside the image. An image over
    twice the templates' size is fitted at that size (the templates hold no finer detail; the cost
    grows with the fourth power of the side) and the placed silhouette scaled back to it.
    """
    import torch
    import torch.nn.functional as F

    if not isinstance(templates, AssetTemplates):
        raise InputError(f"templates must be asset_templates(mesh), got {type(templates).__name__}")
    sizes = tuple(np.atleast_1d(np.asarray(sizes, dtype=object)))
    if not sizes or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v <= 1 for v in sizes):
        raise InputError(f"sizes must be fractions of the image width in (0, 1], got {sizes!r}")
    full = as_float_image(image, "image")
    full_height, full_width = full.shape[:2]
    scale = min(1.0, _FIT_MAX_SIDE * templates.rgb.shape[1] / max(full_height, full_width))
    x = torch.from_numpy(full).permute(2, 0, 1)[None]
    if scale < 1.0:
        x = F.interpolate(x, size=(max(1, round(full_height * scale)), max(1, round(full_width * scale))), mode="area")
    height, width = x.shape[2:]
    squares = (x ** 2).sum(1, keepdim=True)
    rgb = torch.from_numpy(templates.rgb).permute(0, 3, 1, 2)
    silhouettes = torch.from_numpy(templates.mask).float()[:, None]
    best: tuple[float, ...] | None = None
    with torch.no_grad():
        for size in sizes:
            k = int(round(size * width))
            if not _FIT_MIN_TEMPLATE <= k <= min(height, width):
                continue
            t = F.interpolate(rgb, size=(k, k), mode="area")
            m = F.interpolate(silhouettes, size=(k, k), mode="area")
            area = m.sum((1, 2, 3)) * 3  # weighted pixel-channels of each template
            energy = (m * t ** 2).sum((1, 2, 3))
            keep = area > 0
            if not keep.any():
                continue
            cross = F.conv2d(x, m * t)[0]  # (D, H-k+1, W-k+1): sum of mask * template * image
            image_energy = F.conv2d(squares, m)[0]
            gain = (cross / energy.clamp_min(1e-8)[:, None, None]).clamp(*FIT_GAIN)
            mse = (image_energy - 2 * gain * cross + gain ** 2 * energy[:, None, None]) / area.clamp_min(1e-8)[:, None, None]
            mse[~keep] = math.inf
            flat = int(torch.argmin(mse))
            d, y, x0 = np.unravel_index(flat, mse.shape)
            if best is None or float(mse[d, y, x0]) < best[0]:
                best = (float(mse[d, y, x0]), int(d), float(size), int(y), int(x0), float(gain[d, y, x0]),
                        (m[d, 0] > 0.5).numpy())
    if best is None:
        raise InputError(f"the image ({full_width}x{full_height}) is too small to fit the asset's templates "
                         f"at sizes {', '.join(f'{v:.2f}' for v in sizes)} of its width")
    mse, d, size, y, x0, gain, placed = best
    mask = np.zeros((height, width), dtype=bool)
    mask[y:y + placed.shape[0], x0:x0 + placed.shape[1]] = placed
    if scale < 1.0:
        mask = np.asarray(Image.fromarray(mask).resize((full_width, full_height), Image.NEAREST))
    azimuth, pitch = templates.directions[d]
    return ImageFit(psnr_from_mse(mse), azimuth, pitch, size, gain, mask)
