"""Garbage collection of a store: keep the newest images of each repository and the chunks their indexes name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .index import IndexFormatError, decode_index
from .store import ImageRecord, LocalStore, StoreError


@dataclass
class Pruned:
    images_dropped: list[ImageRecord]
    images_kept: int
    chunks_deleted: int
    stored_bytes_freed: int       # zstd bytes of the deleted chunks
    uncompressed_bytes_freed: int


# How long gc waits by default for pulls to let go of the store.
GC_WAIT = 10.0


def prune(store: LocalStore, keep: int, wait: float = GC_WAIT,
          on_wait: Callable[[], None] | None = None) -> Pruned:
    """Drops all but the `keep` most recent image records of each repository, then every chunk that no remaining
    image's index names. Nothing is deleted if a remaining index cannot be read (its chunks would be lost).

    Holds the store lock exclusive throughout: a pull stores chunks before its record names them all, and needs
    the chunks of older images as delta bases, so gc waits up to `wait` seconds for pulls to finish (calling
    `on_wait` first if it has to), then raises StoreBusy having deleted nothing.
    """
    if keep < 0:
        raise ValueError("keep must be 0 or more")
    with store.lock(exclusive=True, wait=wait, on_wait=on_wait):
        return _prune(store, keep)


def _prune(store: LocalStore, keep: int) -> Pruned:
    seen: dict[str, int] = {}
    kept: list[ImageRecord] = []
    dropped: list[ImageRecord] = []
    for record in store.images():  # newest first
        seen[record.repository] = seen.get(record.repository, 0) + 1
        (kept if seen[record.repository] <= keep else dropped).append(record)
    wanted: set[bytes] = set()
    for record in kept:
        try:
            wanted |= decode_index(record.index_data).chunk_ids()
        except IndexFormatError as exc:
            raise StoreError(f"the index of {record.repository}@{record.manifest_digest} in the store is unreadable "
                             f"({exc}); gc stopped and deleted nothing") from None
    for record in dropped:
        store.delete_image(record.repository, record.manifest_digest)
    before = store.stats()
    deleted = store.gc(wanted)
    after = store.stats()
    return Pruned(dropped, len(kept), deleted, before.stored_bytes - after.stored_bytes,
                  before.uncompressed_bytes - after.uncompressed_bytes)
