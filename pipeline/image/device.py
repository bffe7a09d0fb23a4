"""JPEG decoding on the model's device (nvJPEG on CUDA), through torchcodec when it is installed
(the `gpu` extra; torchvision 0.29 deprecates its own image decoders in its favour), else through
torchvision, whose deprecation warning featpipe then silences (it knows, and says so in the log).

Workers send the compressed bytes of plain baseline JPEGs instead of crops (a fraction of the
bytes, and no decode work on the CPU), packed into one flat buffer per batch (`JpegPack`: one
shared-memory handle to pass between processes instead of one per image). Everything else (PNG,
CMYK, progressive JPEGs, which nvJPEG decodes on the CPU one at a time in the model's process, and
banners whose resize would be windowed) is still decoded into a crop by the worker. Here the JPEGs
of a batch are decoded in batched calls of a bounded number of pixels (256 phone photos at once
were 9.2 GB of device memory), on a side stream (torchcodec synchronises the stream it decodes on:
the model's stream keeps running), then oriented, resized and center-cropped on the device with
the same geometry as the CPU path.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import torch

from pipeline.errors import reason
from pipeline.image.header import EXTRACT_MAX_PIXELS, sniff
from pipeline.image.resample import needs_window
from pipeline.image.transform import TransformConfig, resize_crop_tensor, resized_geometry

log = logging.getLogger("featpipe")


def jpeg_backend() -> str:
    """torchcodec when importable, else torchvision."""
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # ImportError, or its native libraries failing to load
        return "torchvision"
    return "torchcodec"


def decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device, backend: str | None = None):
    """One JPEG (1-D uint8 tensor of its bytes) or a batch → RGB (3, H, W) uint8 on `device`."""
    if (backend or jpeg_backend()) == "torchcodec":
        from torchcodec.decoders import decode_jpeg as codec_decode

        return codec_decode(data, mode="RGB", device=device)
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as vision_decode

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return vision_decode(data, mode=ImageReadMode.RGB, device=device)


DECODE_PIXELS = 256 * 2**20  # pixels decoded at once on the device: ~0.8 GB of RGB at the peak


@dataclass
class DeviceJpeg:
    """A JPEG a worker left for the device: its slot in the batch and what the header said."""

    slot: int
    data: torch.Tensor  # uint8, 1-D: the file's bytes
    rotation: int  # EXIF orientation
    pixels: int = 0  # width × height, for bounding what is decoded at once


@dataclass
class JpegPack:
    """A batch's JPEGs as one flat byte buffer and their offsets: one tensor to pin and to pass
    between processes (one per image cost a shared-memory file and a socket fetch each)."""

    data: torch.Tensor  # uint8, 1-D: every file's bytes, one after another
    offsets: list[int]  # len(slots) + 1 boundaries into data
    slots: list[int]
    rotations: list[int]
    pixels: list[int]

    @staticmethod
    def of(files: list[tuple[int, bytes, int, int]]) -> JpegPack:
        """(slot, bytes, rotation, pixels) per JPEG → one pack."""
        offsets = [0]
        for _, data, _, _ in files:
            offsets.append(offsets[-1] + len(data))
        flat = (
            torch.frombuffer(bytearray(b"".join(f[1] for f in files)), dtype=torch.uint8)
            if files
            else torch.empty(0, dtype=torch.uint8)
        )
        return JpegPack(flat, offsets, [f[0] for f in files], [f[2] for f in files], [f[3] for f in files])

    def __len__(self) -> int:
        return len(self.slots)

    def items(self) -> list[DeviceJpeg]:
        """Views into the buffer, no copies."""
        bounds = zip(self.offsets, self.offsets[1:], strict=False)
        return [
            DeviceJpeg(slot, self.data[a:b], rotation, pixels)
            for slot, (a, b), rotation, pixels in zip(self.slots, bounds, self.rotations, self.pixels, strict=True)
        ]


def device_decodable(
    data: bytes, max_pixels: int = EXTRACT_MAX_PIXELS, cfg: TransformConfig | None = None
) -> tuple[bool, int, tuple[int, int]]:
    """Plain (YCbCr or gray) baseline JPEGs go to the device; CMYK, progressive (nvJPEG decodes
    those on the CPU, in the model's process) and, given `cfg`, banners whose resize is windowed
    do not. Returns (to the device?, EXIF orientation, upright size)."""
    if data[:2] != b"\xff\xd8":
        return False, 1, (0, 0)
    head = sniff(data, max_pixels)
    size = (head.height, head.width) if head.orientation >= 5 else head.size
    banner = cfg is not None and needs_window(resized_geometry(*size, cfg)[:2], cfg.resize_size)
    return head.plain_jpeg and not head.progressive and not banner, head.orientation, size


def decode_on_device(
    jpegs: list[DeviceJpeg], device: torch.device, cfg: TransformConfig, backend: str | None = None
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Crops (3, C, C) uint8 on `device` by slot, and the reason for each slot that failed."""
    crops, failed = {}, {}
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    for part in _parts(jpegs):
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            part_crops, part_failed = _decode_part(part, device, cfg, backend)
        crops |= part_crops
        failed |= part_failed
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)  # the model's stream reads the crops
    return crops, failed


def _parts(jpegs: list[DeviceJpeg]) -> list[list[DeviceJpeg]]:
    """Runs of JPEGs of at most DECODE_PIXELS pixels together (one at least)."""
    parts: list[list[DeviceJpeg]] = []
    total = 0
    for j in jpegs:
        if not parts or total + j.pixels > DECODE_PIXELS:
            parts.append([])
            total = 0
        parts[-1].append(j)
        total += j.pixels
    return parts


def _decode_part(
    jpegs: list[DeviceJpeg], device: torch.device, cfg: TransformConfig, backend: str | None
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    upright = (backend or jpeg_backend()) == "torchcodec"
    crops, failed = {}, {}
    try:
        images = decode_jpeg([j.data for j in jpegs], device=device, backend=backend)
    except Exception:  # one bad file fails the batched call: decode one by one to find it
        images = []
        for j in jpegs:
            try:
                images.append(decode_jpeg(j.data, device=device, backend=backend))
            except Exception as exc:
                images.append(None)
                failed[j.slot] = f"decode failed on {device.type}: {reason(exc)}"
    # torchcodec applies the EXIF orientation itself (and has no switch for it); torchvision does not
    # One resize call per size: a batch of one size (img2dataset's resized shards, a camera's
    # photos) costs one call instead of one per image (~82 µs of call overhead each on a GPU)
    by_size: dict[tuple[int, int], list[tuple[DeviceJpeg, torch.Tensor]]] = {}
    for j, im in zip(jpegs, images, strict=False):
        if im is not None:
            im = im if upright else _orient(im, j.rotation)
            by_size.setdefault(tuple(im.shape[-2:]), []).append((j, im))
    for group in by_size.values():
        resized = resize_crop_tensor(torch.stack([im for _, im in group]), cfg)
        for (j, _), crop in zip(group, resized, strict=True):
            crops[j.slot] = crop
    return crops, failed


# EXIF orientation → the same transpose as Image.transpose, on a (3, H, W) tensor.
_ORIENT = {
    2: lambda t: t.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda t: t.flip(-1).flip(-2),  # ROTATE_180
    4: lambda t: t.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda t: t.transpose(-1, -2),  # TRANSPOSE
    6: lambda t: t.rot90(-1, (-2, -1)),  # ROTATE_270: a quarter turn clockwise
    7: lambda t: t.transpose(-1, -2).flip(-1).flip(-2),  # TRANSVERSE
    8: lambda t: t.rot90(1, (-2, -1)),  # ROTATE_90: a quarter turn counter-clockwise
}


def _orient(im: torch.Tensor, rotation: int) -> torch.Tensor:
    return _ORIENT[rotation](im) if rotation in _ORIENT else im
