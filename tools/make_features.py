#!/usr/bin/env python3
"""A valid `featpipe extract` OUT of N synthetic rows, without a model or a single image: run.json,
one Parquet chunk and done record per shard of --shard-rows, then featpipe's own consolidation
(fts.npy, fts.pth, img_list.json, digest.json). Rows are clustered unit-ish vectors (near-duplicate
groups included), paths look like bucket keys. For trying any command (match, dedup, index, query,
serve) at a scale no test set reaches:

    python tools/make_features.py OUT --rows 10000000 --dim 64 [--shard-rows 100000] [--seed 0]
                                  [--torch-features none]

The same arguments give the same bytes. Memory stays at one shard's rows; disk is ~6 bytes per
component (float16 fts.npy, float32 fts.pth) plus the chunks' 4; `--torch-features none` writes
no fts.pth (nor its float32 staging copy), as `featpipe extract` does with that flag: 50M × 64
then takes ~19 GB plus names instead of ~45 GB at its peak.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.chunks import ShardRows, write_chunk  # noqa: E402
from pipeline.extract.consolidate import consolidate  # noqa: E402
from pipeline.outdir import CHUNKS, DoneRecord, OutputNames, RunInfo, ShardEntry, write_done, write_run  # noqa: E402
from pipeline.storage import locate  # noqa: E402


def shard_rows(name: str, index: int, start: int, count: int, dim: int, seed: int) -> ShardRows:
    """One shard's rows: members of 1,000 clusters, every 50th row a near-copy of the row before."""
    rng = np.random.default_rng([seed, index])
    centres = np.random.default_rng([seed, 1 << 30]).standard_normal((1000, dim)).astype(np.float32)
    cluster = rng.integers(0, len(centres), count)
    x = centres[cluster] + 0.3 * rng.standard_normal((count, dim), dtype=np.float32)
    x[1::50] = x[0::50][: len(x[1::50])] + 0.001 * rng.standard_normal((len(x[1::50]), dim), dtype=np.float32)
    rows = ShardRows(name)
    keys = [f"{index:06d}_{i:06d}" for i in range(count)]
    paths = [f"s3://photos/{_key(seed, start + i)}.jpg" for i in range(count)]
    sizes = [(640, 480)] * count
    metas = [{"caption": f"picture {start + i} of cluster {c}"} for i, c in enumerate(cluster.tolist())]
    rows.add(keys, paths, list(range(count)), sizes, x, metas=metas)
    return rows


def _key(seed: int, row: int) -> str:
    h = hashlib.sha1(f"{seed}:{row}".encode()).hexdigest()
    return f"{h[:2]}/{h[2:4]}/{h[4:20]}"


def make(out: str, rows: int, dim: int, shard_rows_: int, seed: int, outputs: OutputNames = OutputNames()) -> None:
    loc = locate(out)
    loc.fs.makedirs(loc.path, exist_ok=True)
    n_shards = max(1, -(-rows // shard_rows_))
    names = [f"synthetic-{i:06d}" for i in range(n_shards)]
    counts = [min(shard_rows_, rows - i * shard_rows_) for i in range(n_shards)]
    shards = [ShardEntry(n, f"synthetic://{n}", c) for n, c in zip(names, counts, strict=True)]
    settings = {"synthetic": {"rows": rows, "dim": dim, "shard_rows": shard_rows_, "seed": seed}}
    run = RunInfo(settings, shards, dim, {"preprocessing": "none: synthetic vectors (tools/make_features.py)"})
    write_run(loc, run)
    start = 0
    for i, (name, count) in enumerate(zip(names, counts, strict=True)):
        rows_ = shard_rows(name, i, start, count, dim, seed)
        write_chunk(loc, rows_)
        write_done(loc, DoneRecord(name, count, count, [], None, dim, f"{CHUNKS}/{name}.parquet", run.fingerprint))
        start += count
    result = consolidate(loc, run, outputs)
    print(f"{result.rows} × {result.dim} synthetic rows in {n_shards} shards → {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-features", default="fts.pth", help="the float32 copy's name; none: no copy")
    args = ap.parse_args()
    if args.rows < 1 or args.dim < 1 or args.shard_rows < 1:
        raise SystemExit("make_features: --rows, --dim and --shard-rows must be at least 1")
    torch_features = None if args.torch_features.lower() == "none" else args.torch_features
    make(args.out, args.rows, args.dim, args.shard_rows, args.seed, OutputNames(torch_features))


if __name__ == "__main__":
    main()
