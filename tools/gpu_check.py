#!/usr/bin/env python3
"""GPU check: is the GPU kept busy? Model-only images/s against end-to-end `featpipe extract`.

    python tools/gpu_check.py [--n 8192] [--out DIR] [--device cuda]

1. model only: vit_small_p14 (ViT-S/14 shape, random weights) on random input, bf16 autocast,
   batch 256, after warm-up;
2. end to end over freshly packed shards of ImageNet-size JPEGs, with CPU decode (--decode fast)
   and with GPU decode (--decode device): the streaming phase's images/s from stats.json;
3. each end-to-end figure ÷ model-only (target ≥ 0.8 with GPU decode on one H200-class GPU);
4. `featpipe match --method exact` all-vs-all on --match-n (default 1M) × 384 synthetic vectors on
   the GPU: seconds and queries/s (fp16 candidates, scores re-checked exactly).
Needs no network. Prints a table and writes OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

HUB = str(ROOT / "pipeline" / "hub")


def _write_image(args: tuple[Path, int]) -> None:
    from make_sample_images import jpeg_bytes, photo

    folder, i = args
    w, h = [(500, 375), (375, 500), (640, 480), (500, 333), (400, 400)][i % 5]
    (folder / f"img_{i:06d}.jpg").write_bytes(jpeg_bytes(photo(w, h, i), quality=85 + i % 10))


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder, i) for i in range(n) if not (folder / f"img_{i:06d}.jpg").exists()]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_image, todo, chunksize=64))


def model_only(device: str, batch: int, steps: int = 30) -> float:
    import torch

    model = torch.hub.load(HUB, "vit_small_p14", source="local").eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=device.startswith("cuda")):
        for _ in range(5):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def extract(shards: Path, out: Path, decode: str, device: str, batch: int, workers: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        str(shards),
        str(out),
        "--model-repo",
        HUB,
        "--model-name",
        "vit_small_p14",
        "--decode",
        decode,
        "--device",
        device,
        "--batch-size",
        str(batch),
        "--workers",
        str(workers),
        "--overwrite",
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"extract --decode {decode} failed:\n{proc.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    stats["wall_s"] = round(time.perf_counter() - t0, 2)
    return stats


def match_all_vs_all(out: Path, n: int, device: str) -> dict:
    """Exact all-vs-all kNN (k=10) of n × 384 clustered float16 vectors through `featpipe match`."""
    import numpy as np
    from numpy.lib.format import open_memmap

    path = out / f"vectors-{n}.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((max(8, n // 200), 384)).astype(np.float32)
        x = open_memmap(path, mode="w+", dtype=np.float16, shape=(n, 384))
        for start in range(0, n, 65536):
            stop = min(start + 65536, n)
            x[start:stop] = centers[rng.integers(0, len(centers), stop - start)] + 0.6 * rng.standard_normal(
                (stop - start, 384), dtype=np.float32
            )
        x.flush()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "match",
            str(path),
            str(out / "match"),
            "--method",
            "exact",
            "--device",
            device,
            "--memory-budget",
            "16GB",
            "--overwrite",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        return {"n": n, "error": proc.stderr[-2000:]}
    seconds = time.perf_counter() - t0
    report = json.loads((out / "match" / "match.json").read_text())
    return {"n": n, "seconds": round(seconds, 1), "queries_per_s": round(n / seconds), "timings": report["timings"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "featpipe-gpu-check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--match-n", type=int, default=1_000_000, help="vectors for the all-vs-all row (0: skip)")
    ap.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)))
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: no CUDA device (torch {torch.__version__}); --device cpu for a smoke run")
    t0 = time.perf_counter()
    make_images(args.out / "images", args.n)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "pack",
            str(args.out / "images"),
            str(args.out / "shards"),
            "--shard-size",
            "256",
            "--no-progress",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    gen_s = time.perf_counter() - t0
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "cpu_cores": os.cpu_count(),
        "images": args.n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch": torch.__version__,
        "data_generation_s": round(gen_s, 1),
    }
    result["model_only_images_per_s"] = round(model_only(args.device, args.batch_size), 1)
    for decode in ("fast", "device"):
        stats = extract(
            args.out / "shards", args.out / f"features-{decode}", decode, args.device, args.batch_size, args.workers
        )
        rate = stats["steady_images_per_s"] or stats["streaming_images_per_s"]  # warm-up excluded, as in model_only
        result[f"extract_{decode}"] = {
            "images_per_s": rate,
            "wall_s": stats["wall_s"],
            "stage_seconds": stats["stage_seconds"],
            "precision": stats["precision"],
            "ratio_to_model_only": round(rate / result["model_only_images_per_s"], 3),
        }
    if args.match_n:
        result["match_exact"] = match_all_vs_all(args.out, args.match_n, args.device)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"\nmodel only: {result['model_only_images_per_s']} img/s on {result['device']}")
    for decode in ("fast", "device"):
        r = result[f"extract_{decode}"]
        print(f"end to end, --decode {decode:6s}: {r['images_per_s']} img/s = {r['ratio_to_model_only']} × model only")
    if "match_exact" in result:
        m = result["match_exact"]
        print(f"match all-vs-all, exact, {m['n']} × 384: {m['seconds']} s = {m['queries_per_s']} queries/s")


if __name__ == "__main__":
    main()
