"""The sync protocol's messages and frames (docs/PROTOCOL.md), shared by server and client: encoding,
and strict decoding with clear errors and bounded memory."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

import msgpack
import zstandard

from . import oci
from .bloom import MAX_FILTER_BYTES, BloomFilter, BloomFormatError
from .compression import DecompressionError, decompress_exact
from .delta import MAX_DELTA_BYTES  # noqa: F401 - part of the wire format: target and base of one DELTA item
from .gzdelta import GNU_GZIP, GzipError, GzipShape, decode_shape
from .index import ID_SIZE

PROTOCOL_VERSION = 7         # what this side speaks; 2 added deltas (DELTA frames, index_delta), 3 group items,
                             # 4 the index delta's runs layout, 5 gzip items (zlib), 6 gzip items by GNU gzip too,
                             # 7 index deltas that leave out the ids of the chunks the answer's items rebuild
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5, 6, 7)  # an answer never holds what the request's version does not know
PLACEHOLDER_VERSION = 7      # index deltas with placeholder ids (chunkstore/indexdelta.py), chunks requests naming them
SYNC_MEDIA_TYPE = "application/vnd.chunksync.sync.v1+msgpack"
CHUNKS_MEDIA_TYPE = "application/vnd.chunksync.chunks.v1+msgpack"
FRAMES_MEDIA_TYPE = "application/vnd.chunksync.frames.v1"

FRAME_VERSION = 1
FRAME_HEADER = 1   # manifest, config, chunk index
FRAME_CHUNKS = 2   # whole chunks, zstd-compressed together
FRAME_DELTA = 3    # chunks encoded against content of an image the device holds (version-2 answers only)
FRAME_ERROR = 14   # the server failed mid-stream; what arrived before stays valid
FRAME_END = 15     # the stream is complete
KNOWN_FRAMES = {FRAME_HEADER, FRAME_CHUNKS, FRAME_DELTA, FRAME_ERROR, FRAME_END}
DELTA_CONTENT = 0  # DELTA item kinds: content chunks as one zstd frame with the base bytes as raw dictionary
DELTA_HEADERS = 1  # a layer's whole header stream as a header delta (chunkstore/headerdelta.py)
DELTA_GROUP = 2    # version 3: several content ranges as one zstd frame against several base ranges
DELTA_GZIP = 3     # version 5: whole .gz files as a delta of their texts against old .gz files' texts
MAX_GROUP_RANGES = 1 << 16  # target or base ranges in one group item

_PREFIX = struct.Struct(">BBI")  # version, type, payload length
MAX_FRAME_PAYLOAD = 300 << 20     # a header frame carries the index: allow big images, refuse absurd lengths
MAX_CHUNKS_FRAME_BYTES = 8 << 20  # uncompressed bytes one CHUNKS frame may expand to (no decompression bombs)
CHUNKS_FRAME_TARGET = 4 << 20     # what senders aim for
MAX_REQUEST_BYTES = 72 << 20      # a sync request: the Bloom filter dominates
MAX_HAVE_IMAGES = 64
MAX_REPAIR_IDS = 1 << 20


class ProtocolError(ValueError):
    """A message or frame that does not follow docs/PROTOCOL.md."""


class LimitExceeded(ProtocolError):
    """A request over one of the protocol's size limits (a server answers 413, not 400)."""


class UnsupportedVersion(ProtocolError):
    """A request of a protocol version the server does not speak; `versions` are those it does, so the device can
    ask again at one of them (docs/PROTOCOL.md, "Version negotiation")."""

    def __init__(self, message: str, versions: tuple[int, ...]) -> None:
        super().__init__(message)
        self.versions = versions


# --- requests -------------------------------------------------------------------------------------------

@dataclass
class SyncRequest:
    repository: str
    reference: str                      # tag or manifest digest
    platform: str = "linux/amd64"
    have_images: list[tuple[str, str]] = field(default_factory=list)  # (repository, manifest digest)
    bloom: BloomFilter | None = None
    version: int = PROTOCOL_VERSION     # 2: the device takes DELTA frames and an index_delta; 3: group items;
                                        # 4: an index_delta in the runs layout; 5: gzip items; 6: gzip
                                        # items whose engine is GNU gzip (a device says 6 only if it has it)
    have_manifest: bool = False         # the device holds the verified manifest `reference` (a digest) names

    def encode(self) -> bytes:
        obj = {"v": self.version, "repository": self.repository, "reference": self.reference,
               "platform": self.platform, "have_images": [list(pair) for pair in self.have_images],
               "bloom": self.bloom.to_obj() if self.bloom else None}
        if self.have_manifest:  # absent when false: the request stays what older servers expect, byte for byte
            obj["have_manifest"] = True
        return msgpack.packb(obj, use_bin_type=True)


@dataclass
class ChunksRequest:
    repository: str
    manifest_digest: str
    ids: bytes                          # concatenated 32-byte chunk ids
    version: int = 1                    # the message is the same in every version: 1, so every server takes it,
                                        # unless one that no longer speaks 1 says which versions it speaks

    def encode(self) -> bytes:
        return msgpack.packb({"v": self.version, "repository": self.repository,
                              "manifest_digest": self.manifest_digest, "ids": self.ids}, use_bin_type=True)


def spell_versions(versions: tuple[int, ...]) -> str:
    """A list of protocol versions as people (and the refusal message older devices parse) read it: "1, 2, 3"."""
    return ", ".join(map(str, versions))


def _load_map(body: bytes, what: str, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> dict:
    if len(body) > MAX_REQUEST_BYTES:
        raise LimitExceeded(f"{what} of {len(body)} bytes exceeds the limit of {MAX_REQUEST_BYTES}")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=MAX_REQUEST_BYTES,
                              max_str_len=1 << 16, max_array_len=MAX_HAVE_IMAGES * 4, max_map_len=64)
    except ValueError as exc:
        if " exceeds max_" in str(exc):
            # msgpack's own caps (e.g. hundreds of have_images) are size limits too: 413 like the rest
            raise LimitExceeded(f"{what}: {str(exc)[:200]}") from None
        raise ProtocolError(f"{what} is not valid msgpack: {str(exc)[:200]}") from None
    except Exception as exc:  # msgpack raises many unrelated types on malformed input
        raise ProtocolError(f"{what} is not valid msgpack: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(obj).__name__}")
    if obj.get("v") not in versions or isinstance(obj.get("v"), bool):
        speaks = tuple(sorted(versions))
        # The words stay those of older servers: devices that predate UnsupportedVersion's list parse them.
        raise UnsupportedVersion(f"{what}: protocol version {str(obj.get('v'))[:20]} is not supported "
                                 f"(this server speaks {spell_versions(speaks)})", speaks)
    return obj


def _str(obj: dict, key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: {key!r} must be a string")
    return value


def _checked(check, value: str, what: str) -> str:
    try:
        return check(value)
    except oci.InvalidReference as exc:
        raise ProtocolError(f"{what}: {exc}") from None


def decode_sync_request(body: bytes, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> SyncRequest:
    """The request, if its version is one of `versions` (what this server speaks, a subset of SUPPORTED_VERSIONS)."""
    obj = _load_map(body, "sync request", versions)
    what = "sync request"
    platform = obj.get("platform", "linux/amd64")
    if not isinstance(platform, str) or not 3 <= len(platform) <= 64 or platform.count("/") not in (1, 2):
        raise ProtocolError(f"{what}: platform must look like os/arch[/variant]")
    have = obj.get("have_images", [])
    if not isinstance(have, list):
        raise ProtocolError(f"{what}: have_images must be a list")
    if len(have) > MAX_HAVE_IMAGES:
        raise LimitExceeded(f"{what}: have_images lists {len(have)} images, at most {MAX_HAVE_IMAGES} allowed")
    pairs = []
    for item in have:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise ProtocolError(f"{what}: each have_images entry must be [repository, digest]")
        pairs.append((_checked(oci.validate_repository, item[0], what),
                      _checked(oci.validate_digest, item[1], what)))
    have_manifest = obj.get("have_manifest", False)
    if not isinstance(have_manifest, bool):
        raise ProtocolError(f"{what}: have_manifest must be true or false")
    bloom = obj.get("bloom")
    bits = bloom.get("bits") if isinstance(bloom, dict) else None
    if isinstance(bits, bytes) and len(bits) > MAX_FILTER_BYTES:
        raise LimitExceeded(f"{what}: bloom filter of {len(bits)} bytes exceeds the limit of {MAX_FILTER_BYTES}")
    try:
        bloom = BloomFilter.from_obj(bloom) if bloom is not None else None
    except BloomFormatError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    return SyncRequest(
        repository=_checked(oci.validate_repository, _str(obj, "repository", what), what),
        reference=_checked(oci.validate_reference, _str(obj, "reference", what), what),
        platform=platform, have_images=pairs, bloom=bloom, version=obj["v"], have_manifest=have_manifest)


def decode_chunks_request(body: bytes, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> ChunksRequest:
    what = "chunks request"
    obj = _load_map(body, what, versions)
    ids = obj.get("ids")
    if not isinstance(ids, bytes) or len(ids) % ID_SIZE or not ids:
        raise ProtocolError(f"{what}: ids must be a non-empty byte string of 32-byte chunk ids")
    if len(ids) // ID_SIZE > MAX_REPAIR_IDS:
        raise LimitExceeded(f"{what}: {len(ids) // ID_SIZE} ids, at most {MAX_REPAIR_IDS} per request")
    return ChunksRequest(
        repository=_checked(oci.validate_repository, _str(obj, "repository", what), what),
        manifest_digest=_checked(oci.validate_digest, _str(obj, "manifest_digest", what), what),
        ids=ids, version=obj["v"])


# --- frames ---------------------------------------------------------------------------------------------

def encode_frame(frame_type: int, payload: dict) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return _PREFIX.pack(FRAME_VERSION, frame_type, len(body)) + body


def encode_header(manifest_digest: str, manifest: bytes, config: bytes, index: bytes, **extra) -> bytes:
    return encode_frame(FRAME_HEADER, {"manifest_digest": manifest_digest, "manifest": manifest,
                                       "config": config, "index": index, **extra})


def encode_chunks(chunks: list[tuple[bytes, bytes]], cctx: zstandard.ZstdCompressor) -> bytes:
    """One CHUNKS frame: ids, lengths (u32 little-endian) and one zstd frame of the concatenated bytes."""
    raw = b"".join(data for _, data in chunks)
    return encode_frame(FRAME_CHUNKS, {
        "ids": b"".join(cid for cid, _ in chunks),
        "lengths": struct.pack(f"<{len(chunks)}I", *(len(data) for _, data in chunks)),
        "data": cctx.compress(raw),
    })


def batch_chunks(chunks: Iterable[tuple[bytes, bytes]], cctx: zstandard.ZstdCompressor,
                 target: int = CHUNKS_FRAME_TARGET) -> Iterator[bytes]:
    """CHUNKS frames of about `target` uncompressed bytes each."""
    batch: list[tuple[bytes, bytes]] = []
    size = 0
    for cid, data in chunks:
        if batch and size + len(data) > target:
            yield encode_chunks(batch, cctx)
            batch, size = [], 0
        batch.append((cid, data))
        size += len(data)
    if batch:
        yield encode_chunks(batch, cctx)


@dataclass(frozen=True)
class DeltaItem:
    """Chunks of the target image encoded against bytes of the base image (docs/PROTOCOL.md, "DELTA")."""
    kind: int          # DELTA_CONTENT or DELTA_HEADERS
    layer: int         # target: layer of the target image
    first: int         # content: first content chunk of the target range; headers: 0
    count: int         # content: chunks in the range; headers: the layer's header chunks
    base_layer: int    # base: layer of the base image
    base_first: int    # content: first content chunk of the base range; headers: 0
    base_count: int    # content: chunks in the base range; headers: the base layer's header chunks
    data: bytes        # content: a zstd frame; headers: msgpack map of the header delta

    def to_obj(self) -> list:
        return [self.kind, self.layer, self.first, self.count, self.base_layer, self.base_first, self.base_count,
                self.data]


Range = tuple[int, int, int]  # (layer, first content chunk, count)


@dataclass(frozen=True)
class DeltaGroup:
    """Version 3: content ranges of the target encoded together against base ranges (docs/PROTOCOL.md, "DELTA").
    One frame for many small changed files shares zstd's tables and lets a file copy from any of the bases."""
    targets: tuple[Range, ...]   # in the order their bytes are concatenated
    bases: tuple[Range, ...]     # likewise, as the raw dictionary
    data: bytes                  # one zstd frame
    kind: int = DELTA_GROUP

    def to_obj(self) -> list:
        return [DELTA_GROUP, [x for r in self.targets for x in r], [x for r in self.bases for x in r], self.data]


@dataclass(frozen=True)
class DeltaGzip:
    """Version 5: whole gzip files of the target, each one target range, rebuilt from their texts: one zstd frame
    of the texts against the texts of the gzipped base ranges, and per target the shape (chunkstore/gzdelta.py)
    that compresses its text back into its exact bytes."""
    targets: tuple[Range, ...]
    bases: tuple[Range, ...]
    shapes: tuple[GzipShape, ...]  # one per target
    data: bytes
    kind: int = DELTA_GZIP

    def to_obj(self) -> list:
        return [DELTA_GZIP, [x for r in self.targets for x in r], [x for r in self.bases for x in r],
                [shape.to_obj() for shape in self.shapes], self.data]


AnyDeltaItem = DeltaItem | DeltaGroup | DeltaGzip
Span = tuple[int, bool, int, int]  # (layer, header chunks?, first, count): chunks of the target image an item rebuilds


def item_spans(item: AnyDeltaItem) -> list[Span]:
    """The chunks of the target image an item rebuilds, in the order its bytes decode."""
    if isinstance(item, (DeltaGroup, DeltaGzip)):
        return [(layer, False, first, count) for layer, first, count in item.targets]
    if item.kind == DELTA_HEADERS:
        return [(item.layer, True, 0, item.count)]
    return [(item.layer, False, item.first, item.count)]


def encode_delta(base: tuple[str, str], items: list[AnyDeltaItem]) -> bytes:
    """One DELTA frame: items encoded against the image `base` = (repository, manifest digest)."""
    return encode_frame(FRAME_DELTA, {"base": list(base), "items": [item.to_obj() for item in items]})


def _numbers(values: object) -> bool:
    return isinstance(values, list) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40
                                            for x in values)


def _ranges(values: list[int]) -> tuple[Range, ...]:
    if not values or len(values) % 3 or len(values) > 3 * MAX_GROUP_RANGES:
        raise ProtocolError(f"delta frame: a group's ranges must be 1 to {MAX_GROUP_RANGES} triples "
                            "[layer, first, count]")
    return tuple((values[i], values[i + 1], values[i + 2]) for i in range(0, len(values), 3))


def decode_item(item: object, version: int = PROTOCOL_VERSION) -> AnyDeltaItem:
    """One DELTA item, its types and ranges checked (not its bytes); group items only from version 3 on, gzip items
    from 5 on."""
    if isinstance(item, list) and len(item) == 5 and item[0] == DELTA_GZIP and version >= 5:
        if not (_numbers(item[1]) and _numbers(item[2]) and isinstance(item[3], list) and isinstance(item[4], bytes)):
            raise ProtocolError("delta frame: a gzip item must be [3, targets, bases, shapes, data]")
        targets = _ranges(item[1])
        if len(item[3]) != len(targets):
            raise ProtocolError("delta frame: a gzip item needs one shape per target")
        try:
            shapes = tuple(decode_shape(shape) for shape in item[3])
        except GzipError as exc:
            raise ProtocolError(f"delta frame: {exc}") from None
        if version < 6 and any(shape.engine == GNU_GZIP for shape in shapes):
            raise ProtocolError("delta frame: a gzip item for GNU gzip in a version-5 answer")
        return DeltaGzip(targets, _ranges(item[2]), shapes, item[4])
    if isinstance(item, list) and len(item) == 4 and item[0] == DELTA_GROUP and version >= 3:
        if not (_numbers(item[1]) and _numbers(item[2]) and isinstance(item[3], bytes)):
            raise ProtocolError("delta frame: a group item must be [2, targets, bases, data]")
        return DeltaGroup(_ranges(item[1]), _ranges(item[2]), item[3])
    if not (isinstance(item, list) and len(item) == 8 and isinstance(item[7], bytes) and _numbers(item[:7])):
        raise ProtocolError("delta frame: an item must be [kind, layer, first, count, base_layer, base_first, "
                            "base_count, data]")
    if item[0] not in (DELTA_CONTENT, DELTA_HEADERS):
        raise ProtocolError(f"delta frame: unknown item kind {item[0]}")
    return DeltaItem(*item)


def decode_delta(payload: dict, version: int = PROTOCOL_VERSION) -> tuple[tuple[str, str], list[AnyDeltaItem]]:
    """The base image and items of a DELTA frame, their types and ranges checked (not their bytes)."""
    base, items = payload.get("base"), payload.get("items")
    if not (isinstance(base, list) and len(base) == 2 and all(isinstance(x, str) for x in base)):
        raise ProtocolError("delta frame: base must be [repository, manifest digest]")
    base_ref = (_checked(oci.validate_repository, base[0], "delta frame"),
                _checked(oci.validate_digest, base[1], "delta frame"))
    if not isinstance(items, list):
        raise ProtocolError("delta frame: items must be a list")
    return base_ref, [decode_item(item, version) for item in items]


def encode_error(code: str, message: str) -> bytes:
    return encode_frame(FRAME_ERROR, {"code": code, "message": message})


def encode_end(**counts: int) -> bytes:
    return encode_frame(FRAME_END, counts)


@dataclass
class Frame:
    type: int
    payload: dict
    wire_size: int  # bytes this frame took on the wire, prefix included


def read_frames(stream: BinaryIO) -> Iterator[Frame]:
    """Frames from a byte stream, validated; ends cleanly only at a frame boundary."""
    while True:
        prefix = _read_exact(stream, _PREFIX.size)
        if not prefix:
            return
        if len(prefix) < _PREFIX.size:
            raise ProtocolError("stream ended inside a frame prefix")
        version, frame_type, length = _PREFIX.unpack(prefix)
        if version != FRAME_VERSION:
            raise ProtocolError(f"frame version {version} is not supported (this reads {FRAME_VERSION})")
        if frame_type not in KNOWN_FRAMES:
            raise ProtocolError(f"frame type {frame_type} is not known to this client")
        if length > MAX_FRAME_PAYLOAD:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME_PAYLOAD}")
        body = _read_exact(stream, length)
        if len(body) < length:
            raise ProtocolError(f"stream ended inside a frame ({len(body)} of {length} bytes)")
        try:
            payload = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_PAYLOAD)
        except Exception as exc:
            raise ProtocolError(f"frame payload is not valid msgpack: {str(exc)[:200]}") from None
        if not isinstance(payload, dict):
            raise ProtocolError("frame payload must be a msgpack map")
        yield Frame(frame_type, payload, _PREFIX.size + length)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        data = stream.read(n)
        if not data:
            break
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def decode_chunks(payload: dict, dctx: zstandard.ZstdDecompressor) -> list[tuple[bytes, bytes]]:
    """(id, bytes) pairs of a CHUNKS frame. Ids are NOT verified here: the store verifies on put."""
    ids, lengths, data = payload.get("ids"), payload.get("lengths"), payload.get("data")
    if not (isinstance(ids, bytes) and isinstance(lengths, bytes) and isinstance(data, bytes)):
        raise ProtocolError("chunks frame needs byte strings ids, lengths, data")
    if len(ids) % ID_SIZE or len(lengths) != 4 * (len(ids) // ID_SIZE):
        raise ProtocolError("chunks frame: ids and lengths do not match")
    sizes = struct.unpack(f"<{len(lengths) // 4}I", lengths)
    total = sum(sizes)
    if total > MAX_CHUNKS_FRAME_BYTES:
        raise ProtocolError(f"chunks frame declares {total} bytes, more than {MAX_CHUNKS_FRAME_BYTES}")
    try:
        raw = decompress_exact(dctx, data, total)
    except DecompressionError as exc:
        raise ProtocolError(f"chunks frame: {exc}") from None
    out = []
    offset = 0
    for i, size in enumerate(sizes):
        out.append((ids[i * ID_SIZE:(i + 1) * ID_SIZE], raw[offset:offset + size]))
        offset += size
    return out
