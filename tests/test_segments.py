"""Whole-segment CHUNKS frames: segments are content-defined (the same run of chunks cuts the same in any image),
a segment goes whole only when the device lacks (nearly) all of it and surely holds none of it, the frame cache
keeps what it was given within its size and drops a damaged frame; end to end, a later empty device gets the
cached frames and the same verified image, and a damaged cached frame is made again, not sent."""
from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkstore.bloom import BloomFilter
from chunkstore.index import chunk_id, decode_index
from chunkstore.wire import CHUNKS_FRAME_TARGET, SyncRequest
from helpers import Registry, build_image, push_image, real_files
from pull_tools import pull
from server.framecache import FrameCache, frame_key
from server.segments import CUT_EVERY, WHOLE_SHARE, Piece, pieces, segments
from server_process import Answer, ServerProcess, post

REPO = "segments/app"


def _chunks(n: int, seed: int, size: int = 1000) -> list[tuple[bytes, int]]:
    rng = random.Random(seed)
    return [(chunk_id(rng.randbytes(16)), size) for _ in range(n)]


def test_segments_cut_by_content_and_size() -> None:
    run = _chunks(2000, 1)
    cut = list(segments(run, 1 << 30))
    assert [c for segment in cut for c in segment] == run
    assert all(int.from_bytes(segment[-1][0][-4:], "little") % CUT_EVERY == 0 for segment in cut[:-1])
    assert 2000 / CUT_EVERY / 3 < len(cut) < 2000 / CUT_EVERY * 3
    # The same run behind other chunks: after the first cut, the very same segments.
    shifted = list(segments(_chunks(37, 2) + run, 1 << 30))
    assert [segment for segment in shifted if segment[0] in run[len(cut[0]):]] == cut[1:]
    capped = list(segments(run, 10_000))
    assert max(sum(length for _, length in segment) for segment in capped) <= 10_000


def test_a_segment_goes_whole_only_when_lacked_and_not_surely_held() -> None:
    run = _chunks(2000, 3)
    cut = list(segments(run, 1 << 30))
    ids = [cid for cid, _ in run]
    everything = pieces(run, ids, set(), 1 << 30)
    assert [p.ids for p in everything] == [[cid for cid, _ in segment] for segment in cut]
    assert all(p.whole and p.size == 1000 * len(p.ids) for p in everything)
    big = max(cut, key=len)
    # A Bloom hit (claimed, maybe a false positive) in a segment that is otherwise lacked: still whole.
    claimed = big[len(big) // 2][0]
    assert 1 / len(big) <= 1 - WHOLE_SHARE  # one chunk of 1000 bytes is under 5% of the longest segment
    claimed_whole = pieces(run, [c for c in ids if c != claimed], set(), 1 << 30)
    assert [c for p in claimed_whole if p.whole for c in p.ids].count(claimed) == 1
    # A chunk the device surely holds (a named image, a delta): that segment goes in frames made for it, without it.
    held = pieces(run, [c for c in ids if c != claimed], {claimed}, 1 << 30)
    assert claimed not in [c for p in held for c in p.ids]
    assert not any(p.whole and big[0][0] in p.ids for p in held)
    # Half of a segment lacked: no whole frame, just the lacked half, in order.
    half = [cid for cid, _ in big[::2]]
    assert pieces(run, half, set(), 1 << 30) == [Piece(half, False)]


def test_frame_cache_keeps_within_its_size_and_drops_damaged_frames(tmp_path: Path) -> None:
    cache = FrameCache(tmp_path, max_bytes=10_000)
    keys = [frame_key([bytes([i]) * 32], 9) for i in range(5)]
    assert frame_key([b"a" * 32], 9) != frame_key([b"a" * 32], 3) != frame_key([b"b" * 32], 3)
    for i, key in enumerate(keys[:3]):
        cache.put(key, bytes([i]) * 3000)
    assert cache.get(keys[0]) == bytes([0]) * 3000  # now the most recently used
    cache.put(keys[3], b"\3" * 3000)  # over 10,000: the least recently used (keys[1]) goes
    assert cache.get(keys[1]) is None and cache.get(keys[0]) and cache.get(keys[2]) and cache.get(keys[3])
    assert cache.total_bytes() <= 10_000
    cache.put(keys[4], b"x" * 20_000)  # bigger than the whole cache: not kept, nothing else lost
    assert cache.get(keys[4]) is None and cache.total_bytes() == 9000
    with sqlite3.connect(tmp_path / "frames.db") as db:
        db.execute("UPDATE frames SET frame = ? WHERE key = ?", (b"\0" * 3000, keys[2]))
    assert cache.get(keys[2]) is None  # its digest no longer matches: dropped, never returned
    assert FrameCache(tmp_path, max_bytes=10_000).get(keys[2]) is None and cache.total_bytes() == 6000


# --- end to end ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("segment-image")
    layout = build_image(tmp, [real_files(3_000_000), real_files(800_000, skip=300, prefix="lib/")], "v1")
    push_image(layout, "v1", registry, REPO)
    return f"{registry.host}/{REPO}:v1"


@pytest.fixture
def server(registry: Registry, tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(registry.url, store=tmp_path / "server-store") as process:
        yield process


def _frames(server: ServerProcess) -> tuple[float, float]:
    m = server.metrics()
    return (m.get('chunksync_segment_frames_total{outcome="computed"}', 0),
            m.get('chunksync_segment_frames_total{outcome="cached"}', 0))


def test_a_later_empty_device_gets_the_cached_frames(server: ServerProcess, image: str, tmp_path: Path) -> None:
    first = pull(image, server.url, tmp_path / "device-1").report
    computed, cached = _frames(server)
    assert first["path"] == "diff" and computed > 0 and cached == 0
    later = pull(image, server.url, tmp_path / "device-2").report
    assert later["path"] == "diff" and later["manifest_digest"] == first["manifest_digest"]
    assert _frames(server) == (computed, computed)  # every frame the first device caused, from the cache
    assert later["chunks_received"] == first["chunks_received"] and later["repair_chunks"] == 0
    assert abs(later["bytes_received"] - first["bytes_received"]) < 200  # the same frames, give or take HTTP


def test_a_damaged_cached_frame_is_made_again(server: ServerProcess, image: str, tmp_path: Path) -> None:
    pull(image, server.url, tmp_path / "device-1").report
    computed, _ = _frames(server)
    with sqlite3.connect(server.store / "frames.db") as db:
        (key,) = db.execute("SELECT key FROM frames ORDER BY bytes DESC LIMIT 1").fetchone()
        db.execute("UPDATE frames SET frame = zeroblob(length(frame)) WHERE key = ?", (key,))
    again = pull(image, server.url, tmp_path / "device-2").report
    assert again["path"] == "diff" and again["chunks_rejected"] == 0 and again["repair_chunks"] == 0
    assert _frames(server) == (computed + 1, computed - 1)


def test_bloom_hits_in_a_lacked_segment_come_with_it(server: ServerProcess, image: str, tmp_path: Path) -> None:
    """A device whose Bloom filter claims a chunk (what a false positive looks like) of a segment it otherwise lacks
    gets the segment whole, the claimed chunk in it, and END counts it as sent, not skipped; a claim on a chunk
    that is most of its segment leaves that chunk out."""
    plain = Answer(post(server.url, "/v1/sync", SyncRequest(REPO, "v1").encode()))
    assert plain.header is not None and plain.end is not None
    index = decode_index(plain.header["index"])
    ordered = list(dict.fromkeys(pair for layer in index.layers for pair in layer.all_chunks()))
    cut = [segment for segment in segments(ordered, CHUNKS_FRAME_TARGET) if len(segment) > 1]
    small = min(max(cut, key=len), key=lambda pair: pair[1])[0]  # a small share of a long segment
    # The biggest share a chunk has of its segment: over 5%, its claim keeps the segment from going whole.
    share, big = max((length / sum(n for _, n in segment), cid) for segment in segments(ordered, CHUNKS_FRAME_TARGET)
                     for cid, length in segment)
    assert share > 1 - WHOLE_SHARE
    for claimed, sent in ((small, True), (big, False)):
        bloom = BloomFilter.build([claimed], 0.0001)
        answer = Answer(post(server.url, "/v1/sync", SyncRequest(REPO, "v1", bloom=bloom).encode()))
        assert answer.end is not None and answer.error is None
        assert (claimed in answer.ids) == sent and sorted(answer.ids + ([] if sent else [claimed])) == sorted(plain.ids)
        assert answer.end["skipped"] == (0 if sent else 1)


def test_devices_asking_at_once_share_one_compression(tmp_path: Path) -> None:
    """Two answers stream the same uncached segment at the same time: one compresses it, the other waits for that
    frame. The overlap is made certain by holding the first store read until the second answer is waiting (a real
    race cannot be timed reliably); the store, cache and frames are the real ones."""
    import threading
    import time

    from chunkstore.store import LocalStore
    from server.metrics import Metrics
    from server.sync import Plan, Segments, stream_frames

    data = [random.Random(i).randbytes(5000) for i in range(8)]
    ids = [chunk_id(d) for d in data]
    started, release = threading.Event(), threading.Event()

    class HeldStore(LocalStore):
        def get(self, cid: bytes) -> bytes:
            started.set()
            assert release.wait(10)
            return super().get(cid)

    store = HeldStore(tmp_path / "store")
    store.put_many(list(zip(ids, data)))
    segments_ = Segments(FrameCache(tmp_path / "cache", 1 << 20))
    metrics = Metrics()
    plan = Plan(ids, 0, [Piece(ids, True, sum(map(len, data)))])
    answers: list[list[bytes]] = []

    def answer() -> None:
        answers.append(list(stream_frames(store, plan, metrics, segments=segments_)))

    first = threading.Thread(target=answer)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=answer)
    second.start()
    # Release the first read once the second answer waits: for the first one's frame (in SingleFlight.do), or, were
    # the compression not shared, in a store read of its own.
    deadline = time.monotonic() + 10
    while not _waiting_in(second, {"result", "get"}) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    first.join(10)
    second.join(10)
    assert len(answers) == 2 and answers[0] == answers[1]
    assert metrics.value("chunksync_segment_frames_total", outcome="computed") == 1
    assert metrics.value("chunksync_segment_frames_total", outcome="cached") == 1


def _waiting_in(thread, functions: set[str]) -> bool:
    """Whether `thread` is blocked inside a function of these names (its innermost frames of project or futures code)."""
    import sys

    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name in functions and ("futures" in frame.f_code.co_filename
                                                   or "test_segments" in frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False
