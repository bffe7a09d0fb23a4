"""The Parquet chunk format: one file per shard, columns key, path, shard, index and embedding
(a fixed-size list of float32, the column embedding-reader and autofaiss read)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SampleError
from pipeline.outdir import chunk_path
from pipeline.storage import Location, commit_bytes


@dataclass
class ShardRows:
    """A shard's embedded rows as they arrive, batch by batch, until its chunk is written."""

    shard: str
    keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    errors: list[SampleError] = field(default_factory=list)  # found on the device, beside the workers' own

    def add(self, keys: list[str], paths: list[str], indices: list[int], feats: np.ndarray) -> None:
        self.keys += keys
        self.paths += paths
        self.indices += indices
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
            "embedding": emb,
        }
    )


def write_chunk(out: Location, rows: ShardRows) -> None:
    buf = io.BytesIO()
    pq.write_table(chunk_table(rows), buf, compression="zstd")
    commit_bytes(out.fs, chunk_path(out, rows.shard), buf.getvalue())


def read_chunk(out: Location, shard: str) -> pa.Table:
    with out.fs.open(chunk_path(out, shard), "rb") as f:
        return pq.read_table(f)


def chunk_matrix(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(table), col.type.list_size)
