#!/usr/bin/env python3
"""`make bench` for start-up that does not grow with N (issue 31): at two sizes of synthetic
features (tools/make_features.py, `--torch-features none`, written once) with an index built under
one memory budget, in one run:

- `featpipe query INDEX PATH`: wall time to the answer and peak RSS (best and worst of 3 runs);
- `featpipe serve INDEX`: process start to `/healthz` ready, its RSS then, one key query through
  the API, and a reload (index.json touched, as `index --update` commits it) to `/api/info` saying so;
- 1,000 path → row lookups through INDEX/rows/ (p50 / p99): on the page cache the build left, and
  cold, after dropping the page cache (root only; otherwise not measured).

    python tools/bench_scale.py [--rows 50000000] [--small 1000000] [--dim 64] [--budget 1GB]

Targets (issue 31): first answer ≤ 3 s beyond loading the model and index, RSS beyond the index
≤ 300 MB at any N, key lookup ≤ 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_index import key_lookups, phase_peaks  # noqa: E402  (path → row lookups; RSS by log line)
from bench_match import timed  # noqa: E402  (wall seconds and the child's peak RSS)
from bench_serve import start_serve  # noqa: E402  (featpipe serve on a free port, once /healthz answers)

from pipeline.units import parse_bytes  # noqa: E402

WORK = ROOT / "bench-out" / "scale"
DROP_CACHES = "/proc/sys/vm/drop_caches"


def features(rows: int, dim: int) -> Path:
    out = WORK / f"features-{rows}x{dim}"
    if not (out / "fts.npy").exists():
        cmd = [sys.executable, str(ROOT / "tools" / "make_features.py"), str(out), "--rows", str(rows)]
        cmd += ["--dim", str(dim), "--shard-rows", str(max(10_000, rows // 100)), "--torch-features", "none"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def index(feats: Path, budget: str) -> tuple[Path, dict]:
    """INDEX of FEATURES under the budget (built once), and when built now its build seconds, peak
    RSS (MB) and peak resident MB by phase."""
    out = WORK / f"index-{feats.name}-{budget}"
    if (out / "index.json").exists():
        return out, {"build_s": None, "build_peak_rss_mb": None}
    cmd = [sys.executable, "-m", "pipeline", "index", str(feats), str(out), "--memory-budget", budget]
    seconds, peak, phases = phase_peaks([*cmd, "--no-progress"])
    return out, {"build_s": round(seconds, 1), "build_peak_rss_mb": round(peak), "build_phases": phases}


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def get(url: str, data: bytes | None = None) -> dict:
    headers = {"Content-Type": "application/json"} if data else {}
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as r:
        return json.loads(r.read())


def serve_row(target: Path, keys: list[str]) -> dict:
    """serve's start to ready, key queries (the first, then the median of the others) and a
    reload, timed from outside as a user sees them."""
    start = time.perf_counter()
    # a reload is seen within the 1 s between checks, plus its load
    proc, url = start_serve(target, "--reload-every", "1")
    try:
        ready = time.perf_counter() - start
        ready_rss = rss_mb(proc.pid)
        times = []
        for key in keys:
            t = time.perf_counter()
            hits = get(url + "/api/search", json.dumps({"key": key, "k": 10}).encode())["hits"]
            times.append(time.perf_counter() - t)
            assert hits and hits[0]["key"] == key, hits[:1]
        os.utime(target / "index.json")  # what `index --update` does to it, as far as the stamp goes
        t = time.perf_counter()
        while get(url + "/api/info")["reloads"] < 1:
            time.sleep(0.02)
        reload = time.perf_counter() - t
        return {
            "serve_ready_s": round(ready, 2),
            "serve_rss_mb": ready_rss,
            "serve_first_key_query_ms": round(times[0] * 1000, 1),
            "serve_key_query_p50_ms": round(float(np.median(times[1:])) * 1000, 1),
            "serve_reload_s": round(reload, 2),
            "serve_rss_after_reload_mb": rss_mb(proc.pid),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def measure(rows: int, dim: int, budget: str) -> dict:
    feats = features(rows, dim)
    target, build = index(feats, budget)
    meta = json.loads((target / "index.json").read_text())
    names = row_names(target, [7, *np.random.default_rng(3).choice(rows, 20, replace=False).tolist()])
    path, keys = names[0][1], [key for key, _ in names]
    runs = [timed([sys.executable, "-m", "pipeline", "query", str(target), path, "-k", "10"]) for _ in range(3)]
    lookups = key_lookups(target)
    cold = key_lookups(target, drop_page_cache) if os.access(DROP_CACHES, os.W_OK) else None
    index_mb = sum(f.stat().st_size for f in target.glob("index*.faiss")) / 1e6
    return {
        "rows": rows,
        "index": meta["index_key"],
        "storage": meta.get("storage", "memory"),
        "index_file_mb": round(index_mb, 1),
        **build,
        "recall_at_10": meta["estimated_recall_at_10"],
        "query_first_answer_s": [round(min(r[0] for r in runs), 2), round(max(r[0] for r in runs), 2)],
        "query_peak_rss_mb": round(max(r[1] for r in runs)),
        "lookup_p50_ms": round(float(np.percentile(lookups, 50)), 3),
        "lookup_p99_ms": round(float(np.percentile(lookups, 99)), 3),
        "cold_lookup_p50_ms": round(float(np.percentile(cold, 50)), 3) if cold else None,
        "cold_lookup_p99_ms": round(float(np.percentile(cold, 99)), 3) if cold else None,
        **serve_row(target, keys),
    }


def drop_page_cache() -> None:
    """Every clean page out of the page cache, so the lookups that follow read the disk."""
    os.sync()
    Path(DROP_CACHES).write_text("1\n")


def row_names(target: Path, rows: list[int]) -> list[tuple[str, str]]:
    """(key, path) of each row, read from INDEX/rows/ (img_list.json would be 50M paths of JSON)."""
    from pipeline.retrieve.rowmeta import RowMeta
    from pipeline.storage import locate

    meta = RowMeta(locate(str(target)))
    return [(meta.name("key", r), meta.name("path", r)) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000_000)
    ap.add_argument("--small", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--budget", default="1GB")
    args = ap.parse_args()
    parse_bytes(args.budget)  # a bad size fails here, before any work
    WORK.mkdir(parents=True, exist_ok=True)
    results = [measure(n, args.dim, args.budget) for n in (args.small, args.rows)]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    (WORK / "result.json").write_text(
        json.dumps({"machine": machine, "budget": args.budget, "rows": results}, indent=1)
    )
    print(f"# {args.dim}-dim, index budget {args.budget}, {machine}")
    cols = [c for c in results[-1] if c != "build_phases"]
    print("| " + " | ".join(cols) + " |")
    for r in results:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    for r in results:
        for text, mb in r.get("build_phases", []):
            print(f"{r['rows']} rows, build phase to {text!r}: {mb} MB")


if __name__ == "__main__":
    main()
