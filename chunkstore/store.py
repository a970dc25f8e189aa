"""The local dedup store of chunks (zstd-compressed, verified on read) and of the images they belong to.

Storage is one SQLite database in WAL mode, chosen over one-file-per-chunk because:
- a transaction makes a write all-or-nothing: a process killed at any instant, or a full disk, leaves
  the previous consistent state, and a half-written chunk is never visible;
- WAL lets several processes read while one writes (writers queue on a busy timeout);
- batching thousands of chunk writes in one transaction is fast, and 64 KiB blobs are read from SQLite
  about as fast as from files (sqlite.org/intern-v-extern-blob.html) without a million inodes;
- listing a million ids for the have-set is one index scan, not a directory walk.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import zstandard

from .compression import DecompressionError, decompress_exact
from .index import ID_SIZE, chunk_id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB NOT NULL UNIQUE,      -- BLAKE3-256 of the uncompressed bytes
    size INTEGER NOT NULL,        -- uncompressed length
    data BLOB NOT NULL            -- zstd frame
);
CREATE TABLE IF NOT EXISTS images (
    repository TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    manifest BLOB,
    config BLOB,
    index_data BLOB NOT NULL,     -- encoded chunk index (docs/FORMAT.md)
    complete INTEGER NOT NULL DEFAULT 0,  -- 1 once every chunk of the index is in the store
    added REAL NOT NULL,
    PRIMARY KEY (repository, manifest_digest)
);
"""
_BATCH = 500
LOCK_FILE = "lock"


def default_store_path() -> Path:
    """Where the store lives unless told: $CHUNKSYNC_STORE, else $XDG_DATA_HOME/chunksync, else
    ~/.local/share/chunksync (the XDG default), so the CLI and the client agree."""
    if os.environ.get("CHUNKSYNC_STORE"):
        return Path(os.environ["CHUNKSYNC_STORE"])
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]) / "chunksync"
    return Path.home() / ".local" / "share" / "chunksync"


class StoreError(Exception):
    pass


class StoreBusy(StoreError):
    """The store lock was not had within the time asked for."""


class CorruptChunk(StoreError):
    def __init__(self, cid: bytes, why: str = "in the store is corrupt (its bytes do not match its id); "
                                              "it was removed, fetch it again"):
        super().__init__(f"chunk {cid.hex()} {why}")
        self.chunk_id = cid


@dataclass
class ImageRecord:
    repository: str
    manifest_digest: str
    manifest: bytes | None
    config: bytes | None
    index_data: bytes
    complete: bool
    added: float


@dataclass
class StoreStats:
    chunks: int
    stored_bytes: int
    uncompressed_bytes: int
    images: int


# SQLite's page cache, per connection, so per thread (a server has dozens): its default of 2 MB, filled with chunk
# pages the OS caches anyway, made the server's RSS grow about 2.5 MB per worker thread that read the store
# (20 threads reading 2,000 chunks each: +61 MB; with 256 KiB: +13 MB; reading the node pair's 3,560 chunks took the
# same CPU either way).
PAGE_CACHE_KIB = 256


class LocalStore:
    """Chunks by id, and image records. Safe to share between threads and processes."""

    def __init__(self, path: str | Path, level: int = 3, read_cache_bytes: int = 0):
        """`level`: zstd level of new chunks (any level reads). `read_cache_bytes`: get_many keeps up to this many
        bytes of chunks it read and checked, per thread, for readers that read the same chunks again."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.db_path = self.path / "store.db"
        self._level = level
        self._read_cache_bytes = read_cache_bytes
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    # One connection, one zstd context and one read cache per thread: none may be shared across threads.
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None, check_same_thread=True)
            # Only takes effect on a new database (before WAL mode writes its header); lets gc hand freed
            # pages back to the file system.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            self._local.db = db
            self._local.cctx = zstandard.ZstdCompressor(level=self._level)
            self._local.dctx = zstandard.ZstdDecompressor()
            self._local.cache = _ReadCache(self._read_cache_bytes)
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @contextmanager
    def lock(self, exclusive: bool = False, wait: float | None = None,
             on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Holds the store lock: shared by whatever stores chunks before an image record names them all (a pull,
        indexing), exclusive by gc, which deletes every chunk no kept record names. Waits up to `wait` seconds
        (None: as long as it takes), calling `on_wait` first if it has to wait; StoreBusy past that.

        flock on `<store>/lock`, not the file's existence: the kernel drops it when its holder dies, SIGKILL too,
        so it is never stale. Each call opens the file anew: flock locks belong to the open file, so threads of
        one process share and exclude like processes do.
        """
        # Read-only is enough for flock, and lets users who may only read the file lock it too.
        fd = os.open(self.path / LOCK_FILE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            if not _try_flock(fd, mode):
                if on_wait is not None:
                    on_wait()
                if wait is None:
                    fcntl.flock(fd, mode)
                else:
                    # Polled: flock itself has no timeout.
                    deadline = time.monotonic() + wait
                    while not _try_flock(fd, mode):
                        if time.monotonic() >= deadline:
                            holder = ("a pull, a server's answer or another writer is" if exclusive
                                      else "`chunksync store gc` is")
                            raise StoreBusy(f"{holder} using the store at {self.path}")
                        time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # drops the lock

    # --- chunks -----------------------------------------------------------------------------------------

    def put(self, cid: bytes, data: bytes, verify: bool = True) -> bool:
        """Stores one chunk; returns True if it was new."""
        return self.put_many([(cid, data)], verify) == 1

    def put_many(self, chunks: Iterable[tuple[bytes, bytes]], verify: bool = True) -> int:
        """Stores chunks in one transaction (all or none); returns how many were new.

        Every chunk is hashed again on the way in, so a broken source cannot spread corruption.
        """
        db = self._db()
        rows = []
        for cid, data in chunks:
            if len(cid) != ID_SIZE:
                raise ValueError(f"chunk id must be {ID_SIZE} bytes, got {len(cid)}")
            if verify and chunk_id(data) != cid:
                raise CorruptChunk(cid, "was not stored: its bytes do not hash to its id")
            rows.append((cid, len(data), self._local.cctx.compress(data)))
        if not rows:
            return 0
        with _transaction(db, self.path):
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO chunks (id, size, data) VALUES (?, ?, ?)", rows)
            return db.total_changes - before

    def get(self, cid: bytes) -> bytes:
        """A chunk's bytes, checked against its id; KeyError if absent, CorruptChunk if damaged."""
        row = self._db().execute("SELECT size, data FROM chunks WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise KeyError(cid.hex())
        return self._checked(cid, *row)

    def get_many(self, ids: Sequence[bytes]) -> list[bytes]:
        """The chunks' bytes in the order of `ids`, each checked against its id, read with one query per 500
        ids; KeyError if one is absent, CorruptChunk if one is damaged."""
        db = self._db()
        cache: _ReadCache = self._local.cache
        found = {cid: data for cid in ids if (data := cache.get(cid)) is not None}
        wanted = [cid for cid in dict.fromkeys(ids) if cid not in found]
        for i in range(0, len(wanted), _BATCH):
            batch = wanted[i:i + _BATCH]
            rows = db.execute(f"SELECT id, size, data FROM chunks WHERE id IN ({','.join('?' * len(batch))})",
                              batch).fetchall()  # read whole: _checked may delete
            for cid, size, data in rows:
                found[cid] = cache.put(cid, self._checked(cid, size, data))
        try:
            return [found[cid] for cid in ids]
        except KeyError as exc:
            raise KeyError(exc.args[0].hex()) from None

    def _checked(self, cid: bytes, size: int, stored: bytes) -> bytes:
        try:
            data = decompress_exact(self._local.dctx, stored, size)
        except DecompressionError:
            data = None
        if data is None or chunk_id(data) != cid:
            self.delete([cid])
            raise CorruptChunk(cid)
        return data

    def get_compressed(self, cid: bytes) -> tuple[int, bytes]:
        """(uncompressed size, zstd frame) as stored, unverified: for senders that verify elsewhere."""
        row = self._db().execute("SELECT size, data FROM chunks WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise KeyError(cid.hex())
        return row[0], row[1]

    def has(self, cid: bytes) -> bool:
        return self._db().execute("SELECT 1 FROM chunks WHERE id = ?", (cid,)).fetchone() is not None

    def has_many(self, ids: Iterable[bytes]) -> set[bytes]:
        """The subset of `ids` present in the store."""
        db = self._db()
        found: set[bytes] = set()
        batch: list[bytes] = []

        def flush() -> None:
            marks = ",".join("?" * len(batch))
            found.update(r[0] for r in db.execute(f"SELECT id FROM chunks WHERE id IN ({marks})", batch))
            batch.clear()

        for cid in ids:
            batch.append(cid)
            if len(batch) == _BATCH:
                flush()
        if batch:
            flush()
        return found

    def ids(self) -> Iterator[bytes]:
        """Every chunk id in the store."""
        for (cid,) in self._db().execute("SELECT id FROM chunks"):
            yield cid

    def count(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def delete(self, ids: Iterable[bytes]) -> int:
        db = self._db()
        deleted = 0
        ids = list(ids)
        self._local.cache.drop(ids)
        with _transaction(db, self.path):
            for i in range(0, len(ids), _BATCH):
                batch = ids[i:i + _BATCH]
                cur = db.execute(f"DELETE FROM chunks WHERE id IN ({','.join('?' * len(batch))})", batch)
                deleted += cur.rowcount
        return deleted

    def verify(self, repair: bool = True) -> list[bytes]:
        """Reads every chunk back and checks it against its id; returns the bad ids (removed if `repair`)."""
        bad = []
        dctx = zstandard.ZstdDecompressor()
        for cid, size, data in self._db().execute("SELECT id, size, data FROM chunks"):
            try:
                raw = decompress_exact(dctx, data, size)
            except DecompressionError:
                raw = None
            if raw is None or chunk_id(raw) != cid:
                bad.append(cid)
        if repair and bad:
            self.delete(bad)
            # Images that needed those chunks are no longer held completely.
            self._db().execute("UPDATE images SET complete = 0")
        return bad

    def gc(self, keep: set[bytes]) -> int:
        """Deletes every chunk whose id is not in `keep`; returns how many were deleted. Hold `lock(exclusive=True)`
        from choosing `keep` to here (retention.prune does), or a pull's new chunks go too."""
        doomed = [cid for cid in self.ids() if cid not in keep]
        deleted = self.delete(doomed)
        if deleted:
            db = self._db()
            # Hand free pages back so the file shrinks. executescript, because execute() steps this pragma
            # once, which frees a single page.
            db.executescript("PRAGMA incremental_vacuum;")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return deleted

    def stats(self) -> StoreStats:
        db = self._db()
        chunks, stored, raw = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0), COALESCE(SUM(size), 0) FROM chunks").fetchone()
        images = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        return StoreStats(chunks, stored, raw, images)

    # --- images -----------------------------------------------------------------------------------------

    def put_image(self, repository: str, manifest_digest: str, index_data: bytes,
                  manifest: bytes | None = None, config: bytes | None = None, complete: bool = False) -> None:
        with _transaction(self._db(), self.path) as db:
            db.execute("INSERT OR REPLACE INTO images (repository, manifest_digest, manifest, config, index_data,"
                       " complete, added) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (repository, manifest_digest, manifest, config, index_data, int(complete), time.time()))

    def get_image(self, repository: str, manifest_digest: str) -> ImageRecord | None:
        row = self._db().execute("SELECT * FROM images WHERE repository = ? AND manifest_digest = ?",
                                 (repository, manifest_digest)).fetchone()
        return ImageRecord(*row[:5], bool(row[5]), row[6]) if row else None

    def find_image(self, manifest_digest: str) -> ImageRecord | None:
        """An image record by manifest digest, in any repository."""
        row = self._db().execute("SELECT * FROM images WHERE manifest_digest = ? LIMIT 1",
                                 (manifest_digest,)).fetchone()
        return ImageRecord(*row[:5], bool(row[5]), row[6]) if row else None

    def images(self, repository: str | None = None, complete_only: bool = False) -> list[ImageRecord]:
        """Image records, newest first."""
        sql = "SELECT * FROM images WHERE 1=1"
        args: list = []
        if repository is not None:
            sql += " AND repository = ?"
            args.append(repository)
        if complete_only:
            sql += " AND complete = 1"
        rows = self._db().execute(sql + " ORDER BY added DESC", args).fetchall()
        return [ImageRecord(*r[:5], bool(r[5]), r[6]) for r in rows]

    def delete_image(self, repository: str, manifest_digest: str) -> None:
        with _transaction(self._db(), self.path) as db:
            db.execute("DELETE FROM images WHERE repository = ? AND manifest_digest = ?",
                       (repository, manifest_digest))


class _ReadCache:
    """Checked chunks by id, the least recently used dropped past `max_bytes`. A chunk's bytes never change (its
    id is their hash), so a cached chunk is as good as one read again."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, cid: bytes) -> bytes | None:
        data = self._chunks.get(cid)
        if data is not None:
            self._chunks.move_to_end(cid)
        return data

    def put(self, cid: bytes, data: bytes) -> bytes:
        if len(data) <= self.max_bytes and cid not in self._chunks:
            self._chunks[cid] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._chunks.popitem(last=False)[1])
        return data

    def drop(self, ids: Iterable[bytes]) -> None:
        for cid in ids:
            if (data := self._chunks.pop(cid, None)) is not None:
                self._bytes -= len(data)


class ChunkWriter:
    """An `index_layer` chunk sink: puts chunks into a store in transactions of about `batch_bytes`, so a layer
    never sits in memory whole. Call `flush()` at the end; `added` counts the chunks that were new."""

    def __init__(self, store: LocalStore, batch_bytes: int = 8 << 20, verify: bool = False):
        # verify=False: index_layer computed the ids from these very bytes a moment ago.
        self.store = store
        self.batch_bytes = batch_bytes
        self.verify = verify
        self.added = 0
        self._batch: list[tuple[bytes, bytes]] = []
        self._pending = 0

    def __call__(self, cid: bytes, data: bytes) -> None:
        self._batch.append((cid, data))
        self._pending += len(data)
        if self._pending >= self.batch_bytes:
            self.flush()

    def flush(self) -> int:
        self.added += self.store.put_many(self._batch, self.verify)
        self._batch.clear()
        self._pending = 0
        return self.added


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (so a full disk changes nothing); SQLite's
    errors become a StoreError that says what to do."""

    def __init__(self, db: sqlite3.Connection, where: Path):
        self.db = db
        self.where = where

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(_explain(exc, self.where)) from exc
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.OperationalError as commit_exc:
                exc = commit_exc
        # SQLite rolls some failures (e.g. SQLITE_FULL) back by itself; a second ROLLBACK would raise
        # "no transaction is active" and hide the real error.
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError):
            raise StoreError(_explain(exc, self.where)) from exc


def _explain(exc: sqlite3.OperationalError, where: Path) -> str:
    text = str(exc)
    if "full" in text:
        # Not `store gc`: in WAL mode even a delete needs free space to be written.
        return (f"the store at {where} is out of disk space ({text}); nothing of this write was kept. "
                "Free space on that disk, or use a store on a bigger one (--store DIR or $CHUNKSYNC_STORE)")
    if "locked" in text or "busy" in text:
        return f"the store at {where} stayed locked by another process ({text}); try again when it is done"
    return f"the store at {where} failed: {text}"
