"""A real proxy (tests/frame_proxy.py) that tampers with DELTA frames on their way to the device: it damages the
first content (or group) item's bytes, or names another image as the base. A server never does either, so a proxy is the
only real way to show what the device does when it happens."""
from __future__ import annotations

import io
import struct
from http.server import BaseHTTPRequestHandler

import msgpack

from chunkstore.wire import DELTA_CONTENT, DELTA_GROUP, FRAME_DELTA
from frame_proxy import PASS, FrameProxy

_PREFIX = struct.Struct(">BBI")

CORRUPT_DELTA = "corrupt-delta"   # flip bytes in the middle of the first content item's zstd data
CORRUPT_GROUP = "corrupt-group"   # likewise in the first group item (protocol version 3)
REBASE_DELTA = "rebase-delta"     # name `base` as the base of every DELTA frame


class DeltaProxy(FrameProxy):
    def __init__(self, upstream: str, mode: str, base: tuple[str, str] | None = None) -> None:
        super().__init__(upstream, PASS)
        self.delta_mode = mode
        self.base = base
        self.tampered_items = 0

    def _forward_frames(self, reader: io.BufferedReader, handler: BaseHTTPRequestHandler, damage: bool) -> None:
        while prefix := reader.read(_PREFIX.size):
            version, frame_type, length = _PREFIX.unpack(prefix)
            body = reader.read(length)
            if frame_type == FRAME_DELTA:
                body = msgpack.packb(self._tamper(msgpack.unpackb(body, raw=False)), use_bin_type=True)
            handler.wfile.write(_PREFIX.pack(version, frame_type, len(body)) + body)
            handler.wfile.flush()

    def _tamper(self, payload: dict) -> dict:
        if self.delta_mode == REBASE_DELTA and self.base is not None:
            payload["base"] = list(self.base)
            self.tampered_items += len(payload["items"])
            return payload
        kind = DELTA_GROUP if self.delta_mode == CORRUPT_GROUP else DELTA_CONTENT
        for item in payload["items"]:
            if item[0] == kind and self.tampered_items == 0 and len(item[-1]) > 16:
                data = item[-1]  # the data is the last field of both item shapes
                middle = len(data) // 2
                item[-1] = data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 4]) + data[middle + 4:]
                self.tampered_items += 1
        return payload
