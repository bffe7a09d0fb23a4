"""Reading one shard: its samples in order, as raw bytes with their key and source path, and a
report of what could not be read. Tars stream through fsspec into webdataset's tar iterators; a
group of loose files (folder mode) is read file by file."""

from __future__ import annotations

import json
import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.errors import SampleError, first_line
from pipeline.extract.inputs import ShardRef
from pipeline.image.header import IMAGE_EXTENSIONS
from pipeline.shardformat import sample_key

log = logging.getLogger("featpipe")

# Errors that no retry will mend: the shard is missing, forbidden, or its bytes are damaged.
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    tarfile.TarError,
    EOFError,
    ValueError,
)


@dataclass(frozen=True)
class ReadConfig:
    retries: int = 3  # transient read errors on one shard before it is recorded as failed
    backoff_s: float = 1.0


@dataclass
class RawSample:
    key: str
    path: str
    index: int
    data: bytes | None
    error: str | None = None  # why `data` is missing


@dataclass
class ShardReport:
    """What reading one shard found besides its good samples."""

    errors: list[SampleError] = field(default_factory=list)
    read: int = 0
    failed: str | None = None  # the shard itself could not be read (fully)


def iter_shard(shard: ShardRef, report: ShardReport, read: ReadConfig) -> Iterator[RawSample]:
    if shard.files:
        yield from _iter_files(shard, report)
    else:
        yield from _iter_tar(shard, report, read)


def _iter_files(shard: ShardRef, report: ShardReport) -> Iterator[RawSample]:
    for i, path in enumerate(shard.files):
        try:
            with fsspec.open(path, "rb") as f:
                data, error = f.read(), None
        except Exception as exc:
            data, error = None, f"cannot read: {type(exc).__name__}: {exc}"
        report.read += 1
        yield RawSample(sample_key(shard.index, i), path, i, data, error)


def _iter_tar(shard: ShardRef, report: ShardReport, read: ReadConfig) -> Iterator[RawSample]:
    """Samples in tar order. A transient error reopens the shard and skips what was already
    yielded; a permanent one keeps everything read before the damage and records the rest."""
    attempt = 0
    while True:
        position = 0
        try:
            with fsspec.open(shard.url, "rb") as stream:
                files = ({**f, "__url__": shard.url} for f in tar_file_iterator(stream))
                for sample in group_by_keys(files):
                    if position >= report.read:
                        report.read += 1
                        yield _raw_from_tar(sample, position, shard)
                    position += 1
            break
        except _PERMANENT as exc:
            report.failed = f"{type(exc).__name__}: {_first_arg(exc)} (after {report.read} samples)"
            break
        except Exception as exc:  # connection reset, timeout, a 5xx in the backend's own error type
            attempt += 1
            if attempt > read.retries:
                report.failed = (
                    f"gave up after {read.retries} retries: {type(exc).__name__}: {_first_arg(exc)} "
                    f"(after {report.read} samples)"
                )
                break
            log.warning("shard %s: %s; retry %d of %d", shard.url, first_line(exc), attempt, read.retries)
            time.sleep(read.backoff_s * 2 ** (attempt - 1))
    if report.failed is None and shard.expected is not None and report.read < shard.expected:
        report.failed = f"shard ended after {report.read} of {shard.expected} samples"


def _raw_from_tar(sample: dict, position: int, shard: ShardRef) -> RawSample:
    key = sample["__key__"]
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            pass
    path = meta.get("path") or meta.get("url") or f"{shard.url}#{key}"
    field_name = meta.get("field")
    if field_name not in sample:
        field_name = next((f for f in IMAGE_EXTENSIONS if f in sample), None)
    if field_name is None:
        return RawSample(key, path, position, None, "sample has no image field")
    return RawSample(key, path, position, sample[field_name])


def _first_arg(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else str(exc)
