"""Garbage collection of a store: keep the newest images of each repository and the chunks their indexes name."""
from __future__ import annotations

from dataclasses import dataclass

from .index import IndexFormatError, decode_index
from .store import ImageRecord, LocalStore, StoreError


@dataclass
class Pruned:
    images_dropped: list[ImageRecord]
    images_kept: int
    chunks_deleted: int
    stored_bytes_freed: int       # zstd bytes of the deleted chunks
    uncompressed_bytes_freed: int


def prune(store: LocalStore, keep: int) -> Pruned:
    """Drops all but the `keep` most recent image records of each repository, then every chunk that no remaining
    image's index names. Nothing is deleted if a remaining index cannot be read (its chunks would be lost).

    Chunks written by a pull that has not yet recorded its image are not named by any index: run gc when no
    pull is in progress.
    """
    if keep < 0:
        raise ValueError("keep must be 0 or more")
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
