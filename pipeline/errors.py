"""Errors a user can act on, the exit statuses featpipe promises, and the record of one sample
that could not be embedded (one definition, serialised in one place)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

EXIT_OK = 0
EXIT_ABORTED = 1
EXIT_USAGE = 2  # argparse's own status for a bad flag
EXIT_FAILURES = 3  # completed, but some samples or shards were recorded as failed


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line, never a traceback."""


# An object's repr inside a message (Pillow's "cannot identify image file <_io.BytesIO object at
# 0x7f…>"): it tells a user nothing and its address changes every run, so records would differ.
_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


def reason(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (none when empty)."""
    line = _first(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    return _first(exc) or type(exc).__name__


def _first(exc: BaseException) -> str:
    lines = _OBJECT_REPR.sub("", str(exc)).strip().splitlines()
    return lines[0] if lines else ""


@dataclass(frozen=True)
class SampleError:
    """One sample that did not become a row, and why; a whole shard's failure has no key or index."""

    shard: str
    key: str | None
    path: str | None
    index: int | None
    reason: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SampleError:
        return cls(data["shard"], data["key"], data["path"], data["index"], data["reason"])
