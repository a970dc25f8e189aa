"""A layer's tar header stream encoded against the device's old header stream (docs/PROTOCOL.md, "Header
deltas"): members copied from the old member of the same path, a bytewise residual, and mtimes and
checksums sent as numbers, so a rebuild that only changes mtimes costs next to nothing. Pure."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zstandard

from .delta import BLOCK, MAX_DELTA_BYTES, DeltaError, Entry, PathMatcher, header_entries, zstd_decode, zstd_encode
from .varint import read_varints as _read_varints
from .varint import unzigzag as _unzigzag
from .varint import varints as _varints
from .varint import zigzag as _zigzag

_MTIME = slice(136, 148)
_CHKSUM = slice(148, 156)
_FIELDS = slice(136, 156)   # mtime and checksum: zeroed in both streams before the residual is taken
MAX_OPS = 1 << 24


def padding_spans(runs: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, length) of the zeros that pad each file's content, which start a run's header part."""
    spans, offset, previous = [], 0, 0
    for run in range(len(runs) // 2):
        padding = min(-previous % BLOCK, runs[2 * run])
        if padding:
            spans.append((offset, padding))
        offset += runs[2 * run]
        previous = runs[2 * run + 1]
    return spans


def _members(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if not e.padding]


def _blocks(entries: list[Entry]) -> list[int]:
    """Offsets of the member header blocks (each member's last block)."""
    return [e.offset + e.length - BLOCK for e in entries if e.path is not None]


def _checksum(block: np.ndarray) -> int:
    return int(block[:148].sum()) + 8 * 32 + int(block[156:].sum())


def _canonical(stream: np.ndarray, blocks: list[int]) -> list[int] | None:
    """The mtimes of the member blocks, if every block holds them as `%011o\\0` and the checksum as `%06o\\0 `
    of its bytes (GNU tar, Go, Python all write that); None otherwise (then the fields stay in the residual)."""
    mtimes = []
    for pos in blocks:
        block = stream[pos:pos + BLOCK]
        raw = block.tobytes()
        field = raw[_MTIME]
        if len(field) != 12 or field[11] != 0 or not field[:11].isdigit() or b"8" in field or b"9" in field:
            return None
        if raw[_CHKSUM] != b"%06o\0 " % _checksum(block) or not block[:136].any() and not block[156:].any():
            return None
        mtimes.append(int(field[:11], 8))
    return mtimes


def _zero_fields(stream: np.ndarray, blocks: list[int]) -> None:
    for pos in blocks:
        stream[pos + _FIELDS.start:pos + _FIELDS.stop] = 0


# --- ops: the new stream's non-padding bytes as copies of old members and literals ----------------------------

def _plan_ops(new: list[Entry], old: list[Entry]) -> list[tuple[int, int]]:
    """[(count, start)]: `count` old members from index `start`, or (length, -1): `length` literal bytes."""
    matcher = PathMatcher((e.path, i) for i, e in enumerate(old) if e.path is not None)
    ops: list[tuple[int, int]] = []
    for entry in new:
        j = matcher.find(entry.path) if entry.path is not None else (len(old) - 1 if entry is new[-1] else None)
        if isinstance(j, int) and 0 <= j < len(old) and old[j].length == entry.length:
            if ops and ops[-1][1] >= 0 and ops[-1][1] + ops[-1][0] == j:
                ops[-1] = (ops[-1][0] + 1, ops[-1][1])
            else:
                ops.append((1, j))
        elif ops and ops[-1][1] < 0:
            ops[-1] = (ops[-1][0] + entry.length, -1)
        else:
            ops.append((entry.length, -1))
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


def _base(ops: list[tuple[int, int]], old_members: list[Entry], sources: list[np.ndarray], size: int,
          spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """The bytes each new byte is added to, from each of `sources` (old streams), zeros at paddings and literals."""
    outs = [np.zeros(size, dtype=np.uint8) for _ in sources]
    regions = _regions(size, spans)
    region, filled = 0, 0  # position inside the non-padding regions

    def place(pieces: list[np.ndarray], length: int) -> None:
        nonlocal region, filled
        while length:
            if region >= len(regions):
                raise DeltaError("header delta: ops cover more bytes than the stream has")
            start, end = regions[region]
            take = min(length, end - start - filled)
            at = start + filled
            if pieces[0] is not None:
                for out, piece in zip(outs, pieces):
                    out[at:at + take] = piece[:take]
                pieces = [p[take:] for p in pieces]
            filled += take
            length -= take
            if filled == end - start:
                region, filled = region + 1, 0

    for count, start in ops:
        if start < 0:
            place([None] * len(sources), count)  # type: ignore[list-item]
            continue
        for member in old_members[start:start + count]:  # old paddings between them are skipped
            lo, hi = member.offset, member.offset + member.length
            place([src[lo:hi] for src in sources], hi - lo)
    if region != len(regions):
        raise DeltaError("header delta: ops cover fewer bytes than the stream has")
    return outs


def _regions(size: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    regions, pos = [], 0
    for offset, length in spans:
        if offset > pos:
            regions.append((pos, offset))
        pos = offset + length
    if size > pos:
        regions.append((pos, size))
    return regions


# --- mtimes -----------------------------------------------------------------------------------------------------

def _guess(mode: int, base: int | None, previous: int, shift: int) -> int:
    """An mtime's prediction: mode 0 the old member's, 1 the previous new member's, 2 the old member's plus the
    last shift seen (so a uniform shift costs nothing); the previous new member's when there is no old one."""
    if mode == 1 or base is None:
        return previous
    return base if mode == 0 else base + shift


def _encode_mtimes(values: list[int], bases: list[int | None], level: int) -> tuple[int, bytes]:
    best: tuple[int, bytes] | None = None
    for mode in (0, 1, 2):
        diffs, previous, shift = [], 0, 0
        for value, base in zip(values, bases):
            diffs.append(_zigzag(value - _guess(mode, base, previous, shift)))
            previous = value
            if base is not None:
                shift = value - base
        data = zstandard.ZstdCompressor(level=level).compress(_varints(diffs))
        if best is None or len(data) < len(best[1]):
            best = (mode, data)
    assert best is not None
    return best


def _decode_mtimes(mode: int, data: bytes, bases: list[int | None]) -> list[int]:
    if mode not in (0, 1, 2):
        raise DeltaError(f"header delta: unknown mtime mode {mode}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=10 * len(bases) + 16)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"header delta: mtimes do not decode: {exc}") from None
    diffs = _read_varints(raw)
    if len(diffs) != len(bases):
        raise DeltaError(f"header delta: {len(diffs)} mtimes for {len(bases)} members")
    values, previous, shift = [], 0, 0
    for diff, base in zip(diffs, bases):
        value = _guess(mode, base, previous, shift) + _unzigzag(diff)
        if not 0 <= value < 8 ** 11:
            raise DeltaError("header delta: an mtime out of range")
        values.append(value)
        previous = value
        if base is not None:
            shift = value - base
    return values


def _base_mtimes(base_raw: np.ndarray, blocks: list[int], copied: np.ndarray) -> list[int | None]:
    out: list[int | None] = []
    for pos in blocks:
        if not copied[pos]:
            out.append(None)
            continue
        field = base_raw[pos + _MTIME.start:pos + _MTIME.stop].tobytes().split(b"\0", 1)[0].strip()
        try:
            out.append(int(field, 8) if field else 0)
        except ValueError:
            out.append(None)
    return out


# --- the codec --------------------------------------------------------------------------------------------------

def encode_headers(new: bytes, new_runs: Sequence[int], old: bytes, old_runs: Sequence[int], level: int = 9) -> dict:
    """The header delta of `new` against `old` (each a layer's whole header stream with its index runs)."""
    if len(new) > MAX_DELTA_BYTES or len(old) > MAX_DELTA_BYTES:
        raise DeltaError("header stream over the delta size limit")
    new_entries, old_entries = header_entries(new, new_runs), header_entries(old, old_runs)
    old_members = _members(old_entries)
    ops = _plan_ops(_members(new_entries), old_members)
    spans = padding_spans(new_runs)
    old_arr = np.frombuffer(old, dtype=np.uint8)
    new_arr = np.frombuffer(new, dtype=np.uint8).copy()
    blocks = _blocks(new_entries)
    mtimes = _canonical(new_arr, blocks)
    old_zeroed = old_arr.copy()
    _zero_fields(old_zeroed, _blocks(old_entries))
    ones = np.ones(len(old), dtype=np.uint8)
    base, base_raw, copied = _base(ops, old_members, [old_zeroed, old_arr, ones], len(new), spans)
    out: dict = {"ops": zstandard.ZstdCompressor(level=19).compress(_encode_ops(ops)), "fields": 0}
    if mtimes is not None:
        _zero_fields(new_arr, blocks)
        out["fields"] = 1
        out["mtime_mode"], out["mtimes"] = _encode_mtimes(mtimes, _base_mtimes(base_raw, blocks, copied), 19)
    else:
        base = base_raw  # fields stay in the residual, against the old member's own
    out["residual"] = zstd_encode((new_arr - base).tobytes(), old, level)
    return out


def decode_headers(delta: dict, size: int, new_runs: Sequence[int], old: bytes, old_runs: Sequence[int]) -> bytes:
    """The new header stream (`size` bytes); DeltaError if the delta is malformed. Verify it by its chunk ids."""
    ops_data, residual, fields = delta.get("ops"), delta.get("residual"), delta.get("fields")
    if not (isinstance(ops_data, bytes) and isinstance(residual, bytes) and fields in (0, 1)):
        raise DeltaError("header delta needs ops, residual and fields 0 or 1")
    if size > MAX_DELTA_BYTES or len(old) > MAX_DELTA_BYTES:
        raise DeltaError("header stream over the delta size limit")
    old_entries = header_entries(old, old_runs)
    old_members = _members(old_entries)
    try:
        # Each op covers at least one byte and takes at most 20 bytes of varints.
        ops_raw = zstandard.ZstdDecompressor().decompress(ops_data, max_output_size=20 * size + 64)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"header delta: ops do not decode: {exc}") from None
    ops = _decode_ops(ops_raw, len(old_members))
    old_arr = np.frombuffer(old, dtype=np.uint8)
    if fields:
        old_zeroed = old_arr.copy()
        _zero_fields(old_zeroed, _blocks(old_entries))
        ones = np.ones(len(old), dtype=np.uint8)
        base, base_raw, copied = _base(ops, old_members, [old_zeroed, old_arr, ones], size, padding_spans(new_runs))
    else:
        (base,) = _base(ops, old_members, [old_arr], size, padding_spans(new_runs))
    out = np.frombuffer(zstd_decode(residual, old, size), dtype=np.uint8) + base
    if fields:
        blocks = _blocks(header_entries(out.tobytes(), new_runs))
        mode, data = delta.get("mtime_mode"), delta.get("mtimes")
        if not isinstance(mode, int) or not isinstance(data, bytes):
            raise DeltaError("header delta: mtime_mode and mtimes missing")
        for pos, mtime in zip(blocks, _decode_mtimes(mode, data, _base_mtimes(base_raw, blocks, copied))):
            out[pos + _MTIME.start:pos + _MTIME.stop] = np.frombuffer(b"%011o\0" % mtime, dtype=np.uint8)
            out[pos + _CHKSUM.start:pos + _CHKSUM.stop] = 32
            out[pos + _CHKSUM.start:pos + _CHKSUM.stop] = np.frombuffer(
                b"%06o\0 " % _checksum(out[pos:pos + BLOCK]), dtype=np.uint8)
    return out.tobytes()
