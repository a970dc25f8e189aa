"""Gzip-aware deltas (docs/PROTOCOL.md, "Gzip items"): a changed `.gz` file differs from its old version in every
byte after the first change, but its *uncompressed* text differs by a few lines. So the delta is taken between
the uncompressed texts and the device compresses the result again, which works when a compressor gives back
exactly the file's bytes from its text. That is checked here before any such delta is made. Two engines do it:
zlib (Python's gzip; `gzip -9n` of small files) and GNU gzip itself (Debian's man pages and changelogs are made by
`gzip -9n`, whose block boundaries zlib does not reproduce on larger files); other files keep the plain delta.
No store, no network."""
from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass

from .delta import MAX_DELTA_BYTES

MAGIC = b"\x1f\x8b\x08"
FEED = 64 << 10  # bytes of text per compress call: a mismatch is found without compressing the whole file
_FLAGS = {"FHCRC": 2, "FEXTRA": 4, "FNAME": 8, "FCOMMENT": 16}
# Tried in this order; the header's XFL byte says which level the producer claims (2: best, 4: fastest).
_LEVELS = {2: (9,), 4: (1,), 0: (6, 5, 7, 8, 4, 3, 2)}
ZLIB_MEM8, ZLIB_MEM9, GNU_GZIP = 0, 1, 2  # engines: zlib with memLevel 8 or 9, or `gzip -<level> -n` (GNU)
ENGINES = (ZLIB_MEM8, ZLIB_MEM9, GNU_GZIP)
GNU_TIMEOUT_S = 120


class GzipError(ValueError):
    """Bytes that are not one gzip member whose text fits the delta size limit."""


@dataclass(frozen=True)
class GzipShape:
    """What turns a file's uncompressed text back into its exact bytes."""
    header: bytes      # the gzip header, verbatim (name, mtime and flags included)
    engine: int        # ZLIB_MEM8, ZLIB_MEM9 or GNU_GZIP
    level: int         # 1-9
    size: int          # bytes of uncompressed text

    def to_obj(self) -> list:
        return [self.header, self.engine, self.level, self.size]


def header_length(data: bytes) -> int:
    """Length of the gzip header at the start of `data`; GzipError if there is none."""
    if len(data) < 18 or not data.startswith(MAGIC) or data[3] & 0xE0:
        raise GzipError("not a gzip member")
    flags, pos = data[3], 10
    if flags & _FLAGS["FEXTRA"]:
        pos += 2 + int.from_bytes(data[pos:pos + 2], "little")
    for flag in ("FNAME", "FCOMMENT"):
        if flags & _FLAGS[flag]:
            end = data.find(b"\0", pos)
            if end < 0:
                raise GzipError("gzip header ends inside a name or comment")
            pos = end + 1
    if flags & _FLAGS["FHCRC"]:
        pos += 2
    if pos + 8 > len(data):
        raise GzipError("gzip member shorter than its header and trailer")
    return pos


def gunzip(data: bytes, limit: int = MAX_DELTA_BYTES) -> bytes:
    """The text of a single gzip member with nothing after it, at most `limit` bytes (no bombs)."""
    start = header_length(data)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        text = inflater.decompress(data[start:], limit + 1)
    except zlib.error as exc:
        raise GzipError(f"bad deflate data: {exc}") from None
    if len(text) > limit:
        raise GzipError(f"gzip text over {limit} bytes")
    if not inflater.eof or inflater.unused_data != data[-8:] or len(inflater.unused_data) != 8:
        raise GzipError("not exactly one gzip member")
    if struct.pack("<II", zlib.crc32(text), len(text) & 0xFFFFFFFF) != data[-8:]:
        raise GzipError("gzip trailer does not match its text")
    return text


@functools.cache
def gnu_gzip() -> str | None:
    """The path of GNU gzip, if this machine has it (busybox and pigz compress differently)."""
    path = shutil.which("gzip")
    if path is None:
        return None
    try:
        version = subprocess.run([path, "--version"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if version.startswith(b"gzip 1.") else None


def _gnu_deflate(text: bytes, level: int) -> bytes:
    path = gnu_gzip()
    if path is None:
        raise GzipError("GNU gzip is not installed")
    try:
        out = subprocess.run([path, f"-{level}", "-n", "-c"], input=text, capture_output=True, check=True,
                             timeout=GNU_TIMEOUT_S).stdout
        return out[header_length(out):-8]
    except (OSError, subprocess.SubprocessError) as exc:
        raise GzipError(f"GNU gzip failed: {exc}") from None


def _deflate(text: bytes, engine: int, level: int, expected: bytes | None = None) -> bytes | None:
    """Raw deflate of `text`; with `expected`, None as soon as the output departs from it."""
    if engine == GNU_GZIP:
        out = _gnu_deflate(text, level)
        return out if expected is None or out == expected else None
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8 if engine == ZLIB_MEM8 else 9)
    out = bytearray()
    for pos in range(0, len(text), FEED):
        out += compressor.compress(text[pos:pos + FEED])
        if expected is not None and expected[:len(out)] != out:
            return None
    out += compressor.flush()
    return bytes(out) if expected is None or out == expected else None


def shape_of(data: bytes, engines: tuple[int, ...] = ENGINES) -> tuple[GzipShape, bytes] | None:
    """(shape, text) when one of `engines` reproduces `data` exactly from its text, else None (not gzip, or made
    otherwise)."""
    try:
        text = gunzip(data)
        start = header_length(data)
    except GzipError:
        return None
    stream = data[start:-8]
    for engine in engines:
        if engine == GNU_GZIP and gnu_gzip() is None:
            continue
        for level in _LEVELS.get(data[8], _LEVELS[0]):
            try:
                if _deflate(text, engine, level, stream) is not None:
                    return GzipShape(data[:start], engine, level, len(text)), text
            except GzipError:
                break
    return None


def rebuild(shape: GzipShape, text: bytes) -> bytes:
    """The gzip file `shape` describes, from its text."""
    if len(text) != shape.size:
        raise GzipError(f"gzip text of {len(text)} bytes, {shape.size} expected")
    stream = _deflate(text, shape.engine, shape.level)
    assert stream is not None
    return shape.header + stream + struct.pack("<II", zlib.crc32(text), len(text) & 0xFFFFFFFF)


def decode_shape(obj: object) -> GzipShape:
    """A shape from its wire form [header, engine, level, size]; GzipError if malformed."""
    if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[0], bytes) and len(obj[0]) <= 1 << 16
            and all(isinstance(x, int) and not isinstance(x, bool) for x in obj[1:])):
        raise GzipError("a gzip shape must be [header, engine, level, size]")
    shape = GzipShape(*obj)
    if shape.engine not in ENGINES or not 1 <= shape.level <= 9:
        raise GzipError(f"a gzip shape's engine {shape.engine} / level {shape.level} is not known")
    if not 0 <= shape.size <= MAX_DELTA_BYTES:
        raise GzipError(f"a gzip shape's text size {shape.size} is outside 0..{MAX_DELTA_BYTES}")
    try:
        if header_length(shape.header + b"\0" * 8) != len(shape.header):
            raise GzipError("a gzip shape's header has bytes after its end")
    except GzipError as exc:
        raise GzipError(f"a gzip shape's header does not parse: {exc}") from None
    return shape
