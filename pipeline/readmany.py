"""Many object reads in flight, results in input order: the one helper pack, folder-mode extract
and show use to read loose objects.

A store answers a small GET after 10–50 ms in-region (more across regions); one read at a time
leaves a worker waiting on that latency for every image (measured here through a loopback proxy
adding 40 ms: 50 objects one by one 4.8 s, all in flight 0.8 s). So reads are kept in flight up to
`concurrency` objects and `max_bytes` bytes (read ahead but not yet consumed, so a run of 50 MB
files stays bounded), and handed back strictly in input order, so what is written from them is the
same whatever order the store answers in.

An async filesystem (s3fs, gcsfs, HTTP) gets its `_cat_file` coroutines scheduled on its own event
loop (no thread per read, and no HEAD before the GET as `open` does); any other (local disks, NFS)
gets a thread pool. A transient failure is retried with exponential backoff; a missing or
forbidden object is not. What still fails comes back as the exception, for the caller to record.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import first_line
from pipeline.storage import UNREADABLE, retrying

log = logging.getLogger("featpipe")

# Reads in flight per process: 64 hide ~50 ms of latency at ~1,300 small objects/s, img2dataset's
# figure per machine; a local disk gains little past a few (the page cache or one device queue).
REMOTE_CONCURRENCY = 64
LOCAL_CONCURRENCY = 4
# Bytes read ahead per worker: a body in flight costs ~4× its size at the peak (the client's chunk
# buffers, their join, the tar writer's copy): with 256 MB, a pack worker on 19 MB images peaked at
# 1,246 MB RSS (make bench); 64 MB still keeps ~1.6 GB/s in flight at 40 ms.
MAX_BYTES_IN_FLIGHT = 64 << 20


@dataclass(frozen=True)
class ReadPolicy:
    concurrency: int | None = None  # None: by filesystem (REMOTE_CONCURRENCY or LOCAL_CONCURRENCY)
    max_bytes: int = MAX_BYTES_IN_FLIGHT
    retries: int = 3
    backoff_s: float = 0.5

    def for_fs(self, fs: fsspec.AbstractFileSystem) -> int:
        if self.concurrency is not None:
            return self.concurrency
        return LOCAL_CONCURRENCY if isinstance(fs, LocalFileSystem) else REMOTE_CONCURRENCY


def read_many(
    fs: fsspec.AbstractFileSystem,
    paths: Sequence[str],
    sizes: Sequence[int] | None = None,
    policy: ReadPolicy = ReadPolicy(),
) -> Iterator[tuple[int, bytes | BaseException]]:
    """(index, bytes or the exception) for each path, in input order. `sizes` (when known) bound
    the bytes in flight; at least one read is always in flight."""
    concurrency = max(1, policy.for_fs(fs))
    submit, close = _async_submitter(fs, policy) if _is_async(fs) else _thread_submitter(fs, policy, concurrency)
    window: deque[tuple[int, Future, int]] = deque()
    held = nxt = 0
    try:
        while nxt < len(paths) or window:
            while nxt < len(paths) and len(window) < concurrency:
                size = sizes[nxt] if sizes is not None and sizes[nxt] > 0 else 0
                if window and held + size > policy.max_bytes:
                    break
                window.append((nxt, submit(paths[nxt]), size))
                held += size
                nxt += 1
            i, future, size = window.popleft()
            try:
                result: bytes | BaseException = future.result()
            except Exception as exc:
                result = exc
            held -= size
            yield i, result
    finally:
        for _, future, _ in window:
            future.cancel()
        close()


def _is_async(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, AsyncFileSystem) and hasattr(fs, "_cat_file") and fs.loop is not None


def _one_get(fs: fsspec.AbstractFileSystem) -> dict:
    """s3fs ≥ 2026 asks for each object's size first (a HEAD, 100 extra requests for 100 images in a
    fresh DataLoader worker, measured at the fault proxy) to split large objects into ranged GETs:
    these are whole images, one GET each."""
    cat = getattr(fs, "_cat_file", fs.cat_file)
    return {"max_concurrency": 1} if "max_concurrency" in inspect.signature(cat).parameters else {}


def _async_submitter(fs: AsyncFileSystem, policy: ReadPolicy) -> tuple[Callable[[str], Future], Callable[[], None]]:
    one_get = _one_get(fs)

    async def get(path: str) -> bytes:
        for attempt in range(policy.retries + 1):
            try:
                return await fs._cat_file(path, **one_get)
            except UNREADABLE:
                raise
            except Exception as exc:
                if attempt == policy.retries:
                    raise
                log.debug("%s: %s; retry %d of %d", path, first_line(exc), attempt + 1, policy.retries)
                await asyncio.sleep(policy.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    return (lambda path: asyncio.run_coroutine_threadsafe(get(path), fs.loop)), (lambda: None)


def _thread_submitter(
    fs: fsspec.AbstractFileSystem, policy: ReadPolicy, concurrency: int
) -> tuple[Callable[[str], Future], Callable[[], None]]:
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="featpipe-read")
    one_get = _one_get(fs)

    def get(path: str) -> bytes:
        return retrying(lambda: fs.cat_file(path, **one_get), policy.retries, policy.backoff_s, f"read {path}")

    return (lambda path: pool.submit(get, path)), (lambda: pool.shutdown(wait=False, cancel_futures=True))
