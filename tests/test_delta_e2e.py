"""Deltas end to end (protocol versions 2 to 7): the real registry, the real `chunksync serve` and `chunksync pull`
processes; changed files arrive encoded against the device's own old files, the index against its old index,
and every layer is verified as usual. Tampering on the way is done by a real proxy (tests/delta_proxy.py)."""
from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkstore.bloom import BloomFilter
from chunkstore.index import ImageIndex, decode_index
from chunkstore.indexdelta import decode_index_delta, is_placeholder, placeholder
from chunkstore.store import LocalStore
from chunkstore.wire import FRAME_DELTA, DeltaGroup, SyncRequest, decode_delta, item_spans, read_frames
from delta_proxy import CORRUPT_DELTA, CORRUPT_GROUP, REBASE_DELTA, DeltaProxy
from frame_proxy import HOLD_DELTA, FrameProxy
from helpers import Registry, build_image, push_image
from pull_tools import ImagePair, pull, pull_command, pull_env, push_pair, skopeo_config_digest
from server.deltas import target_ids
from server_process import Answer, ServerProcess, post
from tarkit import make_tree, touched_copy
from test_pull_e2e import layer_files_match_config

REPO = "test/delta-e2e"


@pytest.fixture(scope="module")
def pair(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> ImagePair:
    return push_pair(tmp_path_factory.mktemp("delta-images"), registry, REPO, 2_000_000, 800_000)


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(registry.url, store=tmp_path_factory.mktemp("delta-server") / "store") as process:
        yield process


@pytest.fixture(scope="module")
def v1_store(pair: ImagePair, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device store holding v1 completely; tests pull v2 into copies of it."""
    store = tmp_path_factory.mktemp("v1-device") / "store"
    assert pull(pair.ref("v1"), server.url, store).report["path"] == "diff"
    return store


def device(v1_store: Path, tmp_path: Path, name: str = "store") -> Path:
    shutil.copytree(v1_store, tmp_path / name)
    return tmp_path / name


def computed(server: ServerProcess) -> tuple[float, float]:
    metrics = server.metrics()
    return (metrics.get('chunksync_delta_pairs_total{outcome="computed"}', 0),
            metrics.get('chunksync_delta_pairs_total{outcome="cached"}', 0))


def test_v2_after_v1_sends_deltas_well_below_plain_chunks(pair: ImagePair, server: ServerProcess, v1_store: Path,
                                                          registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "out"
    report = pull(pair.ref("v2"), server.url, device(v1_store, tmp_path), "--out", f"oci:{layout}").report
    assert report["path"] == "diff" and report["have_images"] == 1
    assert report["delta_items"] > 0 and report["delta_rejected"] == 0
    assert report["index_delta_bytes"] > 0  # the index came as a delta against v1's
    assert report["config_digest"] == skopeo_config_digest(pair.ref("v2"))
    layer_files_match_config(layout, "v2")

    # The same pull from a server that sends whole changed chunks only.
    with ServerProcess(registry.url, store=tmp_path / "plain-server", extra_args=["--no-deltas"]) as plain_server:
        plain = pull(pair.ref("v2"), plain_server.url, device(v1_store, tmp_path, "plain")).report
    assert plain["delta_items"] == 0 and plain["index_delta_bytes"] == 0
    print(f"\nv2 after v1: {report['bytes_received']} bytes with deltas, {plain['bytes_received']} with whole "
          f"chunks, {report['full_pull_bytes']} for a full pull")
    assert report["bytes_received"] < 0.5 * plain["bytes_received"]


def test_a_second_device_gets_the_cached_deltas(pair: ImagePair, server: ServerProcess, v1_store: Path,
                                                tmp_path: Path) -> None:
    first = pull(pair.ref("v2"), server.url, device(v1_store, tmp_path, "a")).report
    computed_before, cached_before = computed(server)
    assert computed_before == 1  # once for this pair, whichever test pulled it first
    second = pull(pair.ref("v2"), server.url, device(v1_store, tmp_path, "b")).report
    computed_after, cached_after = computed(server)
    assert computed_after == 1 and cached_after == cached_before + 1
    assert second["delta_items"] == first["delta_items"] > 0
    assert second["bytes_received"] == pytest.approx(first["bytes_received"], abs=200)


def test_a_delta_against_an_image_the_device_does_not_hold_is_refused(pair: ImagePair, server: ServerProcess,
                                                                      v1_store: Path, tmp_path: Path) -> None:
    # v2 itself as base: a real image, which this device does not hold (it holds v1 only).
    with DeltaProxy(server.url, REBASE_DELTA, base=(REPO, pair.digests["v2"])) as proxy:
        result = pull(pair.ref("v2"), proxy.url, device(v1_store, tmp_path), "--out", f"oci:{tmp_path / 'out'}")
    report = result.report
    assert proxy.tampered_items > 0
    assert report["delta_items"] == 0 and report["delta_rejected"] == proxy.tampered_items
    assert report["path"] == "repair" and report["repair_chunks"] > 0  # asked for again as plain chunks
    assert "does not hold" in result.stderr
    layer_files_match_config(tmp_path / "out", "v2")


@pytest.mark.parametrize("mode", [CORRUPT_DELTA, CORRUPT_GROUP])
def test_a_corrupted_delta_is_repaired_with_plain_chunks(pair: ImagePair, server: ServerProcess, v1_store: Path,
                                                         tmp_path: Path, mode: str) -> None:
    with DeltaProxy(server.url, mode) as proxy:
        result = pull(pair.ref("v2"), proxy.url, device(v1_store, tmp_path), "--out", f"oci:{tmp_path / 'out'}")
    report = result.report
    assert proxy.tampered_items == 1
    assert report["delta_rejected"] == 1 and report["delta_items"] > 0
    assert report["path"] == "repair" and report["repair_chunks"] > 0
    assert "damaged" in result.stderr
    layer_files_match_config(tmp_path / "out", "v2")


def test_version_2_devices_get_the_same_chunks_without_group_items(pair: ImagePair, server: ServerProcess,
                                                                   v1_store: Path) -> None:
    v1, v2 = (decode_index(Answer(post(server.url, "/v1/sync", SyncRequest(REPO, pair.digests[tag]).encode()))
                           .header["index"]) for tag in ("v1", "v2"))  # type: ignore[index]
    delivered = {}
    for version in (2, 3, 4):
        request = SyncRequest(REPO, pair.digests["v2"], have_images=[(REPO, pair.digests["v1"])], version=version)
        response = post(server.url, "/v1/sync", request.encode())
        assert response.status_code == 200, response.text
        frames = list(read_frames(io.BytesIO(response.content)))
        # The runs layout of the index delta is version 4's: an older device never sees the key.
        assert version >= 4 or "layout" not in frames[0].payload["index_delta"]
        # decode_delta for version 2 refuses group items: a version-2 device never gets one.
        items = [item for f in frames if f.type == FRAME_DELTA for item in decode_delta(f.payload, version)[1]]
        assert items and (version == 2) != any(isinstance(item, DeltaGroup) for item in items)
        plain = {cid for cid, _ in Answer(response).chunks}
        delivered[version] = {cid for item in items for cid in target_ids(v2, item)} | plain
        assert delivered[version] == v2.chunk_ids() - v1.chunk_ids()
    assert delivered[2] == delivered[3] == delivered[4]


def test_version_7_names_the_chunks_items_rebuild_by_placeholder_and_the_device_puts_in_their_ids(
        pair: ImagePair, server: ServerProcess, v1_store: Path, tmp_path: Path) -> None:
    v1, v2 = (decode_index(Answer(post(server.url, "/v1/sync", SyncRequest(REPO, pair.digests[tag]).encode()))
                           .header["index"]) for tag in ("v1", "v2"))  # type: ignore[index]
    held = [(REPO, pair.digests["v1"])]

    def answer(version: int, bloom: BloomFilter | None = None) -> tuple[ImageIndex, list, int]:
        """The index a device decodes from the answer's index delta, the answer's items, the delta's bytes."""
        request = SyncRequest(REPO, pair.digests["v2"], have_images=held, bloom=bloom, version=version)
        frames = list(read_frames(io.BytesIO(post(server.url, "/v1/sync", request.encode()).content)))
        delta = frames[0].payload["index_delta"]
        items = [item for f in frames if f.type == FRAME_DELTA for item in decode_delta(f.payload, version)[1]]
        return decode_index_delta(delta, v1), items, len(delta["data"])

    full, _, size6 = answer(6)
    implied, items7, size7 = answer(7)
    assert full.encode() == v2.encode()  # version 6: every id
    rebuilt = {(layer, headers, i) for item in items7 for layer, headers, first, count in item_spans(item)
               for i in range(first, first + count)}
    placeholders = {(j, headers, i) for j, layer in enumerate(implied.layers)
                    for headers, chunks in ((True, layer.header_chunks), (False, layer.chunks))
                    for i in range(len(chunks)) if is_placeholder(chunks.id_at(i))}
    assert rebuilt and placeholders == rebuilt
    for j, headers, i in rebuilt:  # each keeps the first bytes of its id
        real = v2.layers[j].chunk_list(headers).id_at(i)
        got = implied.layers[j].chunk_list(headers).id_at(i)
        assert got == placeholder(real)
    print(f"\nindex delta: {size6} bytes at version 6, {size7} at version 7 ({len(rebuilt)} chunks rebuilt)")
    assert size7 < size6 - 20 * len(rebuilt)

    # A device whose Bloom filter claims one item's chunks does not get that item: it gets every id.
    first_ids = target_ids(v2, items7[0])
    partial, items, _ = answer(7, BloomFilter.build(first_ids))
    assert len(items) < len(items7) and partial.encode() == v2.encode()

    # The device: placeholders filled from what it rebuilt, the stored index is v2's own.
    store = device(v1_store, tmp_path)
    report = pull(pair.ref("v2"), server.url, store, "--out", f"oci:{tmp_path / 'out'}").report
    assert report["path"] == "diff" and report["delta_items"] == len(items7) and report["delta_rejected"] == 0
    assert report["index_delta_bytes"] < size6
    record = LocalStore(store).get_image(REPO, pair.digests["v2"])
    assert record is not None and record.complete and record.index_data == v2.encode()
    layer_files_match_config(tmp_path / "out", "v2")


def test_a_pull_killed_after_its_delta_items_keeps_their_chunks_through_store_gc(
        pair: ImagePair, server: ServerProcess, v1_store: Path, tmp_path: Path) -> None:
    """Version 7: the interrupted pull's record is written with placeholders; the ids the items put in must reach
    it, or `store gc` deletes the rebuilt chunks as named by no record and the retry downloads them again."""
    store = device(v1_store, tmp_path)
    before = set(LocalStore(store).ids())
    with FrameProxy(server.url, HOLD_DELTA) as proxy:
        process = subprocess.Popen(pull_command(pair.ref("v2"), proxy.url, store), env=pull_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert proxy.forwarded_first_delta.wait(120), "the pull never got a DELTA frame"
            deadline = time.monotonic() + 120  # a loaded 2-core machine; the loop ends once the chunks are stored
            while LocalStore(store).count() == len(before) and time.monotonic() < deadline \
                    and process.poll() is None:
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            proxy.release()
    rebuilt = set(LocalStore(store).ids()) - before
    assert rebuilt, "the DELTA frame's chunks were not stored before the kill"
    record = LocalStore(store).get_image(REPO, pair.digests["v2"])
    assert record is not None and not record.complete
    assert rebuilt <= decode_index(record.index_data).chunk_ids()

    gc = subprocess.run([sys.executable, "-m", "client.cli", "store", "gc", "--keep", "2", "--store", str(store)],
                        capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr
    assert rebuilt <= set(LocalStore(store).ids())
    report = pull(pair.ref("v2"), server.url, store).report
    assert report["path"] == "diff" and report["delta_items"] == 0  # every item's chunks are still there


def test_an_mtime_only_rebuild_sends_almost_nothing(registry: Registry, server: ServerProcess,
                                                    tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    layout = build_image(tmp_path, [tree], "v1", layout=tmp_path / "layout")
    build_image(tmp_path, [touched_copy(tree, tmp_path / "touched")], "v2", layout=layout)
    for tag in ("v1", "v2"):
        push_image(layout, tag, registry, "test/delta-mtime")
    ref = f"{registry.host}/test/delta-mtime"
    store = tmp_path / "store"
    pull(f"{ref}:v1", server.url, store)
    report = pull(f"{ref}:v2", server.url, store, "--out", f"oci:{tmp_path / 'out'}").report
    print(f"\nmtime-only rebuild: {report['bytes_received']} bytes received of a {report['full_pull_bytes']} "
          f"byte full pull")
    assert report["path"] == "diff" and report["delta_items"] == 1
    assert report["chunks_received"] == report["delta_chunks"] > 0  # new header chunks only, all from the delta
    assert report["bytes_received"] < max(10_000, 0.02 * report["full_pull_bytes"])
    layer_files_match_config(tmp_path / "out", "v2")
