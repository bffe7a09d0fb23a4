"""A JPEG's segment headers read without decoding anything: size, colour layers, EXIF orientation.
A tenth of the cost of Pillow's parser (which builds every table); anything unusual returns None
so that Pillow gives the verdict."""

from __future__ import annotations

import struct
from dataclasses import dataclass

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    layers: int  # 1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK
    orientation: int  # EXIF orientation, 1 when absent
    progressive: bool = False  # SOF2/6/10/14: nvJPEG falls back to the CPU for these


def read_header(data: bytes) -> JpegHeader | None:
    """None for anything but a well-formed 8-bit JPEG with 1, 3 or 4 layers whose segments lead
    cleanly to the first scan, or one with a multi-picture (MPF) segment (Pillow may call it MPO)."""
    if data[:2] != b"\xff\xd8":
        return None
    size, layers, rotation, i, end = None, 0, 1, 2, len(data) - 4
    progressive = False
    exif_seen = False
    while i <= end:
        if data[i] != 0xFF or not 0xC0 <= data[i + 1] <= 0xFE or 0xD0 <= data[i + 1] <= 0xD9:
            return None
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > len(data):
            return None
        body = data[i + 4 : i + 2 + length]
        if marker in _SOF:
            if size is not None or len(body) < 6 or body[0] != 8 or body[5] not in (1, 3, 4):
                return None
            size, layers = (int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big")), body[5]
            progressive = marker in _PROGRESSIVE
        elif marker == 0xE1 and body[:6] == b"Exif\x00\x00" and not exif_seen:
            exif_seen = True  # the first EXIF block counts, as in Pillow
            rotation = _exif_orientation(body[6:])
            if rotation is None:
                return None
        elif marker == 0xE2 and body[:4] == b"MPF\x00":
            return None
        elif marker == 0xDA:
            return JpegHeader(size[0], size[1], layers, rotation, progressive) if size else None
        i += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    """Tag 0x0112 of IFD0; 1 when absent; None when the block is not plain enough to trust."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = struct.unpack_from(order + "I", tiff, 4)[0]
    if ifd + 2 > len(tiff):
        return None
    count = struct.unpack_from(order + "H", tiff, ifd)[0]
    if ifd + 2 + 12 * count > len(tiff):
        return None
    for k in range(count):
        tag, kind, n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * k)
        if tag == _ORIENTATION_TAG:
            if n != 1 or kind not in (3, 4):  # SHORT or LONG
                return None
            return struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, ifd + 10 + 12 * k)[0]
    return 1
