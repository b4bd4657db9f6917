"""Reading images as 8-bit RGB whatever their mode (data/images.py)."""

from __future__ import annotations

import numpy as np
import pytest
from image_files import _close, _pixel
from PIL import Image

from bigtransfer.data.images import load_rgb, to_rgb


def _mode_L(tmp_path):
    image = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    return image, "png", {(0, 0): (0, 0, 0), (1, 0): (77, 77, 77), (2, 0): (255, 255, 255)}


def _mode_RGBA(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (255, 0, 0, 255))  # opaque red stays red
    image.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue -> the white background
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    return image, "png", {(0, 0): (255, 0, 0), (1, 0): (255, 255, 255), (2, 0): (127, 127, 127)}


def _palette(with_transparency: bool) -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([200, 10, 20, 0, 0, 255, 30, 180, 60] + [0] * (768 - 9))
    for x, index in enumerate((0, 1, 2)):
        image.putpixel((x, 0), index)
    if with_transparency:
        image.info["transparency"] = 1
    return image


def _mode_P(tmp_path):
    return _palette(False), "png", {(0, 0): (200, 10, 20), (1, 0): (0, 0, 255), (2, 0): (30, 180, 60)}


def _mode_P_transparent(tmp_path):
    return _palette(True), "png", {(0, 0): (200, 10, 20), (1, 0): (255, 255, 255), (2, 0): (30, 180, 60)}


def _mode_CMYK(tmp_path):
    image = Image.new("CMYK", (3, 1))
    image.putpixel((0, 0), (0, 255, 255, 0))  # no cyan, full magenta+yellow -> red
    image.putpixel((1, 0), (0, 0, 0, 255))  # full key -> black
    image.putpixel((2, 0), (0, 0, 0, 0))  # no ink -> white
    return image, "tif", {(0, 0): (255, 0, 0), (1, 0): (0, 0, 0), (2, 0): (255, 255, 255)}


def _mode_I16(tmp_path):
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    return image, "png", {(0, 0): (0, 0, 0), (1, 0): (128, 128, 128), (2, 0): (255, 255, 255)}


def _mode_LA(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (10, 255))
    image.putpixel((1, 0), (10, 0))
    return image, "png", {(0, 0): (10, 10, 10), (1, 0): (255, 255, 255)}


def _mode_1(tmp_path):
    image = Image.new("1", (3, 1), 0)
    image.putpixel((1, 0), 1)
    return image, "png", {(0, 0): (0, 0, 0), (1, 0): (255, 255, 255), (2, 0): (0, 0, 0)}


MODE_CASES = {
    "L": _mode_L, "RGBA": _mode_RGBA, "P": _mode_P, "P+transparency": _mode_P_transparent,
    "CMYK": _mode_CMYK, "I;16": _mode_I16, "LA": _mode_LA, "1": _mode_1,
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_load_rgb_converts_every_mode_to_8bit_rgb(tmp_path, case):
    image, ext, expected = MODE_CASES[case](tmp_path)
    path = tmp_path / f"image.{ext}"
    image.save(path)
    with Image.open(path) as reread:
        assert reread.mode != "RGB"  # the file really is stored in a non-RGB mode
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.size == image.size
    assert np.asarray(rgb).dtype == np.uint8
    for (x, y), want in expected.items():
        assert _close(_pixel(rgb, x, y), want), (case, (x, y), _pixel(rgb, x, y), want)


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_to_rgb_in_memory_matches_expected_pixels(tmp_path, case):
    image, _, expected = MODE_CASES[case](tmp_path)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    for (x, y), want in expected.items():
        assert _close(_pixel(rgb, x, y), want), (case, (x, y), _pixel(rgb, x, y), want)


def test_sixteen_bit_png_is_read_back_as_16_bit_and_scaled(tmp_path):
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as reread:
        assert reread.mode in ("I;16", "I")
    grey = np.asarray(load_rgb(path))[..., 0].astype(int)
    assert grey[0, 0] == 0 and grey[0, 3] == 255
    assert abs(grey[0, 2] - 128) <= 1
    assert grey[0, 1] == 1  # 257 is 1/255 of the 16-bit range
    np.testing.assert_allclose(grey, np.round(values / 65535 * 255), atol=1)


def test_32_bit_integer_mode_with_16_bit_values_is_scaled_down():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert image.mode == "I"
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert [_pixel(rgb, x, 0)[0] for x in range(3)] == [0, 128, 255]


def test_rgb_image_is_returned_unchanged():
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(image) is image
