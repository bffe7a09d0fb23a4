"""The CUDA-only paths (issue 28), tested on the CPU through the same code: the features' read-back
overlapping the next batch, device tile planning, fp16 candidate scores settled exactly, worker
counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.extract.readback import PendingFeatures
from pipeline.retrieve.features import open_features
from pipeline.retrieve.knn import (
    CANDIDATE_MARGIN,
    ExactSearch,
    Tiling,
    device_query_rows,
    finish_rows,
    normalize,
    plan_tiles,
    valid_rows,
)


class _Event:
    """A CUDA event's two calls, counted."""

    log: list[str] = []

    def record(self) -> None:
        _Event.log.append("record")

    def synchronize(self) -> None:
        _Event.log.append("synchronize")


def test_read_back_waits_on_its_own_event_one_iteration_later():
    """The copy is queued with an event when the batch is queued; the host waits on that event only
    when it reads the features, after the next batch was queued."""
    _Event.log = []
    first = PendingFeatures(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), _Event)
    assert _Event.log == ["record"]  # queued: nothing waited for
    second = PendingFeatures(torch.ones(2, 3), _Event)  # the next batch, queued before reading the first
    assert _Event.log == ["record", "record"]
    got = first.result()
    assert _Event.log == ["record", "record", "synchronize"] and got.dtype.name == "float32"
    assert got.tolist() == [[0, 1, 2], [3, 4, 5]] and second.result().sum() == 6


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Tight clusters with exact duplicates: many scores within fp16's error of each other."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    x = centres[rng.integers(0, 20, n)] + 0.02 * rng.standard_normal((n, dim))
    x[n // 2 : n // 2 + 40] = x[:40]  # byte copies: ties broken by row number
    return x.astype(np.float16)


@pytest.mark.parametrize("n,dim,gb", [(10**6, 384, 24), (10**6, 1024, 24), (10**7, 384, 80), (10**7, 1024, 80)])
def test_device_blocks_fit_the_device(n, dim, gb):
    """With the default 2 GB host budget, the database tile (or all of it when it fits), the query
    block and the score block with topk's copy fit the device's share, at 24 and 80 GB."""
    tiling = plan_tiles(n, dim, 11 + CANDIDATE_MARGIN, 2 * 10**9)
    free = gb * 2**30
    db = n * dim * 2 if n * dim * 2 < free // 2 else tiling.db_rows * dim * 2
    held = db + tiling.query_rows * dim * 4
    rows = device_query_rows(tiling.db_rows, held, free)
    assert rows >= 256 and held + 2 * rows * tiling.db_rows * 2 <= free * 0.5
    with pytest.raises(UserError, match="device memory"):
        device_query_rows(tiling.db_rows, held, held)  # a device too small says so in one line


def test_fp16_candidates_settled_on_the_device_equal_the_exact_match(tmp_path):
    """The GPU's arithmetic (fp16 products) on the CPU, in blocks far smaller than the query block:
    with its error bound and the settling done by the same device search, the result equals the
    CPU (float32 faiss) search's, ties and byte copies included."""
    np.save(tmp_path / "x.npy", _clustered(3000, 64))
    fs = open_features(str(tmp_path / "x.npy"))
    tiling = Tiling(query_rows=3000, db_rows=700)
    valid = valid_rows(fs, 700)
    queries = normalize(fs.read(0, fs.n).astype(np.float32))
    k = 10
    results = []
    for search in (ExactSearch(fs, valid, tiling), ExactSearch(fs, valid, tiling, half=True)):
        cand = search.candidates(queries, k + 1 + CANDIDATE_MARGIN)
        results.append(finish_rows(fs, np.arange(fs.n), fs.read(0, fs.n), cand, k, "first", search))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    assert (results[0][0][: fs.n // 2, 1] != results[0][0][: fs.n // 2, 0]).all()


def test_a_query_embeds_with_the_runs_precision(tmp_path):
    """An extract run in bf16 (a GPU's default) records it; `featpipe query` embeds its images
    under the same autocast (it used fp32 whatever the run), and an image finds itself first."""
    from conftest import PHOTOS, ROOT, run_cli

    from pipeline.outdir import load_run
    from pipeline.retrieve.query import Embedder
    from pipeline.storage import locate

    src = tmp_path / "src"
    src.mkdir()
    for i, photo in enumerate(PHOTOS[:4]):
        (src / f"p{i}.jpg").write_bytes(photo)
    hub = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14"]
    run_cli("extract", src, tmp_path / "out", *hub, "--precision", "bf16", "--workers", "0", "--no-progress")
    meta = load_run(locate(str(tmp_path / "out"))).extra["embedder"]
    assert meta["precision"] == "bf16" and Embedder(meta, "out", "cpu").run.amp == torch.bfloat16
    hit = json.loads(run_cli("query", tmp_path / "out", src / "p2.jpg", "-k", "1", "--json").stdout.splitlines()[0])
    assert hit["path"].endswith("p2.jpg") and hit["score"] > 0.9999, hit


def test_workers_default_to_the_cores_each_local_rank_has(monkeypatch):
    from pipeline import cpu

    monkeypatch.setattr(cpu, "cores", lambda: 48)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu.default_workers() == 48  # no cap at 8: one GPU needs more decoders than that
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpu.default_workers() == 6


_FAKE_GITHUB = """
import os, shutil, time
import torch.hub

def _download(url, dst, *args, **kwargs):  # GitHub, here: count the fetch, copy the prepared zip
    with open(os.environ["FEATPIPE_TEST_FETCHES"], "a") as f:
        f.write(url + "\\n")
    time.sleep(1.0)  # as long as a real download: the other rank would start its own meanwhile
    shutil.copy(os.environ["FEATPIPE_TEST_ZIP"], dst)

torch.hub.download_url_to_file = _download
"""


def test_ranks_on_one_node_fetch_a_hub_repo_once(tmp_path):
    """Two torchrun ranks on one TORCH_HOME load a GitHub hub model: one fetch, both ranks run
    (unlocked, both fetched to the same main.zip and one could remove it under the other)."""
    import zipfile

    from conftest import ROOT, noisy_photo, torchrun

    archive = tmp_path / "repo.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("fakehub-main/", "")  # GitHub's archives start with the top folder; torch.hub reads it so
        z.write(ROOT / "pipeline" / "hub" / "hubconf.py", "fakehub-main/hubconf.py")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FAKE_GITHUB)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}.jpg").write_bytes(noisy_photo(i))
    env = {
        "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TORCH_HOME": str(tmp_path / "torch"),
        "FEATPIPE_TEST_FETCHES": str(tmp_path / "fetches.txt"),
        "FEATPIPE_TEST_ZIP": str(archive),
    }
    args = ["-m", "pipeline", "extract", str(src), str(tmp_path / "out"), "--model-repo", "someone/fakehub:main"]
    proc = torchrun(
        "--standalone",
        "--nproc-per-node",
        "2",
        *args,
        "--model-name",
        "tiny_cnn",
        "--workers",
        "0",
        "--no-progress",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "fetches.txt").read_text().splitlines()) == 1
    assert np.load(tmp_path / "out" / "fts.npy").shape[0] == 4


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    """tools/gpu_check.sh --smoke: the script a GPU machine runs unattended, on the CPU with tiny
    sizes, so that it cannot fail there for a reason of its own; every step recorded."""
    from conftest import ROOT

    proc = subprocess.run(
        [str(ROOT / "tools" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = ["images", "pack", "model_only", "extract_fast", "extract_device", "match_exact", "faiss_gpu"]
    assert all(s in report and "error" not in report[s] for s in steps), report
    assert report["images"]["progressive"] > 0 and report["extract_device"]["jpeg_decoder"] in (
        "torchcodec",
        "torchvision",
    )
    assert report["extract_fast"]["images_per_s"] > 0 and report["match_exact"]["n"] == 2000
    assert "steps failed: none" in proc.stdout


def test_a_device_mode_batch_is_one_flat_buffer_and_only_the_crops_made_here(tmp_path):
    """Device mode: plain baseline JPEGs travel as one byte buffer with offsets (their views equal
    the files), the image tensor holds only the crops the worker made (no zero slots), and
    progressive JPEGs and PNGs are decoded by the worker."""
    import io

    from conftest import PHOTOS
    from PIL import Image

    from pipeline.extract.dataset import ShardStream
    from pipeline.extract.inputs import resolve_shards
    from pipeline.image.transform import TransformConfig

    src = tmp_path / "src"
    src.mkdir()
    progressive, png = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(PHOTOS[0])).save(progressive, "JPEG", progressive=True)
    Image.open(io.BytesIO(PHOTOS[1])).save(png, "PNG")
    files = {"a.jpg": PHOTOS[2], "b.jpg": progressive.getvalue(), "c.png": png.getvalue(), "d.jpg": PHOTOS[3]}
    for name, data in files.items():
        (src / name).write_bytes(data)
    stream = ShardStream(resolve_shards(str(src), 1000), TransformConfig(mode="device"), 8)
    (batch,) = list(stream)
    names = [p.rsplit("/", 1)[-1] for p in batch.paths]
    assert [names[s] for s in batch.jpegs.slots] == ["a.jpg", "d.jpg"]
    assert [bytes(j.data.numpy()) for j in batch.jpegs.items()] == [files["a.jpg"], files["d.jpg"]]
    assert batch.jpegs.data.numel() == len(files["a.jpg"]) + len(files["d.jpg"])
    assert [names[s] for s in batch.crop_slots] == ["b.jpg", "c.png"] and batch.images.shape[0] == 2


def test_device_decodes_go_in_runs_of_bounded_pixels():
    """256 phone photos decoded at once held 9.2 GB on the device: runs stay under DECODE_PIXELS
    (one image alone may pass it)."""
    from pipeline.image.device import DECODE_PIXELS, DeviceJpeg, _parts

    sizes = [DECODE_PIXELS * 3 // 4, DECODE_PIXELS // 2, DECODE_PIXELS // 2, 2 * DECODE_PIXELS, 10]
    parts = _parts([DeviceJpeg(i, torch.zeros(1, dtype=torch.uint8), 1, p) for i, p in enumerate(sizes)])
    assert [[j.slot for j in part] for part in parts] == [[0], [1, 2], [3], [4]]


def test_a_faiss_index_stays_on_the_cpu_without_faiss_gpu():
    """match --method ivf on a CUDA device clones its index to the GPU only where faiss has GPU
    support; with faiss-cpu (here) the same index object searches."""
    faiss = pytest.importorskip("faiss")
    from pipeline.retrieve.ann import on_device

    index = faiss.IndexFlatIP(8)
    assert on_device(index, "cuda:1", 4) is index and on_device(index, "cpu") is index


def test_device_resizes_images_of_one_size_in_one_call_with_the_same_crops():
    """Grouped by size, the device's resize gives the crops one call per image gave."""
    import io

    from conftest import PHOTOS
    from PIL import Image

    from pipeline.image.device import DeviceJpeg, decode_on_device
    from pipeline.image.transform import TransformConfig, resize_crop_tensor

    datas = []
    for i, photo in enumerate(PHOTOS[:5]):
        buf = io.BytesIO()
        Image.open(io.BytesIO(photo)).convert("RGB").resize((320, 240) if i < 3 else (200, 300)).save(buf, "JPEG")
        datas.append(buf.getvalue())
    cfg = TransformConfig(mode="device")
    items = [DeviceJpeg(i, torch.frombuffer(bytearray(d), dtype=torch.uint8), 1, 1) for i, d in enumerate(datas)]
    crops, failed = decode_on_device(items, torch.device("cpu"), cfg, "torchvision")
    from pipeline.image.device import decode_jpeg

    alone = [resize_crop_tensor(decode_jpeg(j.data, torch.device("cpu"), "torchvision"), cfg) for j in items]
    assert not failed and all(torch.equal(crops[i], alone[i]) for i in range(5))
