"""`featpipe dedup FEATURES OUT --threshold T`: near-duplicate groups from the kNN graph of
`featpipe match` (run into OUT first, so it is tiled, resumable and torchrun-split like match).

star (default): the largest image (then the first row) not yet grouped becomes a representative
and takes its neighbours at cosine ≥ T that are not grouped yet: every member is within T of its
representative, so groups never chain unrelated images. connected: connected components of the
graph of pairs at ≥ T (can chain: A~B, B~C, A≁C); the representative is chosen the same way.

A row whose k neighbours all reach T may have more: its list is grown to every row at ≥ T by an
exact scan (for up to EXPAND_LIMIT such rows; past that, dedup.json and the summary say how many
groups may be incomplete and which -k would gather them), so no duplicate is kept silently.

Scores are exact cosines (float64, stored as float32) compared with T as float32: identical
images score exactly 1.0, so `--threshold 1.0` groups exact copies.

to_remove.txt holds one path per line, only for paths that a line can carry (valid UTF-8, no line
break); to_remove.nul holds every path as raw bytes, each ended by NUL, for `xargs -0 rm --`. The
paths to_remove.txt leaves out are listed in dedup.json.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import dataclass, field

import numpy as np

from pipeline import __version__
from pipeline.errors import UserError
from pipeline.faults import crash_point
from pipeline.names import is_escaped, name_bytes
from pipeline.retrieve.features import FeatureSet, open_features, require_vectors
from pipeline.retrieve.knn import NO_MATCH, ExactSearch, cosines, normalize64, plan_tiles, valid_rows
from pipeline.retrieve.match import MatchConfig, load_neighbors, run_match
from pipeline.storage import commit_bytes, commit_file, commit_json, locate, staging_file, utf8_json

log = logging.getLogger("featpipe")

GROUPS_FILE = "groups.json"
DUPLICATES_FILE = "duplicates.json"
REMOVE_FILE = "to_remove.txt"
REMOVE_NUL_FILE = "to_remove.nul"
REPORT_FILE = "dedup.json"
GROWN_FILE = "grown.npz"  # the grown lists: dedup --update scans only the rows added since
EXPAND_LIMIT = 4096  # rows whose full k neighbours reach T, grown by an exact scan each


@dataclass(frozen=True)
class DedupConfig:
    features: str
    out: str
    threshold: float
    k: int = 10
    linkage: str = "star"  # star | connected
    match: dict = field(default_factory=dict)  # MatchConfig's other settings: method, memory_budget, device…


@dataclass(frozen=True)
class Group:
    representative: int
    members: list[int]  # the representative first, then by score
    scores: list[float]  # cosine of each member to the representative


@dataclass
class DedupResult:
    groups: list[Group]
    report: dict
    histogram: list[tuple[float, float, int]]


def run_dedup(cfg: DedupConfig) -> DedupResult | None:
    """None on a torchrun rank other than 0 (rank 0 groups)."""
    if not -1.0 <= cfg.threshold <= 1.0:
        raise UserError(f"--threshold must be a cosine between -1 and 1, got {cfg.threshold}")
    if cfg.linkage not in ("star", "connected"):
        raise UserError(f"--linkage must be star or connected, got {cfg.linkage!r}")
    if cfg.k < 1:
        raise UserError(f"-k must be at least 1, got {cfg.k}")
    fs = open_features(cfg.features)
    require_vectors(fs)
    k = min(cfg.k, fs.n - 1)
    if k < 1:
        raise UserError(f"{fs.source} holds 1 vector: nothing to compare")
    matched = run_match(MatchConfig(cfg.features, cfg.out, k=k, exclude_self=True, **cfg.match))
    if not matched.report:
        return None
    out = locate(cfg.out)
    matches, scores = load_neighbors(out)
    graph = Neighbours(matches, scores, np.float32(cfg.threshold))
    earlier = Grown.load(out, fs, cfg.threshold) if cfg.match.get("update") else None
    capped = graph.grow(fs, cfg.match.get("memory_budget", MatchConfig.memory_budget), earlier)
    fingerprint = matched.report["features_fingerprint"]  # match hashed these features already
    Grown(fs.n, fingerprint, cfg.threshold, fs.removed, graph.grown).save(out)
    crash_point("dedup-grown")  # test-only: a rerun of --update starts from the lists just saved
    order = _by_size(fs)
    groups = (star if cfg.linkage == "star" else connected)(fs, graph, order)
    histogram = nearest_histogram(matches, scores)
    report = _write(out, fs, groups, histogram, cfg, k, capped)
    return DedupResult(groups, report, histogram)


class Neighbours:
    """Each row's neighbours at ≥ T, from match's k lists, grown where a list was full."""

    def __init__(self, matches: np.ndarray, scores: np.ndarray, threshold: np.float32):
        self.matches, self.scores, self.threshold = matches, scores, threshold
        self.grown: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def capped(self) -> np.ndarray:
        """Rows whose every one of k slots holds a neighbour at ≥ T: there may be more."""
        last_m, last_s = self.matches[:, -1], self.scores[:, -1]
        return np.flatnonzero((last_m != NO_MATCH) & (last_s >= self.threshold))

    def grow(self, fs: FeatureSet, budget: int, earlier: Grown | None = None) -> dict:
        """Every row at ≥ T for up to EXPAND_LIMIT capped rows (an exact scan); what was left.
        A row `earlier` grew keeps its list (less rows removed since) and scans only the rows
        added since: what a scan of every row gives, as the earlier rows did not change."""
        rows = self.capped()
        todo, left = rows[:EXPAND_LIMIT], rows[EXPAND_LIMIT:]
        tiling = plan_tiles(fs.n, fs.dim, self.matches.shape[1], budget)
        valid = valid_rows(fs, tiling.db_rows) if len(todo) else np.zeros(fs.n, bool)
        kept = earlier.lists if earlier else {}
        again = np.array([r for r in todo if int(r) in kept], np.int64)
        fresh = np.setdiff1d(todo, again)
        self._scan(fs, fresh, ExactSearch(fs, valid, tiling), kept, valid)
        if len(again):
            added = valid & (np.arange(fs.n) >= earlier.n)
            self._scan(fs, again, ExactSearch(fs, added, tiling), kept, valid)
        widest = max((len(v[0]) for v in self.grown.values()), default=0)
        counts = {"grown": len(todo), "widest": widest, "left_capped": len(left), "left_rows": left[:1000].tolist()}
        return {**counts, "kept_from_earlier": len(again)}

    def _scan(self, fs: FeatureSet, rows: np.ndarray, exact: ExactSearch, kept: dict, valid: np.ndarray) -> None:
        """Grow `rows` by the rows `exact` searches, merged with their lists in `kept`, if any (less
        rows no longer valid)."""
        if not len(rows):
            return
        q = normalize64(fs.take(rows))
        floors = np.full(len(rows), self.threshold - exact.error, np.float32)
        for row, q64, ids in zip(rows, q, exact.within(q.astype(np.float32), floors), strict=True):
            ids = ids[ids != row]
            sims = cosines(q64, normalize64(fs.take(ids))).astype(np.float32)
            keep = sims >= self.threshold
            ids, sims = ids[keep], sims[keep]
            if int(row) in kept:
                old_ids, old_sims = kept[int(row)]
                still = valid[old_ids]
                ids, sims = np.concatenate([old_ids[still], ids]), np.concatenate([old_sims[still], sims])
            order = np.lexsort((ids, -sims))
            self.grown[int(row)] = (ids[order], sims[order])

    def of(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour rows, scores) at ≥ T, by (score desc, row asc)."""
        if row in self.grown:
            return self.grown[row]
        m, s = self.matches[row], self.scores[row]
        keep = (m != NO_MATCH) & (s >= self.threshold)
        return m[keep].astype(np.int64), s[keep]


@dataclass
class Grown:
    """The grown lists dedup wrote into OUT (GROWN_FILE), for `dedup --update` to start from: lists
    over the first n rows of features whose fingerprint was `features`, at `threshold`."""

    n: int
    features: str
    threshold: float
    removed: np.ndarray
    lists: dict[int, tuple[np.ndarray, np.ndarray]]

    def save(self, out) -> None:
        rows = np.array(sorted(self.lists), np.int64)
        ids = [self.lists[r][0] for r in rows]
        meta = json.dumps({"n": self.n, "features": self.features, "threshold": self.threshold})
        buf = io.BytesIO()
        np.savez(
            buf,
            meta=np.array(meta),
            rows=rows,
            offsets=np.cumsum([0, *map(len, ids)]).astype(np.int64),
            ids=np.concatenate([np.zeros(0, np.int64), *ids]),
            scores=np.concatenate([np.zeros(0, np.float32), *(self.lists[r][1] for r in rows)]),
            removed=self.removed,
        )
        commit_bytes(out.fs, out.join(GROWN_FILE), buf.getvalue())

    @classmethod
    def load(cls, out, fs: FeatureSet, threshold: float) -> Grown | None:
        """The earlier lists when they fit these features and T (None: grow every row again)."""
        if not out.fs.exists(out.join(GROWN_FILE)):
            return None
        try:
            with out.fs.open(out.join(GROWN_FILE), "rb") as f, np.load(io.BytesIO(f.read())) as z:
                meta, rows, offsets = json.loads(str(z["meta"])), z["rows"], z["offsets"]
                ids, scores, removed = z["ids"], z["scores"], z["removed"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            log.info("%s is damaged: every capped row is grown again", out.join(GROWN_FILE))
            return None
        fits = (
            meta["threshold"] == threshold
            and meta["n"] <= fs.n
            and np.isin(removed, fs.removed).all()  # removal is for good: a row back would be missing
            and fs.prefix_fingerprint(meta["n"]) == meta["features"]
        )
        if not fits:
            return None
        lists = {int(r): (ids[a:b], scores[a:b]) for r, a, b in zip(rows, offsets[:-1], offsets[1:], strict=True)}
        return cls(meta["n"], meta["features"], threshold, removed, lists)


def _by_size(fs: FeatureSet) -> np.ndarray:
    """Rows by preference as representative: largest image first, then first in order."""
    sizes = fs.sizes
    pixels = np.array([w * h for w, h in sizes], np.int64) if sizes else np.zeros(fs.n, np.int64)
    return np.lexsort((np.arange(fs.n), -pixels))


def star(fs: FeatureSet, graph: Neighbours, order: np.ndarray) -> list[Group]:
    grouped = np.zeros(len(graph.matches), bool)
    groups = []
    for rep in order:
        if grouped[rep]:
            continue
        nb, sc = graph.of(int(rep))
        pick = ~grouped[nb]
        if not pick.any():
            continue
        grouped[rep] = True
        grouped[nb[pick]] = True
        groups.append(Group(int(rep), [int(rep), *nb[pick].tolist()], [1.0, *sc[pick].astype(float).tolist()]))
    return sorted(groups, key=lambda g: g.representative)


def connected(fs: FeatureSet, graph: Neighbours, order: np.ndarray) -> list[Group]:
    parent = np.arange(len(graph.matches))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(graph.matches)):
        for j in graph.of(i)[0]:
            a, b = root(i), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    components: dict[int, list[int]] = {}
    for i in range(len(graph.matches)):
        components.setdefault(root(i), []).append(i)
    groups = []
    for members in components.values():
        if len(members) < 2:
            continue
        rep = min(members, key=lambda m: rank[m])
        vecs = normalize64(fs.take(np.array(members)))
        sims = cosines(vecs[members.index(rep)], vecs).astype(np.float32)
        ranked = sorted(zip(members, sims, strict=True), key=lambda ms: (ms[0] != rep, -ms[1], ms[0]))
        groups.append(Group(rep, [m for m, _ in ranked], [float(s) for _, s in ranked]))
    return sorted(groups, key=lambda g: g.representative)


def nearest_histogram(matches: np.ndarray, scores: np.ndarray, bins: int = 20) -> list[tuple[float, float, int]]:
    """Counts of each vector's nearest-neighbour score, in equal bins from the lowest to 1."""
    nearest = scores[:, 0][matches[:, 0] != NO_MATCH] if len(scores) else np.zeros(0)
    if not len(nearest):
        return []
    nearest = np.clip(nearest, -1.0, 1.0)
    low = min(float(np.floor(nearest.min() * 100) / 100), 0.99)  # all at 1.0: still bins below 1
    counts, edges = np.histogram(nearest, bins=bins, range=(low, 1.0))
    return [
        (round(float(a), 4), round(float(b), 4), int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def format_histogram(histogram: list[tuple[float, float, int]], width: int = 40) -> str:
    top = max((c for _, _, c in histogram), default=0) or 1
    lines = ["nearest-neighbour cosine (each vector's closest other vector):"]
    for low, high, count in histogram:
        lines.append(f"  {low:6.3f} – {high:6.3f} {count:9d} {'#' * round(width * count / top)}")
    return "\n".join(lines)


def _write(out, fs: FeatureSet, groups: list[Group], histogram: list, cfg: DedupConfig, k: int, capped: dict) -> dict:
    paths = fs.paths
    name = (lambda r: paths[r]) if paths else str
    records = [
        {
            "representative": g.representative,
            "members": g.members,
            "scores": [round(s, 6) for s in g.scores],
            **({"paths": [paths[m] for m in g.members]} if paths else {}),
        }
        for g in groups
    ]
    removed = sorted(m for g in groups for m in g.members[1:])
    lines, left_out = removal_lists([name(r) for r in removed])
    commit_json(out.fs, out.join(GROUPS_FILE), records)
    _write_duplicates(out, groups, name)
    commit_bytes(out.fs, out.join(REMOVE_FILE), lines)
    commit_bytes(out.fs, out.join(REMOVE_NUL_FILE), b"".join(name_bytes(name(r)) + b"\0" for r in removed))
    report = {
        "featpipe_version": __version__,
        "threshold": cfg.threshold,
        "linkage": cfg.linkage,
        "k": k,
        "n": fs.n,
        "groups": len(groups),
        "images_in_groups": sum(len(g.members) for g in groups),
        "to_remove": len(removed),
        "not_in_to_remove_txt": {
            "count": len(left_out),
            "paths": left_out,
            "why": "a line break in the name, or a name that is not valid UTF-8: a line of text cannot hold it "
            f"exactly; {REMOVE_NUL_FILE} has every path as raw bytes (xargs -0)",
        },
        "capped_lists": {
            **capped,
            "why": f"rows whose {k} neighbours all reached the threshold; grown to every row at ≥ T by an exact "
            f"scan, up to {EXPAND_LIMIT}; left_capped groups may be incomplete: rerun with a larger -k",
        },
        "representative_rule": "largest image, then first row" if fs.sizes else "first row (image sizes unknown)",
        "nearest_neighbour_histogram": histogram,
    }
    commit_json(out.fs, out.join(REPORT_FILE), report)
    return report


def _write_duplicates(out, groups: list[Group], name) -> None:
    """duplicates.json as imagededup writes it, {image: [its duplicates]}, sorted, one image a line.
    Its size is the sum of the groups' squared sizes (20,000 images in 8 groups: 50M names, 420 MB),
    so it is streamed to a staged file from names encoded once: building the dict and json.dumps
    with indent (Python's own encoder) took 75 s for those 50M names, this 2.3 s."""
    encoded = [[_json(name(m)) for m in g.members] for g in groups]  # each name once
    where = {name(m): (gi, p) for gi, g in enumerate(groups) for p, m in enumerate(g.members)}
    staged = staging_file(out.fs, out.join(DUPLICATES_FILE))
    with open(staged, "w", encoding="utf-8", buffering=1 << 20) as f:
        f.write("{")
        for n, key in enumerate(sorted(where)):
            gi, p = where[key]
            others = encoded[gi][:p] + encoded[gi][p + 1 :]
            f.write(f"{',' if n else ''}\n {_json(key)}: [{', '.join(others)}]")
        f.write("\n}\n" if where else "}\n")
    commit_file(out.fs, staged, out.join(DUPLICATES_FILE))


def _json(text: str) -> str:
    """A JSON string as utf8_json writes one (\\u escapes only for a name that is not valid UTF-8)."""
    return utf8_json(text).decode()


def removal_lists(paths: list[str]) -> tuple[bytes, list[str]]:
    """to_remove.txt's bytes (one path a line, each line exactly one path) and the paths a line
    cannot hold exactly: a line break splits it into two lines, each of which could name another
    file; a name that is not valid UTF-8 is recorded as text with \\udcXX escapes, which names no
    file (to_remove.nul carries its real bytes)."""
    lines, left_out = [], []
    for p in paths:
        if "\n" in p or "\r" in p or is_escaped(p):
            left_out.append(p)
        else:
            lines.append(p.encode("utf-8", "surrogateescape") + b"\n")
    return b"".join(lines), left_out


def summary(result: DedupResult | None, out: str) -> str:
    if result is None:
        return "this rank's blocks are done; rank 0 groups"
    r = result.report
    lines = [
        f"{format_histogram(result.histogram)}\n{r['groups']} groups ({r['linkage']}, cosine ≥ {r['threshold']}): "
        f"{r['images_in_groups']} images, {r['to_remove']} to remove → {out}/{GROUPS_FILE}, {DUPLICATES_FILE}, "
        f"{REMOVE_FILE}, {REMOVE_NUL_FILE}"
    ]
    capped = r["capped_lists"]
    if capped["grown"]:
        lines.append(f"{capped['grown']} rows had all {r['k']} neighbours at ≥ T: grown by an exact scan")
    if capped["left_capped"]:
        lines.append(
            f"warning: {capped['left_capped']} more rows had all {r['k']} neighbours at ≥ T and were not grown; "
            f"their groups may be incomplete: rerun with -k {max(2 * r['k'], capped['widest'] + 1)} or more"
        )
    left = r["not_in_to_remove_txt"]["count"]
    if left:
        lines.append(
            f"note: {left} paths cannot be written as one line; they are in {REMOVE_NUL_FILE} (and listed in "
            f"{REPORT_FILE}), not in {REMOVE_FILE}"
        )
    return "\n".join(lines)
