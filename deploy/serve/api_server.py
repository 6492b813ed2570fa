"""FastAPI wiring: routes -> serving classes, errors -> OpenAI error bodies, /metrics, /health.

`build_app(engine, model_name)` is the one app: `tokenskip serve` runs it under uvicorn, and
`tokenskip serve --ray` wraps the very same app in a Ray Serve deployment (ray_app.py). Every
error answers with OpenAI's `{"error": {"message", "type", "param", "code"}}` body: a client
mistake is a 400 (FastAPI's own 422 included), an unknown route 404, a wrong method 405, a body
past `--max-body-bytes` 413 (checked before the body is parsed), a full queue 429, a stopped
engine 503, an unexpected failure 500, never a bare trace.
"""

from __future__ import annotations

import sys
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from .engine import AsyncEngine
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, ServeError, new_id
from .serving import ClientGone, OpenAIServing, ServingChat, ServingCompletion

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
SSE_PING_S = 15  # keep-alive comments while a request waits in the queue
MIN_BODY_BYTES = 2 * 2**20  # the default body limit's floor: 2 MiB
BODY_BYTES_PER_TOKEN = 64  # a context's worth of tokens as JSON text, generously (escapes, chat framing)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _error(exc: ServeError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "malformed request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    where = ".".join(loc) or "body"
    return f"{where}: {first.get('msg', 'invalid value')}", (loc[0] if loc else None)


def body_limit(settings, max_length: int | None) -> int:
    """--max-body-bytes, or by default 64 bytes per token of context, at least 2 MiB: any prompt
    that fits the context fits the body, and a body far past it is refused unread."""
    if settings.max_body_bytes is not None:
        return settings.max_body_bytes
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * (max_length or 0))


class LimitBody:
    """Pure ASGI middleware: a request body past `limit` bytes is answered 413 before anything
    parses it (by Content-Length when given, else counted as it streams in); the body read so far
    is replayed to the app, and later messages (a disconnect) pass through."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send, None)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int | None) -> None:
        said = f"{size} bytes" if size is not None else "more than that"
        body = ServeError(413, f"the request body is {said}; this server accepts at most {self.limit} bytes "
                          "(--max-body-bytes)", "invalid_request_error", code="request_too_large").body()
        response = JSONResponse(body, status_code=413, headers={"Connection": "close"})
        await response({"type": "http"}, _no_receive, send)


async def _no_receive():
    return {"type": "http.disconnect"}


class CountRequests:
    """Pure ASGI middleware: count requests by route and status (streams included, unlike
    BaseHTTPMiddleware it leaves disconnect detection alone)."""

    def __init__(self, app, engine: AsyncEngine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 499}  # nothing sent: the client left first

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            self.engine.stats.requests.labels(path if path in ROUTES else "other", str(status["code"])).inc()


def build_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    completion = ServingCompletion(engine, model_name)
    chat = ServingChat(engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    engine.start()  # here, not in the lifespan: a Ray Serve replica may not run the lifespan

    app = FastAPI(title="tokenskip", description="OpenAI-compatible server for token-routed models",
                  lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(LimitBody, limit=body_limit(engine.settings, engine.info.max_length))
    app.add_middleware(CountRequests, engine=engine)  # outermost: counts the 413s too

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, exc: ServeError):
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown route, wrong method, ...
        code = HTTP_CODES.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        where = f"{request.method} {request.url.path}"
        message = {404: f"{where}: no such route (the API: /v1/completions, /v1/chat/completions, /v1/models)",
                   405: f"{where}: method not allowed on this route"}.get(exc.status_code, str(exc.detail))
        response = _error(ServeError(exc.status_code, message, kind, code=code))
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(ServeError(400, message, "invalid_request_error", param))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return _error(ServeError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    async def run(serving: OpenAIServing, request, raw: Request):
        if not engine.alive:
            raise engine.refusal()  # stopped, failed or draining
        prepared = await serving.prepare(request)
        rid = new_id(serving.id_prefix)
        handle = serving.submit(rid, prepared)
        try:
            prompt_lp = await serving.prompt_entries(prepared)
        except BaseException:
            if handle is not None:
                handle.abort()
            raise
        if request.stream:
            return EventSourceResponse(serving.stream(request, rid, handle, prepared, prompt_lp), ping=SSE_PING_S,
                                       sep="\n")
        try:
            return await serving.collect(raw, rid, handle, prepared, prompt_lp)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request):
        return await run(completion, request, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request):
        return await run(chat, request, raw)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.info.max_length)])

    @app.get("/health")
    async def health():
        body = engine.health()
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.stats.render(), media_type=engine.stats.content_type)

    return app
