"""A chunk index encoded against an older index the device holds (docs/PROTOCOL.md, "Index deltas"): both are
laid out flat, each file's run lengths next to its chunk ids and lengths, so an unchanged or moved file is one
zstd match against the old layout instead of 36 bytes per chunk. Version 4's `runs` layout names a file whose
chunks the old index holds by its old run number: a reordered rebuild costs a varint per file, not a zstd match.
Version 7 leaves out most of each id of the chunks the answer's items rebuild (the device hashes them itself)."""
from __future__ import annotations

import dataclasses
import struct
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import msgpack
import numpy as np

from .chunker import ALGORITHM
from .delta import DeltaError, zstd_decode, zstd_encode
from .index import ID_SIZE, MAX_INDEX_BYTES, ChunkList, ImageIndex, IndexFormatError, LayerIndex, decode_index
from .varint import read_varints, unzigzag, varints, zigzag
from .wire import Span

_RUN = struct.Struct("<QQ")
_CHUNK = struct.Struct(f"<{ID_SIZE}sI")
_ROW = np.dtype([("id", f"V{ID_SIZE}"), ("length", "<u4")])  # one _CHUNK, as numpy packs it
_LEN = struct.Struct("<Q")
# The index is a few hundred KB and the answer is cached per image pair, but a first answer waits for it. Level 9
# against 15 (bytes of the smaller layout, CPU s of both) on the bench pairs' version-7 index deltas: node 2,441 /
# 0.014 vs 2,118 / 0.035, debian 8,465 / 0.004 vs 8,125 / 0.081, python 10,941 / 0.002 vs 9,930 / 0.030,
# debian-reorder 7,148 / 0.013 vs 7,073 / 0.053; level 6 costs node another 64 bytes, python 128. (Before version 7,
# level 15 against 19: debian 31,251 / 0.054 vs 30,665 / 0.058, reorder 8,930 / 0.051 vs 8,930 / 0.120.)
LEVEL = 9
# The hash table capped at 2**18 entries (measured at level 15, which takes 2**20 for the debian pairs' 314 kB
# layouts, 2**19 for node's): the index step's peak 18.8 -> 12.5 MB on the debian pairs, 8.0 -> 5.9 MB on node;
# the same bytes (node 6,356 instead of 6,360); CPU the same but on debian, 33 -> 42 ms. Its chain table stays:
# 2**19 costs debian 72 bytes.
HASH_LOG = 18
# Version 7: a chunk the answer's DELTA items rebuild is named by the first CHECK_BYTES of its id and zeros (which
# zstd takes for a few bits); the device checks the rebuilt chunk's id against them and puts in the whole id.
# On the bench pairs (runs layout): node 6,618 -> 2,162 bytes (171 such chunks), debian 31,246 -> 8,177 (881).
CHECK_BYTES = 4
_ZEROS = bytes(ID_SIZE - CHECK_BYTES)


def placeholder(cid: bytes) -> bytes:
    return cid[:CHECK_BYTES] + _ZEROS


def is_placeholder(cid: bytes) -> bool:
    """A BLAKE3 id ends in 28 zero bytes with a chance of 2**-224: none does."""
    return cid[CHECK_BYTES:] == _ZEROS


def with_placeholders(index: ImageIndex, spans: Iterable[Span]) -> ImageIndex:
    """A copy of `index` with the ids of the chunks in `spans` as placeholders (the index delta of version 7)."""
    copy = ImageIndex(index.manifest_digest, [dataclasses.replace(layer, header_chunks=_copy(layer.header_chunks),
                                                                  chunks=_copy(layer.chunks))
                                              for layer in index.layers], index.params)
    for layer, headers, first, count in spans:
        chunks = copy.layers[layer].chunk_list(headers)
        for i in range(first, first + count):
            chunks.set_id(i, placeholder(chunks.id_at(i)))
    return copy


def _copy(chunks: ChunkList) -> ChunkList:
    return ChunkList(bytearray(chunks.ids), chunks.lengths)


def flat(index: ImageIndex) -> bytes:
    """The layout both sides compress against: a msgpack stream of the index's scalars, then per layer a map of
    its descriptors and a byte string: each run (header_len, content_len as u64) followed by its content chunks
    (id, u32 length), then the layer's header chunks."""
    parts = [_head(index)]
    for layer in index.layers:
        parts.append(_scalars(layer))
        parts.append(msgpack.packb(_layer_body(layer, _run_rows(layer)), use_bin_type=True))
    return b"".join(parts)


def _head(index: ImageIndex) -> bytes:
    params = index.params
    return msgpack.packb({"manifest_digest": index.manifest_digest, "layers": len(index.layers),
                          "chunking": [ALGORITHM, params.min_size, params.avg_size, params.max_size]})


def _scalars(layer: LayerIndex) -> bytes:
    return msgpack.packb({
        "media_type": layer.media_type, "digest": layer.digest, "size": layer.size, "diff_id": layer.diff_id,
        "uncompressed_size": layer.uncompressed_size, "runs": len(layer.runs) // 2,
        "header_chunks": len(layer.header_chunks)})


def _layer_body(layer: LayerIndex, run_rows: list[bytes], literal: Sequence[bool] | None = None) -> bytes:
    """Each run's lengths and content chunks (`run_rows`, from _run_rows), then the header chunks; with `literal`
    (runs layout) only the runs it marks, each as content_len alone (header_len travels in `heads`)."""
    parts = []
    for run, ((header_len, content_len), rows) in enumerate(zip(layer.run_pairs(), run_rows)):
        if literal is None:
            parts.append(_RUN.pack(header_len, content_len))
        elif not literal[run]:
            continue
        else:
            parts.append(_LEN.pack(content_len))
        parts.append(rows)
    parts.append(_rows(layer.header_chunks))
    return b"".join(parts)


def _run_rows(layer: LayerIndex) -> list[bytes]:
    """Each run's content chunks as _CHUNK rows."""
    rows = _rows(layer.chunks)
    return [rows[first * _CHUNK.size:end * _CHUNK.size] for first, end in layer.run_ranges()]


def _rows(chunks: ChunkList) -> bytes:
    """The chunks as (id, u32 length) rows, made at once: packing them one by one was most of the index delta's
    CPU (node pair: 7,000 chunks)."""
    rows = np.empty(len(chunks), dtype=_ROW)
    rows["id"] = np.frombuffer(chunks.ids, dtype=_ROW["id"])
    rows["length"] = chunks.lengths
    return rows.tobytes()


def encode_index_delta(new: ImageIndex, old: ImageIndex, level: int = LEVEL, runs: bool = False) -> dict:
    """`{size, data}`: the flat layout of `new` as one zstd frame with the flat layout of `old` as raw dictionary.
    `runs` (version 4): also the runs layout, `{layout: "runs", size, data}`, and the smaller of the two is it (a
    reordered rebuild: 17.1 kB flat, 8.9 kB runs; an update in place: the runs layout is 5-35% larger)."""
    base = flat(old)
    target = flat(new)
    best = {"size": len(target), "data": zstd_encode(target, base, level, max_hash_log=HASH_LOG)}
    if runs:
        target = _runs_layout(new, old)
        other = {"layout": "runs", "size": len(target), "data": zstd_encode(target, base, level, max_hash_log=HASH_LOG)}
        best = other if len(other["data"]) < len(best["data"]) else best
    return best


def decode_index_delta(delta: object, old: ImageIndex) -> ImageIndex:
    """The index an index delta encodes against `old`, validated like any index (IndexFormatError otherwise)."""
    if not (isinstance(delta, dict) and isinstance(delta.get("size"), int) and isinstance(delta.get("data"), bytes)):
        raise IndexFormatError("index delta must be a map with size and data")
    layout = delta.get("layout", "flat")
    if layout not in ("flat", "runs"):
        raise IndexFormatError(f"index delta: unknown layout {str(layout)[:20]!r}")
    try:
        raw = zstd_decode(delta["data"], flat(old), delta["size"])
    except DeltaError as exc:
        raise IndexFormatError(f"index delta does not decode against its base: {exc}") from None
    return _unflat(raw, _old_runs(old) if layout == "runs" else None)


# --- the runs layout (version 4) ---------------------------------------------------------------------------------

def _old_runs(old: ImageIndex) -> list[tuple[int, bytes]]:
    """(content_len, content chunks as _CHUNK rows) of every run of the base, its layers' runs numbered in a row."""
    return [(content_len, rows) for layer in old.layers
            for content_len, rows in zip(layer.runs[1::2], _run_rows(layer))]


def _runs_layout(new: ImageIndex, old: ImageIndex) -> bytes:
    """flat(new) with each layer's bin replaced by three (docs/PROTOCOL.md, "Index deltas"): refs, heads, body."""
    where: dict[tuple[int, bytes], list[int]] = {}
    for g, (content_len, rows) in enumerate(_old_runs(old)):
        if content_len:
            where.setdefault((content_len, rows), []).append(g)
    parts = [_head(new)]
    for layer in new.layers:
        refs, heads, literal, expected, previous = [], [], [], 0, 0
        run_rows = _run_rows(layer)
        for (header_len, content_len), rows in zip(layer.run_pairs(), run_rows):
            found = where.get((content_len, rows)) if content_len else None
            if found:
                at = bisect_left(found, expected)  # the next in base order keeps refs small
                g = found[at] if at < len(found) else found[0]
                refs.append(zigzag(g - expected) + 1)
                expected = g + 1
            else:
                refs.append(0)
            literal.append(not found)
            heads.append(_head_len(header_len, previous))
            previous = content_len
        parts += [_scalars(layer), msgpack.packb(varints(refs), use_bin_type=True),
                  msgpack.packb(varints(heads), use_bin_type=True),
                  msgpack.packb(_layer_body(layer, run_rows, literal), use_bin_type=True)]
    return b"".join(parts)


def _head_len(header_len: int, previous_content: int) -> int:
    """A run's header_len as a small number: the padding after the previous run's content and n 512-byte blocks is
    n·2; anything else header_len·2 + 1."""
    blocks, rest = divmod(header_len - -previous_content % 512, 512)
    return blocks << 1 if blocks >= 0 and not rest else header_len << 1 | 1


def _read_head_len(value: int, previous_content: int) -> int:
    return value >> 1 if value & 1 else -previous_content % 512 + (value >> 1) * 512


def _unflat(raw: bytes, old: list[tuple[int, bytes]] | None = None) -> ImageIndex:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_bin_len=MAX_INDEX_BYTES)
    unpacker.feed(raw)
    try:
        head = _map(next(unpacker), "index")
        algorithm, low, avg, high = head["chunking"]
        layers = []
        budget = [MAX_INDEX_BYTES // _CHUNK.size]  # chunks refs may copy: a few bytes of refs cannot mean GBs
        for _ in range(int(head["layers"])):
            scalars = _map(next(unpacker), "layer")
            if old is None:
                layers.append(_layer(scalars, _bin(next(unpacker))))
                continue
            refs, heads = read_varints(_bin(next(unpacker)), "index delta"), read_varints(_bin(next(unpacker)),
                                                                                           "index delta")
            body = _expand(scalars, refs, heads, _bin(next(unpacker)), old, budget)
            layers.append(_layer(scalars, body))
        if next(unpacker, None) is not None:
            raise IndexFormatError("index delta: trailing data")
        # Through the index's own encoding and strict decoding: every rule of docs/FORMAT.md is checked once.
        encoded = msgpack.packb({"format": "chunksync-index", "version": 1,
                                 "chunking": {"algorithm": algorithm, "min": low, "avg": avg, "max": high},
                                 "manifest_digest": head["manifest_digest"],
                                 "layers": [_encoded_layer(layer) for layer in layers]}, use_bin_type=True)
    except (StopIteration, KeyError, TypeError, ValueError, struct.error, msgpack.UnpackException) as exc:
        if isinstance(exc, IndexFormatError):
            raise
        if isinstance(exc, DeltaError):
            raise IndexFormatError(str(exc)) from None
        raise IndexFormatError(f"index delta: malformed layout ({exc.__class__.__name__}: {str(exc)[:100]})") from None
    return decode_index(encoded)


def _expand(scalars: dict, refs: list[int], heads: list[int], body: bytes,
            old: list[tuple[int, bytes]], budget: list[int]) -> bytes:
    """The flat layout's layer bin that a runs layout's refs, heads and body stand for."""
    runs = int(scalars["runs"])
    if len(refs) != runs or len(heads) != runs:
        raise IndexFormatError(f"index delta: {len(refs)} refs and {len(heads)} heads for {runs} runs")
    out, pos, expected, previous = bytearray(), 0, 0, 0
    for ref, head in zip(refs, heads):
        header_len = _read_head_len(head, previous)
        if ref:
            g = expected + unzigzag(ref - 1)
            if not 0 <= g < len(old):
                raise IndexFormatError(f"index delta: a run refers to base run {g}, the base has {len(old)}")
            content_len, rows = old[g]
            budget[0] -= len(rows) // _CHUNK.size
            if budget[0] < 0:
                raise IndexFormatError("index delta: refs name more chunks than an index may hold")
            out += _RUN.pack(header_len, content_len)
            out += rows
            expected = g + 1
        else:
            (content_len,) = _LEN.unpack_from(body, pos)
            pos += _LEN.size
            out += _RUN.pack(header_len, content_len)
            covered = 0
            while covered < content_len:
                cid, length = _CHUNK.unpack_from(body, pos)
                if length == 0:
                    raise IndexFormatError("index delta: a chunk of length 0")
                out += body[pos:pos + _CHUNK.size]
                pos += _CHUNK.size
                covered += length
        previous = content_len
    return bytes(out + body[pos:])


def _bin(obj: object) -> bytes:
    if not isinstance(obj, bytes):
        raise IndexFormatError("index delta: a layer body must be bytes")
    return obj


def _map(obj: object, what: str) -> dict:
    if not isinstance(obj, dict):
        raise IndexFormatError(f"index delta: {what} must be a map")
    return obj


def _layer(scalars: dict, body: bytes) -> dict:
    runs, ids, lengths = [], bytearray(), []
    pos = 0
    for _ in range(int(scalars["runs"])):
        header_len, content_len = _RUN.unpack_from(body, pos)
        pos += _RUN.size
        runs += [header_len, content_len]
        covered = 0
        while covered < content_len:
            cid, length = _CHUNK.unpack_from(body, pos)
            if length == 0:
                raise IndexFormatError("index delta: a chunk of length 0")
            pos += _CHUNK.size
            ids += cid
            lengths.append(length)
            covered += length
    header_count = int(scalars["header_chunks"])
    if len(body) - pos != header_count * _CHUNK.size:
        raise IndexFormatError("index delta: a layer body does not end with its header chunks")
    header = [_CHUNK.unpack_from(body, pos + i * _CHUNK.size) for i in range(header_count)]
    return {**scalars, "runs": runs, "ids": bytes(ids), "lengths": lengths,
            "header_ids": b"".join(cid for cid, _ in header), "header_lengths": [n for _, n in header]}


def _encoded_layer(layer: dict) -> dict:
    return {"media_type": layer["media_type"], "digest": layer["digest"], "size": layer["size"],
            "diff_id": layer["diff_id"], "uncompressed_size": layer["uncompressed_size"],
            "runs": struct.pack(f"<{len(layer['runs'])}Q", *layer["runs"]),
            "header_ids": layer["header_ids"],
            "header_lengths": struct.pack(f"<{len(layer['header_lengths'])}I", *layer["header_lengths"]),
            "ids": layer["ids"], "lengths": struct.pack(f"<{len(layer['lengths'])}I", *layer["lengths"])}
