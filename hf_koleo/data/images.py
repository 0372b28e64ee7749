"""Decode any stored image record into an RGB PIL image, or say in a few words why it cannot be."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Transparent pixels are composited onto white: product photos and icons usually assume it.
ALPHA_BACKGROUND = (255, 255, 255)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, EOFError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (1, L, LA, P, RGB, RGBA, CMYK, YCbCr, I, I;16, F) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scaled = values / 257.0  # full 16-bit range onto 8 bits
        else:
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = image.mode in ("LA", "RGBA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class UndecodableImage(ValueError):
    """A record's image cannot be decoded; the message says why in a few words."""


def _reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image format PIL can read"  # PIL's own message names a BytesIO object, not the data
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def read_image(value: Any) -> Image.Image:
    """Decode a datasets image value (``{"bytes", "path"}``, raw bytes, a PIL image or an array).

    Returns an RGB image fully loaded into memory.

    Raises:
        UndecodableImage: when the value is empty, of another type, undecodable or truncated.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        else:
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
            elif isinstance(value, (bytes, bytearray, memoryview)) or value is None:
                data, path = value, None
            else:
                raise UndecodableImage(
                    f"a value of type {type(value).__name__}, expected encoded image bytes, a "
                    "{'bytes', 'path'} dict, a PIL image or an array"
                )
            if data is None and path is None:
                raise UndecodableImage("the record has neither bytes nor a path")
            if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
                raise UndecodableImage(f"its bytes are a {type(data).__name__}, expected encoded image bytes")
            image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()  # truncated files fail here rather than later in a worker
        return to_rgb(image)
    except UndecodableImage:
        raise
    except DECODE_ERRORS as error:
        raise UndecodableImage(_reason(error)) from error


def decode_image(value: Any) -> Image.Image | None:
    """:func:`read_image`, or None (with a warning saying why) when the value cannot be decoded."""
    try:
        return read_image(value)
    except UndecodableImage as error:
        logger.warning("skipping an undecodable image record: %s", error)
        return None
