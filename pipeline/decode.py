"""Bytes → upright RGB pixels, the same way for every image mode Pillow knows."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from pipeline.probe import DEFAULT_MAX_PIXELS

_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and load the first frame; raises on damaged or oversized data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > max_pixels:
            raise ValueError(f"{im.width}x{im.height} pixels, over the limit of {max_pixels}")
        im.seek(0)  # animated GIF / multi-page TIFF: the first frame
        im.load()
    return im


def upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, as a phone's gallery would show the photo."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a damaged EXIF block must not cost us the pixels
        return im


def to_rgb(im: Image.Image, exact: bool = False) -> Image.Image:
    """Any mode → RGB. `exact` keeps Pillow's plain convert("RGB"), the original script's
    behaviour, which clips 16-bit images to near-white; otherwise they are scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if not exact and im.mode in _SIXTEEN_BIT:
        a = np.asarray(im)
        if a.dtype != np.uint8:
            a = (a.astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8) if a.max() > 255 else a.astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
