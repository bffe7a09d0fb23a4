"""Header-only image checks for the packer: what format is this, how big does it claim to be."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from pipeline.jpeghead import read_header

# File extensions that make a file a candidate image (checked case-insensitively).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})

# Pillow's own refusal point (2 × MAX_IMAGE_PIXELS): anything above it is a decompression bomb
# or a corrupt header, never a photo worth embedding.
DEFAULT_MAX_PIXELS = 178_956_970

# Sniffed format → the field name the sample's image is stored under.
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp",
               "GIF": "gif", "TIFF": "tif"}


class BadImage(Exception):
    """The bytes are not an image we can use; the message is the reason recorded."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    ext: str
    width: int
    height: int


def has_image_extension(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False) -> ImageInfo:
    if not data:
        raise BadImage("empty file")
    head = None if full_decode else read_header(data)
    if head is not None:
        info = ImageInfo("JPEG", "jpg", head.width, head.height)
        _check_size(info, max_pixels)
        return info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                info = ImageInfo(im.format or "", _FORMAT_EXT.get(im.format or "", (im.format or "bin").lower()),
                                 im.width, im.height)
                _check_size(info, max_pixels)
                if full_decode:
                    im.load()
        except BadImage:
            raise
        except Image.DecompressionBombError as exc:
            raise BadImage(f"header claims too many pixels: {exc}") from None
        except UnidentifiedImageError:
            raise BadImage("not a recognised image format") from None
        except Exception as exc:  # Pillow raises many types for damaged data
            raise BadImage(f"{type(exc).__name__}: {exc}") from None
    return info


def _check_size(info: ImageInfo, max_pixels: int) -> None:
    if info.width <= 0 or info.height <= 0:
        raise BadImage(f"header claims an empty image ({info.width}x{info.height})")
    if info.width * info.height > max_pixels:
        raise BadImage(f"header claims {info.width}x{info.height} pixels, over the limit of {max_pixels}")
