#!/usr/bin/env python3
"""The original extract_fts.py's command line, translated to `featpipe extract`.

    python tools/extract_fts.py --data_dir IMAGES --output_dir OUT [--batch_size 256]
        [--model_repo facebookresearch/dinov2] [--model_name dinov2_vits14] [--resize_size 256]
        [--keep_ratio] [--crop_size 224] [--torch_features fts.pth]
        [--numpy_features fts.npy] [--img_list img_list.json] [--verbose]

As in the original, images are resized to a RESIZE_SIZE square unless --keep_ratio is given (which
also takes an explicit true/false). The image folder is streamed directly (no pack step) with the
original Pillow preprocessing (`--decode exact`), and OUT gets the same three files plus
errors.jsonl (images that could not be decoded, with the reason) and the resumable chunks/ folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.cli import main as featpipe
from pipeline.cpu import default_workers


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True, help="folder (or fsspec URL) of images, walked recursively")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--model_repo", default="facebookresearch/dinov2")
    ap.add_argument("--model_name", default="dinov2_vits14")
    ap.add_argument("--resize_size", type=int, default=256)
    # The original's store_true: without the flag, a RESIZE_SIZE square.
    ap.add_argument("--keep_ratio", type=_bool, nargs="?", const=True, default=False)
    ap.add_argument("--crop_size", type=int, default=224)
    ap.add_argument("--torch_features", default="fts.pth")
    ap.add_argument("--numpy_features", default="fts.npy")
    ap.add_argument("--img_list", default="img_list.json")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--num_workers", type=int, default=default_workers(), help="featpipe addition: decode workers")
    ap.add_argument("--device", default="auto", help="featpipe addition: auto, cpu, cuda")
    ap.add_argument("--group_size", type=int, default=1000, help="featpipe addition: images per resumable chunk")
    return ap.parse_args(argv)


def featpipe_argv(args: argparse.Namespace) -> list[str]:
    """The same job as `featpipe extract` flags."""
    return [
        "extract",
        args.data_dir,
        args.output_dir,
        "--decode",
        "exact",
        "--model-repo",
        args.model_repo,
        "--model-name",
        args.model_name,
        "--batch-size",
        str(args.batch_size),
        "--resize-size",
        str(args.resize_size),
        "--keep-ratio" if args.keep_ratio else "--no-keep-ratio",
        "--crop-size",
        str(args.crop_size),
        "--torch-features",
        args.torch_features,
        "--numpy-features",
        args.numpy_features,
        "--img-list",
        args.img_list,
        "--workers",
        str(args.num_workers),
        "--device",
        args.device,
        "--group-size",
        str(args.group_size),
        *(["--verbose"] if args.verbose else []),
    ]


def main(argv: list[str] | None = None) -> int:
    return featpipe(featpipe_argv(parse_args(argv)), prog="extract_fts")


if __name__ == "__main__":
    raise SystemExit(main())
