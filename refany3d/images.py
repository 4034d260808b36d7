"""Image inputs: what every entry point (views, point maps, generated images) accepts as an image.

A PIL image, a file path, or an HxWx3 / HxWx4 array: uint8 or other integers in [0, 255], floats
in [0, 1]. Transparent pixels are put on white, the background of the views and point maps: read
as black, a cut-out point map's background would be taken for surface points at the frame's
corner, and a cut-out view would show the asset on black, which the model never saw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from refany3d.errors import InputError

ImageLike = Image.Image | np.ndarray | str | Path
MAX_IMAGE_SIDE = 4096  # the largest view, target or output side anything takes (renderer and sampler alike)
_FLOAT_SLACK = 1e-3  # float arrays a rounding error outside [0, 1] are clipped, not refused


def _opened(image: ImageLike, what: str) -> Image.Image | np.ndarray:
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                img.load()
                return img.copy()
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise InputError(f"cannot read {what} {str(image)!r}: {err}") from None
    if isinstance(image, (Image.Image, np.ndarray)):
        return image
    raise InputError(f"{what} must be a PIL image, an array or a file path, got {type(image).__name__}")


def _pil_on_white(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def as_float_image(image: ImageLike, what: str = "image") -> np.ndarray:
    """The image as float32 HxWx3 in [0, 1], transparent pixels on white; InputError naming
    `what` for anything else. Float arrays keep their precision (a renderer's exact point map)."""
    image = _opened(image, what)
    if isinstance(image, Image.Image):
        return np.asarray(_pil_on_white(image), dtype=np.float32) / 255.0
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise InputError(f"{what} must be an HxWx3 (or HxWx4) image, got shape {image.shape}")
    if image.dtype == np.uint8:
        values = image.astype(np.float32) / 255.0
    elif np.issubdtype(image.dtype, np.integer):
        if image.min() < 0 or image.max() > 255:
            raise InputError(f"{what} values must be within [0, 255] for a {image.dtype} array, "
                             f"got [{image.min()}, {image.max()}]")
        values = image.astype(np.float32) / 255.0
    elif np.issubdtype(image.dtype, np.floating):
        values = image.astype(np.float32)
        if not np.isfinite(values).all():
            raise InputError(f"{what} contains NaN or infinite values")
        if values.min() < -_FLOAT_SLACK or values.max() > 1.0 + _FLOAT_SLACK:  # clipped, it would turn black or white
            raise InputError(f"{what} values must be within [0, 1] for a {image.dtype} array, got "
                             f"[{values.min():g}, {values.max():g}]; for 0-255 values pass a uint8 array")
        values = np.clip(values, 0.0, 1.0)
    else:
        raise InputError(f"{what} must be a uint8, integer or float array, got {image.dtype}")
    if values.shape[2] == 4:
        alpha = values[..., 3:]
        values = values[..., :3] * alpha + (1.0 - alpha)
    return values


def to_rgb_image(image: ImageLike, what: str = "image") -> Image.Image:
    """The image as an 8-bit RGB PIL image, transparent pixels on white (see `as_float_image`)."""
    image = _opened(image, what)
    if isinstance(image, Image.Image):
        return _pil_on_white(image)
    return Image.fromarray(np.floor(as_float_image(image, what) * 255.0 + 0.5).astype(np.uint8), "RGB")
