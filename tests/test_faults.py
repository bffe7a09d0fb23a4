"""Hostile input and faults (issue: nothing lost, nothing stuck): every sample ends as a row or an
error record, a passing failure is retried by the next run, damage is one line, never a traceback.
Real processes, real files, real tars."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, ROOT, folder_with_a_non_utf8_name, run_cli

from pipeline.shardformat import ustar_header, write_tar

MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "tiny_cnn", "--no-progress"]


def tar_bytes(members: list[tuple[str | bytes, bytes]]) -> bytes:
    """A ustar archive; a bytes name is written as it is (not UTF-8, as some tools do)."""
    buf = io.BytesIO()
    write_tar(buf, [(n if isinstance(n, str) else "X" * len(n), d) for n, d in members])
    raw = bytearray(buf.getvalue())
    offset = 0
    for name, data in members:
        if isinstance(name, bytes):
            header = bytearray(ustar_header("X" * len(name), len(data)))
            header[: len(name)] = name
            header[148:156] = b"        "
            header[148:156] = b"%06o\x00 " % sum(header)
            raw[offset : offset + 512] = header
        offset += 512 + len(data) + (-len(data) % 512)
    return bytes(raw)


def outcome(out: Path) -> tuple[list[str], list[dict]]:
    return json.loads((out / "img_list.json").read_text()), [
        json.loads(ln) for ln in (out / "errors.jsonl").read_text().splitlines()
    ]


def test_odd_metadata_and_duplicate_keys_never_lose_a_sample(tmp_path):
    """Items 1, 4 and 6: JSON that is not an object, fields of the wrong type, a lone surrogate, a
    member name that is not UTF-8, a key seen twice; each sample ends as a row or a recorded error."""
    members = [
        ("a.jpg", PHOTOS[0]),
        ("a.json", b"[1, 2]"),
        ("b.jpg", PHOTOS[1]),
        ("b.json", b"null"),
        ("c.jpg", PHOTOS[2]),
        ("c.json", b'{"field": ["x"], "path": "/p/c.jpg"}'),
        ("d.jpg", PHOTOS[3]),
        ("d.json", b'{"path": 123}'),
        ("e.jpg", PHOTOS[4]),
        ("e.json", b'{"path": "/p/\\ud800.jpg"}'),
        (b"f\xff.jpg", PHOTOS[5]),
        ("a.jpg", PHOTOS[6]),  # `a` again, not adjacent to the first
    ]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "odd.tar").write_bytes(tar_bytes(members))
    out = tmp_path / "out"
    proc = run_cli("extract", shards, out, *MODEL, "--workers", "0", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    paths, errors = outcome(out)
    reasons = [(e["key"], e["index"], e["reason"]) for e in errors]
    assert len(paths) + len(errors) == 7  # every sample accounted for
    assert reasons == [
        ("a", 0, "metadata (.json) is a JSON list, not an object"),
        ("b", 1, "metadata (.json) is a JSON NoneType, not an object"),
        ("a", 6, "duplicate key a: an earlier sample of this shard has it"),
    ]
    assert "/p/c.jpg" in paths and "/p/\\ud800.jpg" in paths  # the surrogate kept, escaped
    assert any(p.endswith("#d") for p in paths) and any(p.endswith("#f\\udcff") for p in paths)
    assert run_cli("verify", out).returncode == 0


def test_damaged_tar_keeps_every_complete_sample_before_the_damage(tmp_path):
    """Item 3: a tar cut inside its second sample's image keeps the first sample."""
    members = [
        ("s0.jpg", PHOTOS[0]),
        ("s0.json", b'{"path": "/p/s0.jpg"}'),
        ("s1.jpg", PHOTOS[1]),
        ("s1.json", b'{"path": "/p/s1.jpg"}'),
    ]
    raw = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        third = tf.getmembers()[2]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "cut.tar").write_bytes(raw[: third.offset_data + 100])
    out = tmp_path / "out"
    proc = run_cli("extract", shards, out, *MODEL, "--workers", "0", check=False)
    assert proc.returncode == 3, proc.stderr
    paths, errors = outcome(out)
    assert paths == ["/p/s0.jpg"]
    assert "after 1 samples" in errors[-1]["reason"] and "cut.tar" in errors[-1]["reason"]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("faults") / "images"
    for i, data in enumerate(PHOTOS[:6]):
        (src / f"{i}").mkdir(parents=True)
        (src / f"{i}" / f"img{i}.jpg").write_bytes(data)
    shards = src.parent / "shards"
    run_cli("pack", src, shards, "--shard-size", "2", "--no-progress")  # 3 shards
    return shards


@pytest.fixture(scope="module")
def clean(small_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "clean"
    run_cli("extract", small_shards, out, *MODEL, "--workers", "0")
    return out


def same(a: Path, b: Path) -> None:
    for name in ("fts.npy", "fts.pth", "img_list.json", "errors.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_missing_shard_is_retried_by_the_next_run(small_shards, clean, tmp_path):
    """Item 2: a shard missing for now is not recorded as finished; verify says so; a rerun reads it."""
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    shutil.move(shards / "shard-000001.tar", tmp_path / "away.tar")
    out = tmp_path / "out"
    proc = run_cli("extract", shards, out, *MODEL, "--workers", "0", check=False)
    assert proc.returncode == 3 and "1 shards failed" in proc.stdout, proc.stderr
    record = json.loads((out / "failed" / "shard-000001.json").read_text())
    assert str(shards / "shard-000001.tar") in record["failed"] and "FileNotFoundError" in record["failed"]
    assert not (out / "done" / "shard-000001.json").exists()
    verify = run_cli("verify", out, "--shards", shards, check=False)
    assert verify.returncode == 1 and "PROBLEM: shard-000001: could not be read" in verify.stderr
    shutil.move(tmp_path / "away.tar", shards / "shard-000001.tar")
    proc = run_cli("extract", shards, out, *MODEL, "--workers", "0", "-v")
    assert "1 of this rank's 3 shards to do" in proc.stderr
    assert not (out / "failed" / "shard-000001.json").exists()
    same(out, clean)
    assert run_cli("verify", out, "--shards", shards).returncode == 0


def test_a_damaged_chunk_is_named_then_redone(small_shards, clean, tmp_path):
    """Item 8: a truncated Parquet chunk is a PROBLEM in verify, one line in consolidate, redone by a rerun."""
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    chunk = out / "chunks" / "shard-000002.parquet"
    chunk.write_bytes(chunk.read_bytes()[:100])
    verify = run_cli("verify", out, check=False)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert f"PROBLEM: {chunk}: unreadable Parquet chunk" in verify.stderr
    cons = run_cli("consolidate", out, check=False)
    assert cons.returncode == 1 and cons.stderr.strip().splitlines()[-1].startswith("featpipe consolidate: error: ")
    assert "Traceback" not in cons.stderr
    proc = run_cli("extract", small_shards, out, *MODEL, "--workers", "0")
    assert "unreadable chunk" in proc.stderr
    same(out, clean)


def _pickle_bomb(path: Path) -> None:
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path}.ran",))

    torch.save({"x": Evil()}, path)


@pytest.mark.parametrize("damage", ["npy_header", "npy_truncated", "npy_object", "pth_pickle", "errors_jsonl"])
def test_verify_reports_damaged_outputs_as_problems(clean, tmp_path, damage):
    """Item 10."""
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    npy = out / "fts.npy"
    if damage == "npy_header":
        npy.write_bytes(b"\x93NUMPY\x01\x00garbage" + npy.read_bytes()[20:])
    elif damage == "npy_truncated":
        npy.write_bytes(npy.read_bytes()[:-50])
    elif damage == "npy_object":
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif damage == "pth_pickle":
        _pickle_bomb(out / "fts.pth")
    elif damage == "errors_jsonl":
        (out / "errors.jsonl").write_text('{"shard": "x", "key": null, "path": null, "index": null, "reason": "?"}\n')
    proc = run_cli("verify", out, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    name = "fts.pth" if damage == "pth_pickle" else "errors.jsonl" if damage == "errors_jsonl" else "fts.npy"
    assert f"PROBLEM: {name}" in proc.stderr
    assert not (out / "fts.pth.ran").exists()


@pytest.fixture()
def tiny_fs(tmp_path):
    """A real 64 KB filesystem (tmpfs), as root; skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_and_read_only_out_are_one_line(small_shards, tiny_fs, tmp_path):
    """Items 5 and 9: consolidate meets a full disk (it used to die of SIGBUS) or a read-only OUT."""
    big = tmp_path / "big"
    run_cli(
        "extract",
        small_shards,
        big,
        "--model-repo",
        str(ROOT / "pipeline" / "hub"),
        "--model-name",
        "vit_small_p14",
        "--workers",
        "0",
        "--no-progress",
        "--no-consolidate",
    )  # 384-dim: bigger outputs
    out = tiny_fs / "out"
    shutil.copytree(big, out)
    (out / ".tmp-left-by-a-killed-run-fts.npy").write_bytes(b"x" * 1000)
    free = shutil.disk_usage(tiny_fs).free
    (tiny_fs / "filler").write_bytes(b"\0" * (free - 4096))  # 4 KB left: fts.npy (6 × 384 float16) does not fit
    assert shutil.disk_usage(tiny_fs).free <= 4096 < 6 * 384 * 2
    proc = run_cli("consolidate", out, check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("featpipe consolidate: error: ") and "space" in last and "Traceback" not in proc.stderr
    assert not list(out.glob(".tmp-*")) and not (out / "fts.npy").exists()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    proc = run_cli("consolidate", out, check=False)
    assert proc.returncode == 1 and "Read-only file system" in proc.stderr and "Traceback" not in proc.stderr


def test_pack_workers_die_with_their_parent(tmp_path):
    """Item 11: SIGKILL of `featpipe pack` leaves no worker behind."""
    src = tmp_path / "src"
    for i in range(400):
        (src / f"{i % 20}").mkdir(parents=True, exist_ok=True)
        (src / f"{i % 20}" / f"{i}.jpg").write_bytes(PHOTOS[i % 7])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "pack",
            str(src),
            str(tmp_path / "dest"),
            "--workers",
            "2",
            "--shard-size",
            "2",
            "--check",
            "decode",
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: set[int] = set()
    deadline = time.time() + 60
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = {p for p in _children(proc.pid) if _cmdline(p).find("multiprocessing") >= 0}
        time.sleep(0.2)
    assert len(workers) >= 2, "pack never started its workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)]


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids |= {int(c) for c in f.read().split()}
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_absurd_sizes_are_refused_and_the_pixel_bound_holds(small_shards, tmp_path):
    """Item 12."""
    proc = run_cli("extract", small_shards, tmp_path / "o1", *MODEL, "--resize-size", "100000", check=False)
    assert proc.returncode == 1 and "between 1 and 4096" in proc.stderr and not (tmp_path / "o1").exists()
    out = tmp_path / "o2"
    proc = run_cli("extract", small_shards, out, *MODEL, "--workers", "0", "--max-pixels", "300000", check=False)
    assert proc.returncode == 3
    _, errors = outcome(out)
    big = [e for e in errors if "over the limit of 300000" in e["reason"]]
    assert len(big) == 4  # 640x480 up to 1600x1200 are over 300,000 pixels; 500x375 and 375x500 are not


def test_pack_keeps_a_file_name_that_is_not_utf8(tmp_path):
    """Item 7: the name is packed, kept losslessly (escaped) in the JSON, and extracted."""
    src = folder_with_a_non_utf8_name(tmp_path / "src")
    shards = tmp_path / "shards"
    run_cli("pack", src, shards, "--no-progress")
    with tarfile.open(shards / "shard-000000.tar") as tf:
        metas = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    assert sorted(m["relpath"] for m in metas) == ["caf\udce9.jpg", "plain.jpg"]  # round-trips to the bytes
    out = tmp_path / "out"
    run_cli("extract", shards, out, *MODEL, "--workers", "0")
    paths, errors = outcome(out)
    assert len(paths) == 2 and not errors and any(p.endswith("caf\\udce9.jpg") for p in paths)


def test_dest_inside_src_counts_the_same_on_every_rerun(tmp_path):
    """Item 13 (second part)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(PHOTOS[i])
    (src / "notes.txt").write_text("x")
    for _ in range(2):
        run_cli("pack", src, src / "shards", "--shard-size", "2", "--no-progress")
        manifest = json.loads((src / "shards" / "manifest.json").read_text())
        assert manifest["totals"]["ignored_non_images"] == 1 and manifest["totals"]["samples"] == 3


def test_a_bucket_that_does_not_exist_is_an_error_unless_asked(tmp_path, s3, s3_server):
    """Item 13 (first part)."""
    fs, _ = s3
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(PHOTOS[0])
    proc = run_cli("pack", src, "s3://no-such-bucket-x/shards", env=s3_server, check=False)
    assert proc.returncode == 1 and "bucket 'no-such-bucket-x' does not exist" in proc.stderr
    assert not fs.exists("no-such-bucket-x")
    run_cli("pack", src, "s3://no-such-bucket-x/shards", "--create-bucket", env=s3_server)
    assert fs.exists("no-such-bucket-x/shards/manifest.json")


def test_an_unreachable_endpoint_is_one_line(tmp_path):
    """Item 9: an object store that does not answer."""
    env = {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
    }
    proc = run_cli("extract", "s3://b/shards", tmp_path / "out", *MODEL, env=env, check=False, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("featpipe extract: error: ")
    assert not (tmp_path / "out").exists()
