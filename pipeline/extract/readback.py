"""Features back to the host without stalling the device: the copy is queued right behind the
model on the same stream, into page-locked memory, with an event recorded after it; the host waits
on that event one iteration later, when the next batch is already queued.

Why: a plain `.cpu()` is a synchronous copy on the compute stream, so reading batch i-1 after
queueing batch i waited for batch i's model too, and the device idled through every iteration's
host work (fetching the next batch, the chunk writes). Waiting on batch i-1's own event waits only
for work queued before it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class PendingFeatures:
    """One batch's (B, D) features on their way to the host."""

    def __init__(self, feats: torch.Tensor, event_factory: Callable[[], object] | None = None):
        if feats.device.type == "cuda":
            self.host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
            self.host.copy_(feats, non_blocking=True)  # casts on the device side of the copy
            self.event = (event_factory or torch.cuda.Event)()
            self.event.record()
        else:  # the CPU has computed them already; an event factory stands in for tests
            self.host = feats.detach().float()
            self.event = event_factory() if event_factory else None
            if self.event is not None:
                self.event.record()

    def result(self) -> np.ndarray:
        """The features as float32 on the host, once their copy (and nothing queued after it) is done."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()
