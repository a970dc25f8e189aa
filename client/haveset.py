"""The have-set a device sends: images it holds completely (exact) plus a Bloom filter over its other chunk ids."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chunkstore.bloom import BloomFilter
from chunkstore.index import ID_SIZE, IndexFormatError, decode_index
from chunkstore.store import LocalStore
from chunkstore.wire import MAX_HAVE_IMAGES


@dataclass
class HaveSet:
    images: list[tuple[str, str]]  # (repository, manifest digest), at most MAX_HAVE_IMAGES
    bloom: BloomFilter | None
    bloom_ids: int                 # how many chunk ids the filter holds

    @property
    def bloom_bytes(self) -> int:
        return len(self.bloom.bits) if self.bloom else 0


def _keys(ids: bytes) -> np.ndarray:
    # The first 8 bytes of a BLAKE3 id as the set key: two ids sharing them would only mean one chunk left
    # out of the filter, i.e. sent again, never a chunk wrongly assumed present.
    return np.frombuffer(ids, dtype="<u8").reshape(-1, ID_SIZE // 8)[:, 0]


def build_have_set(store: LocalStore, repository: str, fp_rate: float = 0.01, target: str | None = None) -> HaveSet:
    """Complete images of the store, same repository first then newest, and a filter over the ids they miss.

    The `target` image itself is never named (a server may ignore it there, as the one being pulled); its
    chunks the store holds then go into the filter like any other.
    """
    records = [r for r in store.images(complete_only=True) if r.manifest_digest != target]
    records.sort(key=lambda r: r.repository != repository)  # stable: newest first within each group
    named: list[tuple[str, str]] = []
    covered: list[np.ndarray] = []  # 8-byte keys, not id objects: 64 big images can name millions of chunks
    for record in records:
        if len(named) == MAX_HAVE_IMAGES:
            break
        try:
            index = decode_index(record.index_data)
        except IndexFormatError:
            continue  # a damaged record: its chunks still go into the filter below
        if (record.repository, record.manifest_digest) in named:
            continue
        named.append((record.repository, record.manifest_digest))
        for layer in index.layers:
            covered += [_keys(bytes(layer.header_chunks.ids)), _keys(bytes(layer.chunks.ids))]
    all_ids = b"".join(store.ids())
    if not all_ids:
        return HaveSet(named, None, 0)
    others = np.frombuffer(all_ids, dtype=np.uint8).reshape(-1, ID_SIZE)
    if covered:
        others = others[~np.isin(_keys(all_ids), np.concatenate(covered))]
    if len(others) == 0:
        return HaveSet(named, None, 0)
    return HaveSet(named, BloomFilter.build(others.tobytes(), fp_rate), len(others))
