"""The chunk-size sweep, in-process (chunkstore directly, no server): for each FastCDC average size, what a device
holding v1 would be sent for v2 (missing chunks as zstd CHUNKS frames) against the overhead (index, Bloom filter)."""

from __future__ import annotations

import time
from pathlib import Path

import zstandard

from bench import corpus
from chunkstore import wire
from chunkstore.bloom import filter_size
from chunkstore.chunker import ChunkParams
from chunkstore.index import ImageIndex, index_layer
from chunkstore.oci import OCI_LAYER_TAR

AVG_KIB = (16, 32, 64, 128)
ZSTD_LEVEL = 3      # the server's default (server/config.py)
FP_RATE = 0.01      # the client's default

# What is counted per pair and size, exactly as the server would send it to a device that holds v1: the new
# image's chunks that are not among v1's chunk ids, each sent once, batched into CHUNKS frames of ~4 MiB
# (chunkstore.wire.encode_chunks: ids + lengths + one zstd frame) — plus the encoded index of v2 (sent in the
# HEADER frame) and the Bloom filter over v1's ids at 1 % (what the device would send if it could not name v1
# exactly; naming v1 in have_images costs ~100 bytes). Layer tars are read from the corpus uncompressed (no gzip
# decode); HTTP overhead and the manifest/config are left out (a few kB, see the end-to-end table).


def params_for(avg_kib: int) -> ChunkParams:
    avg = avg_kib * 1024
    return ChunkParams(min_size=avg // 4, avg_size=avg, max_size=avg * 4)


class _Frames:
    """Collects missing chunks into ~4 MiB batches and counts the CHUNKS frames they become (bounded memory)."""

    def __init__(self) -> None:
        self.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.batch: list[tuple[bytes, bytes]] = []
        self.batch_bytes = 0
        self.frame_bytes = 0
        self.raw_bytes = 0
        self.chunks = 0

    def add(self, cid: bytes, data: bytes) -> None:
        if self.batch and self.batch_bytes + len(data) > wire.CHUNKS_FRAME_TARGET:
            self.flush()
        self.batch.append((cid, data))
        self.batch_bytes += len(data)
        self.raw_bytes += len(data)
        self.chunks += 1

    def flush(self) -> None:
        if self.batch:
            self.frame_bytes += len(wire.encode_chunks(self.batch, self.cctx))
            self.batch, self.batch_bytes = [], 0


_old_ids: dict[tuple, set[bytes]] = {}  # the debian pairs share one old layer: chunk it once per size


def _ids_of(tars: list[Path], params: ChunkParams) -> set[bytes]:
    key = (tuple((str(t), t.stat().st_size, t.stat().st_mtime_ns) for t in tars), params)
    if key not in _old_ids:
        ids: set[bytes] = set()
        for tar in tars:
            with open(tar, "rb") as f:
                layer = index_layer(f, OCI_LAYER_TAR, params=params)
            ids |= layer.chunk_ids()
        _old_ids[key] = ids
    return _old_ids[key]


def sweep_pair(pair_dir: Path, avg_kibs: tuple[int, ...] = AVG_KIB) -> list[dict]:
    """One row per average chunk size for the pair."""
    rows = []
    for avg_kib in avg_kibs:
        params = params_for(avg_kib)
        t0 = time.process_time()
        have = _ids_of(corpus.pair_layers(pair_dir, "old"), params)
        frames = _Frames()
        sent: set[bytes] = set()

        def on_chunk(cid: bytes, data: bytes) -> None:
            if cid not in have and cid not in sent:
                sent.add(cid)
                frames.add(cid, data)

        layers = []
        for tar in corpus.pair_layers(pair_dir, "new"):
            with open(tar, "rb") as f:
                layers.append(index_layer(f, OCI_LAYER_TAR, on_chunk=on_chunk, params=params))
        frames.flush()
        index_bytes = len(ImageIndex("sha256:" + "0" * 64, layers, params).encode())
        bloom_bytes = filter_size(len(have), FP_RATE)[0] // 8
        rows.append({
            "pair": Path(pair_dir).name, "avg_kib": avg_kib, "min_kib": avg_kib / 4, "max_kib": avg_kib * 4,
            "new_chunks": sum(len(l.header_chunks) + len(l.chunks) for l in layers), "old_chunks": len(have),
            "missing_chunks": frames.chunks, "missing_raw_bytes": frames.raw_bytes,
            "payload_bytes": frames.frame_bytes, "index_bytes": index_bytes, "bloom_bytes": bloom_bytes,
            "total_bytes": frames.frame_bytes + index_bytes,
            "cpu_s": round(time.process_time() - t0, 2),
        })
    return rows
