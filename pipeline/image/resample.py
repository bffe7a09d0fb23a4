"""Pillow's antialiased resize, computed only where a centre crop will look: the same bytes as
`Image.resize` followed by the crop, at a cost bounded by the crop instead of the resized image.

Why: the shortest-side resize scales the whole image before cropping. A 1×60000 banner resized
so its short side is 256 becomes 256×15,360,000 pixels (11.8 GB) for a 224×224 crop; a few such
images once took extract from 0.9 to 4.2 GB of RSS. Here each output pixel of the crop is computed
from the source pixels its filter reaches, exactly as Pillow's Resample.c does:

- per axis, the filter is centred at (j + 0.5) · in/out for output pixel j of the *full* resize
  (so the crop's pixels are those of the full resize, not of a resize of a sub-box: Pillow's `box`
  argument is single precision and would shift them), support `filter.support · max(in/out, 1)`,
  clipped to the image, weights normalised to sum 1 and rounded to 22-bit fixed point;
- two passes, each rounded to uint8, over only the rows and columns the other pass needs, in
  Pillow's order (`vertical_first`).

The sums are integers below 2^42, so a float64 matrix product computes them exactly (BLAS speed
on the CPU, and the same code on a GPU tensor).
"""

from __future__ import annotations

import PIL
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_min(0.0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


def axis_weights(in_size: int, out_size: int, start: int, count: int, interpolation: str) -> tuple[torch.Tensor, int]:
    """Fixed-point weights of output pixels [start, start + count) of a resize in_size → out_size,
    as a dense (count, span) float64 matrix over source pixels [first, first + span); and first."""
    kernel, support = FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    centers = [(j + 0.5) * scale for j in range(start, start + count)]
    # Pillow's bounds: (int)(center ± support + 0.5), clipped to the image
    lows = [max(int(c - support + 0.5), 0) for c in centers]
    highs = [min(int(c + support + 0.5), in_size) for c in centers]
    first, span = min(lows), max(highs) - min(lows)
    weights = torch.zeros((count, span), dtype=torch.float64)
    for i, (c, lo, hi) in enumerate(zip(centers, lows, highs, strict=True)):
        xs = torch.arange(lo, hi, dtype=torch.float64)
        w = kernel((xs - c + 0.5) / filterscale)
        total = float(w.sum())
        if total != 0.0:
            w = w / total
        # C's (int)(±0.5 + w · 2^22): round half away from zero
        w = w * (1 << PRECISION_BITS)
        weights[i, lo - first : hi - first] = torch.where(w < 0, torch.ceil(w - 0.5), torch.floor(w + 0.5))
    return weights, first


def _apply(weights: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """(out, span) fixed-point weights × (span, ...) uint8 → (out, ...) uint8, rounded as Pillow's clip8."""
    flat = pixels.reshape(pixels.shape[0], -1).to(torch.float64)
    sums = weights.to(pixels.device) @ flat + (1 << (PRECISION_BITS - 1))
    out = torch.floor(sums / (1 << PRECISION_BITS)).clamp_(0, 255).to(torch.uint8)
    return out.reshape(weights.shape[0], *pixels.shape[1:])


def resize_window(
    im: torch.Tensor, new_size: tuple[int, int], box: tuple[int, int, int, int], interpolation: str
) -> torch.Tensor:
    """(C, H, W) uint8 → the (C, bh, bw) window `box` = (left, top, bw, bh) of its resize to
    new_size = (new_w, new_h), equal byte for byte to Pillow's resize then crop."""
    _, h, w = im.shape
    new_w, new_h = new_size
    left, top, bw, bh = box
    # (H, W, C) views: only the rows and columns the window's filters reach are ever read.
    # An axis whose size does not change is not resampled (Pillow skips that pass too).
    wy, y0 = axis_weights(h, new_h, top, bh, interpolation) if new_h != h else (None, top)
    wx, x0 = axis_weights(w, new_w, left, bw, interpolation) if new_w != w else (None, left)
    rows = im.permute(1, 2, 0)[y0 : y0 + (bh if wy is None else wy.shape[1])]
    rows = rows[:, x0 : x0 + (bw if wx is None else wx.shape[1])]
    horizontal = (lambda r: _apply(wx, r.transpose(0, 1)).transpose(0, 1)) if wx is not None else (lambda r: r)
    vertical = (lambda r: _apply(wy, r)) if wy is not None else (lambda r: r)
    if vertical_first(w, h, new_w, new_h):
        return horizontal(vertical(rows)).permute(2, 0, 1).contiguous()
    return vertical(horizontal(rows)).permute(2, 0, 1).contiguous()


def vertical_first(w: int, h: int, new_w: int, new_h: int) -> bool:
    """The pass order, which decides the rounding of the uint8 intermediate. Pillow ≤ 12 always
    went horizontal first; Pillow 13 may go vertical first when the height shrinks
    (python-pillow/Pillow#9549). This rule matched Pillow 13 on 150 of 150 shortest-side resizes
    of shrinking banners and panoramas (tall: vertical first) and wherever only the height
    shrinks; where both shrink at other ratios (not a shortest-side resize) it matched 91% of
    random sizes, and a mismatch moves some pixels by one pass's rounding."""
    if int(PIL.__version__.split(".", 1)[0]) < 13:
        return False
    return h > new_h and (w <= new_w or h > w)


def needs_window(new_size: tuple[int, int], resize_size: int) -> bool:
    """The full resize is kept while it is at most 4× a square of the resize size (aspect ≤ 4:1,
    every ordinary photo: torch's SIMD kernel is faster there); past it, only the window is made."""
    return new_size[0] * new_size[1] > 4 * resize_size * resize_size
