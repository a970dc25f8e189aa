"""RegistryClient against a real docker-registry: manifests, platforms, blobs, pushes, referrers, auth, errors."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chunkstore.oci import (
    ARTIFACT_TYPE,
    DOCKER_MANIFEST,
    INDEX_LAYER_MEDIA_TYPE,
    OCI_EMPTY,
    OCI_EMPTY_DATA,
    OCI_EMPTY_DIGEST,
    OCI_INDEX,
    OCI_MANIFEST,
    DigestMismatch,
    InvalidReference,
    VerifyingReader,
    referrers_tag,
    sha256_digest,
)
from client.registry import (
    Forbidden,
    NotFound,
    PlatformNotFound,
    RegistryClient,
    RegistryError,
    Unauthorized,
)
from helpers import Registry, build_image, free_port, push_image, push_multiarch, real_files


@dataclass(frozen=True)
class Pushed:
    repo: str
    tag: str
    digest: str
    layout: Path


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """A two-layer image pushed once for the module."""
    tmp = tmp_path_factory.mktemp("image")
    layout = build_image(tmp, [real_files(200_000), real_files(150_000, skip=40, prefix="lib/")], "v1")
    digest = push_image(layout, "v1", registry, "test/registry-app")
    return Pushed("test/registry-app", "v1", digest, layout)


@pytest.fixture()
def client(registry: Registry) -> Iterator[RegistryClient]:
    with registry.client() as c:
        yield c


# --- manifests -----------------------------------------------------------------------------------------------------


def test_manifest_by_tag_and_digest(client: RegistryClient, image: Pushed) -> None:
    by_tag = client.get_manifest(image.repo, image.tag)
    assert by_tag.digest == image.digest
    assert by_tag.media_type == OCI_MANIFEST
    assert by_tag.index_digest is None
    assert len(by_tag.layers) == 2
    by_digest = client.get_manifest(image.repo, image.digest)
    assert by_digest.data == by_tag.data
    assert sha256_digest(by_digest.data) == image.digest
    assert client.head_manifest(image.repo, image.tag) == image.digest


def test_docker_media_types(registry: Registry, client: RegistryClient, image: Pushed) -> None:
    digest = push_image(image.layout, image.tag, registry, "test/registry-docker", docker_format=True)
    manifest = client.get_manifest("test/registry-docker", image.tag)
    assert manifest.media_type == DOCKER_MANIFEST and manifest.digest == digest


def test_tampered_content_is_refused(start_registry, tmp_path: Path) -> None:
    # A private registry: we corrupt its storage on disk, as a broken or malicious registry would serve it.
    registry = start_registry()
    layout = build_image(tmp_path, [real_files(100_000)], "v1")
    digest = push_image(layout, "v1", registry, "tamper/app")
    with registry.client() as client:
        manifest = client.get_manifest("tamper/app", "v1")
        layer, config = manifest.layers[0], manifest.config

        def flip_last_byte(digest_: str) -> None:
            path = registry.blob_path(digest_)
            data = bytearray(path.read_bytes())
            data[-1] ^= 0x01
            path.write_bytes(bytes(data))

        flip_last_byte(layer["digest"])
        with client.open_blob("tamper/app", layer["digest"]) as blob, pytest.raises(DigestMismatch):
            while blob.read(10_000):
                pass
        flip_last_byte(config["digest"])
        with pytest.raises(DigestMismatch):
            client.get_blob("tamper/app", config["digest"])
        # Keep the manifest valid JSON (the registry parses it before serving) but change its bytes.
        path = registry.blob_path(digest)
        path.write_bytes(path.read_bytes().replace(b'"schemaVersion":', b'"schemaVersion": ', 1))
        with pytest.raises(DigestMismatch, match="tamper/app"):
            client.get_raw_manifest("tamper/app", digest)
        with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
            client.get_raw_manifest("tamper/app", "v1")
    registry.stop()


# --- platforms -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multiarch(registry: Registry, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("multi")
    return push_multiarch(tmp, registry, "test/registry-multi", "v1", {
        "linux/amd64": [real_files(60_000)],
        "linux/arm64/v8": [real_files(60_000, skip=5)],
        "linux/arm/v7": [real_files(60_000, skip=9)],
    })


def test_platform_selection(client: RegistryClient, multiarch) -> None:
    raw = client.get_raw_manifest("test/registry-multi", "v1")
    assert raw.is_index and raw.media_type == OCI_INDEX and raw.digest == multiarch.index_digest
    default = client.get_manifest("test/registry-multi", "v1")
    assert default.digest == multiarch.manifests["linux/amd64"]
    assert default.index_digest == multiarch.index_digest
    for asked in ("linux/arm64", "linux/arm64/v8"):
        assert client.get_manifest("test/registry-multi", "v1", asked).digest == multiarch.manifests["linux/arm64/v8"]
    arm = client.get_manifest("test/registry-multi", multiarch.index_digest, "linux/arm/v7")
    assert arm.digest == multiarch.manifests["linux/arm/v7"]
    config = json.loads(client.get_blob("test/registry-multi", arm.config["digest"]))
    assert (config["architecture"], config["variant"]) == ("arm", "v7")


def test_missing_platform_lists_available(client: RegistryClient, multiarch) -> None:
    with pytest.raises(PlatformNotFound) as err:
        client.get_manifest("test/registry-multi", "v1", "linux/s390x")
    message = str(err.value)
    assert "linux/s390x" in message
    assert all(p in message for p in ("linux/amd64", "linux/arm64/v8", "linux/arm/v7"))
    with pytest.raises(PlatformNotFound):
        client.get_manifest("test/registry-multi", "v1", "linux/arm/v6")


# --- blobs ---------------------------------------------------------------------------------------------------------


def test_blob_streaming_is_verified(client: RegistryClient, image: Pushed) -> None:
    layer = client.get_manifest(image.repo, image.tag).layers[0]
    sha = hashlib.sha256()
    with client.open_blob(image.repo, layer["digest"], size=layer["size"]) as blob:
        while part := blob.read(7_000):
            assert len(part) == 7_000 or blob.bytes_read == layer["size"]
            sha.update(part)
    assert "sha256:" + sha.hexdigest() == layer["digest"]
    assert blob.bytes_read == layer["size"]


def test_verifying_reader_rejects_wrong_content() -> None:
    data = b"x" * 100_000
    assert VerifyingReader(io.BytesIO(data), sha256_digest(data)).read() == data
    with pytest.raises(DigestMismatch):
        VerifyingReader(io.BytesIO(data + b"!"), sha256_digest(data)).read()
    with pytest.raises(DigestMismatch, match="bytes"):
        VerifyingReader(io.BytesIO(data), sha256_digest(data), size=99).read()
    reader = VerifyingReader(io.BytesIO(data[:-1] + b"y"), sha256_digest(data))
    reader.read(10)
    with pytest.raises(DigestMismatch):
        reader.verify_rest()


class DroppingProxy:
    """A real TCP proxy that cuts its first connection after `cut_after` bytes of response, then behaves."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.cut_after = cut_after
        self.target_port = target_port
        self.connections = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pipe, args=(conn, limit), daemon=True).start()

    def _pipe(self, conn: socket.socket, limit: int | None) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def forward_requests() -> None:
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    upstream.sendall(data)

        threading.Thread(target=forward_requests, daemon=True).start()
        sent = 0
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    conn.sendall(data[: limit - sent])
                    break
                conn.sendall(data)
                sent += len(data)
        for s in (conn, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.server.close()


def test_blob_download_resumes_after_dropped_connection(registry: Registry, image: Pushed) -> None:
    layer = RegistryClient(registry.url).get_manifest(image.repo, image.tag).layers[0]
    proxy = DroppingProxy(int(registry.host.rsplit(":", 1)[1]), cut_after=50_000)
    try:
        with RegistryClient(f"http://127.0.0.1:{proxy.port}", backoff=0.01) as client:
            with client.open_blob(image.repo, layer["digest"]) as blob:
                data = blob.read()
        assert sha256_digest(data) == layer["digest"]
        assert proxy.connections >= 2
    finally:
        proxy.close()


# --- pushes --------------------------------------------------------------------------------------------------------


def test_push_blob_and_manifest(client: RegistryClient, tmp_path: Path) -> None:
    repo = "test/registry-push"
    content = b"".join(real_files(120_000).values())
    path = tmp_path / "blob"
    path.write_bytes(content)
    digest = sha256_digest(content)
    with path.open("rb") as f:
        assert client.push_blob(repo, f, digest) is True
    assert client.push_blob(repo, content, digest) is False  # already there
    assert client.push_blob(repo, OCI_EMPTY_DATA, OCI_EMPTY_DIGEST) is True
    assert client.blob_exists(repo, digest)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": OCI_EMPTY_DIGEST, "size": 2},
        "layers": [{"mediaType": INDEX_LAYER_MEDIA_TYPE, "digest": digest, "size": len(content)}],
    }).encode()
    manifest_digest = client.push_manifest(repo, "artifact", manifest, OCI_MANIFEST)
    assert manifest_digest == sha256_digest(manifest)
    got = client.get_raw_manifest(repo, "artifact")
    assert got.data == manifest and got.digest == manifest_digest
    assert client.get_blob(repo, digest) == content
    # Cross-repository mount: no bytes uploaded.
    assert client.push_blob("test/registry-push-mounted", content, digest, mount_from=repo) is False
    assert client.get_blob("test/registry-push-mounted", digest) == content
    with pytest.raises(DigestMismatch):
        client.push_manifest(repo, OCI_EMPTY_DIGEST, manifest, OCI_MANIFEST)
    with pytest.raises(RegistryError, match="DIGEST_INVALID"):
        client.push_blob(repo, b"not the content", sha256_digest(b"other content"))


# --- referrers -----------------------------------------------------------------------------------------------------


def _artifact(client: RegistryClient, repo: str, subject: str, subject_size: int, payload: bytes,
              annotations: dict[str, str]) -> bytes:
    client.push_blob(repo, OCI_EMPTY_DATA, OCI_EMPTY_DIGEST)
    client.push_blob(repo, payload, sha256_digest(payload))
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": OCI_EMPTY_DIGEST, "size": 2},
        "layers": [{"mediaType": INDEX_LAYER_MEDIA_TYPE, "digest": sha256_digest(payload), "size": len(payload)}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size},
        "annotations": annotations,
    }).encode()


def test_referrers_tag_schema(client: RegistryClient, image: Pushed) -> None:
    subject = client.get_manifest(image.repo, image.tag)
    assert client.list_referrers(image.repo, subject.digest) == []
    first = _artifact(client, image.repo, subject.digest, len(subject.data), b"index one", {"n": "1"})
    second = _artifact(client, image.repo, subject.digest, len(subject.data), b"index two", {"n": "2"})
    d1 = client.push_referrer(image.repo, first, subject.digest)
    d2 = client.push_referrer(image.repo, second)
    d2_again = client.push_referrer(image.repo, second)  # idempotent: no duplicate entry
    assert d2 == d2_again
    listed = client.list_referrers(image.repo, subject.digest)
    assert sorted(e["digest"] for e in listed) == sorted([d1, d2])
    by_digest = {e["digest"]: e for e in listed}
    assert by_digest[d1]["artifactType"] == ARTIFACT_TYPE
    assert by_digest[d1]["annotations"] == {"n": "1"} and by_digest[d2]["annotations"] == {"n": "2"}
    assert by_digest[d1]["size"] == len(first)
    assert client.list_referrers(image.repo, subject.digest, artifact_type=ARTIFACT_TYPE) == listed
    assert client.list_referrers(image.repo, subject.digest, artifact_type="application/other") == []
    # The tag schema index is a real OCI index at sha256-<hex>.
    assert client.get_raw_manifest(image.repo, referrers_tag(subject.digest)).media_type == OCI_INDEX
    with pytest.raises(ValueError, match="subject"):
        client.push_referrer(image.repo, first, OCI_EMPTY_DIGEST)


# --- auth and errors ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_image(auth_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = build_image(tmp_path_factory.mktemp("auth"), [real_files(50_000)], "v1")
    return push_image(layout, "v1", auth_registry, "private/app", creds=auth_registry.creds("alice"))


def test_auth_required(auth_registry: Registry, auth_image: str) -> None:
    with auth_registry.client() as anonymous:
        with pytest.raises(Unauthorized, match="401"):
            anonymous.get_manifest("private/app", "v1")
        with pytest.raises(Unauthorized):
            anonymous.ping()
    with auth_registry.client("alice") as alice:
        alice.ping()
        assert alice.get_manifest("private/app", "v1").digest == auth_image
        assert alice.head_manifest("private/app", auth_image) == auth_image
    with RegistryClient(auth_registry.url, username="alice", password="wrong") as wrong:
        with pytest.raises(Unauthorized):
            wrong.head_manifest("private/app", "v1")


def test_authorization_passthrough(auth_registry: Registry, auth_image: str) -> None:
    header = "Basic " + base64.b64encode(b"bob:secret2").decode()
    with RegistryClient(auth_registry.url, authorization=header) as device:
        assert device.head_manifest("private/app", "v1") == auth_image
        layer = device.get_manifest("private/app", "v1").layers[0]
        with device.open_blob("private/app", layer["digest"]) as blob:
            assert sha256_digest(blob.read()) == layer["digest"]
    bad = "Basic " + base64.b64encode(b"bob:nope").decode()
    with RegistryClient(auth_registry.url, authorization=bad) as device, pytest.raises(Unauthorized):
        device.head_manifest("private/app", "v1")


def test_not_found(client: RegistryClient, image: Pushed) -> None:
    with pytest.raises(NotFound, match="NAME_UNKNOWN|MANIFEST_UNKNOWN"):
        client.get_manifest("test/no-such-repo", "v1")
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
        client.get_manifest(image.repo, "no-such-tag")
    with pytest.raises(NotFound):
        client.head_manifest(image.repo, "no-such-tag")
    with pytest.raises(NotFound, match="BLOB_UNKNOWN"):
        client.get_blob(image.repo, sha256_digest(b"never pushed"))
    assert not client.blob_exists(image.repo, sha256_digest(b"never pushed"))
    assert issubclass(Forbidden, RegistryError)


@pytest.mark.parametrize("repo, ref", [("../etc", "v1"), ("a/../b", "v1"), ("App", "v1"), ("ok", "../x"),
                                       ("ok", "a/b"), ("ok", "sha256:zz"), ("%2e%2e", "v1")])
def test_invalid_names_never_reach_the_registry(client: RegistryClient, repo: str, ref: str) -> None:
    with pytest.raises(InvalidReference):
        client.get_manifest(repo, ref)


def test_connection_errors_are_retried_then_raised() -> None:
    with RegistryClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as dead:
        with pytest.raises(RegistryError, match="ConnectError"):
            dead.ping()


def test_helpers_build_versions_sharing_layers(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    # v2 = v1 + a layer that adds a directory's files and deletes one of v1's files (a whiteout).
    v1_files = real_files(80_000)
    layout = build_image(tmp_path, [v1_files], "v1")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "new.txt").write_bytes(b"new in v2\n")
    gone = next(iter(v1_files))
    build_image(tmp_path, [extra, {gone: None}], "v2", layout=layout, base_tag="v1")
    v1 = client.get_manifest("test/helpers", push_image(layout, "v1", registry, "test/helpers"))
    v2 = client.get_manifest("test/helpers", push_image(layout, "v2", registry, "test/helpers"))
    assert len(v1.layers) == 1 and len(v2.layers) == 3
    assert v2.layers[0]["digest"] == v1.layers[0]["digest"]
