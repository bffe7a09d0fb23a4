"""The preprocessing: bytes → a uint8 crop on the CPU, then float and ImageNet statistics on the
model's device (4× fewer bytes over PCIe, and no float work in the data workers).

All modes give the same geometry (torchvision's Resize(size, bicubic) then CenterCrop):
  exact   the original script's Pillow + torchvision pipeline, pixel for pixel;
  fast    JPEGs decoded by libjpeg-turbo (simplejpeg) at a reduced scale when the source is at least
          twice the target, and one bicubic resize of only the region that survives the crop;
  device  plain JPEGs travel compressed and are decoded on the model's device (devicedecode.py);
          other images take the fast path in the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from pipeline.decode import ORIENTATION_TRANSPOSE, open_image, open_lazy, orientation, to_rgb, upright

try:
    import simplejpeg
except ImportError:  # optional (the `fast` extra): Pillow's draft mode stands in
    simplejpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformConfig:
    resize_size: int = 256
    crop_size: int = 224
    keep_ratio: bool = True
    mode: str = "fast"  # "exact", or "device": plain JPEGs are decoded on the model's device

    def fingerprint(self) -> dict:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "keep_ratio": self.keep_ratio,
                "mode": self.mode}


def crop_uint8(data: bytes, cfg: TransformConfig) -> np.ndarray:
    """Decode, orient, resize, center-crop; returns (3, crop, crop) uint8."""
    if cfg.mode == "exact":
        im = to_rgb(upright(open_image(data)), exact=True)
        size = [cfg.resize_size] if cfg.keep_ratio else [cfg.resize_size, cfg.resize_size]
        im = TF.resize(im, size, interpolation=InterpolationMode.BICUBIC)
        im = TF.center_crop(im, [cfg.crop_size, cfg.crop_size])
    else:
        im, full_size = decode_fast(data, cfg.resize_size)
        im = resize_crop(im, full_size, cfg)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def decode_fast(data: bytes, target_short: int) -> tuple[Image.Image, tuple[int, int]]:
    """An upright RGB image, possibly decoded at a reduced scale, and its full-size upright (w, h)."""
    im = open_lazy(data)
    full = im.size
    rotation = orientation(im)
    reduce = min(full) >= 2 * target_short
    if simplejpeg is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):
        arr = simplejpeg.decode_jpeg(data, "RGB", min_height=target_short if reduce else 0,
                                     min_width=target_short if reduce else 0, min_factor=2 if reduce else 1)
        im = Image.fromarray(arr, "RGB")
    else:
        if reduce and im.format == "JPEG":
            scale = min(full) / target_short
            im.draft(im.mode, (int(full[0] / scale) + 1, int(full[1] / scale) + 1))
        im.seek(0)
        im.load()
        im = to_rgb(im)
    if rotation in ORIENTATION_TRANSPOSE:
        im = im.transpose(ORIENTATION_TRANSPOSE[rotation])
        if rotation >= 5:
            full = (full[1], full[0])
    return im, full


def resized_geometry(w: int, h: int, cfg: TransformConfig) -> tuple[int, int, int, int]:
    """torchvision's Resize then CenterCrop, as numbers: resized (w, h) and the crop's (left, top)."""
    if cfg.keep_ratio:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = cfg.resize_size, int(cfg.resize_size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_w = new_h = cfg.resize_size
    c = cfg.crop_size
    return new_w, new_h, int(round((new_w - c) / 2.0)), int(round((new_h - c) / 2.0))


def resize_crop(im: Image.Image, full_size: tuple[int, int], cfg: TransformConfig) -> Image.Image:
    """The geometry computed on the full-size image, applied to `im` (which may be a reduced
    decode of it) by resampling only the crop's source box."""
    new_w, new_h, left, top = resized_geometry(*full_size, cfg)
    c = cfg.crop_size
    sx, sy = im.width / new_w, im.height / new_h
    box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
    return im.resize((c, c), Image.Resampling.BICUBIC, box=box)


class Normalizer:
    """uint8 (B,3,H,W) on the device → float, scaled and standardised like ToTensor + Normalize."""

    def __init__(self, device: torch.device):
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255).sub_(self.mean).div_(self.std)
