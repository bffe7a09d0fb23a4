"""A torch IterableDataset over shards: each DataLoader worker takes its own shards, decodes and
crops their images, and hands over uint8 batches that never cross a shard boundary, so the shard's
chunk can be committed as soon as its last batch is embedded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.errors import SampleError, reason
from pipeline.extract.inputs import ShardRef
from pipeline.extract.reader import RawSample, ReadConfig, ShardReport, iter_shard
from pipeline.image.device import JpegPack, device_decodable
from pipeline.image.transform import TransformConfig, crop_with_size


@dataclass
class Batch:
    """Up to batch-size samples of one shard, as they cross from a worker to the model process."""

    shard: str
    images: torch.Tensor  # (B - J, 3, C, C) uint8 crops, channels-last, for the slots not in `jpegs`
    jpegs: JpegPack  # J compressed JPEGs the device decodes into their slots (device mode)
    keys: list[str]
    paths: list[str]
    indices: list[int]
    sizes: list[tuple[int, int]]  # each image's upright (width, height) before resizing
    members: list[tuple[int, int]]  # each image's (offset, length) in its tar, (-1, 0) when unknown
    metas: list[dict]  # each sample's caption and .json fields kept (extract/meta.py)
    end: ShardReport | None  # set on the shard's last batch: what else reading the shard found

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread: page-locked crops (and JPEG bytes) copy to
        the GPU asynchronously."""
        self.images = self.images.pin_memory()
        if len(self.jpegs):
            self.jpegs.data = self.jpegs.data.pin_memory()
        return self

    @property
    def crop_slots(self) -> list[int]:
        """The slots `images` holds, in order: every slot not left for the device."""
        if not len(self.jpegs):
            return list(range(len(self)))
        waiting = set(self.jpegs.slots)
        return [i for i in range(len(self)) if i not in waiting]


class ShardStream(IterableDataset):
    def __init__(
        self, shards: list[ShardRef], transform: TransformConfig, batch_size: int, read: ReadConfig = ReadConfig()
    ):
        self.shards = shards
        self.transform = transform
        self.batch_size = batch_size
        self.read = read

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            yield from self._shard_batches(shard)

    def _shard_batches(self, shard: ShardRef) -> Iterator[Batch]:
        report = ShardReport()
        items: list[_Item] = []
        for raw in iter_shard(shard, report, self.read):
            item, why = _decode(raw, self.transform)
            if item is None:
                report.errors.append(SampleError(shard.name, raw.key, raw.path, raw.index, why))
                continue
            items.append(item)
            if len(items) == self.batch_size:
                yield _batch(shard, items, self.transform, None)
                items = []
        yield _batch(shard, items, self.transform, report)


class SampleStream(IterableDataset):
    """One (uint8 crop (3, C, C), key, path) at a time: featpipe's read and decode path for a
    user's own loop (the Python API's `dataset`). Shards split across DataLoader workers as in
    ShardStream; undecodable samples are skipped."""

    def __init__(self, shards: list[ShardRef], transform: TransformConfig, read: ReadConfig = ReadConfig()):
        # a user's loop gets every crop decoded here: device mode's JPEG bytes have no crop to yield
        cpu = replace(transform, mode="fast") if transform.mode == "device" else transform
        self.stream = ShardStream(shards, cpu, 64, read)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, str]]:
        for batch in self.stream:
            for i in range(len(batch)):
                yield batch.images[i].contiguous(), batch.keys[i], batch.paths[i]


@dataclass
class _Item:
    raw: RawSample
    crop: torch.Tensor | None  # None: a JPEG left for the device
    size: tuple[int, int]
    rotation: int = 1  # for a JPEG left for the device


def _decode(raw: RawSample, cfg: TransformConfig) -> tuple[_Item | None, str]:
    if raw.error:
        return None, raw.error
    try:
        if cfg.mode == "device":
            on_device, rotation, size = device_decodable(raw.data, cfg.max_pixels, cfg)
            if on_device:
                return _Item(raw, None, size, rotation), ""
        crop, size = crop_with_size(raw.data, cfg)
        return _Item(raw, crop, size), ""
    except Exception as exc:  # Pillow raises many types for damaged data
        return None, f"decode failed: {reason(exc)}"


def _batch(shard: ShardRef, items: list[_Item], cfg: TransformConfig, report: ShardReport | None) -> Batch:
    """uint8 crops stacked (only those decoded here: no zero slots for the device's JPEGs), and the
    JPEGs left for the device in one flat buffer. Channels-last, the layout the decoder and the
    resize produce: stacking is then a plain copy (a planar batch cost ~0.2 ms per image in the
    worker); the device makes it planar."""
    crops = [it.crop for it in items if it.crop is not None]
    images = torch.empty((len(crops), cfg.crop_size, cfg.crop_size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    for i, crop in enumerate(crops):
        images[i] = crop
    jpegs = JpegPack.of(
        [(i, it.raw.data, it.rotation, it.size[0] * it.size[1]) for i, it in enumerate(items) if it.crop is None]
    )
    raws = [it.raw for it in items]
    return Batch(
        shard.name,
        images,
        jpegs,
        [r.key for r in raws],
        [r.path for r in raws],
        [r.index for r in raws],
        [it.size for it in items],
        [r.member for r in raws],
        [r.meta for r in raws],
        report,
    )
