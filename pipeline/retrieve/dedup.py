"""`featpipe dedup FEATURES OUT --threshold T`: near-duplicate groups from the kNN graph of
`featpipe match` (run into OUT first, so it is tiled, resumable and torchrun-split like match).

star (default): the largest image (then the first row) not yet grouped becomes a representative
and takes its neighbours at cosine ≥ T that are not grouped yet: every member is within T of its
representative, so groups never chain unrelated images. connected: connected components of the
graph of pairs at ≥ T (can chain: A~B, B~C, A≁C); the representative is chosen the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from pipeline import __version__
from pipeline.errors import UserError
from pipeline.retrieve.features import FeatureSet, open_features
from pipeline.retrieve.knn import NO_MATCH, normalize
from pipeline.retrieve.match import MatchConfig, load_neighbors, run_match
from pipeline.storage import commit_bytes, commit_json, locate

GROUPS_FILE = "groups.json"
DUPLICATES_FILE = "duplicates.json"
REMOVE_FILE = "to_remove.txt"
REPORT_FILE = "dedup.json"


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
    fs = open_features(cfg.features)
    k = min(cfg.k, fs.n - 1)
    if k < 1:
        raise UserError(f"{cfg.features} holds {fs.n} vector(s): nothing to compare")
    matched = run_match(MatchConfig(cfg.features, cfg.out, k=k, exclude_self=True, **cfg.match))
    if not matched.report:
        return None
    out = locate(cfg.out)
    matches, scores = load_neighbors(out)
    order = _by_size(fs)
    groups = (star if cfg.linkage == "star" else connected)(fs, matches, scores, cfg.threshold, order)
    histogram = nearest_histogram(matches, scores)
    report = _write(out, fs, groups, histogram, cfg, k)
    return DedupResult(groups, report, histogram)


def _by_size(fs: FeatureSet) -> np.ndarray:
    """Rows by preference as representative: largest image first, then first in order."""
    sizes = fs.sizes
    pixels = np.array([w * h for w, h in sizes], np.int64) if sizes else np.zeros(fs.n, np.int64)
    return np.lexsort((np.arange(fs.n), -pixels))


def star(fs: FeatureSet, matches: np.ndarray, scores: np.ndarray, threshold: float, order: np.ndarray) -> list[Group]:
    grouped = np.zeros(len(matches), bool)
    groups = []
    for rep in order:
        if grouped[rep]:
            continue
        nb, sc = matches[rep], scores[rep]
        pick = [i for i in range(len(nb)) if nb[i] != NO_MATCH and sc[i] >= threshold and not grouped[nb[i]]]
        if not pick:
            continue
        members = [int(nb[i]) for i in pick]
        grouped[rep] = True
        grouped[members] = True
        groups.append(Group(int(rep), [int(rep), *members], [1.0, *(float(sc[i]) for i in pick)]))
    return sorted(groups, key=lambda g: g.representative)


def connected(
    fs: FeatureSet, matches: np.ndarray, scores: np.ndarray, threshold: float, order: np.ndarray
) -> list[Group]:
    parent = np.arange(len(matches))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero((scores >= threshold) & (matches != NO_MATCH)), strict=True):
        a, b = root(i), root(int(matches[i, j]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    components: dict[int, list[int]] = {}
    for i in range(len(matches)):
        components.setdefault(root(i), []).append(i)
    groups = []
    for members in components.values():
        if len(members) < 2:
            continue
        rep = min(members, key=lambda m: rank[m])
        vecs = normalize(fs.take(np.array(members)))
        sims = vecs.astype(np.float64) @ vecs[members.index(rep)].astype(np.float64)
        ranked = sorted(zip(members, sims, strict=True), key=lambda ms: (ms[0] != rep, -ms[1], ms[0]))
        groups.append(Group(rep, [m for m, _ in ranked], [float(s) for _, s in ranked]))
    return sorted(groups, key=lambda g: g.representative)


def nearest_histogram(matches: np.ndarray, scores: np.ndarray, bins: int = 20) -> list[tuple[float, float, int]]:
    """Counts of each vector's nearest-neighbour score, in equal bins from the lowest to 1."""
    nearest = scores[:, 0][matches[:, 0] != NO_MATCH] if len(scores) else np.zeros(0)
    if not len(nearest):
        return []
    low = float(np.floor(nearest.min() * 100) / 100)
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


def _write(out, fs: FeatureSet, groups: list[Group], histogram: list, cfg: DedupConfig, k: int) -> dict:
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
    duplicates = {name(m): [name(o) for o in g.members if o != m] for g in groups for m in g.members}
    removed = sorted(m for g in groups for m in g.members[1:])
    commit_json(out.fs, out.join(GROUPS_FILE), records)
    commit_bytes(out.fs, out.join(DUPLICATES_FILE), json.dumps(duplicates, indent=1, ensure_ascii=False).encode())
    commit_bytes(out.fs, out.join(REMOVE_FILE), "".join(f"{name(r)}\n" for r in removed).encode())
    report = {
        "featpipe_version": __version__,
        "threshold": cfg.threshold,
        "linkage": cfg.linkage,
        "k": k,
        "n": fs.n,
        "groups": len(groups),
        "images_in_groups": sum(len(g.members) for g in groups),
        "to_remove": len(removed),
        "representative_rule": "largest image, then first row" if fs.sizes else "first row (image sizes unknown)",
        "nearest_neighbour_histogram": histogram,
    }
    commit_json(out.fs, out.join(REPORT_FILE), report)
    return report


def summary(result: DedupResult | None, out: str) -> str:
    if result is None:
        return "this rank's blocks are done; rank 0 groups"
    r = result.report
    return (
        f"{format_histogram(result.histogram)}\n{r['groups']} groups ({r['linkage']}, cosine ≥ {r['threshold']}): "
        f"{r['images_in_groups']} images, {r['to_remove']} to remove → {out}/{GROUPS_FILE}, {DUPLICATES_FILE}, "
        f"{REMOVE_FILE}"
    )
