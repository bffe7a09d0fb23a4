"""FEATURES for the retrieval verbs: an extract output folder (its fts.npy, with keys and paths from
its chunks), another tool's embeddings folder (foreign.py: imported once, then read the same way),
or a bare `.npy` / `.pth` file of N×D vectors, on a local disk or a store. Rows are
read in blocks with plain file reads, never loaded whole, so memory stays flat whatever N is (a
memory map would do the same work but count every touched page in the process's resident memory).

On a store, the vector file is copied once to the local cache (storage.local_copy: exact
re-scoring reads rows in random order, a request per row as ranged reads); img_list.json, run.json
and the chunks' small columns are read where they are (Parquet columns by ranged reads)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.errors import UserError, first_line
from pipeline.outdir import CHUNKS, DIGEST_FILE, REMOVED_FILE, RUN_FILE, OutputNames, load_run
from pipeline.storage import Location, local_copy, locate

_HASH_BLOCK = 16 << 20
_WINDOW_BYTES = 16 << 20  # FeatureSet.take reads wanted rows a window of the file at a time
_DENSE_ROWS = 1000  # wanted rows in a window from which it is read whole (see FeatureSet._window)
_NAME_BATCH = 1 << 16  # rows of names a chunk is read in (see _batches)


@dataclass(frozen=True)
class FeatureSet:
    """N×D vectors on disk, and where known each row's key and source path."""

    source: str  # what the user named
    file: str  # the array file read
    n: int
    dim: int
    dtype: np.dtype
    offset: int  # bytes before row 0 in `file` (.npy header)
    folder: str | None  # the extract output folder, when FEATURES is one
    tensor: Any = None  # a .pth file's tensor, memory-mapped by torch
    rows_file: str | None = None  # another tool's folder: its rows' path, key and caption (foreign.py)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, in an array of their own (callers divide it in place)."""
        if self.tensor is not None:
            import torch

            return self.tensor[start:stop].to(torch.float32, copy=True).numpy()
        count = (stop - start) * self.dim
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * self.dim * self.dtype.itemsize)
            block = np.fromfile(f, dtype=self.dtype, count=count)
        if block.size != count:
            raise UserError(f"{self.file} is shorter than its header says ({self.n}×{self.dim}); it may be truncated")
        return block.reshape(stop - start, self.dim).astype(np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by index (any order, repeats allowed), as float32, with plain reads and never a
        memory map: gathering through a map faulted in whole page-cache folios, so 40,000 random
        rows of a 2.56 GB fts.npy (a tuning's re-ranking at 10M × 128) mapped 2.28 GB into the
        process (+30 MB with reads, 0.18 s against 0.07 s). The rows go in sorted order a window
        of the file at a time: a window holding many wanted rows (a training sample) is read
        whole in one call, sparse ones a row at a time. Memory: the output and one window."""
        rows = np.asarray(rows, np.int64)
        if self.tensor is not None:
            import torch

            return self.tensor[torch.from_numpy(rows)].float().numpy()
        out = np.empty((len(rows), self.dim), np.float32)
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= self.n):
            raise IndexError(f"rows outside 0..{self.n - 1} of {self.file}")
        width = self.dim * self.dtype.itemsize
        window = max(1, _WINDOW_BYTES // width)
        fd = os.open(self.file, os.O_RDONLY)
        try:
            i = 0
            while i < len(wanted):
                first = int(wanted[i])
                j = int(np.searchsorted(wanted, first + window, "left"))
                out[order[i:j]] = self._window(fd, first, wanted[i:j], width)
                i = j
        finally:
            os.close(fd)
        return out

    def _window(self, fd: int, first: int, rows: np.ndarray, width: int) -> np.ndarray:
        """`rows` (sorted, all within one window from `first`) read with one call when there are
        many of them (~_DENSE_ROWS per window: a read of a row costs ~4.6 us, a 16 MB window ~5 ms
        from the page cache), else one read each."""
        if len(rows) >= _DENSE_ROWS:
            span = int(rows[-1]) - first + 1
            data = os.pread(fd, span * width, self.offset + first * width)
            if len(data) != span * width:
                raise UserError(f"{self.file} is shorter than its header says ({self.n}×{self.dim})")
            return np.frombuffer(data, self.dtype).reshape(span, self.dim)[rows - first].astype(np.float32)
        block = np.empty((len(rows), self.dim), self.dtype)
        for i, r in enumerate(rows.tolist()):
            data = os.pread(fd, width, self.offset + r * width)
            if len(data) != width:
                raise UserError(f"{self.file} is shorter than its header says ({self.n}×{self.dim})")
            block[i] = np.frombuffer(data, self.dtype)
        return block.astype(np.float32)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the shape, type and every byte of the vectors: a result made from these
        features is reused only for the same bytes (a sample of rows once let a changed row through).
        Recorded by consolidation (digest.json) with the file's stamp (size and time, or a store's
        ETag): while the stamp holds, no byte is read; otherwise (a file changed behind featpipe's
        back, bare .npy/.pth files) one read of the file: 0.7 s for 1M × 384 float16 here."""
        return self.prefix_fingerprint(self.n)

    def prefix_fingerprint(self, n: int) -> str:
        """The fingerprint the first n rows would have on their own: grown features (extract after
        pack --relist) keep their earlier rows, which --update checks this way (recorded for the
        previous consolidation's row count, else hashed)."""
        return self._recorded.get(str(n)) or self.hash_rows(n)

    @cached_property
    def _recorded(self) -> dict[str, str]:
        """digest.json's fingerprints by row count, when its stamp is the vector file's now."""
        if self.rows_file is not None:  # hashed when imported, and the import is checked on each open
            from pipeline.retrieve.foreign import recorded_fingerprint

            recorded = recorded_fingerprint(os.path.dirname(self.rows_file))
            return {str(self.n): recorded} if recorded else {}
        if self.folder is None:
            return {}
        loc = locate(self.folder)
        expected = (self.n, self.dim, OutputNames().numpy_features)
        try:
            record = json.loads(loc.fs.cat_file(loc.join(DIGEST_FILE)))
            fresh = record["stamp"] == loc.fs.ukey(loc.join(record["file"]))
            if fresh and (record["n"], record["dim"], record["file"]) == expected:
                return dict(record["fingerprints"])
        except Exception:  # none (features from before it was written), unreadable, or the file gone
            pass
        return {}

    def hash_rows(self, n: int) -> str:
        """The fingerprint of the first n rows, from their bytes (what `featpipe verify` and a
        changed stamp fall back to)."""
        h = hashlib.sha256(f"{n}x{self.dim}:{self.dtype.str}".encode())
        if self.tensor is not None:
            import torch

            data = memoryview(self.tensor[:n].reshape(-1).view(torch.uint8).numpy())
            for start in range(0, len(data), _HASH_BLOCK):
                h.update(data[start : start + _HASH_BLOCK])
        else:
            with open(self.file, "rb") as f:
                f.seek(self.offset)
                left = n * self.dim * self.dtype.itemsize
                while left:
                    block = f.read(min(left, _HASH_BLOCK))
                    if not block:
                        raise UserError(f"{self.file} is shorter than its header says; it may be truncated")
                    h.update(block)
                    left -= len(block)
        return "sha256:" + h.hexdigest()

    @property
    def where(self) -> str:
        """FEATURES as a later command can find it again: an absolute path, or the URL."""
        return self.source if "://" in self.source else os.path.abspath(self.source)

    @cached_property
    def paths(self) -> list[str] | None:
        """Source paths in row order: img_list.json, else (a copy without it) the chunks' path column."""
        if self.folder is None or not self._has_img_list:
            return self._chunk_columns.get("path")
        img_list = OutputNames().img_list
        loc = locate(self.folder)
        with loc.fs.open(loc.join(img_list), "rb") as f:
            paths = json.loads(f.read())
        if len(paths) != self.n:
            raise UserError(f"{self.folder}: {img_list} lists {len(paths)} paths for {self.n} rows")
        return paths

    @cached_property
    def _has_img_list(self) -> bool:
        loc = locate(self.folder)
        return loc.fs.exists(loc.join(OutputNames().img_list))

    @cached_property
    def removed(self) -> np.ndarray:
        """Rows whose source file is gone (OUT/removed.json, from pack --relist): never searched,
        never returned. Empty for bare arrays and for runs before featpipe recorded removals."""
        if self.folder is None:
            return np.zeros(0, np.int64)
        loc = locate(self.folder)
        path = loc.join(REMOVED_FILE)
        if not loc.fs.exists(path):
            return np.zeros(0, np.int64)
        with loc.fs.open(path, "rb") as f:
            rows = np.asarray(json.loads(f.read())["rows"], np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise UserError(f"{self.folder}: {REMOVED_FILE} names rows outside 0..{self.n - 1}; consolidate again")
        return rows

    @cached_property
    def removed_digest(self) -> dict:
        """Which rows are removed, in a line (a record made before a removal is told by it): their
        count and the SHA-256 of their row numbers. The numbers themselves stay in removed.json."""
        return {"count": len(self.removed), "sha256": hashlib.sha256(self.removed.astype("<i8").tobytes()).hexdigest()}

    @property
    def keys(self) -> list[str] | None:
        """Sample keys in row order, from the chunks."""
        return self._chunk_columns.get("key")

    @property
    def sizes(self) -> list[tuple[int, int]] | None:
        """Each image's upright (width, height), from the chunks (None for bare arrays and for
        chunks written before featpipe recorded sizes)."""
        cols = self._chunk_columns
        if "width" not in cols:
            return None
        return list(zip(cols["width"], cols["height"], strict=True))

    @property
    def members(self) -> list[tuple[int, int]] | None:
        """Each image's (offset, length) in its uncompressed tar shard, offset -1 where unknown
        (None for bare arrays and for chunks written before featpipe recorded them)."""
        cols = self._chunk_columns
        if "offset" not in cols:
            return None
        return list(zip(cols["offset"], cols["length"], strict=True))

    @property
    def captions(self) -> list[str | None] | None:
        """Each row's caption (.txt) where extract kept one, from the chunks (None: no chunk has one)."""
        return self._chunk_columns.get("caption")

    @property
    def shards(self) -> list[str] | None:
        """Each row's shard name, from the chunks."""
        return self._chunk_columns.get("shard")

    def chunk_blocks(self, wanted: tuple[str, ...]):
        """The chunks' `wanted` columns that exist, in row order, at most _NAME_BATCH rows at a
        time: {name: list} per batch (memory: one batch's Python values, not a shard's)."""
        import pyarrow.parquet as pq

        from pipeline.outdir import read_done

        if self.rows_file is not None:  # another tool's folder, imported: its rows in blocks
            yield from _batches(pq.ParquetFile(self.rows_file, pre_buffer=False), wanted)
            return
        out = locate(self.folder)
        for shard in load_run(out).shard_names:
            if not read_done(out, shard).rows:
                continue
            with out.fs.open(out.join(CHUNKS, f"{shard}.parquet"), "rb") as f:
                yield from _batches(pq.ParquetFile(f, pre_buffer=False), wanted)  # see chunks.read_parquet

    @cached_property
    def _chunk_columns(self) -> dict[str, list]:
        """key, shard, width, height, offset, length and caption in row order, from the chunks'
        small columns alone."""
        if self.folder is None and self.rows_file is None:
            return {}
        wanted = ("key", "shard", "width", "height", "offset", "length", "caption")
        # an extract's paths are its img_list.json; a copy without it reads them with the rest, in one pass
        wanted += ("path",) if self.rows_file or not self._has_img_list else ()
        columns: dict[str, list] = {name: [] for name in wanted}
        total = 0
        for block in self.chunk_blocks(wanted):
            count = len(block["key"])
            total += count
            for name in wanted:  # None where a chunk lacks the column (earlier featpipes; no captions)
                columns[name].extend(block.get(name, [None] * count))
        columns = {name: values for name, values in columns.items() if any(v is not None for v in values)}
        if total != self.n:
            raise UserError(
                f"{self.folder or self.source}: its rows hold {total} names, its features {self.n} vectors; "
                "run `featpipe consolidate` again"
            )
        for pair in (("width", "height"), ("offset", "length")):  # all or nothing: missing from old chunks
            if pair[0] in columns and None in columns[pair[0]]:
                for name in pair:
                    del columns[name]
        return columns


def removed_count(record: dict) -> int:
    """How many rows were removed from the source when a result (match-plan.json, match.json,
    index.json) was written: its `removed` digest, or the `removed_rows` list of featpipe before."""
    return record["removed"]["count"] if "removed" in record else len(record.get("removed_rows", []))


def open_features(spec: str | os.PathLike) -> FeatureSet:
    """FEATURES as the user gave it; one clear line when it is not usable."""
    spec = os.fspath(spec)
    loc = locate(spec)
    if not loc.is_local:
        return _from_store(spec, loc)
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, RUN_FILE)):
            return _foreign(spec, loc)
        fts = os.path.join(spec, OutputNames().numpy_features)
        if not os.path.exists(fts):
            raise UserError(f"{spec} has no {OutputNames().numpy_features}; run `featpipe consolidate {spec}` first")
        return _from_npy(spec, fts, folder=spec)
    if not os.path.exists(spec):
        raise UserError(f"features not found: {spec}")
    if spec.endswith(".pth") or spec.endswith(".pt"):
        return _from_pth(spec, spec)
    return _from_npy(spec, spec, folder=None)


def _from_store(spec: str, loc: Location) -> FeatureSet:
    """The same checks as for a local FEATURES, then the vector file from the local cache."""
    try:
        is_dir = loc.fs.isdir(loc.path)
        if is_dir:
            if not loc.fs.exists(loc.join(RUN_FILE)):
                return _foreign(spec, loc)
            fts = loc.join(OutputNames().numpy_features)
            if not loc.fs.exists(fts):
                raise UserError(
                    f"{spec} has no {OutputNames().numpy_features}; run `featpipe consolidate {spec}` first"
                )
            return _from_npy(spec, local_copy(loc.fs, fts), folder=spec)
        if not loc.fs.exists(loc.path):
            raise UserError(f"features not found: {spec}")
        local = local_copy(loc.fs, loc.path)
    except (UserError, PermissionError):
        raise
    except FileNotFoundError:
        raise UserError(f"features not found: {spec}") from None
    if spec.endswith((".pth", ".pt")):
        return _from_pth(spec, local)
    return _from_npy(spec, local, folder=None)


def _foreign(spec: str, loc: Location) -> FeatureSet:
    """Another tool's embeddings folder (foreign.py), through its import in the local cache."""
    from pipeline.retrieve import foreign

    if foreign.detect(loc) is None:
        raise UserError(
            f"{spec} is a folder but not a featpipe extract output (no {RUN_FILE}) nor embeddings "
            "(img_emb/*.npy + metadata/*.parquet, or Parquet files with an embedding column); give the output "
            "folder of `featpipe extract`, or a .npy / .pth file"
        )
    cache = foreign.imported(spec)
    fs = _from_npy(spec, os.path.join(cache, foreign.VECTORS_FILE), folder=None)
    return replace(fs, rows_file=os.path.join(cache, foreign.ROWS_FILE))


def features_exist(spec: str) -> bool:
    """Whether FEATURES recorded by an earlier command (a path or URL) is still there."""
    loc = locate(spec)
    try:
        return loc.fs.exists(loc.path)
    except Exception:  # an unreachable store: treated as gone, as a moved folder is
        return False


def _from_npy(source: str, path: str, folder: str | None) -> FeatureSet:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except Exception as exc:
        raise UserError(f"{path} is not a readable .npy file: {first_line(exc)}") from None
    return _checked(
        FeatureSet(source, path, *_shape(path, shape), dtype, offset, folder), fortran, os.path.getsize(path)
    )


def _from_pth(source: str, path: str) -> FeatureSet:
    """A torch tensor file, memory-mapped by torch (weights_only: a pickle in it is never run)."""
    import torch

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise UserError(f"{source} is not a readable tensor file: {first_line(exc)}") from None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise UserError(f"{source} holds {what}, not a float tensor of features")
    n, dim = _shape(path, tuple(tensor.shape))
    dtype = np.dtype(np.float16 if tensor.dtype == torch.float16 else np.float32)
    return FeatureSet(source, path, n, dim, dtype, 0, None, tensor.detach().contiguous())  # saved with requires_grad


def _shape(path: str, shape: tuple) -> tuple[int, int]:
    if len(shape) != 2:
        raise UserError(f"{path} holds an array of shape {shape}; features must be N×D")
    if shape[1] == 0:
        raise UserError(f"{path} holds {shape[0]} vectors of 0 dimensions: nothing to compare")
    return int(shape[0]), int(shape[1])


def _checked(fs: FeatureSet, fortran: bool, size: int) -> FeatureSet:
    if fs.dtype.kind != "f" or fs.dtype.itemsize not in (2, 4):
        raise UserError(f"{fs.file} holds {fs.dtype} values; features must be float16 or float32")
    if fortran:
        raise UserError(f"{fs.file} is stored column-major; save it row-major (np.ascontiguousarray)")
    if size < fs.offset + fs.n * fs.dim * fs.dtype.itemsize:
        raise UserError(f"{fs.file} is shorter than its header says ({fs.n}×{fs.dim}); it may be truncated")
    return fs


def require_vectors(fs: FeatureSet) -> None:
    """A search needs something to search: one line for an empty FEATURES (not "k must be 1 to 0")."""
    if fs.n == 0:
        raise UserError(f"{fs.source} holds no vectors (0×{fs.dim})")


def _batches(chunk, wanted: tuple[str, ...]):
    """A Parquet file's `wanted` columns that exist, as Python lists of _NAME_BATCH rows: with a
    whole 500k-row shard's keys, paths and numbers as lists, index's phase that writes rows/ (with
    tuning's truth and training) peaked at 1,022 MB for 50M rows; 676 MB in batches."""
    names = [c for c in wanted if c in chunk.schema_arrow.names]
    for batch in chunk.iter_batches(_NAME_BATCH, columns=names, use_threads=False):
        yield {name: batch.column(name).to_pylist() for name in names}
