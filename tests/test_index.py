"""The index format: encode/decode round trips, and strict decoding of hostile bytes (IndexFormatError, never
another exception)."""
from __future__ import annotations

import io
import random
from array import array

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkstore import oci
from chunkstore.chunker import ALGORITHM, ChunkParams
from chunkstore.index import (FORMAT, VERSION, ChunkList, ImageIndex, IndexFormatError, LayerIndex, decode_index,
                              index_layer)
from helpers import run
from tarkit import gnu_tar, make_tree

PARAMS = ChunkParams(min_size=64, avg_size=256, max_size=1024)
DIGEST = "sha256:" + "ab" * 32


@st.composite
def layer_indexes(draw: st.DrawFn) -> LayerIndex:
    rng = random.Random(draw(st.integers(0, 2**32)))
    runs = array("Q")
    chunks = ChunkList()
    for _ in range(draw(st.integers(0, 6))):
        lengths = draw(st.lists(st.integers(1, PARAMS.max_size), max_size=4))
        runs.extend((draw(st.integers(0, 3000)), sum(lengths)))
        for n in lengths:
            chunks.append(rng.randbytes(32), n)
    runs.extend((draw(st.integers(0, 3000)), 0))
    header_chunks = ChunkList()
    remaining = sum(runs[0::2])
    while remaining:  # header chunks need not line up with runs
        n = draw(st.integers(1, min(PARAMS.max_size, remaining)))
        header_chunks.append(rng.randbytes(32), n)
        remaining -= n
    return LayerIndex(
        media_type=draw(st.sampled_from(sorted(oci.LAYER_TYPES))),
        digest="sha256:" + rng.randbytes(32).hex(), size=draw(st.integers(0, 2**63)),
        diff_id="sha256:" + rng.randbytes(32).hex(), uncompressed_size=sum(runs),
        runs=runs, header_chunks=header_chunks, chunks=chunks)


def same_layer(a: LayerIndex, b: LayerIndex) -> bool:
    return (a.media_type, a.digest, a.size, a.diff_id, a.uncompressed_size, a.runs, bytes(a.header_chunks.ids),
            a.header_chunks.lengths, bytes(a.chunks.ids), a.chunks.lengths) == \
        (b.media_type, b.digest, b.size, b.diff_id, b.uncompressed_size, b.runs, bytes(b.header_chunks.ids),
         b.header_chunks.lengths, bytes(b.chunks.ids), b.chunks.lengths)


@settings(max_examples=200, deadline=None)
@given(layers=st.lists(layer_indexes(), max_size=4))
def test_encode_decode_round_trip(layers: list[LayerIndex]) -> None:
    index = ImageIndex(DIGEST, layers, PARAMS)
    decoded = decode_index(index.encode())
    assert decoded.manifest_digest == DIGEST and decoded.params == PARAMS
    assert len(decoded.layers) == len(layers)
    assert all(same_layer(a, b) for a, b in zip(layers, decoded.layers))
    assert decoded.encode() == index.encode()  # encoding is canonical


@settings(max_examples=200, deadline=None)
@given(layer=layer_indexes())
def test_run_ranges_are_each_runs_content_chunks(layer: LayerIndex) -> None:
    """Empty runs included: each range's chunks add up to its run's content_len, and the ranges tile the chunks."""
    ranges = layer.run_ranges()
    assert len(ranges) == len(layer.runs) // 2
    position = 0
    for (first, end), content_len in zip(ranges, layer.runs[1::2]):
        assert first == position and sum(layer.chunks.lengths[first:end]) == content_len
        position = end
    assert position == len(layer.chunks)


def test_real_layer_round_trip(tmp_path) -> None:
    tar = gnu_tar(make_tree(tmp_path / "tree"), tmp_path / "l.tar", "--format=pax")
    layer = index_layer(open(tar, "rb"), oci.OCI_LAYER_TAR)
    decoded = decode_index(ImageIndex(DIGEST, [layer]).encode())
    assert same_layer(decoded.layers[0], layer)
    assert decoded.chunk_ids() == layer.chunk_ids()


# --- hostile bytes --------------------------------------------------------------------------------------------

def valid_obj() -> dict:
    layer = LayerIndex(oci.OCI_LAYER_TAR, DIGEST, 10, DIGEST, 700, array("Q", [100, 300, 300, 0]))
    layer.header_chunks.append(b"h" * 32, 400)
    layer.chunks.append(b"a" * 32, 200)
    layer.chunks.append(b"b" * 32, 100)
    return msgpack.unpackb(ImageIndex(DIGEST, [layer], PARAMS).encode())


def u32(*values: int) -> bytes:
    return array("I", values).tobytes()


def u64(*values: int) -> bytes:
    return array("Q", values).tobytes()


def mutated(path: tuple, value: object) -> bytes:
    obj = valid_obj()
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return msgpack.packb(obj, use_bin_type=True)


DELETE = object()
L0 = ("layers", 0)

HOSTILE = {
    "wrong format": (("format",), "casync-index"),
    "wrong version": (("version",), 2),
    "version as string": (("version",), "1"),
    "wrong algorithm": (("chunking", "algorithm"), "rabin"),
    "min above max": (("chunking", "min"), 1 << 20),
    "chunking not a map": (("chunking",), [1, 2, 3]),
    "bool as size": (("chunking", "max"), True),
    "no layers": (("layers",), DELETE),
    "layers not a list": (("layers",), {"a": 1}),
    "layer not a map": (L0, b"layer"),
    "bad manifest digest": (("manifest_digest",), "sha256:../../etc/passwd"),
    "uppercase digest": (L0 + ("digest",), "sha256:" + "AB" * 32),
    "diff_id missing": (L0 + ("diff_id",), DELETE),
    "size as string": (L0 + ("size",), "10"),
    "negative size": (L0 + ("size",), -1),
    "media type as bytes": (L0 + ("media_type",), b"application/x"),
    "runs not 8-byte ints": (L0 + ("runs",), b"\0" * 12),
    "odd number of runs": (L0 + ("runs",), u64(100, 300, 300)),
    "no runs": (L0 + ("runs",), b""),
    "runs as list": (L0 + ("runs",), [100, 300, 300, 0]),
    "lengths not summing to the runs": (L0 + ("runs",), u64(100, 301, 299, 0)),
    "uncompressed_size disagrees": (L0 + ("uncompressed_size",), 701),
    "huge uncompressed_size": (L0 + ("uncompressed_size",), 2**64 - 1),
    "chunk spanning runs": (L0 + ("runs",), u64(100, 150, 300, 150)),
    "ids not a multiple of 32": (L0 + ("ids",), b"a" * 63),
    "more ids than lengths": (L0 + ("ids",), b"a" * 96),
    "zero-length chunk": (L0 + ("lengths",), u32(300, 0)),
    "chunk above max": (L0 + ("lengths",), u32(2000, 100)),
    "huge declared length": (L0 + ("lengths",), u32(2**32 - 1, 100)),
    "lengths not 4-byte ints": (L0 + ("header_lengths",), b"\x90\x01\0"),
    "header ids missing": (L0 + ("header_ids",), DELETE),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_index_is_refused(name: str) -> None:
    path, value = HOSTILE[name]
    with pytest.raises(IndexFormatError):
        decode_index(mutated(path, value))


def test_valid_obj_is_valid() -> None:
    """The hostile cases above each break one thing in an index that decodes."""
    assert decode_index(msgpack.packb(valid_obj())).layers[0].uncompressed_size == 700


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01\x02", msgpack.packb([FORMAT, VERSION]),
                                  msgpack.packb({"format": FORMAT}), msgpack.packb({"format": FORMAT, "version": 1}),
                                  msgpack.packb({1: 2}), msgpack.packb({b"format": FORMAT}),
                                  msgpack.packb(valid_obj()) + b"extra", b"\x91" * 5000 + b"\xc0",
                                  msgpack.packb(msgpack.ExtType(5, b"x")), "a str, not bytes"])
def test_malformed_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(IndexFormatError):
        decode_index(data)  # type: ignore[arg-type]


def test_every_truncation_is_refused() -> None:
    data = msgpack.packb(valid_obj())
    for n in range(len(data)):
        with pytest.raises(IndexFormatError):
            decode_index(data[:n])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_index_format_error(data: bytes) -> None:
    try:
        decode_index(data)
    except IndexFormatError:
        pass


@settings(max_examples=500, deadline=None)
@given(pos=st.integers(0, 10_000), byte=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_flipped_bytes_only_raise_index_format_error(pos: int, byte: int, cut: int) -> None:
    data = bytearray(msgpack.packb(valid_obj()))
    data[pos % len(data)] = byte
    try:
        decode_index(bytes(data[:len(data) - cut % 3]))
    except IndexFormatError:
        pass


def test_chunk_params_are_read_from_the_index() -> None:
    obj = valid_obj()
    assert obj["chunking"] == {"algorithm": ALGORITHM, "min": 64, "avg": 256, "max": 1024}
    assert decode_index(msgpack.packb(obj)).params == PARAMS


def test_index_layer_streams_a_layer_without_reading_it_whole(tmp_path) -> None:
    """Reads of at most read_size: a layer is never held in memory whole."""
    tar = gnu_tar(make_tree(tmp_path / "tree"), tmp_path / "l.tar", "--format=gnu")

    class Spy(io.FileIO):
        largest = 0

        def read(self, n: int = -1) -> bytes:
            Spy.largest = max(Spy.largest, n if n >= 0 else 1 << 62)
            return super().read(n)

        def readinto(self, b) -> int:
            Spy.largest = max(Spy.largest, len(b))
            return super().readinto(b)

    with Spy(tar) as blob:
        index_layer(blob, oci.OCI_LAYER_TAR, read_size=1 << 16)
    assert Spy.largest <= 1 << 20


def test_format_md_worked_example(tmp_path) -> None:
    """The worked example of docs/FORMAT.md: two files tarred by GNU tar."""
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    (tmp_path / "b.txt").write_bytes(b"world!\n")
    tar = tmp_path / "ex.tar"
    run("tar", "--format=gnu", "--mtime=2024-01-01", "--owner=0", "--group=0", "--numeric-owner", "--sort=name",
        "-cf", tar, "-C", tmp_path, "a.txt", "b.txt")
    layer = index_layer(open(tar, "rb"), oci.OCI_LAYER_TAR)
    assert list(layer.run_pairs()) == [(512, 6), (1018, 7), (8697, 0)]
    assert list(layer.header_chunks.lengths) == [10227] and list(layer.chunks.lengths) == [6, 7]
    assert bytes(layer.chunks.ids).hex() == ("8e4c7c1b99dbfd50e7a95185fead5ee1448fa904a2fdd778eaf5f2dbfd629a99"
                                             "af610ff6e5ecbb9c792de06464d8f4ca3fd17074aa26c6373693a45ac4fb462a")
    obj = msgpack.unpackb(ImageIndex(DIGEST, [layer], ChunkParams()).encode())
    assert obj["layers"][0]["runs"].hex() == ("0002000000000000" "0600000000000000" "fa03000000000000"
                                              "0700000000000000" "f921000000000000" "0000000000000000")
    assert obj["layers"][0]["header_lengths"].hex() == "f3270000"
    assert obj["layers"][0]["lengths"].hex() == "0600000007000000"
    assert list(obj) == ["format", "version", "chunking", "manifest_digest", "layers"]
