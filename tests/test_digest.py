"""Fingerprints written once (issue 31): consolidation records fts.npy's fingerprint as it writes
the rows, with the file's stamp; consumers read it instead of hashing every vector, a change behind
featpipe's back changes the stamp and is hashed (and refused) as before, an update's prefix check
reads no vector, and `featpipe verify` rehashes on request."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, cli_peak_memory, run_cli
from conftest import noisy_photo as jpeg

from pipeline import api
from pipeline.retrieve.features import FeatureSet, open_features

HUB = str(ROOT / "pipeline" / "hub")


def _grow(src, work) -> None:
    api.pack(src, work / "shards", shard_size=4, relist=True, progress=False)
    api.extract(work / "shards", work / "out", model="tiny_cnn", repo=HUB, workers=0, progress=False)


def _no_hashing(monkeypatch) -> None:
    def refuse(self, n):
        raise AssertionError(f"hashed {n} rows of {self.file}")

    monkeypatch.setattr(FeatureSet, "hash_rows", refuse)


def test_recorded_fingerprints_replace_hashing_until_the_file_changes(tmp_path, monkeypatch):
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    for i in range(6):
        (src / f"a{i}.jpg").write_bytes(jpeg(i))
    _grow(src, work)
    out = work / "out"
    hashed = open_features(str(out)).hash_rows(6)
    record = json.loads((out / "digest.json").read_text())
    assert record["fingerprints"] == {"6": hashed} and record["file"] == "fts.npy"

    with monkeypatch.context() as m:  # the same value as hashing, with no byte read
        _no_hashing(m)
        assert open_features(str(out)).fingerprint == hashed

    for i in range(6, 9):  # the folder grows: the update's prefix (6 rows) is recorded as well
        (src / f"b{i}.jpg").write_bytes(jpeg(i))
    _grow(src, work)
    full = open_features(str(out)).hash_rows(9)
    with monkeypatch.context() as m:
        _no_hashing(m)
        grown = open_features(str(out))
        assert grown.prefix_fingerprint(6) == hashed and grown.fingerprint == full

    fts = out / "fts.npy"  # a row changed behind featpipe's back: the stamp moves, the bytes are hashed
    x = np.load(fts)
    x[2] += np.float16(0.5)
    np.save(fts, x)
    with monkeypatch.context() as m:
        _no_hashing(m)
        with pytest.raises(AssertionError, match="hashed 9 rows"):
            _ = open_features(str(out)).fingerprint
    assert open_features(str(out)).fingerprint != full


def test_verify_rehashes_the_recorded_fingerprint(tmp_path):
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    for i in range(5):
        (src / f"a{i}.jpg").write_bytes(jpeg(i))
    _grow(src, work)
    run_cli("verify", work / "out")
    record = json.loads((work / "out" / "digest.json").read_text())
    record["fingerprints"]["5"] = "sha256:" + "0" * 64
    (work / "out" / "digest.json").write_text(json.dumps(record))
    proc = run_cli("verify", work / "out", check=False)
    assert proc.returncode != 0 and "the first 5 rows' recorded fingerprint is not theirs" in proc.stdout + proc.stderr


def test_make_features_writes_an_extract_output_any_command_takes(tmp_path):
    """tools/make_features.py: a valid extract OUT of synthetic rows (no model), the same bytes for
    the same arguments, which verify accepts and query answers with bucket-key paths."""
    import subprocess
    import sys

    def make(out, *flags):
        cmd = [sys.executable, str(ROOT / "tools" / "make_features.py"), str(out), "--rows", "2500", "--dim", "16"]
        subprocess.run([*cmd, "--shard-rows", "1000", *flags], check=True, capture_output=True)

    make(tmp_path / "a")
    make(tmp_path / "b", "--torch-features", "none")  # no float32 copy: the rest the same bytes
    assert (tmp_path / "a" / "fts.pth").exists() and not (tmp_path / "b" / "fts.pth").exists()
    for name in ("fts.npy", "img_list.json", "metadata/metadata.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    digests = [json.loads((tmp_path / x / "digest.json").read_text())["fingerprints"] for x in "ab"]
    assert digests[0] == digests[1]  # the files' stamps (mtimes) differ, the fingerprints do not
    run_cli("verify", tmp_path / "b", "--torch-features", "none")
    with pytest.raises(api.UserError, match="--torch-features none"):
        api.load_features(tmp_path / "b", dtype="float32")
    run_cli("consolidate", tmp_path / "b")  # asked for again: written
    assert torch_equal(tmp_path / "a" / "fts.pth", tmp_path / "b" / "fts.pth")
    run_cli("consolidate", tmp_path / "b", "--torch-features", "none")  # an earlier copy is not left stale
    assert not (tmp_path / "b" / "fts.pth").exists()
    assert np.load(tmp_path / "a" / "fts.npy").shape == (2500, 16)
    run_cli("verify", tmp_path / "a")
    paths = json.loads((tmp_path / "a" / "img_list.json").read_text())
    hits = [
        json.loads(ln)
        for ln in run_cli("query", tmp_path / "a", paths[1], "-k", "2", "--json").stdout.split("\n")
        if ln
    ]
    assert paths[1].startswith("s3://") and [h["row"] for h in hits] == [1, 0]  # row 1 is a near-copy of row 0


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True))


def test_consolidation_takes_the_same_memory_at_20k_and_1m_rows(tmp_path):
    """fts.npy is appended to a chunk at a time, not filled through a memory map (which kept every
    written page in the process: make_features at 50M × 64 peaked at 8.4 GB): `featpipe
    consolidate` peaks within 40 MB at 20k and at 1M rows (fts.npy of 2.6 MB and 128 MB), with
    shards of the same size."""
    import subprocess
    import sys

    peaks = {}
    for rows in (20_000, 1_000_000):
        out = tmp_path / str(rows)
        cmd = [sys.executable, str(ROOT / "tools" / "make_features.py"), str(out), "--rows", str(rows), "--dim", "64"]
        subprocess.run([*cmd, "--shard-rows", "10000", "--torch-features", "none"], check=True, capture_output=True)
        before = (out / "fts.npy").read_bytes()
        peaks[rows] = cli_peak_memory("consolidate", out, "--torch-features", "none")
        assert (out / "fts.npy").read_bytes() == before  # written again, the same bytes
    assert np.load(tmp_path / "1000000" / "fts.npy", mmap_mode="r").shape == (1_000_000, 64)
    assert peaks[1_000_000] - peaks[20_000] < 40 << 20, peaks
