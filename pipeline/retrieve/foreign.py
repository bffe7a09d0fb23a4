"""Other tools' embeddings as FEATURES (issue 30 item 5). This module owns their layouts and hands
the retrieval verbs what they already take: a FeatureSet (vectors in one .npy) with each row's
path, key and caption.

    embedding-reader / clip-retrieval   FOLDER/img_emb/*.npy (else FOLDER/*.npy), with
                                        FOLDER/metadata/*.parquet: files paired in sorted name order,
                                        embedding-reader's, so row numbers are autofaiss's ids
    Parquet                             FOLDER/*.parquet with an embedding column (a list of floats:
                                        the only such column, else --embedding-column)

A row's path is the `--path-column`, else the first of image_path, path, url, filepath; its caption
the `caption` (or `text`) column and its key the `key` column where present.

A folder is imported once into the local cache ($FEATPIPE_CACHE/foreign/…): fts.npy (the vectors
back to back, float16 kept as float16), rows.parquet (path, key, caption) and source.json (the
files' stamps, the columns used, the vectors' fingerprint, so they are hashed once). Later opens
reuse it while the stamps hold, with the columns chosen then; a file added, changed or removed
imports again. Memory while importing: one block of rows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError, first_line
from pipeline.storage import Location, cache_root, locate, npy_appender

PATH_COLUMNS = ("image_path", "path", "url", "filepath")
CAPTION_COLUMNS = ("caption", "text")
ROWS_FILE, VECTORS_FILE, SOURCE_FILE = "rows.parquet", "fts.npy", "source.json"
_BLOCK = 1 << 16  # rows read and written at a time


@dataclass(frozen=True)
class Columns:
    """The columns a Parquet layout is read by (None: found as the module docstring says)."""

    embedding: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class Layout:
    kind: str  # "npy" (embedding-reader) or "parquet"
    vectors: list[str]  # .npy files, or the Parquet files holding the embeddings
    tables: list[str]  # the Parquet files holding the rows' metadata (the same files for "parquet")


def detect(loc: Location) -> Layout | None:
    """The foreign layout of a folder, or None when it holds none."""
    fs = loc.fs
    emb = loc.join("img_emb")
    vectors = sorted(fs.glob(emb + "/**/*.npy")) if fs.isdir(emb) else sorted(fs.glob(loc.join("*.npy")))
    if vectors:
        meta = loc.join("metadata")
        tables = sorted(fs.glob(meta + "/**/*.parquet")) if fs.isdir(meta) else []
        if tables and len(tables) != len(vectors):
            raise UserError(
                f"{loc.url()}: {len(vectors)} .npy files but {len(tables)} metadata .parquet files; "
                "embedding-reader pairs them one to one"
            )
        return Layout("npy", vectors, tables)
    tables = sorted(fs.glob(loc.join("*.parquet")))
    return Layout("parquet", tables, tables) if tables else None


def imported(spec: str, columns: Columns | None = None) -> str:
    """The cache folder holding FOLDER's import, made or refreshed as needed. `columns` None: the
    ones chosen at the last import (or found). Ranks on one machine take turns (a file lock): the
    first imports, the others find it done."""
    loc = locate(spec)
    layout = detect(loc)
    if layout is None:
        raise UserError(f"{spec} holds no featpipe output, .npy embeddings or Parquet files")
    cache = os.path.join(cache_root(), "foreign", hashlib.sha256(loc.url().encode()).hexdigest()[:32])
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamps = [loc.fs.ukey(p) for p in (*layout.vectors, *layout.tables)]
        previous = _read_source(cache)
        if columns is None:
            columns = Columns(**previous["columns"]) if previous else Columns()
        if not (previous and previous["stamps"] == stamps and previous["columns"] == asdict(columns)):
            _import(loc, layout, columns, stamps, cache)
    return cache


def _import(loc: Location, layout: Layout, columns: Columns, stamps: list[str], cache: str) -> None:
    staged = tempfile.mkdtemp(dir=os.path.dirname(cache), prefix=".tmp-")
    try:
        reader = _Npy(loc, layout, columns) if layout.kind == "npy" else _Parquet(loc, layout, columns)
        fingerprint = reader.write(staged)
        record = {"source": loc.url(), "stamps": stamps, "columns": asdict(columns), "fingerprint": fingerprint}
        with open(os.path.join(staged, SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(staged, cache)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def recorded_fingerprint(cache: str) -> str | None:
    source = _read_source(cache)
    return source["fingerprint"] if source else None


def _read_source(cache: str) -> dict | None:
    try:
        with open(os.path.join(cache, SOURCE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _Writer:
    """fts.npy and rows.parquet of an import, a block at a time, with the vectors' fingerprint
    (features.py's: SHA-256 of shape, type and bytes)."""

    def __init__(self, folder: str, n: int, dim: int, dtype: np.dtype):
        # appended, not filled through a memory map: that kept every written page in the process
        self.dtype, self.n = np.dtype(dtype), n
        self.fts = npy_appender(os.path.join(folder, VECTORS_FILE), self.dtype.str, (n, dim))
        self.rows = pq.ParquetWriter(os.path.join(folder, ROWS_FILE), _ROWS_SCHEMA, compression="zstd")
        self.digest = hashlib.sha256(f"{n}x{dim}:{self.dtype.str}".encode())
        self.at = 0

    def add(self, vectors: np.ndarray, names: dict[str, list]) -> None:
        block = np.ascontiguousarray(vectors, self.dtype)
        self.fts.write(block.tobytes())
        self.digest.update(memoryview(block).cast("B"))
        count = len(vectors)
        arrays = [pa.array(names.get(f.name) or [None] * count, pa.string()) for f in _ROWS_SCHEMA]
        self.rows.write_table(pa.Table.from_arrays(arrays, schema=_ROWS_SCHEMA))
        self.at += count

    def close(self) -> str:
        self.rows.close()
        self.fts.close()
        if self.at != self.n:
            raise UserError(f"the files listed {self.n} rows but held {self.at}")
        return "sha256:" + self.digest.hexdigest()


_ROWS_SCHEMA = pa.schema([("path", pa.string()), ("key", pa.string()), ("caption", pa.string())])


def _names(table: pa.Table, path: str | None) -> dict[str, list]:
    """A metadata block's path, key and caption columns, as lists (absent ones left out)."""
    names = table.column_names
    chosen = {
        "path": path if path else next((c for c in PATH_COLUMNS if c in names), None),
        "key": "key" if "key" in names else None,
        "caption": next((c for c in CAPTION_COLUMNS if c in names), None),
    }
    return {k: [None if v is None else str(v) for v in table.column(c).to_pylist()] for k, c in chosen.items() if c}


class _Npy:
    """embedding-reader's npy (+ metadata parquet) layout."""

    def __init__(self, loc: Location, layout: Layout, columns: Columns):
        self.fs, self.layout, self.path_column = loc.fs, layout, columns.path
        self.headers = [self._header(p) for p in layout.vectors]

    def _header(self, path: str) -> tuple[int, int, np.dtype, int]:
        try:
            with self.fs.open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                offset = f.tell()
        except Exception as exc:
            raise UserError(f"{path} is not a readable .npy file: {first_line(exc)}") from None
        if len(shape) != 2 or fortran or dtype.kind != "f":
            raise UserError(f"{path} holds a {shape} {dtype} array; embeddings must be N×D float, row-major")
        return shape[0], shape[1], dtype, offset

    def write(self, folder: str) -> str:
        dims = {h[1] for h in self.headers}
        if len(dims) != 1:
            raise UserError(f"the .npy files disagree on the embedding size: {sorted(dims)}")
        dtype = np.dtype(np.float16) if all(h[2] == np.float16 for h in self.headers) else np.dtype(np.float32)
        out = _Writer(folder, sum(h[0] for h in self.headers), dims.pop(), dtype)
        for i, (path, (n, dim, src_type, offset)) in enumerate(zip(self.layout.vectors, self.headers, strict=True)):
            meta = self._metadata(i, n)
            with self.fs.open(path, "rb") as f:
                f.seek(offset)
                for start in range(0, n, _BLOCK):
                    count = min(_BLOCK, n - start)
                    block = np.frombuffer(f.read(count * dim * src_type.itemsize), src_type)
                    if block.size != count * dim:
                        raise UserError(f"{path} is shorter than its header says ({n}×{dim})")
                    out.add(block.reshape(count, dim), {k: v[start : start + count] for k, v in meta.items()})
        return out.close()

    def _metadata(self, i: int, n: int) -> dict[str, list]:
        if not self.layout.tables:
            return {}
        path = self.layout.tables[i]
        with self.fs.open(path, "rb") as f:
            table = pq.read_table(f, use_threads=False, pre_buffer=False)  # see chunks.read_parquet
        if len(table) != n:
            raise UserError(f"{path} has {len(table)} rows for the {n} vectors of {self.layout.vectors[i]}")
        if self.path_column and self.path_column not in table.column_names:
            raise UserError(f"{path} has no column {self.path_column!r} (it has {', '.join(table.column_names)})")
        return _names(table, self.path_column)


class _Parquet:
    """Parquet files with an embedding column."""

    def __init__(self, loc: Location, layout: Layout, columns: Columns):
        self.fs, self.layout, self.columns = loc.fs, layout, columns
        with self.fs.open(layout.tables[0], "rb") as f:
            schema = pq.read_schema(f)
        self.embedding = columns.embedding or _embedding_column(schema, layout.tables[0])
        for name in (self.embedding, columns.path):
            if name and name not in schema.names:
                raise UserError(f"{layout.tables[0]} has no column {name!r} (it has {', '.join(schema.names)})")
        half = pa.types.is_float16(schema.field(self.embedding).type.value_type)
        self.dtype = np.dtype(np.float16 if half else np.float32)

    def write(self, folder: str) -> str:
        n, dim = 0, None
        for path in self.layout.tables:
            with self.fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f, pre_buffer=False).metadata
                n += meta.num_rows
        out = None
        for path in self.layout.tables:
            with self.fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(_BLOCK, use_threads=False):
                    table = pa.Table.from_batches([batch])
                    vectors = _matrix(table.column(self.embedding).combine_chunks(), path)
                    dim = dim or vectors.shape[1]
                    if vectors.shape[1] != dim:
                        raise UserError(f"{path}: embeddings of {vectors.shape[1]} values after ones of {dim}")
                    out = out or _Writer(folder, n, dim, self.dtype)
                    out.add(vectors, _names(table, self.columns.path))
        if out is None:
            raise UserError(f"the Parquet files under {os.path.dirname(self.layout.tables[0])} hold no rows")
        return out.close()


def _embedding_column(schema: pa.Schema, path: str) -> str:
    found = [
        f.name
        for f in schema
        if (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type) or pa.types.is_large_list(f.type))
        and pa.types.is_floating(f.type.value_type)
    ]
    if len(found) == 1:
        return found[0]
    if "embedding" in found:
        return "embedding"
    what = f"columns of floats: {', '.join(found)}" if found else "no column of float lists"
    raise UserError(f"{path} has {what}; name the embedding column with --embedding-column")


def _matrix(col: pa.Array, path: str) -> np.ndarray:
    """A list-of-floats column as an N×D array (every row the same length, no nulls)."""
    if col.null_count:
        raise UserError(f"{path}: {col.null_count} rows have no embedding")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        lengths = np.diff(col.offsets.to_numpy())
        if len(lengths) and (lengths != lengths[0]).any():
            raise UserError(f"{path}: embeddings of different lengths ({lengths.min()} to {lengths.max()} values)")
        width = int(lengths[0]) if len(lengths) else 0
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(col), width)
