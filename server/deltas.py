"""Choosing and encoding DELTA items for an (old image, new image) pair: each changed file against the old file of
the same path (else the old chunks between the same unchanged neighbours), each changed header stream against
the old one. Deterministic per pair, so the answer is computed once and cached (server/deltacache.py)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack

from chunkstore.delta import MAX_DELTA_BYTES, PathMatcher, zstd_encode
from chunkstore.gzdelta import ENGINES, MAGIC, ZLIB_MEM8, ZLIB_MEM9, GzipError, GzipShape, gunzip, shape_of
from chunkstore.headerdelta import encode_headers
from chunkstore.headerlayout import Members, members
from chunkstore.index import ImageIndex, LayerIndex
from chunkstore.wire import (DELTA_CONTENT, DELTA_GZIP, DELTA_HEADERS, AnyDeltaItem, DeltaGroup, DeltaGzip, DeltaItem,
                             Range, item_spans)

from .memory import give_back

GetChunk = Callable[[bytes], bytes]
Base = tuple[int, int, int]  # old layer, first chunk, chunk count
# zstd level of content items, measured on the bench pairs: 10 (python: 5.12 MB in 1.1 s CPU; 9: 5.70 MB, 12: 4.98 MB
# in 2.4 s, 19: 4.34 MB in 19 s). Targets up to 256 KiB had level 19 when a level-3 probe said it would pay: node
# 47.5 kB of items against 51.1 at level 10, but 0.28 s CPU against 0.19 in-process, debian 0.87 s against 0.62,
# python +3.4 kB for -0.5 s. Version 7's placeholders save more bytes than that (node: 4.5 kB), so the CPU went.
# (Group items: GROUP_LEVEL.)
CONTENT_LEVEL = 10
HEADER_LEVEL = 9
# Gzip items' texts differ by a few lines: level 9 does it (debian pair: 7.2 kB in 0.07 s; 19: 6.8 kB in 0.77 s).
GZIP_LEVEL = 9
# Version 3 groups targets up to GROUP_TARGET whose base is at most GROUP_BASE into one zstd frame of at
# most GROUP_BYTES of targets and GROUP_BASES of distinct bases. Measured (node / debian update, content bytes): single
# items 52.0 / 955.9 kB; grouped up to 16 KiB 46.6 / 930.5 kB; 64 KiB 45.1 / 934.2 kB; 256 KiB 42.2 / 934.7 kB, but
# 1.75 s CPU on debian instead of 0.9. Bases are capped because level 19 pays for every dictionary byte: with 64 MiB
# of bases per group the python pair took 8.3 s (single items 2.2 s), with these caps 2.6 s and 11 kB less.
GROUP_TARGET = 16 << 10
# Group frames are over 256 KiB, where zstd's level 12 is a lazy match finder: against 19 on the bench pairs' groups
# (kB / CPU s) node 7.2 / 0.002 vs 6.5 / 0.040, debian 22.1 / 0.010 vs 19.9 / 0.183, python 35.6 / 0.043 vs
# 31.7 / 0.409 (15: 33.8 / 0.43).
GROUP_LEVEL = 12
GROUP_BYTES = 4 << 20
GROUP_BASE = 4 << 20
GROUP_BASES = 16 << 20


# At these levels zstd sizes its match table by the target: 2^22 entries (16 MiB, and as much again in the
# dictionary's copy) from 512 KiB up. For items of at most CAPPED_ITEM base + target, 2^21 do as well. Measured
# in-process on the bench pairs' items (all kinds): debian +681 B of 488 kB, CPU 0.95 s instead of 1.27, peak rise
# 39 MB instead of 59 (its largest item: 2.1 MB against 2.1); python +1.9 kB of 4.83 MB, peak -3 MB; node unchanged.
# Over it, python's items of 9-14 MB lost 3-5 % with 2^21.
CAPPED_ITEM = 6 << 20
CAPPED_HASH_LOG = 21
# After an item of over TRIM_AFTER base + target, what its zstd context and buffers freed goes back to the system
# (malloc_trim) instead of staying in the heap under the next items. Measured in-process on the debian pair: peak
# rise 46 -> 39 MB, 6 trims costing 8.5 ms of the pair's ~1 s.
TRIM_AFTER = 1 << 20


# A big file changed in places (a rebuilt shared library) is sent as several targets, each against only the part of
# the old file between its unchanged neighbours when the whole file is over PART_RATIO times the target: a smaller
# dictionary is cheaper and, with the same hash tables, matches better. Measured in-process on the bench pairs' items
# (kB / CPU s, best of 3): python 4919 / 2.24 against whole files, 4824 / 1.93 against parts; debian 481 / 1.31 and
# 481 / 0.87; node unchanged (no file over PART_RATIO times its target).
PART_RATIO = 1.5


# Version 5: a changed gzip file that zlib reproduces goes as a delta of its text against the old file's text
# (chunkstore/gzdelta.py); version 6 also when GNU gzip reproduces it. Measured on the debian pair: zlib reproduces
# 91 of its 120 changed .gz files (items 962 -> 807 kB), GNU gzip the other 29 (larger, `gzip -9n` output).


@dataclass(frozen=True)
class Target:
    """A planned item, before encoding: chunks [first, first+count) of the new layer against the base range."""
    kind: int
    layer: int
    first: int
    count: int
    base_layer: int
    base_first: int
    base_count: int


@dataclass(frozen=True)
class GzipTarget:
    """A planned gzip item for one whole file: its text and shape, and the size of its base file's text."""
    target: Target
    shape: GzipShape
    text: bytes
    base_text_size: int


def header_stream(layer: LayerIndex, get_chunk: GetChunk) -> bytes | None:
    """A layer's header bytes, or None when they are over the delta size limit (then no path matching)."""
    if layer.header_chunks.total() > MAX_DELTA_BYTES:
        return None
    return b"".join(get_chunk(cid) for cid, _ in layer.header_chunks)


def header_members(layer: LayerIndex, header: bytes | None) -> Members | None:
    """The members of a layer's header stream, parsed once for all of a pair's uses; None without the stream."""
    return members(header, layer.runs) if header is not None else None


def run_paths(layer: LayerIndex, parsed: Members | None) -> dict[int, str]:
    """Run index -> path of the file whose content it is (the last member header before the content)."""
    return parsed.run_paths(layer.runs) if parsed is not None else {}


class Planner:
    """Plans the items of one pair; `items()` encodes them one at a time (memory: one base and target)."""

    def __init__(self, new: ImageIndex, old: ImageIndex, get_chunk: GetChunk, gzip: tuple[int, ...] = ()) -> None:
        self.new, self.old, self.get = new, old, get_chunk
        self.gzip = gzip  # the engines gzip items may name (chunkstore/gzdelta.py); none before version 5
        self.old_ids = old.chunk_ids()
        self._old_headers = [header_stream(layer, get_chunk) for layer in old.layers]
        self._old_members = [header_members(layer, h) for layer, h in zip(old.layers, self._old_headers)]
        self._old_paths = [run_paths(layer, m) for layer, m in zip(old.layers, self._old_members)]
        self._new_members: dict[int, Members | None] = {}
        self._old_ranges = [layer.run_ranges() for layer in old.layers]
        files: list[tuple[str, tuple[int, int]]] = []
        for j in reversed(range(len(old.layers))):  # the topmost layer's file is the one the device sees
            for run, path in self._old_paths[j].items():
                files.append((path, (j, run)))
        self._files = PathMatcher(files)
        # Where each old content chunk sits, for data without paths: the base is what lay between the neighbours.
        self._where = {cid: (j, i) for j, layer in enumerate(old.layers)
                       for i, (cid, _) in enumerate(layer.chunks)}

    def targets(self) -> Iterator[tuple[Target, bytes | None] | GzipTarget]:
        """(target, the new layer's header stream) for every item worth sending, or a GzipTarget."""
        old_digests = {layer.digest for layer in self.old.layers}
        changed = [i for i, layer in enumerate(self.new.layers)
                   if layer.digest not in old_digests and not layer.chunk_ids() <= self.old_ids]
        for i in changed:
            layer = self.new.layers[i]
            header = header_stream(layer, self.get)
            self._new_members[i] = header_members(layer, header)
            paths = run_paths(layer, self._new_members[i])
            if header is not None and any(cid not in self.old_ids for cid, _ in layer.header_chunks):
                base = self._header_base(paths)
                if base is not None:
                    yield Target(DELTA_HEADERS, i, 0, len(layer.header_chunks), base, 0,
                                 len(self.old.layers[base].header_chunks)), header
            # The header streams (debian: 4.8 MB each) and their layouts serve only header items, which are
            # encoded by now: not held through the content items (the pair's largest zstd contexts come there).
            header = None
            self._new_members.pop(i, None)
            if i == changed[-1]:
                self._old_headers = [None] * len(self._old_headers)
                self._old_members = [None] * len(self._old_members)
            for target in self._content_targets(i, layer, paths):
                yield target if isinstance(target, GzipTarget) else (target, None)

    def _header_base(self, paths: dict[int, str]) -> int | None:
        """The old layer sharing the most paths with the new one; None if none shares any."""
        wanted = set(paths.values())
        best, best_count = None, 0
        for j in range(len(self.old.layers)):
            count = len(wanted.intersection(self._old_paths[j].values()))
            if count > best_count and self._old_headers[j] is not None:
                best, best_count = j, count
        return best

    def _content_targets(self, i: int, layer: LayerIndex, paths: dict[int, str]) -> Iterator[Target | GzipTarget]:
        ids = [cid for cid, _ in layer.chunks]
        lengths = layer.chunks.lengths
        for run, (start, end) in enumerate(layer.run_ranges()):
            if self.gzip and start < end and not self.old_ids.issuperset(ids[start:end]):
                gz = self._gzip_target(i, start, end, paths.get(run))
                if gz is not None:
                    yield gz
                    continue
            position = start
            while position < end:
                if ids[position] in self.old_ids:
                    position += 1
                    continue
                first = position
                while position < end and ids[position] not in self.old_ids:
                    position += 1
                if sum(lengths[first:position]) > MAX_DELTA_BYTES:
                    continue  # too big to decode in bounded memory: plain chunks
                base = self._base(paths.get(run), layer, ids, first, position)
                if base is not None:
                    yield Target(DELTA_CONTENT, i, first, position - first, *base)

    def _gzip_target(self, i: int, start: int, end: int, path: str | None) -> GzipTarget | None:
        """The whole file as a gzip item, if it is a gzip file zlib reproduces and its old file is gzip too."""
        base = self._file_base(path)
        layer = self.new.layers[i]
        if base is None or not self.get(layer.chunks.id_at(start)).startswith(MAGIC) \
                or sum(layer.chunks.lengths[start:end]) > MAX_DELTA_BYTES:
            return None
        found = shape_of(b"".join(self.get(cid) for cid in _ids(layer, start, end - start)), self.gzip)
        if found is None:
            return None
        try:
            base_text = gunzip(b"".join(self.get(cid) for cid in _ids(self.old.layers[base[0]], base[1], base[2])))
        except GzipError:
            return None
        return GzipTarget(Target(DELTA_GZIP, i, start, end - start, *base), *found, len(base_text))

    def _base(self, path: str | None, layer: LayerIndex, ids: list[bytes], first: int, end: int) -> Base | None:
        """The old file of the same path (only its part around the target, if much bigger than the target), else
        the old chunks between the target's unchanged neighbours."""
        whole = self._file_base(path)
        if whole is None:
            return self._neighbour_base(ids, first, end)
        j, lo, count = whole
        if _size(self.old.layers[j], lo, count) > PART_RATIO * _size(layer, first, end - first):
            return _part_of(self.old.layers[j], whole, ids, first, end)
        return whole

    def _file_base(self, path: str | None) -> Base | None:
        found = self._files.find(path) if path is not None else None
        if not isinstance(found, tuple):
            return None
        j, run = found
        first, end = self._old_ranges[j][run]
        if first == end or sum(self.old.layers[j].chunks.lengths[first:end]) > MAX_DELTA_BYTES:
            return None
        return j, first, end - first

    def _neighbour_base(self, ids: list[bytes], first: int, end: int) -> Base | None:
        before = self._where.get(ids[first - 1]) if first > 0 else None
        after = self._where.get(ids[end]) if end < len(ids) else None
        if before and after and before[0] == after[0] and before[1] < after[1]:
            j, lo, hi = before[0], before[1] + 1, after[1]
        elif before:
            j, lo = before[0], before[1] + 1
            hi = min(lo + (end - first), len(self.old.layers[j].chunks))
        elif after:
            j, hi = after[0], after[1]
            lo = max(0, hi - (end - first))
        else:
            return None
        lengths = self.old.layers[j].chunks.lengths
        while hi > lo and sum(lengths[lo:hi]) > MAX_DELTA_BYTES:
            hi -= 1
        return (j, lo, hi - lo) if hi > lo else None

    def encode(self, target: Target, header: bytes | None) -> DeltaItem:
        if target.kind == DELTA_HEADERS:
            assert header is not None
            old_layer = self.old.layers[target.base_layer]
            data = msgpack.packb(encode_headers(header, self.new.layers[target.layer].runs,
                                                self._old_headers[target.base_layer] or b"", old_layer.runs,
                                                HEADER_LEVEL, self._new_members.get(target.layer),
                                                self._old_members[target.base_layer]), use_bin_type=True)
        else:
            new_layer, old_layer = self.new.layers[target.layer], self.old.layers[target.base_layer]
            goal = b"".join(self.get(cid) for cid in _ids(new_layer, target.first, target.count))
            base = b"".join(self.get(cid) for cid in _ids(old_layer, target.base_first, target.base_count))
            data = encode_content(goal, base)
        return DeltaItem(target.kind, target.layer, target.first, target.count, target.base_layer,
                         target.base_first, target.base_count, data)

    def items(self, grouped: bool = False) -> Iterator[AnyDeltaItem]:
        """Every item, in order; `grouped` (version 3): small content targets as group items."""
        group, gz = _Group(), _Group()
        for planned in self.targets():
            if isinstance(planned, GzipTarget):
                target = planned.target
                base = (target.base_layer, target.base_first, target.base_count)
                if not gz.fits(planned.shape.size, base, planned.base_text_size):
                    yield self.encode_gzip(gz)
                    gz = _Group()
                gz.add((target.layer, target.first, target.count), planned.shape.size, base, planned.base_text_size,
                       (planned.shape, planned.text))
                continue
            target, header = planned
            size = _size(self.new.layers[target.layer], target.first, target.count)
            base = (target.base_layer, target.base_first, target.base_count)
            base_size = _size(self.old.layers[target.base_layer], target.base_first, target.base_count)
            if not grouped or target.kind != DELTA_CONTENT or size > GROUP_TARGET or base_size > GROUP_BASE:
                yield self.encode(target, header)
                continue
            if not group.fits(size, base, base_size):
                yield self.encode_group(group)
                group = _Group()
            group.add((target.layer, target.first, target.count), size, base, base_size)
        if group.targets:
            yield self.encode_group(group)
        if gz.targets:
            yield self.encode_gzip(gz)

    def encode_group(self, group: _Group) -> DeltaGroup:
        goal = b"".join(self.get(cid) for layer, first, count in group.targets
                        for cid in _ids(self.new.layers[layer], first, count))
        base = b"".join(self.get(cid) for layer, first, count in group.bases
                        for cid in _ids(self.old.layers[layer], first, count))
        return DeltaGroup(tuple(group.targets), tuple(group.bases), _zstd(goal, base, GROUP_LEVEL))


    def encode_gzip(self, group: _Group) -> DeltaGzip:
        texts = b"".join(text for _, text in group.files)
        base = b"".join(gunzip(b"".join(self.get(cid) for cid in _ids(self.old.layers[layer], first, count)))
                        for layer, first, count in group.bases)
        return DeltaGzip(tuple(group.targets), tuple(group.bases), tuple(shape for shape, _ in group.files),
                         _zstd(texts, base, GZIP_LEVEL))


class _Group:
    """The ranges of one group item being gathered: targets in order, bases each once (for gzip items: sizes are
    of the texts, and each target's shape and text)."""

    def __init__(self) -> None:
        self.targets: list[Range] = []
        self.bases: list[Range] = []
        self.files: list[tuple[GzipShape, bytes]] = []
        self.size = self.base_size = 0

    def fits(self, size: int, base: Range, base_size: int) -> bool:
        more = 0 if base in self.bases else base_size
        return not self.targets or (self.size + size <= GROUP_BYTES and self.base_size + more <= GROUP_BASES)

    def add(self, target: Range, size: int, base: Range, base_size: int,
            file: tuple[GzipShape, bytes] | None = None) -> None:
        self.targets.append(target)
        if file is not None:
            self.files.append(file)
        self.size += size
        if base not in self.bases:
            self.bases.append(base)
            self.base_size += base_size


def _part_of(old_layer: LayerIndex, whole: Base, ids: list[bytes], first: int, end: int) -> Base:
    """The chunks of the old file `whole` between where the target's unchanged neighbours lie in it (with one
    neighbour found: from it to the file's end or start); `whole` if neither lies in it."""
    j, lo, count = whole
    at = {old_layer.chunks.id_at(i): i for i in range(lo, lo + count)}
    before = at.get(ids[first - 1]) if first > 0 else None
    after = at.get(ids[end]) if end < len(ids) else None
    if before is not None and after is not None and before + 1 < after:
        return j, before + 1, after - before - 1
    if before is not None and before + 1 < lo + count:
        return j, before + 1, lo + count - before - 1
    if after is not None and after > lo:
        return j, lo, after - lo
    return whole


def encode_content(goal: bytes, base: bytes) -> bytes:
    """`goal` as a zstd frame against `base`."""
    return _zstd(goal, base, CONTENT_LEVEL)


def _zstd(goal: bytes, base: bytes, level: int) -> bytes:
    size = len(goal) + len(base)
    data = zstd_encode(goal, base, level, max_hash_log=CAPPED_HASH_LOG if size <= CAPPED_ITEM else None)
    if size > TRIM_AFTER:
        give_back()
    return data


def _ids(layer: LayerIndex, first: int, count: int) -> list[bytes]:
    return [layer.chunks.id_at(i) for i in range(first, first + count)]


def _size(layer: LayerIndex, first: int, count: int) -> int:
    return sum(layer.chunks.lengths[first:first + count])


def gzip_engines(version: int) -> tuple[int, ...]:
    """The gzip engines a device speaking `version` takes."""
    return ENGINES if version >= 6 else (ZLIB_MEM8, ZLIB_MEM9) if version >= 5 else ()


def target_ids(new: ImageIndex, item: AnyDeltaItem) -> list[bytes]:
    """The chunk ids an item delivers."""
    ids = []
    for layer, headers, first, count in item_spans(item):
        chunks = new.layers[layer].chunk_list(headers)
        ids += [chunks.id_at(i) for i in range(first, first + count)]
    return ids
