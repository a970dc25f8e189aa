"""The chunk index: for each layer of an image, its descriptors, member layout and chunk ids in order;
built by streaming a layer blob once, encoded as versioned msgpack (docs/FORMAT.md), decoded strictly."""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

import blake3
import msgpack
import numpy as np

from .chunker import ALGORITHM, DEFAULT_PARAMS, ChunkParams, StreamChunker, chunk_pieces
from .layers import HashingReader, open_uncompressed
from .tarsplit import Content, Header, RawRest, TarSplitter

FORMAT = "chunksync-index"
VERSION = 1
ID_SIZE = 32
MAX_INDEX_BYTES = 256 << 20  # an index this large would describe ~1 TB of layers; refuse beyond

ChunkSink = Callable[[bytes, bytes], None]


class IndexFormatError(ValueError):
    """Index bytes that do not follow docs/FORMAT.md."""


def chunk_id(data: bytes | memoryview) -> bytes:
    """A chunk's id: BLAKE3-256 of its uncompressed bytes."""
    return blake3.blake3(data).digest()


@dataclass
class ChunkList:
    """Chunk ids (32 bytes each, concatenated) and their lengths, in stream order."""
    ids: bytearray = field(default_factory=bytearray)
    lengths: array = field(default_factory=lambda: array("I"))

    def append(self, cid: bytes, length: int) -> None:
        self.ids += cid
        self.lengths.append(length)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        ids = bytes(self.ids)
        for i, length in enumerate(self.lengths):
            yield ids[i * ID_SIZE:(i + 1) * ID_SIZE], length

    def id_at(self, i: int) -> bytes:
        return bytes(self.ids[i * ID_SIZE:(i + 1) * ID_SIZE])

    def set_id(self, i: int, cid: bytes) -> None:
        self.ids[i * ID_SIZE:(i + 1) * ID_SIZE] = cid

    def total(self) -> int:
        return sum(self.lengths)


@dataclass
class LayerIndex:
    """One layer: OCI descriptors plus how to rebuild its uncompressed stream from chunks.

    The stream is H0 C0 H1 C1 ... Hn Cn: `runs[i] = (header_len, content_len)`. Header bytes come in order
    from the header stream (`header_chunks`), content bytes from `chunks`; no content chunk spans two runs.
    """
    media_type: str
    digest: str            # sha256 of the blob as stored in the registry (compressed)
    size: int              # blob size
    diff_id: str           # sha256 of the uncompressed stream
    uncompressed_size: int
    runs: array = field(default_factory=lambda: array("Q"))  # header_len, content_len, header_len, ...
    header_chunks: ChunkList = field(default_factory=ChunkList)
    chunks: ChunkList = field(default_factory=ChunkList)
    compression: str = ""  # what the blob was found to hold: gzip, zstd, none

    def run_pairs(self) -> Iterator[tuple[int, int]]:
        for i in range(0, len(self.runs), 2):
            yield self.runs[i], self.runs[i + 1]

    def run_ranges(self) -> list[tuple[int, int]]:
        """[first, end) indexes in `chunks` of each run's content chunks (a run's content is whole chunks)."""
        bounds = np.cumsum(np.frombuffer(self.chunks.lengths, dtype=np.uint32), dtype=np.int64)
        run_ends = np.cumsum(np.frombuffer(self.runs, dtype=np.uint64)[1::2], dtype=np.int64)
        ends = np.searchsorted(bounds, run_ends, side="right")
        return list(zip(np.concatenate(([0], ends[:-1])).tolist(), ends.tolist()))

    def chunk_list(self, headers: bool) -> ChunkList:
        """The header chunks or the content chunks."""
        return self.header_chunks if headers else self.chunks

    def all_chunks(self) -> Iterator[tuple[bytes, int]]:
        yield from self.header_chunks
        yield from self.chunks

    def chunk_ids(self) -> set[bytes]:
        return {cid for cid, _ in self.all_chunks()}


@dataclass
class ImageIndex:
    """The chunk index of one image manifest."""
    manifest_digest: str
    layers: list[LayerIndex]
    params: ChunkParams = DEFAULT_PARAMS

    def chunk_ids(self) -> set[bytes]:
        ids: set[bytes] = set()
        for layer in self.layers:
            ids |= layer.chunk_ids()
        return ids

    def encode(self) -> bytes:
        return encode_index(self)


def index_layer(blob: BinaryIO, media_type: str, on_chunk: ChunkSink | None = None,
                params: ChunkParams = DEFAULT_PARAMS, read_size: int = 1 << 20) -> LayerIndex:
    """Reads a layer blob once, streaming: decodes it, splits it tar-aware, chunks it, hashes it.

    `on_chunk(chunk_id, data)` receives every chunk (headers and contents) as it is cut, e.g. to store it.
    Memory stays bounded by a few chunk sizes plus `read_size`, whatever the layer's size.
    """
    compressed = HashingReader(blob)
    stream, compression = open_uncompressed(compressed, media_type)
    uncompressed = HashingReader(stream)
    layer = LayerIndex(media_type=media_type, digest="", size=0, diff_id="", uncompressed_size=0,
                       compression=compression)
    headers = StreamChunker(params)
    header_len = 0

    def emit(target: ChunkList, pieces: Iterator[bytes]) -> int:
        total = 0
        for data in pieces:
            cid = chunk_id(data)
            target.append(cid, len(data))
            if on_chunk is not None:
                on_chunk(cid, data)
            total += len(data)
        return total

    def content_pieces(splitter: TarSplitter) -> Iterator[bytes]:
        while data := splitter.read_content(read_size):
            yield data

    splitter = TarSplitter(uncompressed, read_size)
    for event in splitter:
        if isinstance(event, Header):
            header_len += len(event.data)
            emit(layer.header_chunks, headers.feed(event.data))
        elif isinstance(event, Content):
            pieces = content_pieces(splitter)
            if event.size <= params.min_size:
                # Small files are one chunk: skip the CDC call, which costs more than the file.
                data = b"".join(pieces)
                content_len = emit(layer.chunks, iter([data] if data else []))
            else:
                content_len = emit(layer.chunks, chunk_pieces(pieces, params))
            layer.runs.extend((header_len, content_len))
            header_len = 0
        else:  # RawRest: not (or no longer) a tar; chunk the rest as one stream
            assert isinstance(event, RawRest)
            rest = iter(lambda: event.stream.read(read_size), b"")
            content_len = emit(layer.chunks, chunk_pieces(_prepend(event.head, rest), params))
            layer.runs.extend((header_len, content_len))
            header_len = 0
    emit(layer.header_chunks, headers.finish())
    layer.runs.extend((header_len, 0))
    # Drain what the decoder has left (e.g. gzip trailer) so the compressed digest covers the whole blob.
    while compressed.read(read_size):
        pass
    layer.digest = compressed.digest()
    layer.size = compressed.size
    layer.diff_id = uncompressed.digest()
    layer.uncompressed_size = uncompressed.size
    return layer


def _prepend(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    yield from rest


# --- encoding -------------------------------------------------------------------------------------------

def _pack_u32(values: array) -> bytes:
    return values.tobytes() if struct.pack("=I", 1) == struct.pack("<I", 1) else _swap(values)


def _pack_u64(values: array) -> bytes:
    return values.tobytes() if struct.pack("=Q", 1) == struct.pack("<Q", 1) else _swap(values)


def _swap(values: array) -> bytes:
    copy = array(values.typecode, values)
    copy.byteswap()
    return copy.tobytes()


def _unpack(data: bytes, typecode: str, what: str) -> array:
    values = array(typecode)
    if len(data) % values.itemsize:
        raise IndexFormatError(f"{what}: {len(data)} bytes is not a whole number of {values.itemsize}-byte integers")
    values.frombytes(data)
    if struct.pack("=I", 1) != struct.pack("<I", 1):
        values.byteswap()
    return values


def _encode_layer(layer: LayerIndex) -> dict:
    return {
        "media_type": layer.media_type,
        "digest": layer.digest,
        "size": layer.size,
        "diff_id": layer.diff_id,
        "uncompressed_size": layer.uncompressed_size,
        "runs": _pack_u64(layer.runs),
        "header_ids": bytes(layer.header_chunks.ids),
        "header_lengths": _pack_u32(layer.header_chunks.lengths),
        "ids": bytes(layer.chunks.ids),
        "lengths": _pack_u32(layer.chunks.lengths),
    }


def encode_index(index: ImageIndex) -> bytes:
    return msgpack.packb({
        "format": FORMAT,
        "version": VERSION,
        "chunking": {"algorithm": ALGORITHM, "min": index.params.min_size,
                     "avg": index.params.avg_size, "max": index.params.max_size},
        "manifest_digest": index.manifest_digest,
        "layers": [_encode_layer(layer) for layer in index.layers],
    }, use_bin_type=True)


# --- decoding -------------------------------------------------------------------------------------------

def _field(obj: dict, key: str, kind: type | tuple, where: str):
    if key not in obj:
        raise IndexFormatError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise IndexFormatError(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


def _digest(obj: dict, key: str, where: str) -> str:
    value = _field(obj, key, str, where)
    if len(value) != 71 or not value.startswith("sha256:") or not all(c in "0123456789abcdef" for c in value[7:]):
        raise IndexFormatError(f"{where}: {key} is not a sha256 digest: {value[:80]!r}")
    return value


def _chunk_list(obj: dict, ids_key: str, lengths_key: str, params: ChunkParams, where: str) -> ChunkList:
    ids = _field(obj, ids_key, bytes, where)
    lengths = _unpack(_field(obj, lengths_key, bytes, where), "I", f"{where}.{lengths_key}")
    if len(ids) != ID_SIZE * len(lengths):
        raise IndexFormatError(f"{where}: {len(ids)} bytes of {ids_key} for {len(lengths)} {lengths_key}")
    if any(n == 0 or n > params.max_size for n in lengths):
        raise IndexFormatError(f"{where}: a chunk length is 0 or above the maximum {params.max_size}")
    return ChunkList(bytearray(ids), lengths)


def _decode_layer(obj, params: ChunkParams, where: str) -> LayerIndex:
    if not isinstance(obj, dict):
        raise IndexFormatError(f"{where}: expected a map, got {type(obj).__name__}")
    layer = LayerIndex(
        media_type=_field(obj, "media_type", str, where),
        digest=_digest(obj, "digest", where),
        size=_field(obj, "size", int, where),
        diff_id=_digest(obj, "diff_id", where),
        uncompressed_size=_field(obj, "uncompressed_size", int, where),
        runs=_unpack(_field(obj, "runs", bytes, where), "Q", f"{where}.runs"),
        header_chunks=_chunk_list(obj, "header_ids", "header_lengths", params, where),
        chunks=_chunk_list(obj, "ids", "lengths", params, where),
    )
    if layer.size < 0 or layer.uncompressed_size < 0:
        raise IndexFormatError(f"{where}: negative size")
    if len(layer.runs) % 2 or not layer.runs:
        raise IndexFormatError(f"{where}: runs must be (header_len, content_len) pairs, at least one")
    header_total = sum(layer.runs[0::2])
    content_total = sum(layer.runs[1::2])
    if header_total != layer.header_chunks.total():
        raise IndexFormatError(f"{where}: runs hold {header_total} header bytes, header chunks {layer.header_chunks.total()}")
    if content_total != layer.chunks.total():
        raise IndexFormatError(f"{where}: runs hold {content_total} content bytes, chunks {layer.chunks.total()}")
    if header_total + content_total != layer.uncompressed_size:
        raise IndexFormatError(f"{where}: chunk lengths sum to {header_total + content_total}, "
                               f"uncompressed_size is {layer.uncompressed_size}")
    # No content chunk may span two runs: each run's content is a whole number of chunks.
    lengths = iter(layer.chunks.lengths)
    for content_len in layer.runs[1::2]:
        covered = 0
        while covered < content_len:
            covered += next(lengths)
        if covered != content_len:
            raise IndexFormatError(f"{where}: a content chunk spans two runs")
    return layer


def decode_index(data: bytes) -> ImageIndex:
    """Parses and validates index bytes; raises IndexFormatError with a clear message on anything off."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise IndexFormatError("index must be bytes")
    if len(data) > MAX_INDEX_BYTES:
        raise IndexFormatError(f"index of {len(data)} bytes exceeds the limit of {MAX_INDEX_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_INDEX_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise IndexFormatError(f"index is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise IndexFormatError(f"index: expected a map, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise IndexFormatError(f"index: format is {str(obj.get('format'))[:40]!r}, expected {FORMAT!r}")
    if obj.get("version") != VERSION:
        raise IndexFormatError(f"index: version {str(obj.get('version'))[:20]} is not supported (this reads {VERSION})")
    chunking = _field(obj, "chunking", dict, "index")
    if chunking.get("algorithm") != ALGORITHM:
        raise IndexFormatError(f"index: chunking algorithm {str(chunking.get('algorithm'))[:40]!r} is not {ALGORITHM!r}")
    try:
        params = ChunkParams(_field(chunking, "min", int, "chunking"), _field(chunking, "avg", int, "chunking"),
                             _field(chunking, "max", int, "chunking"))
    except ValueError as exc:
        raise IndexFormatError(f"index: {exc}") from None
    layers = _field(obj, "layers", list, "index")
    return ImageIndex(
        manifest_digest=_digest(obj, "manifest_digest", "index"),
        layers=[_decode_layer(layer, params, f"layer {i}") for i, layer in enumerate(layers)],
        params=params,
    )
