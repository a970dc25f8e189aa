"""Chunk indexes of images: found in the local store, else in the registry (as a referrer of the image),
else computed by streaming each layer blob through the chunker and pushed to the registry.

The local store is a cache: an index found in the registry is served by re-chunking layer blobs whose
chunks the store lacks, so wiping the store loses nothing.

An index found in the registry is not trusted to say which chunks an image holds: anyone who may push to a
repository can push one, listing chunk ids of other repositories' content that the shared store happens to hold.
Its layers are re-chunked (and compared) before any chunk is served through it, unless this server already
chunked a layer with the same digest into the same ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from chunkstore.chunker import DEFAULT_PARAMS, ChunkParams
from chunkstore.index import MAX_INDEX_BYTES, ImageIndex, IndexFormatError, LayerIndex, decode_index, index_layer
from chunkstore.oci import (
    ARTIFACT_TYPE,
    IMAGE_MANIFEST_TYPES,
    INDEX_LAYER_MEDIA_TYPE,
    OCI_EMPTY,
    OCI_EMPTY_DATA,
    OCI_EMPTY_DIGEST,
    OCI_EMPTY_SIZE,
    OCI_MANIFEST,
    sha256_digest,
)
from chunkstore.store import LocalStore
from client.registry import Manifest, RegistryClient, RegistryError

from .errors import RegistryFailed, UnknownImage
from .metrics import Metrics
from .singleflight import SingleFlight

log = logging.getLogger("chunksync.server")

_PUT_BATCH_BYTES = 8 << 20   # chunks buffered before one store transaction
_DECODED_CACHE = 32          # decoded indexes kept in memory (an index of a large image is megabytes)


@dataclass(frozen=True)
class IndexedImage:
    """An image and its chunk index, as a sync answer's HEADER needs them."""
    repository: str
    manifest_digest: str
    manifest: bytes
    config: bytes
    index_data: bytes
    index: ImageIndex
    verified: bool = False   # computed here, or every layer re-chunked here and found to match

    @cached_property
    def ids(self) -> set[bytes]:
        """Every chunk id of the image, for membership tests."""
        return self.index.chunk_ids()

    def ordered_chunks(self) -> list[tuple[bytes, int]]:
        """Every chunk id of the image once, in index order (per layer: header chunks, then content chunks)."""
        seen: set[bytes] = set()
        out = []
        for layer in self.index.layers:
            for cid, length in layer.all_chunks():
                if cid not in seen:
                    seen.add(cid)
                    out.append((cid, length))
        return out


@dataclass(frozen=True)
class IndexReport:
    image: IndexedImage
    source: str              # where the index came from: store, registry or computed
    seconds: float
    chunked_bytes: int       # uncompressed layer bytes chunked (layers already indexed are reused)
    pushed_as: str | None    # digest of the artifact manifest pushed to the registry


class Indexer:
    def __init__(self, store: LocalStore, registry: RegistryClient, metrics: Metrics, push: bool = True) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.push = push
        self._images: SingleFlight[IndexReport] = SingleFlight()
        self._layers: SingleFlight[None] = SingleFlight()
        self._decoded: OrderedDict[tuple[str, str], IndexedImage] = OrderedDict()
        self._verified_layers: set[tuple[str, bytes]] = set()  # _layer_key of layers chunked by this server
        self._lock = threading.Lock()

    # --- lookup ---------------------------------------------------------------------------------------------

    def get(self, repository: str, digest: str, manifest: Manifest | None = None) -> IndexedImage:
        """The image's index: local store, then the registry's referrers, then computed now (single flight)."""
        return self.ensure(repository, digest, manifest).image

    def ensure(self, repository: str, digest: str, manifest: Manifest | None = None) -> IndexReport:
        found = self._from_store(repository, digest)
        if found is not None:
            return IndexReport(found, "store", 0.0, 0, None)
        return self._images.do((repository, digest), lambda: self._lookup_or_index(repository, digest, manifest))

    def find(self, repository: str, digest: str) -> IndexedImage | None:
        """Only what is cheap: the local store or an index already in the registry; never computes one."""
        found = self._from_store(repository, digest)
        if found is not None:
            return found
        try:
            manifest = self.registry.get_raw_manifest(repository, digest)
            return self._from_registry(repository, manifest) if manifest.media_type in IMAGE_MANIFEST_TYPES else None
        except (RegistryError, IndexFormatError, ValueError) as exc:
            log.info("no index for %s@%s: %s", repository, digest, exc)
            return None

    def _from_store(self, repository: str, digest: str) -> IndexedImage | None:
        key = (repository, digest)
        with self._lock:
            if key in self._decoded:
                self._decoded.move_to_end(key)
                return self._decoded[key]
        record = self.store.get_image(repository, digest)
        if record is None or record.manifest is None or record.config is None:
            return None
        try:
            # `complete` in the server's store means verified (see ensure_chunks).
            image = IndexedImage(repository, digest, record.manifest, record.config, record.index_data,
                                 decode_index(record.index_data), verified=record.complete)
        except IndexFormatError as exc:
            log.warning("dropping a bad index record for %s@%s: %s", repository, digest, exc)
            self.store.delete_image(repository, digest)
            return None
        self._remember(image)
        return image

    def _remember(self, image: IndexedImage) -> None:
        with self._lock:
            if image.verified:
                self._verified_layers.update(_layer_key(layer) for layer in image.index.layers)
            self._decoded[(image.repository, image.manifest_digest)] = image
            self._decoded.move_to_end((image.repository, image.manifest_digest))
            while len(self._decoded) > _DECODED_CACHE:
                self._decoded.popitem(last=False)

    def _lookup_or_index(self, repository: str, digest: str, manifest: Manifest | None) -> IndexReport:
        found = self._from_store(repository, digest)  # another flight may have just finished it
        if found is not None:
            return IndexReport(found, "store", 0.0, 0, None)
        if manifest is None:
            manifest = self.registry.get_raw_manifest(repository, digest)
        if manifest.media_type not in IMAGE_MANIFEST_TYPES:
            raise UnknownImage(f"{repository}@{digest} is a {manifest.media_type}, not an image manifest")
        found = self._from_registry(repository, manifest)
        if found is not None:
            return IndexReport(found, "registry", 0.0, 0, None)
        return self._index(repository, manifest)

    # --- the registry's copy ----------------------------------------------------------------------------------

    def _from_registry(self, repository: str, manifest: Manifest) -> IndexedImage | None:
        entries = self.registry.list_referrers(repository, manifest.digest, ARTIFACT_TYPE)
        # Newest first: a later index of the same image (e.g. other chunking parameters) wins.
        entries.sort(key=lambda e: (e.get("annotations") or {}).get("org.opencontainers.image.created", ""),
                     reverse=True)
        for entry in entries:
            try:
                index_data = self._read_artifact(repository, entry, manifest)
                index = decode_index(index_data)
                _check_matches(index, manifest)
            except (RegistryError, IndexFormatError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring index %s of %s@%s: %s", entry.get("digest"), repository, manifest.digest, exc)
                continue
            config = self.registry.get_blob(repository, manifest.config["digest"])
            self.store.put_image(repository, manifest.digest, index_data, manifest.data, config, complete=False)
            self.metrics.inc("chunksync_indexes_found_total", where="registry")
            image = IndexedImage(repository, manifest.digest, manifest.data, config, index_data, index)
            self._remember(image)
            return image
        return None

    def _read_artifact(self, repository: str, entry: dict[str, Any], manifest: Manifest) -> bytes:
        artifact = self.registry.get_raw_manifest(repository, entry["digest"])
        if (artifact.json.get("subject") or {}).get("digest") != manifest.digest:
            raise ValueError("its subject is another manifest")
        layers = [d for d in artifact.layers if d.get("mediaType") == INDEX_LAYER_MEDIA_TYPE]
        if len(layers) != 1:
            raise ValueError(f"want one {INDEX_LAYER_MEDIA_TYPE} layer, found {len(layers)}")
        return self.registry.get_blob(repository, layers[0]["digest"], max_size=MAX_INDEX_BYTES)

    # --- computing ---------------------------------------------------------------------------------------------

    def _index(self, repository: str, manifest: Manifest) -> IndexReport:
        started = time.monotonic()
        with self.holding_store():  # the chunks go in before the record that names them
            try:
                config = self.registry.get_blob(repository, manifest.config["digest"])
                layers, chunked = [], 0
                for descriptor in manifest.layers:
                    layer = self._known_layer(descriptor["digest"])
                    if layer is None:
                        layer = self._index_layer(repository, descriptor)
                        chunked += layer.uncompressed_size
                    layers.append(layer)
            except Exception:
                self.metrics.inc("chunksync_index_failures_total")
                raise
            index = ImageIndex(manifest.digest, layers)
            index_data = index.encode()
            self.store.put_image(repository, manifest.digest, index_data, manifest.data, config, complete=True)
        seconds = time.monotonic() - started
        self.metrics.inc("chunksync_images_indexed_total")
        self.metrics.observe("chunksync_index_seconds", seconds)
        self.metrics.inc("chunksync_indexed_bytes_total", chunked)
        log.info("indexed %s@%s: %d layers, %.1f MB chunked in %.2f s", repository, manifest.digest, len(layers),
                 chunked / 1e6, seconds)
        pushed = self._push(repository, manifest, index, index_data) if self.push else None
        image = IndexedImage(repository, manifest.digest, manifest.data, config, index_data, index, verified=True)
        self._remember(image)
        return IndexReport(image, "computed", seconds, chunked, pushed)

    def _known_layer(self, digest: str) -> LayerIndex | None:
        """A layer already indexed (e.g. the base layer v2 shares with v1) whose chunks are all in the store."""
        with self._lock:
            images = list(self._decoded.values())
        for image in images:
            if not image.verified:
                continue  # an index from the registry may list any ids for a layer digest
            for layer in image.index.layers:
                if layer.digest == digest and image.index.params == DEFAULT_PARAMS:
                    ids = _layer_ids(layer)
                    if set(ids) <= self.store.has_many(ids):
                        return layer
        return None

    def _index_layer(self, repository: str, descriptor: dict[str, Any],
                     params: ChunkParams = DEFAULT_PARAMS) -> LayerIndex:
        """Streams one layer blob through the chunker into the store; memory stays a few MB whatever its size."""
        digest, media_type = descriptor["digest"], descriptor.get("mediaType", "")
        pending: list[tuple[bytes, bytes]] = []
        pending_bytes = 0

        def on_chunk(cid: bytes, data: bytes) -> None:
            nonlocal pending_bytes
            pending.append((cid, bytes(data)))
            pending_bytes += len(data)
            if pending_bytes >= _PUT_BATCH_BYTES:
                flush()

        def flush() -> None:
            nonlocal pending_bytes
            # index_layer computed each id from these very bytes: no need to hash them again.
            self.store.put_many(pending, verify=False)
            pending.clear()
            pending_bytes = 0

        with self.registry.open_blob(repository, digest, descriptor.get("size")) as blob:
            layer = index_layer(blob, media_type, on_chunk, params)
        flush()
        if layer.digest != digest:
            raise RegistryFailed(f"layer {digest} of {repository} has digest {layer.digest}")
        return layer

    def _push(self, repository: str, manifest: Manifest, index: ImageIndex, index_data: bytes) -> str | None:
        """Pushes the index as an OCI 1.1 artifact whose subject is the image; a failure only costs other replicas
        a recomputation, so it is logged, not raised."""
        try:
            self.registry.push_blob(repository, OCI_EMPTY_DATA, OCI_EMPTY_DIGEST)
            index_digest = sha256_digest(index_data)
            self.registry.push_blob(repository, index_data, index_digest)
            artifact = artifact_manifest(manifest, index, index_data)
            return self.registry.push_referrer(repository, artifact, manifest.digest)
        except RegistryError as exc:
            log.warning("could not push the index of %s@%s to the registry: %s", repository, manifest.digest, exc)
            return None

    # --- refilling the store ------------------------------------------------------------------------------------

    def ensure_chunks(self, image: IndexedImage, ids: list[bytes]) -> None:
        """Makes sure the store holds `ids` (chunks of `image`) and that they really are chunks of it: layer blobs
        that hold missing ones are re-chunked, and so are the layers of an unverified index that `ids` touch."""
        wanted = set(ids)
        missing = wanted - self.store.has_many(ids)
        if not missing and image.verified:
            return
        with self.holding_store():
            for descriptor, layer in zip(_manifest_layers(image), image.index.layers):
                layer_ids = layer.chunk_ids()
                if layer_ids & missing or (not image.verified and layer_ids & wanted and not self._is_verified(layer)):
                    self._layers.do(layer.digest, lambda: self._rechunk(image, descriptor, layer))
            still = wanted - self.store.has_many(ids)
            if still:
                raise RegistryFailed(f"{len(still)} chunks of {image.repository}@{image.manifest_digest} are in no "
                                     "layer of the image: its index is wrong")
            if image.verified or all(self._is_verified(layer) for layer in image.index.layers):
                self.store.put_image(image.repository, image.manifest_digest, image.index_data, image.manifest,
                                     image.config, complete=True)
                if not image.verified:
                    self._remember(dataclasses.replace(image, verified=True))

    def holding_store(self) -> AbstractContextManager[None]:
        """The store lock, shared: a `chunksync store gc` on this store waits until the chunks are recorded (and,
        for an answer, sent: server/service.py)."""
        return self.store.lock(on_wait=lambda: log.info("waiting for `chunksync store gc` on %s to finish",
                                                        self.store.path))

    def _is_verified(self, layer: LayerIndex) -> bool:
        with self._lock:
            return _layer_key(layer) in self._verified_layers

    def _rechunk(self, image: IndexedImage, descriptor: dict[str, Any], expected: LayerIndex) -> None:
        if self._is_verified(expected) and set(_layer_ids(expected)) <= self.store.has_many(_layer_ids(expected)):
            return  # a concurrent flight for another image sharing this layer already refilled it
        layer = self._index_layer(image.repository, descriptor, image.index.params)
        self.metrics.inc("chunksync_layers_rechunked_total")
        if layer.chunks.ids != expected.chunks.ids or layer.header_chunks.ids != expected.header_chunks.ids:
            raise RegistryFailed(f"the index of {image.repository}@{image.manifest_digest} does not match layer "
                                 f"{descriptor['digest']}: delete that index from the registry to have it rebuilt")
        with self._lock:
            self._verified_layers.add(_layer_key(expected))


def _layer_key(layer: LayerIndex) -> tuple[str, bytes]:
    """A layer digest and the ids an index says it chunks into: verified together, never the digest alone."""
    ids = hashlib.sha256(bytes(layer.header_chunks.ids))
    ids.update(bytes(layer.chunks.ids))
    return layer.digest, ids.digest()


def _layer_ids(layer: LayerIndex) -> list[bytes]:
    return [cid for cid, _ in layer.all_chunks()]


def _manifest_layers(image: IndexedImage) -> list[dict[str, Any]]:
    return json.loads(image.manifest).get("layers", [])


def _check_matches(index: ImageIndex, manifest: Manifest) -> None:
    if index.manifest_digest != manifest.digest:
        raise ValueError(f"it indexes {index.manifest_digest}")
    if [layer.digest for layer in index.layers] != [d.get("digest") for d in manifest.layers]:
        raise ValueError("its layers are not the manifest's layers")


def artifact_manifest(manifest: Manifest, index: ImageIndex, index_data: bytes) -> bytes:
    """The OCI 1.1 artifact manifest that attaches `index_data` to `manifest` (its subject)."""
    params = index.params
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": OCI_EMPTY_DIGEST, "size": OCI_EMPTY_SIZE},
        "layers": [{"mediaType": INDEX_LAYER_MEDIA_TYPE, "digest": sha256_digest(index_data),
                    "size": len(index_data)}],
        "subject": {"mediaType": manifest.media_type, "digest": manifest.digest, "size": manifest.size},
        "annotations": {
            "org.opencontainers.image.created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dev.chunksync.chunking": f"fastcdc min={params.min_size} avg={params.avg_size} max={params.max_size}",
            "dev.chunksync.chunks": str(sum(len(layer.header_chunks) + len(layer.chunks) for layer in index.layers)),
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()
