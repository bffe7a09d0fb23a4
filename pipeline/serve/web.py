"""HTTP over the engine: thin Starlette routes, JSON errors ({"error": {"code", "message"}}), an
upload cap counted while the body streams in, CORS only when asked, readiness once loaded.

    GET  /                    the page
    GET  /healthz             200 once the index and model are loaded, 503 before
    GET  /metrics             Prometheus text
    GET  /api/info            N, D, model, transform, index, recall estimate, limits
    GET  /api/search          ?row= | ?key= | ?text= | ?url=, with &k= &offset=
    POST /api/search          an image (multipart field "image", or the raw body as image/*), or JSON
                              {"row"|"key"|"vector"|"text"|"url": …, "k": …, "offset": …}
    GET  /api/thumb/{row}     a JPEG thumbnail of a row the index knows (ETag, cached)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from pipeline.errors import UserError, first_line
from pipeline.serve.engine import Engine, Limits, ServiceError
from pipeline.serve.page import PAGE

log = logging.getLogger("featpipe")


def create_app(
    spec: str,
    device: str = "cpu",
    limits: Limits = Limits(),
    cors: str | None = None,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """The service as an ASGI app (mount it in your own): the engine loads in a thread at startup,
    and the API answers 503 until it is ready. With `allowed_hosts`, other Host headers get 400."""
    state: dict = {"engine": None, "error": None}

    def load() -> None:
        try:
            state["engine"] = Engine(spec, device, limits)
        except Exception as exc:  # shown by /healthz and every API call, not lost in a thread
            state["error"] = f"{first_line(exc)}"
            log.error("cannot load %s: %s", spec, first_line(exc))
            return
        log.info("ready: %s loaded, %d rows", spec, state["engine"].target.n)
        state["engine"].watch()  # this thread then checks for index updates (--reload-every)

    @contextlib.asynccontextmanager  # a bare async generator is deprecated (a warning at every start)
    async def lifespan(app):
        threading.Thread(target=load, daemon=True, name="featpipe-load").start()
        yield

    def engine() -> Engine:
        if state["engine"] is None:
            raise ServiceError(503, "loading", state["error"] or "the index and model are still loading", 2)
        return state["engine"]

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})

    async def health(request: Request) -> Response:
        engine()
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(engine().metrics.text())

    async def info(request: Request) -> Response:
        return JSONResponse(engine().info())

    async def search_get(request: Request) -> Response:
        q = request.query_params
        return await _search(engine(), dict(q), request_k(q))

    async def search_post(request: Request) -> Response:
        e = engine()
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind == "application/json":
            body = await _capped_body(request, 1 << 20, e.limits.read_timeout_s)
            try:
                query = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
                raise ServiceError(400, "bad_json", "the body is not valid JSON (or nested too deep)") from None
            if not isinstance(query, dict):
                raise ServiceError(400, "bad_json", "the body must be a JSON object")
            return await _search(e, query, (query.get("k"), query.get("offset")))
        if kind == "multipart/form-data" or kind.startswith("image/") or kind == "application/octet-stream":
            data = await _image_from(request, kind, e.limits.max_upload, e.limits.read_timeout_s)
            k, offset = e.check_k(*_ints(request_k(request.query_params)))
            started = time.perf_counter()
            hits = await e.by_image(data, k, offset)
            e.timed("image", started)
            return _hits(hits)
        raise ServiceError(415, "unsupported_media_type", "send an image (multipart field 'image' or image/*) or JSON")

    async def thumb(request: Request) -> Response:
        data, etag = await engine().thumbnail(_row(request.path_params["row"]))
        if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")} | {"*"} - {""}:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(data, media_type="image/jpeg", headers={"ETag": etag, "Cache-Control": "max-age=3600"})

    routes = [
        Route("/", page),
        Route("/healthz", health),
        Route("/metrics", metrics),
        Route("/api/info", info),
        Route("/api/search", search_get, methods=["GET"]),
        Route("/api/search", search_post, methods=["POST"]),
        Route("/api/thumb/{row}", thumb),
    ]
    handlers = {ServiceError: _service_error, Exception: _internal_error, 404: _not_found, 405: _not_allowed}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[cors], allow_methods=["GET", "POST"])
    if allowed_hosts and "*" not in allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        # Starlette reads the host up to the first colon: IPv6 literals cannot be listed, only names
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=[h for h in allowed_hosts if ":" not in h])
    app.state.featpipe = state
    return app


# The page's own inline script and style, images from this origin only: nothing from elsewhere.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'"
)


def request_k(q) -> tuple:
    return q.get("k"), q.get("offset")


_INT = re.compile(r"-?[0-9]{1,11}")  # ASCII digits only: int() also takes "²"-like digits and fails on them


def _ints(pair: tuple) -> tuple:
    """k and offset as given in a query string (text) or JSON (numbers)."""
    out = []
    for v in pair:
        if v is None or (isinstance(v, int) and not isinstance(v, bool)):
            out.append(v)
        elif isinstance(v, str) and _INT.fullmatch(v.strip()):
            out.append(int(v))
        else:
            raise ServiceError(422, "bad_k", "k and offset must be integers")
    return tuple(out)


def _row(value: object) -> int:
    """A row given as a number (JSON) or as decimal digits (query string); true is not row 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    raise ServiceError(404, "unknown_row", "rows are numbers")


async def _search(e: Engine, query: dict, k_offset: tuple) -> Response:
    k, offset = e.check_k(*_ints(k_offset))
    started = time.perf_counter()
    # Row, key and vector queries join the engine's batches (one index call for all waiting); a
    # text query's cost is its embedding, done in a worker thread so the event loop keeps going.
    if "row" in query:
        kind, hits = "row", await e.by_row(_row(query["row"]), k, offset)
    elif "key" in query:
        kind, hits = "key", await e.by_key(str(query["key"]), k, offset)
    elif "vector" in query:
        kind, hits = "vector", await e.by_vector(query["vector"], k, offset)
    elif "text" in query:
        kind, hits = "text", await run_in_threadpool(e.by_text, query["text"], k, offset)
    elif "url" in query:
        kind, hits = "url", await e.by_url(str(query["url"]), k, offset)
    else:
        raise ServiceError(400, "no_query", "give row, key, vector, text or url (or POST an image)")
    e.timed(kind, started)
    return _hits(hits)


def _hits(hits: list) -> Response:
    return JSONResponse({"hits": [{**asdict(h), "thumb": f"/api/thumb/{h.row}"} for h in hits]})


async def _capped_body(request: Request, cap: int, stall_s: float) -> bytes:
    """The body, refused with 413 once it passes `cap` bytes; what follows is read and dropped (up
    to 4 × cap) so that the client, still sending, gets the answer instead of a reset connection.
    A body that stops arriving for `stall_s` is answered 408 (a slow client holds no connection
    for long); a client that hangs up mid-upload is one counted error, not a traceback."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > 4 * cap:
        raise ServiceError(413, "too_large", f"the body is {int(length)} bytes; the limit is {cap}")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    try:
        while size <= 4 * cap:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), stall_s)
            except StopAsyncIteration:
                break
            size += len(chunk)
            if size <= cap:
                chunks.append(chunk)
    except TimeoutError:
        raise ServiceError(408, "body_timeout", f"the body stopped arriving for {stall_s:g} s", close=True) from None
    except ClientDisconnect:
        raise ServiceError(400, "client_disconnected", "the client hung up during the upload", close=True) from None
    if size > cap:
        raise ServiceError(413, "too_large", f"the body passed the limit of {cap} bytes")
    return b"".join(chunks)


async def _image_from(request: Request, kind: str, cap: int, stall_s: float) -> bytes:
    body = await _capped_body(request, cap + 64 * 1024, stall_s)  # room for the multipart envelope
    if kind != "multipart/form-data":
        if len(body) > cap:
            raise ServiceError(413, "too_large", f"the image passed the limit of {cap} bytes")
        return body
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, replay()).parse()
    except MultiPartException as exc:
        raise ServiceError(400, "bad_multipart", str(exc)) from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ServiceError(400, "no_image", "the form has no file field named 'image'")
    data = await upload.read()
    if len(data) > cap:
        raise ServiceError(413, "too_large", f"the image passed the limit of {cap} bytes")
    return data


def _error(status: int, code: str, message: str, retry_after: int | None = None, close: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    if close:  # the rest of a stalled or abandoned body must not be read as the next request
        headers["Connection"] = "close"
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _count(request: Request, code: str) -> None:
    state = request.app.state.featpipe
    if state["engine"] is not None:
        state["engine"].metrics.error(code)


async def _service_error(request: Request, exc: ServiceError) -> Response:
    _count(request, exc.code)
    return _error(exc.status, exc.code, exc.message, exc.retry_after, exc.close)


async def _internal_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, UserError):
        _count(request, "bad_query")
        return _error(422, "bad_query", str(exc))
    _count(request, "internal")
    log.exception("internal error on %s", request.url.path)
    return _error(500, "internal", f"{type(exc).__name__}: {first_line(exc)}")


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, "not_found", f"no such endpoint: {request.url.path}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return _error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
