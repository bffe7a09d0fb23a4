"""A torch IterableDataset over shards: each DataLoader worker takes its own shards, reads them
through fsspec, decodes and crops, and hands over uint8 batches that never cross a shard boundary,
so the writer can commit one chunk per shard as soon as its last batch is embedded."""

from __future__ import annotations

import json
import logging
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.devicedecode import DeviceJpeg, device_decodable
from pipeline.shardlist import ShardRef
from pipeline.shards import sample_key
from pipeline.transform import TransformConfig, crop_uint8

log = logging.getLogger("featpipe")

_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Errors that no retry will mend: the shard is missing, forbidden, or its bytes are damaged.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, tarfile.TarError,
              EOFError, ValueError)


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
    error: str | None = None


@dataclass
class ShardReport:
    """What reading one shard found besides its good samples."""

    errors: list[dict] = field(default_factory=list)
    read: int = 0
    failed: str | None = None  # the shard itself could not be read (fully)


class ShardStream(IterableDataset):
    def __init__(self, shards: list[ShardRef], transform: TransformConfig, batch_size: int,
                 read: ReadConfig = ReadConfig()):
        self.shards = shards
        self.transform = transform
        self.batch_size = batch_size
        self.read = read

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            yield from self._shard_batches(shard)

    def _shard_batches(self, shard: ShardRef) -> Iterator[dict]:
        report = ShardReport()
        batch: list[tuple[RawSample, torch.Tensor | DeviceJpeg]] = []
        for raw in iter_shard(shard, report, self.read):
            crop, reason = _decode(raw, self.transform, len(batch))
            if crop is None:
                report.errors.append({"key": raw.key, "path": raw.path, "shard": shard.name, "index": raw.index,
                                      "reason": reason})
                continue
            batch.append((raw, crop))
            if len(batch) == self.batch_size:
                yield _batch(shard, batch, self.transform, None)
                batch = []
        yield _batch(shard, batch, self.transform, report)


def _decode(raw: RawSample, cfg: TransformConfig, slot: int) -> tuple[torch.Tensor | DeviceJpeg | None, str | None]:
    if raw.error:
        return None, raw.error
    try:
        if cfg.mode == "device":
            on_device, rotation = device_decodable(raw.data)
            if on_device:
                return DeviceJpeg(slot, torch.frombuffer(bytearray(raw.data), dtype=torch.uint8), rotation), None
        return crop_uint8(raw.data, cfg), None
    except Exception as exc:  # Pillow raises many types for damaged data
        return None, f"decode failed: {type(exc).__name__}: {exc}"


def _batch(shard: ShardRef, items: list[tuple[RawSample, torch.Tensor | DeviceJpeg]], cfg: TransformConfig,
           report: ShardReport | None) -> dict:
    """uint8 crops stacked; a JPEG left for the device keeps a zero slot that the device fills.
    Channels-last, the layout the decoder and the resize produce: stacking is then a plain copy
    (a planar batch cost ~0.2 ms per image in the worker); the device makes it planar."""
    fill = torch.zeros if any(isinstance(c, DeviceJpeg) for _, c in items) else torch.empty
    images = fill((len(items), cfg.crop_size, cfg.crop_size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    jpegs = []
    for i, (_, c) in enumerate(items):
        if isinstance(c, DeviceJpeg):
            jpegs.append(c)
        else:
            images[i] = c
    out = {"shard": shard.name, "images": images, "jpegs": jpegs, "keys": [r.key for r, _ in items],
           "paths": [r.path for r, _ in items], "indices": [r.index for r, _ in items], "end": report is not None}
    if report is not None:
        out.update(errors=report.errors, read=report.read, failed=report.failed)
    return out


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
                report.failed = (f"gave up after {read.retries} retries: {type(exc).__name__}: {_first_arg(exc)} "
                                 f"(after {report.read} samples)")
                break
            log.warning("shard %s: %s; retry %d of %d", shard.url, exc, attempt, read.retries)
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
        field_name = next((f for f in _IMAGE_FIELDS if f in sample), None)
    if field_name is None:
        return RawSample(key, path, position, None, "sample has no image field")
    return RawSample(key, path, position, sample[field_name])


def _first_arg(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else str(exc)
