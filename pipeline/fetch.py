"""Image URLs given as queries: fetched over http(s) with a timeout on connecting and on each read,
a cap on bytes, and a failure said as what happened (HTTP 404 from …, timed out after N s,
connection refused), never a hang or a guess."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from pipeline.errors import UserError, first_line

MAX_BYTES = 50 << 20  # a query image larger than this is not a photo anyone meant to send


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch_url(url: str, timeout_s: float, max_bytes: int = MAX_BYTES) -> bytes:
    """The body of a GET; UserError with the cause in one line. The timeout bounds the connection
    and every read (a server that sends nothing is given up on after `timeout_s`)."""
    request = urllib.request.Request(url, headers={"User-Agent": "featpipe"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise UserError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except urllib.error.URLError as exc:
        raise UserError(f"cannot fetch {url}: {_cause(exc.reason, timeout_s)}") from None
    except TimeoutError:
        raise UserError(f"cannot fetch {url}: timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise UserError(f"cannot fetch {url}: {_cause(exc, timeout_s)}") from None
    if len(data) > max_bytes:
        raise UserError(f"{url} is larger than {max_bytes >> 20} MB; not fetched")
    return data


def _cause(reason: object, timeout_s: float) -> str:
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"timed out after {timeout_s:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"host not found ({first_line(reason)})"
    return first_line(reason) if isinstance(reason, BaseException) else str(reason)
