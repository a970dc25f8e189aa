"""Content-defined chunking (FastCDC) that streams: any input size, bounded memory, and exactly the
boundaries that chunking the whole input in one buffer would give."""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

try:
    # The compiled extension only: the pure-Python fallback is ~100x slower and must never be used silently.
    from fastcdc.fastcdc_cy import chunk_generator as _cdc_chunks
except ImportError as exc:  # pragma: no cover - depends on the installed wheel
    raise ImportError(
        "chunksync needs the compiled FastCDC extension (fastcdc.fastcdc_cy), which is missing; "
        "reinstall with `pip install --force-reinstall fastcdc` on a platform that has its wheel "
        "or a C compiler. The pure-Python fallback is ~100x slower and is never used."
    ) from exc

ALGORITHM = "fastcdc2016-gear"  # iscc/fastcdc-py's FastCDC with its GEAR table; recorded in every index


@dataclass(frozen=True)
class ChunkParams:
    """FastCDC size limits in bytes. Defaults: min 16 KiB, avg 64 KiB, max 256 KiB (DESIGN.md)."""

    min_size: int = 16 * 1024
    avg_size: int = 64 * 1024
    max_size: int = 256 * 1024

    def __post_init__(self) -> None:
        if not (64 <= self.min_size <= self.avg_size <= self.max_size <= 1 << 30):
            raise ValueError(f"chunk sizes must satisfy 64 <= min <= avg <= max <= 1 GiB, got {self}")
        if not 256 <= self.avg_size:
            raise ValueError(f"average chunk size must be at least 256 bytes, got {self.avg_size}")


DEFAULT_PARAMS = ChunkParams()
READ_SIZE = 4 * 1024 * 1024


def cut_points(buf: bytes | memoryview, params: ChunkParams) -> list[int]:
    """Lengths of the chunks of one whole buffer."""
    with memoryview(buf) as view:
        return [c.length for c in _cdc_chunks(view, params.min_size, params.avg_size,
                                              params.max_size, False, None)]


class StreamChunker:
    """Takes bytes in pieces of any size and yields chunks as soon as their end is certain.

    FastCDC decides a cut using at most `max_size` bytes from the chunk's start, and treats a chunk that
    starts less than `max_size` before the end of its buffer as the tail of the input. So a chunk is final
    once `max_size` bytes after its start are buffered (or at the true end); everything from the first
    unfinished chunk is kept for the next round. Memory stays under `max_size` + one piece.
    """

    def __init__(self, params: ChunkParams = DEFAULT_PARAMS):
        self.params = params
        # A bytearray grows in place: tar headers arrive 512 bytes at a time, and re-copying a buffer of up to
        # 2 * max_size for each of them cost a fifth of the indexing time.
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        self._buf += data
        if len(self._buf) >= 2 * self.params.max_size:
            yield from self._emit(final=False)

    def finish(self) -> Iterator[bytes]:
        yield from self._emit(final=True)

    def _emit(self, final: bool) -> Iterator[bytes]:
        buf = self._buf
        offset = 0
        for length in cut_points(buf, self.params):
            if not final and offset + self.params.max_size > len(buf):
                break
            with memoryview(buf) as view:  # released at once, so the buffer can be resized later
                chunk = bytes(view[offset:offset + length])
            yield chunk
            offset += length
        del buf[:offset]


def chunk_pieces(pieces: Iterable[bytes], params: ChunkParams = DEFAULT_PARAMS) -> Iterator[bytes]:
    """Chunks of the concatenation of `pieces`."""
    chunker = StreamChunker(params)
    for piece in pieces:
        yield from chunker.feed(piece)
    yield from chunker.finish()


def chunk_file(fileobj: BinaryIO, params: ChunkParams = DEFAULT_PARAMS,
               read_size: int = READ_SIZE) -> Iterator[bytes]:
    """Chunks of everything readable from `fileobj`, read `read_size` bytes at a time."""
    return chunk_pieces(iter(lambda: fileobj.read(read_size), b""), params)
