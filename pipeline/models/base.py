"""What every model source gives back: the model as (normalised image batch → one vector per
image), the model's own preprocessing, and a text encoder where the model has a text tower."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.errors import UserError

DEFAULT_REPO = "facebookresearch/dinov2"
DEFAULT_NAME = "dinov2_vits14"


@dataclass(frozen=True)
class ModelConfig:
    repo: str = DEFAULT_REPO  # torch.hub (--model-repo / --model-name), used when `spec` is None
    name: str = DEFAULT_NAME
    weights: str | None = None
    spec: str | None = None  # --model SOURCE:ID (hub:, timm:, hf:, open_clip:)

    def fingerprint(self) -> dict:
        weights = None
        if self.weights:
            st = os.stat(self.weights)
            weights = {"file": os.path.basename(self.weights), "bytes": st.st_size}
        if self.spec:
            return {"model": self.spec, "weights": weights}
        return {"repo": self.repo, "name": self.name, "weights": weights}

    def source(self) -> dict:
        """Where to load the same model again later (absolute local paths)."""
        repo = os.path.abspath(self.repo) if is_local_repo(self.repo) else self.repo
        weights = os.path.abspath(self.weights) if self.weights else None
        return {"repo": repo, "name": self.name, "weights": weights, "model": self.spec}

    @property
    def label(self) -> str:
        return self.spec or f"{self.repo} / {self.name}"


def is_local_repo(repo: str) -> bool:
    """A torch.hub repo given as a local directory (with a hubconf.py), not GitHub's owner/repo."""
    return os.path.isdir(repo)


@dataclass(frozen=True)
class Preprocess:
    """A model's own preprocessing, as its library states it (None fields: featpipe's default)."""

    resize_mode: str = "shortest"  # or "squash"
    resize_size: int = 256
    crop_size: int = 224  # equal to resize_size with squash: no crop
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


TextEncoder = Callable[[list[str]], torch.Tensor]  # texts → (B, D) vectors in the image space


@dataclass
class Loaded:
    image: torch.nn.Module  # (B, 3, H, W) normalised floats → (B, D)
    preprocess: Preprocess | None  # None: featpipe's default (torch.hub DINOv2's)
    text: TextEncoder | None = None
    versions: dict[str, str] = field(default_factory=dict)


class Pooled(torch.nn.Module):
    """A model whose forward returns more than one vector per image, reduced to that vector by `pick`
    (an HF output object's pooler_output, open_clip's encode_image, …)."""

    def __init__(self, model: torch.nn.Module, pick: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model, self.pick = model, pick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.model, x)


def check_output(out: torch.Tensor, batch: int) -> None:
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"the model must return a 2-D (batch, dim) tensor of features; for a batch of {batch} it returned {shape}"
        )


def need(module: str, extra: str):
    """A model library, or one line saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this model source needs {module}: pip install 'featpipe[{extra}]'") from None


OFFLINE_HELP = (
    "the weights are not in the local cache and the hub cannot be reached: fetch them once on a machine "
    "with network (`huggingface-cli download REPO`, into HF_HOME), then run with HF_HUB_OFFLINE=1, or give "
    "a local directory or --weights FILE"
)
