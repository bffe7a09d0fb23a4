"""k nearest neighbours by cosine similarity, in tiles: a block of queries against the database in
blocks, with a running top-k merge, so memory is bounded by the tile sizes whatever N is.

Candidates come from a fast product (faiss's BLAS inner products on the CPU, torch on a GPU, where
fp16 products are fine for finding candidates); the scores written are always recomputed exactly
(vectors normalised and multiplied in float64) and the neighbours sorted by (score desc, row asc),
so the output bytes do not depend on BLAS blocking, thread counts, devices or how the work was
split. Where the candidate list may have been cut inside a run of (near-)equal scores, the exact
search gathers every row within the fast product's error of the k-th score before sorting, so ties
are settled by row number, never by which tile or thread saw a row first.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError
from pipeline.retrieve import load_faiss
from pipeline.retrieve.features import FeatureSet
from pipeline.units import format_bytes

NO_MATCH = np.iinfo(np.uint32).max  # a neighbour slot with no vector (an invalid row, or k > valid rows)
CANDIDATE_MARGIN = 2  # extra candidates per query, so near-ties are settled by the exact scores
_RESCORE_ROWS = 256  # queries re-scored at a time: (256 × k × D) float64 stays a few MB
_SCAN_ROWS = 1 << 16  # rows per block of a validity scan
# How far a fast candidate score may be from the exact cosine. float32 BLAS products of unit vectors
# are off by ~1e-6 at D = 1024. fp16 products (a GPU's): each input rounded to fp16 (unit roundoff
# u = 2^-11) moves q·d by at most 2u·Σ|q_i d_i| ≤ 2u for unit vectors (Cauchy-Schwarz), fp32
# accumulation adds at most D·2^-24 (6e-5 at D = 1024), the fp16 output rounding u·|s| ≤ u: 3u +
# 6e-5 = 1.53e-3 in all. A query whose last candidate scores within this of its k-th exact score may
# have more rows tied at the boundary than the list holds: those are gathered (`ExactSearch.within`,
# on the same device as the candidates, so a GPU match never falls back to CPU scans).
FAST_SCORE_ERROR = {"cpu": 1e-4, "fp16": 3 * 2**-11 + 6.2e-5}
_DEVICE_SHARE = 0.5  # of the device memory free when a search starts: the rest is left to others


@dataclass(frozen=True)
class Tiling:
    query_rows: int  # queries per block: the unit of commit, resume and rank split
    db_rows: int  # database rows per tile

    @property
    def settings(self) -> dict:
        return {"query_rows": self.query_rows}


@dataclass(frozen=True)
class Candidates:
    """Per query, up to `count` rows from a fast search and their fast scores (-1 / -inf where none)."""

    scores: np.ndarray  # float32 (Q, count)
    ids: np.ndarray  # int64 (Q, count)


def plan_tiles(n: int, dim: int, k: int, budget: int) -> Tiling:
    """Half the budget for a database tile, a quarter for the query block and its candidates (the
    rest is for faiss's own 16 MB distance buffer and the merge)."""
    if dim < 1:
        raise UserError("the features have 0 dimensions: nothing to compare")
    row_bytes = dim * 4
    query_row_bytes = row_bytes + (k + CANDIDATE_MARGIN) * 2 * 12
    db_rows = min(n, budget // 2 // row_bytes)
    query_rows = min(n, budget // 4 // query_row_bytes, 65536)
    if db_rows < min(n, 1024) or query_rows < min(n, 64):
        need = max(2 * min(n, 1024) * row_bytes, 4 * min(n, 64) * query_row_bytes)
        unit = 10 ** (len(str(need)) - 2)
        need = math.ceil(need / unit) * unit  # two digits, rounded up: the printed figure is enough
        raise UserError(
            f"--memory-budget {format_bytes(budget)} is too small for one tile of {dim}-dim vectors "
            f"with k = {k}; give at least {format_bytes(need)}"
        )
    return Tiling(max(1, query_rows), max(1, db_rows))


def device_query_rows(db_rows: int, held: int, free: int, elem: int = 2) -> int:
    """Queries per product on a device: the (rows × db_rows) score block and topk's copy of it fit
    beside the `held` bytes (the database on the device, the query block) in `_DEVICE_SHARE` of the
    `free` bytes. Sized by the device, never by the host budget: 65,536 × 651,041 fp16 scores are
    85 GB. Raises where not even one row fits."""
    room = int(free * _DEVICE_SHARE) - held
    rows = room // (2 * db_rows * elem)
    if rows < 1:
        raise UserError(
            f"a database tile of {db_rows} rows needs {format_bytes(held + 2 * db_rows * elem)} of device memory; "
            f"{format_bytes(int(free * _DEVICE_SHARE))} is available: give a smaller --memory-budget"
        )
    return int(rows)


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows (faiss.normalize_L2's arithmetic), for the fast search; zero rows stay zero."""
    return x / _divisors(x)


def _divisors(x: np.ndarray) -> np.ndarray:
    """Each row's float32 L2 norm as a column, 1 for a zero row (which then stays zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return np.where(norms > 0, norms, 1)[:, None]


def valid_block(fs: FeatureSet, start: int, stop: int, ids: np.ndarray) -> np.ndarray:
    """The valid rows `ids` of [start, stop), L2-normalised float32 as `normalize` makes them, with
    a single float32 array: picked only when some row is not valid and divided in place. A new
    array at each step had held three copies of a tile, 1.5 GB for the 0.5 GB tile of a 1 GB
    budget."""
    x = fs.read(start, stop)
    if len(ids) != stop - start:
        x = x[ids - start]
    x /= _divisors(x)
    return x


def normalize64(x: np.ndarray) -> np.ndarray:
    """L2-normalised float64 rows, for exact scores: a vector scores exactly 1.0 with itself once
    rounded to float32 (normalised in float32 it scored 0.99999994); zero rows stay zero."""
    x = np.asarray(x, np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.where(norms > 0, norms, 1)[:, None]


def cosines(q: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """Exact scores of one float64-normalised query against rows: einsum's own loop, so a row's
    score does not depend on where it sits (BLAS's matrix-vector product gave identical rows
    scores an ulp apart when one fell in its tail block)."""
    return np.einsum("d,kd->k", q, vecs)


def valid_rows(fs: FeatureSet, block: int) -> np.ndarray:
    """True for rows that can be matched: finite, not all zero, and not removed from the source."""
    ok = np.empty(fs.n, bool)
    block = min(block, _SCAN_ROWS)  # a scan: small blocks cost nothing (a tile of 1M rows held 1.4 GB here)
    for start in range(0, fs.n, block):
        x = fs.read(start, min(start + block, fs.n))
        ok[start : start + len(x)] = np.isfinite(x).all(axis=1) & x.any(axis=1)
    ok[fs.removed] = False
    return ok


class ExactSearch:
    """Every database tile against a block of queries: faiss on the CPU; torch on a GPU (fp16), or
    on the CPU with `half` (the GPU's arithmetic, for tests)."""

    def __init__(self, fs: FeatureSet, valid: np.ndarray, tiling: Tiling, device: str = "cpu", half: bool = False):
        self.fs, self.valid, self.tiling, self.device = fs, valid, tiling, device
        self.torch = device != "cpu" or half
        self.half = half or device.startswith("cuda")
        self.error = FAST_SCORE_ERROR["fp16" if self.half else "cpu"]
        self._resident: dict[int, object] = {}  # database tiles kept on the GPU when they all fit
        self._last: tuple[int | None, object] = (None, None)  # the tile in use, when not all are kept

    def candidates(self, queries: np.ndarray, count: int) -> Candidates:
        """Up to `count` most similar valid rows per query (normalised float32 queries)."""
        best_s = np.full((len(queries), count), -np.inf, np.float32)
        best_i = np.full((len(queries), count), -1, np.int64)
        for start, stop, ids in self._tiles():
            s, i = self._tile(queries, start, stop, ids, min(count, len(ids)))
            best_s, best_i = _merge(best_s, best_i, s, ids[i], count)
        return Candidates(best_s, best_i)

    def within(self, queries: np.ndarray, floors: np.ndarray) -> list[np.ndarray]:
        """Per query, every valid row whose fast score reaches its floor (all of a run of ties,
        however long), with the arithmetic of `candidates`, on its device. Queries go a few at a
        time: their score rows stay under the database tile."""
        found: list[list[np.ndarray]] = [[] for _ in queries]
        for start, stop, ids in self._tiles():
            if self.torch:
                hits = self._within_torch(queries, floors, start, stop, ids)
            else:
                db = valid_block(self.fs, start, stop, ids)
                step = max(1, self.fs.dim // 2)
                hits = (
                    row
                    for q0 in range(0, len(queries), step)
                    for row in (queries[q0 : q0 + step] @ db.T) >= floors[q0 : q0 + step, None]
                )
            for j, row in enumerate(hits):
                found[j].append(ids[row])
        return [np.concatenate(f) if f else np.zeros(0, np.int64) for f in found]

    def _tiles(self):
        for start in range(0, self.fs.n, self.tiling.db_rows):
            stop = min(start + self.tiling.db_rows, self.fs.n)
            ids = np.flatnonzero(self.valid[start:stop]) + start
            if len(ids):
                yield start, stop, ids

    def _tile(
        self, queries: np.ndarray, start: int, stop: int, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.torch:
            faiss = load_faiss()

            db = valid_block(self.fs, start, stop, ids)
            s, i = faiss.knn(queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)
            return s, i
        out_s, out_i = [], []
        for q, _ in self._blocks(queries, start, stop, ids):
            # topk on the fp16 scores themselves: a .float() copy of the block doubled its memory
            s, i = (q @ self._db(start, stop, ids).T).topk(k, dim=1)
            out_s.append(s.float().cpu().numpy())
            out_i.append(i.cpu().numpy())
        return np.concatenate(out_s), np.concatenate(out_i)

    def _within_torch(self, queries: np.ndarray, floors: np.ndarray, start: int, stop: int, ids: np.ndarray):
        import torch

        for q, q0 in self._blocks(queries, start, stop, ids):
            floor = torch.from_numpy(floors[q0 : q0 + len(q)]).to(q.device)
            above = ((q @ self._db(start, stop, ids).T).float() >= floor[:, None]).cpu().numpy()
            yield from above

    def _blocks(self, queries: np.ndarray, start: int, stop: int, ids: np.ndarray):
        """The queries on the device in blocks whose score matrix fits it (`device_query_rows`)."""
        import torch

        dtype = self._dtype
        elem = dtype.itemsize
        db = self._db(start, stop, ids)
        held = sum(t.numel() for t in self._resident.values()) * elem + (0 if self._resident else db.numel() * elem)
        rows = device_query_rows(len(ids), held + queries.nbytes, _free(self.device), elem)
        for q0 in range(0, len(queries), rows):
            yield torch.from_numpy(queries[q0 : q0 + rows]).to(self.device, dtype), q0

    @property
    def _dtype(self):
        import torch

        return torch.float16 if self.half else torch.float32

    def _db(self, start: int, stop: int, ids: np.ndarray):
        """A database tile on the device: all of them stay there when they fit half its free memory."""
        import torch

        db = self._resident.get(start)
        if db is None and self._last[0] == start:
            db = self._last[1]
        if db is None:
            db = torch.from_numpy(valid_block(self.fs, start, stop, ids)).to(self.device, self._dtype)
            if self.fs.n * self.fs.dim * 2 < _gpu_room(self.device):
                self._resident[start] = db
            self._last = (start, db)
        return db


def _free(device: str) -> int:
    """Free bytes of the device's memory (the CPU's for the CPU: what a test of this path has)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gpu_room(device: str) -> int:
    """Bytes of GPU memory the resident database may take: half of what is free now."""
    return _free(device) // 2 if device.startswith("cuda") else 0


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
    fs: FeatureSet,
    query_ids: np.ndarray,
    queries: np.ndarray,
    cand: Candidates,
    k: int,
    self_match: str,
    exact: ExactSearch | None = None,
    known: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for the candidates of `queries` (raw rows, any scale), sorted by (score desc,
    row asc), the query itself placed by identity: `self_match` is "first" (feature-matcher's
    layout: the vector itself at rank 0), "exclude" (never listed) or "keep" (a query from outside
    the set). With `exact`, rows tied at the k-th score beyond the candidate list are gathered, so
    the result is the exact top k whatever the list's cut. `known` (int64, -1 = none): rows ranked
    besides the candidates, an earlier exact result over rows `exact` does not search (match
    --update: the old rows' lists, the new rows' candidates). Returns (ids uint32, scores float32),
    NO_MATCH / NaN where fewer than k neighbours exist."""
    n = len(query_ids)
    out_i = np.full((n, k), NO_MATCH, np.uint32)
    out_s = np.full((n, k), np.nan, np.float32)
    need = k - 1 if self_match == "first" else k  # neighbours besides the query itself
    for start in range(0, n, _RESCORE_ROWS):
        stop = min(start + _RESCORE_ROWS, n)
        qid, q = query_ids[start:stop], normalize64(queries[start:stop])
        kept = known[start:stop] if known is not None else np.zeros((stop - start, 0), np.int64)
        ids, scores = ranked(fs, q, np.concatenate([kept, cand.ids[start:stop]], axis=1), qid, self_match)
        if exact is not None and need > 0:
            fast = cand.scores[start:stop]
            ids, scores = _settle_ties(fs, exact, q, qid, fast, ids, scores, need, self_match, kept)
        if self_match == "first":
            ids = np.concatenate([qid[:, None], ids], axis=1)
            scores = np.concatenate([np.einsum("qd,qd->q", q, q)[:, None], scores], axis=1)
        width = min(k, ids.shape[1])
        found = ids[:, :width] >= 0
        out_i[start:stop, :width] = np.where(found, ids[:, :width], NO_MATCH)
        out_s[start:stop, :width] = np.where(found, scores[:, :width], np.nan)
    return out_i, out_s


def ranked(
    fs: FeatureSet, q: np.ndarray, ids: np.ndarray, qid: np.ndarray, self_match: str
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (-1 = none) with exact float64 scores, by (score desc, row asc); the query's own
    row dropped unless `self_match` is "keep"."""
    if self_match != "keep":
        ids = np.where(ids == qid[:, None], -1, ids)  # by identity, not by position
    vecs = normalize64(fs.take(np.where(ids >= 0, ids, 0).reshape(-1))).reshape(*ids.shape, fs.dim)
    scores = np.where(ids >= 0, np.einsum("qd,qkd->qk", q, vecs), -np.inf)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def _settle_ties(
    fs: FeatureSet,
    exact: ExactSearch,
    q: np.ndarray,
    qid: np.ndarray,
    fast: np.ndarray,
    ids: np.ndarray,
    scores: np.ndarray,
    need: int,
    self_match: str,
    kept: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows left out of a full candidate list score at most its last fast score, so when that is
    more than the fast error below the `need`-th exact score, nothing tied was cut. Otherwise every
    row within the error of that score is gathered by a scan and all are ranked exactly, with the
    `kept` rows (found outside the scan's rows)."""
    kth = scores[:, need - 1]
    full = np.isfinite(fast).all(axis=1)
    unsure = np.flatnonzero(full & np.isfinite(kth) & (fast.min(axis=1, initial=np.inf) >= kth - exact.error))
    if not len(unsure):
        return ids, scores
    floors = (kth[unsure] - exact.error).astype(np.float32)
    gathered = [
        np.concatenate([kept[j][kept[j] >= 0], rows])
        for j, rows in zip(unsure, exact.within(q[unsure].astype(np.float32), floors), strict=True)
    ]
    width = max(ids.shape[1], *(len(g) for g in gathered))
    wide = np.full((len(ids), width), -1, np.int64)
    wide[:, : ids.shape[1]] = ids
    for j, rows in zip(unsure, gathered, strict=True):
        wide[j, : len(rows)] = rows
        wide[j, len(rows) :] = -1
    return ranked(fs, q, wide, qid, self_match)
