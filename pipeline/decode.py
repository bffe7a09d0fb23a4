"""Bytes → upright RGB pixels, the same way for every image mode Pillow knows."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline.jpeghead import read_header
from pipeline.probe import DEFAULT_MAX_PIXELS

_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def open_lazy(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only; refuses images claiming more than `max_pixels`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    check_pixels(im.width, im.height, max_pixels)
    return im


def check_pixels(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} pixels, over the limit of {max_pixels}")


@dataclass(frozen=True)
class Sniffed:
    """What the header says, read without decoding."""

    plain_jpeg: bool  # a gray or YCbCr JPEG, which libjpeg-turbo decoders take as it is
    size: tuple[int, int]  # as stored, before the EXIF orientation
    orientation: int
    image: Image.Image | None  # Pillow's lazily opened image, when Pillow had to look


def sniff(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sniffed:
    """JPEG segment headers when they are plain (the common case, a tenth of Pillow's cost),
    Pillow's parser otherwise; refuses images claiming more than `max_pixels`."""
    head = read_header(data)
    if head is not None:
        check_pixels(head.width, head.height, max_pixels)
        return Sniffed(head.layers in (1, 3), (head.width, head.height), head.orientation, None)
    im = open_lazy(data, max_pixels)
    return Sniffed(im.format == "JPEG" and im.mode in ("RGB", "L"), im.size, orientation(im), im)


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
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block must not cost us the pixels
        return 1


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
