"""Model sources behind one table: `--model SOURCE:ID` → a Loaded model (image → vector, its own
preprocessing, a text encoder where there is one). Each source is one small module; the library it
needs is imported only when a model of that source is loaded (extras: featpipe[timm], [hf], [clip]).

    hub:owner/repo[:ref]/entry   torch.hub (the default, as --model-repo/--model-name)
    timm:NAME                    timm.create_model(NAME, num_classes=0)
    hf:org/name | hf:/local/dir  transformers AutoModel + AutoImageProcessor
    open_clip:ARCH/TAG           open_clip.create_model(ARCH, pretrained=TAG)
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.errors import UserError
from pipeline.models import hf_source, hub, openclip_source, timm_source
from pipeline.models.base import Loaded, ModelConfig

SOURCES: dict[str, Callable[[ModelConfig], Loaded]] = {
    "hub": lambda cfg: hub.load(hub.from_spec(cfg)),
    "timm": timm_source.load,
    "hf": hf_source.load,
    "open_clip": openclip_source.load,
}


def source_of(cfg: ModelConfig) -> str:
    if not cfg.spec:
        return "hub"
    prefix, sep, ident = cfg.spec.partition(":")
    if not sep or prefix not in SOURCES or not ident:
        raise UserError(f"--model {cfg.spec!r}: give SOURCE:ID with SOURCE one of {', '.join(SOURCES)}")
    return prefix


def check(cfg: ModelConfig) -> None:
    """Cheap checks that must fail before any output is written."""
    import os

    source = source_of(cfg)
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise UserError(f"--weights file not found: {cfg.weights}")
    if source == "hub":
        hub.check(hub.from_spec(cfg) if cfg.spec else cfg)


def load_model(cfg: ModelConfig) -> Loaded:
    check(cfg)
    if not cfg.spec:
        return hub.load(cfg)
    return SOURCES[source_of(cfg)](cfg)
