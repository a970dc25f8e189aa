"""Plain pulls from the registry, for when the server cannot help: the image's config and layer blobs, each
layer streamed once, verified (digest, diff_id) and chunked into the store so the next diff pull profits."""
from __future__ import annotations

from chunkstore.chunker import DEFAULT_PARAMS, ChunkParams
from chunkstore.index import LayerIndex, index_layer
from chunkstore.layers import LayerFormatError
from chunkstore.oci import DigestMismatch
from chunkstore.store import ChunkWriter, LocalStore
from client.registry import Manifest, RegistryClient

from .verify import Image, VerificationError, verify_image, verify_layer


def fetch_image(registry: RegistryClient, repository: str, manifest: Manifest) -> Image:
    """The manifest (already verified by the registry client) with its config, checked against each other."""
    config = registry.get_blob(repository, manifest.config["digest"])
    return verify_image(repository, manifest.digest, manifest.data, config)


def pull_layer(registry: RegistryClient, image: Image, i: int, store: LocalStore,
               params: ChunkParams = DEFAULT_PARAMS) -> LayerIndex:
    """Streams layer `i`'s blob once: checks its digest and diff_id, stores its chunks, returns its index.

    Chunks reach the store while the blob streams, in bounded batches; memory never holds the layer.
    """
    descriptor = image.layers[i]
    sink = ChunkWriter(store)
    try:
        with registry.open_blob(image.repository, descriptor["digest"], descriptor.get("size")) as blob:
            layer = index_layer(blob, descriptor.get("mediaType", ""), on_chunk=sink, params=params)
    except (DigestMismatch, LayerFormatError) as exc:
        raise VerificationError(f"layer {i} from the registry: {exc}") from None
    sink.flush()
    verify_layer(image, i, layer)
    return layer

