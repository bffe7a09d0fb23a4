"""JPEG decoding on the model's device (nvJPEG on CUDA), through torchcodec when it is installed
(the `gpu` extra; torchvision 0.29 deprecates its own image decoders in its favour), else through
torchvision, whose deprecation warning featpipe then silences (it knows, and says so in the log).

Workers send the compressed bytes of plain JPEGs instead of crops (a fraction of the bytes, and no
decode work on the CPU); everything else (PNG, CMYK JPEG, …) is still decoded into a crop by the
worker. Here the JPEGs of a batch are decoded in one batched call, oriented, resized and
center-cropped on the device with the same geometry as the CPU path.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from pipeline.errors import reason
from pipeline.image.header import EXTRACT_MAX_PIXELS, sniff
from pipeline.image.transform import TransformConfig, resize_crop_tensor

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


@dataclass
class DeviceJpeg:
    """A JPEG a worker left for the device: its slot in the batch and what the header said."""

    slot: int
    data: torch.Tensor  # uint8, 1-D: the file's bytes
    rotation: int  # EXIF orientation


def device_decodable(data: bytes, max_pixels: int = EXTRACT_MAX_PIXELS) -> tuple[bool, int, tuple[int, int]]:
    """Plain (YCbCr or gray) baseline/progressive JPEGs go to the device; CMYK and the rest do not.
    Returns (to the device?, EXIF orientation, upright size)."""
    if data[:2] != b"\xff\xd8":
        return False, 1, (0, 0)
    head = sniff(data, max_pixels)
    size = (head.height, head.width) if head.orientation >= 5 else head.size
    return head.plain_jpeg, head.orientation, size


def decode_on_device(
    jpegs: list[DeviceJpeg], device: torch.device, cfg: TransformConfig, backend: str | None = None
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Crops (3, C, C) uint8 on `device` by slot, and the reason for each slot that failed."""
    if not jpegs:
        return {}, {}
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
    for j, im in zip(jpegs, images, strict=False):
        if im is not None:
            # torchcodec applies the EXIF orientation itself (and has no switch for it); torchvision does not
            crops[j.slot] = resize_crop_tensor(im if upright else _orient(im, j.rotation), cfg)
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
