"""OUT/neighbors.parquet of `featpipe match`: one row per (query, rank), with keys and paths joined
on both sides, written a block at a time and committed whole."""

from __future__ import annotations

import numpy as np

from pipeline.retrieve.features import FeatureSet
from pipeline.storage import Location, commit_file, staging_file

NEIGHBORS_FILE = "neighbors.parquet"


class NeighborWriter:
    """neighbors.parquet: one row per (query, rank), with keys and paths joined on both sides."""

    def __init__(self, out: Location, fs: FeatureSet):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.out, self.fs = out, fs
        self.keys, self.paths = np.array(fs.keys, dtype=object), np.array(fs.paths, dtype=object)
        self.schema = pa.schema(
            [
                ("query", pa.int64()),
                ("query_key", pa.string()),
                ("query_path", pa.string()),
                ("rank", pa.int32()),
                ("neighbor", pa.int64()),
                ("neighbor_key", pa.string()),
                ("neighbor_path", pa.string()),
                ("score", pa.float32()),
            ]
        )
        self.staged = staging_file(out.fs, out.join(NEIGHBORS_FILE))
        self.writer = pq.ParquetWriter(self.staged, self.schema, compression="zstd")

    def add(self, start: int, matches: np.ndarray, scores: np.ndarray) -> None:
        import pyarrow as pa

        n, k = matches.shape
        found = matches != np.iinfo(np.uint32).max
        q = np.repeat(np.arange(start, start + n), k)[found.reshape(-1)]
        rank = np.tile(np.arange(k, dtype=np.int32), n)[found.reshape(-1)]
        nb = matches.reshape(-1)[found.reshape(-1)].astype(np.int64)
        table = pa.table(
            [
                q,
                self.keys[q],
                self.paths[q],
                rank,
                nb,
                self.keys[nb],
                self.paths[nb],
                scores.reshape(-1)[found.reshape(-1)],
            ],
            schema=self.schema,
        )
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        commit_file(self.out.fs, self.staged, self.out.join(NEIGHBORS_FILE))
