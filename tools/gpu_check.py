#!/usr/bin/env python3
"""GPU check: is the GPU kept busy? Model-only images/s against end-to-end `featpipe extract`.

    python tools/gpu_check.py [--n 32768] [--out DIR] [--device cuda] [--smoke]

1. model only: vit_small_p14 (ViT-S/14 shape, random weights) on ready batches, bf16 autocast;
2. end to end over freshly packed shards (ImageNet-size photos, 1 in 4 a progressive JPEG, 1 in 32
   a phone-size 4032×3024 one), with CPU decode (--decode fast) and with GPU decode (--decode
   device), at least 100 batches each: the steady images/s from stats.json, with GPU utilisation
   sampled by nvidia-smi every 200 ms during the run, and the JPEG decoder used;
3. each end-to-end figure ÷ model-only (target ≥ 0.8 with GPU decode on one H100/H200-class GPU);
4. `featpipe match --method exact` all-vs-all on --match-n (default 1M) × 384 clustered vectors on
   the device, and faiss-gpu's `knn_gpu` on the same vectors where faiss-gpu is installed.
Every step runs whatever the others did: a failure is recorded as that step's "error" and
OUT/gpu_check.json is rewritten after each step. Needs no network and installs nothing.
`--smoke` runs the same steps on the CPU with tiny sizes (CI runs it, so the script itself cannot
fail on the real machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

HUB = str(ROOT / "pipeline" / "hub")
PHONE = (4032, 3024)


def _write_image(args: tuple[Path, int]) -> None:
    from make_sample_images import jpeg_bytes, photo

    folder, i = args
    w, h = PHONE if i % 32 == 31 else [(500, 375), (375, 500), (640, 480), (500, 333), (400, 400)][i % 5]
    data = jpeg_bytes(photo(w, h, i), quality=85 + i % 10, progressive=i % 4 == 1)
    (folder / f"img_{i:06d}.jpg").write_bytes(data)


def make_images(folder: Path, n: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder, i) for i in range(n) if not (folder / f"img_{i:06d}.jpg").exists()]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_image, todo, chunksize=64))
    return {"images": n, "progressive": sum(i % 4 == 1 for i in range(n)), "phone_size": n // 32}


def pack(images: Path, shards: Path, shard_size: int) -> dict:
    cmd = ["pack", str(images), str(shards), "--shard-size", str(shard_size), "--overwrite", "--no-progress"]
    _featpipe(cmd)
    return {"shards": len(list(shards.glob("*.tar")))}


def model_only(device: str, batch: int, steps: int) -> dict:
    import torch

    model = torch.hub.load(HUB, "vit_small_p14", source="local").eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    cuda = device.startswith("cuda")
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
        for _ in range(3):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        _sync(device)
    return {"images_per_s": round(steps * batch / (time.perf_counter() - t0), 1), "batches": steps}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class GpuSampler:
    """GPU utilisation (%) every 200 ms from nvidia-smi while a step runs; none where it is absent."""

    def __init__(self):
        self.samples: list[float] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def stop(self) -> dict:
        if self.proc is None:
            return {"gpu_utilisation": "nvidia-smi not found"}
        self.proc.terminate()
        self.proc.wait(5)
        s = self.samples or [0.0]
        return {"gpu_utilisation_mean": round(statistics.mean(s), 1), "gpu_utilisation_median": statistics.median(s)}


def extract(shards: Path, out: Path, decode: str, device: str, batch: int, workers: int) -> dict:
    from pipeline.image.device import jpeg_backend

    args = ["extract", str(shards), str(out), "--model-repo", HUB, "--model-name", "vit_small_p14"]
    args += ["--decode", decode, "--device", device, "--batch-size", str(batch), "--workers", str(workers)]
    sampler = GpuSampler()
    t0 = time.perf_counter()
    try:
        _featpipe([*args, "--overwrite", "--no-progress"], ok=(0, 3))
    finally:
        utilisation = sampler.stop()
    stats = json.loads((out / "stats.json").read_text())
    return {
        "images_per_s": stats["steady_images_per_s"] or stats["streaming_images_per_s"],  # warm-up excluded
        "batches": -(-stats["embedded_this_run"] // batch),
        "wall_s": round(time.perf_counter() - t0, 2),
        "stage_seconds": stats.get("stage_seconds"),
        "precision": stats.get("precision"),
        "jpeg_decoder": jpeg_backend() if decode == "device" else "simplejpeg (CPU workers)",
        **utilisation,
    }


def vectors(out: Path, n: int) -> Path:
    import numpy as np
    from numpy.lib.format import open_memmap

    path = out / f"vectors-{n}.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((max(8, n // 200), 384)).astype(np.float32)
        x = open_memmap(path, mode="w+", dtype=np.float16, shape=(n, 384))
        for start in range(0, n, 65536):
            stop = min(start + 65536, n)
            noise = 0.6 * rng.standard_normal((stop - start, 384), dtype=np.float32)
            x[start:stop] = centers[rng.integers(0, len(centers), stop - start)] + noise
        x.flush()
    return path


def match_exact(out: Path, n: int, device: str) -> dict:
    """Exact all-vs-all kNN (k=10) through `featpipe match` on the device."""
    path = vectors(out, n)
    t0 = time.perf_counter()
    _featpipe(["match", str(path), str(out / "match"), "--method", "exact", "--device", device, "--overwrite"])
    seconds = time.perf_counter() - t0
    report = json.loads((out / "match" / "match.json").read_text())
    return {"n": n, "seconds": round(seconds, 1), "queries_per_s": round(n / seconds), "timings": report.get("timings")}


def faiss_gpu(out: Path, n: int) -> dict:
    """faiss-gpu's brute-force knn on the same normalised vectors, where faiss-gpu is installed."""
    import numpy as np

    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss is not installed"}
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return {"skipped": "faiss without GPU support (faiss-cpu), or no GPU it can see"}
    x = np.load(vectors(out, n)).astype(np.float32)
    faiss.normalize_L2(x)
    res = faiss.StandardGpuResources()
    t0 = time.perf_counter()
    for start in range(0, n, 65536):
        faiss.knn_gpu(res, x[start : start + 65536], x, 11, metric=faiss.METRIC_INNER_PRODUCT)
    seconds = time.perf_counter() - t0
    return {"n": n, "seconds": round(seconds, 1), "queries_per_s": round(n / seconds)}


def _featpipe(args: list[str], ok: tuple[int, ...] = (0,)) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in ok:
        raise RuntimeError(f"featpipe {args[0]} exited {proc.returncode}: {proc.stderr[-1500:]}")


def step(result: dict, name: str, fn: Callable[[], dict], out: Path) -> None:
    """One step: its figures, or its error, recorded; the JSON rewritten so a kill keeps what ran."""
    t0 = time.perf_counter()
    try:
        result[name] = fn()
    except BaseException as exc:
        result[name] = {"error": f"{type(exc).__name__}: {exc}"[-2000:], "where": traceback.format_exc()[-1500:]}
        if isinstance(exc, KeyboardInterrupt):
            raise
    result[name]["step_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32768, help="images (≥ 100 batches of 256 after warm-up)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "featpipe-gpu-check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--match-n", type=int, default=1_000_000, help="vectors for the all-vs-all rows (0: skip)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--smoke", action="store_true", help="the CPU, tiny sizes: checks the script, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.n, args.batch_size, args.match_n, args.workers = "cpu", 32, 8, 2000, 1
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    result: dict = {
        "device": torch.cuda.get_device_name() if cuda else args.device,
        "cuda_available": torch.cuda.is_available(),
        "cpu_cores": os.cpu_count(),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch": torch.__version__,
        "smoke": args.smoke,
    }
    out, device = args.out, args.device
    step(result, "images", lambda: make_images(out / "images", args.n), out)
    step(result, "pack", lambda: pack(out / "images", out / "shards", max(args.batch_size, 64)), out)
    step(result, "model_only", lambda: model_only(device, args.batch_size, 3 if args.smoke else 100), out)
    for decode in ("fast", "device"):
        run = lambda d=decode: extract(out / "shards", out / f"features-{d}", d, device, args.batch_size, args.workers)
        step(result, f"extract_{decode}", run, out)
        model = result["model_only"].get("images_per_s")
        rate = result[f"extract_{decode}"].get("images_per_s")
        if model and rate:
            result[f"extract_{decode}"]["ratio_to_model_only"] = round(rate / model, 3)
    if args.match_n:
        step(result, "match_exact", lambda: match_exact(out, args.match_n, device), out)
        step(result, "faiss_gpu", lambda: faiss_gpu(out, args.match_n), out)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"\nmodel only: {result['model_only'].get('images_per_s', 'failed')} img/s on {result['device']}")
    for decode in ("fast", "device"):
        r = result[f"extract_{decode}"]
        print(f"end to end, --decode {decode:6s}: {r.get('images_per_s', 'failed')} img/s, ", end="")
        busy = r.get("gpu_utilisation_mean", r.get("gpu_utilisation", "?"))
        print(f"{r.get('ratio_to_model_only', '?')} × model only, GPU utilisation {busy}")
    for name in ("match_exact", "faiss_gpu"):
        m = result.get(name, {})
        said = f"{m['seconds']} s for {m['n']} × 384" if "seconds" in m else m.get("error", m.get("skipped", "not run"))
        print(f"{name}: {said}")
    failed = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    print(f"steps failed: {', '.join(failed) or 'none'} (details in {out / 'gpu_check.json'})")


if __name__ == "__main__":
    main()
