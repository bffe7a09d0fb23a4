"""The shard format every stage agrees on: names, keys, byte-for-byte reproducible tars, and reading
their members back with where each one lies."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

SHARD_DIGITS = 6
INDEX_DIGITS = 6
MAX_SHARD_SIZE = 10**INDEX_DIGITS - 1
COMMITS_DIR = "_commits"  # pack's per-shard commit markers, beside the shards
MANIFEST = "manifest.json"
BLOCK = 512  # tar's block and record sizes
RECORD = 20 * BLOCK
_MODE_OWNER = b"0000444\x00" + b"0000000\x00" * 2  # mode, uid, gid
_AFTER_SIZE = b"00000000000\x00"  # mtime 0


def shard_name(index: int) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}"


def sample_key(shard: int, index: int) -> str:
    """Synthetic, dot-free, fixed width: webdataset splits keys at the first dot, so the
    original file name can never be the key (it lives in the sample's .json instead)."""
    return f"{shard:0{SHARD_DIGITS}d}_{index:0{INDEX_DIGITS}d}"


def write_tar(out: BinaryIO, members: Iterable[tuple[str, bytes]]) -> None:
    """A plain ustar archive with every header field fixed, so equal input gives equal bytes: the
    same bytes as `tarfile` in USTAR format with mtime 0, mode 0444 and no owner, written without
    tarfile's per-member TarInfo copies and field validation (three times the cost of the I/O)."""
    written = 0
    for name, data in members:
        pad = -len(data) % BLOCK
        out.write(ustar_header(name, len(data)))
        out.write(data)
        out.write(bytes(pad))
        written += BLOCK + len(data) + pad
    written += 2 * BLOCK  # the end-of-archive blocks, then zeros to a whole record, as tar does
    out.write(bytes(2 * BLOCK + -written % RECORD))


def ustar_header(name: str, size: int) -> bytes:
    encoded = name.encode()
    if len(encoded) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} ({size} bytes) needs a longer header than ustar's")
    head = (
        encoded.ljust(100, b"\x00")
        + _MODE_OWNER
        + b"%011o\x00" % size
        + _AFTER_SIZE
        + b"        "
        + b"0"
        + bytes(100)
        + b"ustar\x0000"
        + bytes(64 + 16 + 155)
    ).ljust(BLOCK, b"\x00")
    checksum = b"%06o\x00 " % sum(head)  # counted with the checksum field as spaces, as the format says
    return head[:148] + checksum + head[156:]


def tar_members(stream, uncompressed: bool = True) -> Iterator[dict]:
    """Regular members of a tar stream as {"fname", "data", "offset"}, by webdataset's rules (its
    `__meta__` members skipped), plus where each member's bytes start in the file (`offset`; -1
    for a compressed tar) so that a thumbnail can later read one image by its byte range."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            name = info.name
            if not info.isreg() or not name or re.match(r"__[^/]*__($|/)", name):
                continue
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                continue
            data = tar.extractfile(info).read()
            yield {"fname": name, "data": data, "offset": info.offset_data if uncompressed else -1}
            tar.members = []  # stream mode: nothing to keep
