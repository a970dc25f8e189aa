"""The server against a real registry and real images, over real sockets: sync, have-sets, repair, chunks by id,
bad input. One server process and one pair of image versions for the module."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import msgpack
import pytest
from starlette.requests import Request

from chunkstore.bloom import BloomFilter
from chunkstore.index import ImageIndex, chunk_id, decode_index
from chunkstore.wire import SUPPORTED_VERSIONS, ChunksRequest, SyncRequest
from helpers import Registry, build_image, push_image, real_files
from server.bodies import RequestMemory
from server.errors import ServerBusy, error_response
from server_process import Answer, ServerProcess, assert_error, post

REPO = "server/app"


@dataclass(frozen=True)
class Versions:
    v1: str
    v2: str


@pytest.fixture(scope="module")
def versions(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    """v1: two layers of real files. v2: v1 plus a layer that edits one big file a little and adds a small one."""
    tmp = tmp_path_factory.mktemp("server-images")
    base = real_files(1_500_000)
    layout = build_image(tmp, [base, real_files(400_000, skip=400, prefix="lib/")], "v1")
    big = max(base, key=lambda name: len(base[name]))
    data = base[big]
    edited = data[:len(data) // 2] + b"\n# chunksync v2 edit\n" + data[len(data) // 2:]
    build_image(tmp, [{big: edited, "app/NEW.txt": b"new in v2\n" * 100}], "v2", layout=layout, base_tag="v1")
    v1 = push_image(layout, "v1", registry, REPO)
    v2 = push_image(layout, "v2", registry, REPO)
    return Versions(v1, v2)


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(registry.url, store=tmp_path_factory.mktemp("server") / "store") as process:
        yield process


def sync(server: ServerProcess, reference: str, **kwargs: object) -> Answer:
    response = post(server.url, "/v1/sync", SyncRequest(REPO, reference, **kwargs).encode())  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.chunksync.frames.v1"
    answer = Answer(response)
    assert answer.error is None and answer.end is not None
    return answer


def index_of(answer: Answer) -> ImageIndex:
    assert answer.header is not None
    return decode_index(answer.header["index"])


def in_order(index: ImageIndex) -> list[bytes]:
    seen: set[bytes] = set()
    out = []
    for layer in index.layers:
        for cid, _ in layer.all_chunks():
            if cid not in seen:
                seen.add(cid)
                out.append(cid)
    return out


# --- sync ----------------------------------------------------------------------------------------------------------


def test_first_sync_sends_every_chunk_in_index_order(server: ServerProcess, registry: Registry,
                                                     versions: Versions) -> None:
    answer = sync(server, "v1")
    header = answer.header
    assert header is not None
    with registry.client() as client:
        manifest = client.get_manifest(REPO, "v1")
        config = client.get_blob(REPO, manifest.config["digest"])
    assert header["manifest_digest"] == versions.v1
    assert header["manifest"] == manifest.data  # the registry's exact bytes
    assert header["config"] == config
    assert header["platform"] == "linux/amd64"
    index = index_of(answer)
    assert index.manifest_digest == versions.v1
    assert [layer.digest for layer in index.layers] == [d["digest"] for d in manifest.layers]
    assert answer.ids == in_order(index)
    assert all(chunk_id(data) == cid for cid, data in answer.chunks)
    total = sum(len(data) for _, data in answer.chunks)
    assert answer.end == {"chunks": len(answer.chunks), "bytes": total, "skipped": 0}
    # Reassembling the chunks in index order gives each layer's exact uncompressed stream.
    by_id = dict(answer.chunks)
    assert sum(layer.uncompressed_size for layer in index.layers) == sum(
        len(by_id[cid]) for layer in index.layers for cid, _ in layer.all_chunks())


def test_v2_after_v1_sends_only_changed_chunks(server: ServerProcess, versions: Versions) -> None:
    v1 = index_of(sync(server, "v1"))
    # Version 1 (no deltas): whole changed chunks. tests/test_delta_e2e.py covers version 2.
    answer = sync(server, "v2", have_images=[(REPO, versions.v1)], version=1)
    v2 = index_of(answer)
    assert answer.header is not None and answer.header["manifest_digest"] == versions.v2
    expected = [cid for cid in in_order(v2) if cid not in v1.chunk_ids()]
    assert answer.ids == expected
    assert 0 < len(expected) < len(in_order(v2)) // 4
    sent = sum(len(data) for _, data in answer.chunks)
    full = sum(layer.uncompressed_size for layer in v2.layers)
    assert answer.end == {"chunks": len(expected), "bytes": sent, "skipped": len(in_order(v2)) - len(expected)}
    # The edited big file costs a few chunks around the edit, not the file.
    assert sent < full * 0.15, (sent, full)
    print(f"v2 after v1: {answer.wire_bytes / 1e3:.1f} kB on the wire ({sent / 1e3:.1f} kB of chunks) "
          f"for a {full / 1e6:.2f} MB image")


def test_have_image_the_device_names_wrongly_is_ignored(server: ServerProcess, versions: Versions) -> None:
    # An image of another repository (here: one that does not exist) cannot shrink the answer.
    answer = sync(server, "v1", have_images=[("server/nothing-here", versions.v1)])
    assert answer.end is not None and answer.end["skipped"] == 0


def test_bloom_hits_are_skipped_and_repaired_exactly(server: ServerProcess, versions: Versions) -> None:
    ordered = in_order(index_of(sync(server, "v1")))
    held = ordered[::2]
    bloom = BloomFilter.build(held, fp_rate=0.05)
    answer = sync(server, "v1", bloom=bloom)
    hits = bloom.contains_many(b"".join(ordered))
    assert answer.ids == [cid for cid, hit in zip(ordered, hits) if not hit]
    assert set(held).isdisjoint(answer.ids)
    false_positives = [cid for cid, hit in zip(ordered, hits) if hit and cid not in set(held)]
    # The device asks for what it still lacks: the false positives (and, say, two chunks it lost).
    wanted = false_positives + held[:2]
    request = ChunksRequest(REPO, versions.v1, b"".join(reversed(wanted)))
    repair = Answer(post(server.url, "/v1/chunks", request.encode()))
    assert repair.header is None and repair.error is None
    assert repair.ids == [cid for cid in ordered if cid in set(wanted)]  # index order, each once
    assert all(chunk_id(data) == cid for cid, data in repair.chunks)
    assert repair.end is not None and repair.end["chunks"] == len(wanted)


def test_sync_by_digest(server: ServerProcess, versions: Versions) -> None:
    answer = sync(server, versions.v2)
    assert answer.header is not None and answer.header["manifest_digest"] == versions.v2


def test_have_manifest_omits_the_manifest_only_when_asked_by_its_digest(server: ServerProcess,
                                                                       versions: Versions) -> None:
    full = sync(server, versions.v2).header
    held = sync(server, versions.v2, have_manifest=True).header
    by_tag = sync(server, "v2", have_manifest=True).header  # a tag may have moved: the device needs the bytes
    assert full is not None and held is not None and by_tag is not None
    assert held["manifest"] == b"" and held["manifest_digest"] == versions.v2 and held["config"] == full["config"]
    assert by_tag["manifest"] == full["manifest"] != b""


# --- chunks by id --------------------------------------------------------------------------------------------------


def test_chunk_by_id_with_etag(server: ServerProcess, versions: Versions) -> None:
    cid = in_order(index_of(sync(server, "v1")))[3]
    url = f"{server.url}/v1/chunks/{cid.hex()}?repository={REPO}&manifest={versions.v1}"
    response = httpx.get(url)
    assert response.status_code == 200
    assert chunk_id(response.content) == cid
    assert response.headers["etag"] == f'"{cid.hex()}"'
    assert response.headers["cache-control"] == "private, max-age=31536000, immutable"
    again = httpx.get(url, headers={"If-None-Match": f'"{cid.hex()}"'})
    assert again.status_code == 304 and again.content == b""


def test_chunk_by_id_refusals(server: ServerProcess, versions: Versions) -> None:
    v2_only = [cid for cid in in_order(index_of(sync(server, "v2")))
               if cid not in index_of(sync(server, "v1")).chunk_ids()][0]
    base = f"{server.url}/v1/chunks"
    assert_error(httpx.get(f"{base}/{v2_only.hex()}?repository={REPO}&manifest={versions.v1}"), 404,
                 "not in", versions.v1)
    assert_error(httpx.get(f"{base}/{'ab' * 31}?repository={REPO}&manifest={versions.v1}"), 400, "64")
    assert_error(httpx.get(f"{base}/{v2_only.hex().upper()}?repository={REPO}&manifest={versions.v1}"), 400)
    assert_error(httpx.get(f"{base}/{v2_only.hex()}"), 400, "repository=")
    assert_error(httpx.get(f"{base}/{v2_only.hex()}?repository=..%2F..%2Fetc&manifest={versions.v1}"), 400,
                 "invalid repository")
    assert_error(httpx.get(f"{base}/{v2_only.hex()}?repository={REPO}&manifest=sha256:abc"), 400, "invalid digest")


# --- bad input -----------------------------------------------------------------------------------------------------

def _sync_body(**fields: object) -> bytes:
    body = {"v": 1, "repository": REPO, "reference": "v1", "platform": "linux/amd64", "have_images": [],
            "bloom": None}
    body.update(fields)
    return msgpack.packb(body, use_bin_type=True)


BAD_SYNCS = [
    (b"\xc1\xc1 not msgpack", 400, "not valid msgpack"),
    (msgpack.packb([1, 2, 3]), 400, "map"),
    (_sync_body(v=max(SUPPORTED_VERSIONS) + 1), 400, "version"),
    (_sync_body(v=0), 400, "version"),
    (_sync_body(repository=7), 400, "'repository' must be a string"),
    (_sync_body(repository="../../etc/passwd"), 400, "invalid repository"),
    (_sync_body(repository="server/../app"), 400, "invalid repository"),
    (_sync_body(repository="Server/App"), 400, "invalid repository"),
    (_sync_body(reference="v1/../x"), 400, "invalid reference"),
    (_sync_body(reference="sha256:1234"), 400, "invalid digest"),
    (_sync_body(platform="linux"), 400, "platform"),
    (_sync_body(have_images="all"), 400, "have_images"),
    (_sync_body(have_images=[[REPO, "sha256:" + "g" * 64]]), 400, "invalid digest"),
    (_sync_body(have_images=[[REPO]]), 400, "[repository, digest]"),
    (_sync_body(bloom={"m": 63, "k": 1, "bits": b"\0" * 8}), 400, "multiple of 64"),
    (_sync_body(bloom={"m": 64, "k": 1, "bits": b"\0" * 9}), 400, "8 bytes"),
    (_sync_body(have_images=[[REPO, "sha256:" + "0" * 64]] * 65), 413, "at most 64"),
    (_sync_body(have_images=[[REPO, "sha256:" + "0" * 64]] * 1000), 413, "exceeds max_array_len"),
    (_sync_body(reference="no-such-tag"), 404, "no-such-tag"),
    (_sync_body(repository="server/no-such-repo"), 404, "not in the registry"),
]


# ids by position and expected answer: the bodies are binary and would garble pytest's report.
@pytest.mark.parametrize(("body", "status", "words"), BAD_SYNCS,
                         ids=[f"{n}-{status}-{words[:20]}" for n, (_, status, words) in enumerate(BAD_SYNCS)])
def test_bad_sync_requests(server: ServerProcess, versions: Versions, body: bytes, status: int, words: str) -> None:
    assert_error(post(server.url, "/v1/sync", body), status, words)


def test_bad_chunks_requests(server: ServerProcess, versions: Versions) -> None:
    foreign = chunk_id(b"not a chunk of anything")
    own = in_order(index_of(sync(server, "v1")))[0]
    request = ChunksRequest(REPO, versions.v1, own + foreign + chunk_id(b"nor this"))
    assert_error(post(server.url, "/v1/chunks", request.encode()), 400, "2 of the 3 ids")
    body = msgpack.packb({"v": 1, "repository": REPO, "manifest_digest": versions.v1, "ids": b"x" * 31})
    assert_error(post(server.url, "/v1/chunks", body), 400, "32-byte")
    unknown = ChunksRequest(REPO, "sha256:" + "1" * 64, own)
    assert_error(post(server.url, "/v1/chunks", unknown.encode()), 404)


def test_oversized_bodies_get_413(server: ServerProcess, versions: Versions) -> None:
    big = b"\0" * (73 << 20)
    assert_error(post(server.url, "/v1/sync", big), 413, "limit")

    def unsized() -> Iterator[bytes]:  # no Content-Length: the cap must hold while reading
        for _ in range(73):
            yield b"\0" * (1 << 20)

    assert_error(httpx.post(f"{server.url}/v1/chunks", content=unsized(), timeout=60), 413, "limit")
    # A Bloom filter over the 64 MiB limit, in a body under the 72 MiB one.
    bits = 65 << 20
    bloom = {"m": bits * 8, "k": 3, "bits": bytes(bits)}
    assert_error(post(server.url, "/v1/sync", _sync_body(bloom=bloom)), 413, "bloom filter")


def test_bad_events_and_unknown_paths(server: ServerProcess) -> None:
    assert_error(httpx.post(f"{server.url}/v1/events", content=b"{not json"), 400, "not JSON")
    assert_error(httpx.post(f"{server.url}/v1/events", json={"events": "x"}), 400, "events")
    ignored = {"events": [
        {"action": "pull", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                      "repository": REPO, "digest": "sha256:" + "0" * 64}},
        {"action": "push", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                      "repository": "../../etc", "digest": "sha256:" + "0" * 64}},
        {"action": "push", "target": {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                      "repository": REPO, "digest": "sha256:" + "0" * 64}},
        {"action": "push", "target": {"mediaType": "application/vnd.oci.image.index.v1+json", "repository": REPO,
                                      "digest": "sha256:" + "0" * 64, "tag": "sha256-" + "0" * 64}},
        "junk",
    ]}
    response = httpx.post(f"{server.url}/v1/events", json=ignored)
    assert response.status_code == 202 and response.json() == {"accepted": 0, "ignored": 5}
    assert httpx.get(f"{server.url}/nowhere").status_code == 404
    assert httpx.get(f"{server.url}/v1/sync").status_code == 405


def test_metrics_and_health(server: ServerProcess, versions: Versions) -> None:
    sync(server, "v1")
    assert httpx.get(f"{server.url}/healthz").text == "ok"
    text = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE chunksync_requests_total counter" in text
    metrics = server.metrics()
    assert metrics['chunksync_requests_total{endpoint="/v1/sync",status="200"}'] >= 1
    assert metrics["chunksync_chunks_sent_total"] > 0
    assert metrics["chunksync_response_bytes_total"] > 0
    assert metrics["chunksync_index_seconds_count"] == metrics["chunksync_images_indexed_total"] >= 2
    assert not [key for key in metrics if 'status="500"' in key]  # no bad input above became a 500


def test_request_memory_waits_then_refuses_with_503() -> None:
    """In-process (a request that waits 30 s for memory is too slow to stage over HTTP): a share that does not fit
    waits for others to end, and past the wait is refused with ServerBusy: 503, code "busy", Retry-After."""
    waits: list[int] = []
    memory = RequestMemory(100, wait=0.2, on_wait=lambda: waits.append(memory.used))

    async def used_once_reserved(size: int) -> int:
        async with memory.reserved(size):
            return memory.used

    async def scenario() -> None:
        async with memory.reserved(80):
            with pytest.raises(ServerBusy, match="busy with large requests") as refused:
                async with memory.reserved(40):
                    pass
            answer = await error_response(None, refused.value)  # type: ignore[arg-type]
            assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
            assert b'"busy"' in answer.body
            waiting = asyncio.create_task(used_once_reserved(40))
            await asyncio.sleep(0.05)
            assert not waiting.done()  # the 80 are still held
        assert await asyncio.wait_for(waiting, 1) == 40
        assert memory.used == 0

    asyncio.run(scenario())
    assert waits == [80, 80]


def test_request_memory_shares() -> None:
    """Small bodies, what devices send, reserve nothing (a slow large one cannot stall them); a body without a
    declared length counts as the limit; shares are twice the body, at most the whole capacity."""
    def declaring(length: int | None) -> Request:
        headers = [] if length is None else [(b"content-length", str(length).encode())]
        return Request({"type": "http", "method": "POST", "headers": headers})

    limit = 72 << 20
    assert RequestMemory(256 << 20, 1).share(declaring(30), limit) == 0
    assert RequestMemory(256 << 20, 1).share(declaring(1 << 20), limit) == 0
    assert RequestMemory(256 << 20, 1).share(declaring(2 << 20), limit) == 4 << 20
    assert RequestMemory(256 << 20, 1).share(declaring(None), limit) == 144 << 20
    assert RequestMemory(100 << 20, 1).share(declaring(None), limit) == 100 << 20
