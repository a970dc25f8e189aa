"""End to end: the real registry, the real `chunksync serve` process and `chunksync pull` processes, with faults
injected on the way by a real proxy (tests/frame_proxy.py)."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkstore.index import decode_index
from chunkstore.store import LocalStore
from frame_proxy import CORRUPT_RAW, CORRUPT_ZSTD, FAIL, HOLD, FrameProxy
from helpers import Registry, push_multiarch, real_files, run
from pull_tools import (ImagePair, pull, pull_command, pull_env, push_auth_pair, push_pair, skopeo_config_digest,
                        skopeo_inspect)
from server_process import ServerProcess


@pytest.fixture(scope="module")
def pair(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> ImagePair:
    return push_pair(tmp_path_factory.mktemp("e2e-images"), registry, "test/pull-e2e", 3_000_000, 1_000_000)


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(registry.url, store=tmp_path_factory.mktemp("server") / "store") as process:
        yield process


def layer_files_match_config(layout: Path, tag: str) -> None:
    """Every layer blob in the layout hashes to the diff_id the registry's config names, in order."""
    config = json.loads(run("skopeo", "inspect", "--config", "--raw", f"oci:{layout}:{tag}"))
    layers = skopeo_inspect(layout, tag)["Layers"]
    assert layers == config["rootfs"]["diff_ids"]
    for diff_id in layers:
        blob = layout / "blobs" / "sha256" / diff_id.split(":")[1]
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == diff_id


def test_v1_then_v2_downloads_only_what_changed(pair: ImagePair, server: ServerProcess, tmp_path: Path) -> None:
    store, layout = tmp_path / "store", tmp_path / "out"
    first = pull(pair.ref("v1"), server.url, store, "--out", f"oci:{layout}").report
    assert first["path"] == "diff" and first["have_images"] == 0
    assert first["manifest_digest"] == pair.digests["v1"]
    assert first["config_digest"] == skopeo_config_digest(pair.ref("v1"))
    # zstd chunks of a first pull cost about what the gzip layers do.
    assert first["bytes_received"] <= 1.1 * first["full_pull_bytes"]

    second = pull(pair.ref("v2"), server.url, store, "--out", f"oci:{layout}").report
    assert second["path"] == "diff" and second["have_images"] == 1
    assert second["config_digest"] == skopeo_config_digest(pair.ref("v2"))
    assert 0 < second["chunks_received"] < first["chunks_received"] / 10
    assert second["bytes_received"] < 0.1 * second["full_pull_bytes"]
    print(f"\nv1: {first['bytes_received']} of {first['full_pull_bytes']} bytes; "
          f"v2: {second['bytes_received']} of {second['full_pull_bytes']} bytes")

    for tag in ("v1", "v2"):
        layer_files_match_config(layout, tag)
    archive = tmp_path / "v2.tar"
    run("skopeo", "copy", "--quiet", f"oci:{layout}:v2", f"docker-archive:{archive}")
    manifest = json.loads(run("tar", "-xOf", archive, "manifest.json"))
    assert skopeo_config_digest(pair.ref("v2")).split(":")[1] in manifest[0]["Config"]

    # The same image again: rebuilt from the store, only the registry's manifest crosses the network.
    again = pull(pair.ref("v2"), server.url, store).report
    assert again["path"] == "local" and again["chunks_received"] == 0 and again["bytes_received"] < 5_000


@pytest.mark.parametrize("mode", [CORRUPT_RAW, CORRUPT_ZSTD])
def test_damaged_chunks_are_detected_and_repaired(pair: ImagePair, server: ServerProcess, tmp_path: Path,
                                                  mode: str) -> None:
    layout = tmp_path / "out"
    with FrameProxy(server.url, mode) as proxy:
        result = pull(pair.ref("v1"), proxy.url, tmp_path / "store", "--out", f"oci:{layout}")
    report = result.report
    assert proxy.damaged_frames == 1
    assert report["chunks_rejected"] >= 1 and "asked for again" in result.stderr
    assert report["path"] == "repair" and report["repair_chunks"] == report["chunks_rejected"]
    assert proxy.requests == {"/v1/sync": 1, "/v1/chunks": 1}
    layer_files_match_config(layout, "v1")


def test_chunks_damaged_every_time_fall_back_per_layer(pair: ImagePair, server: ServerProcess,
                                                      tmp_path: Path) -> None:
    layout = tmp_path / "out"
    with FrameProxy(server.url, CORRUPT_RAW, damage_answers=2) as proxy:
        result = pull(pair.ref("v1"), proxy.url, tmp_path / "store", "--out", f"oci:{layout}")
    report = result.report
    assert report["path"] == "fallback" and report["registry_layers"] == 1
    assert "pulling it plainly from the registry" in result.stderr
    layer_files_match_config(layout, "v1")


def test_server_error_falls_back_and_says_so(pair: ImagePair, server: ServerProcess, tmp_path: Path) -> None:
    with FrameProxy(server.url, FAIL) as proxy:
        result = pull(pair.ref("v1"), proxy.url, tmp_path / "store", "--out", f"oci:{tmp_path / 'out'}")
    assert result.report["path"] == "fallback"
    assert "503" in result.stderr and "pulling plainly from the registry" in result.stderr
    layer_files_match_config(tmp_path / "out", "v1")


def test_killed_pull_resumes_without_downloading_stored_chunks(registry: Registry, server: ServerProcess,
                                                              tmp_path: Path) -> None:
    # Big enough for several CHUNKS frames, so the kill lands between two of them.
    big = push_pair(tmp_path / "img", registry, "test/pull-kill", 6_000_000, 200_000)
    store = tmp_path / "store"
    stderr_path = tmp_path / "first-pull.stderr"
    with FrameProxy(server.url, HOLD) as proxy, stderr_path.open("w") as stderr:
        process = subprocess.Popen(pull_command(big.ref("v1"), proxy.url, store), env=pull_env(),
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            assert proxy.forwarded_first_chunks.wait(120), "the pull never got its first CHUNKS frame"
            # Generous: a 2-core machine loaded by other test runs; the loop ends as soon as a chunk is stored.
            deadline = time.monotonic() + 120
            while (stored := LocalStore(store).count()) == 0 and time.monotonic() < deadline \
                    and process.poll() is None:
                time.sleep(0.05)  # waiting for the device to store what it got; not a timing assertion
            stored = LocalStore(store).count()
            assert stored > 0, (f"nothing stored after the first CHUNKS frame; the pull "
                                f"{'is still running' if process.poll() is None else 'exited'}: "
                                f"{stderr_path.read_text()[-2000:]}")
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            proxy.release()
    kept = set(LocalStore(store).ids())

    report = pull(big.ref("v1"), server.url, store).report
    record = LocalStore(store).get_image(big.repo, big.digests["v1"])
    assert record is not None and record.complete
    needed = decode_index(record.index_data).chunk_ids()
    assert kept < needed
    assert report["chunks_received"] == len(needed - kept)  # not one chunk the store already had
    assert report["bloom_bytes"] > 0


def test_credentials_from_auth_file_reach_the_server(auth_registry: Registry, tmp_path: Path) -> None:
    pair, auth_file = push_auth_pair(tmp_path, auth_registry, "test/pull-auth-e2e", "bob")
    # The server reads images with its own account (alice); the device's credentials (bob's, forwarded) decide
    # whether it may have this image.
    with ServerProcess(auth_registry.url, store=tmp_path / "server-store", user="alice",
                       password=auth_registry.users["alice"]) as server:
        report = pull(pair.ref("v1"), server.url, tmp_path / "store",
                      env=pull_env(REGISTRY_AUTH_FILE=str(auth_file))).report
        assert report["path"] == "diff" and report["chunks_received"] > 0
        refused = pull(pair.ref("v1"), server.url, tmp_path / "store2", "--creds", "bob:wrong")
    assert refused.returncode == 1 and "credentials" in refused.stderr


def test_platform_picks_the_image_of_an_index(registry: Registry, server: ServerProcess, tmp_path: Path) -> None:
    multi = push_multiarch(tmp_path, registry, "test/pull-multi", "v1", {
        "linux/amd64": [real_files(100_000, prefix="amd64/")],
        "linux/arm64": [real_files(100_000, skip=30, prefix="arm64/")],
    })
    ref = f"{registry.host}/test/pull-multi:v1"
    report = pull(ref, server.url, tmp_path / "store", "--platform", "linux/arm64", "--out",
                  f"oci:{tmp_path / 'out'}").report
    assert report["manifest_digest"] == multi.manifests["linux/arm64"] and report["path"] == "diff"
    assert skopeo_inspect(tmp_path / "out", "v1")["Architecture"] == "arm64"
    missing = pull(ref, server.url, tmp_path / "store", "--platform", "linux/s390x")
    assert missing.returncode == 1 and "no image for platform linux/s390x" in missing.stderr
