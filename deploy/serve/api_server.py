"""FastAPI wiring: routes -> serving classes, errors -> OpenAI error bodies, /metrics, /health.

`build_app(engine, model_name)` is the one app: `tokenskip serve` runs it under uvicorn, and
`tokenskip serve --ray` wraps the very same app in a Ray Serve deployment (ray_app.py). Every
client mistake is a 400 (FastAPI's own 422 included) with OpenAI's `{"error": {...}}` body; a
full queue is a 429; an unexpected failure is a 500 with the same body shape, never a bare trace.
"""

from __future__ import annotations

import sys
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from .engine import AsyncEngine
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, ServeError, new_id
from .serving import ClientGone, OpenAIServing, ServingChat, ServingCompletion

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
SSE_PING_S = 15  # keep-alive comments while a request waits in the queue


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
    app.add_middleware(CountRequests, engine=engine)

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, exc: ServeError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(ServeError(400, message, "invalid_request_error", param))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return _error(ServeError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    async def run(serving: OpenAIServing, request, raw: Request):
        ids, sampling, eos, stops = serving.prepare(request)
        handle = serving.submit(new_id(serving.id_prefix), ids, sampling, eos)
        if request.stream:
            return EventSourceResponse(serving.stream(request, handle, ids, stops), ping=SSE_PING_S, sep="\n")
        try:
            return await serving.collect(raw, handle, ids, stops)
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
