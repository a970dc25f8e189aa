"""The server's cache of computed deltas per (old manifest digest, new manifest digest): the index delta and every
DELTA item, in a SQLite file beside the store, so a fleet moving from N to N+1 costs one computation."""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chunkstore.wire import DeltaItem

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    old TEXT NOT NULL, new TEXT NOT NULL,   -- manifest digests
    index_delta BLOB NOT NULL,              -- msgpack {size, data} (chunkstore/indexdelta.py)
    items INTEGER NOT NULL, bytes INTEGER NOT NULL, seconds REAL NOT NULL, added REAL NOT NULL,
    PRIMARY KEY (old, new)
);
CREATE TABLE IF NOT EXISTS items (
    old TEXT NOT NULL, new TEXT NOT NULL, seq INTEGER NOT NULL,
    kind INTEGER NOT NULL, layer INTEGER NOT NULL, first INTEGER NOT NULL, count INTEGER NOT NULL,
    base_layer INTEGER NOT NULL, base_first INTEGER NOT NULL, base_count INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (old, new, seq)
);
"""
_BATCH_BYTES = 8 << 20


@dataclass(frozen=True)
class CachedPair:
    index_delta: bytes
    items: int
    bytes: int
    seconds: float


class DeltaCache:
    """A pair's row in `pairs` is written last, in the transaction of its last items: a pair is there whole or not
    at all, and items left by a process killed mid-way are replaced on the next computation."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "deltas.db"
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def get(self, old: str, new: str) -> CachedPair | None:
        row = self._db().execute("SELECT index_delta, items, bytes, seconds FROM pairs WHERE old = ? AND new = ?",
                                 (old, new)).fetchone()
        return CachedPair(*row) if row else None

    def targets(self, old: str, new: str) -> list[DeltaItem]:
        """The pair's items without their data (what each delivers), in order."""
        rows = self._db().execute("SELECT kind, layer, first, count, base_layer, base_first, base_count FROM items "
                                  "WHERE old = ? AND new = ? ORDER BY seq", (old, new))
        return [DeltaItem(*row, data=b"") for row in rows]

    def items(self, old: str, new: str, seqs: Iterable[int]) -> Iterator[DeltaItem]:
        """The items numbered `seqs` (positions in `targets`), read one at a time."""
        db = self._db()
        for seq in seqs:
            row = db.execute("SELECT kind, layer, first, count, base_layer, base_first, base_count, data FROM items "
                             "WHERE old = ? AND new = ? AND seq = ?", (old, new, seq)).fetchone()
            if row is None:
                raise KeyError(f"delta item {seq} of {old} -> {new} is gone from the cache")
            yield DeltaItem(*row)

    def put(self, old: str, new: str, index_delta: bytes, items: Iterable[DeltaItem], started: float) -> CachedPair:
        """Stores a pair's items as they are computed (batched), then the pair itself."""
        db = self._db()
        db.execute("DELETE FROM items WHERE old = ? AND new = ?", (old, new))
        batch: list[tuple] = []
        pending = count = total = 0
        for seq, item in enumerate(items):
            batch.append((old, new, seq, *item.to_obj()))
            pending += len(item.data)
            count, total = count + 1, total + len(item.data)
            if pending >= _BATCH_BYTES:
                self._insert(db, batch)
                batch, pending = [], 0
        seconds = time.monotonic() - started
        self._insert(db, batch, (old, new, index_delta, count, total, seconds, time.time()))
        return CachedPair(index_delta, count, total, seconds)

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[tuple], pair: tuple | None = None) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if pair is not None:
                db.execute("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?)", pair)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
