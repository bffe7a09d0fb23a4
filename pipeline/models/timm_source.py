"""Models from timm (`timm:NAME`, e.g. `timm:vit_small_patch14_dinov2.lvd142m`; timm's own
`hf-hub:` and `local-dir:` names pass through): pooled features (num_classes=0), preprocessing
from timm's data config (crop_pct → resize ⌊size / crop_pct⌋, crop_mode, interpolation, mean, std).
--weights FILE loads a local checkpoint through timm's own filter (pretrained_cfg_overlay)."""

from __future__ import annotations

import math

from pipeline.errors import UserError, first_line
from pipeline.models.base import OFFLINE_HELP, Loaded, ModelConfig, Preprocess, need


def load(cfg: ModelConfig) -> Loaded:
    timm = need("timm", "timm")
    name = cfg.spec.split(":", 1)[1]
    kwargs = {"pretrained": True, "num_classes": 0}
    if cfg.weights:
        kwargs["pretrained_cfg_overlay"] = {"file": cfg.weights}
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"--model {cfg.spec}: timm has no model {name!r} (timm.list_models)") from None
        raise UserError(f"--model {cfg.spec}: {first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {cfg.spec}: {first_line(exc)}; {OFFLINE_HELP}") from None
    return Loaded(
        model.eval(), preprocess(timm.data.resolve_model_data_config(model)), None, {"timm": timm.__version__}
    )


def preprocess(data: dict) -> Preprocess:
    """timm's eval transform as a spec: resize to ⌊size / crop_pct⌋ (shortest side, or a square for
    crop_mode squash), then a centre crop of size."""
    size = int(data["input_size"][-1])
    scale = math.floor(size / data.get("crop_pct", 1.0))
    mode = data.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise UserError(f"timm crop_mode {mode!r} is not supported (center and squash are)")
    return Preprocess(
        "squash" if mode == "squash" else "shortest",
        scale,
        size,
        data.get("interpolation", "bicubic"),
        tuple(data["mean"]),
        tuple(data["std"]),
    )
