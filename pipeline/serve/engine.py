"""What the service does, as plain functions over `featpipe query`'s Target and Embedder: search by
an uploaded image, a row, a key or path, a vector, a text or (when allowed) a public image URL.

Queries arriving together are searched together: each request's crop (an image) or vector (a row,
key or vector query) waits up to `batch_wait_s` (or until `max_batch` are waiting) in a queue, then
one model call embeds the crops and one index call searches them all (a Flat index searches a batch
with one matrix product), and each request gets its own hits back. The queue is bounded: past
`queue` waiting queries a request is answered 503 with Retry-After at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.errors import UserError
from pipeline.fetch import Forbidden, fetch_url
from pipeline.image.header import BadImage
from pipeline.retrieve.query import Embedder, Hit, Target, search_hits, unit_rows
from pipeline.serve.metrics import Metrics

log = logging.getLogger("featpipe")


@dataclass(frozen=True)
class Limits:
    default_k: int = 10
    max_k: int = 1000  # k + offset, per request
    max_upload: int = 20 << 20  # bytes of one uploaded image (counted while it streams in)
    max_batch: int = 32  # images embedded in one model call
    batch_wait_s: float = 0.005  # how long the first image of a batch waits for company
    queue: int = 256  # images waiting; more are answered 503
    allow_urls: bool = False
    url_timeout_s: float = 10.0
    thumb: int = 160
    thumb_cache: int = 4096
    reload_s: float = 30.0  # how often the index's files are checked for an update (0: never)
    read_timeout_s: float = 15.0  # a request's headers, or a pause in its body, longer than this: closed
    url_fetches: int = 8  # URL queries fetched at once (their own threads: uploads never wait on them)


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.close = close  # answer with Connection: close


def _bad(code: str, message: str, status: int = 422) -> ServiceError:
    return ServiceError(status, code, message)


def _public_model(model: dict | None) -> str | None:
    """The model as a name: a local hub folder or weights file is named by its last part, never by
    the path it has on the serving machine."""
    if not model:
        return None
    if model.get("model"):
        source = str(model["model"])
        kind, _, ident = source.partition(":")
        return f"{kind}:{ident.rstrip('/').rsplit('/', 1)[-1]}" if ident.startswith(("/", ".", "~")) else source
    repo = str(model.get("repo", "")).rstrip("/")
    repo = repo.rsplit("/", 1)[-1] if repo.startswith(("/", ".", "~")) else repo
    weights = model.get("weights")
    return f"{repo}/{model.get('name')}" + (f" (weights {str(weights).rsplit('/', 1)[-1]})" if weights else "")


class Engine:
    """The loaded index (or features) and model; thread-safe searches; the image batcher."""

    def __init__(self, spec: str, device: str = "cpu", limits: Limits = Limits()):
        self.limits = limits
        self.metrics = Metrics()
        self.spec = spec
        self.target = Target(spec)
        self.target.warm()
        self._stamp, self._refused, self.reloads = self.target.stamp(), "", 0
        self.embedder = Embedder(self.target.embedder, spec, device) if self.target.embedder else None
        self._model = ThreadPoolExecutor(1, thread_name_prefix="featpipe-model")  # one model call at a time
        self._decode = ThreadPoolExecutor(4, thread_name_prefix="featpipe-decode")
        # URL fetches wait on other servers: their own threads, so slow ones never hold an upload's decode
        self._fetch = ThreadPoolExecutor(limits.url_fetches, thread_name_prefix="featpipe-fetch")
        self._fetching = 0
        # Thumbnails read shards: their own few threads, off the event loop
        self._thumb_pool = ThreadPoolExecutor(4, thread_name_prefix="featpipe-thumb")
        self._waiting: list[tuple] = []
        self._wake: asyncio.Event | None = None
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()

    # -- what the service knows ----------------------------------------------------------------

    def info(self) -> dict:
        t = self.target
        meta = t.meta or {}
        embedder = t.embedder or {}
        return {
            "n": t.n,
            "dim": t.dim,
            "index": meta.get("index_key", "exact search over the features"),
            "estimated_recall_at_10": meta.get("estimated_recall_at_10", 1.0),
            "model": _public_model(embedder.get("model")),
            "transform": embedder.get("transform"),
            "image_queries": self.embedder is not None,
            "text_queries": bool(self.embedder and self.embedder.text),
            "generation": meta.get("generation"),
            "reloads": self.reloads,
            "limits": asdict(self.limits),
        }

    # -- a dataset that grows: the index updated under a running service -------------------------

    def refresh(self) -> bool:
        """Load the target again when its files changed (`index --update`, features extracted again)
        and swap it in whole: each request reads `self.target` once, so it runs on one or the other.
        While the new files cannot be loaded (features grown, the index not updated yet) the loaded
        target keeps serving, and the next check tries again."""
        stamp = self.target.stamp()
        if stamp == self._stamp:
            return False
        try:
            fresh = Target(self.spec)
            fresh.warm()
        except UserError as exc:
            if str(exc) != self._refused:  # said once, not every few seconds
                log.warning("%s changed; still serving the loaded one: %s", self.spec, exc)
            self._refused = str(exc)
            return False
        if fresh.embedder != self.target.embedder:
            log.warning("%s now records another model; restart the service to load it", self.spec)
            self._stamp = stamp
            return False
        with self._thumb_lock:
            self._thumbs.clear()
        self.target, self._stamp, self._refused = fresh, stamp, ""
        self.reloads += 1
        generation = (fresh.meta or {}).get("generation")
        log.info("%s reloaded: %d rows, generation %s", self.spec, fresh.n, generation)
        return True

    def watch(self) -> None:
        """Check for an update every `reload_s` seconds, for the life of the process (a thread)."""
        while self.limits.reload_s > 0:
            time.sleep(self.limits.reload_s)
            try:
                self.refresh()
            except Exception as exc:  # a half-written file from a store, say: the next check retries
                log.warning("checking %s for an update failed: %s", self.spec, exc)

    def check_k(self, k: int | None, offset: int | None) -> tuple[int, int]:
        k = self.limits.default_k if k is None else k
        offset = offset or 0
        if not isinstance(k, int) or not isinstance(offset, int) or k < 1 or offset < 0:
            raise _bad("bad_k", "k must be an integer ≥ 1 and offset an integer ≥ 0")
        if k + offset > self.limits.max_k:
            raise _bad("bad_k", f"k + offset must be at most {self.limits.max_k}, got {k + offset}")
        return k, offset

    # -- searches by row, key, vector (batched) and text ------------------------------------------

    def by_vectors(self, label: str, x: np.ndarray, k: int, offset: int) -> list[Hit]:
        """One search, now, in the calling thread (text queries: their embedding is the cost)."""
        try:
            return search_hits(self.target, [label], x, k, offset)  # one read of self.target
        except UserError as exc:
            raise _bad("bad_vector", str(exc)) from None

    async def by_row(self, row: int, k: int, offset: int) -> list[Hit]:
        target = self.target
        n = target.n
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < n:
            raise ServiceError(404, "unknown_row", f"no row {row} in the index (it has rows 0 to {n - 1})")
        return await self._batched(None, self._usable(target.vector_of(row), f"row {row}"), k, offset, f"row {row}")

    async def by_key(self, key: str, k: int, offset: int) -> list[Hit]:
        target = self.target
        row = target.row(key)
        if row is None:
            raise ServiceError(404, "unknown_key", "no such key or path in the index")
        return await self._batched(None, self._usable(target.vector_of(row), key), k, offset, key)

    async def by_vector(self, values: object, k: int, offset: int) -> list[Hit]:
        try:
            x = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise _bad("bad_vector", "vector must be a flat list of numbers") from None
        if x.ndim != 1 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise _bad("bad_vector", "vector must be a flat list of numbers (one vector, not a list of them)")
        dim = self.target.dim
        if x.shape[0] != dim:
            raise _bad("bad_vector", f"the index holds {dim}-dim vectors; this one has {x.shape[0]}")
        return await self._batched(None, self._usable(x, "the vector"), k, offset, "vector")

    @staticmethod
    def _usable(x: np.ndarray, what: str) -> np.ndarray:
        """A unit vector a batch can carry (scaled in float64: [3e38]*D has a direction too); one
        NaN or zero vector must not fail the others' search."""
        x = np.asarray(x, np.float64).reshape(1, -1)
        if not np.isfinite(x).all() or not np.abs(x).sum() > 0:
            raise _bad("bad_vector", f"{what} is a NaN, infinite or all-zero vector: it has no direction to search")
        return unit_rows(x).reshape(-1)

    def by_text(self, text: str, k: int, offset: int) -> list[Hit]:
        if not self.embedder or not self.embedder.text:
            raise _bad("no_text_model", "the model that made this index has no text tower: search by image or row")
        if not isinstance(text, str) or not text.strip() or len(text) > 1000:
            raise _bad("bad_text", "text must be 1 to 1000 characters")
        return self.by_vectors(f"text: {text}", self.embedder.texts([text]), k, offset)

    # -- image queries: decoded in threads, embedded in batches ---------------------------------

    async def by_image(self, data: bytes, k: int, offset: int) -> list[Hit]:
        if self.embedder is None:
            raise _bad("no_model", "this index records no model: search by row, key or vector")
        if not data:
            raise _bad("empty", "the upload is empty")
        loop = asyncio.get_running_loop()
        crop = await loop.run_in_executor(self._decode, self._crop, data)
        return await self._batched(crop, None, k, offset, "image")

    async def by_url(self, url: str, k: int, offset: int) -> list[Hit]:
        if not self.limits.allow_urls:
            raise ServiceError(400, "urls_disabled", "searching by URL is off (start the service with --allow-urls)")
        if self._fetching >= 2 * self.limits.url_fetches:
            raise ServiceError(503, "busy", "too many URL fetches waiting; retry shortly", retry_after=1)
        loop = asyncio.get_running_loop()
        limits = self.limits
        self._fetching += 1
        try:
            data = await loop.run_in_executor(
                self._fetch, lambda: fetch_url(url, limits.url_timeout_s, limits.max_upload, True)
            )
        except Forbidden as exc:
            raise ServiceError(400, "url_forbidden", str(exc)) from None
        except UserError as exc:
            raise ServiceError(400, "url_failed", str(exc)) from None
        finally:
            self._fetching -= 1
        return await self.by_image(data, k, offset)

    def _crop(self, data: bytes):
        try:
            return self.embedder.crop(data, "")
        except UserError as exc:
            if "over the limit of" in str(exc) or "DecompressionBomb" in str(exc):
                raise ServiceError(413, "too_many_pixels", str(exc)) from None
            raise _bad("not_an_image", str(exc)) from None
        except BadImage as exc:
            raise _bad("not_an_image", str(exc)) from None

    async def _batched(self, crop, vector: np.ndarray | None, k: int, offset: int, label: str) -> list[Hit]:
        """A crop to embed, or a vector, searched with whatever else is waiting."""
        if len(self._waiting) >= self.limits.queue:
            raise ServiceError(503, "busy", "too many queries waiting; retry shortly", retry_after=1)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((crop, vector, k, offset, label, future))
        if self._wake is None:
            self._wake = asyncio.Event()
            self._batch_task = loop.create_task(self._batch_loop())
        self._wake.set()
        return await future

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if len(self._waiting) < self.limits.max_batch:
                await asyncio.sleep(self.limits.batch_wait_s)
            batch, self._waiting = self._waiting[: self.limits.max_batch], self._waiting[self.limits.max_batch :]
            if not self._waiting:
                self._wake.clear()
            if not batch:
                continue
            self.metrics.batch(len(batch))
            try:
                results = await loop.run_in_executor(self._model, self._embed_and_search, batch)
            except Exception as exc:  # handed to every request of the batch
                results = [exc] * len(batch)
            for (*_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)

    def _embed_and_search(self, batch: list[tuple]) -> list[list[Hit]]:
        target = self.target
        x = np.zeros((len(batch), target.dim), np.float32)
        crops = [i for i, b in enumerate(batch) if b[0] is not None]
        if crops:
            import torch

            x[crops] = self.embedder.embed(torch.stack([batch[i][0] for i in crops]))
        for i, b in enumerate(batch):
            if b[0] is None:
                x[i] = b[1]
        deepest = max(b[2] + b[3] for b in batch)
        slots = [str(i) for i in range(len(batch))]
        by_slot: dict[str, list[Hit]] = {slot: [] for slot in slots}
        for h in search_hits(target, slots, x, deepest):
            by_slot[h.query].append(h)
        return [
            [Hit(label, h.rank, h.score, h.row, h.key, h.path, h.caption) for h in by_slot[slot][offset : offset + k]]
            for slot, (_, _, k, offset, label, _) in zip(slots, batch, strict=True)
        ]

    # -- thumbnails of rows the index knows -------------------------------------------------------

    async def thumbnail(self, row: int) -> tuple[bytes, str]:
        """A row's thumbnail JPEG and its ETag (quoted, as HTTP wants); made in the thumbnail threads."""
        target = self.target
        if not 0 <= row < target.n:
            raise ServiceError(404, "unknown_row", f"no row {row} in the index")
        with self._thumb_lock:
            data = self._thumbs.get(row)
        if data is None:
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(self._thumb_pool, self._make_thumbnail, target, row)
            with self._thumb_lock:
                self._thumbs[row] = data
                while len(self._thumbs) > self.limits.thumb_cache:
                    self._thumbs.popitem(last=False)
        return data, f'"{hashlib.sha1(data).hexdigest()[:16]}"'

    def _make_thumbnail(self, target: Target, row: int) -> bytes:
        from pipeline.retrieve.show import Thumbnails

        jpeg = Thumbnails(target.features, self.limits.thumb, target.places).jpegs({row}).get(row)
        if not jpeg:
            raise ServiceError(404, "no_picture", f"row {row} has no readable picture (its shard or file is gone)")
        return jpeg

    def timed(self, kind: str, started: float) -> None:
        self.metrics.query(kind, time.perf_counter() - started)
