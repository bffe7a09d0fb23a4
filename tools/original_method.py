#!/usr/bin/env python3
"""The original extract_fts.py method, kept as the benchmark's baseline: an ImageFolder-style
Dataset (PIL open → EXIF transpose → RGB → torchvision Resize/CenterCrop/ToTensor/Normalize in the
workers), a DataLoader, the model, every feature kept in a list, then fts.pth / fts.npy / img_list.json.

    python tools/original_method.py --data_dir DIR --output_dir OUT --model_repo REPO --model_name NAME
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFiles(Dataset):
    def __init__(self, root: str, transform):
        self.paths = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in EXTENSIONS)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        im = ImageOps.exif_transpose(Image.open(self.paths[i])).convert("RGB")
        return self.transform(im), i


def original_transform(resize_size: int = 256, crop_size: int = 224, keep_ratio: bool = True) -> T.Compose:
    size = resize_size if keep_ratio else (resize_size, resize_size)
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop_size),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--num_workers", type=int, default=4)
    ap.add_argument("--model_repo", required=True)
    ap.add_argument("--model_name", required=True)
    args = ap.parse_args()
    source = "local" if os.path.isdir(args.model_repo) else "github"
    model = torch.hub.load(args.model_repo, args.model_name, source=source).eval()
    ds = ImageFiles(args.data_dir, original_transform())
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)
    feats = []
    with torch.no_grad():
        for x, _ in loader:
            feats.append(model(x))
    fts = torch.cat(feats)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.save(fts, os.path.join(args.output_dir, "fts.pth"))
    np.save(os.path.join(args.output_dir, "fts.npy"), fts.numpy().astype(np.float16))
    with open(os.path.join(args.output_dir, "img_list.json"), "w") as f:
        json.dump(ds.paths, f)


if __name__ == "__main__":
    main()
