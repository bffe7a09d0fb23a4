"""Models from open_clip (`open_clip:ARCH/TAG`, e.g. `open_clip:ViT-B-32/laion2b_s34b_b79k`).
--weights FILE loads local weights into ARCH; the preprocessing is then still the tag's (open_clip
itself falls back to OpenAI's statistics for a file, even for SigLIP). One vector per image:
encode_image; text: the arch's tokenizer and encode_text."""

from __future__ import annotations

import torch

from pipeline.errors import UserError, first_line
from pipeline.models.base import OFFLINE_HELP, Loaded, ModelConfig, Pooled, Preprocess, need


def load(cfg: ModelConfig) -> Loaded:
    open_clip = need("open_clip", "clip")
    arch, _, tag = cfg.spec.split(":", 1)[1].partition("/")
    if arch not in open_clip.list_models():
        raise UserError(f"--model {cfg.spec}: open_clip has no architecture {arch!r} (open_clip.list_models())")
    try:
        model = open_clip.create_model(arch, pretrained=cfg.weights or tag or None)
    except RuntimeError as exc:
        raise UserError(f"--model {cfg.spec}: {first_line(exc)}") from None
    except OSError as exc:
        raise UserError(f"--model {cfg.spec}: {first_line(exc)}; {OFFLINE_HELP}") from None
    model.eval()
    tokenizers = []  # loaded on the first text: SigLIP's comes from the HF hub, and images need none

    def encode_text(texts: list[str]) -> torch.Tensor:
        if not tokenizers:
            try:
                tokenizers.append(open_clip.get_tokenizer(arch))
            except OSError as exc:
                raise UserError(f"--model {cfg.spec}: its tokenizer: {first_line(exc)}; {OFFLINE_HELP}") from None
        device = next(model.parameters()).device
        with torch.inference_mode():
            return model.encode_text(tokenizers[0](texts).to(device))

    image = Pooled(model, lambda m, x: m.encode_image(x))
    return Loaded(image, preprocess(open_clip, model, arch, tag), encode_text, {"open_clip": open_clip.__version__})


def preprocess(open_clip, model, arch: str, tag: str) -> Preprocess:
    """The tag's config (mean, std, interpolation, resize mode), the model's image size."""
    pcfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    base = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = pcfg.get("mean") or base.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = pcfg.get("std") or base.get("std") or open_clip.OPENAI_DATASET_STD
    mode = pcfg.get("resize_mode") or base.get("resize_mode") or "shortest"
    if mode not in ("shortest", "squash"):
        raise UserError(f"open_clip resize_mode {mode!r} is not supported (shortest and squash are)")
    interpolation = pcfg.get("interpolation") or base.get("interpolation") or "bicubic"
    return Preprocess(mode, size, size, interpolation, tuple(mean), tuple(std))
