"""Find the images under a folder or bucket prefix, in a stable order (pack's walk of a folder, and
extract's input when SHARDS is a plain image folder)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import UserError
from pipeline.image.header import IMAGE_EXTENSIONS, has_image_extension
from pipeline.storage import locate


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # relative to SRC, '/'-separated
    path: str  # as the user would recognise it: SRC joined with relpath
    fs_path: str  # what the filesystem object opens
    size: int


@dataclass(frozen=True)
class Listing:
    files: list[SourceFile]
    ignored: int  # files without an image extension


def list_images(src: str, exclude: str | None = None) -> Listing:
    root = locate(src)
    fs = root.fs
    try:
        is_dir = fs.isdir(root.path)
    except Exception as exc:
        raise UserError(f"cannot read source {src}: {exc}") from None
    if not is_dir:
        if fs.exists(root.path):
            raise UserError(f"source {src} is a file; give the folder or prefix that holds the images")
        raise UserError(f"source {src} does not exist")
    found = find_all(fs, root.path)
    files: list[SourceFile] = []
    ignored = 0
    prefix = root.path.rstrip("/") + "/"
    shown = src.rstrip("/")
    skip = exclude.rstrip("/") + "/" if exclude else None
    for fs_path, info in found.items():
        if skip and (fs_path + "/").startswith(skip):
            continue
        if info.get("type", "file") != "file" or not fs_path.startswith(prefix):
            continue
        rel = fs_path[len(prefix) :]
        if not has_image_extension(rel):
            ignored += 1
            continue
        files.append(SourceFile(rel, f"{shown}/{rel}", fs_path, int(info.get("size") or 0)))
    # Sort on the relative path's code points so every platform and backend agrees on the order.
    files.sort(key=lambda f: f.relpath)
    if not files:
        what = "is empty" if ignored == 0 else f"holds no image ({ignored} other files)"
        raise UserError(f"source {src} {what}; images are recognised by extension: {' '.join(IMAGE_EXTENSIONS)}")
    return Listing(files, ignored)


# LIST requests in flight when walking a bucket prefix. One LIST returns at most 1,000 keys, so
# 100M objects are ~100,000 pages: one after another at 30 ms that is ~50 min; over 32 sub-prefixes
# at once, under 2 min (README, "Object stores").
LIST_CONCURRENCY = 32
_FAN_OUT_DEPTH = 3  # sub-prefix levels expanded (one delimited LIST each) to find enough to split


def find_all(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """Every file under `path` (name → info), as `fs.find` gives it. On an object store the prefix
    is split into its sub-prefixes (delimiter "/", level by level until there are enough), and
    these are listed concurrently; the result is the same set, whatever the split."""
    if isinstance(fs, LocalFileSystem):
        return fs.find(path, detail=True)
    files: dict[str, dict] = {}
    prefixes = [path.rstrip("/")]
    for _ in range(_FAN_OUT_DEPTH):
        if len(prefixes) >= LIST_CONCURRENCY:
            break
        with ThreadPoolExecutor(LIST_CONCURRENCY) as pool:
            levels = list(pool.map(lambda p: fs.ls(p, detail=True, refresh=True), prefixes))
        deeper = []
        for entries in levels:
            for e in entries:
                if e["type"] == "directory":
                    deeper.append(e["name"])
                else:
                    files[e["name"]] = e
        if not deeper:
            return files
        prefixes = deeper
    with ThreadPoolExecutor(LIST_CONCURRENCY) as pool:
        for found in pool.map(lambda p: fs.find(p, detail=True), prefixes):
            files.update(found)
    return files
