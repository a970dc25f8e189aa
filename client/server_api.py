"""The device's side of docs/PROTOCOL.md over HTTP: POST /v1/sync and /v1/chunks, answers read as frames."""
from __future__ import annotations

import contextlib
import io
import re
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
    """The chunksync server could not be reached or refused the request; `status` is None when unreachable.
    `versions`: the protocol versions the server speaks, when it refused the request's version."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 versions: tuple[int, ...] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.versions = versions


# How servers that predate the "unsupported_version" code refuse a version (400 "bad_request"; one number up to 1).
_LEGACY_REFUSAL = re.compile(r"protocol version .{1,20} is not supported \(this server speaks ((?:\d+, )*\d+)\)")


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


def _error_message(response: httpx.Response) -> tuple[str | None, str, tuple[int, ...] | None]:
    """The code, message and (for a refused version) the versions the server speaks, of an error answer."""
    with contextlib.suppress(Exception):
        error = response.json()["error"]
        code, message = error.get("code"), error.get("message") or ""
        return code, message, _versions(response.status_code, code, message, error.get("versions"))
    with contextlib.suppress(Exception):
        return None, response.text.strip()[:200], None
    return None, "", None


def _versions(status: int, code: object, message: str, listed: object) -> tuple[int, ...] | None:
    if status != 400:
        return None
    if code == "unsupported_version" and isinstance(listed, list) \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in listed):
        return tuple(listed)
    if found := _LEGACY_REFUSAL.search(message):
        return tuple(int(v) for v in found.group(1).split(", "))
    return None


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
                    code, message, versions = _error_message(response)
                    raise ServerError(f"server {self.base_url} answered {response.status_code} to {path}"
                                      f"{': ' + message if message else ''}", response.status_code, code, versions)
                yield read_frames(ResponseReader(response, f"server {self.base_url}{path}"))
        except httpx.TransportError as exc:
            raise ServerError(f"server {self.base_url}: {exc.__class__.__name__}: {exc}") from exc

    def sync(self, request: SyncRequest) -> contextlib.AbstractContextManager[Iterator[Frame]]:
        """The frames of a sync answer: HEADER, CHUNKS..., END."""
        return self._frames("/v1/sync", request.encode(), SYNC_MEDIA_TYPE)

    def chunks(self, request: ChunksRequest) -> contextlib.AbstractContextManager[Iterator[Frame]]:
        """The frames of a repair answer: CHUNKS..., END."""
        return self._frames("/v1/chunks", request.encode(), CHUNKS_MEDIA_TYPE)
