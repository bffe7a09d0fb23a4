"""`featpipe match FEATURES OUT`: all-vs-all k nearest neighbours by cosine similarity, in the
layout of the original matcher (matches.npy uint32 N×k, scores.npy float16 N×k), plus
neighbors.parquet joined to keys and paths, and match.json.

Queries go in fixed blocks (from the memory budget, never from the number of ranks); each block's
result is committed on its own, so a killed run resumes, and under torchrun each rank takes every
world-th block; rank 0 assembles. The bytes are the same however the work was split.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from pipeline import __version__, dist
from pipeline.errors import UserError
from pipeline.faults import crash_point
from pipeline.retrieve import ann, bigindex, load_faiss, update
from pipeline.retrieve.features import FeatureSet, open_features, require_vectors
from pipeline.retrieve.knn import (
    CANDIDATE_MARGIN,
    ExactSearch,
    Tiling,
    finish_rows,
    normalize,
    plan_tiles,
    valid_rows,
)
from pipeline.retrieve.neighbors import NEIGHBORS_FILE, NeighborWriter
from pipeline.storage import (
    Location,
    commit_bytes,
    commit_file,
    commit_json,
    ensure_writable,
    locate,
    npy_appender,
    read_json,
    read_valid_json,
    remove_stale_temps,
    staging_file,
)

log = logging.getLogger("featpipe")

PLAN_FILE = "match-plan.json"  # what the blocks in OUT were made with: a rerun must agree
REPORT_FILE = "match.json"
BLOCKS = "blocks"
INDEX_FILE = "ivf.index"
# Exact all-vs-all while N²·D multiply-adds stay under this: about a minute at the ~7.5e10/s faiss
# reached on this project's 2-core machine (50k × 384 in 12.8 s); a GPU does ~1000× more.
EXACT_WORK_CPU = 5e12
EXACT_WORK_GPU = 5e15


@dataclass(frozen=True)
class MatchNames:
    matches: str = "matches.npy"
    scores: str = "scores.npy"

    def checked(self) -> MatchNames:
        """File names inside OUT, `.npy` added where missing (as the original matcher's np.save
        did), and two different files."""
        names = {}
        for flag, name in (("--numpy-matches", self.matches), ("--numpy-similarity-scores", self.scores)):
            if not name or "/" in name or name.startswith("."):
                raise UserError(f"{flag} {name!r} must be a plain file name inside OUT, not a path or a hidden name")
            names[flag] = name if name.endswith(".npy") else name + ".npy"
        matches, scores = names.values()
        if matches == scores:
            raise UserError(f"--numpy-matches and --numpy-similarity-scores both name {matches}; give two names")
        return MatchNames(matches, scores)


@dataclass(frozen=True)
class MatchConfig:
    features: str
    out: str
    k: int = 10
    method: str = "auto"  # auto | exact | ivf
    exclude_self: bool = False
    memory_budget: int = 2 * 10**9
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    overwrite: bool = False
    names: MatchNames = field(default_factory=MatchNames)
    progress: bool = True
    barrier_timeout_s: float = dist.BARRIER_TIMEOUT_S
    create_bucket: bool = False
    update: bool = False  # OUT holds a match of these features' earlier rows: search only what changed


@dataclass
class MatchResult:
    report: dict
    out: str


def run_match(cfg: MatchConfig) -> MatchResult:
    t0 = time.perf_counter()
    cfg = replace(cfg, features=os.fspath(cfg.features), out=os.fspath(cfg.out), names=cfg.names.checked())
    fs = open_features(cfg.features)
    _validate(cfg, fs)
    ctx = dist.DistContext.from_env()
    device = dist.pick_device(cfg.device, ctx.local_rank)
    method = _pick_method(cfg.method, fs, device)
    tiling = plan_tiles(fs.n, fs.dim, cfg.k + 1, cfg.memory_budget)
    out = locate(cfg.out)
    _check_outputs(cfg.names, fs, out)
    ensure_writable(out, cfg.create_bucket)
    plan = {
        "features": fs.fingerprint,
        "n": fs.n,
        "dim": fs.dim,
        "k": cfg.k,
        "exclude_self": cfg.exclude_self,
        "method": method,
        **tiling.settings,
        "removed": fs.removed_digest,
    }
    tag = plan_tag(plan)
    if ctx.active:
        import torch

        dist.init(ctx, torch.device(device), cfg.barrier_timeout_s)
    timings: dict[str, float] = {}
    try:
        old = _prepare_out(out, plan, cfg, ctx)
        t = time.perf_counter()
        valid = valid_rows(fs, tiling.db_rows)
        timings["scan_s"] = time.perf_counter() - t
        updater, updated = _updater(out, fs, old, plan, valid, tiling, cfg, ctx) if old else (None, None)
        if updater is not None:
            self_match = "exclude" if cfg.exclude_self else "first"
            block, extra = (lambda start, stop: updater.block(start, stop, self_match)), {}
        else:
            search, extra = _searcher(method, fs, valid, tiling, device, cfg, out, ctx, timings)
            block = _search_block(search, fs, valid, cfg)
        t = time.perf_counter()
        blocks = list(range(0, fs.n, tiling.query_rows))
        crash = "after-block" if updater is None else "update-block"
        _search_blocks(blocks[ctx.rank :: ctx.world], block, fs, tiling, cfg, out, ctx, tag, crash)
        timings["search_s"] = time.perf_counter() - t
        dist.barrier(ctx)
        report = None
        if ctx.is_main:
            t = time.perf_counter()
            if updater is not None:  # the new blocks are all there: commit, then drop the old
                commit_json(out.fs, out.join(PLAN_FILE), plan)
                _drop_blocks(out, keep=tag)
            _assemble(out, fs, blocks, cfg, tag)
            timings["assemble_s"] = time.perf_counter() - t
            timings["total_s"] = time.perf_counter() - t0
            report = _report(cfg, fs, valid, method, device, tiling, extra, timings)
            if updated is not None:
                report["update"] = updated
            commit_json(out.fs, out.join(REPORT_FILE), report)
    finally:
        dist.shutdown(ctx)
    return MatchResult(report or {}, out.url())


def _validate(cfg: MatchConfig, fs: FeatureSet) -> None:
    if cfg.method not in ("auto", "exact", "ivf"):
        raise UserError(f"--method must be auto, exact or ivf, got {cfg.method!r}")
    require_vectors(fs)
    usable = fs.n - 1 if cfg.exclude_self else fs.n
    if cfg.k < 1 or cfg.k > usable:
        raise UserError(
            f"-k {cfg.k} but {cfg.features} holds {fs.n} vectors"
            f"{' (the query itself excluded)' if cfg.exclude_self else ''}: k must be 1 to {usable}"
        )


def _check_outputs(names: MatchNames, fs: FeatureSet, out: Location) -> None:
    """Never write over the input: OUT is not the features folder (whose fts.npy, img_list.json and
    chunks a matches.npy beside them would also confuse embedding readers globbing *.npy), and no
    output file is the features file itself."""
    if not out.is_local:
        return
    if fs.folder and os.path.realpath(fs.folder) == os.path.realpath(out.path):
        raise UserError(f"OUT {out.path} is the features folder itself; give the results a folder of their own")
    for name in (names.matches, names.scores):
        if os.path.realpath(out.join(name)) == os.path.realpath(fs.file):
            raise UserError(f"{out.join(name)} is the features file itself; name the output otherwise")


def _pick_method(requested: str, fs: FeatureSet, device: str) -> str:
    if requested != "auto":
        return requested
    limit = EXACT_WORK_GPU if device.startswith("cuda") else EXACT_WORK_CPU
    return "exact" if float(fs.n) ** 2 * fs.dim <= limit or fs.n < 10_000 else "ivf"


def _prepare_out(out: Location, plan: dict, cfg: MatchConfig, ctx: dist.DistContext) -> dict | None:
    """Refuse an OUT that holds a match of other FEATURES or settings, unless --overwrite; with
    --update, the plan of the earlier match to update (None when there is nothing to update)."""
    old = None
    if ctx.is_main:
        remove_stale_temps(out, BLOCKS)
        path = out.join(PLAN_FILE)
        if cfg.overwrite:
            for name in (
                BLOCKS,
                PLAN_FILE,
                REPORT_FILE,
                INDEX_FILE,
                bigindex.MATCH_INDEX,
                bigindex.MATCH_INDEX + ".json",
                bigindex.ivfdata_name(bigindex.MATCH_INDEX),
                bigindex.PARTS,
                NEIGHBORS_FILE,
                cfg.names.matches,
                cfg.names.scores,
            ):
                if out.fs.exists(out.join(name)):
                    out.fs.rm(out.join(name), recursive=True)
        if out.fs.exists(path):
            old = read_valid_json(out.fs, path, "use --overwrite to start this OUT again")
            if old == plan:
                old = None
            elif not cfg.update:
                changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise UserError(
                    f"{out.url()} holds a match of other features or settings ({', '.join(changed)}); "
                    "use --update if the features grew, --overwrite to replace it, or another OUT"
                )
        elif cfg.update:
            raise UserError(f"{out.url()} holds no match to --update; run without --update first")
        else:
            commit_json(out.fs, path, plan)
    dist.barrier(ctx)
    if cfg.update and not ctx.is_main:  # the plan stays the earlier one until every block of the update is in
        committed = read_json(out.fs, out.join(PLAN_FILE))
        old = None if committed == plan else committed
    if cfg.update:
        dist.barrier(ctx)  # every rank has read the earlier plan before rank 0 may replace it
    return old


def _updater(
    out: Location,
    fs: FeatureSet,
    old: dict,
    plan: dict,
    valid: np.ndarray,
    tiling: Tiling,
    cfg: MatchConfig,
    ctx: dist.DistContext,
) -> tuple[update.Updater | None, dict]:
    """How to update OUT's earlier match, and what the report says of it: an Updater whose blocks
    (tagged with the new plan) are committed by the new plan once all are written, the old blocks
    dropped after, so a kill at any point leaves the old match, to update again from the blocks
    done, or the new one. An IVF match is matched whole again (no Updater)."""
    why = update.check_growth(fs, old, plan)
    if why and old["method"] == "exact":
        raise update.refuse(why, out.url())
    if why:
        if ctx.is_main:
            log.info("--update: %s; matching every row again", why)
            _drop_blocks(out, keep=None)
            commit_json(out.fs, out.join(PLAN_FILE), plan)
        dist.barrier(ctx)
        return None, {"whole": why}
    updater = update.Updater(fs, old, load_neighbors(out)[0], valid, tiling, cfg.k)
    log.info(
        "--update: %d new rows to search, %d earlier rows to search again (a neighbour was removed), "
        "%d to merge with the new rows",
        *(updater.counts[key] for key in ("added_rows", "researched_rows", "merged_rows")),
    )
    return updater, updater.counts


def _drop_blocks(out: Location, keep: str | None) -> None:
    for p in out.fs.glob(out.join(BLOCKS, "*.npy")):
        if keep is None or not p.rsplit("/", 1)[-1].startswith(keep + "-"):
            out.fs.rm_file(p)


def _searcher(
    method: str,
    fs: FeatureSet,
    valid: np.ndarray,
    tiling: Tiling,
    device: str,
    cfg: MatchConfig,
    out: Location,
    ctx: dist.DistContext,
    timings: dict,
):
    """The search (an ExactSearch, or an IVF index behind the same `candidates`), and what the
    report should say about it."""
    if method == "exact":
        return ExactSearch(fs, valid, tiling, device), {}
    if fs.n * (fs.dim + bigindex.ID_BYTES) > cfg.memory_budget // 2:  # not even 8-bit codes fit
        return bigindex.match_search(fs, valid, tiling, cfg.memory_budget, out, ctx)
    faiss = load_faiss()
    choice = ann.choose(fs.n, fs.dim, cfg.memory_budget)
    path = out.join(INDEX_FILE)
    t = time.perf_counter()
    if ctx.is_main:  # one index for every rank: built once, read by the others
        index = ann.build(fs, valid, choice.factory, tiling.db_rows)
        tuned = ann.tune(index, fs, valid, tiling, cfg.k)
        nprobe, recall = tuned.value, tuned.recall
        commit_bytes(out.fs, path, faiss.serialize_index(index).tobytes())
        commit_json(out.fs, out.join(INDEX_FILE + ".json"), {"nprobe": nprobe, "recall": recall})
    dist.barrier(ctx)
    if not ctx.is_main:
        with out.fs.open(path, "rb") as f:
            index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
        tuned = read_json(out.fs, out.join(INDEX_FILE + ".json"))
        nprobe, recall = tuned["nprobe"], tuned["recall"]
        index.nprobe = nprobe
    timings["index_s"] = time.perf_counter() - t
    extra = {
        "index": choice.factory,
        "nlist": choice.nlist,
        "nprobe": nprobe,
        "estimated_recall_at_k": round(recall, 4),
        "recall_sample": min(ann.TUNE_QUERIES, int(valid.sum())),
    }
    log.info("IVF index %s, nprobe %d: estimated recall@%d %.3f", choice.factory, nprobe, cfg.k, recall)
    return ann.IndexSearch(ann.on_device(index, device, nprobe)), extra


def plan_tag(plan: dict) -> str:
    """Blocks carry their plan's tag: blocks of two plans (match --update) never mix."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]


def _block_path(out: Location, tag: str, start: int, what: str) -> str:
    return out.join(BLOCKS, f"{tag}-{start:012d}.{what}.npy")


def _search_block(search, fs: FeatureSet, valid: np.ndarray, cfg: MatchConfig):
    """A full match's query block: candidates from `search`, exact scores and ties settled."""
    self_match = "exclude" if cfg.exclude_self else "first"
    count = cfg.k + 1 + CANDIDATE_MARGIN  # the query itself may take a slot
    exact = search if isinstance(search, ExactSearch) else None

    def block(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        ids, ok = np.arange(start, stop), valid[start:stop]
        matches = np.full((len(ids), cfg.k), np.iinfo(np.uint32).max, np.uint32)
        scores = np.full((len(ids), cfg.k), np.nan, np.float32)
        if ok.any():
            q = fs.read(start, stop)[ok]
            cand = search.candidates(normalize(q), count)
            matches[ok], scores[ok] = finish_rows(fs, ids[ok], q, cand, cfg.k, self_match, exact)
        return matches, scores

    return block


def _search_blocks(
    starts: list[int],
    block,
    fs: FeatureSet,
    tiling: Tiling,
    cfg: MatchConfig,
    out: Location,
    ctx: dist.DistContext,
    tag: str,
    crash: str,
) -> None:
    """This rank's query blocks that are not committed yet, each committed as it is done."""
    from tqdm.auto import tqdm

    done = {p.rsplit("/", 1)[-1] for p in out.fs.glob(out.join(BLOCKS, "*.matches.npy"))}
    todo = [s for s in starts if _block_path(out, tag, s, "matches").rsplit("/", 1)[-1] not in done]
    log.info("%d of this rank's %d query blocks to do (%d rows each)", len(todo), len(starts), tiling.query_rows)
    with tqdm(
        total=len(todo), unit="block", desc=f"match[{ctx.rank}]" if ctx.active else "match", disable=not cfg.progress
    ) as bar:
        for start in todo:
            write_block(out, tag, start, *block(start, min(start + tiling.query_rows, fs.n)))
            crash_point(crash, ctx.rank)  # test-only: dies here once the first block is committed
            bar.update(1)


def write_block(out: Location, tag: str, start: int, matches: np.ndarray, scores: np.ndarray) -> None:
    commit_bytes(out.fs, _block_path(out, tag, start, "scores"), _npy(scores))
    commit_bytes(out.fs, _block_path(out, tag, start, "matches"), _npy(matches))  # last: the block's commit


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _load_block(out: Location, tag: str, start: int, what: str) -> np.ndarray:
    with out.fs.open(_block_path(out, tag, start, what), "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def load_neighbors(out: Location) -> tuple[np.ndarray, np.ndarray]:
    """A finished match's neighbours (uint32) and their exact float32 scores, from its blocks
    (scores.npy holds them rounded to float16, as the original matcher saves them)."""
    plan = read_valid_json(out.fs, out.join(PLAN_FILE), "run featpipe match into it again with --overwrite")
    starts, tag = range(0, plan["n"], plan["query_rows"]), plan_tag(plan)
    if not plan["n"]:
        return np.zeros((0, plan["k"]), np.uint32), np.zeros((0, plan["k"]), np.float32)
    matches = np.concatenate([_load_block(out, tag, s, "matches") for s in starts])
    scores = np.concatenate([_load_block(out, tag, s, "scores") for s in starts])
    return matches.astype(np.uint32), scores.astype(np.float32)


def _assemble(out: Location, fs: FeatureSet, starts: list[int], cfg: MatchConfig, tag: str) -> None:
    """Blocks → matches.npy (uint32) and scores.npy (float16), as the original matcher saves them,
    and neighbors.parquet when FEATURES knows keys and paths; one block in memory at a time."""
    staged = {name: staging_file(out.fs, out.join(name)) for name in (cfg.names.matches, cfg.names.scores)}
    writer = NeighborWriter(out, fs) if fs.folder else None
    # appended, not filled through memory maps: those kept every written page in the process
    with (
        npy_appender(staged[cfg.names.matches], "<u4", (fs.n, cfg.k)) as matches,
        npy_appender(staged[cfg.names.scores], "<f2", (fs.n, cfg.k)) as scores,
    ):
        for start in starts:
            m, s = _load_block(out, tag, start, "matches"), _load_block(out, tag, start, "scores")
            matches.write(m.astype("<u4", copy=False).tobytes())
            scores.write(s.astype("<f2", copy=False).tobytes())
            if writer:
                writer.add(start, m, s)
    if writer:
        writer.close()
    for name, path in staged.items():
        commit_file(out.fs, path, out.join(name))


def _report(
    cfg: MatchConfig,
    fs: FeatureSet,
    valid: np.ndarray,
    method: str,
    device: str,
    tiling: Tiling,
    extra: dict,
    timings: dict,
) -> dict:
    invalid = np.flatnonzero(~valid)
    return {
        "featpipe_version": __version__,
        "features": fs.where,
        "features_fingerprint": fs.fingerprint,
        "n": fs.n,
        "dim": fs.dim,
        "k": cfg.k,
        "method": method,
        "exclude_self": cfg.exclude_self,
        "device": device,
        "memory_budget": cfg.memory_budget,
        "tiling": asdict(tiling),
        **extra,
        "removed": fs.removed_digest,  # gone from the source (removed.json): left out, like invalid rows
        "invalid_rows": {
            "count": len(invalid),
            "rows": invalid[:1000].tolist(),
            "why": "NaN, infinite or all-zero vectors, or removed from the source: not matched, their rows "
            "hold 4294967295 and NaN",
        },
        "outputs": {
            "matches": cfg.names.matches,
            "scores": cfg.names.scores,
            "neighbors": NEIGHBORS_FILE if fs.folder else None,
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def summary(result: MatchResult) -> str:
    r = result.report
    if not r:
        return "this rank's blocks are done; rank 0 assembles"
    recall = f", estimated recall@{r['k']} {r['estimated_recall_at_k']}" if "estimated_recall_at_k" in r else ""
    bad = f", {r['invalid_rows']['count']} invalid rows not matched" if r["invalid_rows"]["count"] else ""
    return (
        f"{r['n']} × {r['k']} neighbours ({r['method']}{recall}{bad}) in {r['timings']['total_s']:.1f}s → "
        f"{result.out}/{r['outputs']['matches']}, {r['outputs']['scores']}"
    )
