"""The `featpipe` command: pack, extract, consolidate, verify."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pipeline import __version__
from pipeline.cpu import prefer_sleeping_threads
from pipeline.errors import EXIT_ABORTED, UserError
from pipeline.units import parse_bytes


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featpipe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"featpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="image folder or bucket → WebDataset tar shards + manifest")
    p.add_argument("src", help="folder or fsspec URL (s3://bucket/prefix, gs://…, file://, memory://)")
    p.add_argument("dest", help="folder or fsspec URL for shard-NNNNNN.tar and manifest.json")
    p.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-shard-bytes", type=_size, default=10**9,
                   help="start a new shard past this many source bytes (default 1GB; accepts 500MB)")
    p.add_argument("--resize-max", type=_positive, default=None, metavar="PX",
                   help="re-encode images whose longer side exceeds PX (off by default)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for --resize-max (default 90)")
    p.add_argument("--check", choices=("header", "decode"), default="header",
                   help="header: Pillow reads headers only (default); decode: fully decode every image")
    p.add_argument("--workers", type=_positive, default=default_workers(),
                   help="processes, one shard per task (default: CPU count, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="delete earlier shards in DEST and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_pack)

    from pipeline.extract_cli import add_extract_commands

    add_extract_commands(sub)
    return parser


def _cmd_pack(args: argparse.Namespace) -> int:
    from pipeline.pack import PackConfig, run_pack, summary

    cfg = PackConfig(src=args.src, dest=args.dest, shard_size=args.shard_size,
                     max_shard_bytes=args.max_shard_bytes, resize_max=args.resize_max, quality=args.quality,
                     check=args.check, workers=args.workers, overwrite=args.overwrite,
                     progress=not args.no_progress)
    t0 = time.perf_counter()
    result = run_pack(cfg)
    print(summary(result, time.perf_counter() - t0))
    return 0


def main(argv: list[str] | None = None) -> int:
    prefer_sleeping_threads()  # before torch is imported
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="featpipe: %(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"featpipe {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    except KeyboardInterrupt:
        print(f"featpipe {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
