import io

import numpy as np
import pytest
from PIL import Image

from hf_koleo.data.images import UndecodableImage, decode_image, read_image, to_rgb


def encoded(image: Image.Image, format: str = "PNG") -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"])
def test_every_mode_becomes_8_bit_rgb(mode):
    image = Image.fromarray((np.arange(64).reshape(8, 8) * 3).astype(np.uint8)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)


def test_sixteen_bit_uses_the_full_range():
    image = Image.new("I;16", (2, 1))
    image.putpixel((1, 0), 65535)
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 255]


def test_transparent_pixels_are_composited_on_white():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(image)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_palette_with_transparency_is_composited():
    image = Image.new("P", (1, 1), 0)
    image.putpalette([9, 9, 9] * 256)
    image.info["transparency"] = 0
    assert np.asarray(to_rgb(image)).tolist() == [[[255, 255, 255]]]


def test_decode_accepts_bytes_records_and_pil_images():
    image = Image.new("L", (5, 4), 7)
    assert decode_image(encoded(image)).size == (5, 4)
    assert decode_image(encoded(image, "JPEG")["bytes"]).mode == "RGB"
    assert decode_image(image).mode == "RGB"


@pytest.mark.parametrize(
    "record",
    [
        {"bytes": b"not an image", "path": None},
        {"bytes": None, "path": None},
        {"bytes": None, "path": "/nonexistent/image.png"},
    ],
)
def test_undecodable_records_return_none(record):
    assert decode_image(record) is None


def test_truncated_png_returns_none():
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))["bytes"]
    assert decode_image({"bytes": data[: len(data) // 2], "path": None}) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not an image", "not an image format PIL can read"),
        (7, "a value of type int, expected encoded image bytes"),
        ({"bytes": "text", "path": None}, "its bytes are a str, expected encoded image bytes"),
        ({"bytes": None, "path": "/nonexistent/image.png"}, "FileNotFoundError: [Errno 2] No such file"),
    ],
)
def test_read_image_says_why_a_value_does_not_decode(value, reason):
    with pytest.raises(UndecodableImage) as error:
        read_image(value)
    assert str(error.value).startswith(reason)
