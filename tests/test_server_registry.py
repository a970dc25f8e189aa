"""The server and the registry it serves: indexes pushed as referrers and found again by a server with an empty
store, indexing on the registry's push notifications, multi-platform images, and the `chunksync index` command."""
from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chunkstore.index import chunk_id, decode_index
from chunkstore.oci import ARTIFACT_TYPE, INDEX_LAYER_MEDIA_TYPE, OCI_EMPTY
from chunkstore.wire import SyncRequest
from helpers import Registry, build_image, free_port, push_image, push_multiarch, real_files
from server.events import is_artifact, parse_events
from server_process import CHUNKSYNC, Answer, ServerProcess, assert_error, post


def synced(server: ServerProcess, repository: str, reference: str, platform: str = "linux/amd64") -> Answer:
    response = post(server.url, "/v1/sync", SyncRequest(repository, reference, platform).encode())
    assert response.status_code == 200, response.text
    answer = Answer(response)
    assert answer.error is None and answer.end is not None
    assert all(chunk_id(data) == cid for cid, data in answer.chunks)
    return answer


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Polls `condition()`; the timeout only bounds a failure, nothing asserts how long it took."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def test_index_is_pushed_and_found_after_restart_with_empty_store(registry: Registry, tmp_path: Path) -> None:
    repo = "server/restart"
    layout = build_image(tmp_path, [real_files(600_000), real_files(300_000, skip=200, prefix="lib/")], "v1")
    digest = push_image(layout, "v1", registry, repo)
    with ServerProcess(registry.url, store=tmp_path / "store-a") as first:
        before = synced(first, repo, "v1")
        assert first.metrics()["chunksync_images_indexed_total"] == 1
    with registry.client() as client:
        referrers = client.list_referrers(repo, digest, ARTIFACT_TYPE)
        assert len(referrers) == 1
        artifact = client.get_raw_manifest(repo, referrers[0]["digest"]).json
        assert artifact["subject"]["digest"] == digest
        assert artifact["config"]["mediaType"] == OCI_EMPTY and artifact["artifactType"] == ARTIFACT_TYPE
        assert [layer["mediaType"] for layer in artifact["layers"]] == [INDEX_LAYER_MEDIA_TYPE]
        assert decode_index(client.get_blob(repo, artifact["layers"][0]["digest"])).manifest_digest == digest

    # A fresh replica: nothing in its store. It finds the index instead of recomputing it, and refills its
    # store from the layer blobs to serve the chunks.
    with ServerProcess(registry.url, store=tmp_path / "store-b") as second:
        after = synced(second, repo, "v1")
        metrics = second.metrics()
    assert after.header is not None and before.header is not None
    assert after.header["index"] == before.header["index"]
    assert after.chunks == before.chunks
    assert metrics["chunksync_images_indexed_total"] == 0
    assert metrics['chunksync_indexes_found_total{where="registry"}'] == 1
    assert metrics["chunksync_layers_rechunked_total"] == 2
    with registry.client() as client:
        assert len(client.list_referrers(repo, digest, ARTIFACT_TYPE)) == 1  # nothing pushed again


def test_push_notification_triggers_indexing(start_registry, tmp_path: Path) -> None:
    port = free_port()
    registry = start_registry(notify_url=f"http://127.0.0.1:{port}/v1/events")
    repo = "server/notified"
    with ServerProcess(registry.url, store=tmp_path / "store", port=port) as server:
        layout = build_image(tmp_path, [real_files(300_000)], "v1")
        digest = push_image(layout, "v1", registry, repo)

        def indexed() -> bool:
            with registry.client() as client:
                return bool(client.list_referrers(repo, digest, ARTIFACT_TYPE))

        wait_for(indexed, "the pushed image's index to appear in the registry")
        # Our own index push is notified too (an artifact manifest and the referrers tag): it must be ignored.
        wait_for(lambda: server.metrics().get('chunksync_events_total{outcome="artifact"}', 0) >= 1,
                 "the notification of our own index push")
        metrics = server.metrics()
        assert metrics["chunksync_images_indexed_total"] == 1
        assert metrics['chunksync_events_total{outcome="indexed"}'] == 1
        synced(server, repo, "v1")
        assert server.metrics()["chunksync_images_indexed_total"] == 1  # served from what the event built


def test_event_filtering() -> None:
    manifest = "application/vnd.oci.image.manifest.v1+json"
    body = json.dumps({"events": [
        {"action": "push", "target": {"mediaType": manifest, "repository": "a/b", "digest": "sha256:" + "1" * 64,
                                      "tag": "v1"}},
        {"action": "push", "target": {"mediaType": manifest, "repository": "a/b", "digest": "sha256:" + "1" * 64}},
        {"action": "push", "target": {"mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
                                      "repository": "a/b", "digest": "sha256:" + "2" * 64}},
        {"action": "push", "target": {"mediaType": manifest, "repository": "a/b", "digest": "md5:1"}},
    ]}).encode()
    pushed, ignored = parse_events(body)
    assert [(p.repository, p.digest[-1]) for p in pushed] == [("a/b", "1"), ("a/b", "2")]
    assert ignored == 2  # the same manifest twice counts once; a bad digest is dropped
    assert is_artifact({"artifactType": ARTIFACT_TYPE, "config": {"mediaType": OCI_EMPTY}})
    assert is_artifact({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
                        "subject": {"digest": "sha256:" + "1" * 64}})
    assert not is_artifact({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"}})


def test_multi_platform_image(registry: Registry, tmp_path: Path) -> None:
    repo = "server/multi"
    image = push_multiarch(tmp_path, registry, repo, "v1", {
        "linux/amd64": [real_files(200_000)],
        "linux/arm64": [real_files(200_000, skip=100)],
    })
    with ServerProcess(registry.url, store=tmp_path / "store") as server:
        arm = synced(server, repo, "v1", "linux/arm64")
        assert arm.header is not None
        assert arm.header["manifest_digest"] == image.manifests["linux/arm64"]
        assert arm.header["index_digest"] == image.index_digest
        assert arm.header["platform"] == "linux/arm64"
        default = synced(server, repo, "v1")
        assert default.header is not None and default.header["manifest_digest"] == image.manifests["linux/amd64"]
        missing = post(server.url, "/v1/sync", SyncRequest(repo, "v1", "linux/s390x").encode())
        error = assert_error(missing, 404, "linux/s390x", "linux/arm64")
        assert error["code"] == "platform_not_found"


def test_index_command(registry: Registry, tmp_path: Path) -> None:
    repo = "server/cli"
    layout = build_image(tmp_path, [real_files(400_000)], "v1")
    digest = push_image(layout, "v1", registry, repo)
    ref = f"{registry.host}/{repo}:v1"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CHUNKSYNC), "index", *args], capture_output=True, text=True, timeout=120)

    first = run(ref, "--store", str(tmp_path / "store-1"))
    assert first.returncode == 0, first.stderr
    assert "indexed 1 layers" in first.stdout and "MB/s" in first.stdout and "pushed as sha256:" in first.stdout
    again = run(ref, "--store", str(tmp_path / "store-2"), "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["manifest_digest"] == digest and report["source"] == "registry" and report["chunks"] > 0
    bad = run(f"{registry.host}/{repo}:nope", "--store", str(tmp_path / "store-1"))
    assert bad.returncode == 1 and "error:" in bad.stderr and "nope" in bad.stderr
    invalid = run("127.0.0.1:5000/UPPER/case", "--store", str(tmp_path / "store-1"))
    assert invalid.returncode == 2 and "invalid repository" in invalid.stderr


def test_concurrent_first_syncs_index_once(registry: Registry, tmp_path: Path) -> None:
    repo = "server/single-flight"
    layout = build_image(tmp_path, [real_files(800_000)], "v1")
    push_image(layout, "v1", registry, repo)
    with ServerProcess(registry.url, store=tmp_path / "store") as server:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: synced(server, repo, "v1"), range(4)))
        assert len({answer.header["index"] for answer in answers if answer.header}) == 1
        assert all(answer.ids == answers[0].ids for answer in answers)
        assert server.metrics()["chunksync_images_indexed_total"] == 1
