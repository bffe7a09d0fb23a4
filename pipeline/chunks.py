"""The Parquet chunk format: one file per shard, columns key, path, shard, index, width, height
(the image's upright size), offset and length (where the image's bytes lie in an uncompressed
tar shard, -1 and 0 otherwise: a thumbnail reads one image by its byte range) and embedding (a
fixed-size list of float32, the column embedding-reader and autofaiss read)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SampleError, UserError, reason
from pipeline.extract import meta
from pipeline.outdir import CHUNKS, chunk_path
from pipeline.storage import Location, commit_bytes


@dataclass
class ShardRows:
    """A shard's embedded rows as they arrive, batch by batch, until its chunk is written."""

    shard: str
    keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # upright (width, height) of each image
    members: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of each image in its tar
    metas: list[dict] = field(default_factory=list)  # caption and .json fields of each sample
    features: list[np.ndarray] = field(default_factory=list)
    errors: list[SampleError] = field(default_factory=list)  # found on the device, beside the workers' own

    def add(
        self,
        keys: list[str],
        paths: list[str],
        indices: list[int],
        sizes: list[tuple[int, int]],
        feats: np.ndarray,
        members: list[tuple[int, int]] | None = None,
        metas: list[dict] | None = None,
    ) -> None:
        self.keys += keys
        self.paths += paths
        self.indices += indices
        self.sizes += sizes
        self.members += members or [(-1, 0)] * len(keys)
        self.metas += metas or [{}] * len(keys)
        self.features.append(feats)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int | None:
        return int(self.features[0].shape[1]) if self.features else None

    def matrix(self) -> np.ndarray:
        return np.concatenate(self.features).astype(np.float32, copy=False)


def chunk_table(rows: ShardRows) -> pa.Table:
    mat = rows.matrix()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa.float32()), mat.shape[1])
    return pa.table(
        {
            "key": rows.keys,
            "path": rows.paths,
            "shard": [rows.shard] * len(rows.keys),
            "index": pa.array(rows.indices, pa.int64()),
            "width": pa.array([w for w, _ in rows.sizes], pa.int32()),
            "height": pa.array([h for _, h in rows.sizes], pa.int32()),
            "offset": pa.array([o for o, _ in rows.members], pa.int64()),
            "length": pa.array([n for _, n in rows.members], pa.int64()),
            **meta.columns(rows.metas),
            "embedding": emb,
        }
    )


def write_chunk(out: Location, rows: ShardRows) -> None:
    buf = io.BytesIO()
    pq.write_table(chunk_table(rows), buf, compression="zstd")
    commit_bytes(out.fs, chunk_path(out, rows.shard), buf.getvalue())


def read_chunk(out: Location, shard: str) -> pa.Table:
    with out.fs.open(chunk_path(out, shard), "rb") as f:
        return read_parquet(f)


def read_parquet(f: BinaryIO, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file read from a Python file object without Arrow's thread pools. With them, a
    pool thread still finishing a read-ahead (`pre_buffer`, on by default in `read_table`) when the
    interpreter shuts down takes the GIL, is killed by Python and aborts the process ("terminate
    called without an active exception", apache/arrow#34314; gdb shows arrow::py::PyBuffer's
    destructor in an IO-pool thread): `featpipe index` exited -6 in 21 of 120 runs on 2 loaded
    cores with `use_threads=False` alone, 0 of 120 with `pre_buffer=False` too (`read_table`'s and
    `ParquetFile`'s default is True: every reader passes False, tests/test_structure.py checks).
    One file is small here (a shard's chunk, an index's ids): threads gain nothing."""
    return pq.read_table(f, columns=columns, use_threads=False, pre_buffer=False)


def unreadable(out: Location, shards: list[str]) -> set[str]:
    """Shards whose chunk exists but whose Parquet footer cannot be read (a truncated or
    overwritten file): one listing, then the footers only, a few in parallel for object stores."""
    from concurrent.futures import ThreadPoolExecutor

    folder = out.join(CHUNKS)
    if not shards or not out.fs.exists(folder):
        return set()
    present = {p.rsplit("/", 1)[-1] for p in out.fs.glob(out.join(CHUNKS, "*.parquet"))}
    names = [s for s in shards if f"{s}.parquet" in present]

    def broken(shard: str) -> bool:
        try:
            with out.fs.open(chunk_path(out, shard), "rb") as f:
                pq.read_metadata(f)
            return False
        except Exception:  # pyarrow's ArrowInvalid, OSError
            return True

    with ThreadPoolExecutor(max_workers=1 if out.is_local else 16) as pool:
        return {s for s, bad in zip(names, pool.map(broken, names), strict=True) if bad}


def chunk_schemas(out: Location, shards: list[str]) -> list[pa.Schema]:
    """The shards' chunk schemas, from their footers alone (a few in parallel on object stores)."""
    from concurrent.futures import ThreadPoolExecutor

    def schema(shard: str) -> pa.Schema:
        try:
            with out.fs.open(chunk_path(out, shard), "rb") as f:
                return pq.read_schema(f)
        except Exception as exc:  # pyarrow's ArrowInvalid for a truncated or overwritten file
            raise UserError(
                f"{chunk_path(out, shard)} is not a readable Parquet chunk ({reason(exc)}); rerun the "
                "extract command to redo that shard"
            ) from None

    with ThreadPoolExecutor(max_workers=1 if out.is_local else 16) as pool:
        return list(pool.map(schema, shards))


def chunk_matrix(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(table), col.type.list_size)
