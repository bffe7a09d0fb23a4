#!/usr/bin/env python3
"""`make bench` for matching: the original matcher's way (faiss IndexFlatIP on normalised float32,
everything in memory) and `featpipe match` on the same synthetic vectors in one run.

    python tools/bench_match.py [--n 50000] [--ivf-n 200000] [--dim 384] [--repeats 2]

Vectors: Gaussian clusters with planted near-duplicates, float16 `.npy` as extract writes it;
generated offline. Rows: exact throughput and agreement at N; IVF speed and recall against exact
at IVF_N; peak RSS with --memory-budget 512MB at IVF_N and 4·IVF_N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

ROOT = Path(__file__).resolve().parents[1]

ORIGINAL = """
import sys, numpy as np, faiss
x = np.load(sys.argv[1]).astype(np.float32)
faiss.normalize_L2(x)
index = faiss.IndexFlatIP(x.shape[1])
index.add(x)
scores, matches = index.search(x, 10)
np.save(sys.argv[2] + "/matches.npy", matches.astype(np.uint32), allow_pickle=False)
np.save(sys.argv[2] + "/scores.npy", scores.astype(np.float16), allow_pickle=False)
"""


def make_vectors(path: Path, n: int, dim: int, seed: int = 0) -> Path:
    """Clusters of ~200 with 1% planted near-duplicates, written a block at a time."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(8, n // 200), dim)).astype(np.float32)
    out = open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        x = centers[rng.integers(0, len(centers), stop - start)]
        out[start:stop] = x + 0.6 * rng.standard_normal(x.shape, dtype=np.float32)
    src = rng.choice(n, n // 100, replace=False)
    out[(src + n // 2) % n] = out[src] + np.float16(0.01) * rng.standard_normal((len(src), dim)).astype(np.float16)
    out.flush()
    return path


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and the child's peak RSS in MB (a fresh child per call, so the max is its own)."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True)
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


def original(x: Path, out: Path) -> tuple[float, float]:
    out.mkdir(parents=True, exist_ok=True)
    return timed([sys.executable, "-c", ORIGINAL, str(x), str(out)])


def featpipe(x: Path, out: Path, *flags: str) -> tuple[float, float]:
    return timed([sys.executable, "-m", "pipeline", "match", str(x), str(out), "--overwrite", "--no-progress", *flags])


def agreement(ours: Path, ref: Path, x: Path) -> float:
    """Tie-aware share of rows whose neighbour set equals the reference's."""
    m, r, rs = np.load(ours / "matches.npy"), np.load(ref / "matches.npy"), np.load(ref / "scores.npy")
    v = np.load(x, mmap_mode="r")
    good = 0
    for i in range(len(m)):
        extra = set(m[i].tolist()) - set(r[i].tolist())
        if extra:
            q = v[i].astype(np.float64)
            q /= np.linalg.norm(q)
            sims = [q @ (v[j].astype(np.float64) / np.linalg.norm(v[j].astype(np.float64))) for j in extra]
            good += min(sims) >= float(rs[i, -1]) - 1e-3  # the reference's score is float16
        else:
            good += 1
    return good / len(m)


def recall(ours: Path, exact: Path) -> float:
    m, e = np.load(ours / "matches.npy"), np.load(exact / "matches.npy")
    return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(m, e, strict=True)]))


def dedup_row(work: Path, n: int) -> dict:
    """Planted near-duplicate pairs (cosine ≈ 0.999) among n random 256-dim vectors."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 256)).astype(np.float32)
    src = rng.choice(n // 2, n // 100, replace=False)
    x[src + n // 2] = x[src] + 0.05 * rng.standard_normal((len(src), 256)).astype(np.float32)
    np.save(work / "dedup.npy", x.astype(np.float16))
    seconds, rss = timed(
        [
            sys.executable,
            "-m",
            "pipeline",
            "dedup",
            str(work / "dedup.npy"),
            str(work / "dedup"),
            "--threshold",
            "0.95",
            "--memory-budget",
            "512MB",
            "--overwrite",
            "--no-progress",
        ]
    )
    groups = json.loads((work / "dedup" / "groups.json").read_text())
    together = {frozenset(g["members"]) for g in groups}
    grouped = sum(frozenset((int(a), int(a) + n // 2)) in together for a in src) / len(src)
    return {
        "n": n,
        "pairs_grouped": round(grouped, 4),
        "groups": len(groups),
        "lowest_member_score": min(min(g["scores"]) for g in groups),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(rss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--ivf-n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dedup-n", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "match")
    args = ap.parse_args()
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    r: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    x = make_vectors(work / f"x{args.n}.npy", args.n, args.dim)
    runs = [(original(x, work / "orig"), featpipe(x, work / "exact", "--method", "exact")) for _ in range(args.repeats)]
    ratios = [o[0] / f[0] for o, f in runs]
    r["exact"] = {
        "n": args.n,
        "original_s": [round(o[0], 2) for o, _ in runs],
        "featpipe_s": [round(f[0], 2) for _, f in runs],
        "throughput_ratio": [round(q, 3) for q in ratios],
        "agreement": round(agreement(work / "exact", work / "orig", x), 5),
    }
    print(json.dumps(r["exact"]), flush=True)
    big = make_vectors(work / f"x{args.ivf_n}.npy", args.ivf_n, args.dim, seed=1)
    exact_s, _exact_rss = featpipe(big, work / "big-exact", "--method", "exact")
    ivf_s, _ivf_rss = featpipe(big, work / "big-ivf", "--method", "ivf")
    report = json.loads((work / "big-ivf" / "match.json").read_text())
    r["ivf"] = {
        "n": args.ivf_n,
        "exact_s": round(exact_s, 1),
        "ivf_s": round(ivf_s, 1),
        "speedup": round(exact_s / ivf_s, 2),
        "recall_at_10": round(recall(work / "big-ivf", work / "big-exact"), 4),
        "estimated_recall": report["estimated_recall_at_k"],
        "index": report["index"],
        "nprobe": report["nprobe"],
    }
    print(json.dumps(r["ivf"]), flush=True)
    four = make_vectors(work / f"x{4 * args.ivf_n}.npy", 4 * args.ivf_n, args.dim, seed=2)
    mem = {}
    for name, path in ((f"{args.ivf_n}", big), (f"{4 * args.ivf_n}", four)):
        s, rss = featpipe(path, work / f"mem-{name}", "--memory-budget", "512MB")
        method = json.loads((work / f"mem-{name}" / "match.json").read_text())["method"]
        mem[name] = {"featpipe_peak_rss_mb": round(rss), "seconds": round(s, 1), "method": method}
    mem[f"{args.ivf_n}"]["original_peak_rss_mb"] = round(original(big, work / "orig-big")[1])
    r["memory"] = mem
    print(json.dumps(r["memory"]), flush=True)
    r["dedup"] = dedup_row(work, args.dedup_n)
    print(json.dumps(r["dedup"]), flush=True)
    (work / "bench_match.json").write_text(json.dumps(r, indent=1))
    print(f"\nfeatpipe match benchmark — {r['machine']}")
    e = r["exact"]
    print(
        f"exact {e['n']}×{args.dim}: featpipe/original throughput {min(ratios):.2f}–{max(ratios):.2f}× "
        f"({min(e['featpipe_s'])} s vs {min(e['original_s'])} s), tie-aware agreement {e['agreement']:.4%}"
    )
    i = r["ivf"]
    print(
        f"ivf {i['n']}×{args.dim}: {i['speedup']}× faster than exact ({i['ivf_s']} s vs {i['exact_s']} s), "
        f"recall@10 {i['recall_at_10']} (estimated {i['estimated_recall']}), {i['index']} nprobe {i['nprobe']}"
    )
    d = r["dedup"]
    print(
        f"dedup {d['n']}×256, 1% planted near-duplicates, star at cosine ≥ 0.95, --memory-budget 512MB: "
        f"{d['pairs_grouped']:.2%} of planted pairs grouped, lowest member score {d['lowest_member_score']}, "
        f"{d['seconds']} s, peak RSS {d['peak_rss_mb']} MB"
    )
    for name, m in mem.items():
        orig = f", original {m['original_peak_rss_mb']} MB" if "original_peak_rss_mb" in m else ""
        print(
            f"peak RSS at {name}×{args.dim}, --memory-budget 512MB ({m['method']}): {m['featpipe_peak_rss_mb']} MB"
            f"{orig}"
        )


if __name__ == "__main__":
    main()
