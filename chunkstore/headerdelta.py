"""A layer's tar header stream encoded against the device's old header stream (docs/PROTOCOL.md, "Header
deltas"): members copied from the old member of the same path, a bytewise residual, and mtimes and
checksums sent as numbers, so a rebuild that only changes mtimes costs next to nothing. Pure."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zstandard

from .delta import BLOCK, MAX_DELTA_BYTES, DeltaError, PathMatcher, zstd_decode, zstd_encode
from .headerlayout import Layout, Members, Regions, layout, members, regions
from .varint import read_varints as _read_varints
from .varint import unzigzag as _unzigzag
from .varint import varints as _varints
from .varint import zigzag as _zigzag

_MTIME = slice(136, 148)
_CHKSUM = slice(148, 156)
_FIELDS = slice(136, 156)   # mtime and checksum: zeroed in both streams before the residual is taken
MAX_OPS = 1 << 24
_CANONICAL_ROWS = 4096  # member blocks checked at a time: 2 MiB of rows
# The residual's zstd hash table at 2**20 entries (level 9 takes 2**21 over 256 KiB of target): the same bytes on the
# bench pairs (header items: node 1,122 B, python 3,855, debian 2,371, debian-mtime 247, debian-reorder 8,060), the
# zstd call's own peak 25.8 -> 15.3 MB on the debian pairs (node 24.0 -> 13.5, python 22.0 -> 11.5), CPU the same.
# 2**19 costs debian-reorder 6 bytes.
RESIDUAL_HASH_LOG = 20


def _canonical(stream: np.ndarray, blocks: np.ndarray) -> np.ndarray | None:
    """The mtimes of the member blocks, if every block holds them as `%011o\\0` and the checksum as `%06o\\0 ` of
    its bytes (GNU tar, Go, Python all write that) and is not zeros outside them; None otherwise (then the fields
    stay in the residual). _CANONICAL_ROWS blocks at a time: a copy of all of them is nearly the stream's size."""
    parts = [np.zeros(0, dtype=np.int64)]
    for first in range(0, len(blocks), _CANONICAL_ROWS):
        rows = _rows(stream, blocks[first:first + _CANONICAL_ROWS])
        mtime, checksum = rows[:, _MTIME], rows[:, _CHKSUM]
        octal = ((mtime[:, :11] >= ord("0")).all(axis=1) & (mtime[:, :11] <= ord("7")).all(axis=1)
                 & (mtime[:, 11] == 0))
        octal &= ((checksum[:, :6] >= ord("0")) & (checksum[:, :6] <= ord("7"))).all(axis=1)
        octal &= (checksum[:, 6] == 0) & (checksum[:, 7] == ord(" "))
        sums = rows.sum(axis=1, dtype=np.int64) - checksum.sum(axis=1, dtype=np.int64) + 8 * 32
        written = (checksum[:, :6].astype(np.int64) - ord("0")) @ _POWERS[-6:]
        rest = rows[:, :_MTIME.start].any(axis=1) | rows[:, _CHKSUM.stop:].any(axis=1)
        if not (octal & (written == sums) & rest).all():
            return None
        parts.append((mtime[:, :11].astype(np.int64) - ord("0")) @ _POWERS)
    return np.concatenate(parts)


# --- ops: the new stream's non-padding bytes as copies of old members and literals ----------------------------

def _plan_ops(new: Members, old: Members) -> list[tuple[int, int]]:
    """[(count, start)]: `count` old members from index `start`, or (length, -1): `length` literal bytes."""
    matcher = PathMatcher((path, i) for i, path in enumerate(old.paths) if path is not None)
    old_lengths = old.layout.lengths.tolist()
    last = len(new.paths) - 1
    ops: list[tuple[int, int]] = []
    for k, (path, length) in enumerate(zip(new.paths, new.layout.lengths.tolist())):
        # An entry without a path is matched only at the very end: the end-of-archive blocks.
        j = matcher.find(path) if path is not None else (len(old_lengths) - 1 if k == last else None)
        if isinstance(j, int) and 0 <= j < len(old_lengths) and old_lengths[j] == length:
            if ops and ops[-1][1] >= 0 and ops[-1][1] + ops[-1][0] == j:
                ops[-1] = (ops[-1][0] + 1, ops[-1][1])
            else:
                ops.append((1, j))
        elif ops and ops[-1][1] < 0:
            ops[-1] = (ops[-1][0] + length, -1)
        else:
            ops.append((length, -1))
    return ops


def _encode_ops(ops: list[tuple[int, int]]) -> bytes:
    values, expected = [], 0
    for count, start in ops:
        if start < 0:
            values.append(count << 1 | 1)
        else:
            values += [count << 1, _zigzag(start - expected)]
            expected = start + count
    return _varints(values)


def _decode_ops(data: bytes, old: int) -> list[tuple[int, int]]:
    values = _read_varints(data)
    ops, i, expected = [], 0, 0
    while i < len(values):
        head = values[i]
        if head & 1:
            ops.append((head >> 1, -1))
            i += 1
            continue
        if i + 1 >= len(values):
            raise DeltaError("header delta: a copy without its start")
        count, start = head >> 1, expected + _unzigzag(values[i + 1])
        if count == 0 or start < 0 or start + count > old:
            raise DeltaError("header delta: a copy of members the old stream does not have")
        ops.append((count, start))
        expected = start + count
        i += 2
        if len(ops) > MAX_OPS:
            raise DeltaError("header delta: too many ops")
    return ops


# --- mtimes -----------------------------------------------------------------------------------------------------

def _predictions(values: np.ndarray, bases: np.ndarray) -> list[np.ndarray]:
    """Each mode's prediction of every mtime (docs/PROTOCOL.md): 0 the base mtime, 1 the previous member's, 2 the
    base mtime plus the last (mtime - base mtime) seen before; the previous member's where there is no base."""
    previous = np.zeros(len(values), dtype=np.int64)
    previous[1:] = values[:-1]
    has = bases != _NONE
    base = np.where(has, bases, 0)
    last = np.maximum.accumulate(np.where(has, np.arange(len(values)), -1)) if len(values) else previous
    before = np.full(len(values), -1)
    before[1:] = last[:-1]
    shift = np.where(before >= 0, (values - base)[before], 0)
    return [np.where(has, base, previous), previous, np.where(has, base + shift, previous)]


def _encode_mtimes(values: np.ndarray, bases: np.ndarray, level: int) -> tuple[int, bytes]:
    """(mode, zstd frame of the zigzag varint differences) for the mode whose frame is smallest (the first on
    ties)."""
    best: tuple[int, bytes] | None = None
    for mode, guess in enumerate(_predictions(values, bases)):
        diff = values - guess
        data = zstandard.ZstdCompressor(level=level).compress(_varints(np.where(diff < 0, -2 * diff - 1, 2 * diff)
                                                                       .tolist()))
        if best is None or len(data) < len(best[1]):
            best = (mode, data)
    assert best is not None
    return best


# --- the codec --------------------------------------------------------------------------------------------------

def encode_headers(new: bytes, new_runs: Sequence[int], old: bytes, old_runs: Sequence[int], level: int = 9,
                   new_members: Members | None = None, old_members: Members | None = None) -> dict:
    """The header delta of `new` against `old` (each a layer's whole header stream with its index runs); pass
    their `headerlayout.members` if they are at hand.

    Works as decode_headers does, in packed coordinates: the ops' output is the old stream's slices, the residual
    the difference to it, the mtimes of the member blocks read at once."""
    if len(new) > MAX_DELTA_BYTES or len(old) > MAX_DELTA_BYTES:
        raise DeltaError("header stream over the delta size limit")
    new_members = new_members or members(new, new_runs)
    old_members = old_members or members(old, old_runs)
    ops = _plan_ops(new_members, old_members)
    copies = _Copies(ops, old_members.layout, new_members.layout.regions)
    old_arr, new_arr = np.frombuffer(old, dtype=np.uint8), np.frombuffer(new, dtype=np.uint8)
    blocks = new_members.layout.blocks()
    mtimes = _canonical(new_arr, blocks)
    out: dict = {"ops": zstandard.ZstdCompressor(level=19).compress(_encode_ops(ops)), "fields": 0}
    # The one stream-sized buffer made here: the residual, new minus the base the ops give, subtracted in place
    # piece by piece from the old stream as it is. A packed copy of the old stream, the base, the new stream with its
    # fields zeroed, the difference and its bytes took the encode's peak on the debian pairs to 47 MB (now 35 at
    # zstd's level 9 tables, 24 with RESIDUAL_HASH_LOG), node 38 (30, 20).
    residual = bytearray(new)
    diff = np.frombuffer(residual, dtype=np.uint8)
    copies.subtract(diff, old_arr)
    if mtimes is not None:
        at = new_members.layout.regions.packed_at(blocks)
        bases = _octals(copies.gather(old_arr, at[:, None] + np.arange(_MTIME.start, _MTIME.stop)))
        bases[~copies.copied(at)] = _NONE
        # The fields count as zeros in both streams: the new stream's come out of the residual, and the old
        # stream's the ops copied go back in (mostly onto the new member blocks' own). A block lies in one region.
        span = np.arange(_FIELDS.start, _FIELDS.stop)
        fields = blocks[:, None] + span
        diff[fields] -= new_arr[fields]
        old_blocks = old_members.layout.blocks()
        to, copied = copies.placed(old_members.layout.regions.packed_at(old_blocks))
        diff[to[:, None] + span] += old_arr[old_blocks[copied, None] + span]
        out["fields"] = 1
        out["mtime_mode"], out["mtimes"] = _encode_mtimes(mtimes, bases, 19)
    # Without the old stream as dictionary: the residual is nearly all zeros (nonzero bytes on the bench pairs: 0 to
    # 4,685 in 1-5 MB), which the dictionary barely helps (debian-mtime +0 B, debian-reorder +10, debian +39, node
    # +97, python +321) while loading it cost the debian pairs 0.035 s of CPU against 0.009 and 14.6 MB of peak
    # against 5. The device still decodes with the old stream as dictionary: the frames of either kind decode so.
    out["residual"] = zstd_encode(residual, b"", level, max_hash_log=RESIDUAL_HASH_LOG)
    return out


def decode_headers(delta: dict, size: int, new_runs: Sequence[int], old: bytes, old_runs: Sequence[int]) -> bytearray:
    """The new header stream (`size` bytes, a fresh buffer); DeltaError if the delta is malformed. Verify it by its
    chunk ids.

    Works in packed coordinates (the streams without their padding spans), where every copy op is one slice of the
    old stream and the old members tile it: the cost is per byte and per op, not per member.
    """
    ops_data, residual, fields = delta.get("ops"), delta.get("residual"), delta.get("fields")
    if not (isinstance(ops_data, bytes) and isinstance(residual, bytes) and fields in (0, 1)):
        raise DeltaError("header delta needs ops, residual and fields 0 or 1")
    if size > MAX_DELTA_BYTES or len(old) > MAX_DELTA_BYTES:
        raise DeltaError("header stream over the delta size limit")
    old_arr = np.frombuffer(old, dtype=np.uint8)
    old_layout = layout(old_arr, old_runs)
    new_regions = regions(new_runs, size)
    try:
        # Each op covers at least one byte and takes at most 20 bytes of varints.
        ops_raw = zstandard.ZstdDecompressor().decompress(ops_data, max_output_size=20 * size + 64)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"header delta: ops do not decode: {exc}") from None
    copies = _Copies(_decode_ops(ops_raw, len(old_layout.offsets)), old_layout, new_regions)
    old_packed = _packed(old_arr, old_layout.regions)
    if fields:
        at = old_layout.regions.packed_at(old_layout.blocks())
        old_packed[at[:, None] + np.arange(_FIELDS.start, _FIELDS.stop)] = 0
    stream = copies.fill(old_packed, size)
    out = np.frombuffer(stream, dtype=np.uint8)
    out += np.frombuffer(zstd_decode(residual, old, size), dtype=np.uint8)
    if fields:
        mode, data = delta.get("mtime_mode"), delta.get("mtimes")
        if not isinstance(mode, int) or not isinstance(data, bytes):
            raise DeltaError("header delta: mtime_mode and mtimes missing")
        blocks = layout(out, new_runs).blocks()
        at = new_regions.packed_at(blocks)
        bases = _octals(copies.gather(old_arr, at[:, None] + np.arange(_MTIME.start, _MTIME.stop)))
        bases[~copies.copied(at)] = _NONE
        _write_fields(out, blocks, _decode_mtimes(mode, data, bases))
    return stream


# --- the decoder's parts ----------------------------------------------------------------------------------------

_NONE = np.iinfo(np.int64).min  # "no base mtime" in an int64 array
_MAX_MTIME = 8 ** 11
# A varint number below 2**63 and any mtime field's value below 8**12 (2**36): a difference of 2**40 or more
# always yields an mtime out of range, and below it int64 sums of up to 2**17 members cannot overflow.
_MAX_STEP = 1 << 40


class _Copies:
    """The ops in packed coordinates (both streams without their paddings, where the old members lie end to end):
    op k fills packed new bytes [dst[k], dst[k+1]) from packed old bytes src[k]... (a copy) or with zeros (src[k] =
    -1, a literal)."""

    def __init__(self, ops: list[tuple[int, int]], old: Layout, new: Regions) -> None:
        ends = np.concatenate(([0], np.cumsum(old.lengths)))  # packed offsets of the old entries
        counts, starts = np.array(ops, dtype=np.int64).reshape(-1, 2).T
        copy = starts >= 0
        if len(counts) and counts.max() > new.total:  # also keeps the sums below from wrapping around
            raise DeltaError("header delta: an op longer than the stream")
        first, last = np.where(copy, starts, 0), np.where(copy, starts + counts, 0)  # _decode_ops checked the ranges
        self.src = np.where(copy, ends[first], -1)
        self.dst = np.concatenate(([0], np.cumsum(np.where(copy, ends[last] - ends[first], counts))))
        if self.dst[-1] != new.total:
            raise DeltaError(f"header delta: ops cover {self.dst[-1]} bytes, the stream has {new.total} outside "
                             "paddings")
        self.old, self.new = old.regions, new

    def fill(self, old_packed: np.ndarray, size: int) -> bytearray:
        """The new stream as the ops give it, zeros at literals and paddings. One slice copy per piece, a piece
        being where an op and a new region overlap."""
        out = bytearray(size)
        starts = _union(self.dst[:-1], self.new.packed)
        starts = starts[starts < self.new.total]
        lengths = np.diff(np.append(starts, self.new.total))
        op = self._op(starts)
        src = self.src[op] + starts - self.dst[op]
        copied = self.src[op] >= 0
        view = memoryview(old_packed)
        for to, at, n in zip(self.new.stream_at(starts[copied]).tolist(), src[copied].tolist(),
                             lengths[copied].tolist()):
            out[to:to + n] = view[at:at + n]
        return out

    def subtract(self, out: np.ndarray, old: np.ndarray) -> None:
        """out -= the new stream as fill() gives it, read from the old stream as it is (`old`, with its paddings):
        the pieces are also cut where an old region begins, so each is one slice of it."""
        op, i = self._sources(self.old.packed)
        inner = self.dst[op] + self.old.packed[i] - self.src[op]  # new packed positions where old regions begin
        starts = _union(self.dst[:-1], self.new.packed, inner)
        starts = starts[starts < self.new.total]
        lengths = np.diff(np.append(starts, self.new.total))
        op = self._op(starts)
        copied = self.src[op] >= 0
        src = self.old.stream_at((self.src[op] + starts - self.dst[op])[copied])
        for to, at, n in zip(self.new.stream_at(starts[copied]).tolist(), src.tolist(), lengths[copied].tolist()):
            piece = out[to:to + n]
            piece -= old[at:at + n]

    def placed(self, old_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(new stream positions, indexes i) where the copy ops place the old byte at packed position old_at[i]
        (sorted), once per placing."""
        op, i = self._sources(old_at)
        return self.new.stream_at(self.dst[op] + old_at[i] - self.src[op]), i

    def _sources(self, old_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(op k, index i) for every packed old position old_at[i] (sorted) inside the source of copy op k."""
        copy = np.flatnonzero(self.src >= 0)
        first = np.searchsorted(old_at, self.src[copy])
        count = np.searchsorted(old_at, self.src[copy] + self.dst[copy + 1] - self.dst[copy]) - first
        ends = np.cumsum(count)
        return np.repeat(copy, count), np.arange(ends[-1] if len(ends) else 0) + np.repeat(first + count - ends, count)

    def _op(self, at: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.dst, at, side="right") - 1

    def copied(self, at: np.ndarray) -> np.ndarray:
        """Whether packed new positions `at` were copied from the old stream."""
        return self.src[self._op(at)] >= 0 if len(self.src) else np.zeros(at.shape, dtype=bool)

    def gather(self, old: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The bytes of the (unpacked) old stream the ops place at packed new positions `at`; zeros at literals."""
        out = np.zeros(at.shape, dtype=np.uint8)
        if len(self.src):
            op = self._op(at)
            copied = self.src[op] >= 0
            out[copied] = old[self.old.stream_at((self.src[op] + at - self.dst[op])[copied])]
        return out


def _union(*arrays: np.ndarray) -> np.ndarray:
    """The sorted distinct values of `arrays`: np.union1d, without np.unique, which imports numpy.ma the first time
    (25 ms of a server's first header delta)."""
    values = np.sort(np.concatenate(arrays))
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def _packed(stream: np.ndarray, where: Regions) -> np.ndarray:
    """The stream without its paddings, writable."""
    out = bytearray(where.total)
    view = memoryview(stream)
    for s, e, p in zip(where.starts.tolist(), where.ends.tolist(), where.packed.tolist()):
        out[p:p + e - s] = view[s:e]
    return np.frombuffer(out, dtype=np.uint8)


_POWERS = 8 ** np.arange(10, -1, -1, dtype=np.int64)


def _octals(fields: np.ndarray) -> np.ndarray:
    """The numbers in 12-byte octal fields (rows), as tar readers parse them; _NONE where a field does not parse.
    Canonical fields (`%011o\\0`) are read at once, any other one by Python's int()."""
    canonical = ((fields[:, :11] >= ord("0")) & (fields[:, :11] <= ord("7"))).all(axis=1) & (fields[:, 11] == 0)
    out = (fields[:, :11].astype(np.int64) - ord("0")) @ _POWERS
    for row in np.flatnonzero(~canonical):
        text = fields[row].tobytes().split(b"\0", 1)[0].strip()
        try:
            out[row] = int(text, 8) if text else 0
        except ValueError:
            out[row] = _NONE
    return out


def _decode_mtimes(mode: int, data: bytes, bases: np.ndarray) -> np.ndarray:
    """The members' mtimes from their differences to the predictions of `mode` (docs/PROTOCOL.md, "Header
    deltas"); `bases` holds _NONE where a member has no base mtime."""
    if mode not in (0, 1, 2):
        raise DeltaError(f"header delta: unknown mtime mode {mode}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=10 * len(bases) + 16)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"header delta: mtimes do not decode: {exc}") from None
    diffs = np.array(_read_varints(raw), dtype=np.int64)
    if len(diffs) != len(bases):
        raise DeltaError(f"header delta: {len(diffs)} mtimes for {len(bases)} members")
    steps = (diffs >> 1) ^ -(diffs & 1)  # unzigzag
    if len(steps) and np.abs(steps).max() >= _MAX_STEP:
        raise DeltaError("header delta: an mtime out of range")
    # Without a base (or in mode 1) a member's mtime is the previous one plus its step; with one (modes 0 and 2) it
    # is set anew. So mtime = (the last set member's mtime - the running sum of steps there) + the running sum.
    anchored = (bases != _NONE) if mode != 1 else np.zeros(len(bases), dtype=bool)
    running = np.cumsum(steps)
    anchors = np.where(anchored, bases, 0) + (steps if mode == 0 else np.cumsum(np.where(anchored, steps, 0)))
    last = np.maximum.accumulate(np.where(anchored, np.arange(len(bases)), -1))
    values = np.where(last >= 0, (anchors - running)[last], 0) + running
    if len(values) and (values.min() < 0 or values.max() >= _MAX_MTIME):
        raise DeltaError("header delta: an mtime out of range")
    return values


def _digits(values: np.ndarray, count: int) -> np.ndarray:
    """Rows of `count` ASCII octal digits, most significant first."""
    return (values[:, None] >> (3 * np.arange(count - 1, -1, -1)) & 7).astype(np.uint8) + ord("0")


def _rows(stream: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """The 512-byte blocks at `blocks`, copied side by side into rows (one C join, no index array of 8 bytes per
    byte)."""
    view = memoryview(stream)
    return np.frombuffer(b"".join([view[b:b + BLOCK] for b in blocks.tolist()]), dtype=np.uint8).reshape(-1, BLOCK)


def _write_fields(out: np.ndarray, blocks: np.ndarray, mtimes: np.ndarray) -> None:
    """Each member block's mtime as `%011o\\0`, then its checksum as `%06o\\0 ` of the block's bytes."""
    mtime = np.zeros((len(blocks), 12), dtype=np.uint8)
    mtime[:, :11] = _digits(mtimes, 11)
    # The blocks copied side by side are summed at C speed; adding the new mtime fields and taking out the old ones
    # and the checksum fields gives the checksums.
    copies = _rows(out, blocks)
    checksums = (copies.sum(axis=1, dtype=np.int64) - copies[:, _FIELDS].sum(axis=1, dtype=np.int64)
                 + mtime.sum(axis=1, dtype=np.int64) + 8 * 32)
    checksum = np.zeros((len(blocks), 8), dtype=np.uint8)
    checksum[:, :6] = _digits(checksums, 6)
    checksum[:, 7] = 32
    out[blocks[:, None] + np.arange(_FIELDS.start, _FIELDS.stop)] = np.concatenate((mtime, checksum), axis=1)
