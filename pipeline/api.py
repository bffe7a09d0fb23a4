"""featpipe from Python (notebooks, your own scripts): the same code the command line runs, with
results returned and problems raised as exceptions (`pipeline.api.UserError`), never `sys.exit`.

    from pipeline import api

    api.pack("photos/", "shards/")
    result = api.extract("shards/", "features/", model="dinov2_vits14")
    features, paths = api.load_features("features/")
    api.match("features/", "matches/", k=10)
    groups = api.dedup("features/", "dedup/", threshold=0.95).groups
    hits = api.query("features/", ["query.jpg"], k=5)
    api.show("dedup/", "dedup.html")

    for crop, key, path in api.dataset("shards/"):   # featpipe's decode path in your own loop
        ...

Progress bars use tqdm.auto (widgets in Jupyter); logging goes to the "featpipe" logger, which a
library leaves to its caller to configure.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Union

import numpy as np

from pipeline.errors import UserError, reason

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "Extracted",
    "UserError",
    "dataset",
    "dedup",
    "extract",
    "index",
    "load_features",
    "match",
    "pack",
    "query",
    "serve",
    "show",
]


def pack(src: PathLike, dest: PathLike, **options: Any):
    """Image folder, bucket or list of images → WebDataset shards + manifest (see `featpipe pack`);
    options are PackConfig's fields (shard_size, max_shard_bytes, root, path_column, workers, …).
    Returns the PackResult (its `manifest`, shards packed and skipped)."""
    from pipeline.pack.packer import PackConfig, run_pack

    return run_pack(PackConfig(src=os.fspath(src), dest=os.fspath(dest), **options))


@dataclass
class Extracted:
    stats: dict  # stats.json's figures
    exit_code: int  # 0 done, 3 done with recorded failures
    files: dict[str, str] = field(default_factory=dict)  # fts.npy, fts.pth, img_list.json, errors.jsonl paths


def extract(
    shards: PathLike,
    out: PathLike,
    model: str = "dinov2_vits14",
    repo: str = "facebookresearch/dinov2",
    weights: PathLike | None = None,
    resize_size: int | None = None,
    crop_size: int | None = None,
    keep_ratio: bool | None = None,
    decode: str = "fast",
    image_field: str | None = None,
    meta: bool | list[str] = True,
    **options: Any,
) -> Extracted:
    """Shards (or a plain image folder) → features in OUT (see `featpipe extract`). `model` is a
    torch.hub entry in `repo`, or SOURCE:ID (timm:…, hf:…, open_clip:…, hub:…); preprocessing
    left None follows the model's own. `image_field` ("jpg;png") and `meta` (True: the caption and
    every scalar .json field, False: none, or the fields to keep) are `--image-field` and `--meta`.
    Options are ExtractConfig's fields (batch_size, workers, device, precision, overwrite, progress, …)."""
    from pipeline.extract.meta import SampleRules, parse_image_field, parse_meta
    from pipeline.extract.reader import ReadConfig
    from pipeline.extract.run import ExtractConfig, run_extract
    from pipeline.image.transform import TransformConfig
    from pipeline.models.base import ModelConfig
    from pipeline.outdir import METADATA_FILE

    shards, out = os.fspath(shards), os.fspath(out)
    weights = os.fspath(weights) if weights is not None else None
    given = {"resize_size": resize_size, "crop_size": crop_size, "keep_ratio": keep_ratio}
    explicit = {k: v for k, v in given.items() if v is not None}
    spec = model if ":" in model else None
    if image_field is not None or meta is not True:
        kept = None if meta is True else () if meta is False else parse_meta(",".join(meta))
        rules = SampleRules(parse_image_field(image_field) if image_field else SampleRules().image_fields, kept)
        options["read"] = replace(options.get("read", ReadConfig()), samples=rules)
    cfg = ExtractConfig(
        shards=shards,
        out=out,
        model=ModelConfig(repo, model, weights, spec) if spec is None else ModelConfig(weights=weights, spec=spec),
        transform=TransformConfig(mode=decode, **explicit),
        transform_set=frozenset(explicit),
        **options,
    )
    result = run_extract(cfg)
    names = cfg.names
    files = {n: os.path.join(out, n) for n in (*names.all(), METADATA_FILE)}
    return Extracted(result.stats, result.exit_code, files)


def load_features(out: PathLike, dtype: str = "float16", mmap: bool = True) -> tuple[np.ndarray, list[str]]:
    """(N×D features, N source paths) of an extract output: fts.npy memory-mapped (float16, read
    once, as pages are touched), or with dtype="float32" fts.pth's exact values."""
    from pipeline.outdir import OutputNames

    out = os.fspath(out)
    if dtype not in ("float16", "float32"):
        raise UserError(f"dtype must be 'float16' (fts.npy) or 'float32' (fts.pth), got {dtype!r}")
    if not os.path.isdir(out):
        raise UserError(
            f"{out} is not an extract output folder; load_features reads fts.npy, fts.pth and img_list.json "
            "from one (for a bare .npy, use numpy.load)"
        )
    names = OutputNames()
    no_copy = dtype == "float32" and os.path.exists(os.path.join(out, names.numpy_features))
    if no_copy and not os.path.exists(os.path.join(out, names.torch_features)):
        raise UserError(f"{out} has no fts.pth (extracted with --torch-features none): load dtype='float16'")
    try:
        with open(os.path.join(out, names.img_list), encoding="utf-8") as f:
            paths = json.load(f)
        if dtype == "float32":
            import torch

            feats = torch.load(
                os.path.join(out, names.torch_features), map_location="cpu", weights_only=True, mmap=mmap
            ).numpy()
        else:
            feats = np.load(os.path.join(out, names.numpy_features), mmap_mode="r" if mmap else None)
    except FileNotFoundError as exc:
        raise UserError(f"{out} has no consolidated features ({exc.filename}); run extract or consolidate") from None
    except (ValueError, OSError) as exc:
        raise UserError(
            f"{out}: its consolidated files are damaged ({reason(exc)}); run featpipe consolidate"
        ) from None
    if len(feats) != len(paths):
        raise UserError(f"{out}: {len(feats)} feature rows but {len(paths)} paths")
    return feats, paths


def match(features: PathLike, out: PathLike, k: int = 10, **options: Any):
    """All-vs-all kNN (see `featpipe match`); options are MatchConfig's fields. Returns MatchResult."""
    from pipeline.retrieve.match import MatchConfig, run_match

    return run_match(MatchConfig(features, out, k=k, **options))


def dedup(features: PathLike, out: PathLike, threshold: float, k: int = 10, linkage: str = "star", **search: Any):
    """Near-duplicate groups (see `featpipe dedup`). Returns DedupResult (`groups`, `report`, `histogram`)."""
    from pipeline.retrieve.dedup import DedupConfig, run_dedup

    return run_dedup(DedupConfig(os.fspath(features), os.fspath(out), threshold, k, linkage, search))


def index(
    features: PathLike,
    out: PathLike,
    index_key: str = "auto",
    memory_budget: int = 2 * 10**9,
    overwrite: bool = False,
    progress: bool = True,
    update: bool = False,
) -> dict:
    """A faiss index (see `featpipe index`); returns index.json's content."""
    from pipeline.retrieve.index import IndexConfig, build_index

    cfg = IndexConfig(os.fspath(features), os.fspath(out), index_key, memory_budget, overwrite, progress, update)
    return build_index(cfg)


def query(
    target: PathLike,
    queries: PathLike | list[PathLike] = (),
    k: int = 10,
    device: str = "cpu",
    timeout_s: float = 30,
    texts: str | list[str] = (),
) -> list:
    """Nearest rows to image files/URLs, keys, paths or .npy vectors, and to texts when the run's
    model has a text tower (see `featpipe query`): one query or a list of them; a list of Hit."""
    from pipeline.retrieve.query import run_query

    items = [queries] if isinstance(queries, str | os.PathLike) else list(queries)
    texts = [texts] if isinstance(texts, str) else list(texts)
    return run_query(os.fspath(target), [os.fspath(q) for q in items], k, device, timeout_s, texts)


def serve(target: PathLike, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", **limits: Any) -> None:
    """Run the query service (see `featpipe serve`) until interrupted; `limits` are
    serve.engine.Limits' fields (max_k, max_upload, max_batch, allow_urls, …). To mount it in your
    own ASGI app instead: `pipeline.serve.web.create_app(target, device, Limits(...))`."""
    from pipeline.serve.engine import Limits
    from pipeline.serve.server import serve as run

    run(os.fspath(target), host, port, device, Limits(**limits))


def show(source: PathLike, page: PathLike, sample: int = 100, thumb: int = 128, per_page: int = 25) -> list[str]:
    """Static HTML pages of a match or dedup (see `featpipe show`); returns their paths."""
    from pipeline.retrieve.show import run_show

    return run_show(os.fspath(source), os.fspath(page), sample, thumb, per_page)


def dataset(
    shards: PathLike,
    resize_size: int = 256,
    crop_size: int = 224,
    keep_ratio: bool = True,
    decode: str = "fast",
    group_size: int = 1000,
):
    """A torch IterableDataset over shards (or a plain image folder) yielding (uint8 crop (3, C, C),
    key, path): featpipe's decode path in your own DataLoader. Shards are split across DataLoader
    workers and, under torchrun, across ranks; no sample is lost or repeated. Samples that cannot be
    decoded are skipped (extract records them; this stream only logs nothing and moves on).

        loader = DataLoader(api.dataset("shards/"), batch_size=64, num_workers=4)
        for crops, keys, paths in loader:
            x = (crops.float() / 255 - mean) / std
    """
    from pipeline.extract.inputs import resolve_shards
    from pipeline.image.transform import TransformConfig

    transform = TransformConfig(resize_size, crop_size, keep_ratio, decode)
    transform.check()
    if decode == "device":
        raise UserError("dataset() decodes in the workers: use decode='fast' or 'exact'")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserError(f"--group-size must be at least 1, got {group_size!r}")
    refs = resolve_shards(os.fspath(shards), group_size)
    from pipeline.dist import DistContext
    from pipeline.extract.dataset import SampleStream

    ctx = DistContext.from_env()
    return SampleStream(refs[ctx.rank :: ctx.world], transform)
