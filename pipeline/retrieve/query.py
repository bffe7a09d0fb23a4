"""`featpipe query INDEX_OR_FEATURES QUERY…`: the nearest vectors to each query. A QUERY is an
image file or URL (embedded with the model, weights and transform the extract run recorded), a key
or path already in the set, or a `.npy` of vectors (one query per row). Scores are exact cosines
(recomputed from the stored vectors when the index keeps only codes)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UserError, reason
from pipeline.fetch import fetch_url, is_url
from pipeline.outdir import REMOVED_FILE, OutputNames, load_run
from pipeline.retrieve import load_faiss, rowmeta
from pipeline.retrieve.ann import IndexSearch, faiss_message, set_search_parameter
from pipeline.retrieve.bigindex import read_for_search, rerank_floor
from pipeline.retrieve.byrow import RowReader, row_places
from pipeline.retrieve.features import features_exist, open_features, removed_count, require_vectors
from pipeline.retrieve.index import IDS_FILE, INDEX_FILE, META_FILE
from pipeline.retrieve.knn import (
    CANDIDATE_MARGIN,
    Candidates,
    ExactSearch,
    finish_rows,
    normalize,
    plan_tiles,
    valid_rows,
)
from pipeline.retrieve.rowmeta import RowMeta
from pipeline.storage import local_copy, locate, read_valid_json

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Hit:
    query: str
    rank: int
    score: float
    row: int
    key: str | None
    path: str | None
    caption: str | None = None  # the sample's caption (.txt), where extract kept one


class Target:
    """What the queries are searched in: a built index, or FEATURES searched exactly. An index's
    features are used (for exact scores and keys) only when they hold the bytes it was built from."""

    def __init__(self, spec: str):
        self.spec, self.loc = spec, locate(spec)
        self.meta = None
        if self.loc.fs.isfile(self.loc.join(META_FILE)):
            remedy = f"rebuild it: featpipe index FEATURES {spec} --overwrite"
            keys = ("dim", "n", "features", "features_fingerprint", "search_parameter", "value")
            self.meta = read_valid_json(self.loc.fs, self.loc.join(META_FILE), remedy, keys)
            self.features = open_features(self.meta["features"]) if features_exist(self.meta["features"]) else None
            if self.features is not None and self.features.fingerprint != self.meta["features_fingerprint"]:
                raise UserError(
                    f"the features at {self.meta['features']} changed since the index {spec} was built from them; "
                    f"if they grew, update it: featpipe index FEATURES {spec} --update; else {remedy}"
                )
        else:
            self.features = open_features(spec)
            require_vectors(self.features)

    @staticmethod
    def check(spec: str) -> None:
        """One line (UserError) when SPEC is neither an index nor FEATURES: cheap, for a service
        to refuse before it listens instead of answering 'loading' forever."""
        loc = locate(spec)
        if not loc.fs.isfile(loc.join(META_FILE)):
            require_vectors(open_features(spec))

    def stamp(self) -> str:
        """What the files this target was loaded from say of themselves now (fsspec's ukey: size and
        time, or a store's ETag), digested: it changes when `index --update` commits index.json and
        when an extract rewrites the features or their removed rows (a service reloads on it)."""
        features = self.meta["features"] if self.meta else self.spec
        floc = locate(features)
        files = [(self.loc.fs, self.loc.join(META_FILE))] if self.meta else []
        if self.features is not None and self.features.folder:
            files += [(floc.fs, floc.join(OutputNames().numpy_features)), (floc.fs, floc.join(REMOVED_FILE))]
        elif self.features is not None:
            files.append((floc.fs, floc.path))
        digest = hashlib.sha256()
        for fs, path in files:
            try:
                digest.update(fs.ukey(path).encode())
            except FileNotFoundError:
                digest.update(b"absent")
        return digest.hexdigest()

    @property
    def dim(self) -> int:
        return self.meta["dim"] if self.meta else self.features.dim

    @property
    def n(self) -> int:
        return self.meta["n"] if self.meta else self.features.n

    @cached_property
    def _rows(self) -> RowMeta | None:
        """INDEX/rows/, read by row (indexes of earlier featpipes and FEATURES have none)."""
        return RowMeta(self.loc) if self.meta and rowmeta.exists(self.loc) else None

    def names(self, rows) -> tuple[list, list, list]:
        """(keys, paths, captions) of these rows: read on demand from INDEX/rows/ or FEATURES'
        metadata.parquet (byrow.py), else (indexes of earlier featpipes) from lists in memory."""
        rows = [int(r) for r in rows]
        if self._rows is not None:
            return self._rows.names(rows)
        if not self.meta:
            reader = self._reader
            places = reader.places(rows, members=False) if reader else row_places(self.features, rows, members=False)
            return tuple([getattr(places[r], f) for r in rows] for f in ("key", "path", "caption"))
        return tuple([column[r] for r in rows] for column in self._ids)

    @property
    def places(self):
        """rows → RowPlace read by row from INDEX/rows/ or FEATURES' metadata.parquet (for
        thumbnails), or None: FEATURES' lists."""
        if self._rows is not None:
            return self._rows.places
        return self._reader.places if self._reader is not None else None

    @cached_property
    def _reader(self) -> RowReader | None:
        """FEATURES' row reader, opened once (its footer read once, not at every query)."""
        return RowReader.of(self.features) if not self.meta else None

    def row(self, name: str) -> int | None:
        """The row whose key, else whose path, is `name` (the first such row), or None."""
        if self._rows is not None:
            return self._rows.row_of(name)
        return self._row_of.get(name)

    @cached_property
    def _ids(self) -> tuple[list, list, list]:
        """(keys, paths, captions) by row, all of them (an index without rows/, or FEATURES)."""
        if self.meta:
            from pipeline.chunks import read_parquet

            with self.loc.fs.open(self.loc.join(IDS_FILE), "rb") as f:
                t = read_parquet(f)
            return t.column("key").to_pylist(), t.column("path").to_pylist(), [None] * len(t)
        fs = self.features
        return fs.keys or [None] * fs.n, fs.paths or [None] * fs.n, fs.captions or [None] * fs.n

    @cached_property
    def _row_of(self) -> dict[str, int]:
        keys, paths, _ = self._ids
        table: dict[str, int] = {}
        for names in (keys, paths):  # keys first, then paths; the first row of a name
            for i, v in enumerate(names):
                if v is not None:
                    table.setdefault(v, i)
        return table

    @cached_property
    def embedder(self) -> dict | None:
        if self.meta:
            return self.meta.get("embedder")
        return load_run(locate(self.features.folder)).extra.get("embedder") if self.features.folder else None

    @cached_property
    def _index(self):
        path = self.loc.join(self.meta.get("file", INDEX_FILE))
        if not self.loc.is_local:
            if self.meta.get("storage") == "ondisk":
                raise UserError(
                    f"{self.spec}: an index with its lists on disk is served from a local folder; copy it there"
                )
            path = local_copy(self.loc.fs, path)
        try:
            index = read_for_search(path, self.meta)
        except RuntimeError as exc:
            raise UserError(
                f"{self.loc.url(path)} is not a readable faiss index ({faiss_message(exc)}); "
                f"rebuild it: featpipe index FEATURES {self.spec} --overwrite"
            ) from None
        if index.ntotal > self.meta["n"] or index.d != self.meta["dim"]:
            raise UserError(f"{self.spec}: index.faiss does not match index.json; rebuild it with --overwrite")
        set_search_parameter(index, self.meta["search_parameter"], self.meta["value"])
        return index

    def warm(self) -> None:
        """Read everything a search needs now (a service answers its first query as fast as the next)."""
        _ = self._rows if self._rows is not None else (self._ids, self._row_of)
        _ = self._index if self.meta else self._exact

    @cached_property
    def _exact(self) -> ExactSearch:
        fs = self.features
        tiling = plan_tiles(fs.n, fs.dim, 1000 + CANDIDATE_MARGIN, 2 * 10**9)
        return ExactSearch(fs, valid_rows(fs, tiling.db_rows), tiling)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw query rows → (row ids, -1 where none; exact cosines)."""
        count = k + CANDIDATE_MARGIN
        exact = None
        if self.meta:
            gone = self._gone_in_index
            floor = rerank_floor(self.meta.get("rerank_factor", 1)) + gone
            cand = IndexSearch(self._index, floor).candidates(normalize(queries), count + gone)
            if gone:  # rows removed from the source that the index holds: asked for, then dropped
                out = np.isin(cand.ids, self.features.removed)
                cand = Candidates(np.where(out, -np.inf, cand.scores).astype(np.float32), np.where(out, -1, cand.ids))
            if self.features is None:  # the stored vectors are gone: the index's own scores
                return cand.ids[:, :k], np.where(cand.ids[:, :k] >= 0, cand.scores[:, :k], np.nan)
        else:
            exact = self._exact
            cand = exact.candidates(normalize(queries), count)
        no_identity = np.full(len(queries), -1)
        ids, scores = finish_rows(self.features, no_identity, queries, cand, k, "keep", exact)
        return np.where(ids == np.iinfo(np.uint32).max, -1, ids.astype(np.int64)), scores

    @cached_property
    def _gone_in_index(self) -> int:
        """How many rows the features mark removed the index may still hold: those removed since it
        was written, and those it could not drop (HNSW); index --update takes them out."""
        if self.features is None:
            return 0
        since = len(self.features.removed) - removed_count(self.meta)
        return since + self.meta.get("removed_held", 0)

    def vector_of(self, row: int) -> np.ndarray:
        if self.features is None:  # the index's own copy: IVF needs its direct map built for that
            faiss = load_faiss()
            try:
                ivf = faiss.extract_index_ivf(self._index) if "IVF" in self.meta["index_key"] else None
                if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
                    ivf.make_direct_map()  # once: it walks every list
                return self._index.reconstruct(row)[None, :]
            except RuntimeError as exc:
                raise UserError(
                    f"{self.spec}: its features moved from {self.meta['features']} and this index cannot give "
                    f"back a stored vector ({faiss_message(exc)}); query with an image or vectors"
                ) from None
        return self.features.read(row, row + 1)


def run_query(
    target_spec: str | os.PathLike,
    queries: list[str],
    k: int,
    device: str = "cpu",
    timeout_s: float = 30,
    texts: list[str] = (),
) -> list[Hit]:
    if k < 1:
        raise UserError(f"-k must be at least 1, got {k}")
    if not queries and not texts:
        raise UserError("nothing to search for: give a QUERY or --text")
    target_spec = os.fspath(target_spec)
    target = Target(target_spec)
    labels, vectors = [], []
    embedder = None
    for q in queries:
        if q.endswith(".npy") and not is_url(q):
            rows = _npy_queries(q)
            labels += [f"{q}[{i}]" for i in range(len(rows))]
            vectors.append(rows)
        elif (row := target.row(q)) is not None:
            labels.append(q)
            vectors.append(target.vector_of(row))
        else:
            if embedder is None:
                embedder = Embedder(target.embedder, target_spec, device)
            labels.append(q)
            vectors.append(embedder(q, timeout_s))
    if texts:
        if embedder is None:
            embedder = Embedder(target.embedder, target_spec, device)
        labels += [f"text: {t}" for t in texts]
        vectors.append(embedder.texts(texts))
    return search_hits(target, labels, np.concatenate(vectors), k)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled by their largest magnitude, then to unit length, in float64, then float32: only
    the direction counts, and [3e38]*D or [1e-45]*D would overflow or vanish in a float32 norm."""
    x = np.asarray(x, np.float64)
    x = x / np.abs(x).max(axis=1, keepdims=True)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def search_hits(target: Target, labels: list[str], x: np.ndarray, k: int, offset: int = 0) -> list[Hit]:
    """Hits k at a time from rank `offset`, for query vectors `x` (one per label)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != target.dim:
        width = x.shape[-1] if x.ndim else 0
        raise UserError(f"{target.spec} holds {target.dim}-dim vectors; the queries are {width}-dim")
    unusable = ~(np.isfinite(x).all(axis=1) & (np.abs(x).sum(axis=1) > 0))
    if unusable.any():
        bad = labels[int(np.argmax(unusable))]
        raise UserError(f"query {bad} is a NaN, infinite or all-zero vector: it has no direction to search")
    x = unit_rows(x)
    ids, scores = target.search(x, k + offset)
    places = [(i, r) for i in range(len(labels)) for r in range(offset, ids.shape[1]) if ids[i, r] >= 0]
    keys, paths, captions = target.names([ids[i, r] for i, r in places])
    return [
        Hit(labels[i], r, float(scores[i, r]), int(ids[i, r]), key, path, caption)
        for (i, r), key, path, caption in zip(places, keys, paths, captions, strict=True)
    ]


def _npy_queries(path: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"cannot read query vectors {path}: {reason(exc)}") from None
    if x.dtype.kind not in "fiu" or x.ndim not in (1, 2) or not x.size:
        raise UserError(
            f"query vectors {path} hold a {x.dtype} array of shape {x.shape}; give numbers, one row a query"
        )
    return x.reshape(1, -1) if x.ndim == 1 else x


class Embedder:
    """The extract run's model and transform, on this machine, for images given as queries."""

    def __init__(self, meta: dict | None, target: str, device: str):
        if not meta:
            raise UserError(
                f"{target} does not record the model that made its vectors (it comes from an extract "
                "output folder); query it with keys, paths or .npy vectors"
            )
        import torch

        from pipeline.dist import pick_device
        from pipeline.extract.runner import ModelRunner
        from pipeline.image.transform import TransformConfig
        from pipeline.models import load_model
        from pipeline.models.base import ModelConfig

        m = meta["model"]
        t = dict(meta["transform"])
        t["mode"] = "fast" if t.get("mode") == "device" else t.get("mode", "fast")
        for key in ("mean", "std"):
            if key in t:
                t[key] = tuple(t[key])
        self.transform = TransformConfig(**t)
        self.device = torch.device(pick_device(device, 0))
        self.model = ModelConfig(m["repo"], m["name"], m["weights"], m.get("model"))
        loaded = load_model(self.model)
        model = loaded.image.to(self.device)
        self.text = loaded.text
        # The run's own precision (bf16 on a GPU, say): in fp32 an indexed image scored below 1.0 against itself
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(meta.get("precision", "fp32"))
        self.run = ModelRunner(model, self.device, amp, 1, stats=(self.transform.mean, self.transform.std))

    def texts(self, texts: list[str]) -> np.ndarray:
        """Text queries through the model's text tower, into the image vectors' space."""
        if self.text is None:
            raise UserError(
                f"the model {self.model.label} has no text tower: query by image, key, path or vectors "
                "(text needs an open_clip or a CLIP/SigLIP hf: model)"
            )
        return self.text(list(texts)).float().cpu().numpy()

    def __call__(self, source: str, timeout_s: float) -> np.ndarray:
        return self.embed(self.crop(self.read(source, timeout_s), source)[None])

    def read(self, source: str, timeout_s: float) -> bytes:
        import fsspec

        try:
            if is_url(source):
                data = fetch_url(source, timeout_s)
            else:
                with fsspec.open(source, "rb") as f:
                    data = f.read()
        except UserError:
            raise
        except FileNotFoundError:
            raise UserError(f"query {source!r} is not a key or path in the set, a .npy, nor an image file") from None
        except Exception as exc:
            raise UserError(f"cannot read query {source}: {reason(exc)}") from None
        return data

    def crop(self, data: bytes, source: str) -> torch.Tensor:
        """The run's transform on the CPU: a (3, C, C) uint8 crop, or one line saying why not."""
        from pipeline.image.transform import crop_uint8

        try:
            return crop_uint8(data, self.transform)
        except Exception as exc:
            raise UserError(f"cannot decode the query image{f' {source}' if source else ''}: {reason(exc)}") from None

    def embed(self, crops: torch.Tensor) -> np.ndarray:
        """(B, 3, C, C) uint8 crops → (B, D) vectors, one model call."""
        return self.run(crops.to(self.device)).float().cpu().numpy()


def format_hits(hits: list[Hit], as_json: bool) -> str:
    import json

    if as_json:
        return "\n".join(json.dumps(asdict(h), ensure_ascii=False) for h in hits)
    lines, current = [], None
    for h in hits:
        if h.query != current:
            lines.append(f"# {h.query}")
            current = h.query
        line = f"{h.rank}\t{h.score:.4f}\t{h.path or h.key or h.row}"
        lines.append(line + ("\t" + " ".join(h.caption.split()) if h.caption else ""))  # one line a hit
    return "\n".join(lines)
