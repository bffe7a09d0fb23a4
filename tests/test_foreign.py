"""Other tools' embeddings as FEATURES (issue 30 item 5): a clip-retrieval / embedding-reader folder
(img_emb/*.npy + metadata/*.parquet) and a folder of Parquet files with an embedding column are
matched, indexed and queried like an extract's output, answering with their own paths and captions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from test_interop import MODEL, photos


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    base = tmp_path_factory.mktemp("foreign")
    run_cli("extract", photos(base / "src", 7), base / "out", *MODEL, "--normalize")
    return base / "out"


def clip_retrieval_folder(folder, fts: np.ndarray, parts: list[tuple[int, int]]) -> None:
    """clip-retrieval inference's layout: img_emb/img_emb_N.npy, text_emb/ beside it (not
    images: never read), metadata/metadata_N.parquet with image_path and caption."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, (a, b) in enumerate(parts):
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", fts[a:b])
        np.save(folder / "text_emb" / f"text_emb_{i}.npy", -fts[a:b])
        meta = {"image_path": [f"/data/img{j}.jpg" for j in range(a, b)], "caption": [f"cap {j}" for j in range(a, b)]}
        pq.write_table(pa.table(meta), folder / "metadata" / f"metadata_{i}.parquet")


def hits(*args, env: dict) -> list[dict]:
    """`featpipe query ARGS --json`'s hits."""
    return [json.loads(line) for line in run_cli("query", *args, "--json", env=env).stdout.splitlines()]


def test_a_clip_retrieval_folder_is_matched_indexed_and_queried_with_its_paths(extracted, tmp_path):
    env = {"FEATPIPE_CACHE": str(tmp_path / "cache")}
    fts = np.load(extracted / "fts.npy")
    cr = tmp_path / "cr"
    clip_retrieval_folder(cr, fts, [(0, 4), (4, 6)])
    run_cli("match", cr, tmp_path / "m-cr", "-k", "3", "--no-progress", env=env)
    np.save(tmp_path / "six.npy", fts[:6])
    run_cli("match", tmp_path / "six.npy", tmp_path / "m-npy", "-k", "3", "--no-progress", env=env)
    for name in ("matches.npy", "scores.npy"):  # the same vectors, the same answers
        assert np.load(tmp_path / "m-cr" / name).tobytes() == np.load(tmp_path / "m-npy" / name).tobytes()
    run_cli("index", cr, tmp_path / "index", "--no-progress", env=env)
    found = hits(tmp_path / "index", "/data/img3.jpg", "-k", "2", env=env)
    assert found[0]["row"] == 3 and found[0]["path"] == "/data/img3.jpg" and found[0]["caption"] == "cap 3"
    assert all(h["path"] == f"/data/img{h['row']}.jpg" for h in found)
    clip_retrieval_folder(cr, fts, [(0, 4), (4, 6), (6, 7)])  # the folder grew: imported again
    (found,) = hits(cr, "/data/img6.jpg", "-k", "1", env=env)
    assert found["row"] == 6 and found["caption"] == "cap 6"
    stale = run_cli("query", tmp_path / "index", "/data/img3.jpg", env=env, check=False)
    assert stale.returncode == 1 and "changed since the index" in stale.stderr


def test_parquet_files_with_an_embedding_column(extracted, tmp_path):
    """Two float-list columns: one line asking for --embedding-column; with it (and --path-column)
    the index answers with that column's paths, and a later command reuses the columns chosen."""
    env = {"FEATPIPE_CACHE": str(tmp_path / "cache")}
    fts = np.load(extracted / "fts.npy").astype(np.float32)
    folder = tmp_path / "parquet"
    folder.mkdir()
    for i, (a, b) in enumerate([(0, 3), (3, 7)]):
        table = {
            "emb": pa.array(list(fts[a:b]), pa.list_(pa.float32())),
            "other": pa.array(list(fts[a:b] * 2), pa.list_(pa.float32())),
            "url": [f"https://example.org/{j}.jpg" for j in range(a, b)],
            "image_path": [f"local/{j}.jpg" for j in range(a, b)],
        }
        pq.write_table(pa.table(table), folder / f"part-{i}.parquet")
    proc = run_cli("index", folder, tmp_path / "index", "--no-progress", env=env, check=False)
    assert proc.returncode == 1 and "--embedding-column" in proc.stderr and "emb, other" in proc.stderr
    flags = ("--embedding-column", "emb", "--path-column", "url")
    run_cli("index", folder, tmp_path / "index", "--no-progress", *flags, env=env)
    found = hits(tmp_path / "index", "https://example.org/5.jpg", "-k", "2", env=env)
    assert found[0]["row"] == 5 and abs(found[0]["score"] - 1) < 1e-3
    assert [h["path"] for h in found] == [f"https://example.org/{h['row']}.jpg" for h in found]
    assert hits(folder, "https://example.org/1.jpg", "-k", "1", env=env)[0]["row"] == 1  # the columns kept
    bad = run_cli("query", tmp_path / "index", "x", "--embedding-column", "emb", env=env, check=False)
    assert bad.returncode == 1 and "another tool's folder" in bad.stderr
