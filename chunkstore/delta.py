"""Deltas of new layer content against the device's own old content (docs/PROTOCOL.md, "Deltas"): which old file
a new file is based on (tar paths), and zstd with the base as a raw dictionary. Pure: no store, no network."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import zstandard

from .compression import DecompressionError, decompress_exact

MAX_DELTA_BYTES = 64 << 20    # base and target of one delta: decoder memory stays about 2x this
BLOCK = 512


class DeltaError(ValueError):
    """Delta bytes that do not decode to the target they claim (treated like a damaged chunk)."""


# --- tar paths in a header stream ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One tar member's header bytes (meta records + header block) inside a layer's header stream."""
    offset: int          # in the header stream
    length: int
    path: str | None     # None: not a member header (padding, end-of-archive, unparsable bytes)
    run: int             # the run whose header part holds it; the member's content, if any, is that run's
    padding: bool = False  # the zeros after the previous run's content (their length follows from the runs)


def _header_name(block: bytes, at: int = 0) -> str:
    """The name in the header block at `at` (read in place: no slice of the block per member)."""
    end = block.find(b"\0", at, at + 100)
    name = block[at:end if end >= 0 else at + 100]
    if block.startswith(b"ustar", at + 257):
        end = block.find(b"\0", at + 345, at + 500)
        prefix = block[at + 345:end if end >= 0 else at + 500]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(records: bytes) -> str | None:
    for line in records.split(b"\n"):
        _, _, record = line.partition(b" ")
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


def _octal(field: bytes) -> int | None:
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def header_entries(header: bytes, runs: Sequence[int]) -> list[Entry]:
    """The members named in a layer's header stream, located by its runs `(header_len, content_len, ...)`.

    Best effort: bytes that do not parse become entries without a path, so any stream is covered exactly.
    Used to choose delta bases only; a wrong guess costs bytes, never correctness (the device verifies).
    """
    entries: list[Entry] = []
    offset = 0
    previous_content = 0
    for run in range(len(runs) // 2):
        end = offset + runs[2 * run]
        pos = offset
        padding = min(-previous_content % BLOCK, end - pos)
        if padding:
            entries.append(Entry(pos, padding, None, run, padding=True))
            pos += padding
        start, name = pos, None
        while pos + BLOCK <= end:
            block = header[pos:pos + BLOCK]
            if not block.strip(b"\0"):
                break  # end-of-archive blocks and what trails them
            size, kind = _octal(block[124:136]), block[156:157]
            if size is None:
                break
            if kind in (b"x", b"L"):
                data = header[pos + BLOCK:pos + BLOCK + size]
                name = (_pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode("utf-8", "surrogateescape")) \
                    or name
                pos += BLOCK + size + (-size % BLOCK)
                continue
            if kind in (b"g", b"K"):
                pos += BLOCK + size + (-size % BLOCK)
                continue
            pos += BLOCK
            entries.append(Entry(start, pos - start, name or _header_name(block), run))
            start, name = pos, None
        if end > start:
            entries.append(Entry(start, end - start, None, run))
        offset = end
        previous_content = runs[2 * run + 1]
    return entries


_DIGITS = re.compile(r"[0-9]+")


def normalised(path: str) -> str:
    """A path with every digit run replaced, so `flask-3.0.0.dist-info/RECORD` meets `flask-3.0.2.dist-info/RECORD`."""
    return _DIGITS.sub("#", path)


class PathMatcher:
    """Finds an old member for a new path: the same path, else the same path with digit runs normalised."""

    def __init__(self, paths: Iterable[tuple[str, object]]) -> None:
        self._paths = list(paths)
        self._exact: dict[str, object] = {}
        for path, value in self._paths:
            self._exact.setdefault(path, value)
        self._loose: dict[str, object] | None = None  # made at the first miss: most paths match exactly

    def find(self, path: str) -> object | None:
        found = self._exact.get(path)
        if found is not None:
            return found
        if self._loose is None:
            self._loose = {}
            for loose, (_, value) in zip(_all_normalised([old for old, _ in self._paths]), self._paths):
                self._loose.setdefault(loose, value)
        return self._loose.get(normalised(path))


def _all_normalised(paths: list[str]) -> list[str]:
    """normalised() of every path, in one regex pass over them joined (a pass per path was most of a pair's path
    matching: node, 7,400 paths)."""
    joined = _DIGITS.sub("#", "\0".join(paths)).split("\0")
    return joined if len(joined) == len(paths) else [normalised(path) for path in paths]  # a path holding a NUL


# --- zstd with the base as a raw-content dictionary ------------------------------------------------------------

def _window_log(base: int, target: int) -> int:
    # The window must reach back over the whole base from the end of the target.
    return max(10, min(27, (base + target).bit_length()))


def zstd_encode(target: bytes, base: bytes, level: int, *, max_hash_log: int | None = None) -> bytes:
    """`target` as one zstd frame that may copy from `base` (a raw-content dictionary); `max_hash_log` caps the
    level's hash table (4 bytes an entry) where the caller measured that it costs no bytes."""
    caps = {}
    if max_hash_log is not None:
        default = zstandard.ZstdCompressionParameters.from_level(level, source_size=len(target))
        caps["hash_log"] = min(default.hash_log, max_hash_log)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=_window_log(len(base), len(target)), source_size=len(target),
        write_content_size=True, write_checksum=False, write_dict_id=False, **caps)
    # compress() returns its compressBound(len(target)) buffer with the size set down. Copying the frame out of it
    # was measured and not taken: in a long-lived server-like run over the bench pairs the peak rose 17-43 MB.
    if not base:
        return zstandard.ZstdCompressor(compression_params=params).compress(target)
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(target)


def zstd_decode(data: bytes, base: bytes, size: int) -> bytes:
    """The `size` bytes `data` decodes to against `base`; DeltaError on anything else."""
    if size > MAX_DELTA_BYTES or len(base) > MAX_DELTA_BYTES:
        raise DeltaError(f"delta of {size} bytes on a base of {len(base)} bytes is over {MAX_DELTA_BYTES}")
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if base else None
    dctx = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << 27)
    try:
        return decompress_exact(dctx, data, size)
    except DecompressionError as exc:
        raise DeltaError(f"delta does not decode: {exc}") from None
