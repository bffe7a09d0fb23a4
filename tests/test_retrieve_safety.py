"""Retrieval outputs people act on (issue 22): to_remove files that name only members, nothing
stale reused, ties settled the same way whatever the threads and tiles, identical images at
threshold 1.0, inputs that survive colliding names, URL queries that fail in time and say why,
and one line instead of a traceback. Each case runs the real CLI (or the API) on small data."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, ROOT, run_cli

from pipeline import api

MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14", "--no-progress"]
NO_MATCH = 2**32 - 1


def one_line_error(proc, verb: str, expect: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"featpipe {verb}: error: ") and expect in last, last
    return last


# --- a folder of photos under hostile names, extracted with the offline ViT -----------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """0.jpg (the original), a byte copy under `a⏎<victim folder>/photo.jpg` (whose second line
    would name the victim), a copy under a non-UTF-8 name, and two other photos."""
    base = tmp_path_factory.mktemp("hostile")
    victim = base / "victim"
    victim.mkdir()
    (victim / "photo.jpg").write_bytes(b"keep me")
    src = base / "src"
    src.mkdir()
    (src / "0.jpg").write_bytes(PHOTOS[0])
    trap = os.path.join(str(src), "a\n" + str(victim).lstrip("/"))
    os.makedirs(trap)
    with open(os.path.join(trap, "photo.jpg"), "wb") as f:
        f.write(PHOTOS[0])
    with open(os.path.join(os.fsencode(src), b"caf\xe9.jpg"), "wb") as f:
        f.write(PHOTOS[0])
    (src / "other1.jpg").write_bytes(PHOTOS[1])
    (src / "other2.jpg").write_bytes(PHOTOS[2])
    run_cli("extract", src, base / "feats", *MODEL, "--workers", "0", "--batch-size", "8")
    return {"base": base, "src": src, "victim": victim / "photo.jpg", "feats": base / "feats"}


def test_to_remove_names_only_members_and_threshold_one_groups_identical_images(hostile, tmp_path):
    out = tmp_path / "d"
    proc = run_cli("dedup", hostile["feats"], out, "--threshold", "1.0", "-k", "4", "--no-progress")
    paths = json.loads((hostile["feats"] / "img_list.json").read_text())
    groups = json.loads((out / "groups.json").read_text())
    assert len(groups) == 1 and len(groups[0]["members"]) == 3 and groups[0]["scores"] == [1.0, 1.0, 1.0]
    assert paths[groups[0]["representative"]].endswith("/0.jpg")
    lines = (out / "to_remove.txt").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(ln.decode() in paths for ln in lines[:-1])  # each line exactly a member
    assert str(hostile["victim"]).encode() not in lines and len(lines) == 1  # both odd names are left out
    removed = (out / "to_remove.nul").read_bytes().split(b"\0")
    assert removed[-1] == b"" and len(removed) == 3
    assert all(Path(os.fsdecode(p)).read_bytes() == PHOTOS[0] for p in removed[:-1])
    report = json.loads((out / "dedup.json").read_text())
    assert report["not_in_to_remove_txt"]["count"] == 2 and "to_remove.nul" in proc.stdout
    # the README's way to delete: only the two copies go, the victim and the original stay
    import subprocess

    subprocess.run(f"xargs -0 rm -- < {out / 'to_remove.nul'}", shell=True, check=True)
    assert hostile["victim"].read_bytes() == b"keep me" and (hostile["src"] / "0.jpg").exists()
    for p in removed[:-1]:  # put them back for the other tests
        with open(p, "wb") as f:
            f.write(PHOTOS[0])


def test_url_queries_fail_in_time_and_say_why(hostile):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404 if self.path == "/missing.jpg" else 500)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) and never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    web = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cases = [
            (f"{web}/missing.jpg", "HTTP 404"),
            (f"{web}/broken.jpg", "HTTP 500"),
            (f"http://127.0.0.1:{closed_port}/x.jpg", "connection refused"),
            (f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg", "timed out after 2 s"),
        ]
        for url, expect in cases[:-1]:  # in-process: the model loads once per call, not once per process
            with pytest.raises(api.UserError, match=expect):
                api.query(hostile["feats"], url, timeout_s=2)
        t = time.perf_counter()
        proc = run_cli("query", hostile["feats"], cases[-1][0], "--timeout", "2", check=False, timeout=60)
        one_line_error(proc, "query", cases[-1][1])
        assert time.perf_counter() - t < 30
    finally:
        server.shutdown()
        silent.close()


def test_a_file_that_is_not_an_image_is_said_without_an_object_address(hostile, tmp_path):
    (tmp_path / "notes.jpg").write_bytes(b"just text")
    proc = run_cli("query", hostile["feats"], tmp_path / "notes.jpg", check=False)
    last = one_line_error(proc, "query", "cannot decode the query image")
    assert "0x" not in last and "BytesIO" not in last


def test_an_ivf_index_is_queried_by_key_after_its_features_moved(hostile, tmp_path):
    feats = tmp_path / "feats"
    shutil.copytree(hostile["feats"], feats)
    run_cli("index", feats, tmp_path / "ix", "--index-key", "IVF2,Flat", "--no-progress")
    key = json.loads((feats / "img_list.json").read_text())[3]
    shutil.move(feats, tmp_path / "moved")
    out = run_cli("query", tmp_path / "ix", key, "-k", "2", "--json").stdout.splitlines()
    assert json.loads(out[0])["row"] == 3


# --- stale results ---------------------------------------------------------------------------------


def test_a_changed_row_is_never_answered_from_old_results(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run_cli("match", tmp_path / "x.npy", tmp_path / "m", "-k", "5", "--no-progress")
    run_cli("index", tmp_path / "x.npy", tmp_path / "ix", "--no-progress")
    x[1234] = x[7]  # a row a 64-row sample would never read
    np.save(tmp_path / "x.npy", x)
    proc = run_cli("match", tmp_path / "x.npy", tmp_path / "m", "-k", "5", "--no-progress", check=False)
    one_line_error(proc, "match", "other features")
    proc = run_cli("show", tmp_path / "m", tmp_path / "m.html", check=False)
    one_line_error(proc, "show", "changed since this match was made")
    np.save(tmp_path / "q.npy", x[:1])
    proc = run_cli("query", tmp_path / "ix", tmp_path / "q.npy", check=False)
    one_line_error(proc, "query", "changed since the index")
    run_cli("match", tmp_path / "x.npy", tmp_path / "m", "-k", "5", "--overwrite", "--no-progress")
    run_cli("match", tmp_path / "x.npy", tmp_path / "fresh", "-k", "5", "--no-progress")
    assert (tmp_path / "m" / "matches.npy").read_bytes() == (tmp_path / "fresh" / "matches.npy").read_bytes()
    assert np.load(tmp_path / "m" / "matches.npy")[1234, 1] == 7


# --- ties ------------------------------------------------------------------------------------------


def tied(copies: int = 30, distinct: int = 100, dim: int = 16) -> np.ndarray:
    """`distinct` random vectors, each `copies` times, rows shuffled (so copies are far apart)."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((distinct, dim)).astype(np.float32)
    return base[rng.permutation(np.repeat(np.arange(distinct), copies))]


def test_exact_ties_give_the_same_bytes_whatever_the_threads_and_tiles(tmp_path):
    x = tied()
    np.save(tmp_path / "x.npy", x)
    runs = {}
    for name, threads, budget in (("a", "1", "2GB"), ("b", "2", "2GB"), ("c", "2", "400KB")):
        out = tmp_path / name
        env = {"OMP_NUM_THREADS": threads}
        run_cli("match", tmp_path / "x.npy", out, "-k", "10", "--memory-budget", budget, "--no-progress", env=env)
        runs[name] = ((out / "matches.npy").read_bytes(), (out / "scores.npy").read_bytes())
    assert runs["a"] == runs["b"] == runs["c"]
    m, s = np.load(tmp_path / "a" / "matches.npy"), np.load(tmp_path / "a" / "scores.npy")
    assert (s == 1.0).all()  # identical vectors score exactly 1
    for i in range(len(x)):  # the row itself, then its lowest-numbered copies: (score desc, row asc)
        same = np.flatnonzero((x == x[i]).all(axis=1))
        assert m[i].tolist() == [i, *[r for r in same if r != i][:9]], i


def test_ivf_recall_on_tied_data_does_not_push_nprobe_to_nlist(tmp_path):
    np.save(tmp_path / "x.npy", tied())
    run_cli("match", tmp_path / "x.npy", tmp_path / "ivf", "--method", "ivf", "--no-progress")
    report = json.loads((tmp_path / "ivf" / "match.json").read_text())
    assert report["estimated_recall_at_k"] >= 0.95 and report["nprobe"] < report["nlist"], report


def test_star_groups_are_not_capped_at_k(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 32)).astype(np.float32)
    x[100:200] = x[100]
    np.save(tmp_path / "x.npy", x)
    proc = run_cli("dedup", tmp_path / "x.npy", tmp_path / "d", "--threshold", "0.99", "--no-progress")
    groups = json.loads((tmp_path / "d" / "groups.json").read_text())
    assert [len(g["members"]) for g in groups] == [100] and groups[0]["members"] == list(range(100, 200))
    assert len((tmp_path / "d" / "to_remove.txt").read_text().split()) == 99
    assert "grown by an exact scan" in proc.stdout
    hist = json.loads((tmp_path / "d" / "dedup.json").read_text())["nearest_neighbour_histogram"]
    assert all(high <= 1.0 for _, high, _ in hist) and sum(c for *_, c in hist) == 400


# --- colliding names ---------------------------------------------------------------------------------


@pytest.fixture()
def small(tmp_path) -> Path:
    np.save(tmp_path / "v.npy", np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32))
    run_cli("match", tmp_path / "v.npy", tmp_path / "mm", "-k", "3", "--no-progress")
    return tmp_path


@pytest.mark.parametrize(
    "case",
    ["same_name", "input_in_out", "features_folder", "page_is_report", "page_is_folder"],
)
def test_colliding_names_are_refused_before_anything_is_written(case, small, hostile):
    v, mm = small / "v.npy", small / "mm"
    before = {p: p.read_bytes() for p in [v, *mm.iterdir()] if p.is_file()}
    verb, expect, args, cwd_args = "match", "", [], {}
    if case == "same_name":
        args = [v, small / "o", "--numpy-matches", "x", "--numpy-similarity-scores", "x.npy"]
        expect = "both name x.npy"
    elif case == "input_in_out":
        args = [v, small, "--numpy-matches", "v.npy"]
        expect = "is the features file itself"
    elif case == "features_folder":
        feats = hostile["feats"]
        before |= {p: p.read_bytes() for p in feats.iterdir() if p.is_file()}
        args = [feats, feats, "--numpy-matches", "fts.npy", "-k", "2"]
        expect = "is the features folder itself"
    elif case == "page_is_report":
        verb, args, expect = "show", [mm, mm / "match.json"], "must be a file name ending in .html"
    elif case == "page_is_folder":
        verb, args, expect = "show", [mm, f"{small / 'pages'}/"], "must be a file name ending in .html"
    proc = run_cli(verb, *args, *(["--no-progress"] if verb == "match" else []), check=False, **cwd_args)
    one_line_error(proc, verb, expect)
    assert {p: p.read_bytes() for p in before} == before
    assert not (small / "o").exists() and not (small / ".html").exists()


def test_an_output_named_like_a_report_cannot_corrupt_out(small):
    run_cli("match", small / "v.npy", small / "mm", "-k", "3", "--numpy-matches", "match-plan.json", "--no-progress")
    assert (small / "mm" / "match-plan.json.npy").exists()  # .npy added, as the original's np.save did
    json.loads((small / "mm" / "match-plan.json").read_text())
    run_cli("match", small / "v.npy", small / "mm", "-k", "3", "--no-progress")  # OUT still resumes


# --- one line instead of a traceback -----------------------------------------------------------------


def bad_input(case: str, tmp_path: Path) -> tuple[str, list, str]:
    """(verb, args, expected text) for one hostile input."""
    rng = np.random.default_rng(4)
    np.save(tmp_path / "x.npy", rng.standard_normal((500, 8)).astype(np.float32))
    x = tmp_path / "x.npy"
    if case == "zero_dim":
        np.save(tmp_path / "z.npy", np.zeros((10, 0), np.float32))
        return "match", [tmp_path / "z.npy", tmp_path / "o"], "0 dimensions"
    if case == "zero_dim_dedup":
        np.save(tmp_path / "z.npy", np.zeros((10, 0), np.float32))
        return "dedup", [tmp_path / "z.npy", tmp_path / "o", "--threshold", "0.9"], "0 dimensions"
    if case == "empty":
        np.save(tmp_path / "e.npy", np.zeros((0, 8), np.float32))
        return "match", [tmp_path / "e.npy", tmp_path / "o"], "holds no vectors"
    if case == "empty_index":
        np.save(tmp_path / "e.npy", np.zeros((0, 8), np.float32))
        return "index", [tmp_path / "e.npy", tmp_path / "o"], "holds no vectors"
    if case == "all_nan_index":
        np.save(tmp_path / "n.npy", np.full((50, 8), np.nan, np.float32))
        return "index", [tmp_path / "n.npy", tmp_path / "o"], "no usable vectors"
    if case == "ivf_too_many_lists":
        return "index", [x, tmp_path / "o", "--index-key", "IVF1024,Flat"], "has 1024 lists to train"
    if case == "not_a_factory":
        return "index", [x, tmp_path / "o", "--index-key", "Bogus12"], "not a faiss index description"
    if case == "budget_large_k":
        np.save(tmp_path / "w.npy", rng.standard_normal((1500, 64)).astype(np.float32))
        return "match", [tmp_path / "w.npy", tmp_path / "o", "-k", "1000", "--memory-budget", "1MB"], "too small"
    if case in ("corrupt_index", "corrupt_index_json"):
        run_cli("index", x, tmp_path / "ix", "--no-progress")
        name = "index.faiss" if case == "corrupt_index" else "index.json"
        (tmp_path / "ix" / name).write_bytes(b"\x00garbage")
        return "query", [tmp_path / "ix", x], "rebuild it"
    if case == "corrupt_match_json":
        run_cli("match", x, tmp_path / "m", "-k", "2", "--no-progress")
        (tmp_path / "m" / "match.json").write_text("{not json")
        return "show", [tmp_path / "m", tmp_path / "p.html"], "is damaged"
    if case == "string_query":
        np.save(tmp_path / "s.npy", np.array(["a", "b"]))
        return "query", [x, tmp_path / "s.npy"], "give numbers"
    if case == "nan_query":
        np.save(tmp_path / "q.npy", np.full((1, 8), np.nan, np.float32))
        return "query", [x, tmp_path / "q.npy"], "no direction"
    if case == "zero_query":
        np.save(tmp_path / "q.npy", np.zeros((1, 8), np.float32))
        return "query", [x, tmp_path / "q.npy"], "no direction"
    raise AssertionError(case)


CASES = [
    "zero_dim",
    "zero_dim_dedup",
    "empty",
    "empty_index",
    "all_nan_index",
    "ivf_too_many_lists",
    "not_a_factory",
    "budget_large_k",
    "corrupt_index",
    "corrupt_index_json",
    "corrupt_match_json",
    "string_query",
    "nan_query",
    "zero_query",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_retrieval_input_is_one_line(case, tmp_path):
    verb, args, expect = bad_input(case, tmp_path)
    extra = ["--no-progress"] if verb in ("match", "dedup", "index") else []
    proc = run_cli(verb, *args, *extra, check=False)
    last = one_line_error(proc, verb, expect)
    if case == "budget_large_k":  # the advice is a budget that works
        need = last.rsplit("give at least ", 1)[1]
        run_cli(verb, *args, *extra[:0], "--memory-budget", need.replace(" ", ""), "--no-progress")


def test_a_tensor_saved_with_requires_grad_and_an_idmap_index_work(tmp_path):
    import torch

    t = torch.randn(200, 8, requires_grad=True)
    torch.save(t, tmp_path / "t.pth")
    run_cli("match", tmp_path / "t.pth", tmp_path / "m", "-k", "3", "--no-progress")
    assert (np.load(tmp_path / "m" / "matches.npy")[:, 0] == np.arange(200)).all()
    run_cli("index", tmp_path / "t.pth", tmp_path / "ix", "--index-key", "IDMap,Flat", "--no-progress")


# --- the Python API ------------------------------------------------------------------------------------


def test_api_takes_paths_and_single_queries_and_checks_like_the_cli(tmp_path):
    x = np.random.default_rng(5).standard_normal((300, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", x[[42]])
    hits = api.query(tmp_path / "x.npy", tmp_path / "q.npy", k=2)  # a Path, and one query as a plain value
    assert [h.row for h in hits] == [42, hits[1].row] and hits[0].score == pytest.approx(1.0)
    assert [h.row for h in api.query(str(tmp_path / "x.npy"), str(tmp_path / "q.npy"), k=1)] == [42]
    with pytest.raises(api.UserError, match="-k must be at least 1, got 0"):
        api.dedup(tmp_path / "x.npy", tmp_path / "d", threshold=0.9, k=0)
    with pytest.raises(api.UserError, match="not an extract output folder"):
        api.load_features(tmp_path / "x.npy")
    with pytest.raises(api.UserError, match="dtype must be"):
        api.load_features(tmp_path, dtype="int8")
    with pytest.raises(api.UserError, match="not text"):
        api.dataset(tmp_path / "x.npy")
    with pytest.raises(api.UserError, match="--decode must be one of"):
        api.dataset(tmp_path, decode="bogus")
    with pytest.raises(api.UserError, match="--crop-size must be between"):
        api.dataset(tmp_path, crop_size="224")
    api.match(tmp_path / "x.npy", tmp_path / "m", k=2, progress=False)
    pages = api.show(tmp_path / "m", tmp_path / "p.html", sample=10, per_page=4)
    assert len(pages) == 3
