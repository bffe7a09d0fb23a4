"""The model step: a uint8 batch on the device → features; eager, or through torch.compile."""

from __future__ import annotations

import logging

import torch

from pipeline.errors import first_line
from pipeline.image.transform import IMAGENET_MEAN, IMAGENET_STD, Normalizer

log = logging.getLogger("featpipe")


def autocast(device: torch.device, amp: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


class ModelRunner:
    """Normalises on the device and runs the model under autocast. With `compile`, every batch is
    padded to `batch_size` so the compiled graph sees one shape (a shard's short last batch would
    otherwise cost a second compilation); if compiling fails, the run goes on eagerly."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        amp: torch.dtype | None,
        batch_size: int,
        channels_last: bool = False,
        compile: bool = False,
        stats: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD),
    ):
        self.model, self.device, self.amp, self.batch_size = model, device, amp, batch_size
        self.normalize = Normalizer(device, channels_last, *stats)
        self.compiled = torch.compile(model, dynamic=False) if compile else None
        self._compiled_ran = False

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.amp):
            x = self.normalize(images)
            if self.compiled is None:
                return self.model(x)
            n = x.shape[0]
            if n < self.batch_size:
                pad = x.new_zeros((self.batch_size - n, *x.shape[1:]))
                x = torch.cat(
                    [x, pad.contiguous(memory_format=torch.channels_last) if self.normalize.channels_last else pad]
                )
            try:
                out = self.compiled(x)
            except Exception as exc:
                if self._compiled_ran:
                    raise
                log.warning(
                    "torch.compile failed (%s: %s); running the model eagerly", type(exc).__name__, first_line(exc)
                )
                self.compiled = None
                return self.model(x[:n])
            self._compiled_ran = True
            return out[:n]
