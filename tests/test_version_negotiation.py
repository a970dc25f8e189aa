"""Version negotiation (docs/PROTOCOL.md): a device and a server of different ages still make a diff pull at the
highest protocol version both speak. Real registry, real `chunksync serve` processes - today's, with
`--protocol-versions` withholding versions, and servers of the past run from this repository's own history - and
`chunksync pull` as a process, through real proxies on loopback that record what crossed the wire."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import msgpack
import pytest

from chunkstore.wire import PROTOCOL_VERSION, SUPPORTED_VERSIONS, ChunksRequest, SyncRequest
from client.deltas import protocol_version
from client.sandbox import Process
from frame_proxy import CORRUPT_RAW, FrameProxy
from helpers import Registry, free_port, serve_http
from pull_tools import pull, pull_env, push_pair
from server_process import CHUNKSYNC, ServerProcess, assert_error, post

REPO_ROOT = Path(__file__).resolve().parents[1]
# Servers of the past, from this repository's history: the last commit before protocol version 2 (it speaks 1) and
# the last before version 5 (it speaks 1 to 4). Both refuse a version in the words of their time: 400 "bad_request",
# a message and no list.
OLD_SERVERS = {
    "d2b57c9ba9c4a1e0450ffd0db763bd1f3bc112e7": (1,),
    "25e6248a7b5e2e626407b85fb7cef2650d0362ce": (1, 2, 3, 4),
}


TOP = PROTOCOL_VERSION  # what a device with GNU gzip asks for
ALL = list(SUPPORTED_VERSIONS)


def spell(versions: tuple[int, ...] | list[int]) -> str:
    return ", ".join(map(str, versions))


class RecordingProxy:
    """Forwards every request to `upstream` and records (path, the request's protocol version `v`, status)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: list[tuple[str, object, int]] = []
        self._server, self.url = serve_http(self._forward)

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        answer = httpx.request(handler.command, self.upstream + handler.path, content=body, headers=headers,
                               timeout=60)
        version: object = None
        if body:
            try:
                version = msgpack.unpackb(body, raw=False).get("v")
            except Exception:
                version = "not msgpack"
        self.seen.append((handler.path.split("?")[0], version, answer.status_code))
        handler.send_response(answer.status_code)
        for key, value in answer.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(answer.content)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(answer.content)

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class OldServer:
    """`chunksync serve` as it was at `commit`: its chunkstore, client and server packages taken out of git into
    `workdir/src` and run in this venv (same dependencies), indexes kept in its own store (--no-push)."""

    def __init__(self, commit: str, registry_url: str, workdir: Path) -> None:
        if subprocess.run(["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True).returncode != 0:
            pytest.skip(f"commit {commit[:12]} (an old server) is not in this checkout's history")
        src = workdir / "src"
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit, "chunkstore", "client", "server"],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(src)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # -P: no current directory on sys.path, so PYTHONPATH's old packages win over today's checkout.
        env = {**os.environ, "PYTHONPATH": str(src)}
        self._child = Process([sys.executable, "-P", "-m", "client.cli", "serve", "--registry", registry_url,
                               "--listen", f"127.0.0.1:{port}", "--store", str(workdir / "store"), "--no-push"],
                              workdir / "server.log", f"{self.url}/healthz", f"old chunksync serve ({commit[:12]})",
                              env=env)

    def __enter__(self) -> OldServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._child.stop()


def needs_gnu_gzip() -> None:
    assert protocol_version() == TOP, "these tests need GNU gzip on the machine: without it a device asks for 5"


# --- the refusal -----------------------------------------------------------------------------------------------------

def test_a_refused_version_gets_its_code_and_the_versions_the_server_speaks(registry: Registry,
                                                                           tmp_path: Path) -> None:
    full = ServerProcess(registry.url, store=tmp_path / "full" / "store")
    capped = ServerProcess(registry.url, store=tmp_path / "capped" / "store", extra_args=["--protocol-versions", "1-5"])
    with full, capped:
        for url, asked, speaks in ((full.url, TOP + 1, ALL), (capped.url, 6, [1, 2, 3, 4, 5]),
                                   (capped.url, 0, [1, 2, 3, 4, 5])):
            for path, body in (("/v1/sync", SyncRequest("test/negotiate", "v1", version=asked).encode()),
                               ("/v1/chunks", ChunksRequest("test/negotiate", "sha256:" + "0" * 64, b"\1" * 32,
                                                            version=asked).encode())):
                response = post(url, path, body)
                # The message stays the one older devices know.
                error = assert_error(response, 400, f"protocol version {asked} is not supported "
                                                    f"(this server speaks {spell(speaks)})")
                assert error["code"] == "unsupported_version", (url, path, error)
                assert error["versions"] == speaks, (url, path, error)
        # A version the capped server speaks passes the check (the image does not exist: 404, not 400).
        assert_error(post(capped.url, "/v1/sync", SyncRequest("test/negotiate", "v1", version=5).encode()), 404)
        # Other bad requests carry no list.
        other = assert_error(post(full.url, "/v1/sync", SyncRequest("test/negotiate", "v1/../x").encode()), 400,
                             "invalid reference")
        assert other["code"] == "bad_request" and "versions" not in other


def test_serve_refuses_protocol_versions_it_does_not_know(tmp_path: Path) -> None:
    for value, words in ((str(TOP + 1), f"knows protocol versions {spell(ALL)} only"), ("5-1", "write versions as")):
        proc = subprocess.run([str(CHUNKSYNC), "serve", "--registry", "http://127.0.0.1:1", "--store",
                               str(tmp_path / "store"), "--protocol-versions", value], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


# --- the device ------------------------------------------------------------------------------------------------------

def test_a_device_newer_than_its_server_pulls_a_diff_at_the_highest_version_both_speak(registry: Registry,
                                                                                     tmp_path: Path) -> None:
    needs_gnu_gzip()
    pair = push_pair(tmp_path / "img", registry, "test/negotiate-capped", 1_500_000, 400_000)
    store = tmp_path / "device"
    with ServerProcess(registry.url, store=tmp_path / "server" / "store",
                       extra_args=["--protocol-versions", "1-5"]) as server, RecordingProxy(server.url) as proxy:
        first = pull(pair.ref("v1"), proxy.url, store)
        second = pull(pair.ref("v2"), proxy.url, store)
    said = (f"the server does not speak protocol version {TOP} (it speaks 1, 2, 3, 4, 5); asking again with the sync "
            "request at version 5")
    for result in (first, second):
        assert result.report["path"] == "diff", result.stderr
        assert said in result.stderr and any(said in w for w in result.report["warnings"])
    # Once refused, once answered, per pull: on the wire, not as the device tells it.
    assert proxy.seen == [("/v1/sync", TOP, 400), ("/v1/sync", 5, 200)] * 2
    report = second.report
    print(f"\nversion 5: v2 took {report['bytes_received']} of {report['full_pull_bytes']} bytes")
    assert report["have_images"] == 1 and report["delta_items"] > 0  # a version-5 answer: deltas against v1
    assert report["bytes_received"] < 0.1 * report["full_pull_bytes"], report


@pytest.mark.parametrize("commit", OLD_SERVERS, ids=lambda c: f"speaks-{spell(OLD_SERVERS[c]).replace(', ', '-')}")
def test_an_old_server_s_refusal_is_understood_and_the_repair_round_works(commit: str, registry: Registry,
                                                                         tmp_path: Path) -> None:
    needs_gnu_gzip()
    speaks = OLD_SERVERS[commit]
    top = max(speaks)
    pair = push_pair(tmp_path / "img", registry, f"test/negotiate-old-{top}", 1_500_000, 400_000)
    store = tmp_path / "device"
    with OldServer(commit, registry.url, tmp_path / "old") as old, RecordingProxy(old.url) as proxy:
        # The refusal as that server words it: no code of its own, no list; only the message names the versions.
        refusal = assert_error(post(old.url, "/v1/sync", SyncRequest(pair.repo, "v1", version=TOP).encode()), 400,
                               f"protocol version {TOP} is not supported (this server speaks {spell(speaks)})")
        assert refusal["code"] == "bad_request" and "versions" not in refusal
        proxy.seen.clear()
        # The first CHUNKS frame of the (second) sync answer arrives damaged: a repair round follows.
        with FrameProxy(proxy.url, CORRUPT_RAW, damage_answers=2) as damage:
            first = pull(pair.ref("v1"), damage.url, store)
        second = pull(pair.ref("v2"), proxy.url, store)
    said = (f"the server does not speak protocol version {TOP} (it speaks {spell(speaks)}); asking again with the sync "
            f"request at version {top}")
    report = first.report
    assert said in first.stderr and said in second.stderr
    assert report["path"] == "repair" and report["repair_chunks"] == report["chunks_rejected"] >= 1, first.stderr
    assert damage.damaged_frames == 1
    # The repair request says version 1, which every server takes: no second refusal.
    assert proxy.seen == [("/v1/sync", TOP, 400), ("/v1/sync", top, 200), ("/v1/chunks", 1, 200),
                          ("/v1/sync", TOP, 400), ("/v1/sync", top, 200)]
    print(f"\nold server ({spell(speaks)}): v2 took {second.report['bytes_received']} of "
          f"{second.report['full_pull_bytes']} bytes at version {top}")
    assert second.report["path"] == "diff" and second.report["have_images"] == 1
    assert second.report["bytes_received"] < 0.1 * second.report["full_pull_bytes"], second.report


def test_no_version_in_common_falls_back_to_the_registry_and_says_why(registry: Registry, tmp_path: Path) -> None:
    pair = push_pair(tmp_path / "img", registry, "test/negotiate-none", 400_000, 100_000)
    # A device without GNU gzip (PATH without it, as on busybox) speaks 1 to 5; this server only 6.
    no_gzip = tmp_path / "no-gzip"
    no_gzip.mkdir()
    with ServerProcess(registry.url, store=tmp_path / "server" / "store",
                       extra_args=["--protocol-versions", "6"]) as server, RecordingProxy(server.url) as proxy:
        result = pull(pair.ref("v1"), proxy.url, tmp_path / "device", env=pull_env(PATH=str(no_gzip)))
    report = result.report
    assert report["path"] == "fallback" and report["registry_layers"] == 2
    assert proxy.seen == [("/v1/sync", 5, 400)]  # nothing to ask again with
    assert ("this device speaks protocol versions 1, 2, 3, 4, 5, none of them the server's, so no diff pull is "
            "possible: install GNU gzip on the device") in result.stderr
    assert "pulling plainly from the registry instead" in result.stderr
    assert "(this server speaks 6)" in report["fallback_reason"]


def test_a_server_that_no_longer_speaks_1_takes_the_repair_request_at_a_version_it_does(registry: Registry,
                                                                                       tmp_path: Path) -> None:
    needs_gnu_gzip()
    pair = push_pair(tmp_path / "img", registry, "test/negotiate-repair", 400_000, 100_000)
    with ServerProcess(registry.url, store=tmp_path / "server" / "store",
                       extra_args=["--protocol-versions", str(TOP)]) as server, RecordingProxy(server.url) as proxy, \
            FrameProxy(proxy.url, CORRUPT_RAW) as damage:
        result = pull(pair.ref("v1"), damage.url, tmp_path / "device")
    report = result.report
    assert report["path"] == "repair" and report["repair_chunks"] == report["chunks_rejected"] >= 1, result.stderr
    assert proxy.seen == [("/v1/sync", TOP, 200), ("/v1/chunks", 1, 400), ("/v1/chunks", TOP, 200)]
    assert (f"the server does not speak protocol version 1 (it speaks {TOP}); asking again with the repair request "
            f"at version {TOP}") in result.stderr
