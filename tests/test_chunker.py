"""Streaming FastCDC gives exactly the chunks of whole-buffer FastCDC, whatever the piece and read sizes."""
from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings, strategies as st

from chunkstore.chunker import DEFAULT_PARAMS, ChunkParams, StreamChunker, chunk_file, chunk_pieces, cut_points

SMALL = ChunkParams(min_size=64, avg_size=256, max_size=1024)  # many boundaries in little data: fast examples


def make_data(seed: int, size: int, kind: str) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":  # no content-defined cut points: every chunk is max_size
        return bytes(size)
    # text-like: a small alphabet with repeats, as in source files
    words = [rng.randbytes(rng.randint(1, 12)) for _ in range(50)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def whole(data: bytes, params: ChunkParams) -> list[bytes]:
    chunks, offset = [], 0
    for length in cut_points(data, params):
        chunks.append(data[offset:offset + length])
        offset += length
    return chunks


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, offset, i = [], 0, 0
    while offset < len(data):
        n = sizes[i % len(sizes)]
        pieces.append(data[offset:offset + n])
        offset += n
        i += 1
    return pieces


kinds = st.sampled_from(["random", "zeros", "text"])
piece_sizes = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 20_000), kind=kinds, sizes=piece_sizes)
def test_stream_equals_whole_buffer_small_params(seed: int, size: int, kind: str, sizes: list[int]) -> None:
    data = make_data(seed, size, kind)
    expected = whole(data, SMALL)
    assert list(chunk_pieces(split(data, sizes), SMALL)) == expected
    assert b"".join(expected) == data


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 3 << 20), kind=kinds,
       read_size=st.integers(min_value=1, max_value=2 << 20))
def test_chunk_file_equals_whole_buffer_default_params(seed: int, size: int, kind: str, read_size: int) -> None:
    data = make_data(seed, size, kind)
    read_size = max(read_size, 4096)  # 1-byte reads of 3 MB would only make the test slow
    assert list(chunk_file(io.BytesIO(data), DEFAULT_PARAMS, read_size)) == whole(data, DEFAULT_PARAMS)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 4096, 10_000])
@pytest.mark.parametrize("kind", ["random", "zeros", "text"])
def test_edge_sizes(size: int, kind: str) -> None:
    data = make_data(size, size, kind)
    expected = whole(data, SMALL)
    for sizes in ([1], [63], [64], [1024], [1025], [2048], [size or 1]):
        assert list(chunk_pieces(split(data, sizes), SMALL)) == expected
    if 0 < size <= SMALL.min_size:
        assert expected == [data]  # smaller than min: one chunk
    if kind == "zeros" and size:
        assert all(len(c) == SMALL.max_size for c in expected[:-1])


@pytest.mark.parametrize("size", [DEFAULT_PARAMS.min_size - 1, DEFAULT_PARAMS.min_size, DEFAULT_PARAMS.max_size,
                                  DEFAULT_PARAMS.max_size + 1, 2 * DEFAULT_PARAMS.max_size])
def test_default_params_edge_sizes(size: int) -> None:
    data = make_data(7, size, "random")
    chunks = list(chunk_pieces(split(data, [100_000]), DEFAULT_PARAMS))
    assert chunks == whole(data, DEFAULT_PARAMS)
    assert all(len(c) <= DEFAULT_PARAMS.max_size for c in chunks)
    assert all(len(c) >= DEFAULT_PARAMS.min_size for c in chunks[:-1])


def test_memory_stays_bounded() -> None:
    """The chunker never holds more than 2 * max_size plus one piece, however long the stream."""
    chunker = StreamChunker(SMALL)
    rng = random.Random(5)
    for _ in range(2000):
        for _chunk in chunker.feed(rng.randbytes(300)):
            pass
        assert len(chunker._buf) < 2 * SMALL.max_size + 300
    assert sum(len(c) for c in chunker.finish()) < 2 * SMALL.max_size + 300


def test_chunks_are_bytes() -> None:
    chunks = list(chunk_pieces([bytearray(b"x" * 5000), memoryview(b"y" * 5000)], SMALL))
    assert all(type(c) is bytes for c in chunks)


@pytest.mark.parametrize("sizes", [(10, 20, 30), (64, 32, 128), (64, 128, 64), (64, 256, 2 << 30)])
def test_bad_params_are_refused(sizes: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="chunk size"):
        ChunkParams(*sizes)
