"""Model sources (issue 19): featpipe's features against each library's own preprocessing and
forward, offline, with random-weight models built from config; text queries for CLIP-family models.
The same comparison must fail with a wrong spec (negative controls), so it can."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import PHOTOS, run_cli
from PIL import Image

from pipeline import api
from pipeline.image.decode import open_image, to_rgb, upright

EXACT, FAST = 0.9999, 0.999


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Tall, wide, tiny, palette, RGBA and 16-bit images (non-square)."""
    d = tmp_path_factory.mktemp("models") / "images"
    d.mkdir()
    photo = Image.open(io.BytesIO(PHOTOS[0])).convert("RGB")
    rng = np.random.default_rng(0)
    files = {
        "a_wide.jpg": PHOTOS[0],
        "b_tall.jpg": PHOTOS[1],
        "c_tiny.png": png(photo.resize((23, 31))),
        "d_palette.png": png(photo.resize((300, 180)).convert("P", palette=Image.Palette.ADAPTIVE)),
        "e_rgba.png": png(photo.resize((260, 340)).convert("RGBA")),
        "f_16bit.png": png(Image.fromarray(rng.integers(0, 65535, (150, 220), dtype=np.uint16))),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def rgb(path) -> Image.Image:
    """The upright RGB picture both sides start from (featpipe's 8-bit conversion of 16-bit images)."""
    return to_rgb(upright(open_image(path.read_bytes())), exact=True)


def featpipe(images, out, model: str, weights=None, decode: str = "exact", rows: int = 6) -> np.ndarray:
    result = api.extract(images, out, model=model, weights=weights, decode=decode, workers=0, progress=False)
    assert result.exit_code == 0 and result.stats["rows"] == rows
    return np.asarray(torch.load(out / "fts.pth"), dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def reference(model, transform, images) -> np.ndarray:
    """The library's own transform on each picture, then the model (vectors by `model`)."""
    x = torch.stack([transform(rgb(p)) for p in sorted(images.iterdir())])
    with torch.inference_mode():
        return model(x).double().numpy()


def check(ours_exact, ours_fast, ref, wrong) -> None:
    assert cosines(ours_exact, ref).min() >= EXACT, cosines(ours_exact, ref)
    # The fast path scales a 16-bit image to 8 bits where Pillow's convert (the libraries' own
    # input, and --decode exact) clips it to near-white: by design, so that row is left out here.
    assert cosines(ours_fast[:5], ref[:5]).min() >= FAST, cosines(ours_fast, ref)
    assert cosines(ours_exact, wrong).min() < EXACT  # the negative control: a wrong spec is caught


def test_timm_convnet_with_crop_pct_and_bilinear(images, tmp_path):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_model_data_config

    torch.manual_seed(0)
    model = timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=0).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    cfg = resolve_model_data_config(model)
    assert (cfg["crop_pct"], cfg["interpolation"]) == (0.875, "bilinear")
    ours = featpipe(images, tmp_path / "e", "timm:resnet18.tv_in1k", tmp_path / "w.pth")
    fast = featpipe(images, tmp_path / "f", "timm:resnet18.tv_in1k", tmp_path / "w.pth", "fast")
    ref = reference(model, create_transform(**cfg), images)
    wrong = reference(model, create_transform(**{**cfg, "mean": (0.5,) * 3, "std": (0.5,) * 3}), images)
    check(ours, fast, ref, wrong)
    run = json.loads((tmp_path / "e" / "run.json").read_text())
    assert run["settings"]["transform"]["interpolation"] == "bilinear" and "timm" in run["versions"]
    assert run["preprocessing"].startswith("shortest 256 bilinear, centre crop 224")


def hf_vision(tmp_path, kind: str):
    """A small random HF model saved with its processor, and the processor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(image_size=224, patch_size=14, **small))
        processor = transformers.BitImageProcessorPil(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            do_center_crop=True,
            resample=3,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    else:
        config = transformers.SiglipConfig(
            vision_config={"image_size": 224, "patch_size": 16, **small},
            text_config={"vocab_size": 100, "max_position_embeddings": 16, **small},
        )
        model = transformers.SiglipModel(config)
        processor = transformers.SiglipImageProcessorPil(
            size={"height": 224, "width": 224}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    folder = tmp_path / kind
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_hf_models_by_their_image_processor(kind, images, tmp_path):
    model, processor, folder = hf_vision(tmp_path, kind)
    ours = featpipe(images, tmp_path / "e", f"hf:{folder}")
    fast = featpipe(images, tmp_path / "f", f"hf:{folder}", decode="fast")

    def forward(m, x):
        out = m.get_image_features(pixel_values=x) if kind == "siglip" else m(pixel_values=x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def ref_with(proc):
        pics = [rgb(p) for p in sorted(images.iterdir())]
        x = proc(pics, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return forward(model, x).double().numpy()

    wrong_proc = type(processor)(
        **{
            **processor.to_dict(),
            **(
                {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}
                if kind == "siglip"  # crop instead of squash
                else {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
            ),
        }
    )
    check(ours, fast, ref_with(processor), ref_with(wrong_proc))


def test_open_clip_image_features_and_text_queries(images, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    spec = "open_clip:ViT-B-32/openai"
    ours = featpipe(images, tmp_path / "e", spec, tmp_path / "w.pth")
    fast = featpipe(images, tmp_path / "f", spec, tmp_path / "w.pth", "fast")

    def transform(mean, std):
        return open_clip.image_transform(224, is_train=False, mean=mean, std=std, resize_mode="shortest")

    ref = reference(model.encode_image, transform(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD), images)
    wrong = reference(model.encode_image, transform((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), images)
    check(ours, fast, ref, wrong)
    # text: the same neighbours as searching with encode_text's vector by hand
    with torch.inference_mode():
        by_hand = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(["a red car"])).numpy()
    np.save(tmp_path / "t.npy", by_hand)
    out = run_cli("query", tmp_path / "e", "--text", "a red car", "-k", "4", "--json").stdout  # the CLI's door
    rows = [(json.loads(ln)["row"], round(json.loads(ln)["score"], 5)) for ln in out.splitlines()]
    ref_rows = [(h.row, round(h.score, 5)) for h in api.query(tmp_path / "e", tmp_path / "t.npy", k=4)]
    assert rows == ref_rows and len(rows) == 4


def test_text_on_a_model_without_a_text_tower_is_one_line(images, tmp_path):
    from conftest import ROOT

    api.extract(images, tmp_path / "o", model="vit_tiny_p14", repo=str(ROOT / "pipeline" / "hub"), workers=0)
    proc = run_cli("query", tmp_path / "o", "--text", "a cat", check=False)
    assert proc.returncode == 1 and "has no text tower" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli("extract", images, tmp_path / "x", "--model", "nope:thing", check=False)
    assert proc.returncode == 1 and "give SOURCE:ID" in proc.stderr


def test_timm_dinov2_from_a_local_dir(images, tmp_path):
    """timm's DINOv2 ViT-S/14 family through timm's own `local-dir:` form: the tag's data config
    (crop_pct 1.0, bicubic, ImageNet statistics), 2 blocks at 224 px so that a CPU runs it quickly."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_model_data_config
    from timm.models import get_pretrained_cfg

    tag = get_pretrained_cfg("vit_small_patch14_dinov2.lvd142m").to_dict()
    data = {k: tag[k] for k in ("crop_pct", "interpolation", "mean", "std", "crop_mode")}
    args = {"img_size": 224, "depth": 2, "init_values": 1.0}  # blocks that count (timm's 1e-5: ~constant output)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **args).eval()
    for w in model.parameters():  # weights at 1/sqrt(fan-in): features that depend on the picture
        if w.dim() > 1:
            torch.nn.init.normal_(w, std=w[0].numel() ** -0.5)
    folder = tmp_path / "dinov2"
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    config = {"architecture": "vit_small_patch14_dinov2", "num_classes": 0, "model_args": args}
    (folder / "config.json").write_text(json.dumps({**config, "pretrained_cfg": {**data, "input_size": [3, 224, 224]}}))
    cfg = resolve_model_data_config(model)
    cfg.update(data, input_size=(3, 224, 224))
    ours = featpipe(images, tmp_path / "e", f"timm:local-dir:{folder}")
    fast = featpipe(images, tmp_path / "f", f"timm:local-dir:{folder}", decode="fast")
    ref = reference(model, create_transform(**cfg), images)
    wrong = reference(model, create_transform(**{**cfg, "interpolation": "bilinear"}), images)
    check(ours, fast, ref, wrong)
    run = json.loads((tmp_path / "e" / "run.json").read_text())
    assert run["preprocessing"].startswith("shortest 224 bicubic, centre crop 224")


def test_open_clip_siglip_tag_reads_the_tags_preprocessing(images, tmp_path, monkeypatch):
    """With a weights file open_clip itself falls back to OpenAI's statistics and shortest-side
    resizing even for SigLIP; featpipe reads the tag's (squash, 0.5/0.5). Images need no tokenizer
    (SigLIP's comes from the HF hub): extraction works offline. --decode exact only: the fast path
    of squash is covered by HF SigLIP above, and a ViT-B/16 forward costs seconds here."""
    open_clip = pytest.importorskip("open_clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch = "ViT-B-16-SigLIP"
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    three = tmp_path / "images"  # wide, tall, palette: a ViT-B/16 forward costs ~0.4 s an image here
    three.mkdir()
    for name in ("a_wide.jpg", "b_tall.jpg", "d_palette.png"):
        (three / name).write_bytes((images / name).read_bytes())
    ours = featpipe(three, tmp_path / "e", f"open_clip:{arch}/webli", tmp_path / "w.pth", rows=3)

    def transform(mode, mean):
        return open_clip.image_transform(224, is_train=False, mean=mean, std=mean, resize_mode=mode)

    ref = reference(model.encode_image, transform("squash", (0.5,) * 3), three)
    assert cosines(ours, ref).min() >= EXACT, cosines(ours, ref)
    wrong = reference(model.encode_image, transform("shortest", (0.5,) * 3), three)  # crop instead of squash
    assert cosines(ours, wrong).min() < EXACT
    run = json.loads((tmp_path / "e" / "run.json").read_text())
    assert run["preprocessing"].startswith("squash 224 bicubic")


def hub_dir(tmp_path) -> str:
    """A local torch.hub directory whose entry builds DINOv2's ViT (timm's port of the original code,
    the same module and parameter names as facebookresearch/dinov2 minus its unused mask_token)."""
    d = tmp_path / "hub"
    d.mkdir()
    (d / "hubconf.py").write_text(
        "dependencies = ['timm']\n\n"
        "def dinov2_small(pretrained=False):\n"
        "    import timm\n"
        "    return timm.create_model('vit_small_patch14_dinov2', pretrained=False, num_classes=0, img_size=224,\n"
        "                             embed_dim=64, depth=2, num_heads=2, init_values=1.0)\n"
    )
    return str(d)


def dinov2_state_from_hf(hf: dict) -> dict:
    """transformers' Dinov2Model names → DINOv2's own (the inverse of transformers' conversion script)."""
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    v5 = any(".attention.q_proj." in k for k in hf)  # transformers 5 renamed the attention's parts
    qkv_names = ("q_proj", "k_proj", "v_proj") if v5 else ("attention.query", "attention.key", "attention.value")
    names = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    names |= {("attention.o_proj" if v5 else "attention.output.dense"): "attn.proj"}
    layers = {k.split(".")[2] for k in hf if k.startswith("encoder.layer.")}
    for i in sorted(layers, key=int):
        p = f"encoder.layer.{i}."
        for theirs, ours in names.items():
            for w in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{w}"] = hf[f"{p}{theirs}.{w}"]
        for w in ("weight", "bias"):
            qkv = [hf[f"{p}attention.{n}.{w}"] for n in qkv_names]
            out[f"blocks.{i}.attn.qkv.{w}"] = torch.cat(qkv)
        out[f"blocks.{i}.ls1.gamma"] = hf[f"{p}layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = hf[f"{p}layer_scale2.lambda1"]
    return out


def test_hf_dinov2_and_hub_dinov2_are_the_same_model_for_the_same_weights(images, tmp_path):
    pytest.importorskip("timm")
    model, _, folder = hf_vision(tmp_path, "dinov2")
    for w in model.parameters():  # weights at 1/sqrt(fan-in): attention that depends on q and k
        if w.dim() > 1:
            torch.nn.init.normal_(w, std=w[0].numel() ** -0.5)
    model.save_pretrained(folder)
    state = dinov2_state_from_hf(model.state_dict())
    torch.save(state, tmp_path / "w.pth")
    by_hf = featpipe(images, tmp_path / "hf", f"hf:{folder}")
    hub = f"hub:{hub_dir(tmp_path)}/dinov2_small"
    by_hub = featpipe(images, tmp_path / "hub", hub, tmp_path / "w.pth")
    assert np.abs(by_hf - by_hub).max() < 1e-4, np.abs(by_hf - by_hub).max()
    assert cosines(by_hf, by_hf[::-1]).min() < 0.99  # the features depend on the picture
    qkv = state["blocks.0.attn.qkv.weight"]  # negative control: query and key swapped
    state["blocks.0.attn.qkv.weight"] = torch.cat([qkv.chunk(3)[i] for i in (1, 0, 2)])
    torch.save(state, tmp_path / "swapped.pth")
    swapped = featpipe(images, tmp_path / "swapped", hub, tmp_path / "swapped.pth")
    assert np.abs(by_hf - swapped).max() > 1e-2


def test_hf_clip_text_query_equals_get_text_features_on_raw_token_ids(images, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 5, "red": 7, "car": 9}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 16, "max_position_embeddings": 8, "eos_token_id": 2, **small},
        vision_config={"image_size": 224, "patch_size": 32, **small},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    transformers.CLIPImageProcessorPil().save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)
    featpipe(images, tmp_path / "e", f"hf:{folder}")
    with torch.inference_mode():
        out = model.get_text_features(input_ids=torch.tensor([[5, 7, 9]]))
    np.save(tmp_path / "t.npy", (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy())
    cli = run_cli("query", tmp_path / "e", "--text", "a red car", "-k", "4", "--json").stdout
    rows = [(json.loads(ln)["row"], round(json.loads(ln)["score"], 5)) for ln in cli.splitlines()]
    by_hand = [(h.row, round(h.score, 5)) for h in api.query(tmp_path / "e", tmp_path / "t.npy", k=4)]
    assert rows == by_hand and len(rows) == 4
