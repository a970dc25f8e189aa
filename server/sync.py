"""What a sync or repair answer sends, and the frames that carry it: planned from the index and the device's
have-set, streamed chunk by chunk from the store (or as cached whole-segment frames, segments.py) so memory stays
at about one CHUNKS frame."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import zstandard

from chunkstore.bloom import BloomFilter
from chunkstore.store import LocalStore
from chunkstore.wire import batch_chunks, encode_chunks, encode_end, encode_error

from .errors import as_api_error
from .framecache import FrameCache, frame_key
from .memory import give_back
from .metrics import Metrics
from .segments import Piece
from .singleflight import SingleFlight

log = logging.getLogger("chunksync.server")


@dataclass
class Plan:
    ids: list[bytes]   # chunk ids to send, in index order, each once
    skipped: int       # chunks of the image the device already has (have_images or a Bloom hit)
    pieces: list[Piece] | None = None  # how `ids` go (whole segments among them); None: all in frames made now

    def parts(self) -> list[Piece]:
        return self.pieces if self.pieces is not None else [Piece(self.ids, False)]


def plan_chunks(ordered: Iterable[bytes], have: set[bytes], bloom: BloomFilter | None) -> Plan:
    """The ids of `ordered` that are neither in `have` nor (probably) in `bloom`, order kept."""
    ordered = list(ordered)
    wanted = [cid for cid in ordered if cid not in have]
    if bloom is not None and wanted:
        hits = bloom.contains_many(b"".join(wanted))  # vectorised: a million ids in well under a second
        wanted = [cid for cid, hit in zip(wanted, hits.tolist()) if not hit]
    return Plan(wanted, len(ordered) - len(wanted))


DeltaFrames = Callable[[dict[str, int]], Iterator[bytes]]


@dataclass(frozen=True)
class Segments:
    """Whole segments: frames compressed at `level` once, kept in `cache`; devices asking for the same uncached
    frame at the same time (a fleet rollout) share one compression."""
    cache: FrameCache
    level: int = 9
    flights: SingleFlight[bytes] = field(default_factory=SingleFlight)


def stream_frames(store: LocalStore, plan: Plan, metrics: Metrics, *, header: bytes | None = None,
                  level: int = 3, frame_bytes: int = 4 << 20, deltas: DeltaFrames | None = None,
                  segments: Segments | None = None) -> Iterator[bytes]:
    """HEADER (if given), DELTA frames (if `deltas`; it counts what it sends), CHUNKS frames of about
    `frame_bytes` (a whole segment's frame from `segments`), END; an ERROR frame instead of END on failure.

    Blocking (store reads, zstd): iterate it in a worker thread.
    """
    if header is not None:
        yield header
    counts = {"chunks": 0, "bytes": 0, "delta_items": 0, "delta_bytes": 0}

    def chunks(ids: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
        for cid in ids:
            data = store.get(cid)  # verified against its id: a broken store cannot spread corruption
            counts["chunks"] += 1
            counts["bytes"] += len(data)
            yield cid, data

    def whole(piece: Piece, found: Segments) -> bytes:
        key = frame_key(piece.ids, found.level)
        computed = False

        def compute() -> bytes:
            nonlocal computed
            frame = found.cache.get(key)  # a flight that just ended may have stored it
            if frame is None:
                computed = True
                frame = encode_chunks([(cid, store.get(cid)) for cid in piece.ids],
                                      zstandard.ZstdCompressor(level=found.level))
                found.cache.put(key, frame)
            return frame

        frame = found.cache.get(key) or found.flights.do(key, compute)
        metrics.inc("chunksync_segment_frames_total", outcome="computed" if computed else "cached")
        counts["chunks"] += len(piece.ids)
        counts["bytes"] += piece.size
        return frame

    try:
        if deltas is not None:
            yield from deltas(counts)
        cctx = zstandard.ZstdCompressor(level=level)
        for piece in plan.parts():
            if piece.whole and segments is not None:
                yield whole(piece, segments)
            else:
                yield from batch_chunks(chunks(piece.ids), cctx, frame_bytes)
    except Exception as exc:
        error = as_api_error(exc)
        log.warning("stream failed after %d chunks: %s", counts["chunks"], error.message)
        yield encode_error(error.code, error.message)
        return
    finally:
        give_back()  # the answer's buffers and contexts are freed: do not keep them resident until the next one
        metrics.inc("chunksync_chunks_sent_total", counts["chunks"])
        metrics.inc("chunksync_chunk_bytes_sent_total", counts["bytes"])
        metrics.inc("chunksync_delta_items_sent_total", counts["delta_items"])
        metrics.inc("chunksync_delta_bytes_sent_total", counts["delta_bytes"])
    metrics.inc("chunksync_chunks_skipped_total", plan.skipped)
    if deltas is None:
        del counts["delta_items"], counts["delta_bytes"]
    yield encode_end(**counts, skipped=plan.skipped)
