#!/usr/bin/env python3
"""`make bench` for model sources: featpipe's data path against the one timm's docs show, on the
same images, workers and batch size, in one run.

    python tools/bench_models.py [--images 256] [--workers 2] [--batch 64]

Rows (images/s, steady state: the first batch and process start-up left out on both sides):
  timm mobilenetv3_small_100 (the data path decides): featpipe extract vs `create_transform` on
      PIL images in DataLoader workers + the model.
  timm vit_small_patch16_224 (the model decides): featpipe extract vs the model alone on ready
      batches (its own ceiling).
Each row also gives the model alone on ready batches: no data path can beat that ceiling, so on a
machine where even the cheap model is the bottleneck the first ratio is capped by it.
Random weights (timm `pretrained=False`, saved and given as --weights): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def make_images(folder: Path, n: int) -> list[Path]:
    import make_sample_images

    jpegs = [v for k, v in make_sample_images.valid_images().items() if k.endswith(".jpg")]
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}.jpg"
        p.write_bytes(jpegs[i % len(jpegs)])
        paths.append(p)
    return paths


def featpipe_rate(images: Path, out: Path, name: str, weights: Path, workers: int, batch: int) -> float:
    cmd = [sys.executable, "-m", "pipeline", "extract", str(images), str(out), "--model", f"timm:{name}"]
    cmd += ["--weights", str(weights), "--workers", str(workers), "--batch-size", str(batch), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    stats = json.loads((out / "stats.json").read_text())
    return stats["steady_images_per_s"] or stats["streaming_images_per_s"]


class Folder:
    """timm's docs' way: PIL open + convert("RGB") + create_transform, in DataLoader workers."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def timm_rate(model, paths: list[Path], workers: int, batch: int) -> float:
    import torch
    from timm.data import create_transform, resolve_model_data_config

    loader = torch.utils.data.DataLoader(
        Folder(paths, create_transform(**resolve_model_data_config(model))), batch_size=batch, num_workers=workers
    )
    n, t0 = 0, None
    with torch.inference_mode():
        for x in loader:
            model(x)
            if t0 is None:  # steady state: from the end of the first batch
                t0 = time.perf_counter()
                continue
            n += len(x)
    return n / (time.perf_counter() - t0)


def model_rate(model, batch: int, seconds: float = 10) -> float:
    import torch

    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    import timm
    import torch

    work = Path(tempfile.mkdtemp(prefix="featpipe-bench-models-"))
    paths = make_images(work / "images", args.images)
    print(
        f"# model sources: {args.images} JPEGs, {args.workers} workers, batch {args.batch}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, timm {timm.__version__}"
    )
    for name, versus in (
        ("mobilenetv3_small_100", "timm's docs pipeline"),
        ("vit_small_patch16_224", "the model alone"),
    ):
        model = timm.create_model(name, pretrained=False, num_classes=0).eval()
        torch.save(model.state_dict(), work / f"{name}.pth")
        ours = featpipe_rate(work / "images", work / name, name, work / f"{name}.pth", args.workers, args.batch)
        theirs = (
            timm_rate(model, paths, args.workers, args.batch) if "mobile" in name else model_rate(model, args.batch)
        )
        ceiling = model_rate(model, args.batch) if "mobile" in name else theirs
        print(
            f"{name}: featpipe {ours:.0f} img/s, {versus} {theirs:.0f} img/s → {ours / theirs:.2f}× "
            f"(the model alone on ready batches: {ceiling:.0f} img/s; featpipe at {ours / ceiling:.2f}× of it)"
        )


if __name__ == "__main__":
    main()
