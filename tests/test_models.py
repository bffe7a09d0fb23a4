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


def featpipe(images, out, model: str, weights=None, decode: str = "exact") -> np.ndarray:
    result = api.extract(images, out, model=model, weights=weights, decode=decode, workers=0, progress=False)
    assert result.exit_code == 0 and result.stats["rows"] == 6
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
