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

from webdataset.tariterators import base_plus_ext

from pipeline.errors import SampleError, first_line, reason
from pipeline.extract.inputs import ShardRef
from pipeline.extract.meta import SampleRules, Scalar, pick_image, sample_meta
from pipeline.image.header import IMAGE_EXTENSIONS
from pipeline.names import clean_text
from pipeline.readmany import ReadPolicy, read_many
from pipeline.shardformat import sample_key, tar_members
from pipeline.storage import UNREADABLE, locate, open_stream

log = logging.getLogger("featpipe")

# The shard's bytes are damaged: a rerun would find the same, so the shard stays recorded as done.
_DAMAGE = (tarfile.TarError, EOFError, ValueError)


@dataclass(frozen=True)
class ReadConfig:
    retries: int = 3  # transient read errors on one shard before it is recorded as failed
    backoff_s: float = 1.0
    io_concurrency: int | None = None  # folder mode: reads in flight per worker (None: by filesystem)
    samples: SampleRules = field(default_factory=SampleRules)  # which member is the image, which metadata is kept


@dataclass
class RawSample:
    key: str
    path: str
    index: int
    data: bytes | None
    error: str | None = None  # why `data` is missing
    member: tuple[int, int] = (-1, 0)  # the image's (offset, length) in an uncompressed tar, for reading it alone
    meta: dict[str, Scalar] = field(default_factory=dict)  # caption and .json fields kept (meta.py)


@dataclass
class ShardReport:
    """What reading one shard found besides its good samples."""

    errors: list[SampleError] = field(default_factory=list)
    read: int = 0
    failed: str | None = None  # the shard itself could not be read (fully), and why
    retry: bool = False  # the failure may pass: the next run reads the shard again


def iter_shard(shard: ShardRef, report: ShardReport, read: ReadConfig) -> Iterator[RawSample]:
    if shard.files:
        yield from _iter_files(shard, report, read)
    else:
        yield from _iter_tar(shard, report, read)


def _iter_files(shard: ShardRef, report: ShardReport, read: ReadConfig) -> Iterator[RawSample]:
    """Loose files, many reads in flight (readmany.py), in the group's order."""
    fs = locate(shard.url).fs
    policy = ReadPolicy(read.io_concurrency, retries=read.retries, backoff_s=read.backoff_s)
    for i, data in read_many(fs, shard.files, None, policy):
        error = f"cannot read: {reason(data)}" if isinstance(data, BaseException) else None
        report.read += 1
        yield RawSample(sample_key(shard.index, i), clean_text(shard.files[i]), i, None if error else data, error)


def _iter_tar(shard: ShardRef, report: ShardReport, read: ReadConfig) -> Iterator[RawSample]:
    """Samples in tar order. A transient error reopens the shard and skips what was already
    yielded; damage keeps every complete sample before it and records the rest. Every sample read
    ends as a RawSample (with bytes, or with the reason it has none): none is dropped unrecorded."""
    attempt = 0
    seen: set[str] = set()
    while True:
        position = 0
        try:
            with open_stream(shard.url) as stream:
                for sample in _group(tar_members(stream, uncompressed=shard.url.endswith(".tar"))):
                    if position >= report.read:
                        report.read += 1
                        yield _raw_from_tar(sample, position, shard, seen, read.samples)
                    position += 1
            break
        except _DAMAGE as exc:  # the bytes themselves: a rerun would find the same
            report.failed = f"{shard.url}: damaged: {reason(exc)} (after {report.read} samples)"
            break
        except UNREADABLE as exc:  # missing or forbidden now: not retried in this run, the next run tries again
            report.failed = f"{shard.url}: cannot read: {reason(exc)} (after {report.read} samples)"
            report.retry = True
            break
        except Exception as exc:  # connection reset, timeout, a 5xx in the backend's own error type
            attempt += 1
            if attempt > read.retries:
                report.failed = (
                    f"{shard.url}: gave up after {read.retries} retries: {reason(exc)} (after {report.read} samples)"
                )
                report.retry = True
                break
            log.warning("shard %s: %s; retry %d of %d", shard.url, first_line(exc), attempt, read.retries)
            time.sleep(read.backoff_s * 2 ** (attempt - 1))
    if report.failed is None and shard.expected is not None and report.read < shard.expected:
        report.failed = f"{shard.url}: ended after {report.read} of {shard.expected} samples"


def _group(members: Iterator[dict]) -> Iterator[dict]:
    """Adjacent members with one key → a sample (webdataset's rule: key up to the first dot of the
    base name, the rest lower-cased is the field). Unlike webdataset's grouping, a sample whose
    members were all read whole is yielded before the error that follows it is raised, and a field
    seen twice starts a new sample (recorded as a duplicate key) instead of failing the shard."""
    current: dict | None = None
    try:
        for member in members:
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            suffix = suffix.lower()
            if current is None or prefix != current["__key__"] or suffix in current:
                if current is not None:
                    yield current
                current = {"__key__": prefix}
            current[suffix] = member["data"]
            current.setdefault("__members__", {})[suffix] = (member.get("offset", -1), len(member["data"]))
    except BaseException:
        if current is not None:
            yield current
            current = None
        raise
    if current is not None:
        yield current


def _raw_from_tar(sample: dict, position: int, shard: ShardRef, seen: set[str], rules: SampleRules) -> RawSample:
    key = clean_text(sample["__key__"])
    meta, problem = _metadata(sample.get("json"))
    path = meta.get("path") or meta.get("url")
    path = clean_text(path) if isinstance(path, str) and path else f"{shard.url}#{key}"
    if key in seen:
        return RawSample(key, path, position, None, f"duplicate key {key}: an earlier sample of this shard has it")
    seen.add(key)
    if problem:
        return RawSample(key, path, position, None, problem)
    image, others = pick_image(sample, meta.get("field"), rules)
    if image is None:
        return RawSample(key, path, position, None, _no_image_field(sample, rules))
    kept = sample_meta(sample, meta, others, rules)
    return RawSample(key, path, position, sample[image], member=sample["__members__"][image], meta=kept)


def _no_image_field(sample: dict, rules: SampleRules) -> str:
    """Why a sample has no image: most often base names with dots (webdataset's key ends at the
    first dot, so `cat.v2.jpg` is key `cat`, field `v2.jpg`, and `cat.v3.jpg` joins it)."""
    images = [f for f in sample if f in IMAGE_EXTENSIONS]
    if images:  # images there, but none of the fields asked for
        return f"sample has no {';'.join(rules.image_fields)} field (it has {';'.join(images)}): see --image-field"
    dotted = sorted(f for f in sample if "." in f and f.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
    if not dotted:
        return "sample has no image field"
    names = ", ".join(f"{sample['__key__']}.{f}" for f in dotted)
    return (
        f"sample has no image field: the base names of {names} hold dots, and webdataset's key ends at the "
        "first dot (key " + repr(sample["__key__"]) + "); rename them without dots before the extension "
        "(cat_v2.jpg) or repack the images with `featpipe pack`"
    )


def _metadata(raw: bytes | None) -> tuple[dict, str | None]:
    """The sample's .json as a dict, or why it cannot be used."""
    if raw is None:
        return {}, None
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        return {}, f"metadata (.json) is not valid JSON: {reason(exc)}"
    if not isinstance(meta, dict):
        return {}, f"metadata (.json) is a JSON {type(meta).__name__}, not an object"
    return meta, None
