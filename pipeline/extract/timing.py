"""Where extraction's time goes: waiting for data, the model step, waiting for chunk writes, and
the first batch (worker start, warm-up, compiling) apart from the steady rate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class StageTimer:
    def __init__(self, shards: int):
        self.wait_data_s = self.model_s = self.write_wait_s = 0.0
        self.images = 0
        self.shards = shards
        self.first_batch_s: float | None = None
        self.first_batch_images = 0
        self.compiled = False
        self._start = time.perf_counter()

    def data(self, items: Iterable[T]) -> Iterator[T]:
        """The loader's items, with the time spent waiting for each."""
        it = iter(items)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait_data_s += time.perf_counter() - t
            yield item

    @contextmanager
    def model(self) -> Iterator[None]:
        """A model step; write waits inside it count as write waits, not model time."""
        t, written = time.perf_counter(), self.write_wait_s
        yield
        self.model_s += time.perf_counter() - t - (self.write_wait_s - written)

    @contextmanager
    def waiting_for_writes(self) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.write_wait_s += time.perf_counter() - t

    def embedded(self, n: int) -> None:
        self.images += n
        if self.first_batch_s is None and n:  # start-up: first data, warm-up, compiling
            self.first_batch_s, self.first_batch_images = time.perf_counter() - self._start, n

    @property
    def streaming_s(self) -> float:
        return self.wait_data_s + self.model_s + self.write_wait_s

    def stage_seconds(self) -> dict[str, float]:
        stages = {"wait_data_s": self.wait_data_s, "model_s": self.model_s, "write_wait_s": self.write_wait_s}
        if self.first_batch_s is not None:
            stages["first_batch_s"] = self.first_batch_s
        return {k: round(v, 3) for k, v in stages.items()}

    def steady_rate(self) -> float | None:
        """Images per second without the first batch."""
        images = self.images - self.first_batch_images
        seconds = self.streaming_s - (self.first_batch_s or 0.0)
        return round(images / seconds, 2) if images > 0 and seconds > 0 else None
