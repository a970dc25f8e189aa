"""A client for the OCI distribution API: manifests, blobs, uploads and referrers, with Basic and Bearer token auth.

Shared by the device (fallback pulls, tag resolution) and the server (reading images, pushing chunk indexes).
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import httpx

from chunkstore.oci import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    DigestMismatch,
    VerifyingReader,
    is_digest,
    referrers_tag,
    sha256_digest,
    validate_digest,
    validate_reference,
    validate_repository,
)

__all__ = [
    "DigestMismatch",
    "Forbidden",
    "Manifest",
    "NotFound",
    "Platform",
    "PlatformNotFound",
    "RegistryClient",
    "RegistryError",
    "Unauthorized",
]

# distribution rejects manifests over 4 MiB; anything bigger from a registry is not a manifest we should parse.
MAX_MANIFEST_SIZE = 4 << 20
DEFAULT_MAX_BLOB_SIZE = 16 << 20
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHUNK = 1 << 16


# --- errors --------------------------------------------------------------------------------------------------------


class RegistryError(Exception):
    """The registry refused or failed a request; `status` and the registry's own error `code`/`message` if any."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Unauthorized(RegistryError):
    """401: no credentials, or credentials the registry does not accept."""


class Forbidden(RegistryError):
    """403: the credentials are valid but may not do this."""


class NotFound(RegistryError):
    """404: unknown repository, manifest, tag or blob."""


class UntrustedCertificate(RegistryError):
    """The registry's TLS certificate did not verify: not retried, and not taken for an unreachable registry."""


class PlatformNotFound(RegistryError):
    """An image index has no manifest for the requested platform."""


# --- platforms and manifests ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """An `os/architecture[/variant]` as written in image index entries."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: want os/arch[/variant], e.g. linux/arm64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_descriptor(cls, descriptor: dict[str, Any]) -> Platform | None:
        p = descriptor.get("platform")
        if not isinstance(p, dict) or not p.get("os") or not p.get("architecture"):
            return None
        return cls(str(p["os"]), str(p["architecture"]), p.get("variant") or None)

    def matches(self, other: Platform) -> bool:
        """True if an index entry for `other` runs where `self` was asked for."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.variant is None:
            return True
        # containerd's normalisation: arm64 without a variant means v8.
        default = "v8" if self.architecture == "arm64" else None
        return self.variant == (other.variant or default)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Manifest:
    """A manifest as the registry stored it: exact bytes, their digest, media type and parsed JSON."""

    data: bytes
    digest: str
    media_type: str
    json: dict[str, Any] = field(repr=False)
    index_digest: str | None = None  # the image index this manifest was picked from, if any

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def config(self) -> dict[str, Any]:
        return self.json["config"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.json.get("layers", [])


# --- auth ----------------------------------------------------------------------------------------------------------

_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]+))')


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in
              _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def _error_details(response: httpx.Response) -> tuple[str | None, str]:
    """The first (code, message) of a distribution error body, or the start of the raw text when it is not one."""
    try:
        first = response.json()["errors"][0]
        return first.get("code"), first.get("message") or ""
    except Exception:
        pass
    try:
        return None, response.text.strip()[:200]
    except httpx.ResponseNotRead:
        return None, ""


# --- the client ----------------------------------------------------------------------------------------------------


class RegistryClient:
    """The OCI distribution API of one registry, over one pooled httpx.Client.

    `base_url` is e.g. `http://127.0.0.1:5000`; choosing http (loopback) or https is the caller's decision.
    Credentials: `username`/`password`, or `authorization`, a raw `Authorization` header value passed through
    from a device (`Basic ...` is also used to get Bearer tokens, anything else is sent as is).
    """

    def __init__(
        self,
        base_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        authorization: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"registry base_url must start with http:// or https://, got {base_url!r}")
        self._basic: str | None = None
        self._fixed_authorization: str | None = None
        if username is not None:
            pair = f"{username}:{password or ''}".encode()
            self._basic = "Basic " + base64.b64encode(pair).decode()
        elif authorization:
            if authorization.lower().startswith("basic "):
                self._basic = authorization
            else:
                self._fixed_authorization = authorization
        self.retries = retries
        self.backoff = backoff
        # Learned from the first 401: "basic" or "bearer"; until then requests go out anonymous.
        self._scheme: str | None = None
        self._tokens: dict[str, str] = {}
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, follow_redirects=True, transport=transport,
            headers={"User-Agent": "chunksync"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _auth_header(self, scope: str | None) -> str | None:
        if self._fixed_authorization:
            return self._fixed_authorization
        if self._scheme == "basic":
            return self._basic
        token = self._tokens.get(scope or "") if self._scheme == "bearer" else None
        if token:
            return "Bearer " + token
        return None

    def _fetch_token(self, params: dict[str, str], scope: str | None) -> None:
        realm = params.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise Unauthorized(f"registry sent a Bearer challenge without a usable realm: {realm!r}", status=401)
        query = {"service": params["service"]} if "service" in params else {}
        wanted = params.get("scope") or scope
        if wanted:
            query["scope"] = wanted
        headers = {"Authorization": self._basic} if self._basic else {}
        # A separate request on purpose: the realm is often another host, so no registry headers or cookies.
        try:
            response = httpx.get(realm, params=query, headers=headers, timeout=self._http.timeout,
                                 follow_redirects=True)
        except httpx.TransportError as exc:
            raise RegistryError(f"token service {realm}: {exc!r}") from exc
        if response.status_code in (401, 403):
            raise Unauthorized(f"token service {realm} refused the credentials ({response.status_code})",
                               status=response.status_code)
        if response.status_code != 200:
            raise RegistryError(f"token service {realm} answered {response.status_code}", status=response.status_code)
        body = response.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"token service {realm} returned no token")
        self._tokens[scope or ""] = token

    def _send(self, method: str, url: str, *, headers: dict[str, str], content: Any, stream: bool,
              scope: str | None) -> httpx.Response:
        auth = self._auth_header(scope)
        if auth:
            headers = {**headers, "Authorization": auth}
        request = self._http.build_request(method, url, headers=headers, content=content)
        return self._http.send(request, stream=stream)

    def _request(
        self,
        method: str,
        url: str,
        *,
        repo: str | None = None,
        push: bool = False,
        headers: dict[str, str] | None = None,
        content: bytes | BinaryIO | None = None,
        stream: bool = False,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        """Send with auth and retries; return the response if its status is in `ok`, else raise RegistryError."""
        headers = dict(headers or {})
        scope = f"repository:{repo}:{'pull,push' if push else 'pull'}" if repo else None
        rewind = self._rewinder(content)
        auth_retried = False
        attempt = 0
        while True:
            if not rewind():
                raise RegistryError(f"{method} {self.base_url}{url}: cannot resend a body that is not seekable")
            try:
                response = self._send(method, url, headers=headers, content=content, stream=stream, scope=scope)
            except httpx.TransportError as exc:
                if (reason := _certificate_failure(exc)) is not None:
                    raise UntrustedCertificate(
                        f"{method} {self.base_url}{url}: the registry's TLS certificate does not verify ({reason}); "
                        "if a private CA signed it, point SSL_CERT_FILE at that CA's certificate") from exc
                if attempt >= self.retries:
                    raise RegistryError(f"{method} {self.base_url}{url}: {exc!r}") from exc
                self._sleep(attempt, None)
                attempt += 1
                continue
            status = response.status_code
            if status == 401 and not auth_retried and self._fixed_authorization is None:
                scheme, params = _parse_challenge(response.headers.get("WWW-Authenticate", ""))
                if scheme == "bearer":
                    response.close()
                    self._scheme = "bearer"
                    self._fetch_token(params, scope)  # anonymous tokens are fine: public images on token registries
                    auth_retried = True
                    continue
                if scheme == "basic" and self._basic and self._scheme != "basic":
                    response.close()
                    self._scheme = "basic"
                    auth_retried = True
                    continue
            if status in ok:
                return response
            if status in _RETRY_STATUSES and attempt < self.retries:
                retry_after = response.headers.get("Retry-After")
                response.close()
                self._sleep(attempt, retry_after)
                attempt += 1
                continue
            raise self._error(method, url, response)

    @staticmethod
    def _rewinder(content: bytes | BinaryIO | None) -> Callable[[], bool]:
        """A function that puts a file-object body back at its start before each send; False if it cannot."""
        if content is None or isinstance(content, bytes):
            return lambda: True
        try:
            start = content.tell() if content.seekable() else None
        except OSError:
            start = None
        sent = [False]

        def rewind() -> bool:
            if start is None:
                first, sent[0] = not sent[0], True
                return first
            content.seek(start)
            return True

        return rewind

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt) * (1 + random.random() / 2)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 30.0))
        time.sleep(delay)

    def _error(self, method: str, url: str, response: httpx.Response) -> RegistryError:
        with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
            response.read()
        response.close()
        code, message = _error_details(response)
        status = response.status_code
        where = f"{method} {self.base_url}{url}"
        detail = " ".join(part for part in (code, message) if part)
        detail = f" {detail}" if detail else ""
        cls = {401: Unauthorized, 403: Forbidden, 404: NotFound}.get(status, RegistryError)
        hint = {401: " (missing or wrong registry credentials)", 403: " (credentials lack permission)"}.get(status, "")
        return cls(f"{where} -> {status}{detail}{hint}", status=status, code=code)

    # --- API version check -------------------------------------------------------------------------------------

    def ping(self) -> None:
        """GET /v2/: raise unless the registry speaks the distribution API (and accepts our credentials)."""
        self._request("GET", "/v2/").close()

    # --- manifests -------------------------------------------------------------------------------------------

    def _read_capped(self, response: httpx.Response, cap: int, what: str) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            response.close()
            raise RegistryError(f"{what} is {declared} bytes, over the {cap}-byte limit")
        parts, total = [], 0
        try:
            for part in response.iter_bytes(_CHUNK):
                total += len(part)
                if total > cap:
                    response.close()
                    raise RegistryError(f"{what} is over the {cap}-byte limit")
                parts.append(part)
        except httpx.TransportError as exc:  # the connection broke inside the body: no status, like unreachable
            raise RegistryError(f"{what}: the answer broke off after {total} bytes: {exc!r}") from exc
        return b"".join(parts)

    def get_raw_manifest(self, repo: str, reference: str) -> Manifest:
        """The manifest or index at `reference` (tag or digest), bytes verified, no platform resolution."""
        validate_repository(repo)
        validate_reference(reference)
        url = f"/v2/{repo}/manifests/{reference}"
        response = self._request("GET", url, repo=repo, headers={"Accept": MANIFEST_ACCEPT}, stream=True)
        with contextlib.closing(response):
            data = self._read_capped(response, MAX_MANIFEST_SIZE, f"manifest {repo}:{reference}")
            header_digest = response.headers.get("Docker-Content-Digest")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        digest = sha256_digest(data)
        if is_digest(reference) and reference != digest:
            raise DigestMismatch(f"manifest {repo}@{reference}: registry returned content with digest {digest}")
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise DigestMismatch(f"manifest {repo}:{reference}: Docker-Content-Digest {header_digest} "
                                 f"does not match the content ({digest})")
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise RegistryError(f"manifest {repo}:{reference} is not JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise RegistryError(f"manifest {repo}:{reference} is not a JSON object")
        body_type = parsed.get("mediaType")
        if body_type and content_type and body_type != content_type:
            raise RegistryError(f"manifest {repo}:{reference}: Content-Type {content_type!r} does not match its "
                                f"mediaType {body_type!r}")
        media_type = body_type or content_type
        if not media_type:
            # OCI manifests may omit mediaType; an index is recognised by its manifests list.
            media_type = OCI_INDEX if "manifests" in parsed else OCI_MANIFEST
        return Manifest(data=data, digest=digest, media_type=media_type, json=parsed)

    def get_manifest(self, repo: str, reference: str, platform: str = "linux/amd64") -> Manifest:
        """The image manifest at `reference`; an index or manifest list is resolved to `platform`'s entry."""
        top = self.get_raw_manifest(repo, reference)
        if not top.is_index:
            if top.media_type not in IMAGE_MANIFEST_TYPES:
                raise RegistryError(f"{repo}:{reference} has unsupported media type {top.media_type!r}")
            return top
        wanted = Platform.parse(platform)
        entries = top.json.get("manifests") or []
        choice = self._pick_platform(entries, wanted)
        if choice is None:
            available = sorted({str(p) for e in entries if (p := Platform.from_descriptor(e)) and p.os != "unknown"})
            raise PlatformNotFound(
                f"{repo}:{reference} has no image for platform {wanted}; available: {', '.join(available) or 'none'}")
        child = self.get_raw_manifest(repo, validate_digest(choice["digest"]))
        if child.media_type not in IMAGE_MANIFEST_TYPES:
            raise RegistryError(f"{repo}@{child.digest}: index entry for {wanted} is a {child.media_type}, "
                                "not an image manifest")
        return Manifest(child.data, child.digest, child.media_type, child.json, index_digest=top.digest)

    @staticmethod
    def _pick_platform(entries: list[dict[str, Any]], wanted: Platform) -> dict[str, Any] | None:
        matches = [e for e in entries if (p := Platform.from_descriptor(e)) and wanted.matches(p)]
        if not matches or wanted.variant is not None:
            return matches[0] if matches else None
        # No variant asked for: prefer an entry without one, else the newest (v8 over v7 over v6).
        return max(matches, key=lambda e: (not e["platform"].get("variant"), e["platform"].get("variant") or ""))

    def head_manifest(self, repo: str, reference: str) -> str:
        """The digest of the manifest at `reference`, without its body; cheap check that we may pull it."""
        validate_repository(repo)
        validate_reference(reference)
        response = self._request("HEAD", f"/v2/{repo}/manifests/{reference}", repo=repo,
                                 headers={"Accept": MANIFEST_ACCEPT})
        digest = response.headers.get("Docker-Content-Digest")
        if digest:
            return validate_digest(digest)
        # Older registries omit the header on HEAD; the body is then the only way to know.
        return self.get_raw_manifest(repo, reference).digest

    def push_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest or index at `reference` (a tag, or its own digest); return its digest."""
        validate_repository(repo)
        validate_reference(reference)
        digest = sha256_digest(data)
        if is_digest(reference) and reference != digest:
            raise DigestMismatch(f"manifest pushed as {reference} has digest {digest}")
        response = self._request("PUT", f"/v2/{repo}/manifests/{reference}", repo=repo, push=True,
                                 headers={"Content-Type": media_type}, content=data, ok=(200, 201, 202))
        response.close()
        returned = response.headers.get("Docker-Content-Digest")
        if returned and returned.startswith("sha256:") and returned != digest:
            raise DigestMismatch(f"registry stored manifest as {returned}, we computed {digest}")
        return digest

    def delete_manifest(self, repo: str, digest: str) -> None:
        """DELETE a manifest by digest (registries need `delete: enabled`)."""
        validate_repository(repo)
        validate_digest(digest)
        self._request("DELETE", f"/v2/{repo}/manifests/{digest}", repo=repo, push=True, ok=(200, 202)).close()

    def list_tags(self, repo: str) -> list[str]:
        """All tags of `repo` (following pagination)."""
        validate_repository(repo)
        tags: list[str] = []
        url: str | None = f"/v2/{repo}/tags/list"
        while url:
            response = self._request("GET", url, repo=repo)
            tags.extend(response.json().get("tags") or [])
            url = self._next_link(response)
        return tags

    def _next_link(self, response: httpx.Response) -> str | None:
        link = response.links.get("next", {}).get("url")
        if not link:
            return None
        # Only follow links on the same registry, so a registry cannot send our credentials elsewhere.
        target = httpx.URL(self.base_url).join(link)
        if (target.scheme, target.host, target.port) != (self._http.base_url.scheme, self._http.base_url.host,
                                                         self._http.base_url.port):
            raise RegistryError(f"registry pagination link points elsewhere: {link!r}")
        return str(target.raw_path.decode())

    # --- blobs -------------------------------------------------------------------------------------------------

    def blob_exists(self, repo: str, digest: str) -> bool:
        """HEAD the blob: True if the repository has it."""
        validate_repository(repo)
        validate_digest(digest)
        try:
            self._request("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo).close()
        except NotFound:
            return False
        return True

    def get_blob(self, repo: str, digest: str, max_size: int = DEFAULT_MAX_BLOB_SIZE) -> bytes:
        """A small blob (config, index artifact) as verified bytes; refuses blobs over `max_size`."""
        validate_repository(repo)
        validate_digest(digest)
        response = self._request("GET", f"/v2/{repo}/blobs/{digest}", repo=repo, stream=True)
        with contextlib.closing(response):
            data = self._read_capped(response, max_size, f"blob {repo}@{digest}")
        reader = VerifyingReader(io.BytesIO(data), digest, len(data))
        reader.verify_rest()
        return data

    @contextlib.contextmanager
    def open_blob(self, repo: str, digest: str, size: int | None = None) -> Iterator[VerifyingReader]:
        """A streaming, sha256-verified file object over a blob; raises DigestMismatch at EOF if it is wrong.

        A dropped connection is resumed with a Range request from where it broke.
        """
        validate_repository(repo)
        validate_digest(digest)
        raw = _BlobStream(self, repo, digest)
        try:
            yield VerifyingReader(raw, digest, size if size is not None else raw.length)
        finally:
            raw.close()

    def push_blob(self, repo: str, data: bytes | BinaryIO, digest: str, *, size: int | None = None,
                  mount_from: str | None = None) -> bool:
        """Upload a blob (bytes or a file object read from its current position) unless the repo already has it.

        Returns True if bytes were uploaded, False if the blob was already there or mounted from `mount_from`.
        """
        validate_repository(repo)
        validate_digest(digest)
        if self.blob_exists(repo, digest):
            return False
        if mount_from is not None:
            validate_repository(mount_from)
            response = self._request("POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={mount_from}",
                                     repo=repo, push=True, ok=(201, 202))
            response.close()
            if response.status_code == 201:
                return False
        else:
            response = self._request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo, push=True, ok=(202,))
            response.close()
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"upload to {repo} started without a Location header")
        # The upload URL is opaque (may carry state in its query); only add the digest to it.
        target = httpx.URL(self.base_url).join(location).copy_merge_params({"digest": digest})
        if target.host != self._http.base_url.host or target.port != self._http.base_url.port:
            raise RegistryError(f"registry upload location points to another host: {location!r}")
        headers = {"Content-Type": "application/octet-stream"}
        if isinstance(data, bytes):
            headers["Content-Length"] = str(len(data))
            body: bytes | BinaryIO = data
        else:
            if size is None and data.seekable():
                here = data.tell()
                size = data.seek(0, io.SEEK_END) - here
                data.seek(here)
            if size is not None:
                headers["Content-Length"] = str(size)
            body = data
        path = target.raw_path.decode()
        self._request("PUT", path, repo=repo, push=True, headers=headers, content=body, ok=(201, 204)).close()
        return True

    # --- referrers ---------------------------------------------------------------------------------------------

    def list_referrers(self, repo: str, subject_digest: str, artifact_type: str | None = None) -> list[dict[str, Any]]:
        """Descriptors of the manifests whose `subject` is `subject_digest` (referrers API, else the tag schema)."""
        validate_repository(repo)
        validate_digest(subject_digest)
        entries = self._referrers_api(repo, subject_digest, artifact_type)
        if entries is None:
            try:
                index = self.get_raw_manifest(repo, referrers_tag(subject_digest))
            except NotFound:
                return []
            entries = index.json.get("manifests") or [] if index.is_index else []
        if artifact_type is not None:
            entries = [e for e in entries if e.get("artifactType") == artifact_type]
        return entries

    def _referrers_api(self, repo: str, subject_digest: str, artifact_type: str | None) -> list[dict[str, Any]] | None:
        """The referrers API's list, or None when the registry has no referrers API (404)."""
        url: str | None = f"/v2/{repo}/referrers/{subject_digest}"
        entries: list[dict[str, Any]] = []
        params = {"artifactType": artifact_type} if artifact_type else None
        while url:
            if params:
                url = str(httpx.URL(url).copy_merge_params(params))
            try:
                response = self._request("GET", url, repo=repo, headers={"Accept": OCI_INDEX})
            except NotFound:
                return None
            entries.extend(response.json().get("manifests") or [])
            url = self._next_link(response)
            params = None
        return entries

    def push_referrer(self, repo: str, manifest: bytes, subject_digest: str | None = None,
                      media_type: str = OCI_MANIFEST) -> str:
        """Push an artifact manifest that has a `subject`, and list it in the referrers tag schema when needed.

        The manifest goes first: an index naming a missing manifest is rejected. The `sha256-<hex>` tag index is
        read, changed and written back keeping everyone else's entries, then re-read to catch a concurrent writer.
        """
        validate_repository(repo)
        parsed = json.loads(manifest)
        subject = (parsed.get("subject") or {}).get("digest")
        if subject is None:
            raise ValueError("a referrer manifest needs a subject")
        if subject_digest is not None and subject != subject_digest:
            raise ValueError(f"manifest subject {subject} is not {subject_digest}")
        validate_digest(subject)
        media_type = parsed.get("mediaType") or media_type
        digest = sha256_digest(manifest)
        response = self._request("PUT", f"/v2/{repo}/manifests/{digest}", repo=repo, push=True,
                                 headers={"Content-Type": media_type}, content=manifest, ok=(201,))
        response.close()
        if response.headers.get("OCI-Subject") == subject or self._referrers_api(repo, subject, None) is not None:
            return digest  # the registry tracks referrers itself
        descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(manifest)}
        artifact_type = parsed.get("artifactType") or (parsed.get("config") or {}).get("mediaType")
        if artifact_type:
            descriptor["artifactType"] = artifact_type
        if parsed.get("annotations"):
            descriptor["annotations"] = parsed["annotations"]
        for attempt in range(5):
            self._add_to_referrers_tag(repo, subject, descriptor)
            # Read back after a pause: a concurrent writer that read before our write may have dropped us.
            time.sleep(0.05 * (attempt + 1) * random.random())
            if any(e.get("digest") == digest for e in self.list_referrers(repo, subject)):
                return digest
        raise RegistryError(f"could not keep {digest} in the referrers tag of {repo}@{subject}: too many writers")

    def _add_to_referrers_tag(self, repo: str, subject: str, descriptor: dict[str, Any]) -> None:
        tag = referrers_tag(subject)
        try:
            current = self.get_raw_manifest(repo, tag)
            entries = list(current.json.get("manifests") or []) if current.is_index else []
            index = dict(current.json) if current.is_index else {}
        except NotFound:
            entries, index = [], {}
        entries = [e for e in entries if e.get("digest") != descriptor["digest"]] + [descriptor]
        index.update({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        self.push_manifest(repo, tag, json.dumps(index, separators=(",", ":")).encode(), OCI_INDEX)


def _certificate_failure(exc: BaseException) -> str | None:
    """The reason, when a transport error comes from a TLS certificate that did not verify (httpx wraps it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


class _BlobStream(io.RawIOBase):
    """The raw bytes of one blob GET, reconnecting with `Range: bytes=N-` when the connection drops."""

    def __init__(self, client: RegistryClient, repo: str, digest: str) -> None:
        super().__init__()
        self._client = client
        self._url = f"/v2/{repo}/blobs/{digest}"
        self._repo = repo
        self._offset = 0
        self._buffer = b""
        self._resumes = 0
        self._response = client._request("GET", self._url, repo=repo, stream=True)
        length = self._response.headers.get("Content-Length")
        self.length: int | None = int(length) if length and length.isdigit() else None
        self._chunks = self._response.iter_bytes(_CHUNK)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                if self.length is not None and self._offset < self.length:
                    self._resume(httpx.RemoteProtocolError("connection closed early"))
                    continue
                return 0
            except (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError) as exc:
                self._resume(exc)
        n = min(len(view), len(self._buffer))
        view[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self._offset += n
        return n

    def _resume(self, exc: Exception) -> None:
        if self._resumes >= self._client.retries:
            raise RegistryError(f"GET {self._url}: connection failed at byte {self._offset}: {exc!r}") from exc
        self._resumes += 1
        self._response.close()
        self._response = self._client._request("GET", self._url, repo=self._repo, stream=True,
                                               headers={"Range": f"bytes={self._offset}-"}, ok=(200, 206))
        chunks = self._response.iter_bytes(_CHUNK)
        if self._response.status_code == 200:
            # The registry ignored Range: skip what we already passed on.
            skip = self._offset
            while skip > 0:
                part = next(chunks)
                if len(part) > skip:
                    self._buffer = part[skip:]
                    skip = 0
                else:
                    skip -= len(part)
        self._chunks = chunks

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()
