"""Request bodies read with a cap: the limit holds whatever Content-Length claims, and memory never exceeds it."""
from __future__ import annotations

from starlette.requests import Request

from .errors import TooLarge


async def read_capped(request: Request, limit: int, what: str) -> bytes:
    """The body, or TooLarge. An oversized body is still drained (discarded, up to `limit` more bytes) so the
    client reads our 413 instead of a connection reset."""
    declared = request.headers.get("content-length", "")
    too_large = TooLarge(f"{what} is larger than the limit of {limit} bytes ({limit / (1 << 20):.0f} MiB)")
    if declared.isdigit() and int(declared) > 2 * limit:
        raise too_large
    body = bytearray()
    drained = 0
    async for part in request.stream():
        if drained or len(body) + len(part) > limit:
            drained += len(part)
            if drained > limit:
                break
            continue
        body += part
    if drained:
        raise too_large
    return bytes(body)
