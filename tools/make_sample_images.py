#!/usr/bin/env python3
"""Write a deterministic sample image set that looks like real buckets do.

Photo-like JPEGs from ~300 px to 3000 px on the short side, and every awkward case seen in the wild:
progressive JPEG, PNG with alpha, grayscale, CMYK, palette and animated GIF, 16-bit PNG, WebP, BMP,
TIFF, EXIF rotation, 1×1, a wide panorama, nested folders, odd names, upper-case extensions, the
same name in two folders, a JPEG named .png. With --broken, also files that must be skipped.

    python tools/make_sample_images.py DIR [--broken]
"""

from __future__ import annotations

import argparse
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields plus edges and grain: compresses and resizes like a photograph."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, size=(max(2, height // 64), max(2, width // 64), 3)).astype(np.uint8)
    base = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    a = np.asarray(base).astype(np.int16)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(4):  # a few hard-edged shapes, like objects against a background
        cx, cy, r = (
            rng.randint(0, width),
            rng.randint(0, height),
            rng.randint(min(width, height) // 8 + 1, min(width, height) // 3 + 2),
        )
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        a[mask] = a[mask] // 2 + rng.randint(0, 128, size=3)
    a += rng.randint(-6, 7, size=a.shape, dtype=np.int16)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=kw.pop("quality", 88), **kw)
    return out.getvalue()


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def valid_images() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    sizes = [(500, 375), (375, 500), (640, 480), (800, 600), (1024, 768), (1600, 1200), (2048, 1536)]
    for i, (w, h) in enumerate(sizes):
        files[f"photos/IMG_{i + 1:04d}.jpg"] = jpeg_bytes(photo(w, h, seed=i))
    files["phone/PXL_20240101_120000.jpg"] = jpeg_bytes(photo(4000, 3000, seed=100), quality=92)
    files["photos/progressive.jpg"] = jpeg_bytes(photo(600, 400, seed=101), progressive=True)
    rgba = photo(320, 240, seed=102).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1)), "L"))
    files["formats/alpha.png"] = _encode(rgba, "PNG")
    files["formats/gray.jpg"] = jpeg_bytes(photo(400, 300, seed=103).convert("L"))
    files["formats/cmyk.jpg"] = jpeg_bytes(photo(400, 300, seed=104).convert("CMYK"))
    files["formats/palette.gif"] = _encode(photo(300, 300, seed=105).quantize(64), "GIF")
    frames = [photo(200, 150, seed=106 + k).quantize(32) for k in range(3)]
    files["formats/animated.gif"] = _encode(
        frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0
    )
    sixteen = np.asarray(photo(320, 240, seed=109).convert("L")).astype(np.uint16) * 257
    files["formats/sixteen_bit.png"] = _encode(Image.fromarray(sixteen), "PNG")
    files["formats/photo.webp"] = _encode(photo(480, 360, seed=110), "WEBP", quality=85)
    files["formats/photo.bmp"] = _encode(photo(300, 200, seed=111), "BMP")
    files["formats/photo.tiff"] = _encode(photo(300, 400, seed=112), "TIFF")
    rotated = photo(640, 480, seed=113)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    files["formats/exif_rotated.jpg"] = jpeg_bytes(rotated, exif=exif.tobytes())
    files["edge/one_pixel.png"] = _encode(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG")
    files["edge/panorama.jpg"] = jpeg_bytes(photo(6000, 400, seed=114))
    files["nested/a/b/c/deep.jpg"] = jpeg_bytes(photo(320, 320, seed=115))
    files["names/with space.jpg"] = jpeg_bytes(photo(300, 300, seed=116))
    files["names/many.dots.in.name.v2.jpg"] = jpeg_bytes(photo(300, 300, seed=117))
    files["names/ñandú_été_写真.jpg"] = jpeg_bytes(photo(300, 300, seed=118))
    files["names/UPPER.JPG"] = jpeg_bytes(photo(300, 300, seed=119))
    files["names/Mixed.JpEg"] = jpeg_bytes(photo(300, 300, seed=120))
    files["dup/a/same.jpg"] = jpeg_bytes(photo(300, 300, seed=121))
    files["dup/b/same.jpg"] = jpeg_bytes(photo(300, 300, seed=122))
    files["names/actually_a_jpeg.png"] = jpeg_bytes(photo(300, 300, seed=123))
    return files


def broken_images() -> dict[str, bytes]:
    truncated = jpeg_bytes(photo(800, 600, seed=200))
    return {
        "broken/zero_bytes.jpg": b"",
        "broken/text_named.jpg": b"this is not an image, just text\n" * 4,
        "broken/truncated.jpg": truncated[: len(truncated) // 2],
        "broken/huge_header.png": _png_claiming(60000, 60000),
    }


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels but carries almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


DUPLICATE_KINDS = ("copy", "reencoded", "resized", "cropped")


def planted_duplicates() -> dict[str, bytes]:
    """Near-duplicates of six photos, as a bucket collects them: a byte copy, a re-encode at lower
    quality, a half-size copy and a light (90%) center crop of each, under near_dups/."""
    files: dict[str, bytes] = {}
    originals = valid_images()
    for i in range(1, 7):
        data = originals[f"photos/IMG_{i:04d}.jpg"]
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        dw, dh = w // 20, h // 20
        variants = {
            "copy": data,
            "reencoded": jpeg_bytes(im, quality=60),
            "resized": jpeg_bytes(im.resize((w // 2, h // 2), Image.Resampling.BICUBIC)),
            "cropped": jpeg_bytes(im.crop((dw, dh, w - dw, h - dh))),
        }
        for kind in DUPLICATE_KINDS:
            files[f"near_dups/IMG_{i:04d}_{kind}.jpg"] = variants[kind]
    return files


OTHER_FILES = {
    "README.txt": b"sample images for featpipe\n",
    "photos/.DS_Store": b"\0\0\0\1Bud1",
    "nested/notes.md": b"# not an image\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--broken", action="store_true", help="also write broken files under DEST/broken/")
    ap.add_argument(
        "--duplicates",
        action="store_true",
        help="also write planted near-duplicates of six photos under DEST/near_dups/",
    )
    args = ap.parse_args()
    files = {
        **valid_images(),
        **OTHER_FILES,
        **(broken_images() if args.broken else {}),
        **(planted_duplicates() if args.duplicates else {}),
    }
    for rel, data in files.items():
        _save(args.dest / rel, data)
    n_img = len(valid_images())
    print(
        f"wrote {n_img} valid images{' + 4 broken' if args.broken else ''}"
        f"{' + 24 planted near-duplicates' if args.duplicates else ''} and {len(OTHER_FILES)} other files "
        f"to {args.dest}"
    )


if __name__ == "__main__":
    main()
