"""Datasets that grow (issue 21): a folder gains and loses files in three steps; after each, pack
--relist → extract → match/dedup/index --update give what a full run over the same shards gives,
and nothing removed comes back from query or show."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import ROOT, run_cli
from conftest import noisy_photo as jpeg

from pipeline import api
from pipeline.errors import UserError

HUB = str(ROOT / "pipeline" / "hub")
pytest.importorskip("faiss")


def run_all(src, work, name: str, update: bool) -> None:
    api.pack(src, work / "shards", shard_size=6, relist=True, progress=False)
    api.extract(work / "shards", work / "out", model="tiny_cnn", repo=HUB, workers=0, progress=False)
    api.match(work / "out", work / name / "match", k=5, progress=False, update=update)
    api.dedup(work / "out", work / name / "dedup", 0.9998, k=2, progress=False, update=update)  # lists grown
    api.index(work / "out", work / name / "index", index_key="Flat", progress=False, update=update)


def same_files(a, b, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_growing_folder_updates_to_what_a_full_run_gives(tmp_path):
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    for i in range(20):
        (src / f"m{i:02d}.jpg").write_bytes(jpeg(i))
    (src / "m90.jpg").write_bytes(jpeg(3))  # a copy of m03
    run_all(src, work, "inc", update=False)
    steps = [
        {"add": {"a00.jpg": 40, "a01.jpg": 3}, "remove": []},  # names sorting first (a01: a third copy)
        {"add": {"z99.jpg": 41}, "remove": ["m03.jpg", "m07.jpg"]},  # last; two removed
        {"add": {"m05b.jpg": 42, "m10b.jpg": 43}, "remove": []},  # in between
    ]
    for n, step in enumerate(steps, 1):
        shards = {p.name: p.read_bytes() for p in (work / "shards").glob("shard-*.tar")}
        for name, i in step["add"].items():
            (src / name).write_bytes(jpeg(i))
        for name in step["remove"]:
            (src / name).unlink()
        run_all(src, work, "inc", update=True)
        # packed shards never change; new ones follow
        now = {p.name: p.read_bytes() for p in (work / "shards").glob("shard-*.tar")}
        assert now.items() >= shards.items() and len(now) > len(shards)
        # extract: the same consolidated files as a fresh run over the same shards
        api.extract(work / "shards", tmp_path / f"fresh{n}", model="tiny_cnn", repo=HUB, workers=0, progress=False)
        same_files(work / "out", tmp_path / f"fresh{n}", ["fts.npy", "fts.pth", "img_list.json", "removed.json"])
        # match and dedup: equal to a full run over the same features
        full = tmp_path / f"full{n}"
        api.match(work / "out", full / "match", k=5, progress=False)
        api.dedup(work / "out", full / "dedup", 0.9998, k=2, progress=False)
        same_files(work / "inc" / "match", full / "match", ["matches.npy", "scores.npy", "neighbors.parquet"])
        same_files(work / "inc" / "dedup", full / "dedup", ["groups.json", "duplicates.json", "to_remove.txt"])
        report = json.loads((work / "inc" / "match" / "match.json").read_text())
        assert report["update"]["added_rows"] == len(step["add"])
        capped = json.loads((work / "inc" / "dedup" / "dedup.json").read_text())["capped_lists"]
        assert 0 < capped["kept_from_earlier"] < capped["grown"]  # earlier grown lists kept, new ones grown
    removed = json.loads((work / "out" / "removed.json").read_text())
    assert [p.rsplit("/", 1)[-1] for p in removed["paths"]] == ["m03.jpg", "m07.jpg"]
    gone = set(removed["rows"])
    paths = json.loads((work / "out" / "img_list.json").read_text())
    assert len(paths) == 26 and {paths[r].rsplit("/", 1)[-1] for r in gone} == {"m03.jpg", "m07.jpg"}
    # nothing removed comes back: matches, groups, the index, queries by vector and by key
    matches = np.load(work / "inc" / "match" / "matches.npy")
    assert not gone & set(matches[matches != 2**32 - 1].tolist())
    groups = json.loads((work / "inc" / "dedup" / "groups.json").read_text())
    members = {m for g in groups for m in (g["members"] if isinstance(g, dict) else g)}
    assert members and not {str(paths[r]) for r in gone} & {str(m) for m in members} and not gone & members
    meta = json.loads((work / "inc" / "index" / "index.json").read_text())
    assert (meta["removed"]["count"], meta["removed_held"], meta["updates"], meta["generation"]) == (2, 0, 3, 3)
    hits = api.query(work / "inc" / "index", work / "out" / "fts.npy", k=30)
    assert hits and not gone & {h.row for h in hits}
    assert not gone & {h.row for h in api.query(work / "out", work / "out" / "fts.npy", k=30)}
    api.show(work / "inc" / "dedup", tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert "m03.jpg" not in page and "m07.jpg" not in page


def packed_and_extracted(tmp_path, n: int) -> tuple:
    """n photos in src/, packed 4 to a shard into work/shards, extracted into work/out."""
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    for i in range(n):
        (src / f"m{i:02d}.jpg").write_bytes(jpeg(i))
    api.pack(src, work / "shards", shard_size=4, progress=False)
    api.extract(work / "shards", work / "out", model="tiny_cnn", repo=HUB, workers=0, progress=False)
    return src, work


def test_each_killed_update_step_reruns_to_the_same_result(tmp_path):
    src, work = packed_and_extracted(tmp_path, 14)
    api.match(work / "out", work / "m", k=4, progress=False)
    api.index(work / "out", work / "i", index_key="Flat", progress=False)
    api.dedup(work / "out", work / "d", 0.9998, k=2, progress=False)
    for i, name in enumerate(["b.jpg", "c1.jpg", "c2.jpg", "c3.jpg", "c4.jpg"]):  # two new shards
        (src / name).write_bytes(jpeg(30 + i))
    (src / "m02.jpg").unlink()
    # pack --relist killed once its first new shard is committed, rerun with 2 workers: what one
    # unbroken relist gives (2 workers packing both new shards at once)
    shutil.copytree(work / "shards", work / "shards2")
    pack_args = ("pack", src, work / "shards", "--shard-size", "4", "--relist", "--no-progress")
    assert run_cli(*pack_args, env={"FEATPIPE_TEST_CRASH": "after-shard"}, check=False).returncode == -9
    run_cli(*pack_args, "--workers", "2")
    api.pack(src, work / "shards2", shard_size=4, relist=True, progress=False, workers=2)
    assert len(list((work / "shards").glob("shard-*.tar"))) == 6
    assert sorted(p.name for p in (work / "shards").iterdir()) == sorted(p.name for p in (work / "shards2").iterdir())
    same_files(
        work / "shards", work / "shards2", [p.name for p in (work / "shards2").glob("*.*") if p.suffix != ".json"]
    )
    a, b = (
        {k: v for k, v in json.loads((work / d / "manifest.json").read_text()).items() if k != "destination"}
        for d in ("shards", "shards2")
    )
    assert a == b
    # extract killed once the new shard's chunk is committed, before consolidating: rerun
    extract_args = ("extract", work / "shards", work / "out", "--model-repo", HUB, "--model-name", "tiny_cnn")
    extract_args += ("--workers", "0", "--no-progress")
    assert run_cli(*extract_args, env={"FEATPIPE_TEST_CRASH": "after-chunk"}, check=False).returncode == -9
    run_cli(*extract_args)
    api.extract(work / "shards", work / "fresh", model="tiny_cnn", repo=HUB, workers=0, progress=False)
    same_files(work / "out", work / "fresh", ["fts.npy", "fts.pth", "img_list.json", "removed.json"])
    args = ("match", work / "out", work / "m", "-k", "4", "--no-progress", "--update", "--memory-budget", "2MB")
    assert run_cli(*args, env={"FEATPIPE_TEST_CRASH": "update-block"}, check=False).returncode == -9
    run_cli(*args)
    api.match(work / "out", work / "full", k=4, progress=False)
    same_files(work / "m", work / "full", ["matches.npy", "scores.npy"])
    # dedup --update killed after saving its grown lists, before its groups: rerun
    dedup_args = ("dedup", work / "out", work / "d", "--threshold", "0.9998", "-k", "2", "--update", "--no-progress")
    assert run_cli(*dedup_args, env={"FEATPIPE_TEST_CRASH": "dedup-grown"}, check=False).returncode == -9
    run_cli(*dedup_args)
    api.dedup(work / "out", work / "full_d", 0.9998, k=2, progress=False)
    same_files(work / "d", work / "full_d", ["groups.json", "duplicates.json", "to_remove.txt"])
    # index --update killed after writing its new index file, before index.json names it: rerun
    index_args = ("index", work / "out", work / "i", "--update", "--no-progress")
    assert run_cli(*index_args, env={"FEATPIPE_TEST_CRASH": "index-written"}, check=False).returncode == -9
    run_cli(*index_args)
    np.save(work / "q.npy", np.load(work / "out" / "fts.npy")[:15])
    by = [work / "i", work / "out"]  # the updated index, and exact search
    hits = [[(h.row, round(h.score, 6)) for h in api.query(i, work / "q.npy", k=14)] for i in by]
    assert hits[0] == hits[1] and len(hits[0]) == 15 * 14 and 2 not in {r for r, _ in hits[0]}  # row 2: removed
    assert sorted(p.name for p in (work / "i").glob("*.faiss")) == ["index.1.faiss"]
    # features whose earlier rows changed are not updated: one line, OUT untouched
    np.save(work / "other.npy", np.random.default_rng(0).standard_normal((20, 64)).astype(np.float32))
    before = (work / "m" / "matches.npy").read_bytes()
    proc = run_cli("match", work / "other.npy", work / "m", "-k", "4", "--update", check=False)
    assert proc.returncode == 1 and "not the first rows" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (work / "m" / "matches.npy").read_bytes() == before


def test_rows_removed_after_an_index_was_built_are_never_returned(tmp_path):
    src, work = packed_and_extracted(tmp_path, 10)
    api.index(work / "out", work / "index", index_key="HNSW8,Flat", progress=False)
    api.match(work / "out", work / "m", k=3, progress=False)
    (src / "m04.jpg").unlink()  # nothing added: the features keep their bytes, the index stays valid
    api.pack(src, work / "shards", shard_size=4, relist=True, progress=False)
    api.extract(work / "shards", work / "out", model="tiny_cnn", repo=HUB, workers=0, progress=False)
    assert json.loads((work / "out" / "removed.json").read_text())["rows"] == [4]
    np.save(tmp_path / "q.npy", np.load(work / "out" / "fts.npy")[4:5])
    for target in (work / "index", work / "out"):  # the stale HNSW index (filtered), and exact search
        hits = api.query(target, tmp_path / "q.npy", k=9)
        assert len(hits) == 9 and 4 not in {h.row for h in hits}
    # --update on an HNSW index: it cannot drop the row, so the row stays filtered at query time
    meta = api.index(work / "out", work / "index", index_key="HNSW8,Flat", progress=False, update=True)
    assert (meta["removed"]["count"], meta["removed_held"], meta["updates"]) == (1, 1, 1)
    assert 4 not in {h.row for h in api.query(work / "index", tmp_path / "q.npy", k=9)}
    # a page of the match made before the removal is refused until the match is updated
    with pytest.raises(UserError, match="removed since this match was made; run it again with --update"):
        api.show(work / "m", tmp_path / "page.html")
    report = api.match(work / "out", work / "m", k=3, progress=False, update=True).report
    added, since, redone, merged = (
        report["update"][k] for k in ("added_rows", "removed_since", "researched_rows", "merged_rows")
    )
    assert (added, since, redone + merged) == (0, 1, 9) and redone >= 1  # redone: the rows that listed m04
    api.match(work / "out", work / "full", k=3, progress=False)
    same_files(work / "m", work / "full", ["matches.npy", "scores.npy"])
    api.show(work / "m", tmp_path / "page.html")
    assert "m04.jpg" not in (tmp_path / "page.html").read_text() and "m05.jpg" in (tmp_path / "page.html").read_text()
