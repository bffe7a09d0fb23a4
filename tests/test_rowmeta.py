"""Row metadata on demand (issue 31 item 2): an index keeps keys and paths in INDEX/rows/, read by
row and looked up by name through a sorted hash table; a query's memory does not grow with N."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, cli_peak_memory, run_cli

from pipeline.retrieve.rowmeta import RowMeta, name_hash
from pipeline.storage import locate


def make_features(out, rows: int, shard_rows: int) -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "make_features.py"), str(out), "--rows", str(rows), "--dim", "16"]
    subprocess.run([*cmd, "--shard-rows", str(shard_rows)], check=True, capture_output=True)


def peak_query_memory(index, path) -> int:
    """VmHWM of a `featpipe query` process, in bytes."""
    return cli_peak_memory("query", index, path, "-k", "3")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("rows")
    make_features(base / "features", 10_000, 3000)
    run_cli("index", base / "features", base / "index", "--index-key", "IVF64,PQ8x8np", "--no-progress")
    return base


def test_names_are_read_by_row_and_looked_up_by_name(small):
    paths = json.loads((small / "features" / "img_list.json").read_text())
    chunks = pq.read_table(small / "features" / "chunks")
    keys, captions = chunks.column("key").to_pylist(), chunks.column("caption").to_pylist()
    rows = RowMeta(locate(str(small / "index")))
    assert rows.n == 10_000 and rows.names([0, 4321, 9999]) == (
        [keys[r] for r in (0, 4321, 9999)],
        [paths[r] for r in (0, 4321, 9999)],
        [captions[r] for r in (0, 4321, 9999)],
    )
    assert captions[4321].startswith("picture 4321 of cluster ")
    assert [rows.row_of(keys[r]) for r in (0, 2999, 3000, 9999)] == [0, 2999, 3000, 9999]  # across shard edges
    assert rows.row_of(paths[5000]) == 5000 and rows.row_of("s3://photos/not/there.jpg") is None
    assert pq.read_table(small / "index" / "ids.parquet").column("path").to_pylist() == paths  # for other tools
    hashes = np.load(small / "index" / "rows" / "lookup.hash.npy")
    assert len(hashes) == 20_000 and (np.diff(hashes.astype(np.float64)) >= 0).all()
    assert name_hash(keys[0]) in set(hashes.tolist())


def test_query_answers_with_the_right_key_path_and_caption_by_key_or_path(small):
    paths = json.loads((small / "features" / "img_list.json").read_text())
    chunks = pq.read_table(small / "features" / "chunks")
    keys, captions = chunks.column("key").to_pylist(), chunks.column("caption").to_pylist()
    for query in (paths[1234], keys[1234]):
        hits = [
            json.loads(x) for x in run_cli("query", small / "index", query, "-k", "2", "--json").stdout.splitlines()
        ]
        assert hits[0]["row"] == 1234 and hits[0]["score"] > 0.9999
        assert all(h["key"] == keys[h["row"]] and h["path"] == paths[h["row"]] for h in hits)
        assert all(h["caption"] == captions[h["row"]] for h in hits)
    text = run_cli("query", small / "index", keys[1234], "-k", "1").stdout.splitlines()
    assert text[1].split("\t")[2:] == [paths[1234], captions[1234]]
    proc = run_cli("query", small / "index", "no-such-key", check=False)
    assert proc.returncode == 1 and "query it with keys, paths" in proc.stderr  # not found: taken for an image


def test_a_query_takes_the_same_memory_at_10k_and_200k_rows(small, tmp_path):
    """Lists of every key and path cost ~1 KB a row here (266 MB at 200k, measured before rows/);
    now a query maps what its hits touch: within 16 MB whatever N."""
    make_features(tmp_path / "features", 200_000, 25_000)
    run_cli("index", tmp_path / "features", tmp_path / "index", "--index-key", "IVF64,PQ8x8np", "--no-progress")
    path = json.loads((tmp_path / "features" / "img_list.json").read_text())[7]
    small_path = json.loads((small / "features" / "img_list.json").read_text())[7]
    grown = peak_query_memory(tmp_path / "index", path) - peak_query_memory(small / "index", small_path)
    assert grown < 16 * 2**20, grown


def test_thumbnails_of_an_index_read_their_rows_place_from_rows(tmp_path):
    """A service's thumbnails find a row's shard, key and byte range in INDEX/rows/ (never the
    lists of every row): the same JPEGs as from the features' lists."""
    from conftest import noisy_photo

    from pipeline import api
    from pipeline.retrieve.query import Target
    from pipeline.retrieve.show import Thumbnails

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"p{i}.jpg").write_bytes(noisy_photo(i))
    api.pack(src, tmp_path / "shards", shard_size=2, progress=False)
    hub = [
        "--model-repo",
        str(ROOT / "pipeline" / "hub"),
        "--model-name",
        "tiny_cnn",
        "--workers",
        "0",
        "--no-progress",
    ]
    run_cli("extract", tmp_path / "shards", tmp_path / "out", *hub)
    run_cli("index", tmp_path / "out", tmp_path / "index", "--no-progress")
    chunks = pq.read_table(tmp_path / "out" / "chunks")
    target = Target(str(tmp_path / "index"))
    places = target.places(range(5))
    assert [(p.shard, p.key, p.offset, p.length) for p in places.values()] == list(
        zip(*(chunks.column(c).to_pylist() for c in ("shard", "key", "offset", "length")), strict=True)
    )
    assert all(p.offset > 0 for p in places.values())
    by_rows = Thumbnails(target.features, 64, target.places).jpegs({0, 3, 4})
    assert sorted(by_rows) == [0, 3, 4] and by_rows == Thumbnails(target.features, 64).jpegs({0, 3, 4})


def test_the_lookup_table_sorted_in_buckets_is_the_same_bytes(small, tmp_path, monkeypatch):
    """The name → row table is sorted a bucket of hashes at a time (memory: one bucket, not 16
    bytes per name): with buckets of 4 KB (128 of them here) the files equal the one-bucket ones."""
    from pipeline.retrieve import rowmeta
    from pipeline.retrieve.features import open_features

    fs = open_features(small / "features")
    monkeypatch.setattr(rowmeta, "_BUCKET_BYTES", 4096)
    rowmeta.write(locate(str(tmp_path)), fs, rowmeta.row_blocks(fs))
    for name in (rowmeta.LOOKUP_HASH, rowmeta.LOOKUP_ROW, rowmeta.LOOKUP_FENCE, "key.bytes", "caption.offsets.npy"):
        assert (tmp_path / "rows" / name).read_bytes() == (small / "index" / "rows" / name).read_bytes(), name
    assert len(os.listdir(tmp_path / "rows")) == len(os.listdir(small / "index" / "rows"))


def test_names_are_read_a_batch_of_rows_at_a_time_not_a_shard(small, tmp_path, monkeypatch):
    """rows/ is written from batches of names smaller than a shard (a 500k-row shard's names as
    Python lists were the largest thing 50M rows' index build held): with batches of 700 rows
    across 3,000-row shards, no batch is larger and the files are the same bytes."""
    from pipeline.retrieve import features, rowmeta
    from pipeline.retrieve.features import open_features

    monkeypatch.setattr(features, "_NAME_BATCH", 700)
    fs = open_features(small / "features")
    sizes = [len(block["key"]) for block in rowmeta.row_blocks(fs)]
    assert max(sizes) == 700 and sum(sizes) == 10_000 and len(sizes) == 17  # 5 batches a shard of 3,000; 2 of 1,000
    rowmeta.write(locate(str(tmp_path)), fs, rowmeta.row_blocks(fs))
    for name in sorted(os.listdir(small / "index" / "rows")):
        assert (tmp_path / "rows" / name).read_bytes() == (small / "index" / "rows" / name).read_bytes(), name


def test_the_lookup_table_is_sorted_holding_one_bucket_at_a_time(small, tmp_path, monkeypatch):
    """Sorting the name → row table holds one bucket and its sort, not every bucket: a fence kept
    as views of the buckets held them all (2.4 GB for 50M rows' 1.6 GB table). Measured with
    tracemalloc (numpy reports its arrays to it) over the sort, with 32 buckets of ~10 KB."""
    import tracemalloc

    from pipeline.retrieve import rowmeta
    from pipeline.retrieve.features import open_features

    monkeypatch.setattr(rowmeta, "_BUCKET_BYTES", 16384)
    real, peaks = rowmeta._Lookup.finish, []

    def finish(self, *paths):
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        real(self, *paths)
        peaks.append(tracemalloc.get_traced_memory()[1] - start)

    monkeypatch.setattr(rowmeta._Lookup, "finish", finish)
    fs = open_features(small / "features")
    tracemalloc.start()
    try:
        rowmeta.write(locate(str(tmp_path)), fs, rowmeta.row_blocks(fs))
    finally:
        tracemalloc.stop()
    table = 20_000 * rowmeta.LOOKUP_DTYPE.itemsize  # 320 KB
    assert 0 < peaks[0] < table / 4, peaks


def test_every_name_is_found_through_the_fence_and_without_it(small, tmp_path, monkeypatch):
    """A lookup searches one block of the sorted hashes, found through the fence (every FENCE-th
    hash, in memory), so a cold lookup faults a page or two, not log2(2N). With a fence post every
    8 hashes (2,500 posts, the buckets' edges between them), every key and path finds its row; an
    index of an earlier featpipe (no fence file) finds the same; runs of equal hashes across a post
    lie inside the block searched."""
    from pipeline.retrieve import rowmeta
    from pipeline.retrieve.features import open_features

    fs = open_features(small / "features")
    monkeypatch.setattr(rowmeta, "_BUCKET_BYTES", 4096)
    monkeypatch.setattr(rowmeta, "FENCE", 8)
    rowmeta.write(locate(str(tmp_path)), fs, rowmeta.row_blocks(fs))
    hashes = np.load(tmp_path / "rows" / rowmeta.LOOKUP_HASH)
    assert (np.load(tmp_path / "rows" / rowmeta.LOOKUP_FENCE) == hashes[::8]).all()
    chunks = pq.read_table(small / "features" / "chunks")
    names = chunks.column("key").to_pylist() + json.loads((small / "features" / "img_list.json").read_text())
    with_fence = RowMeta(locate(str(tmp_path)))
    assert [with_fence.row_of(name) for name in names] == list(range(10_000)) * 2
    (tmp_path / "rows" / rowmeta.LOOKUP_FENCE).unlink()
    without = RowMeta(locate(str(tmp_path)))
    assert without.fence is None
    assert [without.row_of(n) for n in names[::97]] == [r % 10_000 for r in range(0, 20_000, 97)]
    with_fence.hashes = np.repeat(hashes[:300], 5)  # runs of 5 equal hashes, some across posts
    with_fence.fence = with_fence.hashes[::8]
    for h in hashes[:300]:
        start, stop = with_fence._block(h)
        assert (with_fence.hashes[start:stop] == h).sum() == 5 and stop - start <= 16


def test_show_reads_the_names_of_its_rows_alone(small, tmp_path):
    """show's names come from metadata/metadata.parquet's row groups holding the rows it shows
    (a row group per shard, the shards' names in its footer), not from lists of every row: with
    img_list.json gone, the page still names each row by its path, key and caption."""
    import shutil

    features = tmp_path / "features"
    shutil.copytree(small / "features", features)
    run_cli("match", features, tmp_path / "m", "-k", "3", "--no-progress")
    (features / "img_list.json").unlink()
    run_cli("show", tmp_path / "m", tmp_path / "page.html", "--sample", "5")
    page = (tmp_path / "page.html").read_text()
    chunks = pq.read_table(small / "features" / "chunks")
    paths = json.loads((small / "features" / "img_list.json").read_text())
    shown = [int(r) for r in re.findall(r"\(row (\d+)", page)]
    assert len(shown) >= 10
    for r in shown:
        key, caption = chunks.column("key")[r].as_py(), chunks.column("caption")[r].as_py()
        assert f"(row {r} · {key})" in page and caption in page and paths[r].rsplit("/", 1)[-1] in page
