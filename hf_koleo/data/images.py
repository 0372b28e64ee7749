"""Decode any stored image record into an RGB PIL image, or None when it cannot be decoded."""

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


def decode_image(value: Any) -> Image.Image | None:
    """Decode a datasets image value (``{"bytes", "path"}``, raw bytes, a PIL image or an array).

    Returns an RGB image fully loaded into memory, or None (with a warning) when the record is
    empty, undecodable or truncated.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        else:
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
            else:
                data, path = value, None
            if data is None and path is None:
                raise ValueError("record has neither bytes nor a path")
            image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()  # truncated files fail here rather than later in a worker
        return to_rgb(image)
    except DECODE_ERRORS as error:
        logger.warning("skipping an undecodable image record: %s", error)
        return None
