#!/usr/bin/env python3
"""`make bench` for pack's planning at bucket scale: how long `featpipe pack --plan-only` takes
over N synthetic entries (no image is read), listing a folder vs reading a list the user already
has, and the rerun that plans from DEST/listing.parquet.

    python tools/bench_pack_plan.py [--n 1000000] [--runs 3] [--work DIR]

Files are empty (planning reads names and sizes only), 1,000 to a folder. Each figure is the wall
time of a whole `featpipe pack --plan-only` process (imports included), min / median / max over
--runs; ratios are against the folder walk, the way pack worked before lists and listing.parquet.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_FOLDER = 1000


def make_tree(root: Path, n: int) -> list[str]:
    names = [f"d{i // PER_FOLDER:05d}/img{i % PER_FOLDER:04d}.jpg" for i in range(n)]
    if not (root / ".complete").exists():
        for d in range(0, n, PER_FOLDER):
            folder = root / f"d{d // PER_FOLDER:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for name in names[d : d + PER_FOLDER]:
                (root / name).touch()
        (root / ".complete").touch()
    return names


def plan_time(src: Path, dest: Path, *more: str, fresh: bool) -> float:
    if fresh:
        shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline", "pack", str(src), str(dest), "--plan-only", *more]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or "planned" not in proc.stdout:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="where to build the tree (default: a temp folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="featpipe-bench-plan-"))
    tree = work / f"tree-{args.n}"
    t0 = time.perf_counter()
    names = make_tree(tree, args.n)
    made = time.perf_counter() - t0
    text = work / "list.txt"
    text.write_text("".join(f"{n}\n" for n in reversed(names)))  # unsorted: the plan sorts
    csv = work / "list.csv"
    csv.write_text("path,size\n" + "".join(f"{n},0\n" for n in reversed(names)))
    dest = work / "dest"
    cases = {
        "walk the folder (first run)": lambda: plan_time(tree, dest / "walk", fresh=True),
        "rerun: plan from listing.parquet": lambda: plan_time(tree, dest / "walk", fresh=False),
        "text list, sizes looked up (first run)": lambda: plan_time(
            text, dest / "text", "--root", str(tree), fresh=True
        ),
        "CSV list with sizes (first run)": lambda: plan_time(csv, dest / "csv", "--root", str(tree), fresh=True),
        "rerun of the text list": lambda: plan_time(text, dest / "text", "--root", str(tree), fresh=False),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, run in cases.items():
            times[name].append(run())
    base = statistics.median(times["walk the folder (first run)"])
    print(f"# pack planning, {args.n:,} entries (tree made in {made:.0f}s), {args.runs} runs")
    print(f"# machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'case':42s} {'min':>7s} {'median':>7s} {'max':>7s}  vs walk")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:42s} {min(ts):6.2f}s {med:6.2f}s {max(ts):6.2f}s  {base / med:5.2f}x faster")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
