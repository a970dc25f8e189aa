"""Devices' credentials, checked by the registry before anything of an image is sent: an htpasswd registry
(all or nothing), and a token-auth registry whose tokens grant single repositories (a real `docker-registry`
with `auth: token`, and a small token service here signing JWTs with openssl)."""
from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from chunkstore.index import decode_index
from chunkstore.wire import ChunksRequest, SyncRequest
from helpers import Registry, build_image, push_image, real_files, run, start_registry
from server_process import Answer, ServerProcess, assert_error, post

SERVER_USER = "alice"   # the chunksync server's own registry user in the htpasswd registry


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def all_requests(server: ServerProcess, repo: str, digest: str, chunk: bytes, authorization: str | None
                 ) -> list[httpx.Response]:
    """A sync, a repair and a chunk GET for one image, with the given credentials."""
    headers = {"Authorization": authorization} if authorization else {}
    return [
        post(server.url, "/v1/sync", SyncRequest(repo, "v1").encode(), authorization),
        post(server.url, "/v1/sync", SyncRequest(repo, digest).encode(), authorization),
        post(server.url, "/v1/chunks", ChunksRequest(repo, digest, chunk).encode(), authorization),
        httpx.get(f"{server.url}/v1/chunks/{chunk.hex()}?repository={repo}&manifest={digest}", headers=headers),
        httpx.get(f"{server.url}/v1/chunks/{chunk.hex()}?repository={repo}&manifest={digest}",
                  headers={**headers, "If-None-Match": f'"{chunk.hex()}"'}),
    ]


# --- htpasswd ------------------------------------------------------------------------------------------------------


def test_htpasswd_registry_refuses_devices_without_credentials(auth_registry: Registry, tmp_path: Path) -> None:
    repo = "auth/app"
    layout = build_image(tmp_path, [real_files(200_000)], "v1")
    digest = push_image(layout, "v1", auth_registry, repo, creds=auth_registry.creds(SERVER_USER))
    with ServerProcess(auth_registry.url, store=tmp_path / "store", user=SERVER_USER,
                       password=auth_registry.users[SERVER_USER]) as server:
        bob = basic("bob", auth_registry.users["bob"])
        allowed = Answer(post(server.url, "/v1/sync", SyncRequest(repo, "v1").encode(), bob))
        assert allowed.header is not None and allowed.end is not None and allowed.chunks
        chunk = allowed.ids[0]
        sent_before = server.metrics()["chunksync_chunks_sent_total"]
        for authorization in (None, basic("bob", "wrong"), basic("mallory", "x"), "Bearer not-a-token"):
            for response in all_requests(server, repo, digest, chunk, authorization):
                error = assert_error(response, 401, "credentials")
                assert error["code"] == "unauthorized"
        # Nothing of the image went out: no index, no chunk, not even a 304 for a chunk id.
        assert server.metrics()["chunksync_chunks_sent_total"] == sent_before
        statuses = [r.status_code for r in all_requests(server, repo, digest, chunk, bob)]
        assert statuses == [200, 200, 200, 200, 304]


# --- token auth: per-repository grants -----------------------------------------------------------------------------


class TokenService:
    """A docker token service: Basic credentials in, a JWT (RS256, x5c) granting what `grants` allows out."""

    def __init__(self, workdir: Path, grants: dict[str, tuple[str, dict[str, list[str]]]]) -> None:
        # grants: user -> (password, {repository or "*": actions})
        self.key, self.cert = workdir / "token.key", workdir / "token.pem"
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.cert,
            "-days", "1", "-subj", "/CN=chunksync-test-token")
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], capture_output=True,
                             check=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.grants = grants
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def auth_config(self) -> dict[str, object]:
        return {"token": {"realm": self.url, "service": "test-registry", "issuer": "test-issuer",
                          "rootcertbundle": str(self.cert)}}

    def token(self, user: str | None, scopes: list[str]) -> str:
        allowed = self.grants.get(user or "", ("", {}))[1]
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = allowed.get(name, allowed.get("*", []))
            access.append({"type": kind, "name": name,
                           "actions": [a for a in actions.split(",") if a in granted]})
        now = int(time.time())
        claims = {"iss": "test-issuer", "sub": user or "", "aud": "test-registry", "exp": now + 600,
                  "nbf": now - 10, "iat": now, "jti": f"{now}-{id(scopes)}", "access": access}
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), capture_output=True, check=True).stdout
        return f"{signing_input}.{_b64(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if service.grants.get(name, ("\0", {}))[0] != password:
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = name
                token = service.token(user, query.get("scope", []))
                body = json.dumps({"token": token, "access_token": token, "expires_in": 600}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def stop(self) -> None:
        self.httpd.shutdown()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, TokenService]]:
    workdir = tmp_path_factory.mktemp("token-registry")
    tokens = TokenService(workdir, {
        "server": ("server-pw", {"*": ["pull", "push"]}),
        "device": ("device-pw", {"tenant-a/app": ["pull"]}),
    })
    registry = start_registry(workdir, auth=tokens.auth_config())
    registry.users.update({"server": "server-pw", "device": "device-pw"})
    yield registry, tokens
    registry.stop()
    tokens.stop()


def test_device_allowed_on_one_repository_gets_nothing_of_another(
        token_registry: tuple[Registry, TokenService], tmp_path: Path) -> None:
    registry, tokens = token_registry
    files = real_files(300_000)
    layout = build_image(tmp_path, [files], "v1")
    # The same image in both repositories (same digest, same chunks): the device may pull it from A only,
    # so every request naming B is refused, even for chunks it just received through A.
    digest_a = push_image(layout, "v1", registry, "tenant-a/app", creds=registry.creds("server"))
    digest_b = push_image(layout, "v1", registry, "tenant-b/app", creds=registry.creds("server"))
    device = basic("device", "device-pw")
    bearer_a = "Bearer " + tokens.token("device", ["repository:tenant-a/app:pull"])
    with ServerProcess(registry.url, store=tmp_path / "store", user="server", password="server-pw") as server:
        for authorization in (device, bearer_a):
            own = Answer(post(server.url, "/v1/sync", SyncRequest("tenant-a/app", "v1").encode(), authorization))
            assert own.header is not None and own.end is not None and own.chunks
            assert own.header["manifest_digest"] == digest_a
            chunk = own.ids[0]
            for response in all_requests(server, "tenant-b/app", digest_b, chunk, authorization):
                assert_error(response, 401, "tenant-b/app")
            # Chunks are served only through an image of the named repository: a manifest A lacks is a 404.
            assert_error(post(server.url, "/v1/chunks", ChunksRequest("tenant-a/app", "sha256:" + "e" * 64,
                                                                      chunk).encode(), authorization), 404)
            # B named as a have-image cannot shrink (and so probe) an answer about A.
            probe = Answer(post(server.url, "/v1/sync", SyncRequest(
                "tenant-a/app", "v1", have_images=[("tenant-b/app", digest_b)]).encode(), authorization))
            assert probe.end is not None and probe.end["skipped"] == 0
            assert probe.ids == own.ids
        assert decode_index(own.header["index"]).manifest_digest == digest_a
