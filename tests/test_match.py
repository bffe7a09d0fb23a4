"""`featpipe match`: real vectors on disk, the real CLI, faiss's IndexFlatIP (the original matcher's
method) as the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli, torchrun

NO_MATCH = 2**32 - 1


def clustered(n: int, dim: int, seed: int = 0, dup_pairs: int = 50) -> np.ndarray:
    """Gaussian clusters with planted near-duplicates (and one exact duplicate pair)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(8, n // 200), dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    src = rng.choice(n, dup_pairs, replace=False)
    dst = (src + n // 2) % n
    x[dst] = x[src] + 0.01 * rng.standard_normal((dup_pairs, dim)).astype(np.float32)
    x[5] = x[4]  # an exact duplicate: a tie that only identity can settle
    return x


def reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The original match_fts.py: float32, normalize_L2, IndexFlatIP, search all vs all."""
    import faiss

    x = x.astype(np.float32).copy()
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(x, k)


def agreement(matches: np.ndarray, scores_ref: np.ndarray, ids_ref: np.ndarray, x: np.ndarray) -> float:
    """Share of rows whose neighbour set agrees with the reference, tie-aware: a neighbour counts
    when its exact score is within 1e-4 of the reference's k-th score."""
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    good = 0
    for i in range(len(x)):
        ours = set(matches[i].tolist())
        if ours == set(ids_ref[i].tolist()):
            good += 1
            continue
        kth = scores_ref[i, -1]
        good += all(xn[i] @ xn[j] >= kth - 1e-4 for j in ours - set(ids_ref[i].tolist()))
    return good / len(x)


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("match")
    np.save(d / "fts.npy", clustered(6000, 48).astype(np.float16))
    return d / "fts.npy"


@pytest.fixture(scope="module")
def exact(vectors, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("match") / "exact"
    run_cli("match", vectors, out, "--method", "exact", "--no-progress")
    return out


def test_exact_agrees_with_the_original_matcher(vectors, exact):
    x = np.load(vectors)
    m, s = np.load(exact / "matches.npy"), np.load(exact / "scores.npy")
    assert m.dtype == np.uint32 and s.dtype == np.float16 and m.shape == s.shape == (6000, 10)
    ref_s, ref_i = reference(x, 10)
    assert agreement(m, ref_s, ref_i, x) >= 0.999
    assert (m[:, 0] == np.arange(6000)).all()  # each vector first, by identity (row 5 equals row 4)
    assert np.abs(s.astype(np.float32) - ref_s).max() <= 2e-3  # within float16 rounding of the scores
    report = json.loads((exact / "match.json").read_text())
    assert (report["method"], report["n"], report["dim"], report["k"]) == ("exact", 6000, 48, 10)


def test_same_bytes_whatever_the_tiles(vectors, exact, tmp_path):
    out = tmp_path / "small"
    run_cli("match", vectors, out, "--method", "exact", "--memory-budget", "600KB", "--no-progress")
    assert json.loads((out / "match.json").read_text())["tiling"]["query_rows"] < 6000 // 4
    for name in ("matches.npy", "scores.npy"):
        assert (out / name).read_bytes() == (exact / name).read_bytes(), name


def test_exclude_self_removes_the_vector_by_identity(vectors, exact, tmp_path):
    out = tmp_path / "noself"
    run_cli("match", vectors, out, "-k", "5", "--exclude-self", "--method", "exact", "--no-progress")
    m = np.load(out / "matches.npy")
    assert not (m == np.arange(6000)[:, None]).any()
    assert m[4, 0] == 5 and m[5, 0] == 4  # the exact duplicate is the first neighbour, not dropped
    with_self = np.load(exact / "matches.npy")
    assert (m[6:] == with_self[6:, 1:6]).mean() > 0.999


def test_kill_then_rerun_gives_identical_bytes(vectors, exact, tmp_path):
    out = tmp_path / "killed"
    args = ["match", vectors, out, "--method", "exact", "--memory-budget", "600KB", "--no-progress"]
    proc = run_cli(*args, env={"FEATPIPE_TEST_CRASH": "after-block"}, check=False)
    assert proc.returncode == -9
    assert len(list((out / "blocks").glob("*.matches.npy"))) == 1 and not (out / "matches.npy").exists()
    proc = run_cli(*args, "-v")
    assert "query blocks to do" in proc.stderr and not (out / "blocks").joinpath(".tmp").exists()
    for name in ("matches.npy", "scores.npy"):
        assert (out / name).read_bytes() == (exact / name).read_bytes(), name


def test_two_torchrun_ranks_give_the_same_bytes_and_update_a_grown_match(vectors, exact, tmp_path):
    """Two ranks match the first 5,900 rows, then --update after 100 rows are added: the same bytes
    as one process matching all 6,000 (a wrong first match would survive in the merged rows)."""
    features, out = tmp_path / "fts.npy", tmp_path / "ranks"
    np.save(features, np.load(vectors)[:5900])
    args = ("--standalone", "--nproc-per-node", "2", "-m", "pipeline", "match", str(features), str(out))
    flags = ("--method", "exact", "--memory-budget", "600KB", "--no-progress")
    proc = torchrun(*args, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.save(features, np.load(vectors))
    proc = torchrun(*args, *flags, "--update")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("matches.npy", "scores.npy"):
        assert (out / name).read_bytes() == (exact / name).read_bytes(), name
    report = json.loads((out / "match.json").read_text())
    assert report["update"]["added_rows"] == 100 and report["update"]["merged_rows"] == 5900
    assert len(list((out / "blocks").glob("*.matches.npy"))) == -(-6000 // report["tiling"]["query_rows"]) > 2


def test_ivf_reaches_the_recall_target(tmp_path):
    x = clustered(20000, 32, seed=1)
    np.save(tmp_path / "x.npy", x)
    run_cli("match", tmp_path / "x.npy", tmp_path / "ivf", "--method", "ivf", "--no-progress")
    report = json.loads((tmp_path / "ivf" / "match.json").read_text())
    assert report["method"] == "ivf" and report["estimated_recall_at_k"] >= 0.95 and report["nprobe"] >= 1
    m = np.load(tmp_path / "ivf" / "matches.npy")
    _, ref = reference(x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(m.tolist(), ref.tolist(), strict=True)])
    assert recall >= 0.95


def test_torch_file_and_invalid_rows(tmp_path):
    import torch

    x = clustered(500, 16, seed=2)
    x[7] = 0
    x[9, 3] = np.nan
    torch.save(torch.from_numpy(x), tmp_path / "fts.pth")
    np.save(tmp_path / "fts.npy", x)
    run_cli("match", tmp_path / "fts.pth", tmp_path / "a", "-k", "4", "--no-progress")
    run_cli("match", tmp_path / "fts.npy", tmp_path / "b", "-k", "4", "--no-progress")
    assert (tmp_path / "a" / "matches.npy").read_bytes() == (tmp_path / "b" / "matches.npy").read_bytes()
    m = np.load(tmp_path / "a" / "matches.npy")
    assert (m[[7, 9]] == NO_MATCH).all() and not np.isin([7, 9], m).any()  # recorded, never matched
    report = json.loads((tmp_path / "a" / "match.json").read_text())
    assert report["invalid_rows"]["rows"] == [7, 9]


def test_original_matcher_flags(vectors, exact, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "match_fts.py"),
            "--input_dir",
            str(vectors.parent),
            "--numpy_features",
            "fts.npy",
            "--output_dir",
            str(tmp_path / "m"),
            "--numpy_matches",
            "nn.npy",
            "--numpy_similarity_scores",
            "sim.npy",
            "--num_neighbors",
            "10",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "nn.npy").read_bytes() == (exact / "matches.npy").read_bytes()
    assert (tmp_path / "m" / "sim.npy").read_bytes() == (exact / "scores.npy").read_bytes()


@pytest.mark.parametrize("case", ["missing", "k_too_large", "three_d", "budget", "other_features", "int_values"])
def test_bad_input_is_one_line(case, vectors, exact, tmp_path):
    out = tmp_path / "out"
    args = [vectors, out]
    if case == "missing":
        args[0] = tmp_path / "nope.npy"
    elif case == "k_too_large":
        args += ["-k", "6001"]
    elif case == "three_d":
        np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
        args[0] = tmp_path / "cube.npy"
    elif case == "budget":
        args += ["--memory-budget", "10KB"]
    elif case == "other_features":
        np.save(tmp_path / "other.npy", clustered(6000, 48, seed=9).astype(np.float16))
        args = [tmp_path / "other.npy", exact]
    elif case == "int_values":
        np.save(tmp_path / "ints.npy", np.ones((10, 4), np.int32))
        args[0] = tmp_path / "ints.npy"
    before = sorted(p.name for p in exact.iterdir())
    proc = run_cli("match", *args, "--method", "exact", "--no-progress", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("featpipe match: error: ")
    expect = {
        "missing": "not found",
        "k_too_large": "k must be 1 to 6000",
        "three_d": "must be N×D",
        "budget": "too small",
        "other_features": "other features or settings",
        "int_values": "float16 or float32",
    }[case]
    assert expect in last
    assert not out.exists() and sorted(p.name for p in exact.iterdir()) == before


def planted(n: int, dim: int, pairs: int, seed: int = 3) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    src = rng.choice(n // 2, pairs, replace=False)
    dst = src + n // 2
    x[dst] = x[src] + 0.05 * rng.standard_normal((pairs, dim)).astype(np.float32)  # cosine ≈ 0.999
    return x, list(zip(src.tolist(), dst.tolist(), strict=True))


def test_dedup_star_groups_planted_duplicates(tmp_path):
    x, pairs = planted(5000, 64, 100)
    np.save(tmp_path / "x.npy", x.astype(np.float16))
    proc = run_cli("dedup", tmp_path / "x.npy", tmp_path / "d", "--threshold", "0.95", "--no-progress")
    assert "nearest-neighbour cosine" in proc.stdout and "100 groups" in proc.stdout
    groups = json.loads((tmp_path / "d" / "groups.json").read_text())
    together = {frozenset(g["members"]) for g in groups}
    assert sum(frozenset(p) in together for p in pairs) / len(pairs) >= 0.99
    for g in groups:
        assert g["members"][0] == g["representative"] and min(g["scores"]) >= 0.95
        assert g["representative"] == min(g["members"])  # no image sizes: the first row represents
    removed = (tmp_path / "d" / "to_remove.txt").read_text().split()
    assert sorted(map(int, removed)) == sorted(b for _, b in pairs)
    dups = json.loads((tmp_path / "d" / "duplicates.json").read_text())
    a, b = pairs[0]
    assert dups[str(a)] == [str(b)] and dups[str(b)] == [str(a)]


def test_star_never_chains_connected_does(tmp_path):
    """A~B and B~C above the threshold, A and C far apart: star keeps A and C apart."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x[:3] = 0
    x[0, 0] = 1
    x[1, :2] = [np.cos(0.35), np.sin(0.35)]  # A·B ≈ 0.94
    x[2, :2] = [np.cos(0.70), np.sin(0.70)]  # B·C ≈ 0.94, A·C ≈ 0.76
    np.save(tmp_path / "x.npy", x)
    run_cli("dedup", tmp_path / "x.npy", tmp_path / "star", "--threshold", "0.9", "--no-progress")
    run_cli(
        "dedup", tmp_path / "x.npy", tmp_path / "cc", "--threshold", "0.9", "--linkage", "connected", "--no-progress"
    )
    star = json.loads((tmp_path / "star" / "groups.json").read_text())
    cc = json.loads((tmp_path / "cc" / "groups.json").read_text())
    assert {0, 1} in [set(g["members"]) for g in star] and not any({0, 2} <= set(g["members"]) for g in star)
    chain = next(g for g in cc if 0 in g["members"])
    assert set(chain["members"]) == {0, 1, 2} and min(chain["scores"]) < 0.9  # connected chains, and says so


def test_dedup_threshold_out_of_range_is_one_line(vectors, tmp_path):
    proc = run_cli("dedup", vectors, tmp_path / "d", "--threshold", "1.5", check=False)
    assert proc.returncode == 2 and "between -1 and 1" in proc.stderr and not (tmp_path / "d").exists()


def test_index_auto_answers_with_the_recall_target(tmp_path):
    x = clustered(30000, 32, seed=7)
    np.save(tmp_path / "x.npy", x)
    queries = x[::300][:100]
    np.save(tmp_path / "q.npy", queries)
    _, truth = reference(np.concatenate([x, queries]), 11)  # exact neighbours among x (queries are rows of x)
    truth = truth[len(x) :, 1:]
    for budget, kind in (("2GB", "HNSW32,Flat"), ("20MB", "IVF")):
        index = tmp_path / f"index-{budget}"
        proc = run_cli("index", tmp_path / "x.npy", index, "--memory-budget", budget)
        meta = json.loads((index / "index.json").read_text())
        assert meta["index_key"].startswith(kind) and meta["estimated_recall_at_10"] >= 0.95, proc.stdout
        out = run_cli("query", index, tmp_path / "q.npy", "--json").stdout
        hits = [json.loads(ln) for ln in out.splitlines()]
        found = np.array([h["row"] for h in hits]).reshape(100, 10)
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist(), strict=True)])
        assert recall >= 0.95, (budget, recall)
        assert all(h["score"] <= 1.0001 for h in hits)


def test_query_features_exactly_and_bad_queries(vectors, tmp_path):
    x = np.load(vectors)
    np.save(tmp_path / "q.npy", x[[10, 20]])
    out = run_cli("query", vectors, tmp_path / "q.npy", "-k", "3").stdout.splitlines()
    assert out[0].endswith("q.npy[0]") and out[1].split("\t")[2] == "10" and float(out[1].split("\t")[1]) > 0.999
    np.save(tmp_path / "wrong.npy", np.ones((1, 7), np.float32))
    proc = run_cli("query", vectors, tmp_path / "wrong.npy", check=False)
    assert proc.returncode == 1 and "holds 48-dim vectors; the queries are 7-dim" in proc.stderr
    proc = run_cli("query", vectors, tmp_path / "nothing.jpg", check=False)
    assert proc.returncode == 1 and "does not record the model" in proc.stderr and "Traceback" not in proc.stderr


def test_the_gpu_tile_path_finds_the_same_candidates_on_the_cpu(vectors):
    """The torch tiles a CUDA run uses, with its fp16 arithmetic on the CPU, against faiss's tiles:
    the same candidates but for near-ties, every score within the fp16 error bound."""
    from pipeline.retrieve.features import open_features
    from pipeline.retrieve.knn import ExactSearch, Tiling, normalize, valid_rows

    fs = open_features(str(vectors))
    valid = valid_rows(fs, 1000)
    search = ExactSearch(fs, valid, Tiling(500, 1000), "cpu")
    half = ExactSearch(fs, valid, Tiling(500, 1000), "cpu", half=True)
    queries = normalize(fs.read(0, 300))
    ids = np.flatnonzero(valid[:1000])
    s_faiss, i_faiss = search._tile(queries, 0, 1000, ids, 10)
    s_half, i_half = half._tile(queries, 0, 1000, ids, 10)
    assert (i_faiss == i_half).mean() > 0.9 and np.abs(s_faiss - s_half).max() < half.error
