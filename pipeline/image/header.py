"""What an image's header says, read without decoding: format, size, colour layout, EXIF
orientation, and whether it is within the pixel limit. One reading for pack's check and extract's
decoders: plain JPEGs through the segment reader (a tenth of Pillow's cost), the rest through
Pillow's lazy open."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from pipeline.errors import reason
from pipeline.image.jpeghead import read_header

# File extensions that make a file a candidate image (checked case-insensitively).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Pillow's own refusal point (2 × MAX_IMAGE_PIXELS): anything above it is a decompression bomb
# or a corrupt header, never a photo worth embedding.
DEFAULT_MAX_PIXELS = 178_956_970
# Extract's default: Pillow's warning point. Decoding costs up to ~10 bytes per pixel (RGBA, then
# RGB, then the resize's buffers), so this bounds one worker's image at ~0.9 GB; `--max-pixels`
# changes it. Pack keeps the higher refusal point (it only reads headers unless --check decode).
EXTRACT_MAX_PIXELS = 89_478_485
MAX_TRANSFORM_SIZE = 4096  # --resize-size / --crop-size above this are typos, not models

# Pillow's format name → the field name the sample's image is stored under.
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


class BadImage(ValueError):
    """The bytes are not an image we can use; the message is the reason recorded."""


@dataclass(frozen=True)
class Header:
    format: str  # Pillow's name: JPEG, PNG, …
    size: tuple[int, int]  # (width, height) as stored, before the EXIF orientation
    plain_jpeg: bool  # a gray or YCbCr JPEG, which libjpeg-turbo decoders take as it is
    orientation: int  # EXIF orientation, 1 when absent
    image: Image.Image | None  # Pillow's lazily opened image, when Pillow had to look
    progressive: bool = False  # a progressive JPEG (read by the segment reader only)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def ext(self) -> str:
        """The field name a shard stores this image under."""
        return _FORMAT_EXT.get(self.format, (self.format or "bin").lower())


def has_image_extension(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def check_pixels(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS, claim: str = "") -> None:
    """Refuse an empty image or one over `max_pixels`; `claim` prefixes the reason (pack says
    "header claims ")."""
    if width <= 0 or height <= 0:
        raise BadImage(f"{claim}an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(f"{claim}{width}x{height} pixels, over the limit of {max_pixels}")


def open_lazy(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, claim: str = "") -> Image.Image:
    """Pillow's parse of the header only; refuses images over `max_pixels`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    check_pixels(im.width, im.height, max_pixels, claim)
    return im


def sniff(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, claim: str = "") -> Header:
    """The header of any image Pillow knows; raises on unreadable data or too many pixels."""
    head = read_header(data)
    if head is not None:
        check_pixels(head.width, head.height, max_pixels, claim)
        plain = head.layers in (1, 3)
        return Header("JPEG", (head.width, head.height), plain, head.orientation, None, head.progressive)
    im = open_lazy(data, max_pixels, claim)
    fmt = im.format or ""
    return Header(fmt, im.size, fmt == "JPEG" and im.mode in ("RGB", "L"), orientation(im), im)


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False) -> Header:
    """Pack's check: the header, and with `full_decode` every pixel; every failure is a BadImage
    whose message is the reason recorded in the manifest."""
    if not data:
        raise BadImage("empty file")
    try:
        head = sniff(data, max_pixels, claim="header claims ")
        if full_decode:
            (head.image or open_lazy(data, max_pixels)).load()
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(f"header claims too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except Exception as exc:  # Pillow raises many types for damaged data
        raise BadImage(reason(exc)) from None
    return head


def orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block must not cost us the pixels
        return 1
