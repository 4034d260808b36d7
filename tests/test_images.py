"""Image inputs: every form an entry point takes gives the same pixels; transparency means white."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from refany3d.errors import InputError
from refany3d.examples import EXAMPLES_DIR
from refany3d.images import as_float_image, to_rgb_image

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
ALPHA = np.where(RNG.random((6, 5)) < 0.5, 0, 255).astype(np.uint8)
ON_WHITE = np.where(ALPHA[..., None] == 255, PIXELS, 255).astype(np.uint8)  # computed by hand


def _forms(tmp_path):
    """The same picture in every accepted form: alpha 0 where ON_WHITE is white."""
    rgba = np.concatenate([PIXELS, ALPHA[..., None]], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    return {
        "PIL RGBA": Image.fromarray(rgba, "RGBA"),
        "path to an RGBA PNG": tmp_path / "cutout.png",
        "uint8 RGBA array": rgba,
        "int64 RGBA array": rgba.astype(np.int64),
        "float RGBA array": rgba.astype(np.float64) / 255.0,
        "PIL RGB on white": Image.fromarray(ON_WHITE),
        "path as str": str(tmp_path / "cutout.png"),
    }


def test_every_form_gives_the_same_pixels_with_transparency_on_white(tmp_path):
    for name, image in _forms(tmp_path).items():
        np.testing.assert_array_equal(np.asarray(to_rgb_image(image, name)), ON_WHITE, err_msg=name)
        np.testing.assert_allclose(as_float_image(image, name), ON_WHITE / 255.0, atol=1e-6, err_msg=name)


def test_partial_alpha_blends_with_white_and_palette_transparency_counts():
    half = np.zeros((1, 1, 4), np.float32)
    half[..., 3] = 0.5  # black at half opacity on white: mid gray
    np.testing.assert_allclose(as_float_image(half), 0.5)
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # the blue entry is transparent
    assert np.asarray(to_rgb_image(palette)).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_float_arrays_keep_their_precision_and_tolerate_rounding():
    exact = np.full((2, 2, 3), 0.123456789, np.float64)
    assert as_float_image(exact)[0, 0, 0] == np.float32(0.123456789)
    assert as_float_image(np.full((1, 1, 3), 1.0 + 1e-5)).max() == 1.0  # a rounding error over 1 is clipped


@pytest.mark.parametrize("image, message", [
    (np.full((2, 2, 3), 2.0), "values must be within \\[0, 1\\] for a float64 array, got \\[2, 2\\]; for 0-255"),
    (np.full((2, 2, 3), 300, np.int64), "within \\[0, 255\\] for a int64 array"),
    (np.full((2, 2, 3), np.nan), "NaN or infinite"),
    (np.zeros((2, 2)), "HxWx3 \\(or HxWx4\\) image, got shape \\(2, 2\\)"),
    (np.zeros((2, 2, 3), bool), "uint8, integer or float array, got bool"),
    (12, "must be a PIL image, an array or a file path, got int"),
    (EXAMPLES_DIR / "vase.glb", "cannot read view 'vase.glb'|cannot read view '.*vase.glb'"),
])
def test_what_is_not_an_image_is_named(image, message):
    with pytest.raises(InputError, match=message):
        as_float_image(image, "view")
    with pytest.raises(InputError, match=message):
        to_rgb_image(image, "view")
