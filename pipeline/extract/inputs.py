"""What SHARDS means: a packed folder (with its manifest), a folder of tars, one tar, a brace
pattern, a list file of shard URLs, or a plain image folder streamed without packing (the
original script's way: its sorted images in groups that act as shards)."""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, replace

import braceexpand

from pipeline.errors import UserError, first_line
from pipeline.listing import list_images
from pipeline.shardformat import MANIFEST, SHARD_DIGITS
from pipeline.storage import PIPE, Location, locate, read_json

log = logging.getLogger("featpipe")

DEFAULT_GROUP_SIZE = 1000  # images per resumable chunk when SHARDS is a plain image folder

TAR_EXTENSIONS = (".tar.gz", ".tgz", ".tar")  # a folder's shards (longest first: .tar.gz is not .gz)


@dataclass(frozen=True)
class ShardRef:
    name: str  # the chunk's name: OUT/chunks/NAME.parquet
    url: str  # a tar URL, or for a group of loose files the folder they came from
    expected: int | None = None  # samples, when a manifest or listing says so
    files: tuple[str, ...] = ()  # loose image files (URLs or paths) when this is not a tar
    index: int = 0  # position in the run's shard list; loose files get keys from it
    generation: int = 0  # the listing that planned it (pack --relist appends generations)


def resolve_shards(spec: str, group_size: int = DEFAULT_GROUP_SIZE) -> list[ShardRef]:
    """Every rank resolves the same spec to the same list, in the same order, so all agree on the work."""
    if "{" in spec and ".." in spec:
        refs = _named([(u, None) for u in braceexpand.braceexpand(spec)])
    elif spec.startswith(PIPE):
        refs = _named([(spec, None)])
    else:
        loc = locate(spec)
        try:
            is_dir, is_file = loc.fs.isdir(loc.path), loc.fs.isfile(loc.path)
        except PermissionError as exc:  # refused credentials, or no right to list there
            raise UserError(f"cannot read shards {spec}: access denied ({first_line(exc)})") from None
        if is_dir:
            refs = _from_folder(loc, spec, group_size)
        elif is_file:
            is_tar = loc.path.endswith(TAR_EXTENSIONS)
            refs = _named([(spec, None)] if is_tar else [(u, None) for u in _read_list(loc)])
        else:
            raise UserError(f"shards not found: {spec}")
    if not refs:
        raise UserError(f"the shard list {spec} is empty")
    return refs


def _from_folder(loc: Location, spec: str, group_size: int) -> list[ShardRef]:
    manifest = loc.join(MANIFEST)
    if loc.fs.exists(manifest):
        m = read_json(loc.fs, manifest)
        refs = _named([(loc.url(loc.join(s["name"])), s["samples"]) for s in m["shards"]])
        return [replace(r, generation=s.get("generation", 0)) for r, s in zip(refs, m["shards"], strict=True)]
    tars = sorted({p for ext in TAR_EXTENSIONS for p in loc.fs.glob(loc.join(f"*{ext}"))})
    if tars:
        return _named([(loc.url(p), None) for p in tars])
    try:
        refs = folder_as_shards(spec, group_size)
    except UserError:
        raise UserError(
            f"no shards or images in {spec}: expected manifest.json, *.tar (.tar.gz, .tgz) or image files "
            "(run `featpipe pack` first, or point at a list file or brace pattern)"
        ) from None
    log.info(
        "%s holds no shards: streaming its %d images directly in groups of %d (no pack step)",
        spec,
        sum(len(r.files) for r in refs),
        group_size,
    )
    return refs


def folder_as_shards(folder: str, group_size: int) -> list[ShardRef]:
    """A plain image folder, streamed directly: sorted files in groups that act as shards."""
    paths = [f.path for f in list_images(folder).files]
    groups = [tuple(paths[i : i + group_size]) for i in range(0, len(paths), group_size)]
    return [ShardRef(f"part-{g:0{SHARD_DIGITS}d}", folder, len(files), files, g) for g, files in enumerate(groups)]


def _read_list(loc: Location) -> list[str]:
    try:
        with loc.fs.open(loc.path, "rb") as f:
            lines = [ln.strip() for ln in f.read().decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UserError(
            f"{loc.url()} is neither a shard (.tar), a folder, nor a text list of shard URLs (it is not text)"
        ) from None
    base = posixpath.dirname(loc.path)
    urls = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        if "://" in ln or os.path.isabs(ln) or ln.startswith(PIPE):  # pipe: runs a command: trusted lists only
            urls.append(ln)
        else:  # relative entries are relative to the list file
            urls.append(loc.url(posixpath.join(base, ln)))
    return urls


def _named(entries: list[tuple[str, int | None]]) -> list[ShardRef]:
    stems = [_stem(u) for u, _ in entries]
    unique = len(set(stems)) == len(stems)
    return [
        ShardRef(stem if unique else f"{i:06d}-{stem}", url, n, index=i)
        for i, ((url, n), stem) in enumerate(zip(entries, stems, strict=False))
    ]


def _stem(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in TAR_EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)]
    return base
