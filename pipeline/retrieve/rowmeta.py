"""Row metadata on demand (issue 31): each row's key and path read by row number, and a key or path
turned into its row, without loading every name. This module owns the layout of INDEX/rows/:

    key.offsets.npy, path.offsets.npy   uint64 (N + 1,): row r's UTF-8 bytes are [off[r], off[r+1])
    key.bytes, path.bytes               the names, back to back (a null name is empty)
    lookup.hash.npy, lookup.row.npy     every key's and path's hash, sorted, and its row

All are memory-mapped: a hit costs two offsets and its bytes; a name → row lookup hashes the name
(the first 8 bytes of its BLAKE2b), binary-searches lookup.hash.npy (log2(2N) probes: 31 at 1B rows; a
separate contiguous file, since numpy copies a strided array to search it: +3 MB at 200k rows)
and checks the row's own key and path, so a hash collision never answers a wrong row. Written once
by `featpipe index`, a shard's names at a time. Memory while writing: the hashes, 16 bytes per
name (the table is sorted in RAM: 32 GB at 1B rows, see the README's limits)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack

import numpy as np

from pipeline.errors import UserError
from pipeline.retrieve.features import FeatureSet
from pipeline.storage import Location, commit_file, local_copy, staging_file

FOLDER = "rows"
FIELDS = ("key", "path")
LOOKUP_HASH, LOOKUP_ROW = "lookup.hash.npy", "lookup.row.npy"
LOOKUP_DTYPE = np.dtype([("hash", "<u8"), ("row", "<i8")])
_BLOCK = 1 << 16  # rows of a bare array's null names written at a time


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def name_blocks(fs: FeatureSet) -> Iterator[tuple[list, list]]:
    """(keys, paths) a shard at a time in row order; nulls for a bare .npy / .pth."""
    if fs.folder is None:
        for start in range(0, fs.n, _BLOCK):
            count = min(_BLOCK, fs.n - start)
            yield [None] * count, [None] * count
        return
    rows = 0
    for block in fs.chunk_blocks(FIELDS):
        rows += len(block["key"])
        yield block["key"], block["path"]
    if rows != fs.n:
        raise UserError(
            f"{fs.folder}: its chunks hold {rows} rows, its features {fs.n}; run `featpipe consolidate` again"
        )


def write(out: Location, fs: FeatureSet, blocks: Iterable[tuple[list, list]]) -> None:
    """INDEX/rows/ from (keys, paths) blocks in row order; each file committed whole."""
    with tempfile.TemporaryDirectory(prefix="featpipe-rows-") as tmp, ExitStack() as files:
        offsets = {f: _offsets(os.path.join(tmp, f"{f}.offsets.npy"), fs.n) for f in FIELDS}
        data = {f: files.enter_context(open(os.path.join(tmp, f"{f}.bytes"), "wb")) for f in FIELDS}
        hashes, row = [], 0
        for keys, paths in blocks:
            for field, names in zip(FIELDS, (keys, paths), strict=True):
                encoded = [(n or "").encode() for n in names]
                ends = np.cumsum([len(e) for e in encoded], dtype=np.uint64)
                offsets[field][row + 1 : row + 1 + len(names)] = offsets[field][row] + ends
                data[field].write(b"".join(encoded))
                present = [(name_hash(n), row + i) for i, n in enumerate(names) if n]
                hashes.append(np.array(present, LOOKUP_DTYPE))
            row += len(keys)
        files.close()
        for arr in offsets.values():
            arr.flush()
        table = np.concatenate(hashes) if hashes else np.zeros(0, LOOKUP_DTYPE)
        table = table[np.argsort(table, order=("hash", "row"), kind="stable")]
        np.save(os.path.join(tmp, LOOKUP_HASH), np.ascontiguousarray(table["hash"]))
        np.save(os.path.join(tmp, LOOKUP_ROW), np.ascontiguousarray(table["row"]))
        del table
        for name in sorted(os.listdir(tmp)):
            final = out.join(FOLDER, name)
            staged = staging_file(out.fs, final)
            shutil.move(os.path.join(tmp, name), staged)  # across file systems too
            commit_file(out.fs, staged, final)


def _offsets(path: str, n: int) -> np.ndarray:
    arr = np.lib.format.open_memmap(path, "w+", "<u8", (n + 1,))
    arr[0] = 0
    return arr


def exists(loc: Location) -> bool:
    return loc.fs.exists(loc.join(FOLDER, LOOKUP_ROW))


class RowMeta:
    """INDEX/rows/ opened memory-mapped (a bucket's files copied to the local cache once)."""

    def __init__(self, loc: Location):
        def local(name: str) -> str:
            path = loc.join(FOLDER, name)
            return path if loc.is_local else local_copy(loc.fs, path)

        self.offsets = {f: np.load(local(f"{f}.offsets.npy"), mmap_mode="r") for f in FIELDS}
        self.data = {f: _bytes(local(f"{f}.bytes")) for f in FIELDS}
        self.hashes = np.load(local(LOOKUP_HASH), mmap_mode="r")
        self.rows = np.load(local(LOOKUP_ROW), mmap_mode="r")
        self.n = len(self.offsets["key"]) - 1

    def name(self, field: str, row: int) -> str | None:
        start, stop = int(self.offsets[field][row]), int(self.offsets[field][row + 1])
        return bytes(self.data[field][start:stop]).decode() if stop > start else None

    def names(self, rows: Iterable[int]) -> tuple[list, list]:
        rows = [int(r) for r in rows]
        return [self.name("key", r) for r in rows], [self.name("path", r) for r in rows]

    def row_of(self, name: str) -> int | None:
        """The row whose key is `name`, else whose path is (a key wins, as in the in-memory table)."""
        h = np.uint64(name_hash(name))
        lo, hi = np.searchsorted(self.hashes, h, "left"), np.searchsorted(self.hashes, h, "right")
        rows = sorted(int(r) for r in self.rows[lo:hi])
        for field in FIELDS:
            for r in rows:
                if self.name(field, r) == name:
                    return r
        return None


def _bytes(path: str) -> np.ndarray:
    """A file's bytes memory-mapped (an empty file has nothing to map)."""
    return np.memmap(path, np.uint8, "r") if os.path.getsize(path) else np.zeros(0, np.uint8)
