"""The SQLite file of one of the server's caches beside its store: a connection per thread (sqlite3 connections
must not be shared), WAL so readers never wait for the writer, created with its schema on first use."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from chunkstore.store import PAGE_CACHE_KIB


class CacheDB:
    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self.connection().executescript(schema)

    def connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")  # per thread, as the store's
            self._local.db = db
        return db
