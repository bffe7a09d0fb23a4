"""`featpipe pack` through the CLI and the API, asserting on the shards it writes."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from conftest import BROKEN, VALID, run_cli

from pipeline.errors import UserError
from pipeline.pack.packer import PackConfig, run_pack


def read_shards(folder: Path) -> list[dict]:
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return list(ds)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every shard's bytes, and the manifest less the one field that names the folder itself."""
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["destination"]
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))} | {
        "manifest.json": json.dumps(manifest, sort_keys=True).encode()
    }


def test_round_trip_every_valid_image_once_bytes_untouched(sample_dir, tmp_path):
    out = tmp_path / "shards"
    proc = run_cli("pack", sample_dir, out, "--shard-size", "8", "--workers", "2")
    # the truncated JPEG has a sound header: pack keeps it, the extractor records its decode failure
    packed = set(VALID) | {"broken/truncated.jpg"}
    assert f"packed {len(packed)} images" in proc.stdout
    samples = read_shards(out)
    assert len(samples) == len(packed)
    seen = {}
    for s in samples:
        meta = json.loads(s["json"])
        img_fields = [k for k in s if k not in ("json", "__key__", "__url__", "__local_path__")]
        assert img_fields == [meta["field"]]
        assert "." not in s["__key__"] and len(s["__key__"]) == 13
        assert meta["path"] == f"{sample_dir}/{meta['relpath']}"
        assert Path(meta["path"]).read_bytes() == s[meta["field"]]
        assert meta["size"] == len(s[meta["field"]])
        seen[meta["relpath"]] = meta
    assert set(seen) == packed
    # the extension comes from the sniffed format, not the file name
    assert seen["names/actually_a_jpeg.png"]["field"] == "jpg"
    assert seen["names/UPPER.JPG"]["field"] == "jpg"
    assert seen["formats/photo.tiff"]["field"] == "tif"
    assert (seen["edge/panorama.jpg"]["width"], seen["edge/panorama.jpg"]["height"]) == (6000, 400)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == len(packed)
    assert manifest["totals"]["ignored_non_images"] == 3
    assert sum(s["samples"] for s in manifest["shards"]) == len(packed)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(manifest["shards"]))]
    for s in manifest["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"]
        assert s["samples"] <= 8
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    # header-only checks catch three of the four broken files; the truncated JPEG's header is fine,
    # so it is packed and left for the extractor to record when decoding fails.
    assert set(reasons) == {"zero_bytes.jpg", "text_named.jpg", "huge_header.png"}
    assert "60000x60000" in reasons["huge_header.png"] or "3600000000" in reasons["huge_header.png"]
    assert reasons["zero_bytes.jpg"] == "empty file"


def test_decode_check_catches_truncated_jpeg(sample_dir, tmp_path):
    result = run_pack(
        PackConfig(src=str(sample_dir / "broken"), dest=str(tmp_path / "s"), check="decode", progress=False)
    )
    assert result.manifest["totals"]["samples"] == 0
    reasons = {Path(s["path"]).name: s["reason"] for s in result.manifest["skipped"]}
    assert set(reasons) == {Path(p).name for p in BROKEN}
    assert "truncated" in reasons["truncated.jpg"].lower()


def test_deterministic_whatever_the_workers(sample_dir, tmp_path):
    run_cli("pack", sample_dir, tmp_path / "a", "--shard-size", "5", "--workers", "1")
    run_cli("pack", sample_dir, tmp_path / "b", "--shard-size", "5", "--workers", "3")
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 4
    for name in a:
        assert a[name] == b[name], name
    assert a["manifest.json"] == b["manifest.json"]
    # fixed header fields: no wall clock, owner or mode leaks into the archive
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) == (0, 0, 0, 0o444, "", "")


def test_shard_bytes_are_what_tarfile_writes(sample_dir, tmp_path):
    """The hand-written ustar headers against Python's tarfile, member by member."""
    run_cli("pack", sample_dir, tmp_path / "a", "--shard-size", "7")
    for shard in sorted((tmp_path / "a").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        ref = io.BytesIO()
        with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
                tar.addfile(info, io.BytesIO(data))
        assert shard.read_bytes() == ref.getvalue(), shard.name


def test_max_shard_bytes_starts_new_shards(sample_dir, tmp_path):
    result = run_pack(
        PackConfig(src=str(sample_dir), dest=str(tmp_path / "s"), max_shard_bytes=500_000, progress=False)
    )
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "s").glob("shard-*.tar")}
    assert len(sizes) == result.manifest["totals"]["shards"] > 3
    for rec in result.manifest["shards"]:
        # a shard only exceeds the limit when it holds a single file that is larger on its own
        assert rec["bytes"] <= 500_000 + 20_000 or rec["samples"] == 1


def test_resize_max_shrinks_and_records_original_size(sample_dir, tmp_path):
    run_cli("pack", sample_dir / "phone", tmp_path / "s", "--resize-max", "512", "--quality", "85")
    (sample,) = read_shards(tmp_path / "s")
    meta = json.loads(sample["json"])
    from PIL import Image

    im = Image.open(io.BytesIO(sample["jpg"]))
    assert max(im.size) == 512 and im.size == (512, 384)
    assert (meta["orig_width"], meta["orig_height"]) == (4000, 3000)
    assert (meta["width"], meta["height"]) == (512, 384)
    assert meta["size"] == (sample_dir / "phone" / "PXL_20240101_120000.jpg").stat().st_size
    assert meta["stored_size"] == len(sample["jpg"]) < meta["size"] / 10


def test_resume_after_kill_matches_clean_pack(sample_dir, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run_cli("pack", sample_dir, clean, "--shard-size", "3", "--workers", "1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "pack",
            str(sample_dir),
            str(killed),
            "--shard-size",
            "3",
            "--workers",
            "1",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not (killed / "_commits" / "shard-000000.json").exists():
        assert time.time() < deadline and proc.poll() is None, "pack finished before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    first = (killed / "shard-000000.tar").stat().st_mtime_ns
    rerun = run_cli("pack", sample_dir, killed, "--shard-size", "3", "--workers", "2")
    assert "already done" in rerun.stdout and " 0 shards already done" not in rerun.stdout
    assert (killed / "shard-000000.tar").stat().st_mtime_ns == first  # committed work was not redone
    assert tree_bytes(killed) == tree_bytes(clean)
    assert not [p for p in killed.iterdir() if p.name.startswith(".tmp-")]


def test_rerun_with_other_options_is_refused_unless_overwrite(sample_dir, tmp_path):
    out = tmp_path / "s"
    run_cli("pack", sample_dir, out, "--shard-size", "4")
    proc = run_cli("pack", sample_dir, out, "--shard-size", "6", check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    run_cli("pack", sample_dir, out, "--shard-size", "6", "--overwrite")
    assert json.loads((out / "manifest.json").read_text())["options"]["shard_size"] == 6
    assert all(r["samples"] <= 6 for r in json.loads((out / "manifest.json").read_text())["shards"])
    assert len(list(out.glob("shard-*.tar"))) == json.loads((out / "manifest.json").read_text())["totals"]["shards"]


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "file"])
def test_bad_source_is_one_line_and_writes_nothing(tmp_path, case):
    src = tmp_path / "src"
    if case in ("empty", "no_images"):
        src.mkdir()
    if case == "no_images":
        (src / "notes.txt").write_text("hello")
    if case == "file":
        src.write_text("x")
    dest = tmp_path / "dest"
    proc = run_cli("pack", src, dest, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0], proc.stderr
    assert not dest.exists()


def test_unwritable_dest_is_one_line(sample_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_cli("pack", sample_dir, blocker / "shards", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "cannot write" in proc.stderr


def test_bad_flag_exits_non_zero(sample_dir, tmp_path):
    proc = run_cli("pack", sample_dir, tmp_path / "d", "--max-shard-bytes", "lots", check=False)
    assert proc.returncode == 2 and "not a size" in proc.stderr
    assert not (tmp_path / "d").exists()
    with pytest.raises(UserError):
        run_pack(PackConfig(src=str(sample_dir), dest=str(tmp_path / "d"), shard_size=0))


def test_s3_to_s3_and_local_to_s3(sample_dir, tmp_path, s3, s3_server):
    fs, bucket = s3
    for rel, data in VALID.items():
        fs.pipe(f"{bucket}/in/{rel}", data)
    for rel, data in BROKEN.items():
        fs.pipe(f"{bucket}/in/{rel}", data)
    run_cli("pack", f"s3://{bucket}/in", f"s3://{bucket}/shards", "--shard-size", "8", "--workers", "2", env=s3_server)
    run_cli("pack", sample_dir, f"s3://{bucket}/from-local", "--shard-size", "8", env=s3_server)
    local = tmp_path / "local"
    run_cli("pack", sample_dir, local, "--shard-size", "8")
    for prefix in ("shards", "from-local"):
        names = sorted(p.rsplit("/", 1)[1] for p in fs.glob(f"{bucket}/{prefix}/shard-*.tar"))
        assert names == sorted(p.name for p in local.glob("shard-*.tar"))
        manifest = json.loads(fs.cat(f"{bucket}/{prefix}/manifest.json"))
        assert manifest["totals"]["samples"] == len(VALID) + 1  # + the truncated JPEG
        assert len(manifest["skipped"]) == 3
    # local → s3 holds exactly the local bytes; s3 → s3 differs only in the recorded source paths
    for name in sorted(p.name for p in local.glob("shard-*.tar")):
        assert fs.cat(f"{bucket}/from-local/{name}") == (local / name).read_bytes()
    paths = []
    with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{bucket}/shards/shard-000000.tar"))) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                paths.append(json.loads(tar.extractfile(m).read())["path"])
    assert paths and all(p.startswith(f"s3://{bucket}/in/") for p in paths)
    assert not fs.glob(f"{bucket}/shards/.featpipe-write-test-*")
