"""A chunk index encoded against an older index the device holds (docs/PROTOCOL.md, "Index deltas"): both are
laid out flat, each file's run lengths next to its chunk ids and lengths, so an unchanged or moved file is one
zstd match against the old layout instead of 36 bytes per chunk."""
from __future__ import annotations

import struct
from collections.abc import Iterator

import msgpack

from .chunker import ALGORITHM
from .delta import DeltaError, zstd_decode, zstd_encode
from .index import ID_SIZE, MAX_INDEX_BYTES, ImageIndex, IndexFormatError, LayerIndex, decode_index

_RUN = struct.Struct("<QQ")
_CHUNK = struct.Struct(f"<{ID_SIZE}sI")
LEVEL = 19  # the index is a few hundred KB and the answer is cached per image pair: spend CPU on bytes


def flat(index: ImageIndex) -> bytes:
    """The layout both sides compress against: a msgpack stream of the index's scalars, then per layer a map of
    its descriptors and a byte string: each run (header_len, content_len as u64) followed by its content chunks
    (id, u32 length), then the layer's header chunks."""
    params = index.params
    parts = [msgpack.packb({"manifest_digest": index.manifest_digest, "layers": len(index.layers),
                            "chunking": [ALGORITHM, params.min_size, params.avg_size, params.max_size]})]
    for layer in index.layers:
        parts.append(msgpack.packb({
            "media_type": layer.media_type, "digest": layer.digest, "size": layer.size, "diff_id": layer.diff_id,
            "uncompressed_size": layer.uncompressed_size, "runs": len(layer.runs) // 2,
            "header_chunks": len(layer.header_chunks)}))
        parts.append(msgpack.packb(_layer_body(layer), use_bin_type=True))
    return b"".join(parts)


def _layer_body(layer: LayerIndex) -> bytes:
    out = bytearray()
    chunks: Iterator[tuple[bytes, int]] = iter(layer.chunks)
    for header_len, content_len in layer.run_pairs():
        out += _RUN.pack(header_len, content_len)
        covered = 0
        while covered < content_len:
            cid, length = next(chunks)
            out += _CHUNK.pack(cid, length)
            covered += length
    for cid, length in layer.header_chunks:
        out += _CHUNK.pack(cid, length)
    return bytes(out)


def encode_index_delta(new: ImageIndex, old: ImageIndex, level: int = LEVEL) -> dict:
    """`{size, data}`: the flat layout of `new` as one zstd frame with the flat layout of `old` as raw dictionary."""
    target = flat(new)
    return {"size": len(target), "data": zstd_encode(target, flat(old), level)}


def decode_index_delta(delta: object, old: ImageIndex) -> ImageIndex:
    """The index an index delta encodes against `old`, validated like any index (IndexFormatError otherwise)."""
    if not (isinstance(delta, dict) and isinstance(delta.get("size"), int) and isinstance(delta.get("data"), bytes)):
        raise IndexFormatError("index delta must be a map with size and data")
    try:
        raw = zstd_decode(delta["data"], flat(old), delta["size"])
    except DeltaError as exc:
        raise IndexFormatError(f"index delta does not decode against its base: {exc}") from None
    return _unflat(raw)


def _unflat(raw: bytes) -> ImageIndex:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_bin_len=MAX_INDEX_BYTES)
    unpacker.feed(raw)
    try:
        head = _map(next(unpacker), "index")
        algorithm, low, avg, high = head["chunking"]
        layers = []
        for _ in range(int(head["layers"])):
            scalars = _map(next(unpacker), "layer")
            body = next(unpacker)
            if not isinstance(body, bytes):
                raise IndexFormatError("index delta: a layer body must be bytes")
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
        raise IndexFormatError(f"index delta: malformed layout ({exc.__class__.__name__}: {str(exc)[:100]})") from None
    return decode_index(encoded)


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
