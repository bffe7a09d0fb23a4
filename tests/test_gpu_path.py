"""The CUDA-only paths (issue 28), tested on the CPU through the same code: the features' read-back
overlapping the next batch, device tile planning, fp16 candidate scores settled exactly, worker
counts."""

from __future__ import annotations

import torch

from pipeline.extract.readback import PendingFeatures


class _Event:
    """A CUDA event's two calls, counted."""

    log: list[str] = []

    def record(self) -> None:
        _Event.log.append("record")

    def synchronize(self) -> None:
        _Event.log.append("synchronize")


def test_read_back_waits_on_its_own_event_one_iteration_later():
    """The copy is queued with an event when the batch is queued; the host waits on that event only
    when it reads the features, after the next batch was queued."""
    _Event.log = []
    first = PendingFeatures(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), _Event)
    assert _Event.log == ["record"]  # queued: nothing waited for
    second = PendingFeatures(torch.ones(2, 3), _Event)  # the next batch, queued before reading the first
    assert _Event.log == ["record", "record"]
    got = first.result()
    assert _Event.log == ["record", "record", "synchronize"] and got.dtype.name == "float32"
    assert got.tolist() == [[0, 1, 2], [3, 4, 5]] and second.result().sum() == 6
