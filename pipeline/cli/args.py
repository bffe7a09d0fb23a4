"""Argument types and flag groups shared by several verbs (one definition each)."""

from __future__ import annotations

import argparse

from pipeline.dist import BARRIER_TIMEOUT_S
from pipeline.errors import UserError
from pipeline.units import parse_bytes


def size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def cosine(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine similarity is between -1 and 1, got {value}")
    return value


def add_barrier_timeout(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--barrier-timeout",
        type=positive,
        default=BARRIER_TIMEOUT_S,
        metavar="SECONDS",
        help=f"under torchrun: {what}",
    )


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The original extract_fts.py's flags, in dash style."""
    p.add_argument(
        "--model-repo",
        default="facebookresearch/dinov2",
        help="GitHub owner/repo[:ref] for torch.hub (cached in TORCH_HOME), or a local directory with a hubconf.py",
    )
    p.add_argument("--model-name", default="dinov2_vits14", help="entry point in the repo's hubconf.py")
    p.add_argument(
        "--model",
        default=None,
        metavar="SOURCE:ID",
        help="hub:owner/repo[:ref]/entry, timm:NAME, hf:org/name (or hf:/local/dir), open_clip:ARCH/TAG; "
        "its own preprocessing is used unless a flag below overrides it (default: --model-repo/--model-name)",
    )
    p.add_argument(
        "--weights", default=None, help="local checkpoint to load into the model (hub, timm, open_clip; weights_only)"
    )
    p.add_argument("--batch-size", type=positive, default=256)
    p.add_argument(
        "--resize-size", type=positive, default=None, help="size after resizing (default: the model's; hub: 256)"
    )
    p.add_argument(
        "--keep-ratio",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the aspect ratio when resizing (hub default; the original script's default is a "
        "square); --no-keep-ratio resizes to a square (as --resize-mode squash)",
    )
    p.add_argument(
        "--resize-mode",
        choices=("shortest", "squash"),
        default=None,
        help="shortest: the shorter side to --resize-size, then a centre crop; squash: both sides "
        "(default: the model's)",
    )
    p.add_argument("--crop-size", type=positive, default=None, help="centre crop (default: the model's; hub: 224)")
    p.add_argument(
        "--interpolation", choices=("bicubic", "bilinear"), default=None, help="resize filter (default: the model's)"
    )
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="default: the model's")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="default: the model's")
    p.add_argument(
        "--max-pixels",
        type=positive,
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
    p.add_argument(
        "--torch-features", default="fts.pth", help="float32 tensor file name in OUT; none: write no float32 copy"
    )
    p.add_argument("--numpy-features", default="fts.npy", help="float16 array file name in OUT")
    p.add_argument("--img-list", default="img_list.json", help="row-aligned source paths, file name in OUT")


def output_names(args: argparse.Namespace):
    from pipeline.outdir import OutputNames

    for flag in ("torch_features", "numpy_features", "img_list"):
        if "/" in getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is a file name inside OUT, not a path")
    torch_features = None if args.torch_features.lower() == "none" else args.torch_features
    return OutputNames(torch_features, args.numpy_features, args.img_list)


def add_io_concurrency(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--io-concurrency",
        type=positive,
        default=None,
        metavar="N",
        help=f"{what}: reads in flight per worker (default 64 on object stores and HTTP, 4 on local disks; "
        "at most 64 MB read ahead)",
    )


def transform_flags(args: argparse.Namespace):
    """(TransformConfig, the fields the user set): unset ones take the model's own values later."""
    from pipeline.image.transform import TransformConfig

    if (
        args.keep_ratio is not None
        and args.resize_mode is not None
        and args.keep_ratio != (args.resize_mode == "shortest")
    ):
        raise UserError("--keep-ratio/--no-keep-ratio and --resize-mode disagree; give one of them")
    keep = (
        args.keep_ratio
        if args.keep_ratio is not None
        else (None if args.resize_mode is None else args.resize_mode == "shortest")
    )
    given = {
        "resize_size": args.resize_size,
        "crop_size": args.crop_size,
        "keep_ratio": keep,
        "interpolation": args.interpolation,
        "mean": tuple(args.mean) if args.mean else None,
        "std": tuple(args.std) if args.std else None,
    }
    explicit = {k: v for k, v in given.items() if v is not None}
    transform = TransformConfig(mode=args.decode, max_pixels=args.max_pixels, **explicit)
    return transform, frozenset(explicit)


def model_config(args: argparse.Namespace):
    from pipeline.models.base import ModelConfig

    return ModelConfig(args.model_repo, args.model_name, args.weights, args.model)


def add_foreign_flags(p: argparse.ArgumentParser) -> None:
    """For FEATURES that another tool wrote (pipeline/retrieve/foreign.py)."""
    p.add_argument(
        "--embedding-column",
        metavar="NAME",
        help="when FEATURES is a folder of Parquet files: the column of embeddings (default: the only "
        "list-of-floats column)",
    )
    p.add_argument(
        "--path-column",
        metavar="NAME",
        help="when FEATURES is another tool's folder: the column of each row's path (default: image_path, "
        "path, url or filepath)",
    )


def import_foreign(spec: str, args: argparse.Namespace) -> None:
    """Another tool's folder imported with the columns asked for (later commands reuse them)."""
    if not (args.embedding_column or args.path_column):
        return
    from pipeline.outdir import RUN_FILE
    from pipeline.retrieve.foreign import Columns, imported
    from pipeline.retrieve.index import META_FILE
    from pipeline.storage import locate

    loc = locate(spec)
    if loc.fs.exists(loc.join(RUN_FILE)) or loc.fs.exists(loc.join(META_FILE)) or not loc.fs.isdir(loc.path):
        raise UserError(f"--embedding-column and --path-column are for another tool's folder; {spec} is not one")
    imported(spec, Columns(args.embedding_column, args.path_column))
