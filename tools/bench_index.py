#!/usr/bin/env python3
"""`make bench` for indexes past the memory budget: `featpipe index --memory-budget B` against
`autofaiss build_index` with `max_index_memory_usage` B on the same L2-normalised synthetic
vectors, in one run; then `featpipe query` start-up and memory at two sizes (flat in N).

    python tools/bench_index.py [--rows 2000000] [--dim 128] [--budget 256MB] [--small 200000]
                                [--skip-autofaiss | --reuse-featpipe]

Rows: build wall time and peak RSS, index size on disk, recall@10 against exact search on 1,000
sampled rows (featpipe's after its exact re-ranking), single-query latency p50/p99 (warm, one
query at a time, memory-mapped for featpipe). autofaiss runs in its own venv
(bench-out/autofaiss-venv: `pip install autofaiss pyarrow==20.0.0`; its pins clash with ours);
without it its row is skipped, saying so. Vectors come from tools/make_features.py (written once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_match import timed  # noqa: E402  (wall seconds and the child's peak RSS, in a small wrapper)

from pipeline.units import parse_bytes  # noqa: E402

WORK = ROOT / "bench-out" / "index"
AUTOFAISS = ROOT / "bench-out" / "autofaiss-venv" / "bin" / "autofaiss"
QUERIES, K = 1000, 10


def features(rows: int, dim: int) -> Path:
    out = WORK / f"features-{rows}x{dim}"
    if not (out / "fts.npy").exists():
        shard = max(10_000, rows // 40)
        cmd = [sys.executable, str(ROOT / "tools" / "make_features.py"), str(out), "--rows", str(rows)]
        subprocess.run([*cmd, "--dim", str(dim), "--shard-rows", str(shard)], check=True, stdout=subprocess.DEVNULL)
    return out


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_truth(fts: np.ndarray, q: np.ndarray) -> np.ndarray:
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.zeros((len(q), K), np.int64)
    for start in range(0, len(fts), 250_000):
        s = q @ unit(fts[start : start + 250_000]).T
        top = np.argpartition(-s, K, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(found, truth, strict=True)]))


def latencies(search, q: np.ndarray) -> tuple[np.ndarray, list[float]]:
    found, times = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        found.append(search(q[i : i + 1]))
        times.append((time.perf_counter() - t) * 1000)
    warm = times[50:]  # the first queries fault the mapped lists in
    return np.concatenate(found), [float(np.percentile(warm, 50)), float(np.percentile(warm, 99))]


def disk(folder: Path, names: list[str]) -> float:
    return sum((folder / n).stat().st_size for n in names if (folder / n).exists()) / 1e6


def phase_peaks(cmd: list[str]) -> tuple[float, float, list[tuple[str, int]]]:
    """Wall seconds, peak RSS in MB (the kernel's VmHWM, as GNU time's maximum) and the peak
    resident MB of each phase of a command, a phase being the time from one of its log lines
    ("featpipe: index: trained ...") to the next, sampled every 0.2 s from /proc."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks: list[tuple[float, str]] = [(start, "start")]

    def read_log() -> None:
        marks.extend((time.perf_counter(), line.strip()) for line in proc.stderr)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    samples, hwm = [], 0
    while proc.poll() is None:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
            samples.append((time.perf_counter(), int(status["VmRSS"].split()[0]) // 1024))
            hwm = max(hwm, int(status["VmHWM"].split()[0]) // 1024)
        except (OSError, KeyError, ValueError):
            pass  # the process is gone between poll() and the read
        time.sleep(0.2)
    reader.join()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {marks[-1][1]}")
    ends = [t for t, _ in marks[1:]] + [start + seconds]
    phases = [
        (text[:60], max((r for t, r in samples if a <= t < b), default=0))
        for (a, text), b in zip(marks, ends, strict=True)
        if "faiss.loader" not in text
    ]
    return seconds, max([hwm] + [r for _, r in samples]), phases


def ours(feats: Path, budget: str, q: np.ndarray, truth: np.ndarray) -> dict:
    from pipeline.retrieve.query import Target

    out = WORK / f"featpipe-{budget}"
    cmd = [sys.executable, "-m", "pipeline", "index", str(feats), str(out), "--memory-budget", budget]
    seconds, rss, phases = phase_peaks([*cmd, "--overwrite", "--no-progress"])
    meta = json.loads((out / "index.json").read_text())
    target = Target(str(out))
    found, (p50, p99) = latencies(lambda x: target.search(x, K)[0], q)
    files = [meta["file"], meta["file"].replace(".faiss", ".ivfdata")]
    return {
        "tool": "featpipe",
        "index": meta["index_key"],
        "storage": meta["storage"],
        "build_s": round(seconds, 1),
        "peak_rss_mb": round(rss),
        "size_mb": round(disk(out, files), 1),
        "recall_at_10": round(recall(found, truth), 4),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "tuned": f"nprobe {meta['value']}, {meta['rerank_factor']}x re-ranked",
        "phase_peaks_mb": phases,
    }


def autofaiss(feats: Path, budget: str, q: np.ndarray, truth: np.ndarray) -> dict | None:
    if not AUTOFAISS.exists():
        print(f"autofaiss skipped: no {AUTOFAISS} (see this script's docstring)")
        return None
    import faiss

    emb = WORK / f"normalised-{feats.name}"
    if not (emb / "emb.npy").exists():
        emb.mkdir(parents=True, exist_ok=True)
        fts = np.load(feats / "fts.npy", mmap_mode="r")
        np.save(emb / "emb.npy", np.concatenate([unit(fts[s : s + 500_000]) for s in range(0, len(fts), 500_000)]))
    out = WORK / f"autofaiss-{budget}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(AUTOFAISS), "build_index", "--embeddings", str(emb), "--index_path", str(out / "knn.index")]
    cmd += ["--index_infos_path", str(out / "infos.json"), "--metric_type", "ip"]
    cmd += [
        "--max_index_memory_usage",
        budget.replace("MB", "M").replace("GB", "G"),
        "--current_memory_available",
        "16G",
    ]
    seconds, rss = timed(cmd)
    infos = json.loads((out / "infos.json").read_text())
    index = faiss.read_index(str(out / "knn.index"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    found, (p50, p99) = latencies(lambda x: index.search(x, K)[1], q)
    return {
        "tool": "autofaiss",
        "index": infos["index_key"],
        "storage": "memory-mapped file",
        "build_s": round(seconds, 1),
        "peak_rss_mb": round(rss),
        "size_mb": round(disk(out, ["knn.index"]), 1),
        "recall_at_10": round(recall(found, truth), 4),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "tuned": infos["index_param"],
    }


def query_row(feats: Path, budget: str, label: str) -> dict:
    """`featpipe query INDEX PATH` as a user runs it: wall time to the answer and peak RSS."""
    out = WORK / f"featpipe-{budget}" if label == "main" else WORK / f"small-{feats.name}"
    if not (out / "index.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "index",
                str(feats),
                str(out),
                "--memory-budget",
                budget,
                "--no-progress",
            ],
            check=True,
            capture_output=True,
        )
    meta = json.loads((out / "index.json").read_text())
    path = json.loads((feats / "img_list.json").read_text())[7]
    runs = [timed([sys.executable, "-m", "pipeline", "query", str(out), path, "-k", "10"]) for _ in range(3)]
    lookup = key_lookups(out)
    return {
        "lookup_p50_ms": round(float(np.percentile(lookup, 50)), 3),
        "lookup_p99_ms": round(float(np.percentile(lookup, 99)), 3),
        "rows": meta["n"],
        "index": meta["index_key"],
        "first_answer_s": round(min(r[0] for r in runs), 2),
        "peak_rss_mb": round(max(r[1] for r in runs)),
    }


def key_lookups(index: Path, before: Callable[[], None] = lambda: None) -> list[float]:
    """Milliseconds of 1,000 path → row lookups through INDEX/rows/ in this process (its first
    ones included: what `serve` pays for a `key` query). The paths are read from rows/ by row
    first, not from img_list.json (50M paths are 3 GB of JSON); `before` runs then (bench_scale
    drops the page cache there)."""
    from pipeline.retrieve.rowmeta import RowMeta
    from pipeline.storage import locate

    rows = RowMeta(locate(str(index)))
    wanted = np.random.default_rng(5).choice(rows.n, min(1000, rows.n), replace=False)
    paths = [rows.name("path", int(r)) for r in wanted]
    before()
    times = []
    for path, r in zip(paths, wanted, strict=True):
        t = time.perf_counter()
        found = rows.row_of(path)
        times.append((time.perf_counter() - t) * 1000)
        assert found is not None and rows.name("path", found) == path, (r, found)
    return times


def earlier_row(args: argparse.Namespace) -> dict:
    """featpipe's row of an earlier --skip-autofaiss run, so the hours-long autofaiss build can run
    alone; refused unless that run had the same rows, dim and budget."""
    earlier = json.loads((WORK / "result-featpipe.json").read_text())
    if (earlier["rows"], earlier["dim"], earlier["budget"]) != (args.rows, args.dim, args.budget):
        sys.exit("--reuse-featpipe: result-featpipe.json was made with other --rows/--dim/--budget")
    return earlier["build"][0] | {"reused_from": "result-featpipe.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--budget", default="256MB")
    ap.add_argument("--small", type=int, default=200_000, help="rows of the second query-start-up size")
    ap.add_argument(
        "--skip-autofaiss", action="store_true", help="featpipe's rows only (autofaiss at 10M takes hours here)"
    )
    ap.add_argument(
        "--reuse-featpipe",
        action="store_true",
        help="take featpipe's build row from an earlier --skip-autofaiss run of the same size (result-featpipe.json)",
    )
    args = ap.parse_args()
    parse_bytes(args.budget)  # a bad size fails here, before any work
    WORK.mkdir(parents=True, exist_ok=True)
    feats = features(args.rows, args.dim)
    fts = np.load(feats / "fts.npy", mmap_mode="r")
    rows = np.sort(np.random.default_rng(99).choice(len(fts), QUERIES, replace=False))
    q = unit(fts[rows])
    truth = exact_truth(fts, q)
    results = [earlier_row(args) if args.reuse_featpipe else ours(feats, args.budget, q, truth)]
    print("featpipe:", json.dumps(results[0]), flush=True)  # the long autofaiss build follows
    theirs = None if args.skip_autofaiss else autofaiss(feats, args.budget, q, truth)
    results += [theirs] if theirs else []
    small = features(args.small, args.dim)
    starts = [query_row(small, args.budget, "small"), query_row(feats, args.budget, "main")]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    report = {
        "machine": machine,
        "rows": args.rows,
        "dim": args.dim,
        "budget": args.budget,
        "build": results,
        "query": starts,
    }
    (WORK / ("result-featpipe.json" if args.skip_autofaiss else "result.json")).write_text(json.dumps(report, indent=1))
    print(f"# {args.rows} x {args.dim}, budget {args.budget}, {machine}")
    print("| tool | index | build s | peak RSS MB | size MB | recall@10 | p50 ms | p99 ms | tuned |")
    cols = ("build_s", "peak_rss_mb", "size_mb", "recall_at_10", "p50_ms", "p99_ms", "tuned")
    for r in results:
        print(f"| {r['tool']} | {r['index']} ({r['storage']}) | " + " | ".join(str(r[c]) for c in cols) + " |")
    print("featpipe's build, peak resident MB from each log line to the next:")
    for text, peak in results[0].get("phase_peaks_mb", []):
        print(f"  {peak:6d}  {text}")
    print("| rows | index | featpipe query: first answer s | peak RSS MB | path → row p50 / p99 ms |")
    for r in starts:
        cells = (r["first_answer_s"], r["peak_rss_mb"], f"{r['lookup_p50_ms']} / {r['lookup_p99_ms']}")
        print(f"| {r['rows']} | {r['index']} | " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
