"""Errors a user can act on, the exit statuses featpipe promises, and the record of one sample
that could not be embedded (one definition, serialised in one place)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

EXIT_OK = 0
EXIT_ABORTED = 1
EXIT_USAGE = 2  # argparse's own status for a bad flag
EXIT_FAILURES = 3  # completed, but some samples or shards were recorded as failed


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line, never a traceback."""


def reason(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (none when empty)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
