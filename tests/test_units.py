"""In-process tests of the pure parts: a bug shows where it is, not as a byte mismatch three layers away."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipeline.chunks import ShardRows, write_chunk
from pipeline.errors import SampleError, UserError, reason
from pipeline.extract.consolidate import consolidate
from pipeline.extract.inputs import resolve_shards
from pipeline.extract.verify import verify
from pipeline.outdir import DoneRecord, OutputNames, RunInfo, ShardEntry, check_compatible, write_done, write_run
from pipeline.pack.inventory import Identity, Inventory, sort_unique
from pipeline.pack.packer import PackConfig, fingerprint, plan
from pipeline.storage import locate
from pipeline.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text,value",
    [("1000000", 10**6), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (" 1.5 kb ", 1500), ("3t", 3 * 10**12)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "0", "-5MB", "12 parsecs", "MB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_format_bytes():
    assert [format_bytes(n) for n in (999, 1500, 2.5e9, 7e15)] == ["999 B", "1.5 KB", "2.5 GB", "7000.0 TB"]


def test_reason_is_one_line_even_for_an_empty_message():
    assert reason(RuntimeError()) == "RuntimeError"
    assert reason(RuntimeError("")) == "RuntimeError"
    assert reason(ValueError("first\nsecond")) == "ValueError: first"


def _inventory(sizes: list[int]) -> Inventory:
    names = [f"{i:03d}.jpg".encode() for i in range(len(sizes))]
    relpaths, arr, _, _ = sort_unique(names, sizes)
    return Inventory(Identity("/src", "folder", "/src", "/src"), relpaths, arr)


def _shards(sizes: list[int], cfg: PackConfig) -> list[list[str]]:
    inv = _inventory(sizes)
    return [[f"{i:03d}.jpg" for i in range(s.start, s.stop)] for s in plan(inv, cfg)]


def test_plan_splits_by_count_and_bytes():
    cfg = PackConfig("src", "dest", shard_size=3, max_shard_bytes=100)
    assert _shards([10, 10, 10, 10, 60, 50, 1], cfg) == [
        ["000.jpg", "001.jpg", "002.jpg"],
        ["003.jpg", "004.jpg"],
        ["005.jpg", "006.jpg"],
    ]
    # a file larger than the limit gets a shard of its own, and the next starts afresh
    assert _shards([5, 150, 5, 5], cfg) == [["000.jpg"], ["001.jpg"], ["002.jpg", "003.jpg"]]
    assert [s.index for s in plan(_inventory([1] * 7), cfg)] == [0, 1, 2]


def test_plan_fingerprints_follow_files_and_options():
    cfg = PackConfig("src", "dest", shard_size=2)

    def prints(sizes: list[int], cfg: PackConfig) -> list[str]:
        inv = _inventory(sizes)
        return [fingerprint(inv, s, cfg) for s in plan(inv, cfg)]

    a = prints([1, 2, 3, 4], cfg)
    b = prints([1, 2, 3, 5], cfg)  # one size differs in the second shard
    c = prints([1, 2, 3, 4], PackConfig("src", "dest", shard_size=2, quality=80))
    assert a[0] == b[0] and a[1] != b[1]
    assert a[0] != c[0]
    assert prints([1, 2, 3, 4], PackConfig("s", "d", shard_size=2, workers=7)) == a  # not the speed knobs
    # the same value as earlier versions computed, so a DEST they packed resumes instead of being refused
    old = hashlib.sha256(json.dumps(cfg.options(), sort_keys=True).encode())
    for name, size in (("000.jpg", 1), ("001.jpg", 2)):
        old.update(f"\0{name}\0{size}".encode())
    assert a[0] == old.hexdigest()[:16]


def test_duplicates_are_dropped_after_a_byte_order_sort():
    relpaths, sizes, repeats, examples = sort_unique([b"b", b"a", b"b", b"\xff", b"a"], [1, 2, 3, 4, 5])
    assert relpaths.to_pylist() == [b"a", b"b", b"\xff"] and sizes.tolist() == [2, 1, 4]  # first listing's size
    assert repeats == 2 and examples == ["a", "b"]


def test_resolve_brace_list_and_folders(tmp_path):
    refs = resolve_shards("s3://b/shard-{000000..000002}.tar")
    assert [(r.name, r.url, r.index) for r in refs] == [
        (f"shard-00000{i}", f"s3://b/shard-00000{i}.tar", i) for i in range(3)
    ]
    (tmp_path / "a").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\n\na/x.tar\n/abs/x.tar\nhttp://h/y.tar\n")
    refs = resolve_shards(str(listing))
    assert [r.url for r in refs] == [str(tmp_path / "a" / "x.tar"), "/abs/x.tar", "http://h/y.tar"]
    assert [r.name for r in refs] == ["000000-x", "000001-x", "000002-y"]  # equal stems get their position
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "manifest.json").write_text(json.dumps({"shards": [{"name": "shard-000000.tar", "samples": 7}]}))
    assert [(r.name, r.expected) for r in resolve_shards(str(packed))] == [("shard-000000", 7)]
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.png", "sub/c.JPG", "notes.txt"):
        (images / name).write_bytes(b"x")
    refs = resolve_shards(str(images), group_size=2)
    assert [(r.name, r.files) for r in refs] == [
        ("part-000000", (f"{images}/a.png", f"{images}/b.jpg")),
        ("part-000001", (f"{images}/sub/c.JPG",)),
    ]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: str(p / "missing"), "not found"),
        (lambda p: (p / "empty.txt").write_text("# none\n") and str(p / "empty.txt"), "empty"),
        (lambda p: (p / "d").mkdir() or str(p / "d"), "no shards or images"),
    ],
)
def test_resolve_refuses(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        resolve_shards(make(tmp_path))


def _run(settings=None, names=("s0", "s1")) -> RunInfo:
    return RunInfo(settings or {"model": "m", "transform": "t"}, [ShardEntry(n, f"/x/{n}.tar", 2) for n in names], 4)


def test_run_compatibility(tmp_path):
    out = locate(str(tmp_path / "out"))
    assert check_compatible(out, _run()) is False
    write_run(out, _run())
    assert check_compatible(out, _run()) is True
    with pytest.raises(UserError, match=r"other settings \(transform\)"):
        check_compatible(out, _run({"model": "m", "transform": "other"}))
    with pytest.raises(UserError, match="another shard list"):
        check_compatible(out, _run(names=("s0",)))


def _hand_built_out(tmp_path) -> str:
    """Two shards of two samples each (one recorded as a decode failure), consolidated."""
    out = locate(str(tmp_path / "out"))
    run = _run()
    write_run(out, run)
    rng = np.random.default_rng(0)
    for s, name in enumerate(run.shard_names):
        rows = ShardRows(name)
        rows.add([f"{s}_0"], [f"/img/{s}_0.jpg"], [0], [(8, 6)], rng.standard_normal((1, 4)).astype(np.float32))
        write_chunk(out, rows)
        bad = SampleError(name, f"{s}_1", f"/img/{s}_1.jpg", 1, "decode failed: OSError: truncated")
        write_done(out, DoneRecord(name, 1, 2, [bad], None, 4, f"chunks/{name}.parquet", run.fingerprint))
    consolidate(out, run)
    return out.path


def _damage(out: str, kind: str) -> None:
    import pathlib

    o = pathlib.Path(out)
    done = o / "done" / "s1.json"
    rec = json.loads(done.read_text())
    if kind == "unfinished":
        done.unlink()
    elif kind == "missing_chunk":
        (o / "chunks" / "s1.parquet").unlink()
    elif kind == "rows_mismatch":
        rec.update(rows=2, read=3)
        done.write_text(json.dumps(rec))
    elif kind == "unaccounted":
        rec["read"] = 5
        done.write_text(json.dumps(rec))
    elif kind == "fingerprint":
        rec["fingerprint"] = "0" * 16
        done.write_text(json.dumps(rec))
    elif kind == "npy_rows":
        a = np.load(o / "fts.npy")
        a[1] += 1
        np.save(o / "fts.npy", a)
    elif kind == "img_list":
        (o / "img_list.json").write_text(json.dumps(["/img/0_0.jpg", "/img/other.jpg"]))
    elif kind == "no_outputs":
        (o / "fts.pth").unlink()


def test_verify_accepts_the_hand_built_folder(tmp_path):
    problems, summary = verify(_hand_built_out(tmp_path), None, OutputNames())
    assert problems == [] and summary.startswith("OK: 2 rows from 2 shards; 2 samples recorded as failed")


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("unfinished", "s1: no chunk and no done record"),
        ("missing_chunk", "s1: done record says 1 rows but the chunk"),
        ("rows_mismatch", "s1: chunk has 1 rows, done record says 2"),
        ("unaccounted", "s1: read 5 samples but 1 rows"),
        ("fingerprint", "s1: made with other settings"),
        ("npy_rows", "fts.npy: rows of s1 differ"),
        ("img_list", "img_list.json: 2 paths that do not match"),
        ("no_outputs", "missing consolidated output"),
    ],
)
def test_verify_names_each_kind_of_damage(tmp_path, kind, expect):
    out = _hand_built_out(tmp_path)
    _damage(out, kind)
    problems, summary = verify(out, None, OutputNames())
    assert summary.startswith("FAILED") and any(expect in p for p in problems), problems
