"""Applying what a version-2 server encodes against an image the device holds: the index delta in HEADER and the
items of DELTA frames, rebuilt from the store's own old chunks and cut into verified chunks of the new index."""
from __future__ import annotations

import msgpack

from chunkstore.delta import DeltaError, zstd_decode
from chunkstore.gzdelta import GzipError, gnu_gzip, gunzip, rebuild
from chunkstore.headerdelta import decode_headers
from chunkstore.index import ChunkList, ImageIndex, IndexFormatError, chunk_id, decode_index
from chunkstore.indexdelta import CHECK_BYTES, decode_index_delta, is_placeholder, placeholder
from chunkstore.store import CorruptChunk, LocalStore
from chunkstore.wire import (DELTA_HEADERS, MAX_DELTA_BYTES, PROTOCOL_VERSION, AnyDeltaItem, DeltaGroup, DeltaGzip, Range,
                             item_spans)


def protocol_version() -> int:
    """The version this device asks for: 6 and later take gzip items that GNU gzip compresses again, so only with
    GNU gzip."""
    return PROTOCOL_VERSION if gnu_gzip() else 5


class BaseNotHeld(DeltaError):
    """A delta against an image the device did not name or does not hold completely: refused, never guessed."""


class DeltaApplier:
    def __init__(self, store: LocalStore, named: list[tuple[str, str]]) -> None:
        self.store = store
        self.named = set(named)  # the have_images this device sent: the only bases it accepts
        self._bases: dict[tuple[str, str], ImageIndex] = {}
        self.filled: set[bytes] = set()  # ids that replaced placeholders of the new index

    def base(self, ref: tuple[str, str]) -> ImageIndex:
        """The index of a base image the device named and holds completely."""
        if ref in self._bases:
            return self._bases[ref]
        record = self.store.get_image(*ref) if ref in self.named else None
        if record is None or not record.complete:
            raise BaseNotHeld(f"a delta against {ref[0]}@{ref[1]}, which this device does not hold completely")
        try:
            index = decode_index(record.index_data)
        except IndexFormatError as exc:
            raise BaseNotHeld(f"the store's index of base {ref[0]}@{ref[1]} is damaged: {exc}") from None
        self._bases[ref] = index
        return index

    def index(self, ref: tuple[str, str], delta: object) -> ImageIndex:
        """The new index from HEADER's index_delta against `ref` (IndexFormatError if it does not decode)."""
        return decode_index_delta(delta, self.base(ref))

    def apply(self, ref: tuple[str, str], item: AnyDeltaItem, new: ImageIndex) -> list[tuple[bytes, bytes]]:
        """The verified (chunk id, bytes) pairs an item delivers; DeltaError if it is refused or does not decode.
        Placeholders (version 7) of the chunks it rebuilds are replaced in `new` by their ids."""
        pairs = self._decode(ref, item, new)
        at = iter(pairs)
        for layer, headers, first, count in item_spans(item):
            chunks = new.layers[layer].chunk_list(headers)
            for i in range(first, first + count):
                cid, _ = next(at)
                if is_placeholder(chunks.id_at(i)):
                    chunks.set_id(i, cid)
                    self.filled.add(cid)
        return pairs

    def fill(self, new: ImageIndex, chunks: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        """Puts `chunks` (id, length) in place of the placeholders of `new` they match; the ones put in."""
        wanted = {placeholder(cid): (cid, length) for cid, length in chunks}
        put: dict[bytes, int] = {}
        for layer in new.layers if wanted else ():
            for chunks_of in (layer.header_chunks, layer.chunks):
                for i, (cid, length) in enumerate(chunks_of):
                    found = wanted.get(cid)
                    if found is not None and found[1] == length and is_placeholder(cid):
                        chunks_of.set_id(i, found[0])
                        put[found[0]] = length
        self.filled.update(put)
        return list(put.items())

    def _decode(self, ref: tuple[str, str], item: AnyDeltaItem, new: ImageIndex) -> list[tuple[bytes, bytes]]:
        base = self.base(ref)
        if isinstance(item, DeltaGroup):
            return self._group(item, base, new)
        if isinstance(item, DeltaGzip):
            return self._gzip(item, base, new)
        if item.layer >= len(new.layers) or item.base_layer >= len(base.layers):
            raise DeltaError(f"a delta item names layer {item.layer} (base {item.base_layer}) that does not exist")
        layer, old = new.layers[item.layer], base.layers[item.base_layer]
        if item.kind == DELTA_HEADERS:
            if item.count != len(layer.header_chunks) or item.base_count != len(old.header_chunks):
                raise DeltaError("a header delta must cover whole header streams")
            targets = list(layer.header_chunks)
            old_bytes = self._bytes(old.header_chunks, 0, len(old.header_chunks))
            size = _size(targets)
            try:
                fields = msgpack.unpackb(item.data, raw=False, max_bin_len=MAX_DELTA_BYTES)
            except Exception as exc:  # msgpack raises many types on malformed input
                raise DeltaError(f"a header delta is not msgpack: {str(exc)[:100]}") from None
            if not isinstance(fields, dict):
                raise DeltaError("a header delta must be a map")
            data = decode_headers(fields, size, layer.runs, old_bytes, old.runs)
        else:
            if item.first + item.count > len(layer.chunks) or item.base_first + item.base_count > len(old.chunks):
                raise DeltaError("a delta item's chunk range is outside its layer")
            span = range(item.first, item.first + item.count)
            targets = [(layer.chunks.id_at(i), layer.chunks.lengths[i]) for i in span]
            size = _size(targets)
            data = zstd_decode(item.data, self._bytes(old.chunks, item.base_first, item.base_count), size)
        return _cut(data, targets)

    def _group(self, item: DeltaGroup, base: ImageIndex, new: ImageIndex) -> list[tuple[bytes, bytes]]:
        targets = _ranges(new, item.targets, "target")
        _ranges(base, item.bases, "base")  # sizes checked before a byte of the base is read
        old_bytes = b"".join(self._bytes(base.layers[layer].chunks, first, count) for layer, first, count in item.bases)
        return _cut(zstd_decode(item.data, old_bytes, _size(targets)), targets)

    def _gzip(self, item: DeltaGzip, base: ImageIndex, new: ImageIndex) -> list[tuple[bytes, bytes]]:
        """Each target's text decoded against the bases' texts, then compressed back into its exact gzip bytes."""
        targets = _ranges(new, item.targets, "target")
        _ranges(base, item.bases, "base")
        sizes = [shape.size for shape in item.shapes]
        if sum(sizes) > MAX_DELTA_BYTES:
            raise DeltaError(f"a gzip item's texts are over {MAX_DELTA_BYTES} bytes")
        try:
            base_text = b"".join(gunzip(self._bytes(base.layers[layer].chunks, first, count))
                                 for layer, first, count in item.bases)
        except GzipError as exc:
            raise DeltaError(f"a gzip item's base is not a gzip file: {exc}") from None
        if len(base_text) > MAX_DELTA_BYTES:
            raise DeltaError(f"a gzip item's base texts are over {MAX_DELTA_BYTES} bytes")
        texts = zstd_decode(item.data, base_text, sum(sizes))
        files, offset = [], 0
        try:
            for shape in item.shapes:
                files.append(rebuild(shape, texts[offset:offset + shape.size]))
                offset += shape.size
        except GzipError as exc:
            raise DeltaError(f"a gzip item could not be compressed again: {exc}") from None
        data = b"".join(files)
        if len(data) != _size(targets):
            raise DeltaError(f"a gzip item rebuilt {len(data)} bytes, its targets hold {_size(targets)}")
        return _cut(data, targets)

    def _bytes(self, chunks: ChunkList, first: int, count: int) -> bytes:
        if sum(chunks.lengths[first:first + count]) > MAX_DELTA_BYTES:
            raise DeltaError(f"a delta base over {MAX_DELTA_BYTES} bytes")
        # get_many verifies every chunk against its id: a base is exactly the bytes the index names.
        try:
            return b"".join(self.store.get_many([chunks.id_at(i) for i in range(first, first + count)]))
        except (KeyError, CorruptChunk) as exc:
            raise BaseNotHeld(f"a base chunk is missing from the store or damaged: {exc}") from None


def _ranges(index: ImageIndex, ranges: tuple[Range, ...], what: str) -> list[tuple[bytes, int]]:
    """(id, length) of the content chunks a group's ranges name; DeltaError as soon as a range is outside the index
    or they add up to more than MAX_DELTA_BYTES (a lying server cannot make the device walk its index unbounded)."""
    out: list[tuple[bytes, int]] = []
    size = 0
    for layer, first, count in ranges:
        if layer >= len(index.layers) or first + count > len(index.layers[layer].chunks):
            raise DeltaError(f"a group item's {what} range {(layer, first, count)} is outside its image")
        chunks = index.layers[layer].chunks
        size += sum(chunks.lengths[first:first + count])
        if size > MAX_DELTA_BYTES:
            raise DeltaError(f"a group item's {what} is over {MAX_DELTA_BYTES} bytes")
        out += ((chunks.id_at(i), chunks.lengths[i]) for i in range(first, first + count))
    return out


def _size(targets: list[tuple[bytes, int]]) -> int:
    size = sum(length for _, length in targets)
    if size > MAX_DELTA_BYTES:
        raise DeltaError(f"a delta target over {MAX_DELTA_BYTES} bytes")
    return size


def _cut(data: bytes | bytearray, targets: list[tuple[bytes, int]]) -> list[tuple[bytes, memoryview]]:
    """The verified chunks of decoded bytes, as views into them (no copies), with their ids: a placeholder's
    chunk is verified against the bytes of its id the placeholder keeps."""
    out, offset, view = [], 0, memoryview(data)
    for cid, length in targets:
        piece = view[offset:offset + length]
        offset += length
        found = chunk_id(piece)
        if found != cid and not (is_placeholder(cid) and found[:CHECK_BYTES] == cid[:CHECK_BYTES]):
            raise DeltaError(f"a delta decoded to bytes that do not hash to chunk {cid.hex()[:16]}…")
        out.append((found, piece))
    return out

