"""torchrun, crashes and damaged shards: real processes, real launches (gloo on the CPU)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_cli, torchrun

MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "tiny_cnn"]
OUTPUTS = ("fts.npy", "fts.pth", "img_list.json", "errors.jsonl")


@pytest.fixture(scope="module")
def shards(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "shards"
    run_cli("pack", sample_dir, out, "--shard-size", "5", "--no-progress")  # 7 shards
    return out


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "single"
    proc = run_cli("extract", shards, out, *MODEL, "--workers", "1", check=False)
    assert proc.returncode == 3, proc.stderr
    return out


def same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def extract_args(shards, out, *more) -> list[str]:
    return ["-m", "pipeline", "extract", str(shards), str(out), *MODEL, "--no-progress", *more]


def test_standalone_two_ranks_match_one_process(shards, single, tmp_path):
    out = tmp_path / "out"
    proc = torchrun("--standalone", "--nproc-per-node", "2", *extract_args(shards, out, "--workers", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stderr
    same_outputs(out, single)
    assert run_cli("verify", out, "--shards", shards).returncode == 0


def test_two_nodes_c10d_rendezvous_on_loopback(shards, single, tmp_path):
    out = tmp_path / "out"
    port = free_port()
    common = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "featpipe-test",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *common, *extract_args(shards, out, "--workers", "1")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [r[1][-2000:] for r in results]
    same_outputs(out, single)


@pytest.mark.parametrize("ranks,workers,pack_size", [(3, 1, 15), (2, 2, 12)])
def test_uneven_work(sample_dir, tmp_path, ranks, workers, pack_size):
    """More ranks than shards (a rank with nothing to do), and 3 shards over 2 ranks × 2 workers."""
    shards = tmp_path / "shards"
    run_cli("pack", sample_dir, shards, "--shard-size", str(pack_size), "--no-progress")
    n_shards = len(list(shards.glob("shard-*.tar")))
    assert n_shards == {15: 3, 12: 3}[pack_size]
    ref = tmp_path / "ref"
    run_cli("extract", shards, ref, *MODEL, "--workers", "0", check=False)
    out = tmp_path / "out"
    proc = torchrun(
        "--standalone", "--nproc-per-node", str(ranks), *extract_args(shards, out, "--workers", str(workers))
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_outputs(out, ref)


def test_max_restarts_redoes_only_unfinished_shards(shards, single, tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "crashed-once"
    env = {
        "FEATPIPE_TEST_CRASH": "after-chunk",
        "FEATPIPE_TEST_CRASH_RANK": "1",
        "FEATPIPE_TEST_CRASH_ONCE": str(marker),
    }
    proc = torchrun(
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        *extract_args(shards, out, "--workers", "1"),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the crash did happen
    assert "already finished" in proc.stderr and "(0 already finished)" in proc.stderr
    restarted = [ln for ln in proc.stderr.splitlines() if "already finished)" in ln and "(0 already" not in ln]
    assert restarted, proc.stderr[-3000:]  # after the restart, at least one rank skipped committed chunks
    same_outputs(out, single)


@pytest.mark.parametrize("point", ["start", "after-chunk", "consolidate"])
def test_kill_9_then_rerun(point, shards, single, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, *extract_args(shards, out, "--workers", "1")]
    if point == "start":
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not (out / "run.json").exists():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(list((out / "done").glob("shard-*.json"))) < 7
    else:
        proc = subprocess.run(cmd, capture_output=True, env={**os.environ, "FEATPIPE_TEST_CRASH": point})
        assert proc.returncode == -signal.SIGKILL
        if point == "consolidate":
            assert (out / "fts.npy").exists() and not (out / "fts.pth").exists()
        else:
            assert len(list((out / "done").glob("shard-*.json"))) == 1
    verify = run_cli("verify", out, check=False)
    assert verify.returncode == 1 and "PROBLEM" in verify.stderr
    rerun = run_cli("extract", shards, out, *MODEL, "--workers", "1", check=False)
    assert rerun.returncode == 3, rerun.stderr
    same_outputs(out, single)
    assert run_cli("verify", out, "--shards", shards).returncode == 0
    assert not [p for p in out.rglob(".tmp-*")]


def test_truncated_and_unopenable_shards_are_recorded(shards, single, tmp_path):
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    expected = {s["name"]: s["samples"] for s in manifest["shards"]}
    tar = damaged / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[: int(tar.stat().st_size * 0.6)])
    (damaged / "shard-000004.tar").unlink()
    out = tmp_path / "out"
    proc = run_cli("extract", damaged, out, *MODEL, "--workers", "2", "--retries", "1", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "2 shards failed" in proc.stdout
    done2 = json.loads((out / "done" / "shard-000002.json").read_text())
    assert 1 <= done2["rows"] < expected["shard-000002.tar"] and "after" in done2["failed"]
    done4 = json.loads((out / "failed" / "shard-000004.json").read_text())  # missing now: the next run retries it
    assert done4["rows"] == 0 and "FileNotFoundError" in done4["failed"] and done4["retry"]
    assert str(damaged / "shard-000004.tar") in done4["failed"]
    assert not (out / "chunks" / "shard-000004.parquet").exists()
    errors = [json.loads(ln) for ln in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["shard"] for e in errors if e["reason"].startswith("shard failed")} == {"shard-000002", "shard-000004"}
    # every sample before the damage is kept, in order, and nothing else is lost
    rows = {
        n: json.loads((single / "done" / f"{n}.json").read_text())["rows"] for n in ("shard-000002", "shard-000004")
    }
    full = json.loads((single / "img_list.json").read_text())
    kept = json.loads((out / "img_list.json").read_text())
    assert len(kept) == len(full) - (rows["shard-000002"] - done2["rows"]) - rows["shard-000004"]
    assert kept == [p for p in full if p in set(kept)]
    verify = run_cli("verify", out, "--shards", damaged, check=False)
    assert verify.returncode == 1 and "2 shards recorded as failed" in verify.stdout
    assert (
        "PROBLEM: shard-000002: damaged" in verify.stderr
        and "PROBLEM: shard-000004: could not be read" in verify.stderr
    )


class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, answering 503 to the first GET of each file, and always to *.always-503."""

    failed: set = set()
    lock = threading.Lock()

    def do_GET(self):
        with self.lock:
            first = self.path not in self.failed
            self.failed.add(self.path)
        if (first and self.path.endswith(".tar")) or "always" in self.path:
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


def test_transient_http_errors_are_retried(shards, single, tmp_path):
    served = tmp_path / "www"
    shutil.copytree(shards, served)
    os.rename(served / "shard-000006.tar", served / "shard-000006.always")
    handler = lambda *a, **kw: _FlakyHandler(*a, directory=str(served), **kw)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing = tmp_path / "shards.txt"
    names = sorted(p.name for p in shards.glob("shard-*.tar"))
    listing.write_text("".join(f"{base}/{n}\n" for n in names[:-1]) + f"{base}/shard-000006.always\n")
    try:
        out = tmp_path / "out"
        proc = run_cli("extract", listing, out, *MODEL, "--workers", "2", "--retries", "2", check=False)
    finally:
        server.shutdown()
    assert proc.returncode == 3, proc.stderr
    assert "retry 1 of 2" in proc.stderr
    assert "1 shards failed" in proc.stdout
    rec = json.loads((out / "failed" / "shard-000006.always.json").read_text())  # the next run tries again
    assert rec["rows"] == 0 and "gave up after 2 retries" in rec["failed"] and rec["retry"]
    assert rec["failed"].startswith(f"{base}/shard-000006.always: ")
    single_rows = json.loads((single / "img_list.json").read_text())
    got = json.loads((out / "img_list.json").read_text())
    assert (
        got == single_rows[: len(got)]
        and len(got) == len(single_rows) - json.loads((single / "done" / "shard-000006.json").read_text())["rows"]
    )
