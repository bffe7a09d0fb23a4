"""The shard format every stage agrees on: names, keys, and byte-for-byte reproducible tars."""

from __future__ import annotations

import io
import tarfile
from typing import BinaryIO, Iterable

SHARD_DIGITS = 6
INDEX_DIGITS = 6
MAX_SHARD_SIZE = 10**INDEX_DIGITS - 1
COMMITS_DIR = "_commits"  # pack's per-shard commit markers, beside the shards
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}"


def sample_key(shard: int, index: int) -> str:
    """Synthetic, dot-free, fixed width: webdataset splits keys at the first dot, so the
    original file name can never be the key (it lives in the sample's .json instead)."""
    return f"{shard:0{SHARD_DIGITS}d}_{index:0{INDEX_DIGITS}d}"


def write_tar(out: BinaryIO, members: Iterable[tuple[str, bytes]]) -> None:
    """A plain ustar archive with every header field fixed, so equal input gives equal bytes."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
