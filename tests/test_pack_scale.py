"""`featpipe pack` at bucket scale: lists of images (text, CSV, Parquet, URLs), DEST/listing.parquet
reused by reruns, and torchrun ranks packing one job (real processes, gloo on the CPU)."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import random
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PHOTOS, folder_with_a_non_utf8_name, free_port, run_cli, torchrun


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def samples(folder: Path) -> list[tuple[dict, bytes]]:
    """Each packed sample's metadata and image bytes, in shard order."""
    found = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                found.append((meta, members[f"{meta['key']}.{meta['field']}"]))
    return found


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def listed(folder: Path) -> list[str]:
    """The entries a pack planned from, as recorded in its listing.parquet."""
    table = pq.read_table(folder / "listing.parquet")
    return [
        r.decode() for r, p in zip(table["relpath"].to_pylist(), table["problem"].to_pylist(), strict=True) if p is None
    ]


@pytest.fixture(scope="module")
def folder_pack(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "from-folder"
    run_cli("pack", sample_dir, out, "--shard-size", "4", "--workers", "1", "--no-progress")
    return out


def test_a_text_list_with_root_packs_the_same_bytes_as_the_folder(sample_dir, folder_pack, tmp_path):
    names = listed(folder_pack)
    assert len(names) == manifest(folder_pack)["totals"]["image_files"] > 10
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    # blank lines, CRLF endings, a './' prefix, an absolute path under the root and a repeat
    lines = ["", *[f"./{n}" if i % 3 == 0 else n for i, n in enumerate(shuffled)], "  ", names[2]]
    lines[5] = f"{sample_dir}/{lines[5].removeprefix('./')}"
    listing = tmp_path / "images.txt"
    listing.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    out = tmp_path / "from-list"
    proc = run_cli("pack", listing, out, "--root", sample_dir, "--shard-size", "4", "--workers", "2", "--no-progress")
    assert "1 duplicate entries packed once" in proc.stdout
    assert shard_bytes(out) == shard_bytes(folder_pack)  # the same sorted entries → the same shards
    got, want = manifest(out), manifest(folder_pack)
    assert got["skipped"] == want["skipped"] and got["totals"]["samples"] == want["totals"]["samples"]
    assert got["list"] == {
        "root": str(sample_dir),
        "blank_lines": 2,
        "duplicate_entries": 1,
        "duplicate_examples": [names[2]],
    }


def test_csv_and_parquet_lists_with_and_without_sizes(sample_dir, folder_pack, tmp_path):
    names = listed(folder_pack)
    csv = tmp_path / "images.csv"
    rows = [f'"{sample_dir}/{n}",{(sample_dir / n).stat().st_size},x' for n in reversed(names)]
    csv.write_text("path,size,label\n" + "\n".join(rows) + "\n")
    parquet = tmp_path / "images.parquet"
    pq.write_table(pa.table({"url": names, "other": list(range(len(names)))}), parquet)
    gz = tmp_path / "images.txt.gz"
    gz.write_bytes(gzip.compress("".join(f"{n}\n" for n in names).encode()))
    a, b, z = tmp_path / "csv", tmp_path / "parquet", tmp_path / "gz"
    run_cli("pack", csv, a, "--root", sample_dir, "--shard-size", "4", "--no-progress")
    run_cli("pack", parquet, b, "--root", sample_dir, "--path-column", "url", "--shard-size", "4", "--no-progress")
    run_cli("pack", gz, z, "--root", sample_dir, "--shard-size", "4", "--no-progress")
    assert shard_bytes(a) == shard_bytes(b) == shard_bytes(z) == shard_bytes(folder_pack)
    # without --root an absolute path is recorded whole
    c = tmp_path / "absolute"
    run_cli("pack", csv, c, "--shard-size", "4", "--no-progress")
    assert all(n.startswith(f"{sample_dir}/") for n in listed(c))
    assert manifest(c)["totals"]["samples"] == manifest(folder_pack)["totals"]["samples"]


def test_listed_files_that_are_not_there_are_recorded_and_the_run_goes_on(sample_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(PHOTOS[i])
    (src / "sub").mkdir()
    text = tmp_path / "list.txt"
    text.write_text("0.jpg\ngone.jpg\n1.jpg\nsub\n2.jpg\n")
    out = tmp_path / "out"
    run_cli("pack", text, out, "--root", src, "--no-progress")
    m = manifest(out)
    assert m["totals"]["samples"] == 3 and m["totals"]["image_files"] == 5
    assert {s["path"]: s["reason"] for s in m["skipped"]} == {
        f"{src}/gone.jpg": "not found",
        f"{src}/sub": "a folder, not a file",
    }
    first = (out / "manifest.json").read_bytes()
    run_cli("pack", text, out, "--root", src, "--no-progress")  # planned from listing.parquet
    assert (out / "manifest.json").read_bytes() == first
    # a size given in the list is trusted: the missing file is found when packing, and recorded too
    csv = tmp_path / "list.csv"
    csv.write_text("path,size\n0.jpg,10\nlost.jpg,10\n")
    out2 = tmp_path / "out2"
    run_cli("pack", csv, out2, "--root", src, "--no-progress")
    skipped = manifest(out2)["skipped"]
    assert len(skipped) == 1 and skipped[0]["path"] == f"{src}/lost.jpg" and "cannot read" in skipped[0]["reason"]


def test_a_list_entry_that_is_not_utf8_is_packed_losslessly(tmp_path):
    src = folder_with_a_non_utf8_name(tmp_path / "src")
    text = tmp_path / "list.txt"
    text.write_bytes(os.fsencode(src) + b"/caf\xe9.jpg\n" + os.fsencode(src) + b"/plain.jpg\n")
    csv = tmp_path / "list.csv"
    csv.write_bytes(b"path\ncaf\xe9.jpg\nplain.jpg\n")
    for listing in (text, csv):
        out = tmp_path / f"out-{listing.suffix}"
        run_cli("pack", listing, out, "--root", src, "--no-progress")
        assert sorted(m["relpath"] for m, _ in samples(out)) == ["caf\udce9.jpg", "plain.jpg"]


@pytest.mark.parametrize(
    "case",
    [
        "no_column",
        "size_column_named_but_absent",
        "relative_without_root",
        "unknown_scheme",
        "mixed_filesystems",
        "empty",
        "nothing_readable",
        "image_as_list",
        "root_with_folder",
        "escapes_root",
        "not_parquet",
    ],
)
def test_a_bad_list_is_one_line_and_writes_nothing(sample_dir, tmp_path, case):
    root: list[str] = ["--root", str(sample_dir)]
    extra: list[str] = []
    src = tmp_path / "list.txt"
    if case == "no_column":
        src = tmp_path / "list.csv"
        src.write_text("file,size\na.jpg,1\n")
        expect = "no column 'path' (its columns: file, size)"
    elif case == "size_column_named_but_absent":
        src = tmp_path / "list.csv"
        src.write_text("path\na.jpg\n")
        extra, expect = ["--size-column", "bytes"], "no column 'bytes'"
    elif case == "relative_without_root":
        src.write_text(f"{sample_dir}/valid/a.jpg\nvalid/b.jpg\n")
        root, expect = [], "line 2: 'valid/b.jpg' is a relative path; pass --root"
    elif case == "unknown_scheme":
        src.write_text("valid/a.jpg\nnosuch://bucket/a.jpg\n")
        expect = "line 2: 'nosuch://bucket/a.jpg' has a scheme fsspec does not know"
    elif case == "mixed_filesystems":
        src.write_text(f"{sample_dir}/x.jpg\nmemory://bucket/a.jpg\n")
        root, expect = [], "mixes filesystems"
    elif case == "empty":
        src.write_text("\n\n  \n")
        expect = "has no entries"
    elif case == "nothing_readable":
        src.write_text("nope/1.jpg\nnope/2.jpg\n")
        expect = "none of the 2 entries"
    elif case == "image_as_list":
        src = tmp_path / "photo.jpg"
        src.write_bytes(PHOTOS[0])
        expect = "is an image file"
    elif case == "root_with_folder":
        src = sample_dir
        expect = "--root is for a list"
    elif case == "escapes_root":
        src.write_text("../outside.jpg\n")
        expect = "is not a file under --root"
    else:
        src = tmp_path / "list.parquet"
        src.write_text("not parquet at all")
        expect = "not a readable Parquet file"
    dest = tmp_path / "dest"
    proc = run_cli("pack", src, dest, *root, *extra, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and expect in lines[0], proc.stderr
    assert not dest.exists()


def test_urls_over_http_with_sizes_looked_up(sample_dir, folder_pack, tmp_path):
    handler = functools.partial(QuietHandler, directory=str(sample_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        names = listed(folder_pack)
        text = tmp_path / "urls.txt"
        text.write_text("\n".join([f"{base}/{n}" for n in names] + [f"{base}/valid/missing.jpg"]) + "\n")
        out = tmp_path / "out"
        run_cli("pack", text, out, "--root", base, "--shard-size", "4", "--no-progress")
    finally:
        server.shutdown()
    # relative to --root, the same entries in the same shards; only the recorded paths start elsewhere
    got, want = samples(out), samples(folder_pack)
    assert [(m["relpath"], m["key"], data) for m, data in got] == [(m["relpath"], m["key"], data) for m, data in want]
    assert all(m["path"] == f"{base}/{m['relpath']}" for m, _ in got)
    missing = [s for s in manifest(out)["skipped"] if s["path"].endswith("missing.jpg")]
    assert missing == [{"path": f"{base}/valid/missing.jpg", "reason": "not found"}]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_reruns_plan_from_listing_parquet_until_asked_to_list_again(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"b{i}.jpg").write_bytes(PHOTOS[i])
    out = tmp_path / "out"
    planned = run_cli("pack", src, out, "--shard-size", "1", "--plan-only")
    assert "planned 3 shards from 3 files" in planned.stdout and not list(out.glob("shard-*"))
    assert [p.name for p in out.iterdir()] == ["listing.parquet"]
    run_cli("pack", src, out, "--shard-size", "1", "--no-progress")
    listing = (out / "listing.parquet").read_bytes()
    (src / "c.jpg").write_bytes(PHOTOS[3])  # sorts last
    rerun = run_cli("pack", src, out, "--shard-size", "1", "--no-progress")
    assert "planned from" in rerun.stderr and "--relist" in rerun.stderr
    assert manifest(out)["totals"]["samples"] == 3 and (out / "listing.parquet").read_bytes() == listing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    run_cli("pack", src, out, "--shard-size", "1", "--relist", "--no-progress")
    assert manifest(out)["totals"]["samples"] == 4 and len(before) == 3
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())  # only the new shard was packed
    # a file that sorts first, and one gone: a new shard after the last, the gone one recorded
    (src / "a.jpg").write_bytes(PHOTOS[4])
    (src / "b1.jpg").unlink()
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    run_cli("pack", src, out, "--shard-size", "1", "--relist", "--no-progress")
    m = manifest(out)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}.items() >= before.items()
    assert [s["generation"] for s in m["shards"]] == [0, 0, 0, 1, 2] and m["generation"] == 2
    assert m["removed"] == [{"path": f"{src}/b1.jpg", "generation": 0, "removed_in": 2}]
    assert m["totals"]["samples"] == 5 and m["totals"]["removed"] == 1
    with tarfile.open(out / "shard-000004.tar") as t:
        assert json.loads(t.extractfile(t.getmembers()[1]).read())["relpath"] == "a.jpg"
    # a relist that finds nothing new changes nothing
    listing = (out / "listing.parquet").read_bytes()
    run_cli("pack", src, out, "--shard-size", "1", "--relist", "--no-progress")
    assert (out / "listing.parquet").read_bytes() == listing and manifest(out)["generation"] == 2
    # another source into the same DEST is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.jpg").write_bytes(PHOTOS[0])
    proc = run_cli("pack", other, out, "--shard-size", "1", check=False)
    assert proc.returncode == 1 and f"was packed from {src}" in proc.stderr


def test_a_changed_list_is_refused_until_relisted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(PHOTOS[i])
    text = tmp_path / "list.txt"
    text.write_text("0.jpg\n1.jpg\n")
    out = tmp_path / "out"
    run_cli("pack", text, out, "--root", src, "--shard-size", "1", "--no-progress")
    text.write_text("0.jpg\n1.jpg\n2.jpg\n")
    proc = run_cli("pack", text, out, "--root", src, "--shard-size", "1", check=False)
    assert proc.returncode == 1 and "changed since" in proc.stderr and "--relist" in proc.stderr
    run_cli("pack", text, out, "--root", src, "--shard-size", "1", "--relist", "--no-progress")
    assert manifest(out)["totals"]["samples"] == 3


# ---- torchrun ----------------------------------------------------------------------------------


def pack_args(src: Path, out: Path, *more: str) -> list[str]:
    return ["-m", "pipeline", "pack", str(src), str(out), "--shard-size", "3", "--workers", "1", "--no-progress", *more]


def test_two_ranks_pack_the_same_bytes_as_one_process(sample_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("pack", sample_dir, one, "--shard-size", "3", "--workers", "1", "--no-progress")
    proc = torchrun("--standalone", "--nproc-per-node", "2", *pack_args(sample_dir, two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_bytes(two) == shard_bytes(one) and len(shard_bytes(one)) > 4
    for name in ("manifest.json", "listing.parquet"):
        assert (two / name).read_bytes() == (one / name).read_bytes().replace(str(one).encode(), str(two).encode())
    # rank 0 speaks for the job, once; each rank's share is in its closing lines
    assert proc.stdout.count("packed ") == 1 and "rank 0:" in proc.stdout and "rank 1:" in proc.stdout


def test_killing_one_rank_then_rerunning_redoes_only_unfinished_shards(sample_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("pack", sample_dir, one, "--shard-size", "3", "--workers", "1", "--no-progress")
    crash = {"FEATPIPE_TEST_CRASH": "after-shard", "FEATPIPE_TEST_CRASH_RANK": "1"}
    proc = torchrun("--standalone", "--nproc-per-node", "2", *pack_args(sample_dir, two), env=crash)
    assert proc.returncode != 0 and not (two / "manifest.json").exists()
    committed = {p.stem: (two / f"{p.stem}.tar").stat().st_mtime_ns for p in (two / "_commits").glob("*.json")}
    assert 1 <= len(committed) < len(shard_bytes(one))
    rerun = torchrun("--standalone", "--nproc-per-node", "2", *pack_args(sample_dir, two))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(committed)} shards already done" in rerun.stdout
    assert all((two / f"{n}.tar").stat().st_mtime_ns == t for n, t in committed.items())
    assert shard_bytes(two) == shard_bytes(one)
    assert not [p for p in two.rglob(".tmp-*")]


def test_a_bad_list_under_torchrun_is_one_line_from_every_rank(tmp_path):
    text = tmp_path / "list.txt"
    text.write_text("relative.jpg\n")
    out = tmp_path / "out"
    proc = torchrun("--standalone", "--nproc-per-node", "2", *pack_args(text, out), timeout=120)
    assert proc.returncode != 0 and not out.exists()
    assert proc.stderr.count("is a relative path; pass --root") == 2, proc.stderr[-3000:]
    assert "/pipeline/" not in proc.stderr  # the launcher's own report follows, but no frame of ours


def test_a_list_in_a_bucket_of_objects_in_a_bucket(sample_dir, folder_pack, tmp_path, s3, s3_server):
    fs, bucket = s3
    names = listed(folder_pack)
    for n in names:
        fs.pipe(f"{bucket}/in/{n}", (sample_dir / n).read_bytes())
    lines = [*names, "valid/not-uploaded.jpg"]
    fs.pipe(f"{bucket}/lists/images.txt", ("\n".join(lines) + "\n").encode())
    out = tmp_path / "out"
    args = ["pack", f"s3://{bucket}/lists/images.txt", out, "--root", f"s3://{bucket}/in", "--shard-size", "4"]
    run_cli(*args, "--workers", "2", "--no-progress", env=s3_server)
    got, want = samples(out), samples(folder_pack)
    assert [(m["relpath"], data) for m, data in got] == [(m["relpath"], data) for m, data in want]
    assert {"path": f"s3://{bucket}/in/valid/not-uploaded.jpg", "reason": "not found"} in manifest(out)["skipped"]
    # an S3 Inventory's Parquet shape: bucket, key (relative to the bucket), size
    keys = [f"in/{n}" for n in names]
    sizes = [(sample_dir / n).stat().st_size for n in names]
    inventory = tmp_path / "inventory.parquet"
    pq.write_table(pa.table({"bucket": [bucket] * len(keys), "key": keys, "size": sizes}), inventory)
    out2 = tmp_path / "out2"
    args = ["pack", inventory, out2, "--root", f"s3://{bucket}", "--path-column", "key", "--shard-size", "4"]
    run_cli(*args, "--no-progress", env=s3_server)
    assert [data for _, data in samples(out2)] == [data for _, data in want]
    assert all(m["relpath"] == f"in/{w['relpath']}" for (m, _), (w, _) in zip(samples(out2), want, strict=True))
