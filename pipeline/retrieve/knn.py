"""k nearest neighbours by cosine similarity, in tiles: a block of queries against the database in
blocks, with a running top-k merge, so memory is bounded by the tile sizes whatever N is.

Candidates come from a fast product (faiss's BLAS inner products on the CPU, torch on a GPU, where
fp16 products are fine for finding candidates); the scores written are always recomputed exactly
(float64 sums of float32 products) and the neighbours sorted by (score desc, row asc), so the
output bytes do not depend on BLAS blocking, thread counts, devices or how the work was split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError
from pipeline.retrieve import load_faiss
from pipeline.retrieve.features import FeatureSet
from pipeline.units import format_bytes

NO_MATCH = np.iinfo(np.uint32).max  # a neighbour slot with no vector (an invalid row, or k > valid rows)
CANDIDATE_MARGIN = 2  # extra candidates per query, so near-ties are settled by the exact scores
_RESCORE_ROWS = 256  # queries re-scored at a time: (256 × k × D) float64 stays a few MB


@dataclass(frozen=True)
class Tiling:
    query_rows: int  # queries per block: the unit of commit, resume and rank split
    db_rows: int  # database rows per tile

    @property
    def settings(self) -> dict:
        return {"query_rows": self.query_rows}


def plan_tiles(n: int, dim: int, k: int, budget: int) -> Tiling:
    """Half the budget for a database tile, a quarter for the query block and its candidates (the
    rest is for faiss's own 16 MB distance buffer and the merge)."""
    row_bytes = dim * 4
    db_rows = min(n, budget // 2 // row_bytes)
    query_rows = min(n, budget // 4 // (row_bytes + (k + CANDIDATE_MARGIN) * 2 * 12), 65536)
    if db_rows < min(n, 1024) or query_rows < min(n, 64):
        need = (2 * min(n, 1024) + 4 * min(n, 64)) * row_bytes
        raise UserError(
            f"--memory-budget {format_bytes(budget)} is too small for one tile of {dim}-dim vectors; "
            f"give at least {format_bytes(need)}"
        )
    return Tiling(max(1, query_rows), max(1, db_rows))


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows (faiss.normalize_L2's arithmetic); zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return x / np.where(norms > 0, norms, 1)[:, None]


def valid_rows(fs: FeatureSet, block: int) -> np.ndarray:
    """True for rows that can be matched: finite and not all zero."""
    ok = np.empty(fs.n, bool)
    for start in range(0, fs.n, block):
        x = fs.read(start, min(start + block, fs.n))
        ok[start : start + len(x)] = np.isfinite(x).all(axis=1) & (np.abs(x).sum(axis=1) > 0)
    return ok


class ExactSearch:
    """Every database tile against a block of queries."""

    def __init__(self, fs: FeatureSet, valid: np.ndarray, tiling: Tiling, device: str = "cpu"):
        self.fs, self.valid, self.tiling, self.device = fs, valid, tiling, device
        self._resident: dict[int, object] = {}  # database tiles kept on the GPU when they all fit

    def candidates(self, queries: np.ndarray, count: int) -> np.ndarray:
        """Row ids (int64, -1 where none) of up to `count` most similar valid rows per query."""
        best_s = np.full((len(queries), count), -np.inf, np.float32)
        best_i = np.full((len(queries), count), -1, np.int64)
        for start in range(0, self.fs.n, self.tiling.db_rows):
            stop = min(start + self.tiling.db_rows, self.fs.n)
            ids = np.flatnonzero(self.valid[start:stop]) + start
            if not len(ids):
                continue
            s, i = self._tile(queries, start, stop, ids, min(count, len(ids)))
            best_s, best_i = _merge(best_s, best_i, s, ids[i], count)
        return best_i

    def _tile(
        self, queries: np.ndarray, start: int, stop: int, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.device == "cpu":
            faiss = load_faiss()

            db = normalize(self.fs.read(start, stop)[ids - start])
            s, i = faiss.knn(queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)
            return s, i
        return self._tile_torch(queries, start, stop, ids, k)

    def _tile_torch(
        self, queries: np.ndarray, start: int, stop: int, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        db = self._resident.get(start)
        if db is None:
            db = torch.from_numpy(normalize(self.fs.read(start, stop)[ids - start])).to(self.device, dtype)
            if self.fs.n * self.fs.dim * 2 < _gpu_room(self.device):
                self._resident[start] = db
        q = torch.from_numpy(queries).to(self.device, dtype)
        s, i = (q @ db.T).float().topk(k, dim=1)
        return s.cpu().numpy(), i.cpu().numpy()


def _gpu_room(device: str) -> int:
    """Bytes of GPU memory the resident database may take: half of what is free now."""
    import torch

    if not device.startswith("cuda"):
        return 0
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free // 2


def _merge(
    best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    s = np.where(i >= 0, s, -np.inf).astype(np.float32)
    all_s, all_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
    top = (
        np.argpartition(-all_s, count - 1, axis=1)[:, :count]
        if all_s.shape[1] > count
        else np.broadcast_to(np.arange(all_s.shape[1]), all_s.shape)
    )
    return np.take_along_axis(all_s, top, axis=1), np.take_along_axis(all_i, top, axis=1)


def finish_rows(
    fs: FeatureSet, query_ids: np.ndarray, queries: np.ndarray, cand: np.ndarray, k: int, self_match: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for the candidates, sorted by (score desc, row asc), the query itself placed by
    identity: `self_match` is "first" (feature-matcher's layout: the vector itself at rank 0),
    "exclude" (never listed) or "keep" (a query from outside the set). Returns (ids uint32, scores
    float32), NO_MATCH / NaN where fewer than k neighbours exist."""
    n = len(query_ids)
    out_i = np.full((n, k), NO_MATCH, np.uint32)
    out_s = np.full((n, k), np.nan, np.float32)
    for start in range(0, n, _RESCORE_ROWS):
        stop = min(start + _RESCORE_ROWS, n)
        ids = cand[start:stop]
        if self_match != "keep":
            ids = np.where(ids == query_ids[start:stop, None], -1, ids)  # by identity, not by position
        vecs = normalize(fs.take(np.where(ids >= 0, ids, 0).reshape(-1))).reshape(*ids.shape, fs.dim)
        q = queries[start:stop].astype(np.float64)
        scores = np.einsum("qd,qkd->qk", q, vecs.astype(np.float64))
        scores = np.where(ids >= 0, scores, -np.inf)
        order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=1)
        ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        if self_match == "first":
            self_s = np.einsum("qd,qd->q", q, q)
            ids = np.concatenate([query_ids[start:stop, None], ids], axis=1)
            scores = np.concatenate([self_s[:, None], scores], axis=1)
        width = min(k, ids.shape[1])
        found = ids[:, :width] >= 0
        out_i[start:stop, :width] = np.where(found, ids[:, :width], NO_MATCH)
        out_s[start:stop, :width] = np.where(found, scores[:, :width], np.nan)
    return out_i, out_s
