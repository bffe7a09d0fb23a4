"""What SHARDS means: a packed folder (with its manifest), a brace pattern, a list file, or a
plain image folder streamed without packing (the original script's way)."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import braceexpand

from pipeline.errors import UserError
from pipeline.shards import MANIFEST, SHARD_DIGITS
from pipeline.sources import list_images
from pipeline.storage import locate, read_json


@dataclass(frozen=True)
class ShardRef:
    name: str  # the chunk's name: OUT/chunks/NAME.parquet
    url: str  # a tar URL, or for a group of loose files the folder they came from
    expected: int | None = None  # samples, when a manifest or listing says so
    files: tuple[str, ...] = ()  # loose image files (URLs or paths) when this is not a tar
    index: int = 0  # position in the run's shard list; loose files get keys from it


def resolve_shards(spec: str) -> list[ShardRef]:
    """Every rank resolves the same spec to the same list, in the same order, so all agree on the work."""
    if "{" in spec and ".." in spec:
        refs = _named([(u, None) for u in braceexpand.braceexpand(spec)])
    else:
        loc = locate(spec)
        fs = loc.fs
        if fs.isdir(loc.path):
            manifest = loc.join(MANIFEST)
            if fs.exists(manifest):
                m = read_json(fs, manifest)
                refs = _named([(_url(loc, s["name"]), s["samples"]) for s in m["shards"]])
            else:
                tars = sorted(p for p in fs.glob(loc.join("*.tar")))
                refs = _named([(loc.url(p), None) for p in tars])
                if not tars:
                    raise UserError(f"no shards in {spec}: expected manifest.json or *.tar "
                                    "(run `featpipe pack` first, or point at a list file or brace pattern)")
        elif fs.isfile(loc.path):
            if loc.path.endswith((".tar", ".tar.gz", ".tgz")):
                refs = _named([(spec, None)])
            else:
                refs = _named([(u, None) for u in _read_list(loc, spec)])
        else:
            raise UserError(f"shards not found: {spec}")
    if not refs:
        raise UserError(f"the shard list {spec} is empty")
    return refs


def folder_as_shards(folder: str, group_size: int) -> list[ShardRef]:
    """A plain image folder, streamed directly: sorted files in groups that act as shards."""
    listing = list_images(folder)
    paths = [f.path for f in listing.files]
    groups = [tuple(paths[i:i + group_size]) for i in range(0, len(paths), group_size)]
    return [ShardRef(f"part-{g:0{SHARD_DIGITS}d}", folder, len(files), files, g) for g, files in enumerate(groups)]


def _url(loc, name: str) -> str:
    return loc.url(loc.join(name))


def _read_list(loc, spec: str) -> list[str]:
    with loc.fs.open(loc.path, "rt") as f:
        lines = [ln.strip() for ln in f]
    base = posixpath.dirname(loc.path)
    urls = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        if "://" in ln or os.path.isabs(ln):
            urls.append(ln)
        else:  # relative entries are relative to the list file
            urls.append(loc.url(posixpath.join(base, ln)))
    return urls


def _named(entries: list[tuple[str, int | None]]) -> list[ShardRef]:
    stems = [_stem(u) for u, _ in entries]
    unique = len(set(stems)) == len(stems)
    return [ShardRef(stem if unique else f"{i:06d}-{stem}", url, n, index=i)
            for i, ((url, n), stem) in enumerate(zip(entries, stems))]


def _stem(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base
