"""`featpipe extract`: shards → batches → model on the device → one Parquet chunk per shard →
fts.npy / fts.pth / img_list.json. Reruns resume; under torchrun each rank takes its slice."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import dist
from pipeline.chunks import unreadable
from pipeline.cpu import model_threads
from pipeline.errors import EXIT_FAILURES, EXIT_OK, SampleError, UserError, first_line
from pipeline.extract.commit import ChunkCommitter
from pipeline.extract.consolidate import Consolidated, consolidate
from pipeline.extract.dataset import Batch, ShardStream
from pipeline.extract.inputs import DEFAULT_GROUP_SIZE, ShardRef, resolve_shards
from pipeline.extract.readback import PendingFeatures
from pipeline.extract.reader import ReadConfig
from pipeline.extract.runner import ModelRunner
from pipeline.extract.timing import StageTimer
from pipeline.image.device import decode_on_device
from pipeline.image.transform import TransformConfig
from pipeline.models import check as check_model
from pipeline.models import load_model
from pipeline.models.base import ModelConfig, Preprocess, check_output
from pipeline.outdir import (
    CHUNKS,
    DONE,
    FAILED,
    METADATA_DIR,
    STATS_FILE,
    OutputNames,
    RunInfo,
    ShardEntry,
    check_compatible,
    clear,
    finished,
    write_run,
)
from pipeline.storage import Location, commit_json, ensure_writable, locate, remove_stale_temps

log = logging.getLogger("featpipe")


@dataclass(frozen=True)
class ExtractConfig:
    shards: str
    out: str
    model: ModelConfig = field(default_factory=ModelConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    # The transform fields the user set (flags); the others follow the model's own preprocessing.
    # None: all of them (torch.hub models have no preprocessing of their own: featpipe's default).
    transform_set: frozenset[str] | None = None
    batch_size: int = 256
    workers: int = 4
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    overwrite: bool = False
    names: OutputNames = field(default_factory=OutputNames)
    progress: bool = True
    group_size: int = DEFAULT_GROUP_SIZE  # images per chunk when SHARDS is a plain image folder
    read: ReadConfig = field(default_factory=ReadConfig)
    barrier_timeout_s: float = dist.BARRIER_TIMEOUT_S
    consolidate: bool = True
    compile: bool = False  # torch.compile the model: a slow start, then faster batches
    create_bucket: bool = False
    normalize: bool = False  # unit vectors in every output (what autofaiss and clip-retrieval expect)


@dataclass
class ExtractResult:
    stats: dict
    exit_code: int


def pick_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if requested == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def tune_device(device: torch.device, amp: torch.dtype | None) -> None:
    """On CUDA: TF32 tensor cores for --precision fp32's matrix products and convolutions (10 bits
    of mantissa, as bf16 has 7: fp32 storage and accumulation stay), and cuDNN's autotuner, which
    picks the fastest convolution kernels for the one input shape extraction uses."""
    if device.type != "cuda":
        return
    if amp is None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def validate(cfg: ExtractConfig) -> None:
    if cfg.batch_size < 1 or cfg.workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    cfg.transform.check()
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    t_start = time.perf_counter()
    validate(cfg)
    ctx = dist.DistContext.from_env()
    device = torch.device(dist.pick_device(cfg.device, ctx.local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL, cuDNN and torchcodec then use this rank's GPU, not GPU 0
    amp = pick_precision(cfg.precision, device)
    tune_device(device, amp)
    check_model(cfg.model)
    shards = resolve_shards(cfg.shards, cfg.group_size)
    out = locate(cfg.out)
    ensure_writable(out, cfg.create_bucket)
    loaded = load_model(cfg.model)
    cfg = replace(cfg, transform=resolved_transform(cfg.transform, loaded.preprocess, cfg.transform_set))
    cfg.transform.check()
    log.info("preprocessing: %s", cfg.transform.describe())
    model, dim, channels_last = _prepare_model(loaded.image, cfg, device, amp)
    precision_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    run = _make_run(cfg, precision_name, shards, dim, loaded.versions)
    if device.type == "cpu" and cfg.device == "auto":
        log.warning("no CUDA device: running on the CPU")
    _say_decoders(cfg.transform)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(model_threads())
    log.info(
        "model %s (%d-dim) on %s, %s, %d shards%s",
        cfg.model.label,
        dim,
        device,
        precision_name,
        len(shards),
        f", rank {ctx.rank} of {ctx.world}" if ctx.active else "",
    )
    dist.init(ctx, device, cfg.barrier_timeout_s)
    try:
        _prepare_out(out, run, cfg, ctx)
        # Split the full list first, then skip finished shards: every rank agrees on who does what.
        mine = shards[ctx.rank :: ctx.world]
        done = finished(out)
        damaged = unreadable(out, [s.name for s in mine if s.name in done])
        if damaged:
            log.warning(
                "%d finished shards have an unreadable chunk (first: %s): redoing them", len(damaged), min(damaged)
            )
        todo = [s for s in mine if s.name not in done or s.name in damaged]
        log.info("%d of this rank's %d shards to do (%d already finished)", len(todo), len(mine), len(mine) - len(todo))
        runner = ModelRunner(model, device, amp, cfg.batch_size, channels_last, cfg.compile, _stats_of(cfg.transform))
        timer = _embed(todo, runner, cfg, device, out, run.fingerprint, ctx)
        dist.barrier(ctx)
        result, consolidate_s = None, None
        if ctx.is_main and cfg.consolidate:
            t0 = time.perf_counter()
            result = consolidate(out, run, cfg.names)
            consolidate_s = time.perf_counter() - t0
    finally:
        dist.shutdown(ctx)
    stats = _stats(cfg, device, precision_name, dim, timer, consolidate_s, result, time.perf_counter() - t_start, ctx)
    if ctx.is_main:
        commit_json(out.fs, out.join(STATS_FILE), stats)
    failed = result is not None and (result.errors > 0 or result.failed_shards)
    # Under torchrun a non-zero rank status would make the launcher restart the job; failures are
    # recorded in OUT and reported by the summary and `featpipe verify` instead.
    return ExtractResult(stats, EXIT_FAILURES if failed and not ctx.active else EXIT_OK)


def _say_decoders(transform: TransformConfig) -> None:
    """Once, in the log: a decoder missing from this install makes the run slower, not wrong."""
    from pipeline.image.device import jpeg_backend
    from pipeline.image.transform import simplejpeg

    if transform.mode in ("fast", "device") and simplejpeg is None:
        log.warning("simplejpeg is not installed: JPEGs take Pillow's slower path (pip install simplejpeg)")
    if transform.mode == "device":
        backend = jpeg_backend()
        log.info(
            "JPEGs decoded on the device by %s%s",
            backend,
            "" if backend == "torchcodec" else " (deprecated there; pip install 'featpipe[gpu]' for torchcodec)",
        )


def resolved_transform(
    transform: TransformConfig, spec: Preprocess | None, explicit: frozenset[str] | None
) -> TransformConfig:
    """The model's own preprocessing, with the fields the user set on top."""
    if spec is None or explicit is None:
        return transform
    own = {
        "keep_ratio": spec.resize_mode == "shortest",
        "resize_size": spec.resize_size,
        "crop_size": spec.crop_size,
        "interpolation": spec.interpolation,
        "mean": tuple(spec.mean),
        "std": tuple(spec.std),
    }
    return replace(transform, **{k: v for k, v in own.items() if k not in explicit})


def _stats_of(transform: TransformConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(transform.mean), tuple(transform.std)


def _make_run(
    cfg: ExtractConfig, precision: str, shards: list[ShardRef], dim: int, versions: dict[str, str]
) -> RunInfo:
    settings = {"model": cfg.model.fingerprint(), "transform": cfg.transform.fingerprint(), "precision": precision}
    if cfg.normalize:  # only when asked: runs made before the flag keep their fingerprint (and resume)
        settings["normalize"] = True
    settings.update(cfg.read.samples.fingerprint())  # likewise: only what differs from the defaults
    # What a later `featpipe query` needs to embed a new image the same way (not part of the
    # fingerprint), and the library versions that made the vectors.
    source = {"model": cfg.model.source(), "transform": cfg.transform.fingerprint(), "precision": precision}
    if cfg.normalize:  # a query's vector is normalised the same way
        source["normalize"] = True
    extra = {"embedder": source, "preprocessing": cfg.transform.describe(), "versions": versions}
    return RunInfo(settings, [ShardEntry(s.name, s.url, s.expected, s.generation) for s in shards], dim, extra)


def _prepare_model(
    model: torch.nn.Module, cfg: ExtractConfig, device: torch.device, amp: torch.dtype | None
) -> tuple[torch.nn.Module, int, bool]:
    """The model on the device, tried on a dry batch before anything is written, its output size,
    and whether it runs channels-last. Channels-last first, weights and input: convolutions run
    faster so (resnet18 on 2 CPU cores: 27 → 34 img/s; tiny_cnn's step 0.36 → 0.24 ms per image;
    cuDNN's tensor-core kernels want it too), a ViT is unaffected; a model that cannot (a `.view`
    of a convolution's output) runs planar."""
    model = model.to(device)
    probe = torch.zeros((2, 3, cfg.transform.crop_size, cfg.transform.crop_size), dtype=torch.uint8, device=device)
    for channels_last in (True, False):
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        try:
            out = ModelRunner(model, device, amp, len(probe), channels_last, stats=_stats_of(cfg.transform))(probe)
            break
        except torch.cuda.OutOfMemoryError:
            raise  # not a layout problem: trying planar would only hide it
        except Exception as exc:
            failure = exc
    else:
        raise UserError(
            f"model {cfg.model.label} failed on a {tuple(probe.shape)} batch: "
            f"{type(failure).__name__}: {first_line(failure)}"
        )
    log.debug("model runs %s", "channels-last" if channels_last else "planar")
    check_output(out, 2)
    return model, int(out.shape[1]), channels_last


def _prepare_out(out: Location, run: RunInfo, cfg: ExtractConfig, ctx: dist.DistContext) -> None:
    if ctx.is_main:
        remove_stale_temps(out, CHUNKS, DONE, FAILED, METADATA_DIR)  # the other ranks wait at the barrier below
        if cfg.overwrite:
            clear(out, cfg.names)
        if not check_compatible(out, run):
            write_run(out, run)
    dist.barrier(ctx)
    if not ctx.is_main:
        check_compatible(out, run)


def _embed(
    todo: list[ShardRef],
    runner: ModelRunner,
    cfg: ExtractConfig,
    device: torch.device,
    out: Location,
    fingerprint: str,
    ctx: dist.DistContext,
) -> StageTimer:
    """Batches through the model, rows to the committer. Each batch's features are copied to the
    host behind its model call and read one iteration later, after the next batch is queued
    (readback.py): the device always has work queued while this process fetches the next batch."""
    timer = StageTimer(len(todo))
    if not todo:
        return timer
    bar = _progress_bar(todo, cfg, ctx)
    with ChunkCommitter(out, fingerprint, ctx.rank, timer, cfg.read) as committer:
        previous = None
        for batch in timer.data(_loader(todo, cfg, device)):
            with timer.model():
                images, keep = _on_device(batch, device, cfg.transform, committer.rows(batch.shard).errors)
                feats = _queued(runner(images), len(keep), cfg.normalize) if keep else None
                if previous is not None:
                    bar.update(_read_back(committer, *previous))
                previous = (batch, keep, feats)
            timer.embedded(len(keep))
        with timer.model():
            if previous is not None:
                bar.update(_read_back(committer, *previous))
    bar.close()
    timer.compiled = runner.is_compiled
    return timer


def _loader(todo: list[ShardRef], cfg: ExtractConfig, device: torch.device) -> DataLoader:
    workers = min(cfg.workers, len(todo))
    return DataLoader(
        ShardStream(todo, cfg.transform, cfg.batch_size, cfg.read),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init,
    )


def _progress_bar(todo: list[ShardRef], cfg: ExtractConfig, ctx: dist.DistContext) -> tqdm:
    total = sum(s.expected for s in todo) if all(s.expected is not None for s in todo) else None
    return tqdm(
        total=total,
        unit="img",
        desc=f"extract[{ctx.rank}]" if ctx.active else "extract",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )


def _queued(feats: torch.Tensor, batch: int, normalize: bool) -> PendingFeatures:
    check_output(feats, batch)  # the shape only: no wait on the device
    return PendingFeatures(_unit_on_device(feats) if normalize else feats)


def _unit_on_device(feats: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm on the device, in float32 whatever the model's output type
    (bf16 norms are off by ~0.4%); an all-zero row stays zero, for the commit to record as such."""
    x = feats.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _read_back(committer: ChunkCommitter, batch: Batch, keep: list[int], feats: PendingFeatures | None) -> int:
    """A batch's features to the committer, once their copy is done; returns the samples it accounts for."""
    committer.add(batch, keep, None if feats is None else feats.result())
    return len(batch) + (len(batch.end.errors) if batch.end is not None else 0)


def _on_device(
    batch: Batch, device: torch.device, transform: TransformConfig, errors: list[SampleError]
) -> tuple[torch.Tensor, list[int]]:
    """The batch's uint8 crops on the device, with JPEGs left for the device decoded into their
    slots; a slot that fails to decode is recorded in `errors` and dropped."""
    crops = batch.images.to(device, non_blocking=True)
    keep = list(range(len(batch)))
    if not len(batch.jpegs):
        return crops, keep
    images = torch.empty((len(batch), *crops.shape[1:]), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    if len(crops):
        images[batch.crop_slots] = crops
    decoded, failed = decode_on_device(batch.jpegs.items(), device, transform)
    for slot, crop in decoded.items():
        images[slot] = crop
    for slot, why in failed.items():
        errors.append(SampleError(batch.shard, batch.keys[slot], batch.paths[slot], batch.indices[slot], why))
    if failed:
        keep = [i for i in keep if i not in failed]
        images = images[keep]
    return images, keep


def _worker_init(_: int) -> None:
    # Each worker decodes one image at a time; more threads per worker only fight over the cores.
    torch.set_num_threads(1)


def _stats(
    cfg: ExtractConfig,
    device: torch.device,
    precision: str,
    dim: int,
    timer: StageTimer,
    consolidate_s: float | None,
    result: Consolidated | None,
    seconds: float,
    ctx: dist.DistContext,
) -> dict:
    stages = timer.stage_seconds()
    if consolidate_s is not None:
        stages["consolidate_s"] = round(consolidate_s, 3)
    streaming = timer.streaming_s
    stats = {
        "device": str(device),
        "precision": precision,
        "model": {"repo": cfg.model.repo, "name": cfg.model.name} if not cfg.model.spec else {"model": cfg.model.spec},
        "dim": dim,
        "rank": ctx.rank,
        "world_size": ctx.world,
        "workers": cfg.workers,
        "batch_size": cfg.batch_size,
        "seconds": round(seconds, 3),
        "embedded_this_run": timer.images,
        "shards_this_run": timer.shards,
        "images_per_s": round(timer.images / seconds, 2) if seconds else None,
        # the streaming phase alone: no start-up, model loading or consolidation
        "streaming_images_per_s": round(timer.images / streaming, 2) if streaming else None,
        # and without its first batch (worker start, warm-up, compilation)
        "steady_images_per_s": timer.steady_rate(),
        "compiled": timer.compiled,
        "stage_seconds": stages,
    }
    if result is not None:
        stats.update(rows=result.rows, errors=result.errors, failed_shards=result.failed_shards)
    return stats


def summary(stats: dict, out: str, names: OutputNames) -> str:
    if "rows" not in stats:
        return f"rank {stats['rank']}: embedded {stats['embedded_this_run']} images; rank 0 consolidates"
    failed = f", {len(stats['failed_shards'])} shards failed" if stats["failed_shards"] else ""
    return (
        f"{stats['rows']} images embedded ({stats['dim']}-dim, {stats['device']}, {stats['precision']}), "
        f"{stats['errors']} failed{failed}: {out}/{', '.join(names.all()[:-1])}; "
        f"failures in {names.errors}; {stats['embedded_this_run']} new this run at "
        f"{stats['images_per_s']} img/s"
    )
