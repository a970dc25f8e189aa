"""Splitting an uncompressed tar stream into header bytes and file contents, so contents can be chunked
per file and a rebuild that only changes mtimes or file order still shares every content chunk.

The split is a list of runs `(header_len, content_len)`: the stream is H0 C0 H1 C1 ... where each H is
header bytes (tar headers, PAX/GNU long-name records, padding, end-of-archive blocks, trailing bytes)
and each C is one file's content. Concatenating the runs gives back the exact input, whatever it holds;
data that stops being a well-formed tar becomes one final content run of the rest of the stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterator

BLOCK = 512
MAX_META_SIZE = 16 << 20  # a PAX/long-name record larger than this is not a tar we trust to parse

# Types whose data is metadata about the next member: it belongs with the headers.
_META_TYPES = {b"x", b"g", b"L", b"K"}
# Types Python's tarfile and GNU tar read no data for, whatever their size field says.
_NO_DATA_TYPES = {b"1", b"2", b"3", b"4", b"5", b"6"}


@dataclass
class Header:
    """Header bytes of the stream (one piece of a header run)."""
    data: bytes


@dataclass
class Content:
    """One file's content of `size` bytes follows: the consumer reads it with `TarSplitter.read_content`."""
    size: int


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    # Some old tars summed signed chars.
    return stored == unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)


def _parse_size(field: bytes) -> int | None:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return None if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _pax_size(records: bytes) -> int | None:
    """The `size` a PAX extended header sets for the next member, if any."""
    pos = 0
    found = None
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(records[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        record = records[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"size":
            try:
                found = int(value)
            except ValueError:
                return None
        pos += length
    return found


class TarSplitter:
    """Iterates a stream as `Header` and `Content` events; after a `Content` event the caller must read
    exactly that many bytes with `read_content` before asking for the next event."""

    def __init__(self, stream: BinaryIO, read_size: int = 1 << 20):
        self._stream = stream
        self._read_size = read_size
        self._pending = 0
        self.is_tar = True
        self.truncated = False

    def _read_exact(self, n: int) -> bytes:
        parts = []
        while n > 0:
            data = self._stream.read(n)
            if not data:
                break
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def read_content(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` of the current content; b"" once it is all read."""
        n = min(max_bytes, self._pending)
        if n == 0:
            return b""
        data = self._stream.read(n)
        if not data:
            # A truncated archive is still a valid blob: its bytes are kept exactly as they are.
            self.truncated = True
            self._pending = 0
            return b""
        self._pending -= len(data)
        return data

    def _raw_rest(self, head: bytes) -> Iterator["RawRest"]:
        """The rest is not a tar we understand: one content run, streamed (size unknown up front)."""
        self.is_tar = False
        yield RawRest(head, self._stream)

    def __iter__(self) -> Iterator["Header | Content | RawRest"]:
        pax_size: int | None = None
        while True:
            block = self._read_exact(BLOCK)
            if not block:
                return
            if len(block) < BLOCK or not _checksum_ok(block):
                if block.count(0) == len(block):
                    # End-of-archive: zero blocks, record padding and whatever trails them.
                    yield Header(block)
                    while rest := self._stream.read(self._read_size):
                        yield Header(rest)
                    return
                yield from self._raw_rest(block)
                return
            typeflag = block[156:157]
            size = _parse_size(block[124:136])
            if size is None:
                yield from self._raw_rest(block)
                return
            if pax_size is not None and typeflag not in _META_TYPES:
                size = pax_size
                pax_size = None
            padding = -size % BLOCK
            if typeflag in _META_TYPES and size > MAX_META_SIZE:
                yield from self._raw_rest(block)
                return
            yield Header(block)
            if typeflag == b"S" and block[482]:
                # GNU sparse: extension blocks of the sparse map follow the header.
                while True:
                    ext = self._read_exact(BLOCK)
                    yield Header(ext)
                    if len(ext) < BLOCK or not ext[504]:
                        break
            if typeflag in _META_TYPES:
                data = self._read_exact(size + padding)
                if typeflag == b"x":
                    pax_size = _pax_size(data[:size])
                yield Header(data)
                continue
            if typeflag in _NO_DATA_TYPES or size == 0:
                continue
            self._pending = size
            yield Content(size)
            if self._pending:
                raise RuntimeError("TarSplitter: the content was not read before the next event")
            if padding:
                yield Header(self._read_exact(padding))


@dataclass
class RawRest:
    """Everything from here to the end of the stream, not tar: `head` then the rest of `stream`."""
    head: bytes
    stream: BinaryIO
