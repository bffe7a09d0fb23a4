"""Chunks → OUT/fts.npy (float16), OUT/fts.pth (float32 tensor), OUT/img_list.json, OUT/errors.jsonl,
OUT/metadata/metadata.parquet (key, path, caption, … row-aligned with the vectors) and
OUT/removed.json (the rows whose source file the shards' manifest says is gone).

Rows go in the run's shard order, then in-shard order, so the bytes do not depend on how many
workers or ranks produced the chunks. The .npy files are appended to a chunk at a time with plain
writes: memory stays flat however many images there are (a memory map kept every written page in
the process). Their disk space is reserved first: a full disk fails with one line, before the
writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.chunks import chunk_matrix, chunk_schemas, read_chunk
from pipeline.errors import UserError, reason
from pipeline.extract.meta import MetadataFile
from pipeline.faults import crash_point
from pipeline.outdir import (
    DIGEST_FILE,
    METADATA_FILE,
    REMOVED_FILE,
    DoneRecord,
    OutputNames,
    RunInfo,
    chunk_path,
    read_done,
)
from pipeline.shardformat import MANIFEST
from pipeline.storage import (
    Location,
    commit_file,
    commit_json,
    locate,
    npy_appender,
    read_json,
    remove_quietly,
    staging_file,
)
from pipeline.units import format_bytes


@dataclass
class Consolidated:
    rows: int
    dim: int
    errors: int
    failed_shards: list[str]


def consolidate(out: Location, run: RunInfo, names: OutputNames = OutputNames()) -> Consolidated:
    records = _records(out, run)
    rows = sum(r.rows for r in records)
    dims = {r.dim for r in records if r.rows}
    if len(dims) > 1:
        raise UserError(f"chunks in {out.url()} disagree on the feature size: {sorted(dims)}")
    dim = dims.pop() if dims else (run.dim or 0)
    staged: dict[str, str] = {}
    gone = manifest_removals(run)
    digest = VectorDigest(rows, dim, previous_rows(out))
    written = (*names.all(), METADATA_FILE, REMOVED_FILE)
    try:
        with tempfile.TemporaryDirectory(prefix="featpipe-consolidate-") as tmp:
            for name in written:
                staged[name] = staging_file(out.fs, out.join(name))
            generations = [s.generation for s in run.shards]
            f32 = os.path.join(tmp, "fts32.npy")
            metadata = MetadataFile(staged[METADATA_FILE], chunk_schemas(out, [r.shard for r in records if r.rows]))
            n_errors = _write(out, records, rows, dim, names, staged, f32, generations, gone, digest, metadata)
            metadata.close()
        if out.fs.exists(out.join(DIGEST_FILE)):  # it describes the vectors about to be replaced
            out.fs.rm(out.join(DIGEST_FILE))
        for name in written:
            commit_file(out.fs, staged.pop(name), out.join(name))
            crash_point("consolidate")
        stale = out.join(OutputNames().torch_features)
        if names.torch_features is None and out.fs.exists(stale):  # an earlier run's copy, now out of date
            out.fs.rm(stale)
        digest.commit(out, names.numpy_features)
    except OSError as exc:  # a full disk, a read-only OUT: one line, and no temporary file left behind
        raise UserError(f"cannot write the consolidated files in {out.url()}: {reason(exc)}") from None
    finally:
        for path in staged.values():
            remove_quietly(path)
    return Consolidated(rows, dim, n_errors, [r.shard for r in records if r.failed])


def _records(out: Location, run: RunInfo) -> list[DoneRecord]:
    records, missing = [], []
    for shard in run.shard_names:
        try:
            records.append(read_done(out, shard))
        except FileNotFoundError:
            missing.append(shard)
    if missing:
        raise UserError(
            f"{len(missing)} of {len(run.shard_names)} shards are not finished (first: {missing[0]}); "
            "rerun the same extract command to finish them"
        )
    return records


def _write(
    out: Location,
    records: list[DoneRecord],
    rows: int,
    dim: int,
    names: OutputNames,
    staged: dict[str, str],
    f32_path: str,
    generations: list[int],
    gone: set[tuple[str, int]],
    digest: VectorDigest,
    metadata: MetadataFile,
) -> int:
    """Fill the staged files; returns the number of error records."""
    with ExitStack() as files:
        f16 = files.enter_context(_reserved(staged[names.numpy_features], "<f2", (rows, dim)))
        f32 = files.enter_context(_reserved(f32_path, "<f4", (rows, dim))) if names.torch_features is not None else None
        img_list = files.enter_context(open(staged[names.img_list], "w", encoding="utf-8"))
        errs = files.enter_context(open(staged[names.errors], "w", encoding="utf-8"))
        img_list.write("[")
        removed: list[tuple[int, str]] = []
        n_errors = row = 0
        for rec, generation in zip(records, generations, strict=True):
            if rec.rows:
                table = _chunk(out, rec.shard)
                mat = chunk_matrix(table)
                if f32 is not None:
                    f32.write(mat.astype("<f4", copy=False).tobytes())
                half = mat.astype("<f2")
                f16.write(half.tobytes())
                digest.update(half)
                metadata.add(rec.shard, table)
                for p in table.column("path").to_pylist():
                    img_list.write(("\n" if row == 0 else ",\n") + json.dumps(p, ensure_ascii=False))
                    if (p, generation) in gone:
                        removed.append((row, p))
                    row += 1
            for e in rec.all_errors():
                errs.write(json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
                n_errors += 1
        img_list.write("\n]\n")
    with open(staged[REMOVED_FILE], "w", encoding="utf-8") as f:
        doc = {"rows": [r for r, _ in removed], "paths": [p for _, p in removed]}
        f.write(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    if names.torch_features is not None:
        _save_tensor(f32_path, staged[names.torch_features])
    return n_errors


@contextmanager
def _reserved(path: str, dtype: str, shape: tuple[int, int]):
    """An .npy file appended to (storage.npy_appender), its whole size reserved first, so that a
    full disk fails here with one line, not halfway."""
    with npy_appender(path, dtype, shape) as f:
        reserve(path, f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        yield f


def _save_tensor(f32_path: str, staged: str) -> None:
    """fts.pth from the float32 rows in `f32_path` (an .npy file).

    torch.save streams the tensor's storage, which here is a copy-on-write map of that file
    (nothing is written to it): no copy in RAM, only clean pages of the page cache mapped while it
    streams. A file object, not a path: torch names the zip's inner folder after a path, and the
    temporary name would make the bytes differ from run to run. The space is reserved first (the
    zip adds well under 64 KB to the data), then the file is cut to what torch wrote."""
    f32 = np.load(f32_path, mmap_mode="c")
    reserve(staged, f32.nbytes + 65536)
    with open(staged, "r+b") as f:
        torch.save(torch.from_numpy(f32), f)
        f.truncate()
    del f32


class VectorDigest:
    """fts.npy's fingerprint (features.py's: SHA-256 of its shape, type and bytes), computed while
    consolidation writes the rows, and the fingerprint of the first `previous` rows (the earlier
    consolidation's, which an --update checks its prefix against). Recorded in digest.json with
    the committed file's stamp, so a consumer compares stamps instead of reading every byte (a
    2M × 384 file took 2.8 s to hash, 1B rows would take ~23 minutes per process)."""

    def __init__(self, rows: int, dim: int, previous: int | None):
        self.rows, self.dim, self.done = rows, dim, 0
        self.full = hashlib.sha256(f"{rows}x{dim}:{np.dtype(np.float16).str}".encode())
        self.previous = previous if previous is not None and 0 < previous < rows else None
        self.prefix = hashlib.sha256(f"{previous}x{dim}:{np.dtype(np.float16).str}".encode()) if self.previous else None

    def update(self, block: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(block)).cast("B")
        self.full.update(data)
        if self.prefix is not None and self.done < self.previous:
            take = min(len(block), self.previous - self.done)
            self.prefix.update(data[: take * block.strides[0]])
        self.done += len(block)

    def commit(self, out: Location, file: str) -> None:
        """digest.json, written after the vectors are committed: a kill before leaves none (and a
        consumer hashes as before), and the stamp is the committed file's."""
        prefixes = {str(self.rows): "sha256:" + self.full.hexdigest()}
        if self.prefix is not None:
            prefixes[str(self.previous)] = "sha256:" + self.prefix.hexdigest()
        record = {"file": file, "stamp": out.fs.ukey(out.join(file)), "n": self.rows, "dim": self.dim}
        commit_json(out.fs, out.join(DIGEST_FILE), {**record, "fingerprints": prefixes})


def previous_rows(out: Location) -> int | None:
    """How many rows the consolidation before this one wrote, as its digest.json says."""
    try:
        return int(read_json(out.fs, out.join(DIGEST_FILE))["n"])
    except Exception:  # none yet, or unreadable: no prefix to record
        return None


def manifest_removals(run: RunInfo) -> set[tuple[str, int]]:
    """(path, generation) of every entry the shards' manifest records as gone from the source, when
    the run's shards are one packed folder; a sample is removed when its shard's generation matches
    (a file rewritten in place is gone at its old generation and packed again at a new one)."""
    if not run.shards:
        return set()
    folders = {s.url.rsplit("/", 1)[0] for s in run.shards}
    if len(folders) != 1:
        return set()
    loc = locate(folders.pop())
    try:
        manifest = read_json(loc.fs, loc.join(MANIFEST)) if loc.fs.exists(loc.join(MANIFEST)) else {}
    except Exception:  # a folder we cannot read the manifest of: nothing is known to be removed
        return set()
    return {(r["path"], r["generation"]) for r in manifest.get("removed", [])}


def _chunk(out: Location, shard: str):
    try:
        return read_chunk(out, shard)
    except Exception as exc:  # pyarrow's ArrowInvalid for a truncated or overwritten file
        raise UserError(
            f"{chunk_path(out, shard)} is not a readable Parquet chunk ({reason(exc)}); rerun the "
            "extract command to redo that shard"
        ) from None


def reserve(path: str, nbytes: int) -> None:
    """Allocate the file's blocks now, so that a full disk fails here, not halfway through the writing."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, max(nbytes, 1))
    except OSError as exc:
        if exc.errno in (28, 27):  # ENOSPC, EFBIG
            raise OSError(exc.errno, f"not enough space for {path} ({format_bytes(nbytes)} needed)") from None
        if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: a filesystem that cannot reserve; go on
            raise
    finally:
        os.close(fd)
