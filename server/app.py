"""The HTTP face of the server (docs/PROTOCOL.md): `create_app(config)` builds the Starlette app."""
from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chunkstore import oci
from chunkstore.wire import FRAMES_MEDIA_TYPE, decode_chunks_request, decode_sync_request

from .bodies import RequestMemory, read_capped
from .config import ServerConfig
from .errors import HANDLED, BadRequest, DeviceUnauthorized, error_response
from .events import parse_events
from .service import Service

_CHUNK_ID = re.compile(r"[0-9a-f]{64}")
CHUNK_CACHE_CONTROL = "private, max-age=31536000, immutable"


def create_app(config: ServerConfig) -> Starlette:
    service = Service(config)
    memory = RequestMemory(config.request_memory_bytes, config.request_memory_wait,
                           on_wait=lambda: service.metrics.inc("chunksync_request_memory_waits_total"))

    async def frames_answer(request: Request, what: str, decode: Callable, prepare: Callable) -> Response:
        # The body and the request it decodes into are dropped once the answer is planned (the frames need neither).
        async with memory.reserved(memory.share(request, config.max_body_bytes)):
            body = await read_capped(request, config.max_body_bytes, what)
            parsed = await run_in_threadpool(decode, body, config.protocol_versions)
            del body
            frames = await run_in_threadpool(prepare, parsed, request.headers.get("authorization"))
            del parsed
        return StreamingResponse(iterate_in_threadpool(frames), media_type=FRAMES_MEDIA_TYPE)

    async def sync(request: Request) -> Response:
        return await frames_answer(request, "sync request", decode_sync_request, service.prepare_sync)

    async def chunks(request: Request) -> Response:
        return await frames_answer(request, "chunks request", decode_chunks_request, service.prepare_chunks)

    async def chunk(request: Request) -> Response:
        hexid = request.path_params["chunk_id"]
        if not _CHUNK_ID.fullmatch(hexid):
            raise BadRequest(f"chunk id must be 64 lowercase hex characters, got {hexid[:80]!r}")
        repository = request.query_params.get("repository")
        digest = request.query_params.get("manifest")
        if repository is None or digest is None:
            raise BadRequest("add ?repository=<repository>&manifest=<manifest digest> naming the image the chunk "
                             "belongs to")
        oci.validate_repository(repository)
        oci.validate_digest(digest)
        etag = f'"{hexid}"'
        headers = {"ETag": etag, "Cache-Control": CHUNK_CACHE_CONTROL}
        cached = etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]
        # The checks run even for a 304: a device learns nothing about an image it may not pull.
        data = await run_in_threadpool(service.chunk, repository, digest, bytes.fromhex(hexid),
                                       request.headers.get("authorization"), cached)
        if data is None:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="application/octet-stream", headers=headers)

    async def events(request: Request) -> Response:
        if config.events_token and request.headers.get("authorization") != f"Bearer {config.events_token}":
            raise DeviceUnauthorized("push notifications need the events token: set it in the registry's "
                                     "notifications endpoint headers (see docs/SERVING.md)")
        body = await read_capped(request, config.max_event_bytes, "notification")
        pushed, ignored = parse_events(body)
        for image in pushed:
            service.schedule(image)
        service.metrics.inc("chunksync_events_total", ignored, outcome="ignored")
        return JSONResponse({"accepted": len(pushed), "ignored": ignored}, status_code=202)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        service.close()

    app = Starlette(
        routes=[
            Route("/v1/sync", sync, methods=["POST"]),
            Route("/v1/chunks", chunks, methods=["POST"]),
            Route("/v1/chunks/{chunk_id}", chunk, methods=["GET"]),
            Route("/v1/events", events, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=[Middleware(MetricsMiddleware, service=service)],
        exception_handlers={**{cls: error_response for cls in HANDLED}, Exception: error_response},
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def _endpoint(method: str, path: str) -> str:
    if path.startswith("/v1/chunks/"):
        return "/v1/chunks/{id}"
    if path in ("/v1/sync", "/v1/chunks", "/v1/events", "/healthz", "/metrics"):
        return path
    return "other"


class MetricsMiddleware:
    """Counts requests by endpoint and status, and body bytes in and out (streamed answers included)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.metrics = service.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.metrics.inc("chunksync_request_bytes_total", len(message.get("body", b"")))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                self.metrics.inc("chunksync_response_bytes_total", len(message.get("body", b"")))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            self.metrics.inc("chunksync_requests_total", endpoint=_endpoint(scope["method"], scope["path"]),
                             status=str(status))
