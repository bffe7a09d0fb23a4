"""`featpipe pack`: source images → deterministic WebDataset shards, a commit marker each, a manifest.

Shards are planned from the inventory alone (sorted paths and sizes, DEST/listing.parquet), so the
plan, and with it every shard's bytes, is the same whatever the workers or torchrun ranks and
whichever shards a rerun redoes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline import dist
from pipeline.dist import DistContext
from pipeline.errors import UserError, first_line, reason
from pipeline.faults import crash_point
from pipeline.image.decode import has_alpha, open_image, to_rgb, upright
from pipeline.image.header import DEFAULT_MAX_PIXELS, BadImage, Header, probe
from pipeline.listing import SourceFile
from pipeline.pack.inventory import LISTING, Identity, Inventory, Resolver, grow, read_identity
from pipeline.pack.inventory import read as read_inventory
from pipeline.pack.inventory import write as write_inventory
from pipeline.pack.manifest import build_manifest
from pipeline.pack.sources import SourceSpec, identity, load, read_list_bytes, source_kind
from pipeline.readmany import MAX_BYTES_IN_FLIGHT, ReadPolicy, read_many
from pipeline.shardformat import COMMITS_DIR, MANIFEST, MAX_SHARD_SIZE, sample_key, shard_name, write_tar
from pipeline.storage import (
    Location,
    commit_file,
    commit_json,
    ensure_writable,
    locate,
    remove_stale_temps,
    staging_file,
    utf8_json,
)
from pipeline.units import format_bytes

log = logging.getLogger("featpipe")


@dataclass(frozen=True)
class PackConfig:
    src: str
    dest: str
    shard_size: int = 1000
    max_shard_bytes: int = 10**9
    resize_max: int | None = None
    quality: int = 90
    check: str = "header"  # or "decode": fully decode every image while packing
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 1
    overwrite: bool = False
    progress: bool = True
    create_bucket: bool = False
    root: str | None = None  # what a list's relative entries are relative to
    path_column: str = "path"  # in a CSV or Parquet list
    size_column: str = "size"
    relist: bool = False  # list SRC again instead of planning from DEST/listing.parquet
    plan_only: bool = False  # write DEST/listing.parquet and stop
    barrier_timeout_s: float = dist.BARRIER_TIMEOUT_S  # torchrun: how long rank 0 may wait for the slowest rank
    io_concurrency: int | None = None  # reads in flight per worker; None: 64 on stores, 4 on local disks
    io_max_bytes: int = MAX_BYTES_IN_FLIGHT  # source bytes read ahead per worker

    def options(self) -> dict:
        """The settings that shape the shards' bytes (not how fast we get there)."""
        return {
            k: getattr(self, k)
            for k in ("shard_size", "max_shard_bytes", "resize_max", "quality", "check", "max_pixels")
        }


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds the inventory's entries [start, stop), all of one generation."""

    index: int
    start: int
    stop: int
    generation: int = 0


@dataclass(frozen=True)
class ShardTask:
    index: int
    files: tuple[SourceFile, ...]
    fingerprint: str


@dataclass
class PackResult:
    manifest: dict | None  # None on ranks other than 0, and with --plan-only
    packed_shards: int
    skipped_shards: int  # already done by an earlier run
    ranks: list[RankStats]
    planned_shards: int
    planned_files: int


@dataclass(frozen=True)
class RankStats:
    rank: int
    shards: int  # packed by this run (not counting those already done)
    files: int
    source_bytes: int
    seconds: float

    def line(self) -> str:
        rate = self.source_bytes / max(self.seconds, 1e-9) / 1e6
        return (
            f"rank {self.rank}: {self.shards} shards, {self.files} files, {format_bytes(self.source_bytes)} "
            f"in {self.seconds:.1f}s ({rate:.1f} MB/s, {self.files / max(self.seconds, 1e-9):.0f} files/s)"
        )


def validate(cfg: PackConfig) -> None:
    if not 1 <= cfg.shard_size <= MAX_SHARD_SIZE:
        raise UserError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE}, got {cfg.shard_size}")
    if cfg.resize_max is not None and cfg.resize_max < 1:
        raise UserError(f"--resize-max must be a positive number of pixels, got {cfg.resize_max}")
    if not 1 <= cfg.quality <= 100:
        raise UserError(f"--quality must be between 1 and 100, got {cfg.quality}")
    if cfg.workers < 1:
        raise UserError(f"--workers must be at least 1, got {cfg.workers}")


def plan(inv: Inventory, cfg: PackConfig) -> list[ShardPlan]:
    """Consecutive entries of one generation (so a later listing only adds shards), a new shard at
    --shard-size files or when the next file would take it past --max-shard-bytes (a file larger
    than that gets a shard of its own). One binary search per shard over the running byte total:
    1M entries plan in milliseconds."""
    total = np.concatenate([[0], np.cumsum(inv.sizes, dtype=np.int64)])
    shards: list[ShardPlan] = []
    for gen, start, stop in inv.segments():
        while start < stop:
            by_bytes = int(np.searchsorted(total, total[start] + cfg.max_shard_bytes, side="right")) - 1
            end = max(start + 1, min(start + cfg.shard_size, by_bytes, stop))
            shards.append(ShardPlan(len(shards), start, end, gen))
            start = end
    return shards


def fingerprint(inv: Inventory, shard: ShardPlan, cfg: PackConfig) -> str:
    """What a shard's bytes depend on: the options and its entries' names and sizes."""
    h = hashlib.sha256(json.dumps(cfg.options(), sort_keys=True).encode())
    names = inv.relpaths[shard.start : shard.stop].to_pylist()
    sizes = inv.sizes[shard.start : shard.stop].tolist()
    h.update(b"".join(b"\0%s\0%d" % (name, size) for name, size in zip(names, sizes, strict=True)))
    return h.hexdigest()[:16]


def task(inv: Inventory, resolver: Resolver, shard: ShardPlan, cfg: PackConfig) -> ShardTask:
    files = resolver.files(inv.relpaths[shard.start : shard.stop], inv.sizes[shard.start : shard.stop])
    return ShardTask(shard.index, files, fingerprint(inv, shard, cfg))


def run_pack(cfg: PackConfig) -> PackResult:
    """Plan on rank 0 (list SRC, or reuse DEST/listing.parquet), then every rank packs its slice
    of the shards (`shards[rank::world]`, skipping committed ones); rank 0 writes the manifest once
    every rank is done. One process is the world of one."""
    validate(cfg)
    ctx = DistContext.from_env()
    dest = locate(cfg.dest)
    dist.init(ctx, "cpu", cfg.barrier_timeout_s)
    try:
        # Rank 0 lists and checks DEST while the others wait; they read the plan it wrote and get
        # the finished shards' numbers, rank 0 keeps their records for the manifest.
        prepared = dist.from_main(ctx, lambda: _prepare(cfg, dest), share=lambda p: set(p[1]))
        inv, finished = prepared if ctx.is_main else (read_inventory(dest), {})
        done = set(finished) if ctx.is_main else prepared
        shards = plan(inv, cfg)
        if cfg.plan_only:
            return PackResult(None, 0, len(done), [], len(shards), len(inv))
        mine = [s for s in shards[ctx.rank :: ctx.world] if s.index not in done]
        stats, records = _pack_mine(inv, mine, dest, cfg, ctx)
        ranks = dist.gather(ctx, stats)  # and the barrier: every shard is committed past it
        manifest = None
        if ctx.is_main:
            records.update(finished)
            records.update(_markers(dest, [s.index for s in shards if s.index not in records]))
            in_order = [(records[s.index], s.generation) for s in shards]
            manifest = build_manifest(cfg.src, cfg.options(), cfg.root, inv, dest.url(), in_order)
            commit_json(dest.fs, dest.join(MANIFEST), manifest)
    finally:
        dist.shutdown(ctx)
    return PackResult(manifest, len(mine), len(done), ranks, len(shards), len(inv))


def _prepare(cfg: PackConfig, dest: Location) -> tuple[Inventory, dict[int, dict]]:
    """Rank 0, alone: DEST writable and cleared if asked, the inventory in DEST/listing.parquet,
    and which shards a previous run finished (refusing shards packed from other files)."""
    spec = SourceSpec(cfg.src, cfg.root, cfg.path_column, cfg.size_column)
    kind = source_kind(spec)
    list_bytes = read_list_bytes(spec) if kind == "list" else None
    wanted = identity(spec, kind, list_bytes)
    have = not cfg.overwrite and _reusable(dest, wanted, cfg)
    reuse = have and not cfg.relist
    ensure_writable(dest, cfg.create_bucket)  # before a walk that may take hours; it leaves no trace
    inv = read_inventory(dest) if reuse else load(spec, kind, _dest_inside(cfg), list_bytes)
    if have and cfg.relist:
        old = read_inventory(dest)
        inv = grow(old, inv)
        if inv.generation > old.generation:
            added, gone = len(inv) - len(old), int((inv.removed == inv.generation).sum())
            log.info("listing %d: %d new entries (new shards after the last), %d gone", inv.generation, added, gone)
    remove_stale_temps(dest, COMMITS_DIR)
    if cfg.overwrite:
        _clear(dest)
    shards = plan(inv, cfg)
    done = _committed(dest, inv, shards, cfg)
    if reuse:
        log.info("planned from %s (%d entries); --relist to list %s again", dest.join(LISTING), len(inv), cfg.src)
    else:
        write_inventory(dest, inv)
    log.info("%d shards planned from %d files, %d already packed", len(shards), len(inv), len(done))
    return inv, done


def _reusable(dest: Location, wanted: Identity, cfg: PackConfig) -> bool:
    """Whether DEST holds this source's listing.parquet (a rerun plans from it, a relist grows it);
    another source's is refused."""
    try:
        have = read_identity(dest)
    except Exception as exc:
        raise UserError(
            f"{dest.join(LISTING)} is unreadable ({first_line(exc)}); use --overwrite to start over"
        ) from None
    if have is None:
        return False
    if not have.same_source(wanted):
        raise UserError(
            f"{dest.url()} was packed from {have.source}, not {wanted.source}; "
            "use --overwrite to start over, or another DEST"
        )
    if have.list_sha256 != wanted.list_sha256 and not cfg.relist:
        raise UserError(
            f"list {cfg.src} changed since {dest.join(LISTING)} was written; pass --relist to pack what it adds "
            "(new shards) and record what it dropped, or --overwrite to start over"
        )
    return True


def _dest_inside(cfg: PackConfig) -> str | None:
    """DEST inside SRC: its own shards are not source files."""
    dest, src = locate(cfg.dest), locate(cfg.src)
    return dest.path if type(dest.fs) is type(src.fs) and dest.path.startswith(src.path.rstrip("/") + "/") else None


def _pack_mine(
    inv: Inventory, mine: list[ShardPlan], dest: Location, cfg: PackConfig, ctx: DistContext
) -> tuple[RankStats, dict[int, dict]]:
    resolver = inv.resolver()
    todo = [task(inv, resolver, s, cfg) for s in mine]
    t0 = time.perf_counter()
    records: dict[int, dict] = {}
    desc = f"pack {ctx.rank}/{ctx.world}" if ctx.active else "pack"
    bar = tqdm(
        total=sum(len(t.files) for t in todo),
        unit="file",
        disable=not cfg.progress,
        desc=desc,
        position=ctx.rank if ctx.active else None,
        dynamic_ncols=True,
    )
    nbytes = 0
    for rec in _run_tasks(todo, resolver.location.fs, dest, cfg):
        records[rec["index"]] = rec
        nbytes += rec["source_bytes"]
        bar.update(rec["files"])
        bar.set_postfix_str(f"{nbytes / max(time.perf_counter() - t0, 1e-9) / 1e6:.1f} MB/s")
        crash_point("after-shard", ctx.rank)
    bar.close()
    stats = RankStats(ctx.rank, len(todo), sum(len(t.files) for t in todo), nbytes, time.perf_counter() - t0)
    if ctx.active:
        log.info("%s", stats.line())
    return stats, records


def _run_tasks(
    todo: list[ShardTask], src_fs: fsspec.AbstractFileSystem, dest: Location, cfg: PackConfig
) -> Iterator[dict]:
    if cfg.workers == 1 or len(todo) <= 1:
        for t in todo:
            yield pack_shard(t, src_fs, dest, cfg)
        return
    # spawn, not fork: a forked child would inherit the async event loop of s3fs/gcsfs.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(cfg.workers, len(todo)), mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        futures = [pool.submit(pack_shard, t, src_fs, dest, cfg) for t in todo]
        for fut in as_completed(futures):
            yield fut.result()


def die_with_parent(parent: int) -> None:
    """A worker ends when the pack process does, even by SIGKILL, which runs no cleanup: the
    kernel's parent-death signal where there is one, and a watchdog thread besides."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != parent:  # died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="featpipe-parent-watch").start()


def pack_shard(task: ShardTask, src_fs: fsspec.AbstractFileSystem, dest: Location, cfg: PackConfig) -> dict:
    """Write one shard under a temporary name, publish it, then its commit marker."""
    name = shard_name(task.index)
    final = dest.join(name + ".tar")
    staged = staging_file(dest.fs, final)
    samples: list[dict] = []
    skipped: list[dict] = []
    source_bytes = 0

    def members() -> Iterator[tuple[str, bytes]]:
        nonlocal source_bytes
        paths, sizes = [f.fs_path for f in task.files], [f.size for f in task.files]
        for i, data in read_many(src_fs, paths, sizes, ReadPolicy(cfg.io_concurrency, cfg.io_max_bytes)):
            f = task.files[i]
            if isinstance(data, BaseException):
                skipped.append({"path": f.path, "reason": f"cannot read: {reason(data)}"})
                continue
            source_bytes += len(data)
            try:
                info = probe(data, cfg.max_pixels, full_decode=cfg.check == "decode")
                meta = {
                    "path": f.path,
                    "relpath": f.relpath,
                    "size": len(data),
                    "width": info.width,
                    "height": info.height,
                    "format": info.format,
                }
                if cfg.resize_max and max(info.width, info.height) > cfg.resize_max:
                    data, info = _shrink(data, cfg.resize_max, cfg.quality, cfg.max_pixels)
                    meta.update(
                        orig_width=meta["width"],
                        orig_height=meta["height"],
                        orig_format=meta["format"],
                        width=info.width,
                        height=info.height,
                        format=info.format,
                        stored_size=len(data),
                    )
            except BadImage as exc:
                skipped.append({"path": f.path, "reason": str(exc)})
                continue
            key = sample_key(task.index, len(samples))
            meta.update(key=key, shard=name, index=len(samples), field=info.ext)
            samples.append(meta)
            yield f"{key}.{info.ext}", data
            yield f"{key}.json", utf8_json(meta)

    try:
        with open(staged, "wb") as out:
            write_tar(out, members())
        size = os.path.getsize(staged)
        commit_file(dest.fs, staged, final)
    except BaseException:
        if os.path.exists(staged):
            os.remove(staged)
        raise
    record = {
        "index": task.index,
        "name": name + ".tar",
        "samples": len(samples),
        "bytes": size,
        "files": len(task.files),
        "source_bytes": source_bytes,
        "skipped": skipped,
        "fingerprint": task.fingerprint,
    }
    commit_json(dest.fs, dest.join(COMMITS_DIR, name + ".json"), record)
    return record


def _shrink(data: bytes, resize_max: int, quality: int, max_pixels: int) -> tuple[bytes, Header]:
    try:
        im = upright(open_image(data, max_pixels))
        scale = resize_max / max(im.width, im.height)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        out = io.BytesIO()
        if has_alpha(im):
            im.convert("RGBA").resize(size, Image.Resampling.BICUBIC).save(out, "PNG")
        else:
            im = to_rgb(im) if im.mode not in ("L", "RGB") else im
            im.resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=quality)
    except Exception as exc:
        raise BadImage(f"cannot decode to resize: {reason(exc)}") from None
    new = out.getvalue()
    return new, probe(new)


def _committed(dest: Location, inv: Inventory, shards: list[ShardPlan], cfg: PackConfig) -> dict[int, dict]:
    """The commit records of shards a previous run finished with the same plan; a marker from
    another plan is refused."""
    marker_dir = dest.join(COMMITS_DIR)
    if not dest.fs.exists(marker_dir):
        return {}
    existing = {os.path.basename(p) for p in dest.fs.ls(marker_dir, detail=False)}
    ours = [s for s in shards if shard_name(s.index) + ".json" in existing]
    done = _markers(dest, [s.index for s in ours])
    for s in ours:
        if done[s.index].get("fingerprint") != fingerprint(inv, s, cfg):
            raise UserError(
                f"{dest.url()} holds shards packed from other files or options "
                f"({shard_name(s.index)} differs); use --overwrite to start over, or another DEST"
            )
    return done


def _markers(dest: Location, indices: list[int]) -> dict[int, dict]:
    """The commit records of these shards, in order; fetched concurrently from an object store."""
    paths = [dest.join(COMMITS_DIR, shard_name(i) + ".json") for i in indices]
    if not paths:
        return {}
    found = dest.fs.cat(paths, on_error="return") if not dest.is_local else {p: dest.fs.cat_file(p) for p in paths}
    records = {}
    for i, p in zip(indices, paths, strict=True):
        data = found.get(p)
        if not isinstance(data, bytes):
            raise UserError(f"{dest.url(p)} is missing or unreadable; rerun to pack that shard again")
        records[i] = json.loads(data)
    return records


def _clear(dest: Location) -> None:
    fs = dest.fs
    for p in fs.glob(dest.join("shard-*.tar")):
        fs.rm_file(p)
    for p in (dest.join(COMMITS_DIR), dest.join(MANIFEST), dest.join(LISTING)):
        if fs.exists(p):
            fs.rm(p, recursive=True)


def summary(result: PackResult, seconds: float) -> str:
    """Rank 0's closing lines: the whole job, then each rank's share when there were several."""
    if result.manifest is None:
        return (
            f"planned {result.planned_shards} shards from {result.planned_files} files in {seconds:.1f}s, "
            f"{result.skipped_shards} already packed; nothing packed (--plan-only)"
        )
    t = result.manifest["totals"]
    listed = result.manifest.get("list")
    repeats = f", {listed['duplicate_entries']} duplicate entries packed once" if listed else ""
    total = (
        f"packed {t['samples']} images into {t['shards']} shards ({format_bytes(t['bytes'])}) "
        f"at {result.manifest['destination']} in {seconds:.1f}s; {t['skipped']} skipped, "
        f"{t['ignored_non_images']} non-image files ignored{repeats}, {result.skipped_shards} shards already done"
    )
    if len(result.ranks) < 2:
        return total
    return "\n".join([total, *(r.line() for r in result.ranks)])
