"""Request bodies read with a cap: the limit holds whatever Content-Length claims, and memory never exceeds it;
and a budget for all the bodies being read and decoded at once, so memory does not grow with concurrent requests."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request

from .errors import ServerBusy, TooLarge

# A body's bytes and what decoding makes of them (msgpack copies its Bloom filter, the filter's arrays): measured,
# one 64 MiB filter raised the server's peak by 140 MB.
DECODED_FACTOR = 2
SMALL_BODY = 1 << 20


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


class RequestMemory:
    """Bytes that large requests being read, decoded and planned hold at once: past `capacity`, a request waits
    for its share (up to `wait` seconds, then ServerBusy) instead of the server's memory growing with the number
    of large requests in flight. A request reserves DECODED_FACTOR times its declared body (its limit when it
    declares none), at most the whole capacity: one larger than that runs alone.

    Bodies that declare at most SMALL_BODY (a device's is a few KB) reserve nothing: a client that declares a
    large body and then sends it slowly, or never, holds its share meanwhile, and must not stall every device."""

    def __init__(self, capacity: int, wait: float, on_wait: Callable[[], None] = lambda: None) -> None:
        self.capacity, self.wait, self.on_wait = capacity, wait, on_wait
        self.used = 0
        self._changed = asyncio.Condition()

    def share(self, request: Request, limit: int) -> int:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) <= SMALL_BODY:
            return 0
        body = min(int(declared), limit) if declared.isdigit() else limit
        return min(self.capacity, DECODED_FACTOR * body)

    @contextlib.asynccontextmanager
    async def reserved(self, size: int) -> AsyncIterator[None]:
        async with self._changed:
            if self.used + size > self.capacity:
                self.on_wait()
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self.used + size <= self.capacity),
                                           self.wait)
                except TimeoutError:
                    raise ServerBusy(f"the server is busy with large requests ({self.used >> 20} MiB of "
                                     f"{self.capacity >> 20} MiB in use); try again shortly") from None
            self.used += size
        try:
            yield
        finally:
            async with self._changed:
                self.used -= size
                self._changed.notify_all()
