#!/usr/bin/env python3
"""The original match_fts.py's command line (feature-matcher), translated to `featpipe match`.

    python tools/match_fts.py [--input_dir features] [--feature_filename fts.npy]
        [--output_dir matches] [--numpy_matches matches.npy]
        [--numpy_similarity_scores scores.npy] [--num_neighbors 10]

`--torch_features` and `--numpy_features` are aliases of `--feature_filename` (a `.pth` is read
with torch). The outputs are the original's: matches.npy (uint32, N×k, each vector's own row
first) and scores.npy (float16, N×k), plus featpipe's match.json; the search is tiled (bounded
memory) and exact unless N is large (see `featpipe match --method`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.cli import main as featpipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input_dir", default="features")
    ap.add_argument(
        "--feature_filename", "--torch_features", "--numpy_features", dest="feature_filename", default="fts.npy"
    )
    ap.add_argument("--output_dir", default="matches")
    ap.add_argument("--numpy_matches", default="matches.npy")
    ap.add_argument("--numpy_similarity_scores", default="scores.npy")
    ap.add_argument("--num_neighbors", type=int, default=10)
    return ap.parse_args(argv)


def featpipe_argv(args: argparse.Namespace) -> list[str]:
    """The same job as `featpipe match` flags."""
    return [
        "match",
        os.path.join(args.input_dir, args.feature_filename),
        args.output_dir,
        "-k",
        str(args.num_neighbors),
        "--numpy-matches",
        args.numpy_matches,
        "--numpy-similarity-scores",
        args.numpy_similarity_scores,
    ]


def main(argv: list[str] | None = None) -> int:
    return featpipe(featpipe_argv(parse_args(argv)), prog="match_fts")


if __name__ == "__main__":
    raise SystemExit(main())
