"""The `featpipe` command line: one parser per verb, in cli/produce.py (pack, extract, consolidate,
verify) and cli/retrieve.py (match, dedup, index, query, show, serve); each stage's module is
imported only when its command runs, so `featpipe pack` starts fast and its workers stay light
(no torch). Imports go one way: this module → the stages, never back."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import __version__
from pipeline.cli.produce import add_consolidate_verify, add_extract, add_pack
from pipeline.cli.retrieve import add_dedup, add_index, add_match, add_serve, add_show
from pipeline.cpu import prefer_sleeping_threads
from pipeline.errors import EXIT_ABORTED, UserError, reason

DESCRIPTION = (
    "Images (folders, buckets, inventory lists) → WebDataset shards → feature vectors (fts.npy, fts.pth, "
    "Parquet chunks) → neighbours, duplicate groups, indexes, queries and a query service. "
    "`featpipe COMMAND --help` for each command."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featpipe", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"featpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_pack(sub)
    add_extract(sub)
    add_consolidate_verify(sub)
    add_match(sub)
    add_dedup(sub)
    add_index(sub)
    add_show(sub)
    add_serve(sub)
    return parser


def _configure_logging(prog: str, verbose: bool) -> None:
    """featpipe's own messages under its name; other libraries' only at warning level, or at -v
    under their own names (faiss, s3fs, gcsfs and botocore log INFO lines on every run)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    ours = logging.getLogger("featpipe")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format=f"{prog}: [%(name)s] %(message)s"
    )


def _is_environment_error(exc: BaseException) -> bool:
    """A full disk, a read-only folder, an unreachable endpoint, refused credentials: the user's
    to fix, so one line naming the cause, not a traceback. Object-store clients raise their own
    types, recognised by the library they come from."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "google", "gcsfs", "s3fs")


def main(argv: list[str] | None = None, prog: str = "featpipe") -> int:
    prefer_sleeping_threads()  # before torch is imported
    args = build_parser().parse_args(argv)
    _configure_logging(prog, getattr(args, "verbose", False))
    try:
        return args.run(args)
    except UserError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as exc:
        if not _is_environment_error(exc):
            raise  # a bug in featpipe: the traceback is what a report needs
        print(f"{prog} {args.command}: error: {reason(exc)}", file=sys.stderr)
        return EXIT_ABORTED
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
