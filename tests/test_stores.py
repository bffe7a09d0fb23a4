"""Buckets at full speed (issue 18), against moto's S3 server on loopback behind the tests' own
fault proxy (tests/faultproxy.py): many reads in flight, the same bytes for any concurrency, LISTs
fanned out, retrieval verbs on features in a bucket, and a flaky store that loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, ROOT, free_port, run_cli
from faultproxy import FaultProxy, Faults

MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14", "--no-progress"]


def upload_photos(fs, prefix: str, n: int, folders: int = 1) -> None:
    fs.pipe({f"{prefix}/d{i % folders:02d}/img{i:03d}.jpg": PHOTOS[i % len(PHOTOS)] for i in range(n)})


def tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_pack_keeps_reads_in_flight_and_writes_the_same_shards(s3, s3_server, tmp_path):
    fs, bucket = s3
    upload_photos(fs, f"{bucket}/photos", 60)
    runs = {}
    for name, extra in (("one", ["--io-concurrency", "1"]), ("default", [])):
        with FaultProxy(s3_server["AWS_ENDPOINT_URL_S3"], Faults(latency_s=0.02)) as proxy:
            args = [f"s3://{bucket}/photos", tmp_path / name, "--shard-size", "25", "--workers", "1", "--no-progress"]
            run_cli("pack", *args, *extra, env=proxy.env(s3_server))
            runs[name] = proxy.counts.max_in_flight
    assert tars(tmp_path / "one") == tars(tmp_path / "default") and len(tars(tmp_path / "one")) == 3
    assert runs["one"] <= 2 < 8 <= runs["default"], runs  # one at a time fails this


def test_a_bucket_prefix_is_listed_with_lists_in_flight(s3, s3_server, tmp_path):
    from pipeline.listing import find_all

    fs, bucket = s3
    upload_photos(fs, f"{bucket}/photos", 48, folders=12)
    found = find_all(fs, f"{bucket}/photos")
    assert {k: v["size"] for k, v in found.items()} == {
        k: v["size"] for k, v in fs.find(f"{bucket}/photos", detail=True).items()
    }
    with FaultProxy(s3_server["AWS_ENDPOINT_URL_S3"], Faults(latency_s=0.05)) as proxy:
        run_cli("pack", f"s3://{bucket}/photos", tmp_path / "a", "--plan-only", env=proxy.env(s3_server))
        assert proxy.counts.max_lists_in_flight >= 4, proxy.counts
    run_cli("pack", f"s3://{bucket}/photos", tmp_path / "b", "--plan-only", env=s3_server)
    assert (tmp_path / "a" / "listing.parquet").read_bytes() == (tmp_path / "b" / "listing.parquet").read_bytes()


FLAKY = Faults(reset_every=9, slowdown_every=11, slowdown_burst=2)


def test_a_flaky_store_loses_nothing_in_pack_and_extract(s3, s3_server, tmp_path):
    fs, bucket = s3
    upload_photos(fs, f"{bucket}/photos", 20)
    run_cli("pack", f"s3://{bucket}/photos", tmp_path / "clean", "--shard-size", "10", "--no-progress", env=s3_server)
    run_cli("extract", f"s3://{bucket}/photos", tmp_path / "fclean", *MODEL, "--workers", "0", env=s3_server)
    run_cli("extract", tmp_path / "clean", tmp_path / "sclean", *MODEL, "--workers", "0", env=s3_server)
    with FaultProxy(s3_server["AWS_ENDPOINT_URL_S3"], FLAKY) as proxy:
        env = proxy.env(s3_server)
        shards = f"s3://{bucket}/shards"
        run_cli("pack", f"s3://{bucket}/photos", shards, "--shard-size", "10", "--no-progress", env=env)
        out = f"s3://{bucket}/features"
        run_cli("extract", f"s3://{bucket}/photos", out, *MODEL, "--workers", "1", "--group-size", "8", env=env)
        run_cli("extract", shards, f"s3://{bucket}/from-shards", *MODEL, "--workers", "1", env=env)
        assert proxy.counts.resets >= 3 and proxy.counts.slowdowns >= 3, proxy.counts
    fs.invalidate_cache()
    for name, data in tars(tmp_path / "clean").items():
        assert fs.cat_file(f"{bucket}/shards/{name}") == data, name
    for name in ("fts.npy", "img_list.json"):
        assert fs.cat_file(f"{bucket}/features/{name}") == (tmp_path / "fclean" / name).read_bytes(), name
        assert fs.cat_file(f"{bucket}/from-shards/{name}") == (tmp_path / "sclean" / name).read_bytes(), name


def test_matching_features_in_a_bucket_through_a_flaky_store(s3, s3_server, tmp_path):
    fs, bucket = s3
    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    fs.put_file(str(tmp_path / "x.npy"), f"{bucket}/x.npy")
    run_cli("match", tmp_path / "x.npy", tmp_path / "local", "-k", "5", "--memory-budget", "400KB", "--no-progress")
    cache = {"FEATPIPE_CACHE": str(tmp_path / "cache")}
    with FaultProxy(s3_server["AWS_ENDPOINT_URL_S3"], FLAKY) as proxy:
        args = [f"s3://{bucket}/x.npy", f"s3://{bucket}/m", "-k", "5", "--memory-budget", "400KB", "--no-progress"]
        run_cli("match", *args, env={**proxy.env(s3_server), **cache})
    fs.invalidate_cache()
    for name in ("matches.npy", "scores.npy"):
        assert fs.cat_file(f"{bucket}/m/{name}") == (tmp_path / "local" / name).read_bytes(), name


def test_reads_past_the_retries_are_recorded_and_writes_past_them_are_one_line(s3, s3_server, tmp_path):
    fs, bucket = s3
    upload_photos(fs, f"{bucket}/photos", 6)
    with FaultProxy(s3_server["AWS_ENDPOINT_URL_S3"], Faults(fail_paths=("img002.jpg",))) as proxy:
        env = {**proxy.env(s3_server), "AWS_MAX_ATTEMPTS": "2"}
        run_cli("pack", f"s3://{bucket}/photos", tmp_path / "p", "--no-progress", env=env, timeout=300)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 5
    (skipped,) = [s for shard in manifest["shards"] for s in shard.get("skipped", [])] or manifest["skipped"]
    assert skipped["path"].endswith("img002.jpg") and "cannot read" in skipped["reason"]
    with FaultProxy(s3_server["AWS_ENDPOINT_URL_S3"], Faults(fail_writes=True)) as proxy:
        env = {**proxy.env(s3_server), "AWS_MAX_ATTEMPTS": "2"}
        t = time.perf_counter()
        proc = run_cli("pack", tmp_path / "p", f"s3://{bucket}/out", "--no-progress", env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("featpipe pack: error: ")
    assert time.perf_counter() - t < 120 and not fs.exists(f"{bucket}/out/manifest.json")


@pytest.fixture(scope="module")
def strict_s3():
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    yield {
        "AWS_ACCESS_KEY_ID": "wrong",
        "AWS_SECRET_ACCESS_KEY": "wrong",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url,
        "FSSPEC_S3_ENDPOINT_URL": url,
    }
    proc.kill()


@pytest.mark.parametrize("verb", ["pack", "extract", "match"])
def test_bad_credentials_are_one_line_naming_the_bucket(verb, strict_s3, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((4, 3), np.float32))
    args = {
        "pack": ["s3://guarded/photos", tmp_path / "p"],
        "extract": ["s3://guarded/shards", tmp_path / "o", *MODEL],
        "match": [tmp_path / "x.npy", "s3://guarded/m", "-k", "2"],
    }[verb]
    proc = run_cli(verb, *args, env=strict_s3, check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"featpipe {verb}: error: ") and "guarded" in last, last


def test_the_retrieval_verbs_read_features_and_names_from_a_bucket(s3, s3_server, tmp_path):
    """match, dedup, index and show give the same bytes from features in a bucket as from a local
    copy; then, with FEATURES and an INDEX in the bucket (img2dataset's shards: captions), query,
    serve and show read their hits' keys, paths and captions by row from the bucket (rows/, the
    chunks, metadata.parquet), never from img_list.json (removed there)."""
    from test_interop import HOSTILE_CAPTION, img2dataset_folder
    from test_serve import Server

    fs, bucket = s3
    local = tmp_path / "features"
    run_cli("extract", img2dataset_folder(tmp_path / "i2d"), local, *MODEL, "--workers", "0")
    fs.put(str(local), f"{bucket}/features", recursive=True)
    fs.rm(f"{bucket}/features/img_list.json")  # the on-demand readers must not need it
    remote, index = f"s3://{bucket}/features", f"s3://{bucket}/index"
    env = {**s3_server, "FEATPIPE_CACHE": str(tmp_path / "cache")}
    for where, feats in (("l", local), ("r", remote)):
        run_cli("match", feats, tmp_path / f"m{where}", "-k", "3", "--no-progress", env=env)
        run_cli("dedup", feats, tmp_path / f"d{where}", "--threshold", "0.99", "-k", "3", "--no-progress", env=env)
        run_cli("show", tmp_path / f"d{where}", tmp_path / f"d{where}.html", env=env)
    for a, b in (("ml/matches.npy", "mr/matches.npy"), ("ml/neighbors.parquet", "mr/neighbors.parquet")):
        assert (tmp_path / a).read_bytes() == (tmp_path / b).read_bytes(), a
    assert (tmp_path / "dl/groups.json").read_bytes() == (tmp_path / "dr/groups.json").read_bytes()
    run_cli("index", remote, index, "--no-progress", env=env)
    assert fs.exists(f"{bucket}/index/rows")
    paths = [f"http://127.0.0.1:9/img/{i}.jpg" for i in range(6)]
    for target in (remote, index):
        for name in ("000010001", paths[4]):  # by key, by path
            out = run_cli("query", target, name, "-k", "2", "--json", env=env).stdout
            first = json.loads(out.splitlines()[0])
            got = (first["row"], first["key"], first["path"], first["caption"])
            assert got == (4, "000010001", paths[4], "a photo number 4"), (target, name)
    server = Server(index)
    try:
        status, body = server.post_json({"key": "000000000", "k": 2})
        assert status == 200
        assert {h["row"]: (h["path"], h["caption"]) for h in body["hits"]} == {
            0: (paths[0], HOSTILE_CAPTION),
            5: (paths[5], "a photo number 5"),  # sample 5 repeats sample 0's image
        }
        status, thumb = server.request("/api/thumb/5")
        assert status == 200 and thumb[:2] == b"\xff\xd8"  # read from the shard named by row 5's place
    finally:
        server.stop()
    page = (tmp_path / "dr.html").read_text()  # show of the bucket's dedup: thumbnails and captions by row
    assert page.count("data:image/jpeg") >= 2 and paths[5] in page and "a photo number 5" in page
    assert "&lt;b onmouseover=&quot;x()&quot;&gt;bold&lt;/b&gt;" in page and "<b onmouseover" not in page
