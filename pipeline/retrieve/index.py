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
from dataclasses import asdict, dataclass

import numpy as np

from pipeline import __version__, dist
from pipeline.cpu import give_back_memory
from pipeline.errors import UserError
from pipeline.faults import crash_point
from pipeline.outdir import load_run
from pipeline.retrieve import ann, bigindex, load_faiss, rowmeta
from pipeline.retrieve.features import FeatureSet, open_features, removed_count, require_vectors
from pipeline.retrieve.knn import normalize, plan_tiles, valid_rows
from pipeline.storage import commit_file, commit_json, ensure_writable, local_copy, locate, read_json, staging_file

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
    update: bool = False  # add the rows FEATURES gained, drop the removed ones, re-tune


# An IVF's lists are re-trained (the index rebuilt) once N reaches this many times the N they were
# trained on: √N lists of ~N/√N rows each drift far from the sizes the recall was tuned for.
RETRAIN_GROWTH = 4


@dataclass(frozen=True)
class Layout:
    key: str
    why: str
    plan: bigindex.Plan | None = None  # a compressed index built in parts (bigindex.py)


def choose_layout(n: int, dim: int, budget: int) -> Layout:
    if n < FLAT_BELOW:
        return Layout("Flat", f"under {FLAT_BELOW} vectors: exact search")
    vectors = n * dim * 4
    if n <= HNSW_UP_TO and vectors + n * HNSW_M * 2 * 4 <= budget // 2:
        return Layout(f"HNSW{HNSW_M},Flat", "the vectors and the graph fit half the budget")
    if n * (dim + bigindex.ID_BYTES) <= budget // 2:
        choice = ann.choose(n, dim, budget)
        return Layout(choice.factory, f"{'full vectors' if choice.code == 'Flat' else '8-bit codes'} fit the budget")
    p = bigindex.plan(n, dim, budget)
    return Layout(p.key, p.why, p)


def build_index(cfg: IndexConfig) -> dict | None:
    """The index, built and tuned; index.json's record on rank 0 (None on the other ranks, which
    add their parts of a compressed build under torchrun and stop)."""
    fs = open_features(cfg.features)
    require_vectors(fs)
    if cfg.update:
        return update_index(cfg, fs)
    if cfg.index_key == "auto":
        layout = choose_layout(fs.n, fs.dim, cfg.memory_budget)
    else:
        layout = Layout(cfg.index_key, "--index-key")
    tiling = plan_tiles(fs.n, fs.dim, 11, cfg.memory_budget)
    out = locate(cfg.index)
    if out.fs.exists(out.join(META_FILE)) and not cfg.overwrite:
        raise UserError(f"{out.url()} already holds an index; use --overwrite to replace it, or another INDEX")
    ensure_writable(out)
    ctx = dist.DistContext.from_env()
    dist.init(ctx, "cpu", dist.BARRIER_TIMEOUT_S)
    try:
        valid = valid_rows(fs, tiling.db_rows)
        if ctx.is_main:  # first, while no index is held: memory is the names' alone
            _write_names(out, fs)
            give_back_memory()
        truth = bigindex.early_truth(fs, valid, tiling, ctx) if layout.plan is not None else None
        index, parted = _build(fs, valid, layout, out, cfg, ctx, INDEX_FILE)
        if index is None:
            return None
        tuned = ann.tune(index, fs, valid, tiling, 10, rerank="PQ" in layout.key, truth=truth)
        log.info("index tuned: %s, recall@10 %.3f", _tuned_text(tuned), tuned.recall)
        extra = {"trained_on": fs.n, "removed_held": 0}
        _save(out, index, fs, layout, tuned, extra)
        if parted is not None:
            parted.clean()
        return read_json(out.fs, out.join(META_FILE))
    finally:
        dist.shutdown(ctx)


def _build(fs: FeatureSet, valid: np.ndarray, layout: Layout, out, cfg: IndexConfig, ctx, name: str):
    """(index, the parted build to clean up once saved) on rank 0; (None, None) on other ranks."""
    if layout.plan is not None:
        parted = bigindex.PartedBuild(fs, valid, layout.plan, out, cfg.progress)
        return parted.run(ctx, name), parted
    if not ctx.is_main:
        return None, None
    block = plan_tiles(fs.n, fs.dim, 11, cfg.memory_budget).db_rows
    try:
        return ann.build(fs, valid, layout.key, block, cfg.progress), None
    except UserError as exc:
        raise UserError(f"--index-key {exc}") from None


def _tuned_text(tuned: ann.Tuning) -> str:
    text = f"{tuned.param} {tuned.value}" if tuned.param else "exact"
    return text + (f", {tuned.factor}× candidates re-ranked" if tuned.factor > 1 else "")


def update_index(cfg: IndexConfig, fs: FeatureSet) -> dict:
    """INDEX brought up to FEATURES grown since it was built: the new rows added (no retraining),
    rows removed since taken out (faiss remove_ids; an HNSW graph cannot drop nodes, so its removed
    rows are filtered at query time), the search parameter tuned again on a fresh sample. Rebuilt
    instead, saying why, when an IVF's N grew RETRAIN_GROWTH-fold since training or its recall
    no longer reaches the target."""
    faiss = load_faiss()
    out = locate(cfg.index)
    if not out.fs.exists(out.join(META_FILE)):
        raise UserError(f"{out.url()} holds no index to --update; build it first (without --update)")
    meta = read_json(out.fs, out.join(META_FILE))
    n0, key = meta["n"], meta["index_key"]
    if meta["dim"] != fs.dim or n0 > fs.n or fs.prefix_fingerprint(n0) != meta["features_fingerprint"]:
        raise UserError(
            f"{out.url()} was built from other features, not the first {n0} rows of {fs.source}; "
            "rebuild it with --overwrite"
        )
    tiling = plan_tiles(fs.n, fs.dim, 11, cfg.memory_budget)
    valid = valid_rows(fs, tiling.db_rows)
    _write_names(out, fs)  # rows keep their numbers: the grown names serve the old index file too
    trained_on = meta.get("trained_on", n0)
    name = f"index.{meta.get('updates', 0) + 1}.faiss"
    why = None
    if "IVF" in key and fs.n >= RETRAIN_GROWTH * trained_on:
        why = f"N grew from {trained_on} to {fs.n} since its lists were trained"
    elif meta.get("storage") == "ondisk":
        why = "its inverted lists are on disk, shared with the index being served: rebuilt in parts beside them"
    else:
        path = out.join(meta.get("file", INDEX_FILE))
        index = faiss.read_index(path if out.is_local else local_copy(out.fs, path))
        since = len(fs.removed) - removed_count(meta)  # removal is for good: the earlier set is a subset
        held = meta.get("removed_held", 0) + (since if since and not _remove(index, fs.removed) else 0)
        added = np.flatnonzero(valid[n0:]) + n0
        for start in range(0, len(added), tiling.db_rows):
            rows = added[start : start + tiling.db_rows]
            index.add_with_ids(normalize(fs.take(rows)), rows.astype(np.int64))
        ann.set_search_parameter(index, meta["search_parameter"], meta["value"])
        tuned = ann.tune(index, fs, valid, tiling, 10, rerank="PQ" in key)
        if tuned.recall < ann.RECALL_TARGET and tuned.param == "nprobe":
            why = f"its recall@10 fell to {tuned.recall:.3f}, under the target, however many lists are probed"
    planned = bigindex.Plan(**meta["plan"]) if meta.get("plan") else None
    layout = Layout(key, meta.get("why", "--index-key"), planned)
    parted = None
    if why:
        log.info("index --update: rebuilding, %s", why)
        if planned is not None:  # chosen under the budget: chosen again for the new N
            layout = choose_layout(fs.n, fs.dim, cfg.memory_budget)
        alone = dist.DistContext()
        truth = bigindex.early_truth(fs, valid, tiling, alone) if layout.plan is not None else None
        index = None  # the old index, before the new one is built beside it
        index, parted = _build(fs, valid, layout, out, cfg, alone, name)
        tuned = ann.tune(index, fs, valid, tiling, 10, rerank="PQ" in layout.key, truth=truth)
        trained_on, held = fs.n, 0
    else:
        log.info("index --update: %d rows added, %d rows removed since", len(added), since)
    extra = {"trained_on": trained_on, "removed_held": held, "updates": meta.get("updates", 0) + 1}
    _save(out, index, fs, layout, tuned, extra)
    if parted is not None:
        parted.clean()
    return read_json(out.fs, out.join(META_FILE))


def _remove(index, removed: np.ndarray) -> bool:
    """Take every removed row out of the index where faiss can (rows taken out before are not
    there: faiss skips them); False where it cannot (HNSW: `featpipe query` filters them)."""
    faiss = load_faiss()
    try:
        index.remove_ids(faiss.IDSelectorBatch(removed.astype(np.int64)))
    except RuntimeError:
        log.info("this index cannot drop rows: removed rows are filtered out at query time")
        return False
    return True


def _save(out, index, fs: FeatureSet, layout: Layout, tuned: ann.Tuning, extra: dict) -> None:
    faiss = load_faiss()

    # An update writes a new file that index.json then names (its commit): a kill before that
    # leaves the old index.json naming the old file, and the rerun updates from it again.
    updates = extra.get("updates", 0)
    name = f"index.{updates}.faiss" if updates else INDEX_FILE
    before = read_json(out.fs, out.join(META_FILE)).get("file", INDEX_FILE) if updates else None
    staged = staging_file(out.fs, out.join(name))
    bigindex.relative_lists(index)
    faiss.write_index(index, staged)
    commit_file(out.fs, staged, out.join(name))
    crash_point("index-written")  # test-only: the new index file written, index.json still the old one
    embedder = load_run(locate(fs.folder)).extra.get("embedder") if fs.folder else None
    commit_json(
        out.fs,
        out.join(META_FILE),
        {
            "featpipe_version": __version__,
            "index_key": layout.key,
            "why": layout.why,
            "plan": asdict(layout.plan) if layout.plan else None,
            "storage": "ondisk" if layout.plan and layout.plan.ondisk else "memory",
            "n": fs.n,
            "dim": fs.dim,
            "metric": "inner product of L2-normalised vectors (cosine)",
            "search_parameter": tuned.param,
            "value": tuned.value,
            "rerank_factor": tuned.factor,
            "estimated_recall_at_10": round(tuned.recall, 4),
            "features": fs.where,
            "features_fingerprint": fs.fingerprint,
            "embedder": embedder,
            "generation": _generation(fs),
            "removed": fs.removed_digest,  # rows removed from the source by then, taken out unless held
            "file": name,
            **extra,
        },
    )
    for old in (before, before and bigindex.ivfdata_name(before)):
        if old and old != name and out.fs.exists(out.join(old)):
            out.fs.rm_file(out.join(old))


def _write_names(out, fs: FeatureSet) -> None:
    """ids.parquet (row, key, path: for other tools) and rows/ (read by row, looked up by name:
    for query and serve), in one pass over the chunks, a shard at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    staged = staging_file(out.fs, out.join(IDS_FILE))
    schema = pa.schema([("row", pa.int64()), ("key", pa.string()), ("path", pa.string())])
    with pq.ParquetWriter(staged, schema, compression="zstd") as writer:

        def blocks():
            row = 0
            for block in rowmeta.row_blocks(fs):
                count = len(block["key"])
                rows = pa.array(np.arange(row, row + count), pa.int64())
                names = [pa.array(block[f], pa.string()) for f in ("key", "path")]
                writer.write_table(pa.table([rows, *names], schema=schema))
                row += count
                yield block

        rowmeta.write(out, fs, blocks())
    commit_file(out.fs, staged, out.join(IDS_FILE))


def _generation(fs: FeatureSet) -> int | None:
    """The newest pack listing whose shards the features hold (pack --relist adds generations)."""
    if not fs.folder:
        return None
    return max((s.generation for s in load_run(locate(fs.folder)).shards), default=0)


def summary(meta: dict, index: str) -> str:
    tuned = f", {meta['search_parameter']} {meta['value']}" if meta["search_parameter"] else ""
    if meta.get("rerank_factor", 1) > 1:
        tuned += f", {meta['rerank_factor']}× candidates re-ranked exactly"
    if meta.get("storage") == "ondisk":
        tuned += ", lists on disk"
    return (
        f"{meta['index_key']} index of {meta['n']} × {meta['dim']} vectors{tuned}, estimated recall@10 "
        f"{meta['estimated_recall_at_10']} → {index}"
    )
