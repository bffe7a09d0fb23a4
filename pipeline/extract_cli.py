"""`featpipe extract`, `consolidate` and `verify`. They need torch, so their modules are imported
only when they run: `featpipe pack` starts fast and its worker processes stay light."""

from __future__ import annotations

import argparse
import sys


def add_extract_commands(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli import _non_negative, _positive, default_workers

    p = sub.add_parser("extract", help="shards → model → Parquet chunks → fts.npy / fts.pth / img_list.json")
    p.add_argument("shards", help="packed folder or URL (with manifest.json), a brace pattern "
                                  "(s3://b/shard-{000000..000099}.tar), or a text file of shard URLs")
    p.add_argument("out", help="output folder or URL")
    add_model_flags(p)
    p.add_argument("--workers", type=_non_negative, default=default_workers(),
                   help="DataLoader worker processes decoding images (default: CPU count, at most 8)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype; auto = bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: a minute or more of compiling at start, faster batches after "
                        "(for long runs; falls back to eager if compiling fails)")
    p.add_argument("--overwrite", action="store_true", help="replace features made earlier in OUT")
    p.add_argument("--retries", type=_non_negative, default=3, help="retries of a shard after a transient read error")
    p.add_argument("--barrier-timeout", type=_positive, default=6 * 3600, metavar="SECONDS",
                   help="under torchrun: how long rank 0 waits for the slowest rank before consolidating")
    p.add_argument("--no-consolidate", action="store_true",
                   help="only write chunks; run `featpipe consolidate OUT` later")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(run=_cmd_extract)

    c = sub.add_parser("consolidate", help="chunks in OUT → fts.npy / fts.pth / img_list.json / errors.jsonl")
    c.add_argument("out")
    add_output_name_flags(c)
    c.set_defaults(run=_cmd_consolidate)

    v = sub.add_parser("verify", help="check that OUT is complete and consistent; exit 0 only when it is")
    v.add_argument("out")
    v.add_argument("--shards", help="the shards the run read (checks row counts against their manifest)")
    add_output_name_flags(v)
    v.set_defaults(run=_cmd_verify)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The original extract_fts.py's flags, in dash style."""
    from pipeline.cli import _positive

    p.add_argument("--model-repo", default="facebookresearch/dinov2",
                   help="GitHub owner/repo[:ref] for torch.hub (cached in TORCH_HOME), or a local directory "
                        "with a hubconf.py")
    p.add_argument("--model-name", default="dinov2_vits14", help="entry point in the repo's hubconf.py")
    p.add_argument("--weights", default=None, help="local checkpoint to load into the model (weights_only)")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--resize-size", type=_positive, default=256, help="shorter side after resizing (bicubic)")
    p.add_argument("--keep-ratio", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the aspect ratio when resizing (default); --no-keep-ratio resizes to a square")
    p.add_argument("--crop-size", type=_positive, default=224, help="center crop")
    p.add_argument("--decode", choices=("fast", "exact", "device"), default="fast",
                   help="fast: reduced-size JPEG decoding in the workers (default); exact: the original "
                        "script's Pillow pipeline pixel for pixel; device: JPEGs decoded on the model's device "
                        "(nvJPEG on CUDA), other formats in the workers")
    add_output_name_flags(p)


def add_output_name_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-features", default="fts.pth", help="float32 tensor file name in OUT")
    p.add_argument("--numpy-features", default="fts.npy", help="float16 array file name in OUT")
    p.add_argument("--img-list", default="img_list.json", help="row-aligned source paths, file name in OUT")


def output_names(args: argparse.Namespace):
    from pipeline.consolidate import OutputNames

    for flag in ("torch_features", "numpy_features", "img_list"):
        if "/" in getattr(args, flag):
            from pipeline.errors import UserError

            raise UserError(f"--{flag.replace('_', '-')} is a file name inside OUT, not a path")
    return OutputNames(args.torch_features, args.numpy_features, args.img_list)


def extract_config(args: argparse.Namespace, **extra):
    from pipeline.extract import ExtractConfig
    from pipeline.model import ModelConfig
    from pipeline.transform import TransformConfig

    return ExtractConfig(
        shards=args.shards, out=args.out,
        model=ModelConfig(args.model_repo, args.model_name, args.weights),
        transform=TransformConfig(args.resize_size, args.crop_size, args.keep_ratio, args.decode),
        batch_size=args.batch_size, names=output_names(args), **extra)


def _cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.extract import run_extract, summary
    from pipeline.stream import ReadConfig

    cfg = extract_config(args, workers=args.workers, device=args.device, precision=args.precision,
                         overwrite=args.overwrite, progress=not args.no_progress, read=ReadConfig(retries=args.retries),
                         barrier_timeout_s=args.barrier_timeout, consolidate=not args.no_consolidate,
                         compile=args.compile)
    result = run_extract(cfg)
    print(summary(result.stats, args.out.rstrip("/"), cfg.names))
    return result.exit_code


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from pipeline.consolidate import consolidate
    from pipeline.errors import EXIT_FAILURES, EXIT_OK
    from pipeline.runinfo import load_run
    from pipeline.storage import locate

    out = locate(args.out)
    result = consolidate(out, load_run(out), output_names(args))
    print(f"{result.rows} rows ({result.dim}-dim), {result.errors} recorded failures → {args.out}")
    return EXIT_FAILURES if result.errors else EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.verify import verify

    problems, summary = verify(args.out, args.shards, output_names(args))
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print(summary)
    return 0 if not problems else 1
