"""The output folder of `featpipe extract`: one module knows every name in it, what a run is made
of (run.json), and which shards are finished (done records), as shardformat.py knows the shards.

  OUT/run.json          the run's settings fingerprint, shard list and feature width
  OUT/chunks/NAME.parquet   one Parquet chunk per shard with at least one row (chunks.py)
  OUT/done/NAME.json    a shard's done record, written after its chunk: together they are its commit
  OUT/failed/NAME.json  the same record for a shard that could not be read for a passing reason
                        (missing, forbidden, store down): consolidated, reported, and retried by a rerun
  OUT/stats.json        the last run's figures
  OUT/errors.jsonl      every sample (or shard) that did not become a row, and why
  OUT/fts.npy, fts.pth, img_list.json   the consolidated outputs (names configurable)
  OUT/metadata/metadata.parquet  each row's key, path, caption and .json fields, row-aligned with fts.npy
  OUT/removed.json      rows whose source file is gone (pack --relist found it so): kept in place,
                        so row numbers never move, and left out by match, dedup, index and query
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field

from pipeline import __version__
from pipeline.errors import SampleError, UserError
from pipeline.storage import Location, commit_json, read_json

log = logging.getLogger("featpipe")

RUN_FILE = "run.json"
STATS_FILE = "stats.json"
REMOVED_FILE = "removed.json"
# key, path, caption, url, … row-aligned with fts.npy (extract/meta.py), alone in its folder:
# embedding-reader pairs every .npy under one folder with every .parquet under another, recursively
METADATA_DIR = "metadata"
METADATA_FILE = f"{METADATA_DIR}/metadata.parquet"
DIGEST_FILE = "digest.json"  # fts.npy's fingerprint, computed as consolidation wrote it, and its stamp
CHUNKS = "chunks"
DONE = "done"
FAILED = "failed"  # records of shards that could not be read for a passing reason: the next run retries them


@dataclass(frozen=True)
class OutputNames:
    """The consolidated files' names (the original script's flags). torch_features None: no
    float32 copy (`--torch-features none`: 1B × 768 would be 3 TB beside fts.npy's 1.5 TB)."""

    torch_features: str | None = "fts.pth"
    numpy_features: str = "fts.npy"
    img_list: str = "img_list.json"
    errors: str = "errors.jsonl"

    def all(self) -> tuple[str, ...]:
        return tuple(n for n in (self.numpy_features, self.torch_features, self.img_list, self.errors) if n)


@dataclass(frozen=True)
class ShardEntry:
    """A shard as run.json lists it, in consolidation order."""

    name: str
    url: str
    expected: int | None = None  # samples, when a manifest says so
    generation: int = 0  # the pack listing that planned the shard


@dataclass(frozen=True)
class RunInfo:
    settings: dict  # model and transform: anything that changes the numbers
    shards: list[ShardEntry]
    dim: int | None = None  # the model's feature size, so a run without one good image still has it
    extra: dict = field(default_factory=dict)  # recorded for later stages (e.g. the model's source)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def shard_names(self) -> list[str]:
        return [s.name for s in self.shards]

    def to_json(self) -> dict:
        return {
            "featpipe_version": __version__,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "shards": [asdict(s) for s in self.shards],
            "dim": self.dim,
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict) -> RunInfo:
        known = {"featpipe_version", "fingerprint", "settings", "shards", "dim"}
        return cls(
            data["settings"],
            [ShardEntry(s["name"], s["url"], s.get("expected"), s.get("generation", 0)) for s in data["shards"]],
            data.get("dim"),
            {k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class DoneRecord:
    """A shard's commit: how many samples were read, how many became rows, and every one that did not."""

    shard: str
    rows: int
    read: int
    errors: list[SampleError]
    failed: str | None  # the shard itself could not be read (fully), and why
    dim: int | None
    chunk: str | None  # the chunk's path relative to OUT, when rows > 0
    fingerprint: str
    retry: bool = False  # `failed` may pass: the shard is not finished, a rerun reads it again

    def to_json(self) -> dict:
        return {**asdict(self), "errors": [e.to_json() for e in self.errors]}

    @classmethod
    def from_json(cls, data: dict) -> DoneRecord:
        return cls(
            data["shard"],
            data["rows"],
            data["read"],
            [SampleError.from_json(e) for e in data["errors"]],
            data["failed"],
            data["dim"],
            data["chunk"],
            data["fingerprint"],
            data.get("retry", False),
        )

    def all_errors(self) -> list[SampleError]:
        """The sample errors, then the shard's own failure as one more record."""
        if not self.failed:
            return list(self.errors)
        return [*self.errors, SampleError(self.shard, None, None, None, f"shard failed: {self.failed}")]


def load_run(out: Location) -> RunInfo:
    path = out.join(RUN_FILE)
    if not out.fs.exists(path):
        raise UserError(f"{out.url()} holds no featpipe run (no {RUN_FILE}); run `featpipe extract` first")
    return RunInfo.from_json(read_json(out.fs, path))


def check_compatible(out: Location, run: RunInfo) -> bool:
    """True when OUT already holds this run; False when there is none yet, or when the shard list
    grew at its end (pack --relist: the finished shards stay, the new ones are extracted); refuses
    a run made with other settings or over other shards."""
    if not out.fs.exists(out.join(RUN_FILE)):
        return False
    old = load_run(out)
    if old.fingerprint != run.fingerprint:
        changed = sorted(k for k in set(old.settings) | set(run.settings) if old.settings.get(k) != run.settings.get(k))
        raise UserError(
            f"{out.url()} holds features made with other settings ({', '.join(changed)}); "
            "use --overwrite to replace them, or another OUT"
        )
    grew = len(run.shards) > len(old.shards) and run.shard_names[: len(old.shards)] == old.shard_names
    if grew:
        log.info("%d shards added since the last run into %s", len(run.shards) - len(old.shards), out.url())
        return False
    if old.shard_names != run.shard_names:
        raise UserError(
            f"{out.url()} holds a run over another shard list ({len(old.shards)} shards, now "
            f"{len(run.shards)}); use --overwrite to replace it, or another OUT"
        )
    return True


def write_run(out: Location, run: RunInfo) -> None:
    commit_json(out.fs, out.join(RUN_FILE), run.to_json())


def chunk_path(out: Location, shard: str) -> str:
    return out.join(CHUNKS, f"{shard}.parquet")


def done_path(out: Location, shard: str) -> str:
    return out.join(DONE, f"{shard}.json")


def failed_path(out: Location, shard: str) -> str:
    return out.join(FAILED, f"{shard}.json")


def write_done(out: Location, record: DoneRecord) -> None:
    """A shard that failed for a passing reason goes to failed/, so that it is not finished; a
    shard finished on a later run leaves no record there."""
    if record.retry:
        commit_json(out.fs, failed_path(out, record.shard), record.to_json())
        return
    commit_json(out.fs, done_path(out, record.shard), record.to_json())
    if out.fs.exists(failed_path(out, record.shard)):
        out.fs.rm_file(failed_path(out, record.shard))


def read_done(out: Location, shard: str) -> DoneRecord:
    """The shard's record (done, else failed-to-retry); FileNotFoundError for a shard never committed."""
    try:
        return DoneRecord.from_json(read_json(out.fs, done_path(out, shard)))
    except FileNotFoundError:
        return DoneRecord.from_json(read_json(out.fs, failed_path(out, shard)))


def finished(out: Location) -> set[str]:
    """Names of the shards already committed in OUT: one listing, not one read per shard."""
    if not out.fs.exists(out.join(DONE)):
        return set()
    names = (p.rsplit("/", 1)[-1] for p in out.fs.glob(out.join(DONE, "*.json")))
    return {n.removesuffix(".json") for n in names if not n.startswith(".")}  # not a commit's temporary file


def clear(out: Location, names: OutputNames) -> None:
    """Everything a run wrote, for --overwrite."""
    fs = out.fs
    for p in (CHUNKS, DONE, FAILED, RUN_FILE, STATS_FILE, REMOVED_FILE, METADATA_DIR, DIGEST_FILE, *names.all()):
        if fs.exists(out.join(p)):
            fs.rm(out.join(p), recursive=True)
