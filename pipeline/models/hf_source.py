"""Models from the Hugging Face hub or a local folder (`hf:org/name`, `hf:/local/dir`) through
transformers' AutoModel and AutoImageProcessor. One vector per image: `get_image_features` for
CLIP/SigLIP-style models (transformers 5 returns an output object: its pooler_output), otherwise
the model's pooler_output (DINOv2: the CLS token). Preprocessing from the image processor (size,
crop, resample, mean, std); a text tower's `get_text_features` with the model's tokenizer (SigLIP
pads to max_length, as it was trained)."""

from __future__ import annotations

import os

import torch

from pipeline.errors import UserError, first_line
from pipeline.models.base import OFFLINE_HELP, Loaded, ModelConfig, Pooled, Preprocess, need

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's numbering, which HF processors use


def load(cfg: ModelConfig) -> Loaded:
    transformers = need("transformers", "hf")
    ident = cfg.spec.split(":", 1)[1]
    if cfg.weights:
        raise UserError("--weights is for hub, timm and open_clip models; an hf: model is a folder or hub id")
    local = os.path.isdir(ident)
    try:
        model = transformers.AutoModel.from_pretrained(ident, local_files_only=local)
        processor = transformers.AutoImageProcessor.from_pretrained(ident, local_files_only=local, backend="pil")
    except OSError as exc:
        raise UserError(f"--model {cfg.spec}: {first_line(exc)}; {OFFLINE_HELP}") from None
    model.eval()
    text = _text_encoder(transformers, model, ident, local) if hasattr(model, "get_text_features") else None
    pick = _pick_image if hasattr(model, "get_image_features") else _pick_pooled
    versions = {"transformers": transformers.__version__}
    return Loaded(Pooled(model, pick), preprocess(processor), text, versions)


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pick_image(model, x: torch.Tensor) -> torch.Tensor:
    return _pooled(model.get_image_features(pixel_values=x))


def _pick_pooled(model, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).pooler_output


def _text_encoder(transformers, model, ident: str, local: bool):
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(ident, local_files_only=local)
    except (OSError, ValueError):  # a vision-only checkpoint of a two-tower class: no text side here
        return None
    padding = "max_length" if "siglip" in type(model).__name__.lower() else True

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=padding, truncation=True, return_tensors="pt")
        device = next(model.parameters()).device
        with torch.inference_mode():
            return _pooled(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))

    return encode


def preprocess(processor) -> Preprocess:
    """The processor's resize and crop as a spec: {"shortest_edge": S} resizes the shorter side,
    {"height": H, "width": W} squashes (SigLIP: no crop after)."""
    size = _as_dict(getattr(processor, "size", None))
    if "shortest_edge" in size:
        mode, resize = "shortest", int(size["shortest_edge"])
    elif "height" in size and size["height"] == size.get("width"):
        mode, resize = "squash", int(size["height"])
    else:
        raise UserError(f"the image processor's size {size} is not supported (shortest_edge, or a square)")
    crop = resize
    if getattr(processor, "do_center_crop", False):
        crop = int(_as_dict(processor.crop_size)["height"])
    resample = getattr(processor, "resample", 3)
    resample = getattr(resample, "value", resample)
    return Preprocess(
        mode,
        resize,
        crop,
        _RESAMPLE.get(int(resample), "bicubic"),
        tuple(processor.image_mean),
        tuple(processor.image_std),
    )


def _as_dict(size) -> dict:
    """A processor's size: a dict, transformers 5's SizeDict (attributes, unset ones None), or an int."""
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict):
        return size
    keys = ("height", "width", "shortest_edge", "longest_edge")
    return {k: getattr(size, k) for k in keys if getattr(size, k, None) is not None}
