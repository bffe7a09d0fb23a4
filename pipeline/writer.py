"""One Parquet chunk per shard, then a small done record: together they are the shard's commit.

Layout under OUT:
  chunks/NAME.parquet  key, path, shard, index, embedding (fixed-size list of float32); only for
                       shards with at least one embedded image (embedding-reader globs this folder)
  done/NAME.json       rows, samples read, recorded errors, the run's fingerprint; written after
                       the chunk, so a shard counts as finished only once both exist
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Location, commit_bytes, commit_json, read_json

CHUNKS = "chunks"
DONE = "done"


@dataclass
class ShardRows:
    shard: str
    keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # found on the device, beside the workers' own

    def add(self, keys: list[str], paths: list[str], indices: list[int], feats: np.ndarray) -> None:
        self.keys += keys
        self.paths += paths
        self.indices += indices
        self.features.append(feats)

    def matrix(self) -> np.ndarray:
        return np.concatenate(self.features).astype(np.float32, copy=False)


def chunk_table(rows: ShardRows) -> pa.Table:
    mat = rows.matrix()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa.float32()), mat.shape[1])
    return pa.table({"key": rows.keys, "path": rows.paths, "shard": [rows.shard] * len(rows.keys),
                     "index": pa.array(rows.indices, pa.int64()), "embedding": emb})


def commit_shard(out: Location, rows: ShardRows, end: dict, fingerprint: str) -> dict:
    n = len(rows.keys)
    if n:
        buf = io.BytesIO()
        pq.write_table(chunk_table(rows), buf, compression="zstd")
        commit_bytes(out.fs, chunk_path(out, rows.shard), buf.getvalue())
    errors = sorted(end["errors"] + rows.errors, key=lambda e: e["index"])
    record = {"shard": rows.shard, "rows": n, "read": end["read"], "errors": errors, "failed": end["failed"],
              "dim": int(rows.features[0].shape[1]) if n else None, "chunk": f"{CHUNKS}/{rows.shard}.parquet" if n else None,
              "fingerprint": fingerprint}
    commit_json(out.fs, done_path(out, rows.shard), record)
    return record


def chunk_path(out: Location, shard: str) -> str:
    return out.join(CHUNKS, f"{shard}.parquet")


def done_path(out: Location, shard: str) -> str:
    return out.join(DONE, f"{shard}.json")


def finished(out: Location) -> set[str]:
    """Names of the shards already committed in OUT: one listing, not one read per shard."""
    if not out.fs.exists(out.join(DONE)):
        return set()
    names = (p.rsplit("/", 1)[-1] for p in out.fs.glob(out.join(DONE, "*.json")))
    return {n.removesuffix(".json") for n in names if not n.startswith(".")}  # not a commit's temporary file


def read_done(out: Location, shard: str) -> dict:
    return read_json(out.fs, done_path(out, shard))


def read_chunk(out: Location, shard: str) -> pa.Table:
    with out.fs.open(chunk_path(out, shard), "rb") as f:
        return pq.read_table(f)


def chunk_matrix(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(table), col.type.list_size)
