"""The server's cache of computed deltas per (old manifest digest, new manifest digest, protocol version of the
encoding): the index delta and every DELTA item, in a SQLite file beside the store, so a fleet moving from N to N+1
costs one computation (per protocol version its devices speak)."""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from chunkstore.wire import AnyDeltaItem, decode_item

from .cachedb import CacheDB

_SCHEMA = """
DROP TABLE IF EXISTS pairs;                 -- the layout before version 3 (a cache: recomputed on demand)
DROP TABLE IF EXISTS items;
DROP TABLE IF EXISTS delta_pairs;           -- the layout before version 7
CREATE TABLE IF NOT EXISTS pair_deltas (
    old TEXT NOT NULL, new TEXT NOT NULL,   -- manifest digests
    version INTEGER NOT NULL,               -- the protocol version the items are encoded for (2: no group items)
    index_delta BLOB NOT NULL,              -- msgpack {size, data} (chunkstore/indexdelta.py); version 7: empty
                                            -- until a device needs it (one that does not get every item)
    implied_index_delta BLOB NOT NULL,      -- version 7: the same with the items' chunks as placeholders; else empty
    items INTEGER NOT NULL, bytes INTEGER NOT NULL, seconds REAL NOT NULL, added REAL NOT NULL,
    PRIMARY KEY (old, new, version)
);
CREATE TABLE IF NOT EXISTS delta_items (
    old TEXT NOT NULL, new TEXT NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL,
    shape BLOB NOT NULL,                    -- the item as on the wire (msgpack), its data empty: what it delivers
    data BLOB NOT NULL,
    PRIMARY KEY (old, new, version, seq)
);
"""
_BATCH_BYTES = 8 << 20


@dataclass(frozen=True)
class CachedPair:
    index_delta: bytes
    implied_index_delta: bytes  # for a device that gets every item (version 7; else b"")
    items: int
    bytes: int
    seconds: float


class DeltaCache:
    """A pair's row in `pair_deltas` is written last, in the transaction of its last items: a pair is there whole
    or not at all, and items left by a process killed mid-way are replaced on the next computation."""

    def __init__(self, directory: Path) -> None:
        self._file = CacheDB(directory / "deltas.db", _SCHEMA)
        self.path = self._file.path

    def _db(self) -> sqlite3.Connection:
        return self._file.connection()

    def get(self, old: str, new: str, version: int) -> CachedPair | None:
        row = self._db().execute("SELECT index_delta, implied_index_delta, items, bytes, seconds FROM pair_deltas WHERE old = ? AND new = ? "
                                 "AND version = ?", (old, new, version)).fetchone()
        return CachedPair(*row) if row else None

    def targets(self, old: str, new: str, version: int) -> list[AnyDeltaItem]:
        """The pair's items without their data (what each delivers), in order."""
        rows = self._db().execute("SELECT shape FROM delta_items WHERE old = ? AND new = ? AND version = ? "
                                  "ORDER BY seq", (old, new, version))
        return [_item(shape, b"", version) for shape, in rows]

    def items(self, old: str, new: str, version: int, seqs: Iterable[int]) -> Iterator[AnyDeltaItem]:
        """The items numbered `seqs` (positions in `targets`), read one at a time."""
        db = self._db()
        for seq in seqs:
            row = db.execute("SELECT shape, data FROM delta_items WHERE old = ? AND new = ? AND version = ? "
                             "AND seq = ?", (old, new, version, seq)).fetchone()
            if row is None:
                raise KeyError(f"delta item {seq} of {old} -> {new} is gone from the cache")
            yield _item(*row, version)

    def put(self, old: str, new: str, version: int, items: Iterable[AnyDeltaItem],
            index_deltas: Callable[[], tuple[bytes, bytes]], started: float) -> CachedPair:
        """Stores a pair's items as they are computed (batched), then the pair itself with its index deltas (asked
        for once the items are done: the implied one names what they rebuild)."""
        db = self._db()
        db.execute("DELETE FROM delta_items WHERE old = ? AND new = ? AND version = ?", (old, new, version))
        batch: list[tuple] = []
        pending = count = total = 0
        for seq, item in enumerate(items):
            shape = item.to_obj()
            shape[-1] = b""
            batch.append((old, new, version, seq, msgpack.packb(shape, use_bin_type=True), item.data))
            pending += len(item.data)
            count, total = count + 1, total + len(item.data)
            if pending >= _BATCH_BYTES:
                self._insert(db, batch)
                batch, pending = [], 0
        index_delta, implied = index_deltas()
        seconds = time.monotonic() - started
        self._insert(db, batch, (old, new, version, index_delta, implied, count, total, seconds, time.time()))
        return CachedPair(index_delta, implied, count, total, seconds)

    def set_index_delta(self, old: str, new: str, version: int, index_delta: bytes) -> None:
        """The pair's index delta with every id, computed later than its items (version 7)."""
        self._db().execute("UPDATE pair_deltas SET index_delta = ? WHERE old = ? AND new = ? AND version = ?",
                           (index_delta, old, new, version))

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[tuple], pair: tuple | None = None) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO delta_items VALUES (?, ?, ?, ?, ?, ?)", rows)
            if pair is not None:
                db.execute("INSERT OR REPLACE INTO pair_deltas VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", pair)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _item(shape: bytes, data: bytes, version: int) -> AnyDeltaItem:
    obj = msgpack.unpackb(shape, raw=False)
    obj[-1] = data
    return decode_item(obj, version)
