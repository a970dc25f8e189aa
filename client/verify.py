"""The registry's chain of trust, checked before anything is written: manifest digest -> config digest ->
rootfs.diff_ids -> the chunk index's layers (reassembled layers are then checked against their diff_ids)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chunkstore.index import ImageIndex, LayerIndex
from chunkstore.oci import IMAGE_MANIFEST_TYPES, sha256_digest


class VerificationError(Exception):
    """Something the server or registry sent does not match the image's digests."""


@dataclass
class Image:
    """An image whose manifest and config are verified; `diff_ids` come from the config."""
    repository: str
    manifest_digest: str
    manifest: bytes
    config: bytes
    manifest_json: dict[str, Any]
    diff_ids: list[str]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.manifest_json["layers"]

    @property
    def config_digest(self) -> str:
        return self.manifest_json["config"]["digest"]

    @property
    def full_pull_bytes(self) -> int:
        """What a plain pull downloads for the layers: their compressed sizes."""
        return sum(int(layer["size"]) for layer in self.layers)


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        raise VerificationError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise VerificationError(f"{what} is not a JSON object")
    return obj


def verify_image(repository: str, manifest_digest: str, manifest: bytes, config: bytes) -> Image:
    """Checks manifest bytes against `manifest_digest` and config bytes against the manifest."""
    actual = sha256_digest(manifest)
    if actual != manifest_digest:
        raise VerificationError(f"manifest bytes hash to {actual}, not {manifest_digest}")
    parsed = _json_object(manifest, "manifest")
    media_type = parsed.get("mediaType")
    if media_type is not None and media_type not in IMAGE_MANIFEST_TYPES:
        raise VerificationError(f"manifest {manifest_digest} is a {media_type}, not an image manifest")
    descriptor = parsed.get("config")
    layers = parsed.get("layers")
    if not isinstance(descriptor, dict) or not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise VerificationError(f"manifest {manifest_digest} has no config descriptor or layers list")
    config_digest = sha256_digest(config)
    if config_digest != descriptor.get("digest") or len(config) != descriptor.get("size"):
        raise VerificationError(f"config is {config_digest} ({len(config)} bytes), the manifest says "
                                f"{descriptor.get('digest')} ({descriptor.get('size')} bytes)")
    diff_ids = (_json_object(config, "config").get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise VerificationError(f"config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff_ids "
                                f"for {len(layers)} layers")
    return Image(repository, manifest_digest, manifest, config, parsed, [str(d) for d in diff_ids])


def verify_layer(image: Image, i: int, layer: LayerIndex) -> None:
    """A layer's index entry must match the manifest's descriptor and the config's diff_id at position i."""
    want = image.layers[i]
    got = (layer.digest, layer.size, layer.media_type, layer.diff_id)
    expected = (want.get("digest"), want.get("size"), want.get("mediaType"), image.diff_ids[i])
    if got != expected:
        raise VerificationError(f"layer {i}: the index says digest, size, media type, diff_id = {got}, "
                                f"the manifest and config say {expected}")


def verify_index(image: Image, index: ImageIndex) -> None:
    if index.manifest_digest != image.manifest_digest:
        raise VerificationError(f"the index is for {index.manifest_digest}, not {image.manifest_digest}")
    if len(index.layers) != len(image.layers):
        raise VerificationError(f"the index has {len(index.layers)} layers, the manifest {len(image.layers)}")
    for i, layer in enumerate(index.layers):
        verify_layer(image, i, layer)
