"""`featpipe extract` end to end: real shards, a real (offline) model, real output files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BROKEN, ROOT, VALID, run_cli

HUB = str(ROOT / "pipeline" / "hub")
MODEL = ["--model-repo", HUB, "--model-name", "vit_tiny_p14"]
SIXTEEN_BIT = "formats/sixteen_bit.png"


@pytest.fixture(scope="module")
def shards(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extract") / "shards"
    run_cli("pack", sample_dir, out, "--shard-size", "4", "--no-progress")
    return out


@pytest.fixture(scope="module")
def extracted(shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("extract") / "features"
    proc = run_cli("extract", shards, out, *MODEL, "--workers", "2", "--batch-size", "3", check=False)
    assert proc.returncode == 3, proc.stderr  # completed, with the truncated JPEG recorded as failed
    return out, proc


def reference_features(paths: list[str], flip: bool = False, keep_ratio: bool = True) -> torch.Tensor:
    """The original script's way: PIL open → EXIF transpose → RGB → torchvision float transforms."""
    from PIL import Image, ImageOps
    from torchvision import transforms as T

    size = 256 if keep_ratio else (256, 256)
    tf = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    model = torch.hub.load(HUB, "vit_tiny_p14", source="local").eval()
    batch = []
    for p in paths:
        im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        if flip:
            im = ImageOps.mirror(im)
        batch.append(tf(im))
    with torch.inference_mode():
        return model(torch.stack(batch))


def cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).numpy()


def test_end_to_end_outputs(extracted, sample_dir):
    out, proc = extracted
    assert "30 images embedded" in proc.stdout and "1 failed" in proc.stdout
    img_list = json.loads((out / "img_list.json").read_text())
    assert sorted(img_list) == sorted(f"{sample_dir}/{rel}" for rel in VALID)
    assert all(Path(p).is_file() for p in img_list)
    f16 = np.load(out / "fts.npy")
    f32 = torch.load(out / "fts.pth", weights_only=True)
    assert f16.dtype == np.float16 and f16.shape == (30, 192)
    assert f32.dtype == torch.float32 and tuple(f32.shape) == (30, 192)
    chunks = sorted((out / "chunks").glob("*.parquet"))
    tables = [pq.read_table(c) for c in chunks]
    assert all(len(t) for t in tables)  # no empty chunk files
    stacked = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    assert np.array_equal(f32.numpy(), stacked)
    assert np.array_equal(f16, stacked.astype(np.float16))
    assert sum((t.column("path").to_pylist() for t in tables), []) == img_list
    for t in tables:
        assert t.column_names[:4] == ["key", "path", "shard", "index"]
        assert t.schema.field("embedding").type.list_size == 192
    errors = [json.loads(ln) for ln in (out / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in errors] == ["truncated.jpg"]
    reason = errors[0]["reason"].lower()  # Pillow says "truncated", libjpeg-turbo "premature end"
    assert ("truncated" in reason or "premature end" in reason) and errors[0]["key"] and errors[0]["shard"]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["rows"], stats["errors"], stats["device"], stats["precision"]) == (30, 1, "cpu", "fp32")
    assert stats["model"]["name"] == "vit_tiny_p14"


def test_features_match_the_original_preprocessing(extracted, shards, tmp_path, capsys):
    out, _ = extracted
    img_list = json.loads((out / "img_list.json").read_text())
    ours = torch.load(out / "fts.pth", weights_only=True)
    ref = reference_features(img_list)
    cos = cosines(ours, ref)
    photo = np.array([not p.endswith(SIXTEEN_BIT) for p in img_list])
    # fast mode: reduced-size JPEG decoding of big photos, 16-bit images scaled rather than clipped
    assert cos[photo].min() >= 0.999 and cos[photo].mean() >= 0.9995, cos
    exact_out = tmp_path / "exact"
    run_cli("extract", shards, exact_out, *MODEL, "--decode", "exact", "--workers", "1", check=False)
    exact = torch.load(exact_out / "fts.pth", weights_only=True)
    cos_exact = cosines(exact, ref)
    assert cos_exact.min() >= 0.99999, cos_exact
    device_out = tmp_path / "device"
    run_cli("extract", shards, device_out, *MODEL, "--decode", "device", "--workers", "1", check=False)
    cos_device = cosines(torch.load(device_out / "fts.pth", weights_only=True), ref)
    assert cos_device[photo].min() >= 0.999 and cos_device[photo].mean() >= 0.9995, cos_device
    assert json.loads((device_out / "img_list.json").read_text()) == img_list
    # the check can fail: a mirrored image is a different input and scores far lower
    flipped = cosines(ours, reference_features(img_list, flip=True))
    assert np.median(flipped[photo]) < 0.999
    with capsys.disabled():
        print(
            f"\nfidelity vs original preprocessing: fast min {cos[photo].min():.6f} mean {cos[photo].mean():.6f}; "
            f"exact min {cos_exact.min():.7f} mean {cos_exact.mean():.7f}; device (torchvision decode on the CPU) "
            f"min {cos_device[photo].min():.6f} mean {cos_device[photo].mean():.6f}; "
            f"mirrored median {np.median(flipped):.4f}"
        )


def test_same_bytes_whatever_the_workers(shards, extracted, tmp_path):
    ref_out, _ = extracted
    for workers in ("0", "1", "3"):
        out = tmp_path / f"w{workers}"
        run_cli("extract", shards, out, *MODEL, "--workers", workers, "--batch-size", "5", check=False)
        for name in ("fts.npy", "fts.pth", "img_list.json", "errors.jsonl"):
            assert (out / name).read_bytes() == (ref_out / name).read_bytes(), (workers, name)


def committed(out: Path) -> list[Path]:
    """Done records, not the temporary files a commit writes first (pathlib's * matches dot files)."""
    return [p for p in (out / "done").glob("shard-*.json")]


def test_kill_then_rerun_gives_identical_bytes(shards, extracted, tmp_path):
    ref_out, _ = extracted
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "extract",
            str(shards),
            str(out),
            *MODEL,
            "--workers",
            "0",
            "--batch-size",
            "2",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not committed(out):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(committed(out))
    assert 1 <= finished < 8 and not (out / "fts.npy").exists()
    rerun = run_cli("extract", shards, out, *MODEL, "--workers", "2", check=False)
    assert rerun.returncode == 3
    assert f"({finished} already finished)" in rerun.stderr or f"{finished} already finished" in rerun.stderr
    for name in ("fts.npy", "fts.pth", "img_list.json", "errors.jsonl"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    assert run_cli("verify", out, "--shards", shards).returncode == 0


def test_other_settings_refused_then_overwrite(shards, tmp_path):
    out = tmp_path / "o"
    run_cli("extract", shards, out, *MODEL, "--workers", "0", check=False)
    proc = run_cli("extract", shards, out, "--model-repo", HUB, "--model-name", "tiny_cnn", check=False)
    assert proc.returncode == 1 and "other settings" in proc.stderr and "--overwrite" in proc.stderr
    assert np.load(out / "fts.npy").shape == (30, 192)  # untouched
    run_cli("extract", shards, out, "--model-repo", HUB, "--model-name", "tiny_cnn", "--overwrite", check=False)
    assert np.load(out / "fts.npy").shape == (30, 64)
    assert pq.read_table(next((out / "chunks").glob("*.parquet"))).schema.field("embedding").type.list_size == 64


def test_compiled_model_gives_the_same_features(shards, tmp_path):
    # batches of 3 over shards of 4: every shard ends in a short batch, padded for the compiled graph
    tiny = ["--model-repo", HUB, "--model-name", "tiny_cnn", "--batch-size", "3", "--workers", "1"]
    run_cli("extract", shards, tmp_path / "eager", *tiny, check=False)
    run_cli("extract", shards, tmp_path / "compiled", *tiny, "--compile", check=False)
    eager, compiled = (torch.load(tmp_path / d / "fts.pth", weights_only=True) for d in ("eager", "compiled"))
    assert tuple(compiled.shape) == tuple(eager.shape) == (30, 64)
    assert cosines(compiled, eager).min() >= 0.99999
    assert (tmp_path / "compiled" / "img_list.json").read_text() == (tmp_path / "eager" / "img_list.json").read_text()
    stats = json.loads((tmp_path / "compiled" / "stats.json").read_text())
    assert stats["compiled"] is True and stats["steady_images_per_s"] > 0


def test_brace_pattern_and_list_file(shards, extracted, tmp_path):
    ref_out, _ = extracted
    n = len(list(shards.glob("shard-*.tar")))
    pattern = f"{shards}/shard-{{000000..{n - 1:06d}}}.tar"
    run_cli("extract", pattern, tmp_path / "brace", *MODEL, check=False)
    listing = tmp_path / "shards.txt"
    listing.write_text("# one per line\n" + "".join(f"{p}\n" for p in sorted(shards.glob("shard-*.tar"))))
    run_cli("extract", listing, tmp_path / "list", *MODEL, check=False)
    for out in (tmp_path / "brace", tmp_path / "list"):
        assert (out / "fts.npy").read_bytes() == (ref_out / "fts.npy").read_bytes()


def test_seed_compatible_script(sample_dir, tmp_path):
    out = tmp_path / "seed"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "extract_fts.py"),
            "--data_dir",
            str(sample_dir),
            "--output_dir",
            str(out),
            "--batch_size",
            "8",
            "--model_repo",
            HUB,
            "--model_name",
            "vit_tiny_p14",
            "--resize_size",
            "256",
            "--keep_ratio",
            "--crop_size",
            "224",
            "--torch_features",
            "feats.pth",
            "--numpy_features",
            "feats.npy",
            "--img_list",
            "list.json",
            "--verbose",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3, proc.stderr  # the broken files are recorded, the rest embedded
    img_list = json.loads((out / "list.json").read_text())
    assert sorted(img_list) == sorted(f"{sample_dir}/{rel}" for rel in VALID)
    feats = torch.load(out / "feats.pth", weights_only=True)
    assert np.load(out / "feats.npy").shape == (30, 192)
    assert cosines(feats, reference_features(img_list)).min() >= 0.99999  # exact preprocessing
    errors = {Path(json.loads(ln)["path"]).name for ln in (out / "errors.jsonl").read_text().splitlines()}
    assert errors == {Path(p).name for p in BROKEN}


def test_seed_script_without_keep_ratio_resizes_to_a_square_like_the_original(sample_dir, tmp_path):
    """The original declares --keep_ratio store_true: its own README example means square resizing."""
    out = tmp_path / "seed-square"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "extract_fts.py"),
            "--data_dir",
            str(sample_dir),
            "--output_dir",
            str(out),
            "--model_repo",
            HUB,
            "--model_name",
            "vit_tiny_p14",
            "--num_workers",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3, proc.stderr
    img_list = json.loads((out / "img_list.json").read_text())
    feats = torch.load(out / "fts.pth", weights_only=True)
    square = cosines(feats, reference_features(img_list, keep_ratio=False))
    assert square.min() >= 0.9999, dict(zip(img_list, square, strict=False))
    # and the check can fail: the aspect-keeping transform gives other features on non-square photos
    assert cosines(feats, reference_features(img_list)).min() < 0.9999
    assert json.loads((out / "run.json").read_text())["settings"]["transform"]["keep_ratio"] is False


def test_s3_shards_and_output(sample_dir, extracted, s3, s3_server, tmp_path):
    ref_out, _ = extracted
    fs, bucket = s3
    run_cli("pack", sample_dir, f"s3://{bucket}/shards", "--shard-size", "4", env=s3_server)
    proc = run_cli(
        "extract",
        f"s3://{bucket}/shards",
        f"s3://{bucket}/out",
        *MODEL,
        "--workers",
        "2",
        "--no-progress",
        env=s3_server,
        check=False,
    )
    # featpipe's log says featpipe's things: no botocore/s3fs INFO lines under its name without -v
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] and all(
        ln.startswith("featpipe: ") and "credentials" not in ln for ln in proc.stderr.splitlines() if ln.strip()
    ), proc.stderr
    assert fs.cat(f"{bucket}/out/fts.npy") == (ref_out / "fts.npy").read_bytes()
    assert len(fs.glob(f"{bucket}/out/chunks/*.parquet")) == len(list((ref_out / "chunks").glob("*.parquet")))
    local = tmp_path / "from-s3"
    run_cli("extract", f"s3://{bucket}/shards", local, *MODEL, env=s3_server, check=False)
    assert (local / "fts.pth").read_bytes() == (ref_out / "fts.pth").read_bytes()
    assert run_cli("verify", f"s3://{bucket}/out", env=s3_server).returncode == 0


def test_model_that_cannot_run_channels_last_runs_planar(shards, tmp_path):
    hub = tmp_path / "hubview"
    hub.mkdir()
    (hub / "hubconf.py").write_text(
        "dependencies = ['torch']\nimport torch\n\n"
        "class Flat(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 16, stride=16)\n\n"
        "    def forward(self, x):\n"
        "        y = self.conv(x)\n"
        "        return y.view(y.shape[0], -1)  # a view that needs a planar convolution output\n\n"
        "def flat(pretrained=False):\n"
        "    torch.manual_seed(0)\n"
        "    return Flat()\n"
    )
    proc = run_cli("extract", shards, tmp_path / "o", "--model-repo", hub, "--model-name", "flat", "-v", check=False)
    assert proc.returncode == 3, proc.stderr  # completed; the truncated JPEG recorded
    assert "model runs planar" in proc.stderr
    assert np.load(tmp_path / "o" / "fts.npy").shape == (30, 4 * 14 * 14)


def _bad_4d_hub(tmp_path: Path) -> str:
    hub = tmp_path / "hub4d"
    hub.mkdir()
    (hub / "hubconf.py").write_text(
        "dependencies = ['torch']\nimport torch\n\n"
        "def patch_tokens(pretrained=False):\n"
        "    return torch.nn.Conv2d(3, 8, 14, stride=14)  # (B, 8, 16, 16): not a feature vector\n"
    )
    return str(hub)


@pytest.mark.parametrize(
    "case",
    [
        "missing_shards",
        "empty_list",
        "unknown_entry",
        "four_d",
        "unwritable",
        "cuda_without_gpu",
        "crop_bigger_than_resize",
        "offline_github",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, shards, tmp_path):
    out = tmp_path / "out"
    args = [shards, out, *MODEL]
    env = {}
    if case == "missing_shards":
        args[0] = tmp_path / "nope"
    elif case == "empty_list":
        args[0] = tmp_path / "empty.txt"
        args[0].write_text("# nothing here\n")
    elif case == "unknown_entry":
        args[-1] = "no_such_model"
    elif case == "four_d":
        args[-4:] = ["--model-repo", _bad_4d_hub(tmp_path), "--model-name", "patch_tokens"]
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = args[1] = tmp_path / "file" / "out"
    elif case == "cuda_without_gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        args += ["--device", "cuda"]
    elif case == "crop_bigger_than_resize":
        args += ["--resize-size", "128", "--crop-size", "224"]
    elif case == "offline_github":
        args[-4:] = ["--model-repo", "featpipe-test/no-such-repo", "--model-name", "x"]
        env = {"TORCH_HOME": str(tmp_path / "torch-home")}
    proc = run_cli("extract", *args, check=False, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("featpipe extract: error: "), proc.stderr
    expect = {
        "missing_shards": "not found",
        "empty_list": "empty",
        "unknown_entry": "no_such_model",
        "four_d": "(2, 8, 16, 16)",
        "unwritable": "cannot write",
        "cuda_without_gpu": "CUDA is not available",
        "crop_bigger_than_resize": "larger than",
        "offline_github": "no-such-repo",
    }[case]
    assert expect in last
    if case == "offline_github":
        assert "--model-repo PATH" in last or "404" in last
    assert not out.exists()


def test_no_decodable_image_gives_empty_outputs_of_the_right_width(sample_dir, tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    run_cli("pack", sample_dir / "broken", shards)  # only the truncated JPEG passes the header check
    proc = run_cli("extract", shards, out, *MODEL, "--workers", "0", check=False)
    assert proc.returncode == 3 and "0 images embedded" in proc.stdout
    assert np.load(out / "fts.npy").shape == (0, 192)
    assert tuple(torch.load(out / "fts.pth", weights_only=True).shape) == (0, 192)
    assert json.loads((out / "img_list.json").read_text()) == []
    assert not list((out / "chunks").glob("*.parquet"))  # no empty chunk files
    assert run_cli("verify", out, "--shards", shards).returncode == 0


def test_chunks_read_by_embedding_reader_in_order(extracted):
    """The downstream reader autofaiss uses, on OUT/chunks as it is."""
    from embedding_reader import EmbeddingReader

    out, _ = extracted
    reader = EmbeddingReader(
        str(out / "chunks"), file_format="parquet", embedding_column="embedding", meta_columns=["path"]
    )
    assert (reader.count, reader.dimension) == (30, 192)
    embs, paths = [], []
    for emb, meta in reader(
        batch_size=7, start=0, end=reader.count, parallel_pieces=1, max_piece_size=8, show_progress=False
    ):
        embs.append(emb)
        paths += list(meta["path"])
    assert np.array_equal(np.concatenate(embs), torch.load(out / "fts.pth", weights_only=True).numpy())
    assert paths == json.loads((out / "img_list.json").read_text())


def test_match_on_an_extract_folder_joins_keys_and_paths(extracted, tmp_path):
    out, _ = extracted
    run_cli("match", out, tmp_path / "m", "-k", "3", "--no-progress")
    nb = pq.read_table(tmp_path / "m" / "neighbors.parquet").to_pylist()
    paths = json.loads((out / "img_list.json").read_text())
    keys = pq.read_table(out / "chunks").column("key").to_pylist()
    matches = np.load(tmp_path / "m" / "matches.npy")
    assert len(nb) == 30 * 3 and [r["rank"] for r in nb[:3]] == [0, 1, 2]
    for r in nb:
        assert r["query_path"] == paths[r["query"]] and r["neighbor_path"] == paths[r["neighbor"]]
        assert r["query_key"] == keys[r["query"]] and r["neighbor_key"] == keys[r["neighbor"]]
        assert matches[r["query"], r["rank"]] == r["neighbor"]
    assert all(r["neighbor"] == r["query"] and r["score"] > 0.999 for r in nb if r["rank"] == 0)


def test_query_with_an_image_file_finds_its_own_row(extracted, sample_dir, tmp_path):
    """The image alone, embedded with the model and transform run.json recorded, through the CLI."""
    out, _ = extracted
    image = sample_dir / "photos" / "IMG_0003.jpg"
    hits = [json.loads(ln) for ln in run_cli("query", out, image, "-k", "2", "--json").stdout.splitlines()]
    assert hits[0]["path"] == str(image) and hits[0]["score"] >= 0.999 and hits[0]["rank"] == 0
    run_cli("index", out, tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["embedder"]["model"]["name"] == "vit_tiny_p14" and meta["index_key"] == "Flat"
    key = hits[0]["key"]
    by_key = [
        json.loads(ln) for ln in run_cli("query", tmp_path / "index", key, str(image), "--json").stdout.splitlines()
    ]
    assert by_key[0]["row"] == hits[0]["row"] and by_key[0]["query"] == key
    from_image = [h for h in by_key if h["query"] == str(image)]
    assert from_image[0]["row"] == hits[0]["row"] and from_image[0]["score"] >= 0.999
    bad = run_cli("query", out, sample_dir / "broken" / "text_named.jpg", check=False)
    assert bad.returncode == 1 and "cannot decode the query image" in bad.stderr and "Traceback" not in bad.stderr


def test_chunks_record_where_each_image_lies_and_thumbnails_read_only_that(extracted, monkeypatch):
    """offset/length in the chunks point at the image's own bytes in its tar, and thumbnails are
    read by that range alone: the shard is never streamed from its start."""
    import pipeline.retrieve.show as show
    from pipeline.retrieve.features import open_features

    out, _ = extracted
    table = pq.read_table(out / "chunks").to_pylist()
    shards = {s["name"]: s["url"] for s in json.loads((out / "run.json").read_text())["shards"]}
    for row in table:
        data = Path(shards[row["shard"]]).read_bytes()[row["offset"] : row["offset"] + row["length"]]
        assert row["length"] > 0 and data == Path(row["path"]).read_bytes(), row["path"]
    monkeypatch.setattr(show, "open_stream", lambda url: (_ for _ in ()).throw(AssertionError(f"streamed {url}")))
    thumbs = show.Thumbnails(open_features(str(out)), 64).jpegs(set(range(len(table))))
    assert len(thumbs) == len(table) and all(j[:2] == b"\xff\xd8" for j in thumbs.values())
