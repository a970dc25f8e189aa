"""Run the real chunksync server as a subprocess, for end-to-end tests.

    from server_process import ServerProcess
    with ServerProcess(registry.url, store=tmp_path / "store") as server:
        httpx.post(f"{server.url}/v1/sync", content=request.encode())

`ServerProcess(registry_url, store=DIR, port=None, user=None, password=None, extra_args=())` runs
`.venv/bin/chunksync serve --registry URL --listen 127.0.0.1:PORT --store DIR ...` on a free port (or `port`,
e.g. one a registry's notifications already point at) and returns once GET /healthz answers.
`.url` is `http://127.0.0.1:PORT`; `.metrics()` parses GET /metrics into {'name{labels}': value};
`.stop()` ends it with SIGTERM (graceful), `.kill()` with SIGKILL; the server's output is in `.log_path`.
Leaving the `with` block stops it.

`post(server.url, "/v1/sync", body, authorization)` sends a request; `Answer(response)` decodes a frame stream
into `.header`, `.chunks` [(id, bytes)], `.ids`, `.end`, `.error`, `.wire_bytes`; `assert_error(response, 404,
"words")` checks a JSON error answer and returns its {"code", "message"}.
"""
from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import zstandard

from chunkstore.wire import FRAME_CHUNKS, FRAME_END, FRAME_ERROR, FRAME_HEADER, decode_chunks, read_frames
from helpers import free_port
from client.sandbox import Process, SandboxError
from server.metrics import parse_metrics

CHUNKSYNC = Path(sys.executable).with_name("chunksync")


class ServerProcess:
    def __init__(self, registry_url: str, *, store: Path, port: int | None = None, user: str | None = None,
                 password: str | None = None, extra_args: Sequence[str] = (), timeout: float = 20.0) -> None:
        self.store = Path(store)
        env = dict(os.environ)
        if user is not None:
            env["CHUNKSYNC_REGISTRY_USER"] = user
            env["CHUNKSYNC_REGISTRY_PASSWORD"] = password or ""
        self.store.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = port or free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log_path = self.store.parent / f"server-{self.port}.log"
            args = [str(CHUNKSYNC), "serve", "--registry", registry_url, "--listen", f"127.0.0.1:{self.port}",
                    "--store", str(self.store), *extra_args]
            try:
                self._child = Process(args, self.log_path, f"{self.url}/healthz", f"chunksync serve on {self.url}",
                                      timeout, env=env)
                break
            except SandboxError as exc:
                # free_port() races every other process on the machine for the port (start_registry retries
                # too); a port the caller chose is the caller's to keep.
                if port is not None or "address already in use" not in str(exc) or attempt == 2:
                    raise
        self.process = self._child.process

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def stop(self) -> None:
        self._child.stop()

    def kill(self) -> None:
        self._child.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- talking to it ------------------------------------------------------------------------------------------------


class Answer:
    """A frame-stream answer, decoded: `header` (payload dict or None), `chunks` [(id, bytes)] in arrival order,
    `end` (counts or None), `error` (payload or None), `wire_bytes` (body size)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.wire_bytes = len(response.content)
        self.header: dict | None = None
        self.chunks: list[tuple[bytes, bytes]] = []
        self.end: dict | None = None
        self.error: dict | None = None
        dctx = zstandard.ZstdDecompressor()
        for frame in read_frames(io.BytesIO(response.content)):
            if frame.type == FRAME_HEADER:
                self.header = frame.payload
            elif frame.type == FRAME_CHUNKS:
                self.chunks.extend(decode_chunks(frame.payload, dctx))
            elif frame.type == FRAME_END:
                self.end = frame.payload
            elif frame.type == FRAME_ERROR:
                self.error = frame.payload

    @property
    def ids(self) -> list[bytes]:
        return [cid for cid, _ in self.chunks]


def post(url: str, path: str, body: bytes, authorization: str | None = None, timeout: float = 60) -> httpx.Response:
    """POST a protocol request (SyncRequest(...).encode(), ChunksRequest(...).encode()) to the server."""
    headers = {"Authorization": authorization} if authorization else {}
    return httpx.post(url + path, content=body, headers=headers, timeout=timeout)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] and error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    return error
