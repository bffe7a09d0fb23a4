#!/usr/bin/env python3
"""`make bench` for datasets that grow: adding 1% new images (and losing a few) to a packed,
extracted, indexed, matched and deduplicated set, updated step by step (`pack --relist`, extract,
`index/match/dedup --update`) against the whole pipeline run again on the union, in one run.

    python tools/bench_grow.py [--images 20000] [--add 0.01] [--remove 5] [--workers 2]

Rows (wall time of whole `featpipe` processes, the offline vit_tiny_p14 so the model costs what a
real run's does, Flat index, k 10, dedup at --threshold, default 0.9999, where the byte copies
(every 50th image) are the duplicates, a real rate; the random-weight model puts every noisy variant
of the few base photos within 0.97–1.0 of its neighbours, so --threshold 0.95 is the worst case: 8
groups of ~2,500, 4,096 full lists grown, a 420 MB duplicates.json):
  each step of the update, and its total, as a share of the full pipeline on the union;
  how much of the update is process start-up (one `import` of each step's modules, timed alone);
  whether the update's match and dedup outputs equal a full match and dedup of the same features.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEDUP_FILES = ("groups.json", "duplicates.json", "to_remove.txt")
MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14"]


def featpipe(*args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"featpipe {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def startup(module: str) -> float:
    """A process that only imports a step's modules: what every step pays before any work."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def write_images(folder: Path, names: list[str], seed: int) -> None:
    """Distinct 160×120 JPEGs (noise over a few photos), a copy now and then so dedup finds groups."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_sample_images
    from PIL import Image

    bases = [
        np.asarray(Image.open(io.BytesIO(v)).convert("RGB").resize((160, 120)), np.int16)
        for k, v in sorted(make_sample_images.valid_images().items())
        if k.startswith("photos/IMG_")
    ]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    last = b""
    for i, name in enumerate(names):
        if last and i % 50 == 0:
            (folder / name).write_bytes(last)  # a byte copy of the previous image
            continue
        pixels = np.clip(bases[i % len(bases)] + rng.integers(-60, 60, (120, 160, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        last = buf.getvalue()
        (folder / name).write_bytes(last)


def pipeline(src: Path, work: Path, workers: int, update: bool, relist: bool, threshold: str) -> dict[str, float]:
    u = ["--update"] if update else []
    quiet = ["--no-progress"]
    again = ["--relist"] if relist else []
    return {
        "pack": featpipe("pack", src, work / "shards", "--shard-size", "500", *quiet, *again),
        "extract": featpipe("extract", work / "shards", work / "out", *MODEL, "--workers", workers, *quiet),
        "index": featpipe("index", work / "out", work / "index", "--index-key", "Flat", *quiet, *u),
        "match": featpipe("match", work / "out", work / "match", "-k", "10", *quiet, *u),
        "dedup": featpipe("dedup", work / "out", work / "dedup", "--threshold", threshold, "-k", "10", *quiet, *u),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--add", type=float, default=0.01, help="share of new images")
    ap.add_argument("--remove", type=int, default=5, help="images deleted from the source")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", default="0.9999", help="dedup's (see above)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="featpipe-bench-grow-"))
    rng = np.random.default_rng(0)
    names = [f"{h:08x}.jpg" for h in rng.choice(2**32, args.images, replace=False)]  # hash-like: arrival ≠ order
    added = int(round(args.images * args.add))
    src = tmp / "src"
    write_images(src, names[: args.images - added], seed=1)
    print(
        f"# datasets that grow: {args.images - added} images + {added} new ({args.add:.0%}) − {args.remove} removed, "
        f"vit_tiny_p14, {args.workers} workers, {platform.machine()}, {os.cpu_count()} CPUs"
    )
    pipeline(src, tmp / "inc", args.workers, False, False, args.threshold)  # the set before it grew
    write_images(src, names[args.images - added :], seed=2)
    for name in sorted(os.listdir(src))[: args.remove]:
        (src / name).unlink()
    inc = pipeline(src, tmp / "inc", args.workers, True, True, args.threshold)
    full = pipeline(src, tmp / "full", args.workers, False, False, args.threshold)
    boot = {
        "pack": startup("pipeline.pack.packer"),
        "extract": startup("pipeline.extract.run"),
        "index": startup("pipeline.retrieve.index"),
        "match": startup("pipeline.retrieve.match"),
        "dedup": startup("pipeline.retrieve.dedup"),
    }
    total_inc, total_full, total_boot = sum(inc.values()), sum(full.values()), sum(boot.values())
    for step in inc:
        print(f"{step:8s} update {inc[step]:7.1f}s   full {full[step]:7.1f}s   start-up {boot[step]:4.1f}s")
    print(
        f"update {total_inc:.1f}s = {total_inc / total_full:.1%} of the full pipeline on the union "
        f"({total_full:.1f}s); "
        f"process start-up {total_boot:.1f}s of it ({total_boot / total_inc:.0%})"
    )
    featpipe("match", tmp / "inc" / "out", tmp / "check" / "match", "-k", "10", "--no-progress")
    check = tmp / "check" / "dedup"
    featpipe("dedup", tmp / "inc" / "out", check, "--threshold", args.threshold, "-k", "10", "--no-progress")
    same = all(
        (tmp / "inc" / d / n).read_bytes() == (tmp / "check" / d / n).read_bytes()
        for d, n in (("match", "matches.npy"), ("match", "scores.npy"), *(("dedup", n) for n in DEDUP_FILES))
    )
    report = json.loads((tmp / "inc" / "dedup" / "dedup.json").read_text())
    print(
        f"dedup at {args.threshold}: {report['groups']} groups, {report['to_remove']} to remove, "
        f"{report['capped_lists']['grown']} full lists grown"
    )
    print(f"update's matches, scores and dedup outputs equal a full match and dedup of the same features: {same}")


if __name__ == "__main__":
    main()
