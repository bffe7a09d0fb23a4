"""The retrieval verbs: match, dedup, index, query, show (parsers and commands)."""

from __future__ import annotations

import argparse

from pipeline.cli.args import (
    add_barrier_timeout,
    add_foreign_flags,
    cosine,
    import_foreign,
    non_negative,
    positive,
    size,
)
from pipeline.errors import EXIT_OK

FEATURES_HELP = (
    "an extract output folder, another tool's embeddings folder (clip-retrieval / embedding-reader "
    "img_emb/*.npy + metadata/*.parquet, or Parquet files with an embedding column), or a .npy / .pth file"
)


def add_match(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "match", help="features → all-vs-all k nearest neighbours (matches.npy, scores.npy, neighbors.parquet)"
    )
    m.add_argument("features", help=FEATURES_HELP)
    m.add_argument("out", help="output folder")
    add_foreign_flags(m)
    m.add_argument("-k", type=positive, default=10, help="neighbours per vector (default 10)")
    m.add_argument("--exclude-self", action="store_true", help="do not list each vector as its own neighbour")
    m.add_argument("--numpy-matches", default="matches.npy", help="neighbour rows file name in OUT (uint32)")
    m.add_argument("--numpy-similarity-scores", default="scores.npy", help="scores file name in OUT (float16)")
    _add_search_flags(m)
    m.set_defaults(run=_cmd_match)


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    """How the kNN search runs, for match and dedup."""
    p.add_argument(
        "--method",
        choices=("auto", "exact", "ivf"),
        default="auto",
        help="exact: every pair; ivf: a faiss IVF index tuned to recall@k ≥ 0.95; auto: exact while "
        "N²·D is small enough (see README)",
    )
    p.add_argument(
        "--memory-budget",
        type=size,
        default=2 * 10**9,
        metavar="SIZE",
        help="memory for the search tiles (default 2GB; accepts 512MB)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace results made earlier in OUT")
    p.add_argument(
        "--update",
        action="store_true",
        help="FEATURES grew (or lost rows) since OUT was made: search only what changed (see README)",
    )
    p.add_argument("--create-bucket", action="store_true", help="create OUT's bucket if it does not exist")
    add_barrier_timeout(p, "how long rank 0 waits for the slowest rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _search_settings(args: argparse.Namespace) -> dict:
    return {
        "method": args.method,
        "memory_budget": args.memory_budget,
        "device": args.device,
        "overwrite": args.overwrite,
        "update": args.update,
        "progress": not args.no_progress,
        "barrier_timeout_s": args.barrier_timeout,
        "create_bucket": args.create_bucket,
    }


def add_dedup(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dedup", help="features → near-duplicate groups (groups.json, duplicates.json, to_remove.txt)")
    d.add_argument("features", help=FEATURES_HELP)
    add_foreign_flags(d)
    d.add_argument("out", help="output folder (also holds the kNN search it rides on)")
    d.add_argument(
        "--threshold",
        type=cosine,
        required=True,
        help="cosine similarity at or above which two images are duplicates (the printed histogram "
        "helps to choose it for a model)",
    )
    d.add_argument("-k", type=positive, default=10, help="neighbours looked at per image (the largest group size)")
    d.add_argument(
        "--linkage",
        choices=("star", "connected"),
        default="star",
        help="star: every member within the threshold of its representative (default); connected: "
        "connected components, which can chain unrelated images",
    )
    _add_search_flags(d)
    d.set_defaults(run=_cmd_dedup)


def add_index(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("index", help="features → a faiss index (index.faiss, ids.parquet, index.json) to query")
    i.add_argument("features", help=FEATURES_HELP)
    add_foreign_flags(i)
    i.add_argument("index", help="output folder for the index")
    i.add_argument(
        "--index-key",
        default="auto",
        help="auto (Flat, HNSW or IVF by N and the memory budget; see README) or any faiss "
        "index_factory string, e.g. IVF1024,PQ32",
    )
    i.add_argument(
        "--memory-budget", type=size, default=2 * 10**9, metavar="SIZE", help="memory the index may take (default 2GB)"
    )
    i.add_argument("--overwrite", action="store_true", help="replace an index built earlier in INDEX")
    i.add_argument(
        "--update",
        action="store_true",
        help="add the rows FEATURES gained since INDEX was built and drop removed ones (rebuilds when it must)",
    )
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    i.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    i.set_defaults(run=_cmd_index)
    q = sub.add_parser("query", help="nearest images to an image file or URL, a key or path in the set, or vectors")
    q.add_argument("target", metavar="INDEX_OR_FEATURES", help="an index folder, or FEATURES searched exactly")
    add_foreign_flags(q)
    q.add_argument(
        "queries",
        metavar="QUERY",
        nargs="*",
        help="an image file or URL (embedded with the extract run's model), a key or path in the set, "
        "or a .npy of vectors",
    )
    q.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="a text query, embedded with the run's text tower (open_clip, HF CLIP/SigLIP); repeat for more",
    )
    q.add_argument("-k", type=positive, default=10, help="neighbours per query (default 10)")
    q.add_argument("--json", action="store_true", help="JSON lines instead of rank, score, path")
    q.add_argument("--device", default="auto", help="where to embed image queries: auto, cpu, cuda")
    q.add_argument(
        "--timeout",
        type=positive,
        default=30,
        metavar="SECONDS",
        help="give up on an image URL not fetched whole within this many seconds (default 30)",
    )
    q.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    q.set_defaults(run=_cmd_query)


def add_serve(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("serve", help="the index as a query service with a page in the browser")
    v.add_argument("target", metavar="INDEX_OR_FEATURES", help="an index folder, or FEATURES searched exactly")
    add_foreign_flags(v)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=non_negative, default=8000, help="port (default 8000; 0 picks a free one)")
    v.add_argument("--device", default="auto", help="where to embed image and text queries: auto, cpu, cuda")
    v.add_argument(
        "-k", type=positive, default=10, help="neighbours per query when a request does not say (default 10)"
    )
    v.add_argument("--max-k", type=positive, default=1000, help="largest k + offset a request may ask (default 1000)")
    v.add_argument(
        "--max-upload", type=size, default=20 << 20, metavar="SIZE", help="largest image upload (default 20MiB)"
    )
    v.add_argument("--max-batch", type=positive, default=32, help="image queries embedded together (default 32)")
    v.add_argument(
        "--batch-wait-ms", type=non_negative, default=5, help="how long an image query waits for company (default 5)"
    )
    v.add_argument("--queue", type=positive, default=256, help="image queries waiting before 503 (default 256)")
    v.add_argument(
        "--allow-urls",
        action="store_true",
        help="search by image URL (http/https to public addresses only, no redirects, 10 s timeout)",
    )
    v.add_argument("--cors", metavar="ORIGIN", default=None, help="allow this origin's pages to call the API")
    v.add_argument(
        "--reload-every",
        type=non_negative,
        default=30,
        metavar="SECONDS",
        help="check the index's files this often and load an update (index --update) without a restart; 0: never "
        "(default 30)",
    )
    v.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name requests may carry besides the address listened on (repeatable; on loopback, "
        "localhost is allowed too): other Host headers get 400, so a DNS-rebinding page cannot reach it",
    )
    v.add_argument(
        "--read-timeout",
        type=positive,
        default=15,
        metavar="SECONDS",
        help="a request's headers, or a pause in its body, longer than this closes it (default 15)",
    )
    v.set_defaults(run=_cmd_serve)


def add_show(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("show", help="a static HTML page of a match's neighbours or a dedup's groups")
    s.add_argument("source", metavar="MATCH_OR_DEDUP", help="the OUT folder of featpipe match or featpipe dedup")
    s.add_argument("page", help="the page to write, e.g. page.html (more pages: page-2.html, …)")
    s.add_argument("--sample", type=positive, default=100, help="queries (match) or groups (dedup) shown (default 100)")
    s.add_argument("--thumb", type=positive, default=128, help="thumbnail size in pixels (default 128)")
    s.add_argument("--per-page", type=positive, default=25, help="queries or groups per page (default 25)")
    s.set_defaults(run=_cmd_show)


def _cmd_match(args: argparse.Namespace) -> int:
    from pipeline.retrieve.match import MatchConfig, MatchNames, run_match, summary

    import_foreign(args.features, args)
    names = MatchNames(args.numpy_matches, args.numpy_similarity_scores)
    cfg = MatchConfig(
        args.features, args.out, k=args.k, exclude_self=args.exclude_self, names=names, **_search_settings(args)
    )
    print(summary(run_match(cfg)))
    return EXIT_OK


def _cmd_dedup(args: argparse.Namespace) -> int:
    from pipeline.retrieve.dedup import DedupConfig, run_dedup, summary

    import_foreign(args.features, args)
    cfg = DedupConfig(args.features, args.out, args.threshold, args.k, args.linkage, _search_settings(args))
    print(summary(run_dedup(cfg), args.out.rstrip("/")))
    return EXIT_OK


def _cmd_index(args: argparse.Namespace) -> int:
    from pipeline.retrieve.index import IndexConfig, build_index, summary

    import_foreign(args.features, args)
    cfg = IndexConfig(
        args.features,
        args.index,
        args.index_key,
        args.memory_budget,
        args.overwrite,
        progress=not args.no_progress,
        update=args.update,
    )
    meta = build_index(cfg)
    if meta is not None:  # None on the ranks other than 0 of a build under torchrun
        print(summary(meta, args.index))
    return EXIT_OK


def _cmd_query(args: argparse.Namespace) -> int:
    from pipeline.retrieve.query import format_hits, run_query

    import_foreign(args.target, args)
    hits = run_query(args.target, args.queries, args.k, args.device, args.timeout, args.text)
    print(format_hits(hits, args.json))
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.dist import pick_device
    from pipeline.serve.engine import Limits
    from pipeline.serve.server import serve

    import_foreign(args.target, args)
    limits = Limits(
        default_k=args.k,
        max_k=args.max_k,
        max_upload=args.max_upload,
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000,
        queue=args.queue,
        allow_urls=args.allow_urls,
        reload_s=args.reload_every,
        read_timeout_s=float(args.read_timeout),
    )
    serve(args.target, args.host, args.port, pick_device(args.device, 0), limits, args.cors, args.allow_host)
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from pipeline.retrieve.show import run_show, summary

    print(summary(run_show(args.source, args.page, args.sample, args.thumb, args.per_page)))
    return EXIT_OK
