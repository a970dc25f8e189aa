"""A loopback TCP proxy that counts the bytes passing each way and the HTTP requests sent through it: the ground
truth for what a pull puts on the wire (TCP payload; only TCP/IP headers are left out)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

_REQUEST_LINE_END = b" HTTP/1.1\r\n"  # ends every request line the client sends (httpx speaks HTTP/1.1)


@dataclass
class Counts:
    sent: int = 0         # client -> upstream
    received: int = 0     # upstream -> client
    requests: int = 0     # HTTP requests (request lines seen client -> upstream)
    connections: int = 0  # TCP connections opened (each one a handshake round trip more)


class Tap:
    """Listens on 127.0.0.1:<free port> and forwards every connection to `upstream` (host, port)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.counts = Counts()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> Counts:
        """Returns the counts so far and starts again from zero."""
        with self._lock:
            counts, self.counts = self.counts, Counts()
        return counts

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self.counts.connections += 1
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        tail = b""  # the end of the previous read, so a request line split across reads still counts once
        try:
            while data := src.recv(1 << 16):
                with self._lock:  # counted before forwarding: once the peer has a byte, it is in the counts
                    if outbound:
                        self.counts.sent += len(data)
                        self.counts.requests += (tail + data).count(_REQUEST_LINE_END)
                    else:
                        self.counts.received += len(data)
                tail = data[-(len(_REQUEST_LINE_END) - 1):] if outbound else b""
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()
