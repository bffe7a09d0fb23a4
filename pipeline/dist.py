"""torchrun integration: who am I, which device is mine, the barriers, and the few objects ranks
share (rank 0's plan or its one-line error, each rank's stats)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.errors import UserError, first_line

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# How long ranks wait at a barrier: it must cover a whole rank's share of a job (or rank 0's listing
# of a bucket), hence hours, not torch's 10–30 minutes.
BARRIER_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistContext:
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> str:
    """--device as a torch device string: auto is this rank's GPU (cuda:LOCAL_RANK) when CUDA is
    there, else the CPU; asking for CUDA without it is an error, never a silent CPU run. Without an
    NVIDIA driver, auto and cpu do not load torch (1–2 s of a CPU match's start-up)."""
    if requested == "cpu" or (requested == "auto" and not os.path.exists("/dev/nvidiactl")):
        return "cpu"
    if requested != "auto" and requested != "cuda" and not re.fullmatch(r"cuda:\d+", requested):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    import torch

    if not torch.cuda.is_available():
        if requested == "auto":
            return "cpu"
        raise UserError(
            f"--device {requested} but CUDA is not available here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --device cpu to run on the CPU"
        )
    if requested not in ("auto", "cuda"):
        return requested
    # A launcher that gives each process its own CUDA_VISIBLE_DEVICES leaves one visible device:
    # cuda:LOCAL_RANK would not exist there, the rank's device is the one it sees.
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def init(ctx: DistContext, device: torch.device | str, timeout_s: float) -> None:
    """nccl on CUDA, gloo on CPU ("cpu" for a job with no device, like pack). The timeout bounds
    the final barrier, where fast ranks wait for the slowest: it must cover a whole rank's share of
    the job, hence hours, not the defaults."""
    if not ctx.active:
        return
    import torch.distributed as tdist  # here, not at the top: a single process need not load torch

    if not tdist.is_initialized():
        on_cuda = not isinstance(device, str) and device.type == "cuda"
        backend = "nccl" if on_cuda else "gloo"
        kwargs = {"device_id": device} if on_cuda else {}
        timeout = timedelta(seconds=timeout_s)
        store, _, _ = next(tdist.rendezvous("env://", ctx.rank, ctx.world, timeout=timeout))
        # torchrun keeps one store across --max-restarts; without a fresh prefix per attempt the
        # restarted ranks read the dead ranks' addresses and gloo fails with "connection refused".
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = tdist.PrefixStore(f"featpipe/attempt-{attempt}", store)
        tdist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world, timeout=timeout, **kwargs)


def barrier(ctx: DistContext) -> None:
    if not ctx.active:
        return
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


def from_main(ctx: DistContext, fn: Callable[[], T], share: Callable[[T], Any] = lambda r: r) -> Any:
    """fn() on rank 0 while the others wait; rank 0 gets its result, the others `share(result)`.
    A UserError there is raised on every rank with the same line, so no rank waits for a plan
    that will never come."""
    if not ctx.active:
        return fn()
    import torch.distributed as tdist

    box: list[Any] = [None]
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:
            box[0] = ("error", str(exc) if isinstance(exc, UserError) else f"rank 0 failed: {first_line(exc)}")
            tdist.broadcast_object_list(box, src=0)
            raise
        box[0] = ("ok", share(result))
        tdist.broadcast_object_list(box, src=0)
        return result
    tdist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value


def gather(ctx: DistContext, obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on rank 0 (the others get an empty list); a barrier too."""
    if not ctx.active:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] | None = [None] * ctx.world if ctx.is_main else None
    tdist.gather_object(obj, out, dst=0)
    return out or []


def shutdown(ctx: DistContext) -> None:
    if not ctx.active:
        return
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
