"""Counting every byte a pull moves over HTTP, both directions, to both peers (server and registry).

What counts: request and status lines, headers as sent and received (httpx hands the transport the exact header
set it writes), and bodies as they cross the wire (before content decoding). Not counted: TCP/IP/TLS framing and
the few bytes of chunked transfer-encoding markers, which no HTTP client exposes; they add well under 1 %.
"""
from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx


@dataclass
class Traffic:
    """Running totals; `on_receive(n)` is called for every body piece received (drives the progress bar)."""
    sent: int = 0
    received: int = 0
    on_receive: list[Callable[[int], None]] = field(default_factory=list)

    def add_received(self, n: int) -> None:
        self.received += n
        for callback in self.on_receive:
            callback(n)


def _header_bytes(headers: httpx.Headers) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2  # "k: v\r\n" each, then "\r\n"


class _CountingStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, traffic: Traffic) -> None:
        self._inner = inner
        self._traffic = traffic

    def __iter__(self) -> Iterator[bytes]:
        for part in self._inner:
            self._traffic.add_received(len(part))
            yield part

    def close(self) -> None:
        self._inner.close()


class CountingTransport(httpx.BaseTransport):
    """An httpx transport that adds what passes through it to a Traffic.

    Plain-HTTP peers get a transport that never does TLS, https ones a verifying transport made on first use with
    the process's one TLS context: an httpx transport loads the CA bundle as it is made, even for a peer it will
    only reach over plain HTTP (35-50 ms CPU a transport, two a pull; a small diff pull's whole CPU is ~0.6 s).
    """

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self._plain = httpx.HTTPTransport(verify=False)  # only ever handed http:// URLs: verify has nothing to do
        self._tls: httpx.HTTPTransport | None = None

    def _inner(self, url: httpx.URL) -> httpx.HTTPTransport:
        if url.scheme == "http":
            return self._plain
        if self._tls is None:
            self._tls = httpx.HTTPTransport(verify=tls_context())
        return self._tls

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        target = request.url.raw_path
        self.traffic.sent += len(request.method) + len(target) + len(" HTTP/1.1\r\n") + 1
        self.traffic.sent += _header_bytes(request.headers)
        length = request.headers.get("Content-Length")
        self.traffic.sent += int(length) if length and length.isdigit() else 0
        response = self._inner(request.url).handle_request(request)
        self.traffic.received += len("HTTP/1.1 200 OK\r\n") + _header_bytes(response.headers)
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_CountingStream(response.stream, self.traffic),
                              extensions=response.extensions)

    def close(self) -> None:
        self._plain.close()
        if self._tls is not None:
            self._tls.close()


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default verifying context (its CA bundle, SSL_CERT_FILE / SSL_CERT_DIR honoured), made once."""
    return httpx.create_ssl_context()
