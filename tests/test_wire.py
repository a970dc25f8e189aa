"""Wire messages and frames: round trips, and hostile input (truncated, unknown, oversized, decompression bombs,
bad names and digests) refused with ProtocolError and bounded memory."""
from __future__ import annotations

import io
import random
import struct
import tracemalloc

import msgpack
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from chunkstore.bloom import BloomFilter
from chunkstore.index import chunk_id
from chunkstore.wire import (DELTA_CONTENT, DELTA_GROUP, FRAME_CHUNKS, FRAME_END, FRAME_HEADER, MAX_CHUNKS_FRAME_BYTES,
                             MAX_FRAME_PAYLOAD, MAX_GROUP_RANGES, MAX_HAVE_IMAGES, ChunksRequest, DeltaGroup, DeltaItem,
                             ProtocolError, SUPPORTED_VERSIONS, SyncRequest, UnsupportedVersion, batch_chunks, decode_chunks, decode_chunks_request,
                             decode_delta, decode_item, decode_sync_request, encode_delta, encode_end, encode_error,
                             encode_frame, encode_header, read_frames)

DIGEST = "sha256:" + "c" * 64
CCTX = zstandard.ZstdCompressor()
DCTX = zstandard.ZstdDecompressor()


def some_chunks(n: int, seed: int = 0, size: int = 70_000) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    datas = [rng.randbytes(rng.randint(1, size)) for _ in range(n)]
    return [(chunk_id(d), d) for d in datas]


# --- requests -------------------------------------------------------------------------------------------------

def test_sync_request_round_trip() -> None:
    bloom = BloomFilter.build(b"".join(cid for cid, _ in some_chunks(5)))
    request = SyncRequest("library/app", "v2", "linux/arm64/v8", [("library/app", DIGEST)], bloom)
    decoded = decode_sync_request(request.encode())
    assert decoded == request
    by_digest = SyncRequest("library/app", DIGEST, have_manifest=True)
    assert decode_sync_request(by_digest.encode()) == by_digest
    assert b"have_manifest" not in request.encode()  # unset: the request older servers know, byte for byte


def test_chunks_request_round_trip() -> None:
    request = ChunksRequest("team/app", DIGEST, b"".join(cid for cid, _ in some_chunks(3)))
    assert decode_chunks_request(request.encode()) == request
    assert msgpack.unpackb(request.encode())["v"] == 1  # the message of every version: 1, which every server takes
    at_six = ChunksRequest("team/app", DIGEST, request.ids, version=6)
    assert decode_chunks_request(at_six.encode()) == at_six


def test_a_version_the_server_does_not_speak_is_refused_with_the_ones_it_does() -> None:
    for decode, body in ((decode_sync_request, SyncRequest("team/app", "v1", version=6).encode()),
                         (decode_chunks_request, ChunksRequest("team/app", DIGEST, b"\1" * 32, version=6).encode())):
        with pytest.raises(UnsupportedVersion) as refused:
            decode(body, (5, 1, 2, 3, 4))
        assert refused.value.versions == (1, 2, 3, 4, 5)
        # The words of older servers, which older devices parse.
        assert "protocol version 6 is not supported (this server speaks 1, 2, 3, 4, 5)" in str(refused.value)
        assert decode(body, (6,)).version == 6


def sync(**fields: object) -> bytes:
    body = {"v": 1, "repository": "library/app", "reference": "v1", "platform": "linux/amd64",
            "have_images": [], "bloom": None}
    body.update(fields)
    return msgpack.packb({k: v for k, v in body.items() if v is not DROP}, use_bin_type=True)


def chunks_req(**fields: object) -> bytes:
    body = {"v": 1, "repository": "library/app", "manifest_digest": DIGEST, "ids": b"i" * 64}
    body.update(fields)
    return msgpack.packb({k: v for k, v in body.items() if v is not DROP}, use_bin_type=True)


DROP = object()

BAD_SYNC = {
    "not msgpack": b"\xc1\xc1",
    "not a map": msgpack.packb([1, 2]),
    "trailing bytes": sync() + b"x",
    "no version": sync(v=DROP),
    "an unknown version": sync(v=max(SUPPORTED_VERSIONS) + 1),
    "repository missing": sync(repository=DROP),
    "repository as bytes": sync(repository=b"library/app"),
    "traversal in repository": sync(repository="../../etc/passwd"),
    "dot-dot component": sync(repository="library/../secret"),
    "uppercase repository": sync(repository="Library/App"),
    "reference with a slash": sync(reference="v1/../../x"),
    "bad digest reference": sync(reference="sha256:1234"),
    "platform without slash": sync(platform="linux"),
    "platform as int": sync(platform=5),
    "have_images not a list": sync(have_images={"a": 1}),
    "have_images entry of 3": sync(have_images=[["library/app", DIGEST, "x"]]),
    "have_images bad digest": sync(have_images=[["library/app", "sha256:" + "C" * 64]]),
    "have_images traversal": sync(have_images=[["../x", DIGEST]]),
    "too many have_images": sync(have_images=[["library/app", DIGEST]] * (MAX_HAVE_IMAGES + 1)),
    "far too many have_images": sync(have_images=[["library/app", DIGEST]] * 1000),
    "bloom not a map": sync(bloom=b"bits"),
    "bloom bad m": sync(bloom={"m": 100, "k": 2, "bits": bytes(12)}),
    "bloom bits short": sync(bloom={"m": 128, "k": 2, "bits": bytes(8)}),
    "bloom k 0": sync(bloom={"m": 64, "k": 0, "bits": bytes(8)}),
    "huge string": sync(reference="x" * 100_000),
    "have_manifest as int": sync(have_manifest=1),
}


@pytest.mark.parametrize("name", sorted(BAD_SYNC))
def test_bad_sync_request(name: str) -> None:
    with pytest.raises(ProtocolError):
        decode_sync_request(BAD_SYNC[name])


BAD_CHUNKS = {
    "not msgpack": b"\x92",
    "version 0": chunks_req(v=0),
    "ids not a multiple of 32": chunks_req(ids=b"i" * 33),
    "no ids": chunks_req(ids=b""),
    "ids as list": chunks_req(ids=[b"i" * 32]),
    "traversal in repository": chunks_req(repository="a/../../b"),
    "bad digest": chunks_req(manifest_digest="sha256:../../etc"),
    "digest missing": chunks_req(manifest_digest=DROP),
    "too many ids": chunks_req(ids=bytes(32 * ((1 << 20) + 1))),
}


@pytest.mark.parametrize("name", sorted(BAD_CHUNKS))
def test_bad_chunks_request(name: str) -> None:
    with pytest.raises(ProtocolError):
        decode_chunks_request(BAD_CHUNKS[name])


def test_oversized_request_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_sync_request(b"\0" * (72 << 20 | 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500))
def test_random_request_bytes_only_raise_protocol_error(data: bytes) -> None:
    for decode in (decode_sync_request, decode_chunks_request):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, 1000), byte=st.integers(0, 255))
def test_flipped_request_bytes_only_raise_protocol_error(pos: int, byte: int) -> None:
    body = bytearray(sync(have_images=[["library/app", DIGEST]], bloom={"m": 64, "k": 2, "bits": bytes(8)}))
    body[pos % len(body)] = byte
    try:
        decode_sync_request(bytes(body))
    except ProtocolError:
        pass


# --- frames ---------------------------------------------------------------------------------------------------

def stream() -> bytes:
    chunks = some_chunks(30, size=3000)
    return (encode_header(DIGEST, b"{manifest}", b"{config}", b"index", platform="linux/amd64")
            + b"".join(batch_chunks(chunks, CCTX, target=10_000)) + encode_end(chunks=30, bytes=1, skipped=0))


def test_frames_round_trip() -> None:
    chunks = some_chunks(200)
    data = (encode_header(DIGEST, b"{m}", b"{c}", b"index") + b"".join(batch_chunks(chunks, CCTX))
            + encode_error("registry", "it broke") + encode_end(chunks=200))
    frames = list(read_frames(io.BytesIO(data)))
    assert frames[0].type == FRAME_HEADER and frames[0].payload["config"] == b"{c}"
    got = [pair for f in frames if f.type == FRAME_CHUNKS for pair in decode_chunks(f.payload, DCTX)]
    assert got == chunks
    assert all(sum(map(len, (d for _, d in decode_chunks(f.payload, DCTX)))) <= MAX_CHUNKS_FRAME_BYTES
               for f in frames if f.type == FRAME_CHUNKS)
    assert frames[-2].payload == {"code": "registry", "message": "it broke"}
    assert frames[-1].type == FRAME_END and sum(f.wire_size for f in frames) == len(data)


def test_every_truncation_is_refused_except_at_frame_boundaries() -> None:
    data = stream()
    boundaries = {0}
    for frame in read_frames(io.BytesIO(data)):
        boundaries.add(max(boundaries) + frame.wire_size)
    for cut in sorted(set(range(0, len(data), 13)) | {b + d for b in boundaries for d in (-1, 1, 5, 6, 7)}):
        if not 0 <= cut <= len(data):
            continue
        if cut in boundaries:
            list(read_frames(io.BytesIO(data[:cut])))  # a cut stream ends cleanly: the END frame is missing
        else:
            with pytest.raises(ProtocolError, match="stream ended inside"):
                list(read_frames(io.BytesIO(data[:cut])))


@pytest.mark.parametrize("prefix,why", [
    (struct.pack(">BBI", 2, FRAME_END, 1), "frame version 2"),
    (struct.pack(">BBI", 1, 4, 1), "frame type 4"),
    (struct.pack(">BBI", 1, 99, 1), "frame type 99"),
    (struct.pack(">BBI", 1, FRAME_END, MAX_FRAME_PAYLOAD + 1), "exceeds the limit"),
    (struct.pack(">BBI", 1, FRAME_END, 0xFFFFFFFF), "exceeds the limit"),
])
def test_bad_frame_prefix(prefix: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        list(read_frames(io.BytesIO(prefix + b"\x80")))


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb(5), msgpack.packb({}) + b"x"])
def test_bad_frame_payload(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        list(read_frames(io.BytesIO(struct.pack(">BBI", 1, FRAME_END, len(payload)) + payload)))


def chunks_payload(ids: bytes, lengths: list[int], data: bytes) -> dict:
    return {"ids": ids, "lengths": struct.pack(f"<{len(lengths)}I", *lengths), "data": data}


@pytest.mark.parametrize("payload,why", [
    ({"ids": b"i" * 32, "lengths": b"\1\0\0\0"}, "needs byte strings"),
    (chunks_payload(b"i" * 33, [1], CCTX.compress(b"x")), "do not match"),
    (chunks_payload(b"i" * 64, [1], CCTX.compress(b"x")), "do not match"),
    (chunks_payload(b"i" * 32, [5], CCTX.compress(b"x" * 4)), "holds 4 bytes, 5 expected"),
    (chunks_payload(b"i" * 32, [5], CCTX.compress(b"x" * 6)), "more than 5"),
    (chunks_payload(b"i" * 32, [5], b"not zstd at all"), "bad zstd data"),
    (chunks_payload(b"i" * 64, [MAX_CHUNKS_FRAME_BYTES, 1], b""), "declares"),
    (chunks_payload(b"i" * 32, [2**32 - 1], b""), "declares"),
])
def test_bad_chunks_frame(payload: dict, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_chunks(payload, DCTX)


def test_decompression_bomb_is_refused_without_allocating_it() -> None:
    """A CHUNKS frame declaring 8 MiB whose data expands to 1 GiB."""
    compressor = CCTX.compressobj()
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(1024)) + compressor.flush()
    assert len(bomb) < 1 << 20
    payload = chunks_payload(b"i" * 64, [MAX_CHUNKS_FRAME_BYTES // 2] * 2, bomb)
    frame = encode_frame(FRAME_CHUNKS, payload)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=f"more than {MAX_CHUNKS_FRAME_BYTES}"):
            for f in read_frames(io.BytesIO(frame)):
                decode_chunks(f.payload, DCTX)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # a few times the 8 MiB limit, nowhere near 1 GiB


def test_zstd_frame_lying_about_its_content_size() -> None:
    """A frame header may declare any content size; the reader trusts only what it decodes, up to the limit."""
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"y" * 100)
    with pytest.raises(ProtocolError, match="more than 10"):
        decode_chunks(chunks_payload(b"i" * 32, [10], frame), DCTX)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_frame_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        for frame in read_frames(io.BytesIO(data)):
            if frame.type == FRAME_CHUNKS:
                decode_chunks(frame.payload, DCTX)
    except ProtocolError:
        pass


def test_end_frame_counts() -> None:
    (frame,) = read_frames(io.BytesIO(encode_end(chunks=3, bytes=10, skipped=1)))
    assert frame.type == FRAME_END and frame.payload == {"chunks": 3, "bytes": 10, "skipped": 1}


# --- DELTA group items (version 3) ------------------------------------------------------------------------------

GROUP = DeltaGroup(((0, 3, 2), (1, 0, 1)), ((0, 5, 4),), b"zstd")


def test_group_items_round_trip_next_to_plain_items() -> None:
    plain = DeltaItem(DELTA_CONTENT, 0, 1, 2, 0, 1, 3, b"frame")
    (frame,) = read_frames(io.BytesIO(encode_delta(("library/app", DIGEST), [plain, GROUP])))
    assert decode_delta(frame.payload) == (("library/app", DIGEST), [plain, GROUP])


def test_group_items_are_refused_in_a_version_2_answer() -> None:
    (frame,) = read_frames(io.BytesIO(encode_delta(("library/app", DIGEST), [GROUP])))
    with pytest.raises(ProtocolError, match="an item must be"):
        decode_delta(frame.payload, version=2)


@pytest.mark.parametrize("item", [
    [DELTA_GROUP, [0, 1], [0, 0, 1], b"d"],                      # not triples
    [DELTA_GROUP, [], [0, 0, 1], b"d"],                          # no target
    [DELTA_GROUP, [0, 0, 1], [0, -1, 1], b"d"],                  # negative
    [DELTA_GROUP, [0, 0, 1], [0, 0, 1 << 40], b"d"],             # too large
    [DELTA_GROUP, [0, 0, True], [0, 0, 1], b"d"],                # bool
    [DELTA_GROUP, [0, 0, 1], [0, 0, 1], "d"],                    # data not bytes
    [DELTA_GROUP, [0, 0, 1] * (MAX_GROUP_RANGES + 1), [0, 0, 1], b"d"],
    [DELTA_GROUP, [0, 0, 1], b"\0\0\1", b"d"],
])
def test_bad_group_items(item: list) -> None:
    with pytest.raises(ProtocolError):
        decode_item(item)
