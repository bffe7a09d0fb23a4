"""The preprocessing: bytes → a uint8 crop on the CPU, then float and ImageNet statistics on the
model's device (4× fewer bytes over PCIe, and no float work in the data workers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from pipeline.decode import open_image, to_rgb, upright

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformConfig:
    resize_size: int = 256
    crop_size: int = 224
    keep_ratio: bool = True
    # exact: the original script's Pillow pipeline, pixel for pixel.
    # fast: JPEG draft decoding when the source is ≥ 2× the target, 16-bit images scaled not clipped.
    mode: str = "fast"

    def fingerprint(self) -> dict:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "keep_ratio": self.keep_ratio,
                "mode": self.mode}


def crop_uint8(data: bytes, cfg: TransformConfig) -> np.ndarray:
    """Decode, orient, resize, center-crop; returns (3, crop, crop) uint8."""
    im = open_image_for(data, cfg)
    im = upright(im)
    im = to_rgb(im, exact=cfg.mode == "exact")
    size = [cfg.resize_size] if cfg.keep_ratio else [cfg.resize_size, cfg.resize_size]
    im = TF.resize(im, size, interpolation=InterpolationMode.BICUBIC)
    im = TF.center_crop(im, [cfg.crop_size, cfg.crop_size])
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def open_image_for(data: bytes, cfg: TransformConfig) -> Image.Image:
    return open_image(data, draft_short_side=None if cfg.mode == "exact" else cfg.resize_size)


class Normalizer:
    """uint8 (B,3,H,W) on the device → float, scaled and standardised like ToTensor + Normalize."""

    def __init__(self, device: torch.device):
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255).sub_(self.mean).div_(self.std)
