"""The server's work behind each endpoint, as blocking methods (run them in a worker thread): access checks,
tag resolution, index lookup, planning. app.py only moves bytes between HTTP and these."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import msgpack

from chunkstore.index import ID_SIZE
from chunkstore.indexdelta import CHECK_BYTES, is_placeholder
from chunkstore.oci import IMAGE_MANIFEST_TYPES
from chunkstore.store import LocalStore
from chunkstore.wire import MAX_DELTA_BYTES, PLACEHOLDER_VERSION, ChunksRequest, SyncRequest, encode_header
from client.registry import Manifest, Platform, RegistryClient

from .access import AccessChecker
from .config import ServerConfig
from .deltacache import DeltaCache
from .deltasync import DeltaAnswer, DeltaSource
from .errors import BadRequest, TooLarge, UnknownImage, as_api_error
from .events import PushedImage, is_artifact
from .framecache import FrameCache
from .indexer import IndexedImage, Indexer
from .metrics import Metrics
from .segments import pieces
from .sync import DeltaFrames, Plan, Segments, plan_chunks, stream_frames

log = logging.getLogger("chunksync.server")


class Service:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = LocalStore(config.store_dir)
        self.registry = RegistryClient(config.registry_url, username=config.registry_user,
                                       password=config.registry_password)
        self.access = AccessChecker(config.registry_url, config.auth_ttl)
        self.indexer = Indexer(self.store, self.registry, self.metrics, push=config.push_indexes)
        self.deltas = DeltaSource(self.store, self.indexer, DeltaCache(config.store_dir), self.metrics)
        self.segments = (Segments(FrameCache(config.store_dir, config.frame_cache_bytes), config.segment_level)
                         if config.frame_cache_bytes else None)
        self._background = ThreadPoolExecutor(config.index_workers, thread_name_prefix="chunksync-index")

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)
        self.registry.close()

    # --- sync -------------------------------------------------------------------------------------------------

    def prepare_sync(self, request: SyncRequest, authorization: str | None) -> Iterator[bytes]:
        """Checks, resolves and plans a sync; returns the frames to stream. Errors here become JSON answers."""
        return self._frames_holding_store(lambda: self._prepare_sync(request, authorization))

    def _prepare_sync(self, request: SyncRequest, authorization: str | None) -> Iterator[bytes]:
        if request.bloom is not None and len(request.bloom.bits) > self.config.max_bloom_bytes:
            raise TooLarge(f"bloom filter of {len(request.bloom.bits)} bytes exceeds the limit of "
                           f"{self.config.max_bloom_bytes}")
        self.access.check(authorization, request.repository, request.reference)
        manifest = self.registry.get_manifest(request.repository, request.reference, request.platform)
        image = self.indexer.get(request.repository, manifest.digest, manifest)
        have: set[bytes] = set()
        held: list[IndexedImage] = []
        for repository, digest in request.have_images:
            # Only images the device may pull count: otherwise what gets skipped would reveal what they hold.
            if not self.access.allowed(authorization, repository, digest):
                continue
            other = self.indexer.find(repository, digest)
            if other is not None:
                have |= other.ids
                held.append(other)
        plan = plan_chunks((cid for cid, _ in image.ordered_chunks()), have, request.bloom)
        delta = self._delta_answer(request, image, held, plan)
        if delta is not None:
            plan = Plan([cid for cid in plan.ids if cid not in delta.covered], plan.skipped)
        if self.segments is not None:
            held = have | delta.covered if delta is not None else have
            plan.pieces = pieces(image.ordered_chunks(), plan.ids, held, self.config.chunks_frame_bytes)
            plan.skipped -= sum(len(piece.ids) for piece in plan.pieces) - len(plan.ids)  # Bloom hits sent anyway
        self.indexer.ensure_chunks(image, [cid for piece in plan.parts() for cid in piece.ids])
        # The device asked by digest and holds those manifest bytes (it verified them): not sent again.
        manifest_data = b"" if request.have_manifest and manifest.digest == request.reference else manifest.data
        extra = {"platform": _platform_of(image, request.platform)}
        if manifest.index_digest:
            extra["index_digest"] = manifest.index_digest
        if delta is not None:
            # The index as a delta against the base's: a few KB instead of 36 bytes per chunk.
            extra["index_base"] = [delta.base.repository, delta.base.manifest_digest]
            extra["index_delta"] = msgpack.unpackb(delta.index_delta, raw=False)
            self.metrics.inc("chunksync_index_delta_bytes_total", len(delta.index_delta))
            header = encode_header(image.manifest_digest, manifest_data, image.config, b"", **extra)
            return self._frames(plan, header, lambda counts: self.deltas.frames(delta, image, counts))
        header = encode_header(image.manifest_digest, manifest_data, image.config, image.index_data, **extra)
        return self._frames(plan, header)

    def _delta_answer(self, request: SyncRequest, image: IndexedImage, held: list[IndexedImage],
                      plan: Plan) -> DeltaAnswer | None:
        """Deltas against the first held image of the same repository (else any held image): only images the device
        holds completely and may pull, whose index the server has, are ever a base, never a Bloom hit."""
        if request.version < 2 or not self.config.deltas or len(image.index_data) > MAX_DELTA_BYTES // 2:
            return None  # (an index that large, ~50 GB of layers, goes whole: its delta would be over the limit)
        candidates = [other for other in held if other.manifest_digest != image.manifest_digest]
        candidates.sort(key=lambda other: other.repository != request.repository)  # stable: the device's order
        if not candidates:
            return None
        return self.deltas.answer(candidates[0], image, plan.ids, request.version)

    def prepare_chunks(self, request: ChunksRequest, authorization: str | None) -> Iterator[bytes]:
        """The repair round: exactly the asked ids, which must all be chunks of the named image."""
        return self._frames_holding_store(lambda: self._prepare_chunks(request, authorization))

    def _prepare_chunks(self, request: ChunksRequest, authorization: str | None) -> Iterator[bytes]:
        image = self._image(request.repository, request.manifest_digest, authorization)
        asked = {request.ids[i:i + ID_SIZE] for i in range(0, len(request.ids), ID_SIZE)}
        if request.version >= PLACEHOLDER_VERSION:
            asked = _expand_placeholders(asked, image.ids)
        foreign = len(asked - image.ids)
        if foreign:
            raise BadRequest(f"{foreign} of the {len(asked)} ids asked for are not chunks of "
                             f"{request.repository}@{request.manifest_digest}: ask only for ids of its index")
        ordered = [cid for cid, _ in image.ordered_chunks() if cid in asked]
        plan = Plan(ordered, 0)
        self.indexer.ensure_chunks(image, plan.ids)
        return self._frames(plan, None)

    def _frames(self, plan: Plan, header: bytes | None, deltas: DeltaFrames | None = None) -> Iterator[bytes]:
        return stream_frames(self.store, plan, self.metrics, header=header, level=self.config.zstd_level,
                             frame_bytes=self.config.chunks_frame_bytes, deltas=deltas, segments=self.segments)

    def chunk(self, repository: str, digest: str, cid: bytes, authorization: str | None,
              etag_only: bool = False) -> bytes | None:
        """One chunk of an image by id; None when `etag_only` (the device has it and only the checks ran)."""
        image = self._image(repository, digest, authorization)
        if cid not in image.ids:
            raise UnknownImage(f"chunk {cid.hex()} is not in {repository}@{digest}", code="chunk_not_found")
        if etag_only:
            return None
        with self.indexer.holding_store():
            self.indexer.ensure_chunks(image, [cid])
            data = self.store.get(cid)
        self.metrics.inc("chunksync_chunks_sent_total")
        self.metrics.inc("chunksync_chunk_bytes_sent_total", len(data))
        return data

    def _frames_holding_store(self, prepare: Callable[[], Iterator[bytes]]) -> Iterator[bytes]:
        """`prepare()`'s frames, the store lock held (shared) from before the plan to the last frame sent: a
        `chunksync store gc` on this store waits for the answers in flight, or gives up having deleted nothing,
        instead of deleting chunks an answer planned to send. (An answer dropped before its first frame lets go
        when the dropped iterator is collected.)"""
        hold = ExitStack()
        hold.enter_context(self.indexer.holding_store())
        try:
            frames = prepare()
        except BaseException:
            hold.close()
            raise
        return _released_after(frames, hold)

    def _image(self, repository: str, digest: str, authorization: str | None) -> IndexedImage:
        self.access.check(authorization, repository, digest)
        return self.indexer.get(repository, digest)

    # --- push notifications ------------------------------------------------------------------------------------

    def schedule(self, pushed: PushedImage) -> None:
        self._background.submit(self._index_pushed, pushed)

    def _index_pushed(self, pushed: PushedImage) -> None:
        try:
            manifest = self.registry.get_raw_manifest(pushed.repository, pushed.digest)
            for child in self._images_in(pushed.repository, manifest):
                self.indexer.ensure(pushed.repository, child.digest, child)
                self.metrics.inc("chunksync_events_total", outcome="indexed")
        except Exception as exc:  # a background job has no one to answer: log it and count it
            log.warning("indexing pushed %s@%s failed: %s", pushed.repository, pushed.digest,
                        as_api_error(exc).message)
            self.metrics.inc("chunksync_events_total", outcome="failed")

    def _images_in(self, repository: str, manifest: Manifest) -> Iterator[Manifest]:
        """The runnable image manifests a pushed manifest or index stands for (artifacts, ours included, skipped)."""
        if manifest.media_type in IMAGE_MANIFEST_TYPES:
            if is_artifact(manifest.json):
                self.metrics.inc("chunksync_events_total", outcome="artifact")
            else:
                yield manifest
            return
        for entry in manifest.json.get("manifests") or []:
            platform = Platform.from_descriptor(entry)
            if entry.get("artifactType") or platform is None or platform.os == "unknown":
                continue  # attestations and our referrers tag entries
            yield from self._images_in(repository, self.registry.get_raw_manifest(repository, entry["digest"]))


def _released_after(frames: Iterator[bytes], hold: ExitStack) -> Iterator[bytes]:
    with hold:
        yield from frames


def _platform_of(image: IndexedImage, asked: str) -> str:
    try:
        config = json.loads(image.config)
        return str(Platform(config["os"], config["architecture"], config.get("variant") or None))
    except (ValueError, KeyError, TypeError):
        return asked


def _expand_placeholders(asked: set[bytes], ids: set[bytes]) -> set[bytes]:
    """`asked` with each placeholder (version 7: a chunk a DELTA item should have rebuilt) replaced by the image's
    chunks it may stand for (one, but for a 2**-32 chance per chunk; the device tells them apart)."""
    holders = {cid for cid in asked if is_placeholder(cid)}
    if not holders:
        return asked
    checks = {cid[:CHECK_BYTES] for cid in holders}
    return (asked - holders) | {cid for cid in ids if cid[:CHECK_BYTES] in checks}
