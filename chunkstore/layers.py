"""Decoding layer blobs (tar+gzip, tar+zstd, plain tar) into their uncompressed stream, streaming."""
from __future__ import annotations

import hashlib
import io
import zlib
from typing import BinaryIO

import zstandard
from isal import igzip  # ISA-L gzip: measured ~2-3x faster than zlib's gzip on real layers (bench/)

GZIP = "gzip"
ZSTD = "zstd"
NONE = "none"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class LayerFormatError(ValueError):
    """The blob is not what its media type says, or cannot be decoded."""


def compression_of_media_type(media_type: str | None) -> str | None:
    """The compression an OCI/Docker layer media type names, or None when it names none we know."""
    if not media_type:
        return None
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip") or media_type.endswith(".gzip"):
        return GZIP
    if media_type.endswith("+zstd") or media_type.endswith(".zstd"):
        return ZSTD
    if media_type.endswith(".tar"):
        return NONE
    return None


def sniff_compression(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return GZIP
    if head.startswith(_ZSTD_MAGIC):
        return ZSTD
    return NONE


class _Prefixed(io.RawIOBase):
    """A stream with bytes already read from it put back in front, so sniffing consumes nothing."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(b))
        b[:len(data)] = data
        return len(data)


def open_uncompressed(blob: BinaryIO, media_type: str | None = None) -> tuple[BinaryIO, str]:
    """The uncompressed stream of a layer blob, and the compression found.

    The media type chooses the decoder and the magic bytes must confirm it; an unknown media type
    is decided by the magic bytes alone.
    """
    head = blob.read(4)
    found = sniff_compression(head)
    declared = compression_of_media_type(media_type)
    if declared is not None and declared != found:
        raise LayerFormatError(f"layer media type {media_type} says {declared}, but the blob's first bytes say {found}")
    raw = io.BufferedReader(_Prefixed(head, blob), buffer_size=1 << 20)
    if found == GZIP:
        return _Decoding(igzip.IGzipFile(fileobj=raw, mode="rb"), found), found
    if found == ZSTD:
        return _Decoding(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), found), found
    return raw, found


class _Decoding(io.RawIOBase):
    """A decoder whose failures (corrupt, truncated, trailing garbage) surface as LayerFormatError, not as
    the OSError/EOFError/ZstdError zoo of the decoding libraries."""

    def __init__(self, decoder: BinaryIO, compression: str):
        self._decoder = decoder
        self._compression = compression

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._decoder.read(n)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise LayerFormatError(f"layer blob is not valid {self._compression} data: {exc}") from None

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class HashingReader(io.RawIOBase):
    """Reads through to `inner`, counting bytes and computing their sha256 on the way."""

    def __init__(self, inner: BinaryIO):
        self._inner = inner
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()
