"""The device's side of docs/PROTOCOL.md over HTTP: POST /v1/sync and /v1/chunks, answers read as frames."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import httpx

from chunkstore.wire import (
    CHUNKS_MEDIA_TYPE,
    SYNC_MEDIA_TYPE,
    ChunksRequest,
    Frame,
    SyncRequest,
    read_frames,
)

from .traffic import CountingTransport, Traffic


class ServerError(Exception):
    """The chunksync server could not be reached or refused the request; `status` is None when unreachable."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ResponseReader(io.RawIOBase):
    """A file object over a streamed response body, for chunkstore.wire.read_frames."""

    def __init__(self, response: httpx.Response, where: str) -> None:
        # No chunk size: httpx would hold back a partial piece until more arrives, delaying the frame it ends.
        self._parts = response.iter_bytes()
        self._buffer = b""
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if not self._buffer:
            try:
                self._buffer = next(self._parts, b"")
            except httpx.TransportError as exc:
                # The caller keeps every chunk that arrived before this: name it a server failure, not a crash.
                raise ServerError(f"{self._where}: the answer broke off: {exc.__class__.__name__}: {exc}") from exc
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _error_message(response: httpx.Response) -> tuple[str | None, str]:
    with contextlib.suppress(Exception):
        error = response.json()["error"]
        return error.get("code"), error.get("message") or ""
    with contextlib.suppress(Exception):
        return None, response.text.strip()[:200]
    return None, ""


class ServerApi:
    """One chunksync server; `authorization` is the device's registry credentials, forwarded as they are."""

    def __init__(self, base_url: str, traffic: Traffic, authorization: str | None = None,
                 timeout: float = 60.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--server {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": "chunksync"}
        if authorization:
            headers["Authorization"] = authorization
        self._http = httpx.Client(base_url=self.base_url, headers=headers, transport=CountingTransport(traffic),
                                  timeout=httpx.Timeout(timeout, connect=10.0))
        # Bytes on a metered link: frames are never content-encoded, HTTP/1.1 keeps the connection alive by
        # default, and the answer's media type is fixed by the endpoint.
        for name in ("Accept", "Accept-Encoding", "Connection"):
            del self._http.headers[name]

    def close(self) -> None:
        self._http.close()

    @contextlib.contextmanager
    def _frames(self, path: str, body: bytes, media_type: str) -> Iterator[Iterator[Frame]]:
        try:
            with self._http.stream("POST", path, content=body, headers={"Content-Type": media_type}) as response:
                if response.status_code != 200:
                    response.read()
                    code, message = _error_message(response)
                    raise ServerError(f"server {self.base_url} answered {response.status_code} to {path}"
                                      f"{': ' + message if message else ''}", response.status_code, code)
                yield read_frames(ResponseReader(response, f"server {self.base_url}{path}"))
        except httpx.TransportError as exc:
            raise ServerError(f"server {self.base_url}: {exc.__class__.__name__}: {exc}") from exc

    def sync(self, request: SyncRequest) -> contextlib.AbstractContextManager[Iterator[Frame]]:
        """The frames of a sync answer: HEADER, CHUNKS..., END."""
        return self._frames("/v1/sync", request.encode(), SYNC_MEDIA_TYPE)

    def chunks(self, request: ChunksRequest) -> contextlib.AbstractContextManager[Iterator[Frame]]:
        """The frames of a repair answer: CHUNKS..., END."""
        return self._frames("/v1/chunks", request.encode(), CHUNKS_MEDIA_TYPE)
