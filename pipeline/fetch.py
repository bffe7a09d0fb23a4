"""Image URLs given as queries: fetched over http(s) with one deadline for connecting and every read,
a cap on bytes, and a failure said as what happened (HTTP 404 from …, timed out after N s,
connection refused), never a hang or a guess. For a service (`public_only`), the URL must name a
public address: http(s) only, no loopback, private, link-local or reserved address, no redirect
(each hop would need the same check). The name is resolved and checked before connecting; a DNS
answer that changes between the check and the connection is not caught (a resolver you trust is
assumed, or run the service without --allow-urls)."""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from pipeline.errors import UserError, first_line

MAX_BYTES = 50 << 20  # a query image larger than this is not a photo anyone meant to send


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class Forbidden(UserError):
    """A URL a service must not fetch."""


def check_public(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Forbidden(f"only http and https URLs are fetched, not {parts.scheme or 'this'}: {url}")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, ValueError) as exc:
        raise UserError(f"cannot fetch {url}: host not found ({first_line(exc)})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not address.is_global or address.is_multicast:
            raise Forbidden(f"{url} resolves to {address}, a loopback, private or reserved address: not fetched")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed", headers, fp)


def fetch_url(url: str, timeout_s: float, max_bytes: int = MAX_BYTES, public_only: bool = False) -> bytes:
    """The body of a GET; UserError with the cause in one line. `timeout_s` is one deadline for the
    whole fetch (connecting and every read): a server that drips a byte every second is given up on
    at the deadline, not kept going by each read's own timeout."""
    deadline = time.monotonic() + timeout_s
    if public_only:
        check_public(url)
    request = urllib.request.Request(url, headers={"User-Agent": "featpipe"})
    opener = urllib.request.build_opener(_NoRedirect) if public_only else urllib.request.build_opener()
    try:
        with opener.open(request, timeout=_left(deadline, timeout_s)) as response:
            data = _read_until(response, deadline, timeout_s, max_bytes + 1)
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


def _left(deadline: float, timeout_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out after {timeout_s:g} s")
    return left


def _read_until(response, deadline: float, timeout_s: float, limit: int) -> bytes:
    """Read what arrives (read1: one receive at a time, never waiting for a full buffer), each
    wait bounded by the time left to the deadline."""
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)  # the socket under http.client
    parts, size = [], 0
    while size < limit:
        if sock is not None:
            sock.settimeout(_left(deadline, timeout_s))
        part = response.read1(min(1 << 16, limit - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
        _left(deadline, timeout_s)
    return b"".join(parts)


def _cause(reason: object, timeout_s: float) -> str:
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"timed out after {timeout_s:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"host not found ({first_line(reason)})"
    return first_line(reason) if isinstance(reason, BaseException) else str(reason)
