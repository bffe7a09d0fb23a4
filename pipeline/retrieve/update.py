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
(earlier rows × new rows) instead of all × all. It goes in the new plan's query blocks, split
across torchrun ranks as a full match's are. The IVF method is not updated: its lists were
trained on the earlier rows; --update reruns it whole and says so.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError
from pipeline.retrieve.features import FeatureSet, removed_count
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


class Updater:
    """The grown match one query block at a time (blocks of the new plan, so torchrun ranks split
    them as a full match's, and a killed update resumes from the blocks it committed)."""

    def __init__(self, fs: FeatureSet, old: dict, old_m: np.ndarray, valid: np.ndarray, tiling: Tiling, k: int):
        n0 = old["n"]
        gone = np.zeros(fs.n, bool)  # rows removed before the earlier match are in no earlier list
        gone[fs.removed] = True
        listed = old_m != NO_MATCH
        touched = np.zeros(fs.n, bool)
        touched[:n0] = (gone[np.where(listed, old_m, 0).astype(np.int64)] & listed).any(axis=1)
        earlier = np.arange(fs.n) < n0
        self.search_all = valid & (touched | ~earlier)  # new rows, and rows that lost a neighbour
        self.merge = valid & earlier & ~touched  # the rest: their lists merged with the new rows
        self.fs, self.old_m, self.k = fs, old_m, k
        self.everything = ExactSearch(fs, valid, tiling)
        self.new_only = ExactSearch(fs, valid & ~earlier, tiling)  # searches nothing when no row was added
        self.counts = {
            "added_rows": int((valid & ~earlier).sum()),
            "researched_rows": int((valid & touched).sum()),
            "merged_rows": int(self.merge.sum()),
            "removed_since": len(fs.removed) - removed_count(old),
        }

    def block(self, start: int, stop: int, self_match: str) -> tuple[np.ndarray, np.ndarray]:
        """Rows start..stop's k neighbours (uint32, float32; NO_MATCH/NaN for invalid rows)."""
        matches = np.full((stop - start, self.k), NO_MATCH, np.uint32)
        scores = np.full((stop - start, self.k), np.nan, np.float32)
        rows, vectors, count = np.arange(start, stop), self.fs.read(start, stop), self.k + 1 + CANDIDATE_MARGIN
        for which, search in ((self.search_all[start:stop], self.everything), (self.merge[start:stop], self.new_only)):
            if not which.any():
                continue
            ids, q = rows[which], vectors[which]
            known = None
            if search is self.new_only:
                old = self.old_m[ids]
                known = np.where(old != NO_MATCH, old.astype(np.int64), -1)
            cand = search.candidates(normalize(q), count)
            matches[which], scores[which] = finish_rows(self.fs, ids, q, cand, self.k, self_match, search, known)
        return matches, scores


def refuse(why: str, out: str) -> UserError:
    return UserError(f"{out}: cannot --update its match: {why}; run without --update and with --overwrite")
