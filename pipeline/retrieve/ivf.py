"""An inverted-file index (faiss IVF) for when the exact all-vs-all work is too large: nlist from
N, nprobe tuned on a sample of queries against exact results until recall@k reaches the target."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.retrieve import load_faiss
from pipeline.retrieve.features import FeatureSet
from pipeline.retrieve.knn import ExactSearch, Tiling, normalize

log = logging.getLogger("featpipe")

RECALL_TARGET = 0.95
TUNE_QUERIES = 1000
SEED = 1234


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


def train_sample(valid_ids: np.ndarray, nlist: int) -> np.ndarray:
    """Rows to train the coarse quantiser on: a fixed-seed sample, sorted (faiss wants 39–256 per
    list; 64 keeps the training a small part of the run)."""
    size = min(len(valid_ids), 64 * nlist)
    rng = np.random.default_rng(SEED)
    return np.sort(rng.choice(valid_ids, size, replace=False))


def build(fs: FeatureSet, valid: np.ndarray, choice: IvfChoice, block: int):
    faiss = load_faiss()

    valid_ids = np.flatnonzero(valid)
    index = faiss.index_factory(fs.dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = SEED
    index.train(normalize(fs.take(train_sample(valid_ids, choice.nlist))))
    for start in range(0, fs.n, block):
        stop = min(start + block, fs.n)
        ids = np.flatnonzero(valid[start:stop]) + start
        if len(ids):
            index.add_with_ids(normalize(fs.read(start, stop)[ids - start]), ids.astype(np.int64))
    return index


def tune(index, fs: FeatureSet, valid: np.ndarray, tiling: Tiling, k: int) -> tuple[int, float]:
    """The smallest nprobe (a power of two) whose recall@k on a sample of queries, against exact
    search, reaches the target; returns (nprobe, the recall measured)."""
    valid_ids = np.flatnonzero(valid)
    rng = np.random.default_rng(SEED + 1)
    sample = np.sort(rng.choice(valid_ids, min(TUNE_QUERIES, len(valid_ids)), replace=False))
    queries = normalize(fs.take(sample))
    truth = ExactSearch(fs, valid, tiling).candidates(queries, k)
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = recall_at(found, truth)
        log.debug("nprobe %d: recall@%d %.4f", nprobe, k, recall)
        if recall >= RECALL_TARGET or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, index.nlist)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """The share of the true neighbours (ignoring empty slots) that were found."""
    hits = total = 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f, t))
        total += len(t)
    return hits / total if total else 1.0
