"""Running the app: uvicorn on a socket bound here (so `--port 0` can say which port it got), on
loopback unless told otherwise, and saying so when not."""

from __future__ import annotations

import ipaddress
import logging
import socket

from pipeline.errors import UserError
from pipeline.serve.engine import Limits

log = logging.getLogger("featpipe")


def serve(
    spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    limits: Limits = Limits(),
    cors: str | None = None,
    allow_hosts: list[str] = (),
) -> None:
    try:
        import uvicorn

        from pipeline.serve.web import create_app
    except ImportError:
        raise UserError("featpipe serve needs starlette and uvicorn: pip install 'featpipe[serve]'") from None
    from pipeline.retrieve.query import Target

    Target.check(spec)  # a wrong path is one line and exit 2, before listening
    app = create_app(spec, device, limits, cors, allowed_hosts(host, allow_hosts))
    sock = _bind(host, port)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    if not _is_loopback(host):
        log.warning(
            "listening on %s, not loopback: anyone who can reach this machine can query it; put a reverse proxy "
            "with TLS and authentication in front for the internet",
            host,
        )
    print(f"featpipe serve: {spec} on {where} (the index loads now; {where}/healthz says when it is ready)", flush=True)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        http=_guarded_http(limits.read_timeout_s),
    )
    uvicorn.Server(config).run(sockets=[sock])


def _guarded_http(header_timeout_s: float):
    """uvicorn's httptools protocol with a deadline on each request's headers: uvicorn arms its
    keep-alive timer only after a first response, so a client that connects and sends nothing, or
    half a header line, held its connection for ever (a slowloris). The timer starts when the
    connection opens (or the next request's first byte comes) and stops when the headers are
    complete; the body's pauses are bounded in web.py. Without httptools, uvicorn's default."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class GuardedHttp(HttpToolsProtocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedHttp


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """Host header values the service answers: the address it listens on (and localhost's names on
    loopback) plus the user's; any host when it listens on every address and none were named."""
    if (host in ("0.0.0.0", "") or ":" in host) and not extra:  # every address, or IPv6 (see web.py)
        return ["*"]
    names = {host.strip("[]"), *extra}
    if _is_loopback(host):
        names |= {"localhost", "127.0.0.1", "::1"}
    return sorted(names)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
