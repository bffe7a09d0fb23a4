"""Row metadata on demand (issue 31): each row's key, path, caption and where its image lies
(shard, byte range in the tar) read by row number, and a key or path turned into its row, without
loading every name. This module owns the layout of INDEX/rows/:

    {key,path,shard,caption}.offsets.npy  uint64 (N + 1,): row r's UTF-8 bytes are [off[r], off[r+1])
    {key,path,shard,caption}.bytes        the texts, back to back (a null one is empty; indexes of
                                          earlier featpipes have no caption files: no captions)
    offset.npy, length.npy              int64 (N,): the image's bytes in its tar (-1: unknown)
    lookup.hash.npy, lookup.row.npy     every key's and path's hash, sorted, and its row
    lookup.fence.npy                    uint64: every FENCE-th sorted hash (1/512 of the table)

All are memory-mapped: a hit costs two offsets and its bytes; a name → row lookup hashes the name
(the first 8 bytes of its BLAKE2b), binary-searches the fence (read whole at open: 1.6 MB at 50M
rows) for its block of FENCE hashes, then that block of lookup.hash.npy (a separate contiguous file,
since numpy copies a strided array to search it: +3 MB at 200k rows), and checks the row's own key
and path, so a hash collision never answers a wrong row. Written once by `featpipe index`, a
shard's names at a time. Memory while writing: one shard's names, and one
bucket of the lookup table (_Lookup: it is sorted a bucket at a time, ~128 MB)."""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError
from pipeline.retrieve.features import FeatureSet
from pipeline.storage import Location, commit_file, local_copy, npy_appender, staging_file

FOLDER = "rows"
FIELDS = ("key", "path", "shard", "caption")  # text, read by row
NUMBERS = ("offset", "length")  # int64, read by row
LOOKUP_FIELDS = ("key", "path")  # the names a row is found by
LOOKUP_HASH, LOOKUP_ROW, LOOKUP_FENCE = "lookup.hash.npy", "lookup.row.npy", "lookup.fence.npy"
# A cold lookup is page faults: a binary search over the whole 800 MB table of 50M rows touched ~27
# pages, p99 22 ms on a page cache the build had just filled; a fence in memory leaves the one or
# two pages of one block.
FENCE = 512
LOOKUP_DTYPE = np.dtype([("hash", "<u8"), ("row", "<i8")])
_BLOCK = 1 << 16  # rows of a bare array's null names written at a time
_BUCKET_BYTES = 128 << 20  # (hash, row) pairs sorted at a time while writing the lookup table


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class RowPlace:
    """Where a row's picture is: its shard, key, byte range in the tar (-1 unknown) and path; and
    its caption."""

    shard: str | None
    key: str | None
    offset: int
    length: int
    path: str | None
    caption: str | None = None


def row_blocks(fs: FeatureSet) -> Iterator[dict[str, list]]:
    """FIELDS and NUMBERS a shard at a time in row order (nulls and -1 for a bare .npy / .pth, and
    for columns chunks of earlier featpipes lack)."""
    if fs.folder is None and fs.rows_file is None:
        for start in range(0, fs.n, _BLOCK):
            count = min(_BLOCK, fs.n - start)
            yield {**{f: [None] * count for f in FIELDS}, "offset": [-1] * count, "length": [0] * count}
        return
    rows = 0
    for block in fs.chunk_blocks(FIELDS + NUMBERS):
        count = len(block["key"])
        rows += count
        yield {
            **{f: block.get(f, [None] * count) for f in FIELDS},
            "offset": block.get("offset", [-1] * count),
            "length": block.get("length", [0] * count),
        }
    if rows != fs.n:
        raise UserError(
            f"{fs.folder or fs.source}: its rows hold {rows} names, its features {fs.n} vectors; "
            "run `featpipe consolidate` again"
        )


def write(out: Location, fs: FeatureSet, blocks: Iterable[dict[str, list]]) -> None:
    """INDEX/rows/ from row_blocks' blocks; each file committed whole. Every file is appended to
    with plain writes: memory-mapped outputs kept their dirty pages in the process (1.2 GB of RSS
    at 10M rows)."""
    with tempfile.TemporaryDirectory(prefix="featpipe-rows-") as tmp, ExitStack() as files:
        offsets = {
            f: files.enter_context(npy_appender(os.path.join(tmp, f"{f}.offsets.npy"), "<u8", (fs.n + 1,)))
            for f in FIELDS
        }
        numbers = {f: files.enter_context(npy_appender(os.path.join(tmp, f"{f}.npy"), "<i8", (fs.n,))) for f in NUMBERS}
        data = {f: files.enter_context(open(os.path.join(tmp, f"{f}.bytes"), "wb")) for f in FIELDS}
        lookup = files.enter_context(_Lookup(os.path.join(tmp, "buckets"), 2 * fs.n))
        ends = dict.fromkeys(FIELDS, 0)  # bytes written so far per text field
        for f in FIELDS:
            offsets[f].write(np.zeros(1, "<u8").tobytes())
        row = 0
        for block in blocks:
            count = len(block["key"])
            for field in FIELDS:
                encoded = [(n or "").encode() for n in block[field]]
                cumulative = ends[field] + np.cumsum([len(e) for e in encoded], dtype=np.uint64)
                offsets[field].write(cumulative.astype("<u8").tobytes())
                ends[field] = int(cumulative[-1]) if count else ends[field]
                data[field].write(b"".join(encoded))
            for field in NUMBERS:
                numbers[field].write(np.asarray(block[field], "<i8").tobytes())
            for field in LOOKUP_FIELDS:
                lookup.add(np.array([(name_hash(n), row + i) for i, n in enumerate(block[field]) if n], LOOKUP_DTYPE))
            row += count
        if row != fs.n:
            raise UserError(f"{fs.source}: {row} rows of names for {fs.n} vectors")
        lookup.finish(*(os.path.join(tmp, name) for name in (LOOKUP_HASH, LOOKUP_ROW, LOOKUP_FENCE)))
        files.close()
        for name in sorted(os.listdir(tmp)):
            if name == "buckets":
                continue
            final = out.join(FOLDER, name)
            staged = staging_file(out.fs, final)
            shutil.move(os.path.join(tmp, name), staged)  # across file systems too
            commit_file(out.fs, staged, final)


class _Lookup:
    """The name → row table sorted without holding it: (hash, row) pairs go to 2^b bucket files by
    their hash's top b bits (the hashes are uniform), then each bucket is sorted alone and appended,
    in bucket order, which is hash order: the same bytes as one sort of everything. Memory: one
    bucket (~_BUCKET_BYTES and its sort), not 16 bytes per name (32 GB at 1B rows)."""

    def __init__(self, folder: str, most: int):
        os.makedirs(folder)
        self.bits = max(0, math.ceil(math.log2(max(1, most * LOOKUP_DTYPE.itemsize) / _BUCKET_BYTES)))
        self.paths = [os.path.join(folder, f"{b:05d}") for b in range(1 << self.bits)]
        self.files = [open(p, "wb") for p in self.paths]  # noqa: SIM115  (closed by finish or __exit__)

    def add(self, pairs: np.ndarray) -> None:
        if not self.bits:
            self.files[0].write(pairs.tobytes())
            return
        bucket = (pairs["hash"] >> np.uint64(64 - self.bits)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        ends = np.cumsum(np.bincount(bucket, minlength=len(self.files)))
        for b, part in enumerate(np.split(pairs[order], ends[:-1])):
            if len(part):
                self.files[b].write(part.tobytes())

    def finish(self, hash_path: str, row_path: str, fence_path: str) -> None:
        for f in self.files:
            f.close()
        total = sum(os.path.getsize(p) for p in self.paths) // LOOKUP_DTYPE.itemsize
        fence, done = [], 0
        with npy_appender(hash_path, "<u8", (total,)) as hashes, npy_appender(row_path, "<i8", (total,)) as rows:
            for path in self.paths:
                part = np.fromfile(path, LOOKUP_DTYPE)
                os.remove(path)
                part = part[np.lexsort((part["row"], part["hash"]))]
                hashes.write(np.ascontiguousarray(part["hash"]).tobytes())
                rows.write(np.ascontiguousarray(part["row"]).tobytes())
                fence.append(part["hash"][-done % FENCE :: FENCE].copy())  # a view would hold the bucket
                done += len(part)
        np.save(fence_path, np.concatenate([np.zeros(0, "<u8"), *fence]).astype("<u8"))

    def __enter__(self) -> _Lookup:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files:
            f.close()


def exists(loc: Location) -> bool:
    return loc.fs.exists(loc.join(FOLDER, LOOKUP_ROW)) and loc.fs.exists(loc.join(FOLDER, "offset.npy"))


class RowMeta:
    """INDEX/rows/ opened memory-mapped (a bucket's files copied to the local cache once)."""

    def __init__(self, loc: Location):
        def local(name: str) -> str:
            path = loc.join(FOLDER, name)
            return path if loc.is_local else local_copy(loc.fs, path)

        present = [f for f in FIELDS if f != "caption" or loc.fs.exists(loc.join(FOLDER, "caption.bytes"))]
        self.offsets = {f: _npy_mapped(local(f"{f}.offsets.npy")) for f in present}
        self.numbers = {f: _npy_mapped(local(f"{f}.npy")) for f in NUMBERS}
        self.data = {f: _mapped(local(f"{f}.bytes")) for f in present}
        self.hashes = _npy_mapped(local(LOOKUP_HASH))
        self.rows = _npy_mapped(local(LOOKUP_ROW))
        has_fence = loc.fs.exists(loc.join(FOLDER, LOOKUP_FENCE))  # indexes of earlier featpipes have none
        self.fence = np.load(local(LOOKUP_FENCE)) if has_fence else None
        self.n = len(self.offsets["key"]) - 1

    def name(self, field: str, row: int) -> str | None:
        if field not in self.offsets:
            return None
        start, stop = int(self.offsets[field][row]), int(self.offsets[field][row + 1])
        return bytes(self.data[field][start:stop]).decode() if stop > start else None

    def names(self, rows: Iterable[int]) -> tuple[list, list, list]:
        """(keys, paths, captions) of these rows."""
        rows = [int(r) for r in rows]
        return tuple([self.name(f, r) for r in rows] for f in ("key", "path", "caption"))

    def places(self, rows: Iterable[int]) -> dict[int, RowPlace]:
        return {
            int(r): RowPlace(
                self.name("shard", r),
                self.name("key", r),
                int(self.numbers["offset"][r]),
                int(self.numbers["length"][r]),
                self.name("path", r),
                self.name("caption", r),
            )
            for r in rows
        }

    def row_of(self, name: str) -> int | None:
        """The row whose key is `name`, else whose path is (a key wins, as in the in-memory table)."""
        h = np.uint64(name_hash(name))
        start, stop = self._block(h)
        block = self.hashes[start:stop]
        lo, hi = start + np.searchsorted(block, h, "left"), start + np.searchsorted(block, h, "right")
        rows = sorted(int(r) for r in self.rows[lo:hi])
        for field in LOOKUP_FIELDS:
            for r in rows:
                if self.name(field, r) == name:
                    return r
        return None

    def _block(self, h: np.uint64) -> tuple[int, int]:
        """The slice of the sorted hashes that holds every copy of h: fence[i] is hashes[i·FENCE],
        so the first copy lies after the last fence post below h, the last before the first above."""
        if self.fence is None:
            return 0, len(self.hashes)
        below, upto = np.searchsorted(self.fence, h, "left"), np.searchsorted(self.fence, h, "right")
        return max(0, (int(below) - 1) * FENCE), min(len(self.hashes), int(upto) * FENCE)


def _mapped(path: str, dtype: str = "u1", offset: int = 0, count: int = -1) -> np.ndarray:
    """A file's values memory-mapped without read-around: a fault reads its page, not the
    device's readahead window (8 MB on this machine's disk: cold name → row lookups at 50M rows
    took p99 37–73 ms, reading ~8 MB per page they touched, on a disk that reads 4 KB in 0.1 ms)."""
    if os.path.getsize(path) <= offset:  # an empty file has nothing to map
        return np.zeros(0, dtype)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype, count, offset)


def _npy_mapped(path: str) -> np.ndarray:
    """A 1-d .npy file's values, mapped as _mapped does."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        offset = f.tell()
    return _mapped(path, dtype, offset, int(np.prod(shape)))
