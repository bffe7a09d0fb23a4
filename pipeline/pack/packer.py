"""`featpipe pack`: source images → deterministic WebDataset shards, a commit marker each, a manifest.

Shards are planned from the listing alone (sorted paths and sizes), so the plan, and with it every
shard's bytes, is the same whatever the number of workers and whichever shards a rerun redoes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import fsspec
from PIL import Image
from tqdm.auto import tqdm

from pipeline import __version__
from pipeline.errors import UserError, reason
from pipeline.image.decode import has_alpha, open_image, to_rgb, upright
from pipeline.image.header import DEFAULT_MAX_PIXELS, BadImage, Header, probe
from pipeline.listing import Listing, SourceFile, list_images
from pipeline.shardformat import COMMITS_DIR, MANIFEST, MAX_SHARD_SIZE, sample_key, shard_name, write_tar
from pipeline.storage import (
    Location,
    commit_file,
    commit_json,
    ensure_writable,
    locate,
    read_json,
    remove_stale_temps,
    staging_file,
    utf8_json,
)
from pipeline.units import format_bytes


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

    def options(self) -> dict:
        """The settings that shape the shards' bytes (not how fast we get there)."""
        return {
            k: getattr(self, k)
            for k in ("shard_size", "max_shard_bytes", "resize_max", "quality", "check", "max_pixels")
        }


@dataclass(frozen=True)
class ShardTask:
    index: int
    files: tuple[SourceFile, ...]
    fingerprint: str


@dataclass
class PackResult:
    manifest: dict
    packed_shards: int
    skipped_shards: int


def validate(cfg: PackConfig) -> None:
    if not 1 <= cfg.shard_size <= MAX_SHARD_SIZE:
        raise UserError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE}, got {cfg.shard_size}")
    if cfg.resize_max is not None and cfg.resize_max < 1:
        raise UserError(f"--resize-max must be a positive number of pixels, got {cfg.resize_max}")
    if not 1 <= cfg.quality <= 100:
        raise UserError(f"--quality must be between 1 and 100, got {cfg.quality}")
    if cfg.workers < 1:
        raise UserError(f"--workers must be at least 1, got {cfg.workers}")


def plan(files: list[SourceFile], cfg: PackConfig) -> list[ShardTask]:
    groups: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    current_bytes = 0
    for f in files:
        if current and (len(current) >= cfg.shard_size or current_bytes + f.size > cfg.max_shard_bytes):
            groups.append(current)
            current, current_bytes = [], 0
        current.append(f)
        current_bytes += f.size
    if current:
        groups.append(current)
    opts = json.dumps(cfg.options(), sort_keys=True)
    return [ShardTask(i, tuple(g), _fingerprint(opts, g)) for i, g in enumerate(groups)]


def _fingerprint(options: str, files: list[SourceFile]) -> str:
    h = hashlib.sha256(options.encode())
    for f in files:
        h.update(f"\0{f.relpath}\0{f.size}".encode("utf-8", "surrogateescape"))  # names need not be UTF-8
    return h.hexdigest()[:16]


def run_pack(cfg: PackConfig) -> PackResult:
    validate(cfg)
    dest = locate(cfg.dest)
    src = locate(cfg.src)
    inside = dest.path if type(dest.fs) is type(src.fs) and dest.path.startswith(src.path.rstrip("/") + "/") else None
    listing = list_images(cfg.src, exclude=inside)  # DEST inside SRC: its own shards are not source files
    ensure_writable(dest, cfg.create_bucket)
    remove_stale_temps(dest, COMMITS_DIR)
    if cfg.overwrite:
        _clear(dest)
    tasks = plan(listing.files, cfg)
    done = _committed(dest, tasks)
    todo = [t for t in tasks if t.index not in done]
    t0 = time.perf_counter()
    records = dict(done)
    bar = tqdm(
        total=sum(len(t.files) for t in todo), unit="file", disable=not cfg.progress, desc="pack", dynamic_ncols=True
    )
    nbytes = 0
    for rec in _run_tasks(todo, dest, cfg):
        records[rec["index"]] = rec
        nbytes += rec["source_bytes"]
        bar.update(rec["files"])
        bar.set_postfix_str(f"{nbytes / max(time.perf_counter() - t0, 1e-9) / 1e6:.1f} MB/s")
    bar.close()
    manifest = _manifest(cfg, listing, dest, [records[t.index] for t in tasks])
    commit_json(dest.fs, dest.join(MANIFEST), manifest)
    return PackResult(manifest, len(todo), len(done))


def _run_tasks(todo: list[ShardTask], dest: Location, cfg: PackConfig) -> Iterator[dict]:
    src_fs = locate(cfg.src).fs
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
        for f in task.files:
            try:
                data = src_fs.cat_file(f.fs_path)
            except Exception as exc:
                skipped.append({"path": f.path, "reason": f"cannot read: {reason(exc)}"})
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


def _committed(dest: Location, tasks: list[ShardTask]) -> dict[int, dict]:
    """Shards a previous run finished with the same plan; a marker from another plan is refused."""
    marker_dir = dest.join(COMMITS_DIR)
    if not dest.fs.exists(marker_dir):
        return {}
    done: dict[int, dict] = {}
    existing = {os.path.basename(p) for p in dest.fs.ls(marker_dir, detail=False)}
    for t in tasks:
        fname = shard_name(t.index) + ".json"
        if fname not in existing:
            continue
        rec = read_json(dest.fs, dest.join(COMMITS_DIR, fname))
        if rec.get("fingerprint") != t.fingerprint:
            raise UserError(
                f"{dest.url()} holds shards packed from other files or options "
                f"({fname} differs); use --overwrite to start over, or another DEST"
            )
        done[t.index] = rec
    return done


def _clear(dest: Location) -> None:
    fs = dest.fs
    for p in fs.glob(dest.join("shard-*.tar")):
        fs.rm_file(p)
    for p in (dest.join(COMMITS_DIR), dest.join(MANIFEST)):
        if fs.exists(p):
            fs.rm(p, recursive=True)


def _manifest(cfg: PackConfig, listing: Listing, dest: Location, records: list[dict]) -> dict:
    shards = [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"]} for r in records]
    skipped = [s for r in records for s in r["skipped"]]
    return {
        "featpipe_version": __version__,
        "source": cfg.src,
        "destination": dest.url(),
        "options": cfg.options(),
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "image_files": len(listing.files),
            "skipped": len(skipped),
            "ignored_non_images": listing.ignored,
        },
        "skipped": skipped,
    }


def summary(result: PackResult, seconds: float) -> str:
    t = result.manifest["totals"]
    return (
        f"packed {t['samples']} images into {t['shards']} shards ({format_bytes(t['bytes'])}) "
        f"at {result.manifest['destination']} in {seconds:.1f}s; {t['skipped']} skipped, "
        f"{t['ignored_non_images']} non-image files ignored, {result.skipped_shards} shards already done"
    )
