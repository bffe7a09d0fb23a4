"""`featpipe match FEATURES OUT --update` (and so `dedup --update`): the neighbours of features that
grew (extract after `pack --relist`) from those already in OUT, searching only what changed.

The earlier rows must be unchanged (their fingerprint is checked); rows may have been added at the
end and rows may have been removed (OUT/removed.json of the extract). Then, exactly:
- a new row is searched against every row;
- an earlier row whose list named a row removed since is searched again against every row;
- every other earlier row keeps its list, merged with its best candidates among the new rows only:
  an earlier row outside its old list scored at most its old k-th, and a new row scoring the same
  sorts after it (higher row number), so the merge is the exact top k; ties among new rows at the
  k-th score are gathered by a scan of the new rows.
The result equals a full rerun byte for byte (test), at the cost of (new rows × all rows) +
(earlier rows × new rows) instead of all × all. The IVF method is not updated: its lists were
trained on the earlier rows; --update reruns it whole and says so.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError
from pipeline.retrieve.features import FeatureSet
from pipeline.retrieve.knn import (
    CANDIDATE_MARGIN,
    NO_MATCH,
    ExactSearch,
    Tiling,
    finish_rows,
    normalize,
)


def check_growth(fs: FeatureSet, old: dict, new: dict) -> str | None:
    """Why OUT's match cannot be updated to `new` (None: it can)."""
    for key in ("dim", "k", "exclude_self", "method"):
        if old.get(key) != new.get(key):
            return f"its {key} was {old.get(key)}, now {new.get(key)}"
    if old["method"] != "exact":
        return "an IVF match is not updated (its lists were trained on the earlier rows)"
    if old["n"] > fs.n or fs.prefix_fingerprint(old["n"]) != old["features"]:
        return "its features are not the first rows of these (rows changed, not only added)"
    return None


def neighbours(
    fs: FeatureSet, old: dict, old_m: np.ndarray, valid: np.ndarray, tiling: Tiling, k: int, self_match: str
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every row's k neighbours for the grown features, from the earlier ones (old_m: the earlier
    rows' lists); returns (matches uint32, scores float32, counts of what was searched)."""
    n0 = old["n"]
    gone = np.zeros(fs.n, bool)
    gone[np.setdiff1d(fs.removed, old.get("removed_rows", []))] = True
    listed = old_m != NO_MATCH
    touched = (gone[np.where(listed, old_m, 0).astype(np.int64)] & listed).any(axis=1)
    redo = np.flatnonzero(valid[:n0] & touched)
    merge = np.flatnonzero(valid[:n0] & ~touched)
    added = np.flatnonzero(valid[n0:]) + n0
    matches = np.full((fs.n, k), NO_MATCH, np.uint32)
    scores = np.full((fs.n, k), np.nan, np.float32)
    everything = ExactSearch(fs, valid, tiling)
    count = k + 1 + CANDIDATE_MARGIN
    for rows in _blocks(np.concatenate([redo, added]), tiling.query_rows):
        q = fs.take(rows)
        cand = everything.candidates(normalize(q), count)
        matches[rows], scores[rows] = finish_rows(fs, rows, q, cand, k, self_match, everything)
    if len(merge):
        new_only = ExactSearch(fs, valid & (np.arange(fs.n) >= n0), tiling)
        for rows in _blocks(merge, tiling.query_rows):
            q = fs.take(rows)
            known = np.where(old_m[rows] != NO_MATCH, old_m[rows].astype(np.int64), -1)
            cand = new_only.candidates(normalize(q), count)  # none (-1) when no row was added
            matches[rows], scores[rows] = finish_rows(fs, rows, q, cand, k, self_match, new_only, known)
    counts = {"added_rows": len(added), "researched_rows": len(redo), "merged_rows": len(merge)}
    counts["removed_since"] = int(gone.sum())
    return matches, scores, counts


def _blocks(rows: np.ndarray, size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def refuse(why: str, out: str) -> UserError:
    return UserError(f"{out}: cannot --update its match: {why}; run without --update and with --overwrite")
