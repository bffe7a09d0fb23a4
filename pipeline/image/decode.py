"""Bytes → upright RGB pixels, the same way for every image mode Pillow knows."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from pipeline.image.header import DEFAULT_MAX_PIXELS, open_lazy

_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and load the first frame; raises on damaged or oversized data."""
    return load_first_frame(open_lazy(data, max_pixels))


def load_first_frame(im: Image.Image, draft_short_side: int | None = None) -> Image.Image:
    """Decode a lazily opened image's first frame (animated GIF, multi-page TIFF).

    With `draft_short_side`, a JPEG at least twice that size is decoded by libjpeg at 1/2, 1/4 or
    1/8 scale, never below it: most of the decode and resize work is skipped."""
    if draft_short_side and im.format == "JPEG" and min(im.size) >= 2 * draft_short_side:
        scale = min(im.size) / draft_short_side
        im.draft(im.mode, (int(im.width / scale) + 1, int(im.height / scale) + 1))
    im.seek(0)
    im.load()
    return im


# EXIF orientation → the transpose that shows the image upright (as ImageOps.exif_transpose does).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
