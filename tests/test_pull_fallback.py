"""`chunksync pull` with no server to talk to: a plain registry pull that says so, writes a valid OCI layout,
and teaches the store the image's chunks. Real registry, real skopeo, the real CLI as a process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunkstore.index import decode_index
from chunkstore.store import LocalStore
from helpers import Registry, free_port, run
from pull_tools import ImagePair, pull, pull_env, push_auth_pair, push_pair, skopeo_config_digest, skopeo_inspect


@pytest.fixture(scope="module")
def pair(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> ImagePair:
    return push_pair(tmp_path_factory.mktemp("fallback-images"), registry, "test/pull-fallback")


def dead_server() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_server_down_falls_back_to_registry_and_says_so(pair: ImagePair, tmp_path: Path) -> None:
    store, layout = tmp_path / "store", tmp_path / "out"
    result = pull(pair.ref("v1"), dead_server(), store, "--out", f"oci:{layout}:v1")
    report = result.report
    assert "pulling plainly from the registry" in result.stderr
    assert report["path"] == "fallback"
    assert report["manifest_digest"] == pair.digests["v1"]
    assert report["config_digest"] == skopeo_config_digest(pair.ref("v1"))
    assert report["registry_layers"] == 2 and report["chunks_received"] == 0
    # A plain pull downloads at least every compressed layer.
    assert report["bytes_received"] >= report["full_pull_bytes"] > 0
    assert report["output"] == f"oci:{layout}:v1"

    inspected = skopeo_inspect(layout, "v1")
    assert inspected["Digest"] != pair.digests["v1"]  # a new manifest (uncompressed layers)...
    config = json.loads(run("skopeo", "inspect", "--config", "--raw", f"oci:{layout}:v1"))
    assert config["rootfs"]["diff_ids"] == inspected["Layers"]  # ...whose layers are the diff_ids

    # The store learned the image: recorded complete, every chunk of its index present.
    with_store = LocalStore(store)
    record = with_store.get_image(pair.repo, pair.digests["v1"])
    assert record is not None and record.complete
    ids = decode_index(record.index_data).chunk_ids()
    assert with_store.has_many(ids) == ids


def test_fallback_output_is_accepted_by_skopeo_copy(pair: ImagePair, tmp_path: Path) -> None:
    layout = tmp_path / "out"
    pull(pair.ref("v2"), dead_server(), tmp_path / "store", "--out", f"oci:{layout}").report
    archive = tmp_path / "image.tar"
    run("skopeo", "copy", "--quiet", f"oci:{layout}:v2", f"docker-archive:{archive}")
    # docker-archive keeps the config under its digest: the image ID is the registry's.
    manifest = json.loads(run("tar", "-xOf", archive, "manifest.json"))
    config_hex = skopeo_config_digest(pair.ref("v2")).split(":")[1]
    assert manifest[0]["Config"].removeprefix("blobs/sha256/").removesuffix(".json") == config_hex


def test_second_image_keeps_the_first_in_the_layout(pair: ImagePair, tmp_path: Path) -> None:
    layout, store = tmp_path / "out", tmp_path / "store"
    pull(pair.ref("v1"), dead_server(), store, "--out", f"oci:{layout}:one").report
    pull(pair.ref("v2"), dead_server(), store, "--out", f"oci:{layout}:two").report
    assert skopeo_inspect(layout, "one")["Layers"] != skopeo_inspect(layout, "two")["Layers"]


def test_credentials_from_auth_file(auth_registry: Registry, tmp_path: Path) -> None:
    pair, auth_file = push_auth_pair(tmp_path, auth_registry, "test/pull-auth-file", "alice")

    anonymous = pull(pair.ref("v1"), dead_server(), tmp_path / "store")
    assert anonymous.returncode == 1
    assert "credentials" in anonymous.stderr and "Traceback" not in anonymous.stderr

    env = pull_env(REGISTRY_AUTH_FILE=str(auth_file))
    report = pull(pair.ref("v1"), dead_server(), tmp_path / "store", env=env).report
    assert report["manifest_digest"] == pair.digests["v1"]


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    for args, expected in [
        (("NOT A REF",), "invalid"),
        (("127.0.0.1:1/app:v1", "--out", "docker://x"), "oci:DIR[:TAG]"),
        (("127.0.0.1:1/app:v1", "--creds", "nocolon"), "USERNAME:PASSWORD"),
    ]:
        result = pull(args[0], dead_server(), tmp_path / "store", *args[1:])
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr


def test_unknown_image_says_so(pair: ImagePair, tmp_path: Path) -> None:
    result = pull(pair.ref("v9"), dead_server(), tmp_path / "store")
    assert result.returncode == 1
    assert "is not in the registry" in result.stderr


def test_a_tampered_layer_is_never_written(registry: Registry, tmp_path: Path) -> None:
    pair = push_pair(tmp_path / "img", registry, "test/pull-tampered", 300_000, 100_000)
    manifest = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{pair.ref('v1')}"))
    blob = registry.blob_path(manifest["layers"][1]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the digest can tell
    blob.write_bytes(bytes(data))
    layout = tmp_path / "out"
    result = pull(pair.ref("v1"), dead_server(), tmp_path / "store", "--out", f"oci:{layout}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "layer 1" in result.stderr
    assert not (layout / "index.json").exists()  # nothing that looks like an image
