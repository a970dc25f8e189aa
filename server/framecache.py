"""The server's cache of whole-segment CHUNKS frames (segments.py), in a SQLite file beside the store: each is
compressed once and sent to every later device as stored. Bounded: past `max_bytes` the least recently sent go."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from chunkstore.index import chunk_id

from .cachedb import CacheDB

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    key BLOB PRIMARY KEY,       -- frame_key(): the segment's ids, the level and the frame format
    digest BLOB NOT NULL,       -- BLAKE3 of `frame`, checked on every read: a damaged row is dropped, not sent
    frame BLOB NOT NULL,        -- the whole encoded CHUNKS frame (chunkstore/wire.py encode_chunks)
    bytes INTEGER NOT NULL,
    used REAL NOT NULL          -- when it was last stored or sent (time.time())
);
CREATE INDEX IF NOT EXISTS frames_used ON frames (used);
"""
FORMAT = b"chunks-frame-1"  # part of every key: a change of the frame encoding leaves old rows unused


def frame_key(ids: list[bytes], level: int) -> bytes:
    return chunk_id(FORMAT + bytes([level]) + b"".join(ids))


class FrameCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self._file = CacheDB(directory / "frames.db", _SCHEMA)
        self.path = self._file.path
        self.max_bytes = max_bytes

    def _db(self) -> sqlite3.Connection:
        return self._file.connection()

    def get(self, key: bytes) -> bytes | None:
        db = self._db()
        row = db.execute("SELECT digest, frame FROM frames WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if chunk_id(row[1]) != row[0]:
            db.execute("DELETE FROM frames WHERE key = ?", (key,))
            return None
        db.execute("UPDATE frames SET used = ? WHERE key = ?", (time.time(), key))
        return row[1]

    def put(self, key: bytes, frame: bytes) -> None:
        """Stores a frame, then drops the least recently used ones while the cache is over its size."""
        if len(frame) > self.max_bytes:
            return
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO frames VALUES (?, ?, ?, ?, ?)",
                       (key, chunk_id(frame), frame, len(frame), time.time()))
            total = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM frames").fetchone()[0]
            if total > self.max_bytes:
                for old, size in db.execute("SELECT key, bytes FROM frames ORDER BY used").fetchall():
                    db.execute("DELETE FROM frames WHERE key = ?", (old,))
                    total -= size
                    if total <= self.max_bytes:
                        break
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def total_bytes(self) -> int:
        return self._db().execute("SELECT COALESCE(SUM(bytes), 0) FROM frames").fetchone()[0]
