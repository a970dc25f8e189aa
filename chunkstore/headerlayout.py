"""Where the members of a layer's header stream lie, as `delta.header_entries` finds them, found with numpy: the
per-member work is in C, and Python walks only runs that hold unusual blocks (and names the members, `members`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .delta import BLOCK, DeltaError, _header_name, header_entries

_EXTENDED = np.frombuffer(b"xLgK", dtype=np.uint8)  # blocks followed by data that belongs to the next member
_SIZE = np.arange(124, 136)


@dataclass
class Regions:
    """The non-padding part of each run's header bytes, [starts[i], ends[i]), and where each begins once the
    paddings are cut out of the stream (`packed`, the coordinates of header delta copy ops)."""
    starts: np.ndarray
    ends: np.ndarray
    packed: np.ndarray

    @property
    def total(self) -> int:
        return int(self.packed[-1] + self.ends[-1] - self.starts[-1]) if len(self.starts) else 0

    def packed_at(self, positions: np.ndarray) -> np.ndarray:
        """Packed coordinates of stream positions outside the paddings."""
        region = np.searchsorted(self.starts, positions, side="right") - 1
        return positions - self.starts[region] + self.packed[region]

    def stream_at(self, packed: np.ndarray) -> np.ndarray:
        """Stream positions of packed coordinates below `total`."""
        region = np.searchsorted(self.packed, packed, side="right") - 1
        return packed - self.packed[region] + self.starts[region]


@dataclass
class Layout:
    """A header stream's regions and the entries that tile them in order: a member (its header block last) or
    bytes that do not parse (end-of-archive blocks, what follows them, data that is not tar)."""
    regions: Regions
    offsets: np.ndarray
    lengths: np.ndarray
    members: np.ndarray  # bool per entry

    def blocks(self) -> np.ndarray:
        """Offsets of the member header blocks (each member's last block)."""
        return (self.offsets + self.lengths - BLOCK)[self.members]


def regions(runs: Sequence[int], size: int) -> Regions:
    """Each run's header part minus its padding: the first min((-content_len[i-1]) mod 512, header_len[i]) bytes."""
    n = len(runs) // 2
    if sum(runs[0:2 * n:2]) != size:
        raise DeltaError(f"the runs hold {sum(runs[0:2 * n:2])} header bytes, the header stream {size}")
    pairs = np.asarray(runs, dtype=np.uint64)[:2 * n].reshape(n, 2)
    heads = pairs[:, 0].astype(np.int64)
    ends = np.cumsum(heads)
    padding = np.zeros(n, dtype=np.int64)
    padding[1:] = (-(pairs[:-1, 1] % BLOCK).astype(np.int64)) % BLOCK
    starts = ends - heads + np.minimum(padding, heads)
    packed = np.zeros(n, dtype=np.int64)
    np.cumsum((ends - starts)[:-1], out=packed[1:])
    return Regions(starts, ends, packed)


def layout(stream: np.ndarray, runs: Sequence[int]) -> Layout:
    """The entries of `stream` (uint8) under its runs. A run whose blocks are all plain member headers (size in
    canonical octal `%011o\\0`, so not a zero block; not an extended header) is laid out at once; any other run by
    header_entries. Checksums are not looked at (header_entries does not either)."""
    where = regions(runs, len(stream))
    starts, ends = where.starts, where.ends
    counts = (ends - starts) // BLOCK
    first = np.cumsum(counts) - counts
    grid = np.repeat(starts - BLOCK * first, counts) + BLOCK * np.arange(int(counts.sum()), dtype=np.int64)
    size = stream[grid[:, None] + _SIZE]
    plain = ((size[:, 11] == 0) & ((size[:, :11] >= ord("0")) & (size[:, :11] <= ord("7"))).all(axis=1)
             & ~np.isin(stream[grid + 156], _EXTENDED))
    run_of_block = np.repeat(np.arange(len(starts)), counts)
    unusual = np.zeros(len(starts), dtype=bool)
    unusual[run_of_block[~plain]] = True
    plain_blocks = grid[~unusual[run_of_block]]
    rests = ~unusual & (ends - starts > BLOCK * counts)
    offsets = [plain_blocks, (starts + BLOCK * counts)[rests]]
    lengths = [np.full(len(plain_blocks), BLOCK, dtype=np.int64), (ends - starts - BLOCK * counts)[rests]]
    members = [np.ones(len(plain_blocks), dtype=bool), np.zeros(int(rests.sum()), dtype=bool)]
    for run in np.flatnonzero(unusual):
        start, end = int(starts[run]), int(ends[run])
        entries = header_entries(stream[start:end].tobytes(), (end - start, 0))
        offsets.append(np.array([start + e.offset for e in entries], dtype=np.int64))
        lengths.append(np.array([e.length for e in entries], dtype=np.int64))
        members.append(np.array([e.path is not None for e in entries], dtype=bool))
    all_offsets = np.concatenate(offsets)
    order = np.argsort(all_offsets, kind="stable")
    return Layout(where, all_offsets[order], np.concatenate(lengths)[order], np.concatenate(members)[order])


@dataclass
class Members:
    """A header stream's layout and the path of each of its entries (None for those that are not members): what
    `delta.header_entries` gives without its paddings, parsed once for every use of a pair's deltas."""
    layout: Layout
    paths: list[str | None]

    def run_paths(self, runs: Sequence[int]) -> dict[int, str]:
        """Run index -> path of the file whose content the run holds (the last member in its header part), for the
        runs `(header_len, content_len, ...)` that hold content."""
        # An entry lies in the last region that starts at or before it (an empty region before it starts there too).
        of = np.searchsorted(self.layout.regions.starts, self.layout.offsets, side="right") - 1
        return {run: path for run, path in zip(of.tolist(), self.paths) if path is not None and runs[2 * run + 1]}


def members(stream: bytes, runs: Sequence[int]) -> Members:
    """The entries of a header stream with their paths."""
    found = layout(np.frombuffer(stream, dtype=np.uint8), runs)
    paths: list[str | None] = []
    for offset, length, member in zip(found.offsets.tolist(), found.lengths.tolist(), found.members.tolist()):
        if not member:
            paths.append(None)
        elif length == BLOCK:
            paths.append(_header_name(stream, offset))
        else:  # extended records (PAX, GNU long name) before the header block name the member
            paths.append(header_entries(stream[offset:offset + length], (length, 0))[0].path)
    return Members(found, paths)
