"""`featpipe query INDEX_OR_FEATURES QUERY…`: the nearest vectors to each query. A QUERY is an
image file or URL (embedded with the model, weights and transform the extract run recorded), a key
or path already in the set, or a `.npy` of vectors (one query per row). Scores are exact cosines
(recomputed from the stored vectors when the index keeps only codes)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from pipeline.errors import UserError, reason
from pipeline.outdir import load_run
from pipeline.retrieve import load_faiss
from pipeline.retrieve.ann import set_search_parameter
from pipeline.retrieve.features import open_features
from pipeline.retrieve.index import IDS_FILE, INDEX_FILE, META_FILE
from pipeline.retrieve.knn import CANDIDATE_MARGIN, ExactSearch, finish_rows, normalize, plan_tiles, valid_rows
from pipeline.storage import locate, read_json


@dataclass(frozen=True)
class Hit:
    query: str
    rank: int
    score: float
    row: int
    key: str | None
    path: str | None


class Target:
    """What the queries are searched in: a built index, or FEATURES searched exactly."""

    def __init__(self, spec: str):
        self.spec = spec
        self.meta = None
        if os.path.isfile(os.path.join(spec, META_FILE)):
            self.meta = read_json(locate(spec).fs, os.path.join(spec, META_FILE))
            self.features = open_features(self.meta["features"]) if os.path.exists(self.meta["features"]) else None
        else:
            self.features = open_features(spec)

    @property
    def dim(self) -> int:
        return self.meta["dim"] if self.meta else self.features.dim

    @cached_property
    def ids(self) -> tuple[list, list]:
        """(keys, paths) by row."""
        if self.meta:
            import pyarrow.parquet as pq

            t = pq.read_table(os.path.join(self.spec, IDS_FILE), use_threads=False)
            return t.column("key").to_pylist(), t.column("path").to_pylist()
        fs = self.features
        return fs.keys or [None] * fs.n, fs.paths or [None] * fs.n

    @cached_property
    def embedder(self) -> dict | None:
        if self.meta:
            return self.meta.get("embedder")
        return load_run(locate(self.features.folder)).extra.get("embedder") if self.features.folder else None

    @cached_property
    def _index(self):
        faiss = load_faiss()

        index = faiss.read_index(os.path.join(self.spec, INDEX_FILE))
        set_search_parameter(index, self.meta["search_parameter"], self.meta["value"])
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        count = k + CANDIDATE_MARGIN
        if self.meta:
            cand = self._index.search(queries, count)[1]
            if self.features is None:  # the stored vectors are gone: the index's own scores
                scores, ids = self._index.search(queries, k)
                return ids, scores
        else:
            fs = self.features
            tiling = plan_tiles(fs.n, fs.dim, count, 2 * 10**9)
            cand = ExactSearch(fs, valid_rows(fs, tiling.db_rows), tiling).candidates(queries, count)
        no_identity = np.full(len(queries), -1)
        ids, scores = finish_rows(self.features, no_identity, queries, cand, k, "keep")
        return np.where(ids == np.iinfo(np.uint32).max, -1, ids.astype(np.int64)), scores

    def vector_of(self, row: int) -> np.ndarray:
        if self.features is None:
            return self._index.reconstruct(row)[None, :]
        return self.features.read(row, row + 1)


def run_query(target_spec: str, queries: list[str], k: int, device: str = "cpu") -> list[Hit]:
    target = Target(target_spec)
    labels, vectors = [], []
    embedder = None
    keys, paths = target.ids
    lookup = {v: i for i, v in enumerate(keys) if v is not None} | {v: i for i, v in enumerate(paths) if v is not None}
    for q in queries:
        if q.endswith(".npy"):
            rows = _npy_queries(q)
            labels += [f"{q}[{i}]" for i in range(len(rows))]
            vectors.append(rows)
        elif q in lookup:
            labels.append(q)
            vectors.append(target.vector_of(lookup[q]))
        else:
            if embedder is None:
                embedder = Embedder(target.embedder, target_spec, device)
            labels.append(q)
            vectors.append(embedder(q))
    x = np.concatenate(vectors).astype(np.float32)
    if x.shape[1] != target.dim:
        raise UserError(f"{target_spec} holds {target.dim}-dim vectors; the queries are {x.shape[1]}-dim")
    ids, scores = target.search(normalize(x), k)
    return [
        Hit(labels[i], r, float(scores[i, r]), int(ids[i, r]), keys[ids[i, r]], paths[ids[i, r]])
        for i in range(len(labels))
        for r in range(ids.shape[1])
        if ids[i, r] >= 0
    ]


def _npy_queries(path: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"cannot read query vectors {path}: {reason(exc)}") from None
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
        from pipeline.extract.model import ModelConfig, load_model
        from pipeline.extract.runner import ModelRunner
        from pipeline.image.transform import TransformConfig

        m = meta["model"]
        t = dict(meta["transform"])
        t["mode"] = "fast" if t.get("mode") == "device" else t.get("mode", "fast")
        self.transform = TransformConfig(**t)
        self.device = torch.device(pick_device(device, 0))
        model = load_model(ModelConfig(m["repo"], m["name"], m["weights"])).to(self.device)
        self.run = ModelRunner(model, self.device, None, 1)

    def __call__(self, source: str) -> np.ndarray:
        import fsspec

        from pipeline.image.transform import crop_uint8

        try:
            with fsspec.open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise UserError(f"query {source!r} is not a key or path in the set, a .npy, nor an image file") from None
        except Exception as exc:
            raise UserError(f"cannot read query {source}: {reason(exc)}") from None
        try:
            crop = crop_uint8(data, self.transform)
        except Exception as exc:
            raise UserError(f"cannot decode query image {source}: {reason(exc)}") from None
        return self.run(crop[None].to(self.device)).float().cpu().numpy()


def format_hits(hits: list[Hit], as_json: bool) -> str:
    import json

    if as_json:
        return "\n".join(json.dumps(asdict(h), ensure_ascii=False) for h in hits)
    lines, current = [], None
    for h in hits:
        if h.query != current:
            lines.append(f"# {h.query}")
            current = h.query
        lines.append(f"{h.rank}\t{h.score:.4f}\t{h.path or h.key or h.row}")
    return "\n".join(lines)
