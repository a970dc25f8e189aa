"""Writing images into an OCI image layout (`oci:DIR[:TAG]`) atomically: blobs first, index.json replaced last."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chunkstore.atomic import atomic_file
from chunkstore.oci import OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST, sha256_digest, validate_digest, validate_tag

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}


class LayoutError(ValueError):
    """A layout that cannot be written to, or a bad `oci:` argument."""


@dataclass(frozen=True)
class LayoutTarget:
    path: Path
    tag: str | None  # None: use the pulled tag


def parse_target(text: str) -> LayoutTarget:
    """`oci:DIR[:TAG]`, as skopeo writes it."""
    if not text.startswith("oci:") or len(text) == 4:
        raise LayoutError(f"output {text!r} is not oci:DIR[:TAG], e.g. oci:/var/lib/images:app")
    rest = text[4:]
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not path:
        return LayoutTarget(Path(rest), None)
    try:
        return LayoutTarget(Path(path), validate_tag(tag))
    except ValueError as exc:
        raise LayoutError(f"output {text!r}: {exc}") from None


@dataclass(frozen=True)
class LayerBlob:
    diff_id: str  # the layout stores layers uncompressed, so their digest is the diff_id
    size: int


def build_manifest(config: bytes, layers: list[LayerBlob], annotations: dict[str, str] | None = None) -> bytes:
    """An OCI manifest for the registry's config bytes (same image ID) and the uncompressed layers."""
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": layer.diff_id, "size": layer.size} for layer in layers],
    }
    if annotations:
        manifest["annotations"] = annotations
    return json.dumps(manifest, separators=(",", ":")).encode()


def _file_digest(path: Path) -> tuple[str, int]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            sha.update(data)
            size += len(data)
    return "sha256:" + sha.hexdigest(), size


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


class Layout:
    """An OCI image layout directory, created on first use. Several images (tags) live side by side."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LayoutError(f"cannot create OCI layout {self.path}: {exc.strerror}") from None
        marker = self.path / "oci-layout"
        if not marker.exists():
            _write_atomic(marker, json.dumps(LAYOUT_FILE).encode())

    def blob_path(self, digest: str) -> Path:
        algorithm, hexdigest = validate_digest(digest).split(":")
        return self.path / "blobs" / algorithm / hexdigest

    def has_blob(self, digest: str, size: int) -> bool:
        """True if the blob is there and really is `digest` (a layout may be shared with other tools)."""
        path = self.blob_path(digest)
        if not path.is_file() or path.stat().st_size != size:
            return False
        return _file_digest(path) == (digest, size)

    def put_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if not self.has_blob(digest, len(data)):
            _write_atomic(self.blob_path(digest), data)
        return digest

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two pulls into one layout must not lose each other's index.json entries.
        with open(self.path / ".index.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def tag_manifest(self, manifest: bytes, tag: str) -> str:
        """Stores the manifest and points `tag` at it in index.json (replaced in one rename, last of all)."""
        validate_tag(tag)
        digest = self.put_blob(manifest)
        entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest), "annotations": {REF_NAME: tag}}
        with self._locked():
            index_path = self.path / "index.json"
            index: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            if index_path.exists():
                try:
                    index = json.loads(index_path.read_text())
                except ValueError:
                    raise LayoutError(f"{index_path} is not JSON; it is not an OCI layout this can add to") from None
            kept = [m for m in index.get("manifests") or [] if (m.get("annotations") or {}).get(REF_NAME) != tag]
            index["manifests"] = kept + [entry]
            _write_atomic(index_path, json.dumps(index, indent=1).encode())
        return digest

    def manifest_for(self, tag: str) -> dict | None:
        """The manifest `tag` points at, or None."""
        index_path = self.path / "index.json"
        if not index_path.exists():
            return None
        for entry in json.loads(index_path.read_text()).get("manifests") or []:
            if (entry.get("annotations") or {}).get(REF_NAME) == tag:
                return json.loads(self.blob_path(entry["digest"]).read_bytes())
        return None
