"""The `featpipe` command line: one parser per stage, defined here; each stage's module is
imported only when its command runs, so `featpipe pack` starts fast and its workers stay light
(no torch). Imports go one way: this module → the stages, never back."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pipeline import __version__
from pipeline.cpu import default_workers, prefer_sleeping_threads
from pipeline.dist import BARRIER_TIMEOUT_S
from pipeline.errors import EXIT_ABORTED, EXIT_FAILURES, EXIT_OK, UserError, reason
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featpipe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"featpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pack(sub)
    _add_extract(sub)
    c = sub.add_parser("consolidate", help="chunks in OUT → fts.npy / fts.pth / img_list.json / errors.jsonl")
    c.add_argument("out")
    add_output_name_flags(c)
    c.set_defaults(run=_cmd_consolidate)
    v = sub.add_parser("verify", help="check that OUT is complete and consistent; exit 0 only when it is")
    v.add_argument("out")
    v.add_argument("--shards", help="the shards the run read (checks row counts against their manifest)")
    add_output_name_flags(v)
    v.set_defaults(run=_cmd_verify)
    _add_match(sub)
    _add_dedup(sub)
    _add_index(sub)
    _add_show(sub)
    return parser


def _add_pack(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--max-shard-bytes",
        type=_size,
        default=10**9,
        help="start a new shard past this many source bytes (default 1GB; accepts 500MB)",
    )
    p.add_argument(
        "--resize-max",
        type=_positive,
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
        type=_positive,
        default=default_workers(),
        help="processes, one shard per task (default: CPU count, at most 8)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete earlier shards in DEST and start over")
    p.add_argument("--create-bucket", action="store_true", help="create DEST's bucket if it does not exist")
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="list SRC (or read the list), write DEST/listing.parquet and stop: a long listing done once, "
        "before the packing job starts",
    )
    _add_barrier_timeout(p, "how long ranks wait for rank 0's listing, and rank 0 for the slowest rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_pack)


def _add_barrier_timeout(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--barrier-timeout",
        type=_positive,
        default=BARRIER_TIMEOUT_S,
        metavar="SECONDS",
        help=f"under torchrun: {what}",
    )


def _add_extract(sub: argparse._SubParsersAction) -> None:
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
        type=_non_negative,
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
        type=_positive,
        default=1000,
        help="when SHARDS is a plain image folder: images per resumable chunk (default 1000)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace features made earlier in OUT")
    p.add_argument("--create-bucket", action="store_true", help="create OUT's bucket if it does not exist")
    p.add_argument("--retries", type=_non_negative, default=3, help="retries of a shard after a transient read error")
    _add_barrier_timeout(p, "how long rank 0 waits for the slowest rank before consolidating")
    p.add_argument(
        "--no-consolidate", action="store_true", help="only write chunks; run `featpipe consolidate OUT` later"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(run=_cmd_extract)


def _add_match(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "match", help="features → all-vs-all k nearest neighbours (matches.npy, scores.npy, neighbors.parquet)"
    )
    m.add_argument("features", help="an extract output folder, or a .npy / .pth file of N×D vectors")
    m.add_argument("out", help="output folder")
    m.add_argument("-k", type=_positive, default=10, help="neighbours per vector (default 10)")
    m.add_argument("--exclude-self", action="store_true", help="do not list each vector as its own neighbour")
    m.add_argument("--numpy-matches", default="matches.npy", help="neighbour rows file name in OUT (uint32)")
    m.add_argument("--numpy-similarity-scores", default="scores.npy", help="scores file name in OUT (float16)")
    _add_search_flags(m)
    m.set_defaults(run=_cmd_match)


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    """How the kNN search runs, for match and dedup."""
    p.add_argument(
        "--method",
        choices=("auto", "exact", "ivf"),
        default="auto",
        help="exact: every pair; ivf: a faiss IVF index tuned to recall@k ≥ 0.95; auto: exact while "
        "N²·D is small enough (see README)",
    )
    p.add_argument(
        "--memory-budget",
        type=_size,
        default=2 * 10**9,
        metavar="SIZE",
        help="memory for the search tiles (default 2GB; accepts 512MB)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace results made earlier in OUT")
    p.add_argument("--create-bucket", action="store_true", help="create OUT's bucket if it does not exist")
    _add_barrier_timeout(p, "how long rank 0 waits for the slowest rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _search_settings(args: argparse.Namespace) -> dict:
    return {
        "method": args.method,
        "memory_budget": args.memory_budget,
        "device": args.device,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
        "barrier_timeout_s": args.barrier_timeout,
        "create_bucket": args.create_bucket,
    }


def _cosine(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine similarity is between -1 and 1, got {value}")
    return value


def _add_dedup(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dedup", help="features → near-duplicate groups (groups.json, duplicates.json, to_remove.txt)")
    d.add_argument("features", help="an extract output folder, or a .npy / .pth file of N×D vectors")
    d.add_argument("out", help="output folder (also holds the kNN search it rides on)")
    d.add_argument(
        "--threshold",
        type=_cosine,
        required=True,
        help="cosine similarity at or above which two images are duplicates (the printed histogram "
        "helps to choose it for a model)",
    )
    d.add_argument("-k", type=_positive, default=10, help="neighbours looked at per image (the largest group size)")
    d.add_argument(
        "--linkage",
        choices=("star", "connected"),
        default="star",
        help="star: every member within the threshold of its representative (default); connected: "
        "connected components, which can chain unrelated images",
    )
    _add_search_flags(d)
    d.set_defaults(run=_cmd_dedup)


def _add_index(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("index", help="features → a faiss index (index.faiss, ids.parquet, index.json) to query")
    i.add_argument("features", help="an extract output folder, or a .npy / .pth file of N×D vectors")
    i.add_argument("index", help="output folder for the index")
    i.add_argument(
        "--index-key",
        default="auto",
        help="auto (Flat, HNSW or IVF by N and the memory budget; see README) or any faiss "
        "index_factory string, e.g. IVF1024,PQ32",
    )
    i.add_argument(
        "--memory-budget", type=_size, default=2 * 10**9, metavar="SIZE", help="memory the index may take (default 2GB)"
    )
    i.add_argument("--overwrite", action="store_true", help="replace an index built earlier in INDEX")
    i.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    i.set_defaults(run=_cmd_index)
    q = sub.add_parser("query", help="nearest images to an image file or URL, a key or path in the set, or vectors")
    q.add_argument("target", metavar="INDEX_OR_FEATURES", help="an index folder, or FEATURES searched exactly")
    q.add_argument(
        "queries",
        metavar="QUERY",
        nargs="+",
        help="an image file or URL (embedded with the extract run's model), a key or path in the set, "
        "or a .npy of vectors",
    )
    q.add_argument("-k", type=_positive, default=10, help="neighbours per query (default 10)")
    q.add_argument("--json", action="store_true", help="JSON lines instead of rank, score, path")
    q.add_argument("--device", default="auto", help="where to embed image queries: auto, cpu, cuda")
    q.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    q.set_defaults(run=_cmd_query)


def _add_show(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("show", help="a static HTML page of a match's neighbours or a dedup's groups")
    s.add_argument("source", metavar="MATCH_OR_DEDUP", help="the OUT folder of featpipe match or featpipe dedup")
    s.add_argument("page", help="the page to write, e.g. page.html (more pages: page-2.html, …)")
    s.add_argument(
        "--sample", type=_positive, default=100, help="queries (match) or groups (dedup) shown (default 100)"
    )
    s.add_argument("--thumb", type=_positive, default=128, help="thumbnail size in pixels (default 128)")
    s.add_argument("--per-page", type=_positive, default=25, help="queries or groups per page (default 25)")
    s.set_defaults(run=_cmd_show)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The original extract_fts.py's flags, in dash style."""
    p.add_argument(
        "--model-repo",
        default="facebookresearch/dinov2",
        help="GitHub owner/repo[:ref] for torch.hub (cached in TORCH_HOME), or a local directory with a hubconf.py",
    )
    p.add_argument("--model-name", default="dinov2_vits14", help="entry point in the repo's hubconf.py")
    p.add_argument("--weights", default=None, help="local checkpoint to load into the model (weights_only)")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--resize-size", type=_positive, default=256, help="shorter side after resizing (bicubic)")
    p.add_argument(
        "--keep-ratio",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the aspect ratio when resizing (default; the original script's default is a "
        "square); --no-keep-ratio resizes to a square",
    )
    p.add_argument("--crop-size", type=_positive, default=224, help="center crop")
    p.add_argument(
        "--max-pixels",
        type=_positive,
        default=89_478_485,
        help="images with more pixels are recorded as failed, not decoded: bounds one worker's memory "
        "at ~10 bytes per pixel (default 89478485, Pillow's warning point: ~0.9 GB)",
    )
    p.add_argument(
        "--decode",
        choices=("fast", "exact", "device"),
        default="fast",
        help="fast: reduced-size JPEG decoding in the workers (default); exact: the original "
        "script's Pillow pipeline pixel for pixel; device: JPEGs decoded on the model's device "
        "(nvJPEG on CUDA), other formats in the workers",
    )
    add_output_name_flags(p)


def add_output_name_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-features", default="fts.pth", help="float32 tensor file name in OUT")
    p.add_argument("--numpy-features", default="fts.npy", help="float16 array file name in OUT")
    p.add_argument("--img-list", default="img_list.json", help="row-aligned source paths, file name in OUT")


def output_names(args: argparse.Namespace):
    from pipeline.outdir import OutputNames

    for flag in ("torch_features", "numpy_features", "img_list"):
        if "/" in getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is a file name inside OUT, not a path")
    return OutputNames(args.torch_features, args.numpy_features, args.img_list)


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
    )
    t0 = time.perf_counter()
    result = run_pack(cfg)
    if DistContext.from_env().is_main:  # under torchrun, rank 0 speaks for the job
        print(summary(result, time.perf_counter() - t0))
    return EXIT_OK


def _cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.extract.model import ModelConfig
    from pipeline.extract.reader import ReadConfig
    from pipeline.extract.run import ExtractConfig, run_extract, summary
    from pipeline.image.transform import TransformConfig

    cfg = ExtractConfig(
        shards=args.shards,
        out=args.out,
        model=ModelConfig(args.model_repo, args.model_name, args.weights),
        transform=TransformConfig(args.resize_size, args.crop_size, args.keep_ratio, args.decode, args.max_pixels),
        batch_size=args.batch_size,
        names=output_names(args),
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        group_size=args.group_size,
        read=ReadConfig(retries=args.retries),
        barrier_timeout_s=args.barrier_timeout,
        consolidate=not args.no_consolidate,
        compile=args.compile,
        create_bucket=args.create_bucket,
    )
    result = run_extract(cfg)
    print(summary(result.stats, args.out.rstrip("/"), cfg.names))
    return result.exit_code


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from pipeline.extract.consolidate import consolidate
    from pipeline.outdir import CHUNKS, DONE, FAILED, load_run
    from pipeline.storage import locate, remove_stale_temps

    out = locate(args.out)
    remove_stale_temps(out, CHUNKS, DONE, FAILED)  # what a killed or failed run left behind
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


def _cmd_match(args: argparse.Namespace) -> int:
    from pipeline.retrieve.match import MatchConfig, MatchNames, run_match, summary

    for flag in ("numpy_matches", "numpy_similarity_scores"):
        if "/" in getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is a file name inside OUT, not a path")
    names = MatchNames(args.numpy_matches, args.numpy_similarity_scores)
    cfg = MatchConfig(
        args.features, args.out, k=args.k, exclude_self=args.exclude_self, names=names, **_search_settings(args)
    )
    print(summary(run_match(cfg)))
    return EXIT_OK


def _cmd_dedup(args: argparse.Namespace) -> int:
    from pipeline.retrieve.dedup import DedupConfig, run_dedup, summary

    cfg = DedupConfig(args.features, args.out, args.threshold, args.k, args.linkage, _search_settings(args))
    print(summary(run_dedup(cfg), args.out.rstrip("/")))
    return EXIT_OK


def _cmd_index(args: argparse.Namespace) -> int:
    from pipeline.retrieve.index import IndexConfig, build_index, summary

    meta = build_index(IndexConfig(args.features, args.index, args.index_key, args.memory_budget, args.overwrite))
    print(summary(meta, args.index))
    return EXIT_OK


def _cmd_query(args: argparse.Namespace) -> int:
    from pipeline.retrieve.query import format_hits, run_query

    print(format_hits(run_query(args.target, args.queries, args.k, args.device), args.json))
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from pipeline.retrieve.show import run_show, summary

    print(summary(run_show(args.source, args.page, args.sample, args.thumb, args.per_page)))
    return EXIT_OK


def _configure_logging(prog: str, verbose: bool) -> None:
    """featpipe's own messages under its name; other libraries' only at warning level, or at -v
    under their own names (faiss, s3fs, gcsfs and botocore log INFO lines on every run)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    ours = logging.getLogger("featpipe")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format=f"{prog}: [%(name)s] %(message)s"
    )


def _is_environment_error(exc: BaseException) -> bool:
    """A full disk, a read-only folder, an unreachable endpoint, refused credentials: the user's
    to fix, so one line naming the cause, not a traceback. Object-store clients raise their own
    types, recognised by the library they come from."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "google", "gcsfs", "s3fs")


def main(argv: list[str] | None = None, prog: str = "featpipe") -> int:
    prefer_sleeping_threads()  # before torch is imported
    args = build_parser().parse_args(argv)
    _configure_logging(prog, getattr(args, "verbose", False))
    try:
        return args.run(args)
    except UserError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as exc:
        if not _is_environment_error(exc):
            raise  # a bug in featpipe: the traceback is what a report needs
        print(f"{prog} {args.command}: error: {reason(exc)}", file=sys.stderr)
        return EXIT_ABORTED
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
