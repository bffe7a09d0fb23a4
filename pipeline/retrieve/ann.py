"""Approximate nearest-neighbour indexes (faiss IVF, HNSW, …), one way for `match` and `index`:
choose an IVF layout from N and the memory budget, build any index from FEATURES a block at a time,
and tune its search parameter (nprobe or efSearch) on sampled queries against exact results until
recall@k reaches the target."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError, first_line
from pipeline.retrieve import load_faiss, ondisk
from pipeline.retrieve.features import FeatureSet
from pipeline.retrieve.knn import Candidates, ExactSearch, Tiling, normalize, normalize64, ranked, valid_block

log = logging.getLogger("featpipe")

RECALL_TARGET = 0.95
TUNE_QUERIES = 1000
SEED = 1234
_SAMPLE_BLOCK = 1 << 20  # rows of the validity mask turned into row numbers at a time (8 MB)


@dataclass(frozen=True)
class IvfChoice:
    nlist: int
    code: str  # "Flat", or "SQ8" when full vectors would not fit the memory budget

    @property
    def factory(self) -> str:
        return f"IVF{self.nlist},{self.code}"


def choose(n: int, dim: int, budget: int) -> IvfChoice:
    """nlist ≈ √N as a power of two, with at least 39 training points per list (faiss's minimum);
    full vectors (Flat) when they take under half the budget, 8-bit scalar codes (4× smaller) else.
    (autofaiss takes 4·√N to 16·√N lists for GPU-sized jobs; on CPUs the k-means training then
    dominates: 800k × 384 with 4096 lists is minutes on 2 cores, with 1024 about ten seconds.)"""
    nlist = 1 << max(4, round(np.log2(np.sqrt(max(n, 1)))))
    nlist = max(1, min(nlist, n // 39, 65536))
    return IvfChoice(nlist, "Flat" if n * dim * 4 <= budget // 2 else "SQ8")


def train_sample(valid: np.ndarray, nlist: int) -> np.ndarray:
    """Rows to train the coarse quantiser on: a fixed-seed sample, sorted (faiss wants 39–256 per
    list; 64 keeps the training a small part of the run)."""
    return valid_sample(valid, 64 * nlist, SEED)


def valid_sample(valid: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` valid rows drawn without replacement (all when fewer), sorted: the rows that
    rng.choice(np.flatnonzero(valid)) draws, found a block at a time, for that array of every valid
    row would take 8 bytes a row (400 MB at 50M rows, 8 GB at 1B)."""
    count = int(np.count_nonzero(valid))
    picks = np.sort(np.random.default_rng(seed).choice(count, min(size, count), replace=False))
    rows, seen = np.empty(len(picks), np.int64), 0  # seen: valid rows before the block
    for start in range(0, len(valid), _SAMPLE_BLOCK):
        ids = np.flatnonzero(valid[start : start + _SAMPLE_BLOCK])
        lo, hi = np.searchsorted(picks, [seen, seen + len(ids)])
        rows[lo:hi] = ids[picks[lo:hi] - seen] + start
        seen += len(ids)
    return rows


def build(fs: FeatureSet, valid: np.ndarray, key: str, block: int, progress: bool = False):
    """A faiss index of the valid rows, ids = row numbers: trained on a fixed-seed sample when the
    layout needs training, filled a block at a time. Raises UserError for a bad description, a
    layout the data cannot fill, or no usable vector."""
    from tqdm.auto import tqdm

    faiss = load_faiss()
    usable = int(np.count_nonzero(valid))
    if not usable:
        raise UserError(f"{fs.source}: no usable vectors to index (every row is NaN, infinite or all zero)")
    try:
        index = faiss.index_factory(fs.dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UserError(f"{key!r} is not a faiss index description: {faiss_message(exc)}") from None
    ivf = faiss.extract_index_ivf(index) if "IVF" in key else None
    if ivf is not None:
        ivf.cp.seed = SEED
        if ivf.nlist > usable:
            raise UserError(
                f"{key!r} has {ivf.nlist} lists to train but {fs.source} holds {usable} usable vectors "
                f"(faiss wants at least 39 per list): use IVF{max(1, usable // 39)},… or auto"
            )
    try:
        if not index.is_trained:
            index.train(normalize(fs.take(train_sample(valid, ivf.nlist if ivf else 256))))
        if not isinstance(index, faiss.IndexIDMap) and ivf is None:  # only IVF indexes keep ids of their own
            index = faiss.IndexIDMap2(index)
        for start in tqdm(range(0, fs.n, block), unit="block", desc="index", disable=not progress):
            stop = min(start + block, fs.n)
            ids = np.flatnonzero(valid[start:stop]) + start
            if len(ids):
                index.add_with_ids(valid_block(fs, start, stop, ids), ids.astype(np.int64))
    except RuntimeError as exc:
        raise UserError(f"{key!r}: faiss cannot build it from these vectors: {faiss_message(exc)}") from None
    return index


def faiss_message(exc: BaseException) -> str:
    """faiss's C++ message without its source location ("Error in … at file.cpp:275: Error: 'x' failed: …")."""
    text = first_line(exc)
    return text.rsplit("failed: ", 1)[-1].split(" at /", 1)[0] if "Error" in text else text


def _core(index):
    """The index under its id map and pre-transforms (OPQ, PCA: `--index-key OPQ64,IVF…`)."""
    faiss = load_faiss()
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def search_parameter(index) -> str | None:
    faiss = load_faiss()
    if isinstance(_core(index), faiss.IndexHNSW):
        return "efSearch"
    return "nprobe" if faiss.try_extract_index_ivf(index) is not None else None


def set_search_parameter(index, name: str | None, value: int | None) -> None:
    faiss = load_faiss()
    if name == "efSearch":
        _core(index).hnsw.efSearch = value
    elif name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value


MAX_FACTOR = 64  # candidates re-ranked per neighbour wanted, at most
# Tuning stops doubling when no move gains this much recall. Without it an unreachable target
# (16-byte codes of 50M clustered 64-d rows: 0.676) sent nprobe to every list and the factor to
# its maximum, so each query read the whole 1.2 GB of on-disk lists (query peak RSS 506 MB).
MIN_GAIN = 0.002


@dataclass(frozen=True)
class Tuning:
    param: str | None  # "nprobe", "efSearch", or None for an exact index
    value: int | None
    recall: float
    factor: int = 1  # k × factor candidates re-ranked exactly (indexes of lossy codes: PQ)


def tune_queries(fs: FeatureSet, valid: np.ndarray) -> np.ndarray:
    """The sampled rows tuning measures recall on (a fixed seed: the same rows on every rank)."""
    return normalize(fs.take(valid_sample(valid, TUNE_QUERIES, SEED + 1)))


def tune(
    index,
    fs: FeatureSet,
    valid: np.ndarray,
    tiling: Tiling,
    k: int,
    rerank: bool = False,
    truth: tuple[np.ndarray, Candidates] | None = None,
) -> Tuning:
    """The smallest efSearch / nprobe (doubling) whose recall@k on sampled queries, against exact
    search, reaches the target. With `rerank` (codes too lossy to rank by: PQ), recall is measured
    after re-ranking k × factor candidates by exact cosine, and each step doubles whichever of
    nprobe and the factor gains more recall (both cost about the same per query). `truth`: the
    queries and their exact top k when computed elsewhere (split across ranks). The index is left
    set to the value found."""
    name = search_parameter(index)
    k = min(k, int(valid.sum()))
    exact = ExactSearch(fs, valid, tiling)
    if truth is None:
        queries = tune_queries(fs, valid)
        truth = queries, exact.candidates(queries, k)
    queries, truth = truth
    limit = 4096 if name == "efSearch" else 1
    if name == "nprobe":
        limit = load_faiss().extract_index_ivf(index).nlist
    seen: dict[tuple[int, int], float] = {}

    def recall(value: int, factor: int) -> float:
        if (value, factor) not in seen:
            set_search_parameter(index, name, value)
            found = ondisk.search(index, queries, k * factor)[1]
            found = reranked(fs, queries, found, k) if factor > 1 else found
            seen[value, factor] = recall_at(fs, queries, found, truth, exact.error)
            log.debug("%s %s, factor %d: recall@%d %.4f", name or "exact", value, factor, k, seen[value, factor])
        return seen[value, factor]

    value, factor = (16 if name == "efSearch" else 1), (4 if rerank else 1)
    while recall(value, factor) < RECALL_TARGET and name is not None:
        moves = [(min(value * 2, limit), factor)] if value < limit else []
        moves += [(value, factor * 2)] if rerank and factor < MAX_FACTOR else []
        if not moves:
            break
        best = max(moves, key=lambda m: recall(*m))  # a tie goes to nprobe: listed first
        if recall(*best) - recall(value, factor) < MIN_GAIN:
            log.info(
                "recall@%d stays near %.3f however far %s and the re-ranking grow: the target %.2f is out of reach "
                "of these codes; kept %s %d (more would make every query slower for nothing)",
                k, recall(value, factor), name, RECALL_TARGET, name, value,
            )  # fmt: skip
            break
        value, factor = best
    set_search_parameter(index, name, value)
    return Tuning(name, value if name else None, recall(value, factor), factor)


def reranked(fs: FeatureSet, queries: np.ndarray, found: np.ndarray, k: int) -> np.ndarray:
    """Each query's top k of its candidates (-1 = none) by exact cosine (knn.ranked, featpipe's
    one exact re-scoring), 64 queries at a time (64 × 640 candidates × 384 dims in float64 is 126 MB)."""
    out = np.full((len(found), k), -1, np.int64)
    for start in range(0, len(found), 64):
        q = normalize64(queries[start : start + 64])
        ids, _ = ranked(fs, q, found[start : start + 64], np.full(len(q), -1), "keep")
        out[start : start + 64] = ids[:, :k]
    return out


def recall_at(fs: FeatureSet, queries: np.ndarray, found: np.ndarray, truth: Candidates, error: float) -> float:
    """The share of the true top k that was found, tie-aware: a found row counts when its exact
    cosine reaches the k-th true score (less the fast search's error), so a row scoring the same as
    a true neighbour in its place is no miss (on data with many equal vectors, exact ids never
    match, and nprobe was doubled up to nlist for nothing)."""
    hits = total = 0
    rows = np.where(found >= 0, found, 0)
    vecs = normalize64(fs.take(rows.reshape(-1))).reshape(*rows.shape, -1)
    scores = np.einsum("qd,qkd->qk", normalize64(queries), vecs)
    for f, s, t_ids, t_s in zip(found, scores, truth.ids, truth.scores, strict=True):
        wanted = int((t_ids >= 0).sum())
        if wanted:
            kth = t_s[t_ids >= 0].min()
            _, first = np.unique(f, return_index=True)  # a row found twice counts once
            good = [j for j in first if f[j] >= 0 and s[j] >= kth - error]
            hits += min(wanted, len(good))
            total += wanted
    return hits / total if total else 1.0


def on_device(index, device: str, nprobe: int | None = None):
    """The index cloned to this rank's GPU when faiss was built with GPU support (the faiss-gpu
    extra) and the device is CUDA; else the index itself. Each rank uses its own device (the
    number after cuda:). The search parameter is set on the clone (cloning does not carry it)."""
    faiss = load_faiss()
    if not device.startswith("cuda") or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    gpu = int(device.split(":", 1)[1]) if ":" in device else 0
    resources = faiss.StandardGpuResources()
    clone = faiss.index_cpu_to_gpu(resources, gpu % faiss.get_num_gpus(), index)
    clone.referenced_objects = [resources]  # faiss's way to keep the resources alive with the clone
    if nprobe is not None:
        faiss.GpuParameterSpace().set_index_parameter(clone, "nprobe", nprobe)
    log.info("faiss index on GPU %d", gpu)
    return clone


@dataclass(frozen=True)
class IndexSearch:
    """A faiss index as a source of candidates, like ExactSearch (approximate: rows tied with the
    last candidate beyond the index's list are not gathered)."""

    index: object
    floor: int = 0  # candidates asked for at least: 10 × the re-ranking factor of lossy codes (PQ)

    def candidates(self, queries: np.ndarray, count: int) -> Candidates:
        scores, ids = ondisk.search(self.index, queries, max(count, self.floor))
        return Candidates(np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids)
