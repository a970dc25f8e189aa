"""A real HTTP proxy on loopback between a device and the chunksync server, for faults that happen on the way:
it forwards requests, parses the answer's frames as they pass, and can damage one CHUNKS frame, flip one byte
anywhere in the frames, hold the stream after the first CHUNKS (or DELTA) frame until released, or refuse with an
error status. Raw byte faults below HTTP (cuts, flips of status lines): tests/fault_proxy.py.

Used instead of mocks: the client and server under test are the real ones, talking over real sockets.
"""
from __future__ import annotations

import io
import struct
import threading
from http.server import BaseHTTPRequestHandler

import httpx
import msgpack
import zstandard

from chunkstore.wire import FRAME_CHUNKS, FRAME_DELTA, ProtocolError, decode_chunks
from client.server_api import ResponseReader
from helpers import serve_http

_PREFIX = struct.Struct(">BBI")

# Modes: what the proxy does to answers.
PASS = "pass"
CORRUPT_RAW = "corrupt-raw"    # flip a byte of a chunk's bytes and recompress: the frame decodes, the id fails
CORRUPT_ZSTD = "corrupt-zstd"  # flip bytes inside the frame's zstd data: the frame fails to decode or hash
HOLD = "hold"                  # forward HEADER and the first CHUNKS frame, then wait for release()
HOLD_DELTA = "hold-delta"      # forward HEADER and the first DELTA frame, then wait for release()
FAIL = "fail"                  # answer 503 without asking the server
FLIP = "flip"                  # invert the byte at `flip_at` of the frame stream (prefix, msgpack, zstd: anywhere)


def _damage(payload: dict, mode: str) -> dict:
    data = payload["data"]
    if mode == CORRUPT_ZSTD:
        middle = len(data) // 2
        payload["data"] = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:]
        return payload
    try:
        chunks = decode_chunks(payload, zstandard.ZstdDecompressor())
    except ProtocolError:
        return payload
    raw = bytearray(b"".join(d for _, d in chunks))
    raw[len(chunks[0][1]) // 2] ^= 0x01  # inside the first chunk
    payload["data"] = zstandard.ZstdCompressor().compress(bytes(raw))
    return payload


class FrameProxy:
    """`FrameProxy(upstream_url, mode, flip_at=None)`; `.url`; counts `requests[path]`; damages only
    `damage_answers` answers (default: the first); `.forwarded_first_chunks` is set once a HOLD has passed its first
    CHUNKS frame, `.forwarded_first_delta` once a HOLD_DELTA has passed its first DELTA frame."""

    def __init__(self, upstream: str, mode: str = PASS, damage_answers: int = 1, flip_at: int | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.mode = mode
        self.flip_at = flip_at  # FLIP: the byte at this offset of the first answer's frames arrives inverted
        self.damage_left = damage_answers
        self.requests: dict[str, int] = {}
        self.damaged_frames = 0
        self.forwarded_first_chunks = threading.Event()
        self.forwarded_first_delta = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server, self.url = serve_http(self._handle)

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FrameProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?")[0]
        with self._lock:
            self.requests[path] = self.requests.get(path, 0) + 1
            damage = self.mode in (CORRUPT_RAW, CORRUPT_ZSTD, FLIP) and self.damage_left > 0
            if damage:
                self.damage_left -= 1
        if self.mode == FAIL:
            body = b'{"error": {"code": "unavailable", "message": "proxy says no"}}'
            handler.send_response(503)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        with httpx.Client(timeout=60) as client, client.stream(handler.command, self.upstream + handler.path,
                                                               content=body, headers=headers) as answer:
            handler.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    handler.send_header(key, value)
            handler.send_header("Connection", "close")
            handler.end_headers()
            # Buffered: read(n) then returns n bytes unless the answer ended.
            reader = io.BufferedReader(ResponseReader(answer, self.upstream))
            if answer.status_code != 200:
                handler.wfile.write(reader.read())
                return
            try:
                self._forward_frames(reader, handler, damage)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the device went away (e.g. killed): nothing more to do

    def _forward_frames(self, reader: io.BufferedReader, handler: BaseHTTPRequestHandler, damage: bool) -> None:
        chunks_frames = 0
        offset = 0  # of the frame stream forwarded so far
        while prefix := reader.read(_PREFIX.size):
            version, frame_type, length = _PREFIX.unpack(prefix)
            body = reader.read(length)
            if frame_type == FRAME_CHUNKS:
                chunks_frames += 1
                if damage and chunks_frames == 1 and self.mode != FLIP:
                    body = msgpack.packb(_damage(msgpack.unpackb(body, raw=False), self.mode), use_bin_type=True)
                    self.damaged_frames += 1
            frame = _PREFIX.pack(version, frame_type, len(body)) + body
            if damage and self.mode == FLIP and self.flip_at is not None and offset <= self.flip_at < offset + len(frame):
                i = self.flip_at - offset  # after parsing: the proxy stays in step, the device gets the damage
                frame = frame[:i] + bytes([frame[i] ^ 0xFF]) + frame[i + 1:]
                self.damaged_frames += 1
            offset += len(frame)
            handler.wfile.write(frame)
            handler.wfile.flush()
            if self.mode == HOLD and frame_type == FRAME_CHUNKS and chunks_frames == 1:
                self.forwarded_first_chunks.set()
                self._release.wait()
            if self.mode == HOLD_DELTA and frame_type == FRAME_DELTA and not self.forwarded_first_delta.is_set():
                self.forwarded_first_delta.set()
                self._release.wait()

