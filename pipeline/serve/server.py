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
    spec: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", limits: Limits = Limits(), cors=None
) -> None:
    try:
        import uvicorn

        from pipeline.serve.web import create_app
    except ImportError:
        raise UserError("featpipe serve needs starlette and uvicorn: pip install 'featpipe[serve]'") from None
    app = create_app(spec, device, limits, cors)
    sock = _bind(host, port)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    if not _is_loopback(host):
        log.warning(
            "listening on %s, not loopback: anyone who can reach this machine can query it; put a reverse proxy "
            "with TLS and authentication in front for the internet",
            host,
        )
    print(f"featpipe serve: {spec} on {where} (the index loads now; {where}/healthz says when it is ready)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


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
