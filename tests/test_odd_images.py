"""Images of extreme aspect ratio cost bounded memory: only the centre crop is resized, with the
same bytes as the reference transform (torchvision's Resize then CenterCrop on Pillow)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import ROOT, noisy_photo
from PIL import Image

from pipeline.image.device import DeviceJpeg, decode_on_device
from pipeline.image.transform import TransformConfig, crop_uint8

MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14"]


def _encoded(w: int, h: int, fmt: str, seed: int) -> bytes:
    """A gradient with noise (a JPEG of pure noise would decode differently per decoder)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), (x + y) % 256], -1)
    pixels = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _reference(data: bytes, cfg: TransformConfig) -> np.ndarray:
    """The original script's transform, whole image resized (only for banners that fit in memory)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = TF.resize(im, [cfg.resize_size], interpolation=TF.InterpolationMode.BICUBIC)
    return np.asarray(TF.center_crop(im, [cfg.crop_size, cfg.crop_size])).transpose(2, 0, 1)


@pytest.mark.parametrize(
    "w,h,fmt",
    [(1, 1200, "PNG"), (1200, 1, "PNG"), (3, 2000, "PNG"), (300, 3000, "JPEG"), (4000, 290, "JPEG")],
)
def test_a_banner_crop_equals_the_full_resize_in_every_mode(w, h, fmt):
    """Upscaled (short side < 256) and downscaled (> 256) banners, tall and wide."""
    data = _encoded(w, h, fmt, w + h)
    want = _reference(data, TransformConfig(mode="exact"))
    for mode in ("exact", "fast"):
        got = crop_uint8(data, TransformConfig(mode=mode)).numpy()
        assert got.shape == want.shape and np.array_equal(got, want), (mode, np.abs(got.astype(int) - want).max())
    if fmt == "JPEG":  # device mode decodes JPEGs on the model's device (here the CPU) and resizes there
        item = DeviceJpeg(0, torch.frombuffer(bytearray(data), dtype=torch.uint8), 1)
        crops, failed = decode_on_device([item], torch.device("cpu"), TransformConfig(mode="device"))
        assert not failed and np.array_equal(crops[0].numpy(), want)


def _peak_rss_mb(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """`featpipe ARGS` in a child, and the peak RSS of its largest process (ru_maxrss of the children)."""
    code = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(p.stderr);"
        "sys.exit(p.returncode)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "pipeline", *args], capture_output=True, text=True
    )
    return int(proc.stdout.split()[-1]) / 1024, proc


def test_extract_with_banners_holds_the_memory_of_the_set_without_them(tmp_path):
    """1×60000, 60000×1 and 3×40000 asked for 11.8 GB, 11.8 GB and 2.6 GB of resized pixels: with
    them, extract's peak RSS stays within 10% of the same photos alone, in every decode mode, and
    each banner is embedded."""
    plain, odd = tmp_path / "plain", tmp_path / "odd"
    for folder in (plain, odd):
        folder.mkdir()
        for i in range(12):
            (folder / f"photo{i:02d}.jpg").write_bytes(noisy_photo(i))
    banners = {"tall.png": (1, 60000), "wide.png": (60000, 1), "strip.png": (3, 40000)}
    for name, (w, h) in banners.items():
        (odd / name).write_bytes(_encoded(w, h, "PNG", w))
    for mode in ("fast", "exact", "device"):
        flags = [*MODEL, "--workers", "1", "--batch-size", "4", "--decode", mode, "--no-progress"]
        base, proc = _peak_rss_mb("extract", str(plain), str(tmp_path / f"out-plain-{mode}"), *flags)
        assert proc.returncode == 0, proc.stderr
        peak, proc = _peak_rss_mb("extract", str(odd), str(tmp_path / f"out-odd-{mode}"), *flags)
        assert proc.returncode == 0, proc.stderr
        assert peak <= 1.10 * base, f"{mode}: {peak:.0f} MB with banners vs {base:.0f} MB without"
        names = json.loads((tmp_path / f"out-odd-{mode}" / "img_list.json").read_text())
        assert sorted(Path(p).name for p in names if p.endswith(".png")) == sorted(banners)
        assert np.load(tmp_path / f"out-odd-{mode}" / "fts.npy").shape[0] == 15
