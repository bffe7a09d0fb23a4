"""Indexes past one machine's memory: product-quantised IVF codes chosen under the memory budget,
built in parts (fixed blocks of rows, so the bytes do not depend on how many ranks built them),
merged in RAM or into inverted lists on disk (faiss's OnDiskInvertedLists), and opened
memory-mapped to serve. Codes are lossy: every score featpipe returns is re-computed exactly from
FEATURES over k × factor candidates (query.py), and tuning raises nprobe and that factor together
(ann.tune) until recall@10 after re-ranking reaches the target.

A build keeps in memory the coarse quantizer, one part's codes and one block of vectors; the
merged codes too when they fit the budget, else they stay on disk. Under torchrun rank 0 trains,
every rank adds the parts numbered rank, rank + world, …, and rank 0 merges. Parts are committed
one by one: a killed build reruns only the parts it had not committed."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np

from pipeline import dist
from pipeline.cpu import give_back_memory
from pipeline.errors import UserError
from pipeline.faults import crash_point
from pipeline.retrieve import load_faiss, ondisk
from pipeline.retrieve.ann import (
    SEED,
    IndexSearch,
    faiss_message,
    set_search_parameter,
    train_sample,
    tune,
    tune_queries,
)
from pipeline.retrieve.features import FeatureSet
from pipeline.retrieve.knn import Candidates, ExactSearch, normalize, valid_block
from pipeline.storage import Location, commit_file, commit_json, local_copy, read_json, staging_file

log = logging.getLogger("featpipe")

PARTS = "parts"
BUILD_FILE = "build.json"
TRAINED_FILE = "trained.faiss"
MATCH_INDEX = "pq.faiss"  # match's own index in OUT
ID_BYTES = 8  # faiss keeps an int64 id beside each code
PQ_TRAIN_MIN = 256 * 39  # 8-bit PQ: 256 centroids per sub-quantizer, faiss wants 39 points each
HNSW_COARSE_FROM = 4096  # lists from which assigning a vector by a flat scan of centroids costs more than HNSW
PART_SHARE = 8  # one part's codes and one block of vectors each take at most budget / PART_SHARE
# Codes coarser than a byte per 16 dimensions rank too badly for re-ranking to repair (PQ4 for
# 384-d would need hundreds of candidates a neighbour): below that the lists go to disk instead.
MAX_DIMS_PER_BYTE = 16
SAFETY = 0.8  # of the budget for what stays resident: the rest is Python, numpy and faiss's own


@dataclass(frozen=True)
class Plan:
    """A compressed IVF layout for N × D vectors under a memory budget, and why."""

    nlist: int
    m: int  # bytes of PQ code per vector (D / m dimensions per sub-quantizer)
    ondisk: bool
    part_rows: int
    train_rows: int
    why: str

    @property
    def key(self) -> str:
        coarse = f"IVF{self.nlist}_HNSW32" if self.nlist >= HNSW_COARSE_FROM else f"IVF{self.nlist}"
        # np: no polysemous training (it serves Hamming-filtered search, which featpipe does not
        # use, and took 10× the training time: 24.7 s against 2.4 s for 10k × 64 on 2 cores)
        return f"{coarse},PQ{self.m}x8np"


def _pow2(x: float) -> int:
    return 1 << max(0, int(np.floor(np.log2(max(x, 1)))))


def plan(n: int, dim: int, budget: int) -> Plan:
    """nlist ≈ 4·√N (autofaiss's lower end: training cost grows with it) with 39–64 training
    points per list, the training sample within a quarter of the budget; then the largest code
    (m dividing D, D/16 to D/2 bytes) whose codes and ids fit the budget beside the quantizer;
    when none does, the lists go to disk with D/2-byte codes (they cost disk, not RAM) and RAM
    holds the quantizer. D/2, not D/4: on 5M × 64 clustered rows (50k a cluster, as bench_scale's
    50M), recall@10 after re-ranking 64× candidates at nprobe 16 was 0.967 with 32-byte codes and
    0.690 with 16-byte ones, for the same build time (48 s)."""
    train_cap = max(PQ_TRAIN_MIN, budget // 4 // (dim * 4))
    nlist = max(16, min(_pow2(4 * np.sqrt(n)), 65536, _pow2(n // 64)))
    train_rows = min(n, max(64 * nlist, PQ_TRAIN_MIN), train_cap)
    nlist = max(1, min(nlist, _pow2(train_rows // 39)))
    quantizer = nlist * dim * 4 + (nlist * 64 * 4 if nlist >= HNSW_COARSE_FROM else 0)
    room = int(budget * SAFETY) - quantizer
    divisors = [m for m in range(max(1, dim // 2), 0, -1) if dim % m == 0]
    smallest = min((m for m in divisors if m >= max(1, dim // MAX_DIMS_PER_BYTE)), default=divisors[-1])
    fitting = [m for m in divisors if m >= smallest and n * (m + ID_BYTES) <= room]
    if fitting:
        m, ondisk = fitting[0], False
        why = f"{n} × {m}-byte codes + ids ({_gb(n * (m + ID_BYTES))}) fit the {_gb(budget)} budget"
    else:
        m, ondisk = divisors[0], True
        why = (
            f"even {smallest}-byte codes + ids ({_gb(n * (smallest + ID_BYTES))}) exceed the "
            f"{_gb(budget)} budget: inverted lists on disk ({m}-byte codes), memory-mapped"
        )
    part_rows = max(1024, budget // PART_SHARE // (m + ID_BYTES + dim * 4) // 1024 * 1024)
    return Plan(nlist, m, ondisk, min(part_rows, max(n, 1)), train_rows, why)


def _gb(size: float) -> str:
    return f"{size / 1e9:.3g} GB" if size >= 1e8 else f"{size / 1e6:.3g} MB"


def ivfdata_name(index_file: str) -> str:
    return index_file.rsplit(".faiss", 1)[0] + ".ivfdata"


class PartedBuild:
    """One build of a planned compressed index into INDEX (see the module's docstring)."""

    def __init__(self, fs: FeatureSet, valid: np.ndarray, p: Plan, out: Location, progress: bool = False):
        self.fs, self.valid, self.plan, self.out, self.progress = fs, valid, p, out, progress
        self.record = {"features": fs.fingerprint, "n": fs.n, "dim": fs.dim, "key": p.key, **asdict(p)}
        self.parts = list(range(0, fs.n, p.part_rows))

    def run(self, ctx: dist.DistContext, index_file: str):
        """The merged index on rank 0 (None on the others): trained, parts added, merged."""
        from tqdm.auto import tqdm

        if self.plan.ondisk and not self.out.is_local:
            raise UserError(
                f"{self.out.url()}: an index with its lists on disk is built in a local or shared folder, "
                "not a bucket (or give a --memory-budget its codes fit)"
            )
        dist.from_main(ctx, self._prepare)
        dist.from_main(ctx, self._train, share=lambda _: None)
        give_back_memory()  # training's sample and faiss's buffers, before the parts are added
        log.info("index: trained %s on %d sampled rows", self.plan.key, self.plan.train_rows)
        trained = self._read(TRAINED_FILE)
        mine = [i for i in range(len(self.parts)) if i % ctx.world == ctx.rank]
        todo = [i for i in mine if not self.out.fs.exists(self._part(i))]
        label = f"index parts[{ctx.rank}]" if ctx.active else "index parts"
        for number in tqdm(todo, unit="part", desc=label, disable=not self.progress):
            self._add_part(trained, number, self.parts[number])
            crash_point("index-part", ctx.rank)  # test-only: a part committed, the build not done
        dist.barrier(ctx)
        give_back_memory()
        log.info("index: %d parts of %d rows added", len(self.parts), self.plan.part_rows)
        return self._merge(index_file) if ctx.is_main else None

    def _prepare(self) -> None:
        """Keep committed parts only when they were made for this very build."""
        folder, record = self.out.join(PARTS), self.out.join(PARTS, BUILD_FILE)
        if self.out.fs.exists(record) and read_json(self.out.fs, record) == self.record:
            log.info("index: resuming, %d of %d parts done", self._done(), len(self.parts))
            return
        if self.out.fs.exists(folder):
            self.out.fs.rm(folder, recursive=True)
        commit_json(self.out.fs, record, self.record)

    def _done(self) -> int:
        return sum(self.out.fs.exists(self._part(i)) for i in range(len(self.parts)))

    def _train(self) -> None:
        if self.out.fs.exists(self.out.join(PARTS, TRAINED_FILE)):
            return
        faiss = load_faiss()
        index = faiss.index_factory(self.fs.dim, self.plan.key, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = SEED
        rows = train_sample(self.valid, max(1, self.plan.train_rows // 64))
        threads = faiss.omp_get_max_threads()
        if self.plan.nlist >= HNSW_COARSE_FROM:  # an HNSW graph built by several threads differs run to run
            faiss.omp_set_num_threads(1)
        try:
            index.train(normalize(self.fs.take(rows)))
        except RuntimeError as exc:
            raise UserError(
                f"{self.plan.key!r}: faiss cannot train it on these vectors: {faiss_message(exc)}"
            ) from None
        finally:
            faiss.omp_set_num_threads(threads)
        self._write(index, TRAINED_FILE)

    def _add_part(self, trained, number: int, start: int) -> None:
        """Rows [start, start + part_rows) into a copy of the trained index: one read of the
        vectors (part_rows is sized so that it and the part's codes fit a share of the budget)."""
        faiss = load_faiss()
        part = faiss.clone_index(trained)
        stop = min(start + self.plan.part_rows, self.fs.n)
        ids = np.flatnonzero(self.valid[start:stop]) + start
        if len(ids):
            part.add_with_ids(valid_block(self.fs, start, stop, ids), ids.astype(np.int64))
        self._write(part, f"part-{number:06d}.faiss")

    def _merge(self, index_file: str):
        faiss = load_faiss()
        index = self._read(TRAINED_FILE)
        names = [self._local(self._part(i)) for i in range(len(self.parts))]
        if self.plan.ondisk:
            final = self.out.join(ivfdata_name(index_file))
            staged = staging_file(self.out.fs, final)
            os.remove(staged)  # OnDiskInvertedLists creates it
            ondisk.merge(index, names, staged)
            os.replace(staged, final)  # the lists stay mapped; they are named by the final name
            faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = final
        else:
            merge_presized(index, names)
        log.info("index: %d parts merged (%s)", len(names), "lists on disk" if self.plan.ondisk else "in memory")
        return index

    def _part(self, number: int) -> str:
        return self.out.join(PARTS, f"part-{number:06d}.faiss")

    def _local(self, path: str) -> str:
        return path if self.out.is_local else local_copy(self.out.fs, path)

    def _read(self, name: str):
        return load_faiss().read_index(self._local(self.out.join(PARTS, name)))

    def _write(self, index, name: str) -> None:
        final = self.out.join(PARTS, name)
        staged = staging_file(self.out.fs, final)
        load_faiss().write_index(index, staged)
        commit_file(self.out.fs, staged, final)

    def clean(self) -> None:
        """The parts, once the merged index is committed."""
        if self.out.fs.exists(self.out.join(PARTS)):
            self.out.fs.rm(self.out.join(PARTS), recursive=True)


def merge_presized(index, names: list[str]) -> None:
    """The parts' lists appended to `index`'s in part order, as faiss's merge_from would (the same
    bytes), into lists sized once from the parts' list sizes. merge_from grows each list's arrays
    as it goes: their doubling capacity and the copies on the way peaked at 1.9 GB for 726 MB of
    codes (10M × 128, PQ64, 47 parts). Memory now: the codes, and one part."""
    faiss = load_faiss()
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    sizes = np.zeros(ivf.nlist, np.int64)
    for name in names:  # a first pass for the sizes: a part is small (a share of the budget)
        held = faiss.read_index(name)  # referenced while its lists are read (SWIG frees it with the name)
        part = faiss.extract_index_ivf(held).invlists
        sizes += np.fromiter((part.list_size(i) for i in range(ivf.nlist)), np.int64, ivf.nlist)
    for i in np.flatnonzero(sizes).tolist():
        lists.resize(i, int(sizes[i]))
    at = np.zeros_like(sizes)
    for name in names:
        held = faiss.read_index(name)
        part = faiss.extract_index_ivf(held).invlists
        for i in range(ivf.nlist):
            count = part.list_size(i)
            if count:
                lists.update_entries(i, int(at[i]), count, part.get_ids(i), part.get_codes(i))
                at[i] += count
        del held
    ivf.ntotal = index.ntotal = int(sizes.sum())


def split_truth(fs: FeatureSet, valid: np.ndarray, tiling, ctx: dist.DistContext, k: int):
    """Tuning's exact top k of its sampled queries, each rank scanning its contiguous slice of
    the rows; (queries, Candidates) on rank 0, None on the others."""
    queries = tune_queries(fs, valid)
    lo, hi = fs.n * ctx.rank // ctx.world, fs.n * (ctx.rank + 1) // ctx.world
    mine = np.zeros_like(valid)
    mine[lo:hi] = valid[lo:hi]
    found = ExactSearch(fs, mine, tiling).candidates(queries, k)
    parts = dist.gather(ctx, (found.scores, found.ids))
    if not ctx.is_main:
        return None
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    return queries, Candidates(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1))


def early_truth(fs: FeatureSet, valid: np.ndarray, tiling, ctx: dist.DistContext):
    """split_truth for a parted build, computed before it: its tiles take up to the budget, and
    beside the merged codes they did not fit (10M × 128 at 1 GB peaked at 1.87 GB while tuning
    scanned for the truth with 0.73 GB of codes held; 0.98 GB with the truth found first)."""
    truth = split_truth(fs, valid, tiling, ctx, 10)
    give_back_memory()
    return truth


def rerank_floor(factor: int) -> int:
    """Candidates to re-rank exactly for any k: as many as the tuning measured recall with (k = 10
    neighbours × the factor); none beyond the caller's own for codes ranked as they are."""
    return 10 * factor if factor > 1 else 0


def match_search(fs: FeatureSet, valid: np.ndarray, tiling, budget: int, out: Location, ctx: dist.DistContext):
    """`featpipe match --method ivf` when 8-bit codes would not fit the budget: the compressed
    index built in parts by every rank into OUT, tuned with re-ranking on rank 0 and read by the
    others (memory-mapped); (an IndexSearch asking for enough candidates, the report's entries)."""
    faiss = load_faiss()
    p = plan(fs.n, fs.dim, budget)
    name = MATCH_INDEX
    parted = PartedBuild(fs, valid, p, out, progress=False)
    truth = early_truth(fs, valid, tiling, ctx)
    index = parted.run(ctx, name)
    if ctx.is_main:
        tuned = tune(index, fs, valid, tiling, 10, rerank=True, truth=truth)
        relative_lists(index)
        staged = staging_file(out.fs, out.join(name))
        faiss.write_index(index, staged)
        commit_file(out.fs, staged, out.join(name))
        record = {"index_key": p.key, "storage": "ondisk" if p.ondisk else "memory", **asdict(tuned)}
        commit_json(out.fs, out.join(name + ".json"), record)
        parted.clean()
    dist.barrier(ctx)
    record = read_json(out.fs, out.join(name + ".json"))
    if not ctx.is_main:
        index = read_for_search(out.join(name) if out.is_local else local_copy(out.fs, out.join(name)), record)
        set_search_parameter(index, record["param"], record["value"])
    extra = {
        "index": p.key,
        "nlist": p.nlist,
        "nprobe": record["value"],
        "rerank_factor": record["factor"],
        "storage": record["storage"],
        "why": p.why,
        "estimated_recall_at_k": round(record["recall"], 4),
    }
    log.info(
        "compressed index %s (%s), nprobe %d, %d× candidates re-ranked", p.key, p.why, record["value"], record["factor"]
    )
    return IndexSearch(index, rerank_floor(record["factor"])), extra


def relative_lists(index) -> None:
    """An on-disk index names its lists file by the name alone: it opens from any folder it is
    copied to (IO_FLAG_ONDISK_SAME_DIR) and two builds write the same bytes."""
    faiss = load_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if isinstance(lists, faiss.OnDiskInvertedLists):
        lists.filename = os.path.basename(lists.filename)


def read_for_search(path: str, meta: dict):
    """The index at `path` opened to serve (flags below)."""
    faiss = load_faiss()
    with ondisk.quiet_stdout():
        return faiss.read_index(path, open_flags(meta))


def open_flags(meta: dict) -> int:
    """How a query process opens an index: an IVF's lists memory-mapped (on disk: its .ivfdata, in
    RAM layout: the index file itself), read-only; a flat or HNSW index is read whole."""
    faiss = load_faiss()
    if meta.get("storage") == "ondisk":
        return faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    if "IVF" in meta["index_key"]:
        return faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    return 0
