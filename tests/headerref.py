"""The header-delta encoder member by member, as it was before chunkstore/headerdelta.py was vectorised: the
plain reading of docs/PROTOCOL.md "Header deltas" that the tests hold the fast encoder and decoder to."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zstandard

from chunkstore.delta import BLOCK, MAX_DELTA_BYTES, DeltaError, Entry, PathMatcher, header_entries, zstd_encode
from chunkstore.headerdelta import _CHKSUM, _FIELDS, _MTIME, _encode_ops
from chunkstore.varint import varints as _varints
from chunkstore.varint import zigzag as _zigzag


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


def non_padding(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if not e.padding]


def member_blocks(entries: list[Entry]) -> list[int]:
    """Offsets of the member header blocks (each member's last block)."""
    return [e.offset + e.length - BLOCK for e in entries if e.path is not None]


def checksum(block: np.ndarray) -> int:
    return int(block[:148].sum()) + 8 * 32 + int(block[156:].sum())


def canonical(stream: np.ndarray, blocks: list[int]) -> list[int] | None:
    """The mtimes of the member blocks, if every block holds them as `%011o\\0` and the checksum as `%06o\\0 `
    of its bytes (GNU tar, Go, Python all write that); None otherwise (then the fields stay in the residual)."""
    mtimes = []
    for pos in blocks:
        block = stream[pos:pos + BLOCK]
        raw = block.tobytes()
        field = raw[_MTIME]
        if len(field) != 12 or field[11] != 0 or not field[:11].isdigit() or b"8" in field or b"9" in field:
            return None
        if raw[_CHKSUM] != b"%06o\0 " % checksum(block) or not block[:136].any() and not block[156:].any():
            return None
        mtimes.append(int(field[:11], 8))
    return mtimes


def zero_fields(stream: np.ndarray, blocks: list[int]) -> None:
    for pos in blocks:
        stream[pos + _FIELDS.start:pos + _FIELDS.stop] = 0


# --- ops: the new stream's non-padding bytes as copies of old members and literals ----------------------------

def plan_ops(new: list[Entry], old: list[Entry]) -> list[tuple[int, int]]:
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


def placed_bases(ops: list[tuple[int, int]], old_members: list[Entry], sources: list[np.ndarray], size: int,
          spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """The bytes each new byte is added to, from each of `sources` (old streams), zeros at paddings and literals."""
    outs = [np.zeros(size, dtype=np.uint8) for _ in sources]
    regions = region_list(size, spans)
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


def region_list(size: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    regions, pos = [], 0
    for offset, length in spans:
        if offset > pos:
            regions.append((pos, offset))
        pos = offset + length
    if size > pos:
        regions.append((pos, size))
    return regions


# --- mtimes -----------------------------------------------------------------------------------------------------

def guess(mode: int, base: int | None, previous: int, shift: int) -> int:
    """An mtime's prediction: mode 0 the old member's, 1 the previous new member's, 2 the old member's plus the
    last shift seen (so a uniform shift costs nothing); the previous new member's when there is no old one."""
    if mode == 1 or base is None:
        return previous
    return base if mode == 0 else base + shift


def encode_mtimes(values: list[int], bases: list[int | None], level: int) -> tuple[int, bytes]:
    best: tuple[int, bytes] | None = None
    for mode in (0, 1, 2):
        diffs, previous, shift = [], 0, 0
        for value, base in zip(values, bases):
            diffs.append(_zigzag(value - guess(mode, base, previous, shift)))
            previous = value
            if base is not None:
                shift = value - base
        data = zstandard.ZstdCompressor(level=level).compress(_varints(diffs))
        if best is None or len(data) < len(best[1]):
            best = (mode, data)
    assert best is not None
    return best


def base_mtimes(base_raw: np.ndarray, blocks: list[int], copied: np.ndarray) -> list[int | None]:
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

def reference_encode(new: bytes, new_runs: Sequence[int], old: bytes, old_runs: Sequence[int], level: int = 9) -> dict:
    """The header delta of `new` against `old` (each a layer's whole header stream with its index runs)."""
    if len(new) > MAX_DELTA_BYTES or len(old) > MAX_DELTA_BYTES:
        raise DeltaError("header stream over the delta size limit")
    new_entries, old_entries = header_entries(new, new_runs), header_entries(old, old_runs)
    old_members = non_padding(old_entries)
    ops = plan_ops(non_padding(new_entries), old_members)
    spans = padding_spans(new_runs)
    old_arr = np.frombuffer(old, dtype=np.uint8)
    new_arr = np.frombuffer(new, dtype=np.uint8).copy()
    blocks = member_blocks(new_entries)
    mtimes = canonical(new_arr, blocks)
    old_zeroed = old_arr.copy()
    zero_fields(old_zeroed, member_blocks(old_entries))
    ones = np.ones(len(old), dtype=np.uint8)
    base, base_raw, copied = placed_bases(ops, old_members, [old_zeroed, old_arr, ones], len(new), spans)
    out: dict = {"ops": zstandard.ZstdCompressor(level=19).compress(_encode_ops(ops)), "fields": 0}
    if mtimes is not None:
        zero_fields(new_arr, blocks)
        out["fields"] = 1
        out["mtime_mode"], out["mtimes"] = encode_mtimes(mtimes, base_mtimes(base_raw, blocks, copied), 19)
    else:
        base = base_raw  # fields stay in the residual, against the old member's own
    out["residual"] = zstd_encode((new_arr - base).tobytes(), b"", level)  # no dictionary, as the server
    return out
