"""The verbs that make features: pack, extract, consolidate, verify (parsers and commands)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from pipeline.cli.args import (
    add_barrier_timeout,
    add_io_concurrency,
    add_model_flags,
    add_output_name_flags,
    model_config,
    non_negative,
    output_names,
    positive,
    size,
    transform_flags,
)
from pipeline.cpu import default_workers
from pipeline.errors import EXIT_ABORTED, EXIT_FAILURES, EXIT_OK

if TYPE_CHECKING:
    from pipeline.extract.meta import SampleRules


def add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="image folder, bucket or list of images → WebDataset tar shards + manifest")
    p.add_argument(
        "src",
        help="folder or fsspec URL (s3://bucket/prefix, gs://…, file://, memory://), or a list of images: "
        "a text file of paths or URLs (one a line), or a .csv/.tsv/.parquet with a path column (.gz allowed)",
    )
    p.add_argument(
        "dest", help="folder or fsspec URL for shard-NNNNNN.tar, manifest.json and listing.parquet (the plan)"
    )
    p.add_argument(
        "--root", help="a list's relative entries are under this folder or URL; recorded paths relative to it"
    )
    p.add_argument(
        "--path-column",
        default="path",
        metavar="NAME",
        help="a CSV/Parquet list's column of paths or URLs (default path)",
    )
    p.add_argument(
        "--size-column",
        default="size",
        metavar="NAME",
        help="a CSV/Parquet list's column of byte sizes, used when there (default size); sizes it lacks are looked up",
    )
    p.add_argument(
        "--relist",
        action="store_true",
        help="list SRC again instead of planning from DEST/listing.parquet (files added since are packed; "
        "shards packed from other files are refused)",
    )
    p.add_argument("--shard-size", type=positive, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--max-shard-bytes",
        type=size,
        default=10**9,
        help="start a new shard past this many source bytes (default 1GB; accepts 500MB)",
    )
    p.add_argument(
        "--resize-max",
        type=positive,
        default=None,
        metavar="PX",
        help="re-encode images whose longer side exceeds PX (off by default)",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for --resize-max (default 90)")
    p.add_argument(
        "--check",
        choices=("header", "decode"),
        default="header",
        help="header: Pillow reads headers only (default); decode: fully decode every image",
    )
    p.add_argument(
        "--workers",
        type=positive,
        default=default_workers(),
        help="processes, one shard per task (default: CPU count, at most 8)",
    )
    add_io_concurrency(p, "source images")
    p.add_argument("--overwrite", action="store_true", help="delete earlier shards in DEST and start over")
    p.add_argument("--create-bucket", action="store_true", help="create DEST's bucket if it does not exist")
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="list SRC (or read the list), write DEST/listing.parquet and stop: a long listing done once, "
        "before the packing job starts",
    )
    add_barrier_timeout(p, "how long ranks wait for rank 0's listing, and rank 0 for the slowest rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_pack)


def add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="shards → model → Parquet chunks → fts.npy / fts.pth / img_list.json")
    p.add_argument(
        "shards",
        help="packed folder or URL (with manifest.json), a brace pattern "
        "(s3://b/shard-{000000..000099}.tar), a text file of shard URLs, or a plain "
        "image folder (streamed without packing)",
    )
    p.add_argument("out", help="output folder or URL")
    add_model_flags(p)
    p.add_argument(
        "--workers",
        type=non_negative,
        default=default_workers(),
        help="DataLoader worker processes decoding images (default: CPU count, at most 8)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast dtype; auto = bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model: a minute or more of compiling at start, faster batches after "
        "(for long runs; falls back to eager if compiling fails)",
    )
    p.add_argument(
        "--group-size",
        type=positive,
        default=1000,
        help="when SHARDS is a plain image folder: images per resumable chunk (default 1000)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace features made earlier in OUT")
    p.add_argument("--create-bucket", action="store_true", help="create OUT's bucket if it does not exist")
    p.add_argument("--retries", type=non_negative, default=3, help="retries of a shard after a transient read error")
    add_io_concurrency(p, "when SHARDS is a plain image folder")
    add_barrier_timeout(p, "how long rank 0 waits for the slowest rank before consolidating")
    p.add_argument(
        "--no-consolidate", action="store_true", help="only write chunks; run `featpipe consolidate OUT` later"
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="unit vectors in every output (chunks, fts.npy, fts.pth), as autofaiss and clip-retrieval "
        "expect; without it the outputs are the original script's",
    )
    p.add_argument(
        "--image-field",
        help="which member of a sample is the image, first present wins: webdataset's syntax, e.g. "
        "'jpg;png;webp' (default: any image extension, jpg first); other images in the sample are "
        "named in the row's other_images column",
    )
    meta = p.add_mutually_exclusive_group()
    meta.add_argument(
        "--meta",
        help="the sample metadata kept as columns (chunks and metadata.parquet), e.g. caption,url,status "
        "(default: the .txt caption and every scalar field of the sample's .json)",
    )
    meta.add_argument("--no-meta", action="store_true", help="keep no sample metadata")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(run=_cmd_extract)


def add_consolidate_verify(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("consolidate", help="chunks in OUT → fts.npy / fts.pth / img_list.json / errors.jsonl")
    c.add_argument("out")
    add_output_name_flags(c)
    c.set_defaults(run=_cmd_consolidate)
    v = sub.add_parser("verify", help="check that OUT is complete and consistent; exit 0 only when it is")
    v.add_argument("out")
    v.add_argument("--shards", help="the shards the run read (checks row counts against their manifest)")
    add_output_name_flags(v)
    v.set_defaults(run=_cmd_verify)


def _cmd_pack(args: argparse.Namespace) -> int:
    from pipeline.dist import DistContext
    from pipeline.pack.packer import PackConfig, run_pack, summary

    cfg = PackConfig(
        src=args.src,
        dest=args.dest,
        shard_size=args.shard_size,
        max_shard_bytes=args.max_shard_bytes,
        resize_max=args.resize_max,
        quality=args.quality,
        check=args.check,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        create_bucket=args.create_bucket,
        root=args.root,
        path_column=args.path_column,
        size_column=args.size_column,
        relist=args.relist,
        plan_only=args.plan_only,
        barrier_timeout_s=args.barrier_timeout,
        io_concurrency=args.io_concurrency,
    )
    t0 = time.perf_counter()
    result = run_pack(cfg)
    if DistContext.from_env().is_main:  # under torchrun, rank 0 speaks for the job
        print(summary(result, time.perf_counter() - t0))
    return EXIT_OK


def _cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.extract.reader import ReadConfig
    from pipeline.extract.run import ExtractConfig, run_extract, summary

    transform, explicit = transform_flags(args)
    cfg = ExtractConfig(
        shards=args.shards,
        out=args.out,
        model=model_config(args),
        transform=transform,
        transform_set=explicit,
        batch_size=args.batch_size,
        names=output_names(args),
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        group_size=args.group_size,
        read=ReadConfig(retries=args.retries, io_concurrency=args.io_concurrency, samples=sample_rules(args)),
        barrier_timeout_s=args.barrier_timeout,
        consolidate=not args.no_consolidate,
        compile=args.compile,
        create_bucket=args.create_bucket,
        normalize=args.normalize,
    )
    result = run_extract(cfg)
    print(summary(result.stats, args.out.rstrip("/"), cfg.names))
    return result.exit_code


def sample_rules(args: argparse.Namespace) -> SampleRules:
    from pipeline.extract.meta import SampleRules, parse_image_field, parse_meta

    rules = SampleRules(meta=() if args.no_meta else parse_meta(args.meta) if args.meta else None)
    if args.image_field:
        rules = SampleRules(parse_image_field(args.image_field), rules.meta)
    return rules


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from pipeline.extract.consolidate import consolidate
    from pipeline.outdir import CHUNKS, DONE, FAILED, METADATA_DIR, load_run
    from pipeline.storage import locate, remove_stale_temps

    out = locate(args.out)
    remove_stale_temps(out, CHUNKS, DONE, FAILED, METADATA_DIR)  # what a killed or failed run left behind
    result = consolidate(out, load_run(out), output_names(args))
    print(f"{result.rows} rows ({result.dim}-dim), {result.errors} recorded failures → {args.out}")
    return EXIT_FAILURES if result.errors else EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.extract.verify import verify

    problems, summary = verify(args.out, args.shards, output_names(args))
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print(summary)
    return EXIT_OK if not problems else EXIT_ABORTED
