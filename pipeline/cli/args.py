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
    p.add_argument("--weights", default=None, help="local checkpoint to load into the model (weights_only)")
    p.add_argument("--batch-size", type=positive, default=256)
    p.add_argument("--resize-size", type=positive, default=256, help="shorter side after resizing (bicubic)")
    p.add_argument(
        "--keep-ratio",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the aspect ratio when resizing (default; the original script's default is a "
        "square); --no-keep-ratio resizes to a square",
    )
    p.add_argument("--crop-size", type=positive, default=224, help="center crop")
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
    p.add_argument("--torch-features", default="fts.pth", help="float32 tensor file name in OUT")
    p.add_argument("--numpy-features", default="fts.npy", help="float16 array file name in OUT")
    p.add_argument("--img-list", default="img_list.json", help="row-aligned source paths, file name in OUT")


def output_names(args: argparse.Namespace):
    from pipeline.outdir import OutputNames

    for flag in ("torch_features", "numpy_features", "img_list"):
        if "/" in getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is a file name inside OUT, not a path")
    return OutputNames(args.torch_features, args.numpy_features, args.img_list)


def add_io_concurrency(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--io-concurrency",
        type=positive,
        default=None,
        metavar="N",
        help=f"{what}: reads in flight per worker (default 64 on object stores and HTTP, 4 on local disks; "
        "at most 256 MB read ahead)",
    )
