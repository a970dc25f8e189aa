"""Segments: an image's chunks, in index order, cut after every chunk whose id says so (content-defined, so an
unchanged run of chunks makes the same segments in every image that holds it) and at about one CHUNKS frame. A
device that lacks a whole segment, or all of it but chunks its Bloom filter claims (most of them false positives),
gets it as one CHUNKS frame compressed once at SEGMENT_LEVEL and cached for every later device (framecache.py);
what it lacks of the other segments goes in frames made for it, as before."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CUT_EVERY = 64        # a segment ends after a chunk whose id's last 4 bytes are 0 mod this: ~64 chunks on average
WHOLE_SHARE = 0.95    # ... and goes whole when the device lacks this share of its bytes, and holds none of it for sure


@dataclass(frozen=True)
class Piece:
    """What one part of an answer sends: a whole segment (`whole`, its ids in order) or the wanted ids of some;
    `size`: the bytes of a whole segment's chunks."""
    ids: list[bytes]
    whole: bool
    size: int = 0


def segments(ordered: Iterable[tuple[bytes, int]], max_bytes: int) -> Iterator[list[tuple[bytes, int]]]:
    """`ordered` (id, length), each id once, cut into segments of at most `max_bytes` (or one longer chunk)."""
    segment: list[tuple[bytes, int]] = []
    size = 0
    for cid, length in ordered:
        if segment and size + length > max_bytes:
            yield segment
            segment, size = [], 0
        segment.append((cid, length))
        size += length
        # The id's last bytes: its first 16 place it in the Bloom filter (docs/PROTOCOL.md), keep the two apart.
        if int.from_bytes(cid[-4:], "little") % CUT_EVERY == 0:
            yield segment
            segment, size = [], 0
    if segment:
        yield segment


def pieces(ordered: Iterable[tuple[bytes, int]], wanted: Iterable[bytes], held: set[bytes],
           max_bytes: int) -> list[Piece]:
    """The answer for `wanted` ids (in `ordered`'s order) as pieces: a segment goes whole when none of it is in
    `held` (what the device surely has, or gets otherwise) and its wanted bytes are at least WHOLE_SHARE of it."""
    wanted = set(wanted)
    out: list[Piece] = []
    loose: list[bytes] = []
    for segment in segments(ordered, max_bytes):
        want = [(cid, length) for cid, length in segment if cid in wanted]
        if not want:
            continue
        total = sum(length for _, length in segment)
        if sum(length for _, length in want) >= WHOLE_SHARE * total and not any(cid in held for cid, _ in segment):
            if loose:
                out.append(Piece(loose, False))
                loose = []
            out.append(Piece([cid for cid, _ in segment], True, total))
        else:
            loose += [cid for cid, _ in want]
    if loose:
        out.append(Piece(loose, False))
    return out
