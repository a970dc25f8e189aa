"""The local store: chunks verified on the way in and out, corruption found and removed, crash- and full-disk-safe,
shared by concurrent processes, and usable at a million chunks."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from chunkstore.index import chunk_id
from chunkstore.store import ChunkWriter, CorruptChunk, LocalStore, StoreError, default_store_path

# A writer that puts batches of random chunks forever, printing after each committed batch.
WRITER = """
import os, sys
from chunkstore.store import LocalStore
from chunkstore.index import chunk_id
store = LocalStore(sys.argv[1])
batches = int(sys.argv[2])
i = 0
while batches < 0 or i < batches:
    chunks = [os.urandom(os.urandom(1)[0] * 100 + 40) for _ in range(50)]
    store.put_many([(chunk_id(c), c) for c in chunks] + [(chunk_id(b"shared"), b"shared")])
    print("batch", i, flush=True)
    i += 1
"""


def chunks(n: int, seed: int = 0, size: int = 5000) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        data = rng.randbytes(rng.randint(1, size))
        out.append((chunk_id(data), data))
    return out


def writer(store: Path, batches: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(batches)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_consistent(path: Path) -> int:
    store = LocalStore(path)
    assert store.verify() == []
    ids = list(store.ids())
    for cid in ids:
        assert chunk_id(store.get(cid)) == cid
    store.close()
    return len(ids)


# --- chunks in and out ----------------------------------------------------------------------------------------

def test_put_get_has(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    batch = chunks(20)
    assert store.put_many(batch) == 20
    assert store.put_many(batch) == 0  # already there
    assert store.put(*chunks(1, seed=9)[0]) is True
    for cid, data in batch:
        assert store.get(cid) == data and store.has(cid)
    assert store.has_many([cid for cid, _ in batch[:5]] + [b"\0" * 32]) == {cid for cid, _ in batch[:5]}
    assert store.count() == 21 == len(set(store.ids()))
    with pytest.raises(KeyError):
        store.get(b"\0" * 32)
    assert store.delete([batch[0][0], b"\0" * 32]) == 1 and not store.has(batch[0][0])


def test_a_chunk_whose_bytes_do_not_match_its_id_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (cid, data), (other, _) = chunks(2)
    with pytest.raises(CorruptChunk, match=f"{cid.hex()} was not stored: its bytes do not hash to its id"):
        store.put_many([(other, _)] + [(cid, data + b"!")])
    assert store.count() == 0  # all or nothing
    with pytest.raises(ValueError, match="32 bytes"):
        store.put(b"short", b"data")


def corrupt(store: LocalStore, cid: bytes, how: str) -> None:
    """Damages one stored chunk behind the store's back, directly in the SQLite database."""
    db = sqlite3.connect(store.db_path)
    size, frame = db.execute("SELECT size, data FROM chunks WHERE id = ?", (cid,)).fetchone()
    if how == "flip a byte of the zstd frame":
        frame = bytearray(frame)
        frame[len(frame) // 2] ^= 0x40
        new = bytes(frame)
    else:  # bit rot before compression: the frame is valid but holds other bytes
        raw = bytearray(zstandard.ZstdDecompressor().decompress(frame))
        raw[0] ^= 1
        new = zstandard.ZstdCompressor().compress(bytes(raw))
    db.execute("UPDATE chunks SET data = ? WHERE id = ?", (new, cid))
    db.commit()
    db.close()


@pytest.mark.parametrize("how", ["flip a byte of the zstd frame", "flip a byte of the chunk"])
def test_corrupt_chunk_is_refused_and_removed(tmp_path: Path, how: str) -> None:
    store = LocalStore(tmp_path)
    batch = chunks(10, size=20_000)
    store.put_many(batch)
    bad_get, bad_verify = batch[3][0], batch[7][0]
    corrupt(store, bad_get, how)
    corrupt(store, bad_verify, how)
    with pytest.raises(CorruptChunk, match="corrupt .* removed, fetch it again"):
        store.get(bad_get)
    assert not store.has(bad_get)
    store.put_image("app", "sha256:" + "1" * 64, b"index", complete=True)
    assert store.verify() == [bad_verify]
    assert not store.has(bad_verify) and store.count() == 8
    assert not store.images()[0].complete  # the image is no longer held whole
    assert store.verify() == []


def test_verify_without_repair_keeps_the_bad_chunk(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_many(chunks(3))
    bad = next(store.ids())
    corrupt(store, bad, "flip a byte of the chunk")
    assert store.verify(repair=False) == [bad] and store.has(bad)


def test_get_many_reads_in_order_and_checks_every_chunk(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    batch = chunks(1200, size=3000)  # more than one query's worth of ids
    store.put_many(batch)
    ids = [cid for cid, _ in batch][::-1] + [batch[5][0]]  # any order, repeats allowed
    assert store.get_many(ids) == [data for _, data in batch][::-1] + [batch[5][1]]
    assert store.get_many([]) == []
    with pytest.raises(KeyError, match="00" * 32):
        store.get_many(ids[:3] + [b"\0" * 32])
    corrupt(store, batch[700][0], "flip a byte of the chunk")
    with pytest.raises(CorruptChunk, match=batch[700][0].hex()):
        store.get_many(ids)
    assert not store.has(batch[700][0]) and store.count() == 1199


# --- crashes, concurrency, full disk ------------------------------------------------------------------------

def test_writer_killed_at_random_instants_leaves_a_consistent_store(tmp_path: Path) -> None:
    rng = random.Random(42)
    path = tmp_path / "store"
    for trial in range(6):
        proc = writer(path, -1)
        if trial:  # trial 0 is killed while it may still be creating the database
            for _ in range(rng.randint(1, 20)):
                assert proc.stdout is not None and proc.stdout.readline().startswith("batch")
            time.sleep(rng.random() / 20)  # somewhere inside a later batch: not an assertion on time
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        assert_consistent(path)
    assert assert_consistent(path) > 50


def test_two_processes_writing_at_once_both_succeed(tmp_path: Path) -> None:
    path = tmp_path / "store"
    procs = [writer(path, 30), writer(path, 30)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert all(out.count("batch") == 30 for out, _ in outs)
    assert assert_consistent(path) == 2 * 30 * 50 + 1  # distinct random chunks plus the one both wrote


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs to fill (needs root and mount rights): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_a_clear_error_and_the_store_stays_consistent(small_disk: Path) -> None:
    store = LocalStore(small_disk / "store")
    kept = 0
    with pytest.raises(StoreError, match="out of disk space.*nothing of this write was kept.*bigger one"):
        for i in range(1000):  # incompressible chunks: 2 MB fills after a few batches
            store.put_many([(chunk_id(d), d) for d in (os.urandom(20_000) for _ in range(10))])
            kept += 10
    assert store.count() == kept > 0
    assert store.verify() == []
    assert all(store.get(cid) for cid in store.ids())
    # Once there is room again (here: the filesystem grows), the same store takes writes.
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    assert store.put(*chunks(1)[0])
    store.close()
    assert assert_consistent(small_disk / "store") == kept + 1


def test_a_million_chunk_ids(tmp_path: Path) -> None:
    """has_many/ids at the scale of a large device store (a million tiny chunks)."""
    store = LocalStore(tmp_path)
    rng = random.Random(1)
    ids = [rng.randbytes(32) for _ in range(1_000_000)]
    store.put_many(((cid, b"x") for cid in ids), verify=False)
    assert store.count() == 1_000_000
    assert sum(1 for _ in store.ids()) == 1_000_000
    probe = ids[::10] + [rng.randbytes(32) for _ in range(1000)]
    assert store.has_many(probe) == set(ids[::10])


# --- images, stats, location ------------------------------------------------------------------------------

def test_images_newest_first(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for i, repo in enumerate(["app", "app", "db"]):
        store.put_image(repo, f"sha256:{i:064x}", b"index %d" % i, manifest=b"{}", complete=bool(i))
    assert [r.manifest_digest[-1] for r in store.images()] == ["2", "1", "0"]
    assert [r.manifest_digest[-1] for r in store.images("app", complete_only=True)] == ["1"]
    assert store.get_image("app", f"sha256:{0:064x}").index_data == b"index 0"  # type: ignore[union-attr]
    assert store.find_image(f"sha256:{2:064x}").repository == "db"  # type: ignore[union-attr]
    store.delete_image("app", f"sha256:{0:064x}")
    assert store.get_image("app", f"sha256:{0:064x}") is None and store.stats().images == 2


def test_stats_and_gc(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    batch = chunks(10)
    store.put_many(batch)
    stats = store.stats()
    assert stats.chunks == 10 and stats.uncompressed_bytes == sum(len(d) for _, d in batch)
    assert 0 < stats.stored_bytes
    assert store.gc({cid for cid, _ in batch[:4]}) == 6 and store.count() == 4


def test_default_store_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHUNKSYNC_STORE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_store_path() == tmp_path / "a"
    monkeypatch.delenv("CHUNKSYNC_STORE")
    assert default_store_path() == tmp_path / "xdg/chunksync"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home/.local/share/chunksync"


def test_chunk_writer_batches(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    writer = ChunkWriter(store, batch_bytes=20_000, verify=True)
    batch = chunks(30, size=3000)
    for cid, data in batch[:20]:
        writer(cid, data)
    assert 0 < store.count() < 20  # whole batches went in as they filled
    for cid, data in batch:
        writer(cid, data)
    assert writer.flush() == 30 == store.count()
    with pytest.raises(CorruptChunk):
        writer(batch[0][0], b"other bytes")
        writer.flush()
