#!/usr/bin/env python3
"""The original extract_fts.py's command line, on featpipe's streaming engine.

    python tools/extract_fts.py --data_dir IMAGES --output_dir OUT [--batch_size 256]
        [--model_repo facebookresearch/dinov2] [--model_name dinov2_vits14] [--resize_size 256]
        [--keep_ratio [true|false]] [--crop_size 224] [--torch_features fts.pth]
        [--numpy_features fts.npy] [--img_list img_list.json] [--verbose]

The image folder is streamed directly (no pack step) with the original Pillow preprocessing
(`--decode exact`), and OUT gets the same three files plus errors.jsonl (images that could not be
decoded, with the reason) and the resumable chunks/ folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.cli import default_workers  # noqa: E402
from pipeline.cpu import prefer_sleeping_threads  # noqa: E402
from pipeline.errors import EXIT_ABORTED, UserError  # noqa: E402


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
    ap.add_argument("--keep_ratio", type=_bool, nargs="?", const=True, default=True)
    ap.add_argument("--crop_size", type=int, default=224)
    ap.add_argument("--torch_features", default="fts.pth")
    ap.add_argument("--numpy_features", default="fts.npy")
    ap.add_argument("--img_list", default="img_list.json")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--num_workers", type=int, default=default_workers(), help="featpipe addition: decode workers")
    ap.add_argument("--device", default="auto", help="featpipe addition: auto, cpu, cuda")
    ap.add_argument("--group_size", type=int, default=1000,
                    help="featpipe addition: images per resumable chunk")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    prefer_sleeping_threads()  # before torch is imported
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="extract_fts: %(message)s")
    from pipeline.consolidate import OutputNames
    from pipeline.extract import ExtractConfig, run_extract, summary
    from pipeline.model import ModelConfig
    from pipeline.transform import TransformConfig

    names = OutputNames(args.torch_features, args.numpy_features, args.img_list)
    cfg = ExtractConfig(
        shards=args.data_dir, out=args.output_dir,
        model=ModelConfig(args.model_repo, args.model_name),
        transform=TransformConfig(args.resize_size, args.crop_size, args.keep_ratio, "exact"),
        batch_size=args.batch_size, workers=args.num_workers, device=args.device, names=names,
        progress=True, folder_group_size=args.group_size)
    try:
        result = run_extract(cfg)
    except UserError as exc:
        print(f"extract_fts: error: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    print(summary(result.stats, args.output_dir.rstrip("/"), names))
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
