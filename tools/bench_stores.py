#!/usr/bin/env python3
"""`make bench` for object stores: featpipe against moto's S3 server on loopback, with and without
the tests' fault proxy adding latency to every request (a store across a region), in one run.

    python tools/bench_stores.py [--images 400] [--latency-ms 40] [--runs 2] [--big 12]

Rows (wall time of whole `featpipe` processes, min–max over --runs):
  pack s3://… → local, 2 workers: 0 ms added vs LATENCY added (ratio), and the old way (one read
      at a time: --io-concurrency 1) at LATENCY; `tar -cf` of the same files from local disk is the
      ceiling (no store, no checks).
  extract s3://bucket/photos (folder mode, the offline vit_tiny_p14, 2 workers): 0 ms vs LATENCY.
  peak RSS of a pack worker over --big images of ~20 MB each, default concurrency (bytes in flight
      are bounded at 64 MB).
moto itself serves ~60–100 small GETs/s on 2 cores, so it, not featpipe, is the ceiling at 0 ms.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tools")]

from faultproxy import FaultProxy, Faults  # noqa: E402  (the tests' loopback proxy)

MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14"]


def featpipe(*args: str, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"featpipe {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def peak_rss_mb(*args: str, env: dict) -> float:
    """Peak RSS of one `featpipe` process (pack with --workers 1 packs in-process), in MB, measured
    by GNU time: a child forked straight from this process (holding moto's objects) would report
    this process's size as its own peak (ru_maxrss survives exec)."""
    timer = shutil.which("time") or "/usr/bin/time"
    cmd = [timer, "-f", "%M", sys.executable, "-m", "pipeline", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"featpipe {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def photos(n: int) -> dict[str, bytes]:
    import make_sample_images

    jpegs = [v for k, v in make_sample_images.valid_images().items() if k.endswith(".jpg")]
    return {f"photos/d{i % 8}/img{i:05d}.jpg": jpegs[i % len(jpegs)] for i in range(n)}


def big_jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=98)
    return buf.getvalue()


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f} s" if len(values) > 1 else f"{values[0]:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--latency-ms", type=float, default=40)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--big", type=int, default=12, help="~20 MB images for the peak-RSS row (0: skip)")
    args = ap.parse_args()
    import s3fs
    from conftest import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench")
    fs.mkdir("bench")
    files = photos(args.images)
    fs.pipe({f"bench/{k}": v for k, v in files.items()})
    work = Path(tempfile.mkdtemp(prefix="featpipe-bench-stores-"))
    local = work / "local"
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    lat = args.latency_ms / 1000
    print(
        f"# object stores: {args.images} JPEGs ({sum(map(len, files.values())) / 1e6:.1f} MB) on moto S3, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {args.runs} runs each"
    )

    def timed(label: str, latency: float, cmd: list[str]) -> list[float]:
        out = []
        for r in range(args.runs):
            with FaultProxy(endpoint, Faults(latency_s=latency)) as proxy:
                dest = work / f"{label}-{r}"
                out.append(featpipe(*[str(c).replace("DEST", str(dest)) for c in cmd], env=proxy.env(env)))
                shutil.rmtree(dest, ignore_errors=True)
        return out

    pack = ["pack", "s3://bench/photos", "DEST", "--workers", "2", "--no-progress"]
    fast0 = timed("pack0", 0.0, pack)
    fast = timed("pack", lat, pack)
    old = timed("pack1", lat, [*pack, "--io-concurrency", "1"])
    tar = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run(["tar", "-cf", str(work / "all.tar"), "-C", str(local), "photos"], check=True)
        tar.append(time.perf_counter() - t0)
    m = min
    print(f"pack, 0 ms added:               {spread(fast0)}  ({args.images / m(fast0):.0f} img/s)")
    print(
        f"pack, {args.latency_ms:.0f} ms added:              {spread(fast)}  → {m(fast0) / m(fast):.2f}× the 0 ms speed"
    )
    print(
        f"pack, {args.latency_ms:.0f} ms, one read at a time: {spread(old)}  → {m(fast0) / m(old):.2f}× "
        f"(featpipe now {m(old) / m(fast):.1f}× faster)"
    )
    print(f"tar -cf of the same files, local disk: {spread(tar)} (the ceiling: no store, no checks, no process start)")
    extract = ["extract", "s3://bench/photos", "DEST", *MODEL, "--workers", "2", "--no-progress", "--batch-size", "64"]
    e0 = timed("ex0", 0.0, extract)
    e40 = timed("ex", lat, extract)
    print(f"extract (folder mode), 0 ms: {spread(e0)}; {args.latency_ms:.0f} ms: {spread(e40)} → {m(e0) / m(e40):.2f}×")
    if args.big:
        fs.pipe({f"bench/big/img{i:03d}.jpg": big_jpeg(i) for i in range(args.big)})
        size = fs.info("bench/big/img000.jpg")["size"] / 1e6
        rss = peak_rss_mb("pack", "s3://bench/big", str(work / "big"), "--workers", "1", "--no-progress", env=env)
        print(f"peak RSS, pack of {args.big} images of {size:.0f} MB, default concurrency: {rss:.0f} MB")
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
