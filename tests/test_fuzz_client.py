"""A lying server: a fake chunksync server on loopback answers a real `chunksync pull` process with crafted frame
streams (decompression bombs, absurd lengths, unknown frames, a manifest of another image, chunks that are not
in the index, and hypothesis' mutations of a genuine answer). The registry is real and reachable, so every pull
must end with the registry's image, verified, and a store holding nothing that is not what its id says."""
from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkstore.index import chunk_id
from chunkstore.store import LocalStore
from chunkstore.wire import FRAME_CHUNKS, FRAME_END, FRAME_ERROR, FRAME_HEADER, encode_chunks, encode_frame, read_frames
from helpers import Registry, build_image, push_image, real_files
from pull_tools import layout_images, pull, skopeo_config_digest
from server_process import ServerProcess, post
from soak import trials
from test_fuzz import bomb_frame, mutated, pack

REPO = "fuzz/client"
CLI_CASES = trials(8, 300)
COUNTS: dict[str, int] = {}


class LyingServer:
    """Answers POST /v1/sync and /v1/chunks with `.body` (status `.status`), whatever was asked."""

    def __init__(self) -> None:
        self.body = b""
        self.status = 200
        liar = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(liar.status)
                self.send_header("Content-Type", "application/vnd.chunksync.frames.v1")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(liar.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def world(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("fuzz-client")
    layout = build_image(tmp, [real_files(120_000), real_files(60_000, skip=300)], "v1")
    digest = push_image(layout, "v1", registry, REPO)
    other = push_image(build_image(tmp, [real_files(30_000, skip=500)], "v1", layout=tmp / "other"), "v1",
                       registry, REPO + "-other")
    with ServerProcess(registry.url, store=tmp / "server-store") as server:
        genuine = post(server.url, "/v1/sync", pack({"v": 1, "repository": REPO, "reference": digest,
                                                     "have_images": [], "bloom": None})).content
        other_answer = post(server.url, "/v1/sync", pack({"v": 1, "repository": REPO + "-other",
                                                          "reference": other, "have_images": [], "bloom": None}))
    liar = LyingServer()
    ref = f"{registry.host}/{REPO}:v1"
    yield {"ref": ref, "digest": digest, "config": skopeo_config_digest(ref), "genuine": genuine,
           "other": other_answer.content, "liar": liar}
    liar.close()
    print(f"\nlying-server cases: {json.dumps(COUNTS)}")


def frames_of(stream: bytes) -> list[tuple[int, dict]]:
    import io

    return [(f.type, f.payload) for f in read_frames(io.BytesIO(stream))]


def rebuild(frames: list[tuple[int, dict]]) -> bytes:
    return b"".join(encode_frame(t, p) for t, p in frames)


def crafted(world: dict) -> dict[str, bytes]:
    genuine = frames_of(world["genuine"])
    header = encode_frame(*genuine[0])
    foreign = b"planted by the server" * 100
    other_header = frames_of(world["other"])[0]
    return {
        "bomb after the header": header + bomb_frame(1 << 20, 256 << 20),
        "absurd frame length": header + struct.pack(">BBI", 1, FRAME_CHUNKS, 0xFFFFFFF0) + b"x" * 100,
        "unknown frame type": header + struct.pack(">BBI", 1, 99, 1) + b"\x80",
        "error frame first": encode_frame(FRAME_ERROR, {"code": "x", "message": "no"}),
        "empty answer": b"",
        "html answer": b"<html>proxy login</html>",
        "another image's header": rebuild([other_header] + genuine[1:]),
        "header with wrong types": encode_frame(FRAME_HEADER, {"manifest_digest": 5, "manifest": "x", "config": [],
                                                               "index": None}),
        "chunks not in the index": header + encode_chunks([(chunk_id(foreign), foreign)], zstandard.ZstdCompressor())
        + encode_frame(FRAME_END, {}),
        "header with the index of another image": rebuild(
            [(FRAME_HEADER, {**genuine[0][1], "index": other_header[1]["index"]})] + genuine[1:]),
        "chunks frame of wrong types": header + encode_frame(FRAME_CHUNKS, {"ids": 1, "lengths": "x", "data": []}),
        "every chunk twice": rebuild(genuine[:-1] + genuine[1:]),
    }


def check_pull(world: dict, tmp_path: Path, body: bytes, name: str) -> None:
    world["liar"].body = body
    store, layout = tmp_path / f"store-{name}", tmp_path / f"out-{name}"
    run = pull(world["ref"], world["liar"].url, store, "--out", f"oci:{layout}")
    assert "Traceback" not in run.stderr, run.stderr
    report = run.report  # the registry is there: a lie costs a fallback, never the image
    assert report["manifest_digest"] == world["digest"]
    assert layout_images(layout)["v1"]["config"]["digest"] == world["config"]
    local = LocalStore(store)
    assert local.verify(repair=False) == []
    record = local.get_image(REPO, world["digest"])
    assert record is not None and record.complete
    COUNTS[report["path"]] = COUNTS.get(report["path"], 0) + 1


@pytest.mark.parametrize("case", ["bomb after the header", "absurd frame length", "unknown frame type",
                                  "error frame first", "empty answer", "html answer", "another image's header",
                                  "header with wrong types", "chunks not in the index",
                                  "header with the index of another image", "chunks frame of wrong types",
                                  "every chunk twice"])
def test_crafted_answers(world: dict, tmp_path: Path, case: str) -> None:
    body = crafted(world)[case]
    check_pull(world, tmp_path, body, "case")
    if case == "chunks not in the index":
        foreign = b"planted by the server" * 100
        assert not LocalStore(tmp_path / "store-case").has(chunk_id(foreign))  # the store takes only its image


def test_mutated_answers(world: dict, tmp_path: Path) -> None:
    runs = iter(range(10**9))

    @settings(max_examples=CLI_CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(mutated(world["genuine"]), mutated(world["genuine"][:3000])))
    def one(body: bytes) -> None:
        check_pull(world, tmp_path, body, str(next(runs)))

    one()
