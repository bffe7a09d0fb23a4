"""The Python API, in-process, as a notebook would call it."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, VALID

from pipeline import api

HUB = str(ROOT / "pipeline" / "hub")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("api") / "images"
    d.mkdir()
    for i in range(1, 7):
        (d / f"p{i}.jpg").write_bytes(VALID[f"photos/IMG_000{i}.jpg"])
    (d / "copy.jpg").write_bytes(VALID["photos/IMG_0001.jpg"])
    return d


def test_the_verbs_chain_in_process(images, tmp_path):
    packed = api.pack(str(images), str(tmp_path / "shards"), shard_size=3, progress=False)
    assert packed.manifest["totals"]["samples"] == 7
    result = api.extract(
        str(tmp_path / "shards"),
        str(tmp_path / "out"),
        model="vit_tiny_p14",
        repo=HUB,
        workers=0,
        progress=False,
        meta=["relpath", "format"],  # of the .json pack wrote beside each image
    )
    assert result.exit_code == 0 and result.stats["rows"] == 7
    meta = pq.read_table(result.files["metadata/metadata.parquet"])
    assert meta.column_names == ["key", "path", "relpath", "format"] and "p3.jpg" in meta.column("relpath").to_pylist()
    feats, paths = api.load_features(str(tmp_path / "out"))
    assert feats.shape == (7, 192) and feats.dtype == np.float16 and len(paths) == 7
    f32, _ = api.load_features(str(tmp_path / "out"), dtype="float32")
    assert np.allclose(f32, feats, atol=1e-2)
    m = api.match(str(tmp_path / "out"), str(tmp_path / "m"), k=3, progress=False)
    assert m.report["n"] == 7 and (np.load(tmp_path / "m" / "matches.npy")[:, 0] == np.arange(7)).all()
    d = api.dedup(str(tmp_path / "out"), str(tmp_path / "d"), threshold=0.999, k=3, progress=False)
    assert [sorted(p.rsplit("/", 1)[-1] for p in map(paths.__getitem__, g.members)) for g in d.groups] == [
        ["copy.jpg", "p1.jpg"]
    ]
    hits = api.query(str(tmp_path / "out"), [str(images / "p3.jpg")], k=2)
    assert hits[0].path.endswith("p3.jpg") and hits[0].score > 0.999
    pages = api.show(str(tmp_path / "d"), str(tmp_path / "d.html"))
    assert pages == [str(tmp_path / "d.html")] and "copy.jpg" in (tmp_path / "d.html").read_text()


def test_errors_are_exceptions_not_exits(tmp_path):
    with pytest.raises(api.UserError, match="does not exist"):
        api.pack(str(tmp_path / "nothing"), str(tmp_path / "shards"))
    with pytest.raises(api.UserError, match="no consolidated features"):
        api.load_features(str(tmp_path))


def test_dataset_in_a_dataloader_gives_every_sample_once(images):
    loader = torch.utils.data.DataLoader(api.dataset(str(images), group_size=2), batch_size=4, num_workers=2)
    keys, paths = [], []
    for crops, k, p in loader:
        assert crops.dtype == torch.uint8 and crops.shape[1:] == (3, 224, 224)
        keys += k
        paths += p
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 7
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == sorted(f.name for f in images.iterdir())
