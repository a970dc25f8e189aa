"""A TCP proxy of our own on loopback that makes a device's link flaky for real: it cuts the link after a byte
offset of what flows back to the device, flips a byte at an offset, holds answers until released, delays them,
answers HTTP 503, or is down.

tests/frame_proxy.py works on frames (HTTP level); this one works on raw bytes, so it can break anything
(status lines, chunked encoding, frame prefixes, zstd data). Several proxies may share one `Link`, so a device
whose registry and chunksync server are both behind the same flaky line loses both at the same instant:

    link = Link()
    with FaultProxy(server_addr, link) as to_server, FaultProxy(registry_addr, link) as to_registry:
        link.cut_after(123_456)   # the 123,457th byte back to the device never arrives; the link stays down
        ...
        link.heal()
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlsplit

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, as a dead link looks to a peer


def address_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


class Link:
    """The state of one flaky line: bytes delivered to the device so far and the fault to apply."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delivered = 0                  # bytes sent back to the device through every proxy on this link
        self.cut_at: int | None = None      # deliver exactly this many bytes, then the link goes down
        self.flip_at: int | None = None     # the byte at this offset arrives XOR `flip_mask`
        self.flip_mask = 0x01
        self.flipped = False
        self.delay = 0.0                    # seconds before each piece of an answer is forwarded
        self.http_status: int | None = None  # answer every request with this status instead of forwarding
        self.is_down = False
        self.hold_at: int | None = None     # stop forwarding answers once this many bytes were delivered...
        self.released = threading.Event()  # ...until release()
        self.held = threading.Event()      # set once the hold took effect
        self._sockets: set[socket.socket] = set()

    def hold_after(self, offset: int) -> None:
        with self.lock:
            self.hold_at = self.delivered + offset
            self.released.clear()
            self.held.clear()

    def release(self) -> None:
        self.released.set()

    def cut_after(self, offset: int) -> None:
        with self.lock:
            self.cut_at = self.delivered + offset

    def flip(self, offset: int, mask: int = 0x01) -> None:
        with self.lock:
            self.flip_at, self.flip_mask, self.flipped = self.delivered + offset, mask, False

    def down(self) -> None:
        """Every open connection is reset and new ones are refused until heal()."""
        with self.lock:
            self.is_down = True
            sockets, self._sockets = list(self._sockets), set()
        for s in sockets:
            _reset(s)

    def heal(self) -> None:
        with self.lock:
            self.is_down, self.cut_at, self.flip_at, self.delay, self.http_status = False, None, None, 0.0, None
            self.hold_at = None
        self.released.set()

    def reset_counts(self) -> None:
        with self.lock:
            self.delivered = 0

    # --- used by the proxies ---------------------------------------------------------------------------------

    def track(self, *sockets: socket.socket) -> bool:
        with self.lock:
            if self.is_down:
                return False
            self._sockets.update(sockets)
            return True

    def untrack(self, *sockets: socket.socket) -> None:
        with self.lock:
            self._sockets.difference_update(sockets)

    def pass_back(self, data: bytes) -> tuple[bytes, bool]:
        """What of `data` reaches the device, and whether the link dies right after it."""
        with self.lock:
            if self.is_down:
                return b"", True
            start = self.delivered
            if self.hold_at is not None and start >= self.hold_at and not self.released.is_set():
                self.held.set()
                hold = True
            else:
                hold = False
        if hold:
            self.released.wait()
        with self.lock:
            if self.is_down:
                return b"", True
            start = self.delivered
            if self.flip_at is not None and not self.flipped and start <= self.flip_at < start + len(data):
                i = self.flip_at - start
                data = data[:i] + bytes([data[i] ^ self.flip_mask]) + data[i + 1:]
                self.flipped = True
            dies = self.cut_at is not None and start + len(data) >= self.cut_at
            if dies:
                data = data[:max(0, self.cut_at - start)]  # type: ignore[operator]
            self.delivered += len(data)
            if dies:
                self.is_down = True
            return data, dies


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


class FaultProxy:
    """Listens on 127.0.0.1:<free port>, forwards each connection to `upstream` (host, port) through `link`.
    `.url` is http://127.0.0.1:PORT, `.host` is 127.0.0.1:PORT (for image references)."""

    def __init__(self, upstream: tuple[str, int], link: Link | None = None) -> None:
        self.upstream = upstream
        self.link = link or Link()
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        link = self.link
        if link.http_status is not None:
            self._answer_status(client, link.http_status)
            return
        try:
            upstream = socket.socket()
            # A small receive window: while the link holds, the upstream's writes block instead of the whole
            # answer hiding in kernel buffers (so killing the upstream then really cuts the stream).
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)
            upstream.settimeout(10)
            upstream.connect(self.upstream)
            upstream.settimeout(None)
        except OSError:
            _reset(client)  # the upstream is down: so is this connection
            return
        if not link.track(client, upstream):
            _reset(client)
            _reset(upstream)
            return
        threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()
        self._backward(upstream, client)

    def _answer_status(self, client: socket.socket, status: int) -> None:
        try:
            client.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 1 << 16:
                data = client.recv(1 << 16)
                if not data:
                    break
                head += data
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"fault proxy answers ' + str(status).encode() + b'"}]}'
            client.sendall(f"HTTP/1.1 {status} Fault\r\nContent-Type: application/json\r\nContent-Length: "
                           f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        except OSError:
            pass
        finally:
            client.close()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        """Device -> upstream: passed as it is."""
        try:
            while data := client.recv(1 << 16):
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _backward(self, upstream: socket.socket, client: socket.socket) -> None:
        """Upstream -> device: through the link's faults."""
        link = self.link
        try:
            while data := upstream.recv(1 << 16):
                if link.delay:
                    time.sleep(link.delay)
                data, dies = link.pass_back(data)
                if data:
                    client.sendall(data)
                if dies:
                    # This connection ends with a FIN right after the last byte (so exactly `offset` bytes
                    # arrive); every other one is reset, and new ones are refused until heal().
                    link.untrack(client, upstream)
                    client.shutdown(socket.SHUT_WR)
                    link.down()
                    return
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            link.untrack(client, upstream)
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass
