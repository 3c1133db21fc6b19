"""Safe decoding: odd modes converted, bad values refused with a reason, bombs refused from their header."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data import images, synthetic
from pipeline.data.images import BadRecord, load_image


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted():
    return synthetic.planted_records(32)


@pytest.mark.reliability
@pytest.mark.parametrize("key", ["odd-cmyk", "odd-rgba", "odd-palette", "odd-16bit", "odd-grey", "odd-tiny"])
def test_odd_modes_become_rgb_of_the_requested_size(planted, key):
    arr = load_image(planted[key][0], 24, "RGB")
    assert arr.shape == (24, 24, 3) and arr.dtype == np.uint8
    assert arr.std() > 5  # an image, not a flat fill from a failed conversion


@pytest.mark.parametrize("key,reason", [("bad-empty", "empty value"), ("bad-corrupt", "undecodable"),
                                        ("bad-truncated", "undecodable|truncated"),
                                        ("bad-bomb", "decompression bomb refused")])
@pytest.mark.reliability
def test_bad_values_are_refused_with_a_reason(planted, key, reason):
    with pytest.raises(BadRecord, match=reason):
        load_image(planted[key][0], 24)


@pytest.mark.reliability
def test_truncated_png_is_refused_not_padded():
    data = _png(Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)))
    with pytest.raises(BadRecord, match="truncated|undecodable"):
        load_image(data[: len(data) * 2 // 3], 16)


@pytest.mark.reliability
def test_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # below PIL's own limit but above ours: our check refuses it from the header
    data = _png(Image.new("RGB", (100, 100), (1, 2, 3)))
    with pytest.raises(BadRecord, match=r"100x100 = 10000 pixels exceeds the limit of 5000"):
        images.open_image(data, max_pixels=5000)
    # far above PIL's limit: PIL's DecompressionBombError becomes a bad record
    with pytest.raises(BadRecord, match="decompression bomb"):
        images.open_image(synthetic.bomb_png())


@pytest.mark.reliability
def test_transparent_areas_become_white_and_16_bit_is_scaled():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    arr = load_image(_png(rgba), 8)
    assert tuple(arr[0, 0]) == (10, 20, 30) and tuple(arr[4, 4]) == (255, 255, 255)
    grey16 = Image.fromarray(np.full((8, 8), 32896, np.uint16))  # 32896 / 65535 * 255 = 128
    assert int(load_image(_png(grey16), 8, "L")[3, 3]) == 128


def test_centre_crop_then_resize():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left third red, middle green, right third blue
    arr[:, 20:40] = (0, 255, 0)
    arr[:, 40:] = (0, 0, 255)
    out = load_image(_png(Image.fromarray(arr)), 10)
    assert out.shape == (10, 10, 3)
    assert (out[:, :, 1] > 250).all() and (out[:, :, 0] < 5).all()  # only the green centre survives
    tiny = load_image(_png(Image.fromarray(arr[:2, 29:31])), 12)  # 2x2 green -> 12x12
    assert tiny.shape == (12, 12, 3) and (tiny[:, :, 1] > 250).all()
