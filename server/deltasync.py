"""Deltas in a sync answer: the pair's deltas computed once (single flight) and cached, then per device the
items that deliver chunks it lacks, as DELTA frames, and the chunks they cover, which are not sent plainly."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from chunkstore.index import ImageIndex
from chunkstore.indexdelta import encode_index_delta, with_placeholders
from chunkstore.store import LocalStore
from chunkstore.wire import PLACEHOLDER_VERSION, AnyDeltaItem, Span, encode_delta, item_spans

from .deltacache import CachedPair, DeltaCache
from .deltas import Planner, gzip_engines, target_ids
from .indexer import IndexedImage, Indexer
from .metrics import Metrics
from .singleflight import SingleFlight

log = logging.getLogger("chunksync.server")
FRAME_DATA_BYTES = 4 << 20  # delta bytes per DELTA frame: small frames let the device store as they arrive


@dataclass
class DeltaAnswer:
    base: IndexedImage
    version: int                  # the protocol version the items are encoded for
    index_delta: bytes            # msgpack {size, data}
    covered: set[bytes]           # chunk ids the sent items deliver
    seqs: list[int]               # the items to send


class DeltaSource:
    def __init__(self, store: LocalStore, indexer: Indexer, cache: DeltaCache, metrics: Metrics) -> None:
        self.store, self.indexer, self.cache, self.metrics = store, indexer, cache, metrics
        self._flights: SingleFlight[CachedPair] = SingleFlight()

    def pair(self, base: IndexedImage, image: IndexedImage, version: int) -> CachedPair:
        """The pair's cached deltas, computed now if no one has (concurrent devices share one computation)."""
        key = (base.manifest_digest, image.manifest_digest, version)
        found = self.cache.get(*key)
        if found is not None:
            self.metrics.inc("chunksync_delta_pairs_total", outcome="cached")
            return found
        return self._flights.do(key, lambda: self._compute(base, image, version))

    def _compute(self, base: IndexedImage, image: IndexedImage, version: int) -> CachedPair:
        found = self.cache.get(base.manifest_digest, image.manifest_digest, version)
        if found is not None:  # another flight finished it a moment ago
            self.metrics.inc("chunksync_delta_pairs_total", outcome="cached")
            return found
        started = time.monotonic()
        # Both images' chunks must be at hand: the store is a cache, refill it from the registry if wiped.
        self.indexer.ensure_chunks(base, [cid for cid, _ in base.ordered_chunks()])
        self.indexer.ensure_chunks(image, [cid for cid, _ in image.ordered_chunks()])
        planner = Planner(image.index, base.index, self.store.get, gzip_engines(version))
        spans: list[Span] = []

        def items() -> Iterator[AnyDeltaItem]:
            for item in planner.items(grouped=version >= 3):
                spans.extend(item_spans(item))
                yield item

        def index_deltas() -> tuple[bytes, bytes]:
            # Version 7: nearly every device gets every item, so the index delta with every id waits until one
            # does not (_full_index_delta).
            if version >= PLACEHOLDER_VERSION and spans:
                return b"", _index_delta(with_placeholders(image.index, spans), base.index, version)
            return _index_delta(image.index, base.index, version), b""

        pair = self.cache.put(base.manifest_digest, image.manifest_digest, version, items(), index_deltas, started)
        self.metrics.inc("chunksync_delta_pairs_total", outcome="computed")
        self.metrics.observe("chunksync_delta_compute_seconds", pair.seconds)
        log.info("deltas %s -> %s: %d items, %.3f MB in %.2f s", base.manifest_digest[:19],
                 image.manifest_digest[:19], pair.items, pair.bytes / 1e6, pair.seconds)
        return pair

    def answer(self, base: IndexedImage, image: IndexedImage, wanted: list[bytes], version: int) -> DeltaAnswer:
        """What to send this device (protocol `version`): the items delivering at least one chunk it lacks."""
        pair = self.pair(base, image, version)
        wanted_set = set(wanted)
        covered: set[bytes] = set()
        seqs = []
        for seq, target in enumerate(self.cache.targets(base.manifest_digest, image.manifest_digest, version)):
            ids = target_ids(image.index, target)
            if wanted_set.intersection(ids):
                seqs.append(seq)
                covered.update(ids)
        # Version 7: a device that gets every item rebuilds every chunk they name, so needs only a check of its id.
        if pair.implied_index_delta and len(seqs) == pair.items:
            index_delta = pair.implied_index_delta
        else:
            index_delta = pair.index_delta or self._full_index_delta(base, image, version)
        return DeltaAnswer(base, version, index_delta, covered & wanted_set, seqs)

    def _full_index_delta(self, base: IndexedImage, image: IndexedImage, version: int) -> bytes:
        """The index delta with every id, computed at the first device that needs it and cached (deterministic:
        two devices at once compute the same bytes)."""
        data = _index_delta(image.index, base.index, version)
        self.cache.set_index_delta(base.manifest_digest, image.manifest_digest, version, data)
        return data

    def frames(self, answer: DeltaAnswer, image: IndexedImage, counts: dict[str, int]) -> Iterator[bytes]:
        """DELTA frames of about FRAME_DATA_BYTES each, read from the cache one item at a time."""
        base_ref = (answer.base.repository, answer.base.manifest_digest)
        batch: list[AnyDeltaItem] = []
        size = 0
        for item in self.cache.items(answer.base.manifest_digest, image.manifest_digest, answer.version, answer.seqs):
            if batch and size + len(item.data) > FRAME_DATA_BYTES:
                yield encode_delta(base_ref, batch)
                batch, size = [], 0
            batch.append(item)
            size += len(item.data)
            counts["delta_items"] += 1
            counts["delta_bytes"] += len(item.data)
        if batch:
            yield encode_delta(base_ref, batch)


def _index_delta(new: ImageIndex, old: ImageIndex, version: int) -> bytes:
    return msgpack.packb(encode_index_delta(new, old, runs=version >= 4), use_bin_type=True)
