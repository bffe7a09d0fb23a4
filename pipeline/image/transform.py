"""The preprocessing: bytes → a uint8 crop on the CPU, then float and the model's mean/std on the
model's device (4× fewer bytes over PCIe, and no float work in the data workers).

The spec is the model's own (models/ resolves it from timm's data config, the HF image processor
or open_clip's per-tag config): resize mode (`shortest` side then a centre crop, or `squash` to a
square), resize size, crop size (equal to the resize size for no crop), interpolation (bicubic or
bilinear, antialiased like Pillow), mean and std. The default is torch.hub DINOv2's: shortest side
256 bicubic, crop 224, ImageNet statistics.

All modes give the same geometry (torchvision's Resize(size, interpolation) then CenterCrop). An
image whose full resize would hold more than 4× a square of the resize size (a banner, a panorama)
has only its crop resized (image/resample.py: the same bytes as Pillow's), so no image costs more
memory than its decode plus the crop, in every mode:
  exact   the original script's Pillow + torchvision pipeline, pixel for pixel;
  fast    JPEGs decoded by libjpeg-turbo (simplejpeg) at a reduced scale when the source is at least
          twice the target, then torch's vectorised uint8 bicubic resize (antialiased like Pillow's);
  device  plain JPEGs travel compressed and are decoded on the model's device (image/device.py);
          other images take the fast path in the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F2
from PIL import Image
from torchvision.transforms import InterpolationMode

from pipeline.errors import UserError
from pipeline.image.decode import ORIENTATION_TRANSPOSE, load_first_frame, open_image, to_rgb, upright
from pipeline.image.header import EXTRACT_MAX_PIXELS, MAX_TRANSFORM_SIZE, open_lazy, sniff
from pipeline.image.resample import needs_window, resize_window

try:
    import simplejpeg
except ImportError:  # optional (the `fast` extra): Pillow's draft mode stands in
    simplejpeg = None

DECODE_MODES = ("fast", "exact", "device")
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
RESIZE_MODES = ("shortest", "squash")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformConfig:
    resize_size: int = 256
    crop_size: int = 224
    keep_ratio: bool = True
    mode: str = "fast"  # "exact", or "device": plain JPEGs are decoded on the model's device
    max_pixels: int = EXTRACT_MAX_PIXELS  # larger images are recorded as failed, not decoded
    interpolation: str = "bicubic"  # or "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def resize_mode(self) -> str:
        """shortest: the shorter side to resize_size, aspect kept; squash: both sides to resize_size."""
        return "shortest" if self.keep_ratio else "squash"

    def fingerprint(self) -> dict:
        fp = {
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "keep_ratio": self.keep_ratio,
            "mode": self.mode,
        }
        # Keys added since: only when they differ from the old fixed values, so runs made before
        # them stay compatible (and resume).
        if self.max_pixels != EXTRACT_MAX_PIXELS:
            fp["max_pixels"] = self.max_pixels
        if self.interpolation != "bicubic":
            fp["interpolation"] = self.interpolation
        if tuple(self.mean) != IMAGENET_MEAN or tuple(self.std) != IMAGENET_STD:
            fp["mean"], fp["std"] = list(self.mean), list(self.std)
        return fp

    def describe(self) -> str:
        """One line for the log."""
        crop = f", centre crop {self.crop_size}" if self.crop_size != self.resize_size or self.keep_ratio else ""
        stats = ", ".join(f"{v:.4g}" for v in self.mean) + " / " + ", ".join(f"{v:.4g}" for v in self.std)
        return f"{self.resize_mode} {self.resize_size} {self.interpolation}{crop}, mean/std {stats}, decode {self.mode}"

    def check(self) -> None:
        """Sizes a model can use; an absurd one would make every image try a huge allocation."""
        for flag, value in (("--resize-size", self.resize_size), ("--crop-size", self.crop_size)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TRANSFORM_SIZE:
                raise UserError(f"{flag} must be between 1 and {MAX_TRANSFORM_SIZE}, got {value}")
        if self.crop_size > self.resize_size:
            raise UserError(f"--crop-size {self.crop_size} is larger than --resize-size {self.resize_size}")
        if self.max_pixels < 1:
            raise UserError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.mode not in DECODE_MODES:
            raise UserError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {self.mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"--interpolation must be bicubic or bilinear, got {self.interpolation!r}")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) != 3 or not all(isinstance(v, float | int) for v in values):
                raise UserError(f"{flag} takes three numbers (R G B), got {values!r}")
        if not all(v > 0 for v in self.std):
            raise UserError(f"--std values must be positive, got {self.std!r}")


def crop_uint8(data: bytes, cfg: TransformConfig) -> torch.Tensor:
    """Decode, orient, resize, center-crop; returns a (3, crop, crop) uint8 tensor."""
    return crop_with_size(data, cfg)[0]


def crop_with_size(data: bytes, cfg: TransformConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """The crop, and the image's upright full size (width, height)."""
    if cfg.mode == "exact":
        im = to_rgb(upright(open_image(data, cfg.max_pixels)), exact=True)
        size = im.size
        new_w, new_h, left, top = resized_geometry(*size, cfg)
        if needs_window((new_w, new_h), cfg.resize_size):  # a banner: only the crop is resized
            pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
            return resize_window(
                pixels, (new_w, new_h), (left, top, cfg.crop_size, cfg.crop_size), cfg.interpolation
            ), size
        target = [cfg.resize_size] if cfg.keep_ratio else [cfg.resize_size, cfg.resize_size]
        im = TF.resize(im, target, interpolation=INTERPOLATIONS[cfg.interpolation])
        im = TF.center_crop(im, [cfg.crop_size, cfg.crop_size])
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1), size
    pixels, full_size = decode_fast(data, cfg.resize_size, cfg.max_pixels)
    # (H, W, 3) seen as (3, H, W) without a copy: torch's uint8 resize kernel is fastest on this layout
    return resize_crop_tensor(torch.from_numpy(pixels).permute(2, 0, 1), cfg, full_size), full_size


def decode_fast(
    data: bytes, target_short: int, max_pixels: int = EXTRACT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Upright RGB pixels (H, W, 3), possibly decoded at a reduced scale, and the full-size upright (w, h)."""
    head = sniff(data, max_pixels)
    full, rotation = head.size, head.orientation
    reduce = min(full) >= 2 * target_short
    if head.plain_jpeg and simplejpeg is not None:
        # No fastdct/fastupsample: measured, they cost fidelity (cosine min 0.996) for little speed.
        pixels = simplejpeg.decode_jpeg(
            data,
            "RGB",
            min_height=target_short if reduce else 0,
            min_width=target_short if reduce else 0,
            min_factor=2 if reduce else 1,
        )
    else:
        pixels = np.asarray(to_rgb(load_first_frame(head.image or open_lazy(data), target_short)))
    if rotation in ORIENTATION_TRANSPOSE:
        pixels = np.asarray(Image.fromarray(pixels).transpose(ORIENTATION_TRANSPOSE[rotation]))
        if rotation >= 5:
            full = (full[1], full[0])
    # Pillow lends read-only buffers, which torch warns about; simplejpeg's arrays are writable
    return (pixels if pixels.flags.writeable else pixels.copy()), full


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


def resize_crop_tensor(
    im: torch.Tensor, cfg: TransformConfig, full_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """(3, H, W) uint8 → (3, crop, crop), or a stack (N, 3, H, W) of images of one size → (N, 3,
    crop, crop) in one call: bicubic with antialiasing (Pillow's filter, in torch's vectorised uint8
    kernel), geometry from `full_size` when `im` is a reduced decode of it."""
    w, h = full_size or (im.shape[-1], im.shape[-2])
    new_w, new_h, left, top = resized_geometry(w, h, cfg)
    if needs_window((new_w, new_h), cfg.resize_size):  # a banner: only the crop is resized (resample.py)
        box = (left, top, cfg.crop_size, cfg.crop_size)
        if im.ndim == 4:
            return torch.stack([resize_window(one, (new_w, new_h), box, cfg.interpolation) for one in im])
        return resize_window(im, (new_w, new_h), box, cfg.interpolation)
    if (im.shape[-1], im.shape[-2]) != (new_w, new_h):
        im = F2.resize(im, [new_h, new_w], interpolation=INTERPOLATIONS[cfg.interpolation], antialias=True)
    return im[..., top : top + cfg.crop_size, left : left + cfg.crop_size]


class Normalizer:
    """uint8 (B,3,H,W) in any layout on the device → float, scaled and standardised like
    ToTensor + Normalize, folded into one multiply and one subtract:
    (x/255 - mean)/std = x·(1/(255·std)) - mean/std. The result is planar, or channels-last for a
    channels-last model (the workers' layout: no transpose at all, and a CNN runs faster on it)."""

    def __init__(
        self,
        device: torch.device,
        channels_last: bool = False,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        mean = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        self.scale = (1 / (255 * std)).float().to(device)
        self.shift = (mean / std).float().to(device)
        self.channels_last = channels_last
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            # planar first, on the uint8 bytes: a per-channel broadcast is slow on a channels-last tensor
            return x.contiguous().float().mul_(self.scale).sub_(self.shift)
        b, c, h, w = x.shape
        rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(b, h, w * c)
        scale, shift = self._row_pattern(w)  # the three channels' factors repeated along a pixel row
        return rows.float().mul_(scale).sub_(shift).view(b, h, w, c).permute(0, 3, 1, 2)

    def _row_pattern(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if width not in self._rows:
            self._rows[width] = (self.scale.view(-1).repeat(width), self.shift.view(-1).repeat(width))
        return self._rows[width]
