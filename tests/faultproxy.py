"""A loopback HTTP proxy in front of moto's S3 server, for tests: it adds latency to every request,
resets every n-th connection, answers bursts of HTTP 503 SlowDown, and counts what it saw (requests
in flight at once, LIST requests in flight at once). Only 127.0.0.1, on both sides."""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Faults:
    latency_s: float = 0.0  # added before each request is forwarded
    reset_every: int = 0  # every n-th request: the connection is reset, no answer
    slowdown_every: int = 0  # every n-th request starts a burst of 503 SlowDown answers …
    slowdown_burst: int = 3  # … this many long
    fail_writes: bool = False  # every PUT/POST answered 503 (past any retry)
    fail_paths: tuple[str, ...] = ()  # GETs of paths containing any of these: 503, always


@dataclass
class Counts:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    lists_in_flight: int = 0
    max_lists_in_flight: int = 0
    lists: int = 0
    resets: int = 0
    slowdowns: int = 0
    methods: dict = field(default_factory=dict)


class FaultProxy:
    def __init__(self, upstream: str, faults: Faults | None = None):
        self.upstream = urlsplit(upstream)
        self.faults = faults or Faults()
        self.counts = Counts()
        self._lock = threading.Lock()
        self._burst_left = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, base: dict) -> dict:
        return {**base, "AWS_ENDPOINT_URL_S3": self.url, "FSSPEC_S3_ENDPOINT_URL": self.url}

    # ---------------------------------------------------------------------------------------------

    def _decide(self, method: str) -> str:
        with self._lock:
            self.counts.requests += 1
            self.counts.methods[method] = self.counts.methods.get(method, 0) + 1
            n, f = self.counts.requests, self.faults
            if f.fail_writes and method in ("PUT", "POST"):
                return "slowdown"
            if f.reset_every and n % f.reset_every == 0:
                self.counts.resets += 1
                return "reset"
            if f.slowdown_every and n % f.slowdown_every == 0:
                self._burst_left = f.slowdown_burst
            if self._burst_left:
                self._burst_left -= 1
                self.counts.slowdowns += 1
                return "slowdown"
            return "forward"

    def _track(self, is_list: bool, delta: int) -> None:
        with self._lock:
            c = self.counts
            c.in_flight += delta
            c.max_in_flight = max(c.max_in_flight, c.in_flight)
            if is_list:
                c.lists += delta > 0
                c.lists_in_flight += delta
                c.max_lists_in_flight = max(c.max_lists_in_flight, c.lists_in_flight)

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        path = h.path
        is_list = h.command == "GET" and ("list-type=" in path or "prefix=" in path or "delimiter=" in path)
        self._track(is_list, +1)
        try:
            time.sleep(self.faults.latency_s)
            action = self._decide(h.command)
            if h.command == "GET" and any(p in path for p in self.faults.fail_paths):
                action = "slowdown"
            if action == "reset":
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                h.close_connection = True
                h.connection.close()
                return
            if action == "slowdown":
                self._reply(h, 503, [("Content-Type", "application/xml")], SLOWDOWN)
                return
            status, headers, data = self._forward(h, body)
            self._reply(h, status, headers, data)
        finally:
            self._track(is_list, -1)

    def _forward(self, h, body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            send = body if body or h.command in ("PUT", "POST") else None
            conn.request(h.command, h.path, body=send, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], data
        finally:
            conn.close()

    @staticmethod
    def _reply(h, status: int, headers: list, data: bytes) -> None:
        h.send_response(status)
        for k, v in headers:
            if k.lower() != "content-length" or h.command == "HEAD":  # a HEAD's length is the object's
                h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
