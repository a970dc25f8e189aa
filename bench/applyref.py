"""The yardstick of the client-apply target: CPU of a plain zstd decompression (python-zstandard, the library the
client uses) of the payload an update delivered, i.e. v2's chunks that v1's index does not hold, read from the
device's store after the pull; and, as context, the two steps every apply does on top of decoding whatever the
wire format: checking each chunk against its id (BLAKE3) and writing it into a store as the pull does."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import zstandard

from chunkstore.index import chunk_id, decode_index
from chunkstore.store import LocalStore
from client.pull import STORE_LEVEL

LEVEL = 3             # the server's CHUNKS level and the store's: decompression speed barely depends on it
MIN_CPU_S = 0.2       # repeat the decompression until this much CPU was spent: one run can be under a millisecond
MIN_REPEATS = 3


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _payload_ids(store: LocalStore, repo: str, old: str, new: str) -> list[tuple[bytes, int]]:
    """v2's chunk ids (header and content, each once, index order) absent from v1's index, with their lengths."""
    records = [store.get_image(repo, digest) for digest in (old, new)]
    if any(r is None or not r.complete for r in records):
        raise RuntimeError(f"the device store lacks {repo}@{old} or {new} after the update pull")
    held = {cid for layer in decode_index(records[0].index_data).layers for cid, _ in layer.all_chunks()}
    wanted: dict[bytes, int] = {}
    for layer in decode_index(records[1].index_data).layers:
        for cid, length in layer.all_chunks():
            if cid not in held:
                wanted.setdefault(cid, length)
    return list(wanted.items())


def measure(store_dir: Path, repo: str, old: str, new: str) -> dict:
    """Compresses the payload into one zstd frame in a temp file (streamed, bounded memory), then times its
    decompression into a discarding sink: thread CPU per run, the mean of enough runs."""
    store = LocalStore(store_dir)
    try:
        ids = _payload_ids(store, repo, old, new)
        with tempfile.TemporaryFile() as f:
            with zstandard.ZstdCompressor(level=LEVEL).stream_writer(f, closefd=False) as writer:
                for cid, _ in ids:
                    writer.write(store.get(cid))
            compressed = f.tell()
            runs, spent = 0, 0.0
            dctx = zstandard.ZstdDecompressor()
            while runs < MIN_REPEATS or spent < MIN_CPU_S:
                f.seek(0)
                started = time.thread_time()
                dctx.copy_stream(f, _Discard())
                spent += time.thread_time() - started
                runs += 1
        verify_s, store_s = _verify_and_store(store, ids)
    finally:
        store.close()
    return {"chunks": len(ids), "payload_bytes": sum(length for _, length in ids), "zstd_bytes": compressed,
            "zstd_level": LEVEL, "decompress_cpu_s": spent / runs, "runs": runs,
            "verify_cpu_s": verify_s, "store_cpu_s": store_s}


def _verify_and_store(store: LocalStore, ids: list[tuple[bytes, int]], batch_bytes: int = 4 << 20) -> tuple[float, float]:
    """Thread CPU of hashing every payload chunk, and of putting them into an empty store (the pull's level, no
    second hash, transactions of about one CHUNKS frame), read back in batches of that size."""
    verify_s = store_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        target = LocalStore(Path(tmp), level=STORE_LEVEL)
        try:
            for batch in _batches(ids, batch_bytes):
                chunks = [(cid, store.get(cid)) for cid in batch]
                started = time.thread_time()
                for cid, data in chunks:
                    chunk_id(data)
                hashed = time.thread_time()
                target.put_many(chunks, verify=False)
                verify_s += hashed - started
                store_s += time.thread_time() - hashed
        finally:
            target.close()
    return verify_s, store_s


def _batches(ids: list[tuple[bytes, int]], batch_bytes: int) -> list[list[bytes]]:
    out: list[list[bytes]] = [[]]
    size = 0
    for cid, length in ids:
        if out[-1] and size + length > batch_bytes:
            out.append([])
            size = 0
        out[-1].append(cid)
        size += length
    return out
