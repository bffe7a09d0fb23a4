#!/usr/bin/env python3
"""`make bench` for `featpipe serve`: concurrent clients against a real server process on loopback,
next to the model's own batched throughput and sequential `featpipe query` processes, in one run.

    python tools/bench_serve.py [--rows 100000] [--clients 32] [--per-client 20] [--soak 60]

The index: --rows random 192-dim vectors (the offline vit_tiny_p14's width), Flat, recording the
model of a small extract run so image queries are embedded as a real run's would be. The load
generator is a separate process (threads; its CPU share of the 2 cores is reported). Rows:
  image queries/s, p50/p99 latency, the batch sizes seen; the model alone on ready-made batches of
  crops (img/s); sequential `featpipe query` processes (q/s); "more like this" (row) and vector
  queries/s with their p50/p99;
  server RSS at the start and end of a --soak seconds run of mixed queries.
Each client keeps one connection open (keep-alive), as HTTP clients do.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14", "--no-progress"]


def featpipe(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"featpipe {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def build(work: Path, rows: int) -> tuple[Path, list[bytes]]:
    import make_sample_images

    jpegs = [v for k, v in make_sample_images.valid_images().items() if k.endswith(".jpg")]
    (work / "images").mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (work / "images" / f"{i}.jpg").write_bytes(data)
    featpipe("extract", str(work / "images"), str(work / "small"), *MODEL, "--workers", "0")
    x = np.random.default_rng(0).standard_normal((rows, 192)).astype(np.float16)
    np.save(work / "big.npy", x)
    featpipe("index", str(work / "big.npy"), str(work / "index"), "--index-key", "Flat", "--no-progress")
    meta = json.loads((work / "index" / "index.json").read_text())
    meta["embedder"] = json.loads((work / "small" / "run.json").read_text())["embedder"]
    (work / "index" / "index.json").write_text(json.dumps(meta))
    return work / "index", jpegs


def get(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
    return time.perf_counter() - t0


def start_serve(target: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`featpipe serve TARGET` on a free port, once its /healthz answers: (the process, its URL)."""
    cmd = [sys.executable, "-m", "pipeline", "serve", str(target), "--port", "0", "--device", "cpu", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    url = server.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            get(url + "/healthz")
            return server, url
        except OSError:  # 503 until loaded
            time.sleep(0.05)
    server.terminate()
    raise SystemExit(f"featpipe serve {target} was not ready after 600 s")


class Client:
    """One client's keep-alive connection (as `requests.Session`, browsers and proxies keep theirs):
    a new TCP connection per query measured connection set-up on both sides, not the service."""

    def __init__(self, url: str):
        self.host, self.port = url.split("//", 1)[1].rsplit(":", 1)
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> float:
        t0 = time.perf_counter()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
            try:
                self.conn.request(method, path, body, headers or {})
                response = self.conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                return time.perf_counter() - t0
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = None  # the server closed an idle connection: once more on a new one
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def image(self, data: bytes) -> float:
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n\r\n'.encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        kind = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self.request("POST", "/api/search?k=10", body, kind)


def load(url: str, clients: int, per_client: int, kind: str, jpegs: list[bytes]) -> dict:
    """Runs in its own process (`--load`): clients × per_client queries, latencies and CPU share."""
    latencies: list[float] = []
    errors = [0]
    vectors = np.random.default_rng(1).standard_normal((64, 192)).round(4).tolist()
    lock = threading.Lock()

    def client(c: int) -> None:
        session = Client(url)
        for i in range(per_client):
            try:
                if kind == "image":
                    t = session.image(jpegs[(c + i) % len(jpegs)])
                elif kind == "vector":
                    body = json.dumps({"vector": vectors[(c + i) % len(vectors)], "k": 10}).encode()
                    t = session.request("POST", "/api/search", body, {"Content-Type": "application/json"})
                else:
                    t = session.request("GET", f"/api/search?row={(c * per_client + i) % 1000}&k=10")
                with lock:
                    latencies.append(t)
            except Exception:
                with lock:
                    errors[0] += 1

    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    latencies.sort()
    return {
        "qps": len(latencies) / wall,
        "p50": latencies[len(latencies) // 2] if latencies else 0,
        "p99": latencies[int(len(latencies) * 0.99) - 1] if latencies else 0,
        "errors": errors[0],
        "cpu_share": cpu / wall / (os.cpu_count() or 1),
    }


def run_load(url: str, clients: int, per_client: int, kind: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--load", url, "--clients", str(clients), "--per-client", str(per_client)]
    out = subprocess.run([*cmd, "--kind", kind, "--work", str(work)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def model_alone(work: Path, batch: int) -> float:
    """The model's own img/s on ready-made uint8 crops, batches of `batch`, as the service calls it."""
    import torch

    from pipeline.retrieve.query import Embedder

    meta = json.loads((work / "small" / "run.json").read_text())["embedder"]
    emb = Embedder(meta, "bench", "cpu")
    crops = torch.randint(0, 255, (batch, 3, 224, 224), dtype=torch.uint8)
    emb.embed(crops)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 5:
        emb.embed(crops)
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=20)
    ap.add_argument("--soak", type=int, default=300, help="seconds of mixed load for the memory row (0: skip)")
    ap.add_argument("--load", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="image", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        jpegs = [p.read_bytes() for p in sorted((args.work / "images").glob("*.jpg"))]
        print(json.dumps(load(args.load, args.clients, args.per_client, args.kind, jpegs)))
        return
    work = Path(tempfile.mkdtemp(prefix="featpipe-bench-serve-"))
    index, jpegs = build(work, args.rows)
    torch_threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"# featpipe serve: {args.rows} × 192 Flat index, offline vit_tiny_p14, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS {torch_threads}; loopback; load generator in its own process"
    )
    seq = []
    for i in range(3):
        t0 = time.perf_counter()
        featpipe("query", str(index), str(work / "images" / f"{i}.jpg"), "-k", "10")
        seq.append(time.perf_counter() - t0)
    alone = model_alone(work, 32)
    server, url = start_serve(index)
    try:
        image = run_load(url, args.clients, args.per_client, "image", work)
        rows = run_load(url, args.clients, args.per_client * 3, "row", work)
        vectors = run_load(url, args.clients, args.per_client * 3, "vector", work)
        with urllib.request.urlopen(url + "/metrics") as r:
            metrics = r.read().decode()
        sizes = [ln for ln in metrics.splitlines() if ln.startswith("featpipe_batch_size_")]
        count = float(next(ln for ln in sizes if "_count" in ln).split()[-1])
        total = float(next(ln for ln in sizes if "_sum" in ln).split()[-1])
        print(
            f"image queries: {image['qps']:.1f}/s, p50 {image['p50'] * 1000:.0f} ms, p99 {image['p99'] * 1000:.0f} ms, "
            f"{image['errors']} errors, mean batch {total / max(count, 1):.1f}; load generator CPU "
            f"{image['cpu_share'] * 100:.0f}% of the machine"
        )
        print(f"the model alone, batches of 32 ready crops: {alone:.1f} img/s → service {image['qps'] / alone:.2f}×")
        print(
            f"sequential `featpipe query` processes: {1 / statistics.median(seq):.2f} q/s "
            f"(median {statistics.median(seq):.1f} s each) → service {image['qps'] * statistics.median(seq):.0f}×"
        )
        print(
            f"more like this (row) queries: {rows['qps']:.0f}/s, p50 {rows['p50'] * 1000:.0f} ms, "
            f"p99 {rows['p99'] * 1000:.0f} ms, {rows['errors']} errors"
        )
        print(
            f"vector queries: {vectors['qps']:.0f}/s, p50 {vectors['p50'] * 1000:.0f} ms, "
            f"p99 {vectors['p99'] * 1000:.0f} ms, {vectors['errors']} errors"
        )
        if args.soak:
            start = rss_mb(server.pid)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.soak:
                run_load(url, 8, 10, "image", work)
                run_load(url, 8, 30, "row", work)
            print(f"RSS over a {args.soak} s soak: {start:.0f} MB at the start, {rss_mb(server.pid):.0f} MB at the end")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
