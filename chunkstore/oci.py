"""OCI names, references, digests and media types: the grammar every registry URL and store path is built from.

Pure and network-free; nothing from outside may reach a URL or a file path without passing a validator here.
"""
from __future__ import annotations

import hashlib
import io
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, BinaryIO

# --- media types -------------------------------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# The OCI 1.1 empty descriptor: the config of artifacts that have no config of their own.
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_EMPTY_DATA = b"{}"
OCI_EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
OCI_EMPTY_SIZE = 2

IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP})

# Registries answer 404 for OCI manifests when no Accept header names them (FACTS.md), so always send all four.
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])

# chunksync's own artifact: a chunk index attached to an image manifest as its referrer.
ARTIFACT_TYPE = "application/vnd.chunksync.index.v1"
INDEX_LAYER_MEDIA_TYPE = "application/vnd.chunksync.index.v1+msgpack"

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

# --- grammar (OCI distribution-spec "Pulling manifests", image-spec "descriptor.md#digests") -----------------------

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# Only algorithms the image-spec registers; an unknown algorithm could not be verified anyway.
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
# host[:port] as docker accepts it: DNS-ish labels, IPv4, or a bracketed IPv6 literal.
_HOST_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?"
)

# Clients limit host[:port]/name to 255 characters; a bare name can be no longer than that either.
MAX_NAME_LENGTH = 255


class InvalidReference(ValueError):
    """A repository, tag, digest, host or image reference that breaks the OCI grammar."""


def _show(value: object) -> str:
    # Messages echo the bad value so users can find it, but never a megabyte of it.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def validate_repository(name: str) -> str:
    """Return `name` if it is a valid OCI repository name (e.g. `library/app`), else raise InvalidReference."""
    if not isinstance(name, str) or not name:
        raise InvalidReference(f"repository name must be a non-empty string, got {_show(name)}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidReference(f"repository name is {len(name)} characters, over {MAX_NAME_LENGTH}: {_show(name)}")
    # fullmatch, not match with `$`: `$` also matches before a trailing newline.
    if not _NAME_RE.fullmatch(name):
        raise InvalidReference(
            f"invalid repository name {_show(name)}: lowercase letters, digits and separators (. _ __ -) "
            "between components, components joined by '/'"
        )
    return name


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid OCI tag (1-128 of [A-Za-z0-9_.-], not starting with '.' or '-')."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise InvalidReference(f"invalid tag {_show(tag)}: want [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")
    return tag


def validate_digest(digest: str) -> str:
    """Return `digest` if it is `sha256:<64 lowercase hex>` (or sha512:<128 hex>), else raise InvalidReference."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise InvalidReference(f"invalid digest {_show(digest)}: want sha256:<64 lowercase hex characters>")
    return digest


def is_digest(reference: str) -> bool:
    """True if `reference` is a valid digest (as opposed to a tag or garbage)."""
    return isinstance(reference, str) and _DIGEST_RE.fullmatch(reference) is not None


def validate_reference(reference: str) -> str:
    """Return `reference` if it is a valid tag or digest (the `<reference>` of a manifest URL)."""
    if isinstance(reference, str) and ":" in reference:
        return validate_digest(reference)
    try:
        return validate_tag(reference)
    except InvalidReference:
        raise InvalidReference(f"invalid reference {_show(reference)}: neither a tag nor a sha256 digest") from None


def validate_host(host: str) -> str:
    """Return `host` if it is a plausible registry `host[:port]` (no scheme, path, user info or spaces)."""
    if not isinstance(host, str) or len(host) > MAX_NAME_LENGTH or not _HOST_RE.fullmatch(host):
        raise InvalidReference(f"invalid registry host {_show(host)}: want host[:port], e.g. 127.0.0.1:5000")
    port = _split_host_port(host)[1]
    if port is not None and not 0 < port < 65536:
        raise InvalidReference(f"invalid port in registry host {_show(host)}")
    return host


def referrers_tag(digest: str) -> str:
    """The referrers tag schema tag for `digest`: `sha256:<hex>` -> `sha256-<hex>` (distribution-spec)."""
    algorithm, encoded = validate_digest(digest).split(":", 1)
    return f"{algorithm[:32]}-{encoded[:64]}"


def sha256_digest(data: bytes) -> str:
    """The OCI digest (`sha256:<hex>`) of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- hosts ---------------------------------------------------------------------------------------------------------


def _split_host_port(host: str) -> tuple[str, int | None]:
    if host.startswith("["):
        literal, _, rest = host[1:].partition("]")
        return literal, int(rest[1:]) if rest.startswith(":") else None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, int(port)
    return host, None


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (with or without a port): docker speaks plain HTTP to those."""
    name = _split_host_port(host)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# --- image references ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference: where the image lives and which version of it is meant."""

    registry: str  # host[:port], e.g. "127.0.0.1:5000" or "docker.io"
    repository: str  # e.g. "library/app"
    tag: str | None  # None when only a digest was given
    digest: str | None  # manifest digest, when pinned

    @property
    def reference(self) -> str:
        """What to put in `/v2/<repo>/manifests/<reference>`: the digest when pinned, otherwise the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _looks_like_host(component: str) -> bool:
    # docker's rule (distribution/reference.splitDockerDomain).
    return "." in component or ":" in component or component == "localhost"


def parse_image_ref(text: str) -> ImageRef:
    """Parse `[host[:port]/]repo[:tag][@digest]` the way docker does; default registry docker.io, tag latest."""
    if not isinstance(text, str) or not text:
        raise InvalidReference(f"image reference must be a non-empty string, got {_show(text)}")
    rest, at, digest = text.partition("@")
    if at:
        validate_digest(digest)
    first, slash, remainder = rest.partition("/")
    if slash and _looks_like_host(first):
        registry, path = validate_host(first), remainder
    else:
        registry, path = DEFAULT_REGISTRY, rest
    # A ':' after the last '/' starts the tag; one before it would be a port, already consumed above.
    name, colon, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "")
    if colon:
        validate_tag(tag)
    if registry == DEFAULT_REGISTRY and "/" not in name:
        name = f"library/{name}"
    validate_repository(name)
    if len(registry) + 1 + len(name) > MAX_NAME_LENGTH:
        raise InvalidReference(f"image name {_show(registry + '/' + name)} is over {MAX_NAME_LENGTH} characters")
    if not colon and not at:
        tag = DEFAULT_TAG
    return ImageRef(registry=registry, repository=name, tag=tag or None, digest=digest or None)


# --- verified streams ----------------------------------------------------------------------------------------------


class DigestMismatch(ValueError):
    """Content does not match the digest (or size) it was fetched or stored under."""


class VerifyingReader(io.RawIOBase):
    """A read-only file object over `source` that checks `digest` (and `size`, if given) when EOF is reached.

    Raises DigestMismatch from the read that hits EOF, so a consumer that reads to the end never sees a silent
    corruption. A consumer that stops early gets no check: call `verify_rest()` to drain and check.
    """

    def __init__(self, source: BinaryIO, digest: str, size: int | None = None) -> None:
        super().__init__()
        self._source = source
        self.digest = validate_digest(digest)
        self.size = size
        self._hash = hashlib.new(self.digest.split(":", 1)[0])
        self.bytes_read = 0
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(len(view))
        if not data:
            self._verify()
            return 0
        n = len(data)
        view[:n] = data
        self._account(data)
        return n

    def read(self, size: int = -1) -> bytes:
        # Loop so read(n) returns n bytes unless at EOF, like a buffered file; stream consumers expect that.
        if size is None or size < 0:
            return self.readall()
        parts: list[bytes] = []
        remaining = size
        while remaining > 0:
            data = self._source.read(remaining)
            if not data:
                self._verify()
                break
            self._account(data)
            parts.append(data)
            remaining -= len(data)
        return b"".join(parts)

    def readall(self) -> bytes:
        parts: list[bytes] = []
        while data := self.read(1 << 20):
            parts.append(data)
        self._verify()
        return b"".join(parts)

    def verify_rest(self) -> None:
        """Read and discard whatever is left, then check the digest."""
        while self.read(1 << 20):
            pass
        self._verify()

    def close(self) -> None:
        try:
            self._source.close()
        finally:
            super().close()

    def _account(self, data: bytes) -> None:
        self._hash.update(data)
        self.bytes_read += len(data)
        if self.size is not None and self.bytes_read > self.size:
            raise DigestMismatch(f"{self.digest}: got more than the expected {self.size} bytes")

    def _verify(self) -> None:
        if self._verified:
            return
        if self.size is not None and self.bytes_read != self.size:
            raise DigestMismatch(f"{self.digest}: got {self.bytes_read} bytes, expected {self.size}")
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self.digest:
            raise DigestMismatch(f"content does not match its digest: expected {self.digest}, got {actual}")
        self._verified = True
