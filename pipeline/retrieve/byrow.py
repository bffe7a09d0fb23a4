"""A few rows of FEATURES by row number (issue 31): each one's key, path, caption and where its
image lies, read on demand instead of loading every row's names: what show's pages and serve's
thumbnails over FEATURES need (an index reads its own INDEX/rows/, rowmeta.py).

- an extract output: metadata/metadata.parquet, a row group per shard with the shards' names in its
  footer, for the names; the row's chunk for its byte range in the tar;
- another tool's folder: its import's rows.parquet (foreign.py).

Only the row groups holding wanted rows are read. Outputs consolidated before metadata.parquet
existed, and bare arrays, have no reader: callers use FEATURES' lists.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable

import numpy as np
import pyarrow.parquet as pq

from pipeline.extract.meta import SHARDS_KEY
from pipeline.outdir import CHUNKS, METADATA_FILE
from pipeline.retrieve.features import FeatureSet
from pipeline.retrieve.rowmeta import RowPlace
from pipeline.storage import Location, locate

NAMES = ("key", "path", "caption")


class RowReader:
    def __init__(self, fs: FeatureSet, file: Location, shards: list[str] | None, starts: list[int]):
        self.fs, self.file, self.shards, self.starts = fs, file, shards, starts

    @classmethod
    def of(cls, fs: FeatureSet | None) -> RowReader | None:
        """The reader for FEATURES, or None when it has none (see the module's docstring)."""
        if fs is None or (fs.folder is None and fs.rows_file is None):
            return None
        if fs.rows_file is not None:
            file = locate(fs.rows_file)
        else:
            folder = locate(fs.folder)
            file = Location(folder.fs, folder.join(METADATA_FILE))
        if not file.fs.exists(file.path):
            return None
        with file.fs.open(file.path, "rb") as f:
            meta = pq.read_metadata(f)
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        shards = json.loads(meta.metadata[SHARDS_KEY.encode()]) if fs.folder and meta.metadata else None
        if sum(sizes) != fs.n or (fs.folder is not None and (shards is None or len(shards) != len(sizes))):
            return None  # not what this reader expects (an older file): the lists will do
        return cls(fs, file, shards, [0, *np.cumsum(sizes).tolist()])

    def places(self, rows: Iterable[int], members: bool = True) -> dict[int, RowPlace]:
        """These rows' places; `members` False: names only (no chunk read for the byte ranges)."""
        groups: dict[int, list[int]] = {}
        for r in sorted({int(r) for r in rows}):
            if not 0 <= r < self.fs.n:
                raise IndexError(f"row {r} is outside 0..{self.fs.n - 1}")
            groups.setdefault(bisect.bisect_right(self.starts, r) - 1, []).append(r)
        out: dict[int, RowPlace] = {}
        with self.file.fs.open(self.file.path, "rb") as f:
            table = pq.ParquetFile(f, pre_buffer=False)  # see chunks.read_parquet
            names = [c for c in NAMES if c in table.schema_arrow.names]
            for g, wanted in groups.items():
                cols = table.read_row_group(g, columns=names, use_threads=False).to_pydict()
                shard = self.shards[g] if self.shards else None
                ranges = self._members(shard) if members else None
                for r in wanted:
                    j = r - self.starts[g]
                    where = ranges[j] if ranges else (-1, 0)
                    name = {c: cols[c][j] if c in cols else None for c in NAMES}
                    out[r] = RowPlace(shard, name["key"], *where, name["path"], name["caption"])
        return out

    def _members(self, shard: str | None) -> list[tuple[int, int]] | None:
        """The (offset, length) of each row of a shard's chunk (None where it has none)."""
        if shard is None:
            return None
        loc = locate(self.fs.folder)
        with loc.fs.open(loc.join(CHUNKS, f"{shard}.parquet"), "rb") as f:
            chunk = pq.ParquetFile(f, pre_buffer=False)
            if "offset" not in chunk.schema_arrow.names:
                return None
            cols = chunk.read(columns=["offset", "length"], use_threads=False).to_pydict()
        return list(zip(cols["offset"], cols["length"], strict=True))


def row_places(fs: FeatureSet | None, rows: Iterable[int], members: bool = True) -> dict[int, RowPlace]:
    """These rows' places: by the reader where FEATURES has one, else from FEATURES' lists (an
    older output's), else bare (row numbers only)."""
    rows = sorted({int(r) for r in rows})
    reader = RowReader.of(fs)
    if reader is not None:
        return reader.places(rows, members)
    if fs is None or (fs.folder is None and fs.rows_file is None):
        return {r: RowPlace(None, None, -1, 0, None) for r in rows}
    keys, paths, shards, members, said = fs.keys, fs.paths, fs.shards, fs.members, fs.captions
    pick = lambda values, r, empty=None: values[r] if values else empty
    return {
        r: RowPlace(pick(shards, r), pick(keys, r), *pick(members, r, (-1, 0)), pick(paths, r), pick(said, r))
        for r in rows
    }
