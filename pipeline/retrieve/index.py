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
from dataclasses import dataclass

import numpy as np

from pipeline import __version__
from pipeline.errors import UserError
from pipeline.outdir import load_run
from pipeline.retrieve import ann, load_faiss
from pipeline.retrieve.features import FeatureSet, open_features, require_vectors
from pipeline.retrieve.knn import plan_tiles, valid_rows
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
    progress: bool = True


def choose_key(n: int, dim: int, budget: int) -> str:
    if n < FLAT_BELOW:
        return "Flat"
    vectors = n * dim * 4
    if n <= HNSW_UP_TO and vectors + n * HNSW_M * 2 * 4 <= budget // 2:
        return f"HNSW{HNSW_M},Flat"
    return ann.choose(n, dim, budget).factory


def build_index(cfg: IndexConfig) -> dict:
    fs = open_features(cfg.features)
    require_vectors(fs)
    key = choose_key(fs.n, fs.dim, cfg.memory_budget) if cfg.index_key == "auto" else cfg.index_key
    tiling = plan_tiles(fs.n, fs.dim, 11, cfg.memory_budget)
    out = locate(cfg.index)
    if out.fs.exists(out.join(META_FILE)) and not cfg.overwrite:
        raise UserError(f"{out.url()} already holds an index; use --overwrite to replace it, or another INDEX")
    ensure_writable(out)
    valid = valid_rows(fs, tiling.db_rows)
    try:
        index = ann.build(fs, valid, key, tiling.db_rows, cfg.progress)
    except UserError as exc:
        raise UserError(f"--index-key {exc}") from None
    param, value, recall = ann.tune(index, fs, valid, tiling, 10)
    log.info("index tuned: %s %s, recall@10 %.3f", param or "exact", value or "", recall)
    _save(out, index, fs, key, param, value, recall)
    return read_json(out.fs, out.join(META_FILE))


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
            "features": fs.where,
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
