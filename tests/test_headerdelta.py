"""The vectorised header-delta codec against the protocol's plain definition (tests/headerref.py): the member layout
and paths equal delta.header_entries on real and damaged tar header streams, encode_headers gives the very bytes
of the member-by-member reference encoder, and decode_headers the same bytes as a member-by-member reference
decoder (or the same refusal) on real deltas, altered deltas and hostile ones."""
from __future__ import annotations

import io
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zstandard

from chunkstore.delta import BLOCK, DeltaError, header_entries, zstd_decode, zstd_encode
from chunkstore.headerdelta import (
    _CHKSUM, _MTIME, _NONE, _decode_mtimes, _decode_ops, _encode_ops, _plan_ops, decode_headers, encode_headers,
)
from chunkstore.headerlayout import layout, members
from chunkstore.index import LayerIndex, index_layer
from chunkstore.varint import read_varints, unzigzag, varints, zigzag
import headerref as ref
from tarkit import gnu_tar, make_tree, touched_copy

TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Stream:
    header: bytes
    runs: list[int]


def _stream(tar: bytes) -> Stream:
    chunks: dict[bytes, bytes] = {}
    layer: LayerIndex = index_layer(io.BytesIO(tar), TAR, on_chunk=lambda cid, piece: chunks.setdefault(cid, bytes(piece)))
    return Stream(b"".join(chunks[cid] for cid, _ in layer.header_chunks), list(layer.runs))


def _python_tar(tree: Path) -> bytes:
    """The tree as Python's tarfile writes it (PAX format: a pax header only where a name or value needs one)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".")
    return out.getvalue()


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Stream]:
    tmp = tmp_path_factory.mktemp("headerdelta")
    tree = make_tree(tmp / "tree")
    edited = tmp / "edited"
    shutil.copytree(tree, edited, symlinks=True)
    (edited / "etc/apt/NEW-1.0.conf").write_bytes(b"new\n" * 300)
    shutil.rmtree(edited / "usr/lib/python3.11/json")
    tars = {
        "old": gnu_tar(tree, tmp / "old.tar", "--sort=name").read_bytes(),
        "mtime": gnu_tar(touched_copy(tree, tmp / "touched"), tmp / "mtime.tar", "--sort=name").read_bytes(),
        "reorder": gnu_tar(tree, tmp / "reorder.tar", reverse=True).read_bytes(),
        "edited": gnu_tar(edited, tmp / "edited.tar", "--sort=name").read_bytes(),
        "pax": gnu_tar(edited, tmp / "pax.tar", "--sort=name", "--format=pax").read_bytes(),
        "python": _python_tar(edited),
    }
    return {name: _stream(tar) for name, tar in tars.items()}


# --- the member layout ------------------------------------------------------------------------------------------

def _entries(stream: Stream) -> list[tuple[int, int, bool]]:
    return [(e.offset, e.length, e.path is not None) for e in header_entries(stream.header, stream.runs)
            if not e.padding]


def _layout(stream: Stream) -> list[tuple[int, int, bool]]:
    found = layout(np.frombuffer(stream.header, dtype=np.uint8), stream.runs)
    return list(zip(found.offsets.tolist(), found.lengths.tolist(), found.members.tolist()))


def _damaged(stream: Stream, seed: int) -> Stream:
    """The stream with a few header fields broken the ways tar readers meet: a size that is not canonical octal or
    not octal at all, a zero block, an extended-header type, random bytes."""
    rng = random.Random(seed)
    header = bytearray(stream.header)
    blocks = [e.offset + e.length - BLOCK for e in header_entries(stream.header, stream.runs) if e.path]
    for pos in rng.sample(blocks, 12):
        damage = rng.choice(["size-space", "size-junk", "size-big", "zero", "pax", "long-name", "random"])
        if damage == "size-space":
            header[pos + 124:pos + 136] = b" " * 8 + b"100 "
        elif damage == "size-junk":
            header[pos + 124:pos + 136] = b"12345678x\0\0\0"
        elif damage == "size-big":
            header[pos + 124:pos + 136] = b"%011o\0" % rng.randrange(1, 8 ** 6)
            header[pos + 156] = ord("x")
        elif damage == "zero":
            header[pos:pos + BLOCK] = bytes(BLOCK)
        elif damage in ("pax", "long-name"):
            header[pos + 156] = ord("x" if damage == "pax" else "L")
        else:
            header[pos + rng.randrange(BLOCK)] = rng.randrange(256)
    return Stream(bytes(header), stream.runs)


@pytest.mark.parametrize("name", ["old", "mtime", "reorder", "edited", "pax", "python"])
def test_layout_is_header_entries_without_paths(streams: dict[str, Stream], name: str) -> None:
    assert _layout(streams[name]) == _entries(streams[name])


@pytest.mark.parametrize("seed", range(12))
def test_layout_of_damaged_streams_is_header_entries(streams: dict[str, Stream], seed: int) -> None:
    stream = _damaged(streams["pax" if seed % 2 else "old"], seed)
    assert _layout(stream) == _entries(stream)


def test_layout_of_data_that_is_not_tar() -> None:
    rng = random.Random(5)
    data = bytes(rng.randrange(256) for _ in range(5000))
    for runs in ([5000, 0], [1000, 7, 4000, 3], [0, 10, 5000, 0]):
        stream = Stream(data, runs)
        assert _layout(stream) == _entries(stream)


def test_runs_that_do_not_match_the_stream_are_refused(streams: dict[str, Stream]) -> None:
    stream = streams["old"]
    with pytest.raises(DeltaError):
        layout(np.frombuffer(stream.header + b"\0", dtype=np.uint8), stream.runs)


def test_member_paths_and_run_paths_are_header_entries(streams: dict[str, Stream]) -> None:
    for stream in [*streams.values(), *(_damaged(streams[name], seed) for seed, name in enumerate(["old", "pax"]))]:
        found = members(stream.header, stream.runs)
        entries = [e for e in header_entries(stream.header, stream.runs) if not e.padding]
        assert found.paths == [e.path for e in entries]
        expected = {e.run: e.path for e in entries if e.path is not None and stream.runs[2 * e.run + 1]}
        assert found.run_paths(stream.runs) == expected and expected


# --- encoding against the definition ----------------------------------------------------------------------------

ENCODED_PAIRS = [("old", "old"), ("mtime", "old"), ("reorder", "old"), ("edited", "old"), ("pax", "old"),
                 ("python", "edited"), ("old", "python"), ("edited", "mtime")]


@pytest.mark.parametrize(("name", "base"), ENCODED_PAIRS)
def test_encoding_gives_the_reference_bytes(streams: dict[str, Stream], name: str, base: str) -> None:
    new, old = streams[name], streams[base]
    delta = encode_headers(new.header, new.runs, old.header, old.runs)
    assert delta == ref.reference_encode(new.header, new.runs, old.header, old.runs)
    assert _same(delta, new, old) == new.header


@pytest.mark.parametrize("seed", range(8))
def test_encoding_damaged_streams_gives_the_reference_bytes(streams: dict[str, Stream], seed: int) -> None:
    """Damaged blocks: members that do not parse, fields that are not canonical (so mtimes stay in the residual)."""
    new = _damaged(streams[["mtime", "edited", "pax", "reorder"][seed % 4]], seed)
    old = _damaged(streams["old"], seed + 100) if seed % 2 else streams["old"]
    delta = encode_headers(new.header, new.runs, old.header, old.runs)
    assert delta == ref.reference_encode(new.header, new.runs, old.header, old.runs)
    assert _same(delta, new, old) == new.header


def test_encoding_data_that_is_not_tar_gives_the_reference_bytes() -> None:
    rng = random.Random(9)
    data = bytes(rng.randrange(256) for _ in range(5000))
    other = data[:2000] + bytes(rng.randrange(256) for _ in range(3000))
    for runs in ([5000, 0], [1000, 7, 4000, 3]):
        new, old = Stream(data, runs), Stream(other, runs)
        delta = encode_headers(new.header, new.runs, old.header, old.runs)
        assert delta == ref.reference_encode(new.header, new.runs, old.header, old.runs)
        assert delta["fields"] == 1 and _same(delta, new, old) == data  # no member: nothing to write


def _ending_in_a_member(stream: Stream, padding: int) -> Stream:
    """The stream cut after its last member (no end-of-archive blocks), every padding byte set to `padding`."""
    entries = [e for e in header_entries(stream.header, stream.runs) if not e.padding]
    end = max(e.offset + e.length for e in entries if e.path is not None)
    header = bytearray(stream.header[:end])
    for e in header_entries(stream.header, stream.runs):
        if e.padding and e.offset < end:
            header[e.offset:e.offset + e.length] = bytes([padding]) * e.length
    runs, start = [], 0
    for header_len, content_len in zip(stream.runs[::2], stream.runs[1::2]):
        if start + header_len >= end:
            return Stream(bytes(header), runs + [end - start, 0])
        runs += [header_len, content_len]
        start += header_len
    raise AssertionError("no member")


@pytest.mark.parametrize("name", ["old", "edited"])
def test_an_old_member_placed_where_the_new_stream_has_none_gives_the_reference_bytes(
        streams: dict[str, Stream], name: str) -> None:
    """The last entries match by place, not path: an old stream ending in a member and a new one ending in a zero
    block put the old member's mtime and checksum where the new stream has no fields. Paddings are not zeros."""
    old = _ending_in_a_member(streams[name], 0xAA)
    new = _ending_in_a_member(streams[name], 0x01)
    new = Stream(new.header[:-BLOCK] + bytes(BLOCK), new.runs)
    assert members(new.header, new.runs).paths[-1] is None
    assert _plan_ops(members(new.header, new.runs), members(old.header, old.runs))[-1][1] >= 0  # copied
    delta = encode_headers(new.header, new.runs, old.header, old.runs)
    assert delta == ref.reference_encode(new.header, new.runs, old.header, old.runs)
    assert delta["fields"] == 1 and _same(delta, new, old) == new.header


# --- decoding against the definition --------------------------------------------------------------------------

def _reference_mtimes(mode: int, data: bytes, bases: list[int | None]) -> list[int]:
    if mode not in (0, 1, 2):
        raise DeltaError("unknown mode")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=10 * len(bases) + 16)
    except zstandard.ZstdError:
        raise DeltaError("mtimes do not decode") from None
    diffs = read_varints(raw)
    if len(diffs) != len(bases):
        raise DeltaError("count")
    values, previous, shift = [], 0, 0
    for diff, base in zip(diffs, bases):
        value = ref.guess(mode, base, previous, shift) + unzigzag(diff)
        if not 0 <= value < 8 ** 11:
            raise DeltaError("range")
        values.append(value)
        previous = value
        if base is not None:
            shift = value - base
    return values


def _reference_decode(delta: dict, size: int, new_runs: list[int], old: bytes, old_runs: list[int]) -> bytes:
    """docs/PROTOCOL.md "Header deltas", member by member (the decoder before it was vectorised)."""
    ops_data, residual, fields = delta.get("ops"), delta.get("residual"), delta.get("fields")
    if not (isinstance(ops_data, bytes) and isinstance(residual, bytes) and fields in (0, 1)):
        raise DeltaError("shape")
    old_entries = header_entries(old, old_runs)
    old_members = ref.non_padding(old_entries)
    try:
        ops_raw = zstandard.ZstdDecompressor().decompress(ops_data, max_output_size=20 * size + 64)
    except zstandard.ZstdError:
        raise DeltaError("ops do not decode") from None
    ops = _decode_ops(ops_raw, len(old_members))
    old_arr = np.frombuffer(old, dtype=np.uint8)
    old_zeroed = old_arr.copy()
    ref.zero_fields(old_zeroed, ref.member_blocks(old_entries))
    base, base_raw, copied = ref.placed_bases(ops, old_members, [old_zeroed, old_arr, np.ones(len(old), dtype=np.uint8)], size,
                                   ref.padding_spans(new_runs))
    if not fields:
        base = base_raw
    out = np.frombuffer(zstd_decode(residual, old, size), dtype=np.uint8) + base
    if fields:
        blocks = ref.member_blocks(header_entries(out.tobytes(), new_runs))
        mode, data = delta.get("mtime_mode"), delta.get("mtimes")
        if not isinstance(mode, int) or not isinstance(data, bytes):
            raise DeltaError("mtimes missing")
        for pos, mtime in zip(blocks, _reference_mtimes(mode, data, ref.base_mtimes(base_raw, blocks, copied))):
            out[pos + _MTIME.start:pos + _MTIME.stop] = np.frombuffer(b"%011o\0" % mtime, dtype=np.uint8)
            out[pos + _CHKSUM.start:pos + _CHKSUM.stop] = np.frombuffer(
                b"%06o\0 " % ref.checksum(out[pos:pos + BLOCK]), dtype=np.uint8)
    return out.tobytes()


def _outcome(decoder, delta: dict, new: Stream, old: Stream) -> bytes | str:
    try:
        return bytes(decoder(delta, len(new.header), new.runs, old.header, old.runs))
    except DeltaError:
        return "refused"


def _same(delta: dict, new: Stream, old: Stream) -> bytes | str:
    ours = _outcome(decode_headers, delta, new, old)
    assert ours == _outcome(_reference_decode, delta, new, old)
    return ours


@pytest.mark.parametrize("name", ["edited", "python"])
def test_a_residual_made_with_the_old_stream_as_dictionary_still_decodes(streams: dict[str, Stream],
                                                                            name: str) -> None:
    """Servers before this one made the residual against the old stream as dictionary; a device decodes both."""
    new, old = streams[name], streams["old" if name != "python" else "edited"]
    delta = encode_headers(new.header, new.runs, old.header, old.runs)
    plain = zstd_decode(delta["residual"], b"", len(new.header))
    assert any(plain), "the residual should not be all zeros here, else the dictionary is never read"
    with_dict = {**delta, "residual": zstd_encode(plain, old.header, 9)}
    with pytest.raises(DeltaError):  # it does copy from the dictionary
        zstd_decode(with_dict["residual"], b"", len(new.header))
    assert _same(with_dict, new, old) == new.header


@pytest.mark.parametrize("name", ["old", "mtime", "reorder", "edited", "pax", "python"])
def test_decoding_real_deltas_matches_the_reference(streams: dict[str, Stream], name: str) -> None:
    new, old = streams[name], streams["old" if name != "python" else "edited"]
    delta = encode_headers(new.header, new.runs, old.header, old.runs)
    assert _same(delta, new, old) == new.header


@pytest.mark.parametrize("name", ["mtime", "edited", "reorder"])
def test_every_mtime_mode_decodes_as_the_reference(streams: dict[str, Stream], name: str) -> None:
    new, old = streams[name], streams["old"]
    delta = encode_headers(new.header, new.runs, old.header, old.runs)
    assert delta["fields"] == 1
    for mode in (0, 1, 2):  # the encoder picked one; the others decode to other (valid or refused) streams
        _same({**delta, "mtime_mode": mode}, new, old)


@pytest.mark.parametrize("seed", range(16))
def test_altered_deltas_decode_or_are_refused_as_the_reference(streams: dict[str, Stream], seed: int) -> None:
    rng = random.Random(seed)
    new, old = streams[rng.choice(["mtime", "edited", "reorder"])], streams["old"]
    delta = encode_headers(new.header, new.runs, old.header, old.runs)
    ops = _decode_ops(zstandard.ZstdDecompressor().decompress(delta["ops"]), 1 << 30)
    old_members = len(ref.non_padding(header_entries(old.header, old.runs)))
    change = seed % 4
    if change == 0:  # copies of other members: same sizes often, so these decode into other streams
        ops = [(count, rng.randrange(old_members - count + 1)) if start >= 0 else (count, start) for count, start in ops]
    elif change == 1:  # a literal where a copy was
        i = rng.randrange(len(ops))
        ops[i] = (512 * ops[i][0], -1) if ops[i][1] >= 0 else ops[i]
    elif change == 2:  # other mtimes
        count = len(ref.member_blocks(header_entries(new.header, new.runs)))
        numbers = [zigzag(rng.randrange(-3, 4) * rng.choice([1, 1000, 8 ** 10])) for _ in range(count)]
        delta["mtimes"] = zstandard.ZstdCompressor().compress(varints(numbers))
    else:  # the residual of another stream
        other = streams["pax"]
        delta["residual"] = encode_headers(other.header[:len(new.header)].ljust(len(new.header), b"\0"), new.runs,
                                           old.header, old.runs)["residual"]
    delta["ops"] = zstandard.ZstdCompressor().compress(_encode_ops(ops))
    _same(delta, new, old)


def test_mtimes_follow_each_mode_of_the_definition() -> None:
    rng = random.Random(3)
    for trial in range(300):
        count = rng.randrange(0, 40)
        bases = [None if rng.random() < 0.3 else rng.randrange(-5, 8 ** 12) for _ in range(count)]
        array = np.array([_NONE if b is None else b for b in bases], dtype=np.int64)
        for mode in (0, 1, 2):
            if trial % 2:  # any numbers: mostly refused
                steps = [rng.choice([0, 1, -1, rng.randrange(-2 ** 34, 2 ** 34), rng.randrange(-2 ** 62, 2 ** 62)])
                         for _ in range(count)]
            else:  # the steps of valid mtimes under this mode
                steps, previous, shift = [], 0, 0
                for base in bases:
                    value = rng.choice([previous, previous + 1, rng.randrange(8 ** 11)])
                    steps.append(value - ref.guess(mode, base, previous, shift))
                    previous, shift = value, (value - base if base is not None else shift)
            data = zstandard.ZstdCompressor().compress(varints([zigzag(s) for s in steps]))
            try:
                expected: list[int] | str = _reference_mtimes(mode, data, bases)
            except DeltaError:
                expected = "refused"
            try:
                got: list[int] | str = _decode_mtimes(mode, data, array).tolist()
            except DeltaError:
                got = "refused"
            assert got == expected


@pytest.mark.parametrize("ops", [[(1 << 61, -1)] * 4, [(1 << 62, -1), (1, 0)], [(0, -1)] * 3])
def test_ops_of_impossible_lengths_are_refused(streams: dict[str, Stream], ops: list[tuple[int, int]]) -> None:
    new, old = streams["mtime"], streams["old"]
    delta = encode_headers(new.header, new.runs, old.header, old.runs)
    delta["ops"] = zstandard.ZstdCompressor().compress(_encode_ops(ops))
    assert _same(delta, new, old) == "refused"
