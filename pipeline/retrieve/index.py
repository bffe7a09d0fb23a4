"""`featpipe index FEATURES INDEX`: a faiss index to query later, plus ids.parquet (row → key, path)
and index.json (what it is, its tuned search parameter, the recall measured, and the model that
made the vectors, so `featpipe query` can embed a new image the same way).

auto follows autofaiss's rules, scaled to the memory budget: Flat (exact) below 10,000 vectors;
HNSW32 while the vectors and the graph fit half the budget, up to 2 million; IVF√N,Flat while
the vectors fit; IVF√N,SQ8 (4× smaller) beyond. The search parameter (efSearch or nprobe) is
raised until recall@10 on 1,000 sampled queries against exact search reaches 0.95.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from pipeline import __version__
from pipeline.errors import UserError, first_line
from pipeline.outdir import load_run
from pipeline.retrieve import ivf, load_faiss
from pipeline.retrieve.features import FeatureSet, open_features
from pipeline.retrieve.knn import Tiling, normalize, plan_tiles, valid_rows
from pipeline.storage import commit_file, commit_json, ensure_writable, locate, read_json, staging_file

log = logging.getLogger("featpipe")

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"
FLAT_BELOW = 10_000
HNSW_UP_TO = 2_000_000
HNSW_M = 32


@dataclass(frozen=True)
class IndexConfig:
    features: str
    index: str
    index_key: str = "auto"
    memory_budget: int = 2 * 10**9
    overwrite: bool = False


def choose_key(n: int, dim: int, budget: int) -> str:
    if n < FLAT_BELOW:
        return "Flat"
    vectors = n * dim * 4
    if n <= HNSW_UP_TO and vectors + n * HNSW_M * 2 * 4 <= budget // 2:
        return f"HNSW{HNSW_M},Flat"
    return ivf.choose(n, dim, budget).factory


def build_index(cfg: IndexConfig) -> dict:
    faiss = load_faiss()

    fs = open_features(cfg.features)
    key = choose_key(fs.n, fs.dim, cfg.memory_budget) if cfg.index_key == "auto" else cfg.index_key
    tiling = plan_tiles(fs.n, fs.dim, 11, cfg.memory_budget)
    out = locate(cfg.index)
    if out.fs.exists(out.join(META_FILE)) and not cfg.overwrite:
        raise UserError(f"{out.url()} already holds an index; use --overwrite to replace it, or another INDEX")
    try:
        index = faiss.index_factory(fs.dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UserError(f"--index-key {key!r} is not a faiss index description: {first_line(exc)}") from None
    ensure_writable(out)
    valid = valid_rows(fs, tiling.db_rows)
    valid_ids = np.flatnonzero(valid)
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in key else 256
        index.train(normalize(fs.take(ivf.train_sample(valid_ids, nlist))))
    if "IVF" not in key:
        index = faiss.IndexIDMap2(index)
    for start in range(0, fs.n, tiling.db_rows):
        stop = min(start + tiling.db_rows, fs.n)
        ids = np.flatnonzero(valid[start:stop]) + start
        if len(ids):
            index.add_with_ids(normalize(fs.read(start, stop)[ids - start]), ids.astype(np.int64))
    param, value, recall = tune(index, fs, valid, tiling)
    _save(out, index, fs, key, param, value, recall)
    return read_json(out.fs, out.join(META_FILE))


def search_parameter(index) -> str | None:
    faiss = load_faiss()

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch"
    return "nprobe" if "IVF" in type(inner).__name__ else None


def set_search_parameter(index, name: str | None, value: int | None) -> None:
    faiss = load_faiss()

    if name == "efSearch":
        faiss.downcast_index(index.index).hnsw.efSearch = value
    elif name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value


def tune(index, fs: FeatureSet, valid: np.ndarray, tiling: Tiling, k: int = 10) -> tuple[str | None, int | None, float]:
    """The smallest efSearch / nprobe (doubling) that reaches recall@k ≥ 0.95 on sampled queries."""
    from pipeline.retrieve.knn import ExactSearch

    name = search_parameter(index)
    valid_ids = np.flatnonzero(valid)
    rng = np.random.default_rng(ivf.SEED + 2)
    sample = np.sort(rng.choice(valid_ids, min(ivf.TUNE_QUERIES, len(valid_ids)), replace=False))
    queries = normalize(fs.take(sample))
    k = min(k, len(valid_ids))
    truth = ExactSearch(fs, valid, tiling).candidates(queries, k)
    value, limit = (16, 4096) if name == "efSearch" else (1, 1 << 16)
    if name == "nprobe":
        limit = ivf_lists(index)
    while True:
        set_search_parameter(index, name, value)
        recall = ivf.recall_at(index.search(queries, k)[1], truth)
        if name is None or recall >= ivf.RECALL_TARGET or value >= limit:
            log.info("index tuned: %s %s, recall@%d %.3f", name or "exact", value if name else "", k, recall)
            return name, (value if name else None), recall
        value = min(value * 2, limit)


def ivf_lists(index) -> int:
    faiss = load_faiss()

    return faiss.extract_index_ivf(index).nlist


def _save(out, index, fs: FeatureSet, key: str, param: str | None, value: int | None, recall: float) -> None:
    faiss = load_faiss()
    import pyarrow as pa
    import pyarrow.parquet as pq

    staged = staging_file(out.fs, out.join(INDEX_FILE))
    faiss.write_index(index, staged)
    commit_file(out.fs, staged, out.join(INDEX_FILE))
    ids = pa.table(
        {
            "row": pa.array(np.arange(fs.n), pa.int64()),
            "key": fs.keys or [None] * fs.n,
            "path": fs.paths or [None] * fs.n,
        }
    )
    staged = staging_file(out.fs, out.join(IDS_FILE))
    pq.write_table(ids, staged, compression="zstd")
    commit_file(out.fs, staged, out.join(IDS_FILE))
    embedder = load_run(locate(fs.folder)).extra.get("embedder") if fs.folder else None
    commit_json(
        out.fs,
        out.join(META_FILE),
        {
            "featpipe_version": __version__,
            "index_key": key,
            "n": fs.n,
            "dim": fs.dim,
            "metric": "inner product of L2-normalised vectors (cosine)",
            "search_parameter": param,
            "value": value,
            "estimated_recall_at_10": round(recall, 4),
            "features": os.path.abspath(fs.source),
            "features_fingerprint": fs.fingerprint,
            "embedder": embedder,
        },
    )


def summary(meta: dict, index: str) -> str:
    tuned = f", {meta['search_parameter']} {meta['value']}" if meta["search_parameter"] else ""
    return (
        f"{meta['index_key']} index of {meta['n']} × {meta['dim']} vectors{tuned}, estimated recall@10 "
        f"{meta['estimated_recall_at_10']} → {index}"
    )
