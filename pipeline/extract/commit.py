"""The commit side of extraction: rows wait per shard until the shard's last batch is embedded;
then its chunk and done record are written by one writer thread while the model goes on. At most
a few commits wait in line (backpressure), and a failed write stops the run."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from pipeline.chunks import ShardRows, write_chunk
from pipeline.extract.dataset import Batch
from pipeline.extract.reader import ReadConfig, ShardReport
from pipeline.extract.timing import StageTimer
from pipeline.faults import crash_point
from pipeline.outdir import CHUNKS, DoneRecord, write_done
from pipeline.storage import Location, retrying

IN_FLIGHT = 4  # commits queued behind the writer before the model waits


class ChunkCommitter:
    def __init__(self, out: Location, fingerprint: str, rank: int, timer: StageTimer, read: ReadConfig):
        self.out, self.fingerprint, self.rank, self.timer, self.read = out, fingerprint, rank, timer, read
        self.pending: dict[str, ShardRows] = {}
        self.writes: list[Future] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featpipe-writer")

    def rows(self, shard: str) -> ShardRows:
        return self.pending.setdefault(shard, ShardRows(shard))

    def add(self, batch: Batch, keep: list[int], feats: np.ndarray | None) -> None:
        """A batch's embedded rows; on the shard's last batch, its commit is queued."""
        rows = self.rows(batch.shard)
        if feats is not None:
            rows.add(
                [batch.keys[i] for i in keep],
                [batch.paths[i] for i in keep],
                [batch.indices[i] for i in keep],
                [batch.sizes[i] for i in keep],
                feats,
                [batch.members[i] for i in keep],
                [batch.metas[i] for i in keep],
            )
        if batch.end is not None:
            self.writes.append(self.pool.submit(self._commit, self.pending.pop(batch.shard), batch.end))
            with self.timer.waiting_for_writes():
                self._drain(keep=IN_FLIGHT)

    def close(self) -> None:
        with self.timer.waiting_for_writes():
            self._drain(keep=0)
        self.pool.shutdown()

    def __enter__(self) -> ChunkCommitter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _commit(self, rows: ShardRows, end: ShardReport) -> None:
        """The chunk first, then the done record: a shard counts as finished only once both exist."""
        errors = sorted(end.errors + rows.errors, key=lambda e: e.index)
        if len(rows) + len(errors) != end.read:  # every sample read is a row or a recorded error
            raise RuntimeError(
                f"shard {rows.shard}: {end.read} samples read but {len(rows)} rows and {len(errors)} errors; "
                "this is a featpipe bug, please report it"
            )
        chunk = f"{CHUNKS}/{rows.shard}.parquet" if len(rows) else None
        record = DoneRecord(
            rows.shard, len(rows), end.read, errors, end.failed, rows.dim, chunk, self.fingerprint, end.retry
        )
        if len(rows):
            self._write(lambda: write_chunk(self.out, rows), chunk)
        self._write(lambda: write_done(self.out, record), f"done record of {rows.shard}")
        crash_point("after-chunk", self.rank)  # test-only: dies here once the first chunk is committed

    def _write(self, fn, what: str) -> None:
        """Writes to an object store are retried like reads; a local write error is final at once."""
        if self.out.is_local:
            fn()
        else:
            retrying(fn, self.read.retries, self.read.backoff_s, f"{self.out.url()}: writing {what}")

    def _drain(self, keep: int) -> None:
        while self.writes and (len(self.writes) > keep or self.writes[0].done()):
            self.writes.pop(0).result()
