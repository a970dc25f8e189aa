"""`chunksync chunk` and `chunksync store stats|verify|gc`, run as a user runs them: the installed command."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chunkstore import oci
from chunkstore.index import ImageIndex, index_layer
from chunkstore.store import LocalStore
from tarkit import compress, gnu_tar, make_tree, touched_copy
from test_store import corrupt

CHUNKSYNC = str(Path(sys.executable).parent / "chunksync")


def chunksync(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHUNKSYNC, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("cli")
    tree = make_tree(work / "tree")
    small = work / "small"
    small.mkdir()
    (small / "etc").mkdir()
    (small / "etc/hostname").write_text("box\n")
    return {
        "gz": compress(gnu_tar(tree, work / "a.tar", "--format=gnu", "-S"), "gzip"),
        "touched": gnu_tar(touched_copy(tree, work / "touched"), work / "b.tar", "--format=gnu", "-S", reverse=True),
        "small": compress(gnu_tar(small, work / "c.tar", "--format=pax"), "zstd"),
    }


def test_chunk_reports_a_layer(layers: dict[str, Path]) -> None:
    proc = chunksync("chunk", layers["gz"])
    assert proc.returncode == 0, proc.stderr
    data = layers["gz"].read_bytes()
    for expected in ("gzip", "MB compressed", "MB uncompressed", "sha256:" + hashlib.sha256(data).hexdigest(),
                     "diff_id", "files", "content (avg", "kB", "header", "index", "MB/s"):
        assert expected in proc.stdout
    assert "store" not in proc.stdout


def test_chunk_json(layers: dict[str, Path]) -> None:
    proc = chunksync("chunk", layers["small"], "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    layer = index_layer(open(layers["small"], "rb"), oci.OCI_LAYER_ZSTD)
    assert report["compression"] == "zstd" and report["media_type"] == oci.OCI_LAYER_ZSTD
    assert (report["digest"], report["diff_id"]) == (layer.digest, layer.diff_id)
    assert (report["size"], report["uncompressed_size"]) == (layer.size, layer.uncompressed_size)
    assert report["files"] == 1 and report["content_chunks"] == 1 and report["header_chunks"] == 1
    assert report["index_bytes"] == len(ImageIndex(layer.digest, [layer]).encode())
    assert "store" not in report


def test_chunk_against_a_store_then_add(layers: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = chunksync("chunk", layers["gz"], "--store", store, "--add", "--json")
    first = json.loads(proc.stdout)["store"]
    assert first["chunks_present"] == 0 and first["chunks_added"] == first["unique_chunks"] > 10
    # The same files re-tarred with new mtimes and order: every content chunk is already there.
    proc = chunksync("chunk", layers["touched"], "--store", store)
    assert proc.returncode == 0, proc.stderr
    assert "already had" in proc.stdout and "add them with --add" in proc.stdout
    report = json.loads(chunksync("chunk", layers["touched"], "--store", store, "--json").stdout)
    touched = index_layer(open(layers["touched"], "rb"), oci.OCI_LAYER_TAR)
    content = {cid for cid, _ in touched.chunks}
    assert LocalStore(store).has_many(content) == content
    assert report["store"]["chunks_present"] == len(LocalStore(store).has_many(touched.chunk_ids())) >= len(content)
    assert LocalStore(store).count() == first["unique_chunks"]  # without --add nothing was stored


def test_add_uses_the_default_store(layers: dict[str, Path], tmp_path: Path) -> None:
    proc = chunksync("chunk", layers["small"], "--add", env={"CHUNKSYNC_STORE": str(tmp_path / "env-store")})
    assert proc.returncode == 0, proc.stderr
    assert "added 2" in proc.stdout and LocalStore(tmp_path / "env-store").count() == 2


@pytest.mark.parametrize("args,code,message", [
    (["missing.tar"], 2, "cannot read missing.tar: No such file"),
    (["{small}", "--media-type", oci.OCI_LAYER_GZIP], 1, "says gzip, but the blob's first bytes say zstd"),
    (["{small}", "--store", "{tmp}/nowhere"], 1, "no store at .*nowhere.*--add"),
])
def test_chunk_errors(layers: dict[str, Path], tmp_path: Path, args: list[str], code: int, message: str) -> None:
    args = [a.format(small=layers["small"], tmp=tmp_path) for a in args]
    proc = chunksync("chunk", *args)
    assert proc.returncode == code and proc.stdout == ""
    assert __import__("re").search(message, proc.stderr), proc.stderr


def image_store(path: Path, layers: dict[str, Path]) -> tuple[LocalStore, dict[str, set[bytes]]]:
    """A store holding three images: app (old), app (new), db; each a one-layer image."""
    store = LocalStore(path)
    ids = {}
    for n, (repo, name) in enumerate([("app", "gz"), ("app", "touched"), ("db", "small")]):
        batch: list[tuple[bytes, bytes]] = []
        with open(layers[name], "rb") as blob:
            layer = index_layer(blob, "", on_chunk=lambda cid, data: batch.append((cid, data)))
        layer.media_type = oci.OCI_LAYER_TAR
        store.put_many(batch)
        digest = f"sha256:{n:064x}"
        store.put_image(repo, digest, ImageIndex(digest, [layer]).encode(), complete=True)
        ids[f"{repo}{n}"] = layer.chunk_ids()
    return store, ids


def test_store_stats(layers: dict[str, Path], tmp_path: Path) -> None:
    store, _ = image_store(tmp_path, layers)
    proc = chunksync("store", "stats", "--store", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{store.count():,}" in proc.stdout and "MB uncompressed" in proc.stdout and "3 (3 complete)" in proc.stdout
    report = json.loads(chunksync("store", "stats", "--store", tmp_path, "--json").stdout)
    stats = store.stats()
    assert report["chunks"] == stats.chunks and report["images"] == 3
    assert report["ratio"] == pytest.approx(stats.stored_bytes / stats.uncompressed_bytes)


def test_store_verify_finds_removes_and_lists_corrupt_chunks(layers: dict[str, Path], tmp_path: Path) -> None:
    store, _ = image_store(tmp_path, layers)
    proc = chunksync("store", "verify", "--store", tmp_path)
    assert proc.returncode == 0 and "all" in proc.stdout and "match their ids" in proc.stdout
    bad = sorted(store.ids())[:2]
    for cid in bad:
        corrupt(store, cid, "flip a byte of the chunk")
    proc = chunksync("store", "verify", "--store", tmp_path)
    assert proc.returncode == 1
    assert "2 of" in proc.stdout and "removed" in proc.stdout and all(cid.hex() in proc.stdout for cid in bad)
    assert not store.has_many(bad)
    report = json.loads(chunksync("store", "verify", "--store", tmp_path, "--json").stdout)
    assert report["bad"] == []


def test_store_gc_keeps_the_newest_images_per_repository(layers: dict[str, Path], tmp_path: Path) -> None:
    store, ids = image_store(tmp_path, layers)
    before = store.stats()
    proc = chunksync("store", "gc", "--keep", "1", "--store", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"dropped app@sha256:{0:064x}" in proc.stdout and "freed" in proc.stdout and "MB" in proc.stdout
    kept = ids["app1"] | ids["db2"]
    assert set(store.ids()) == kept  # the old image's own (header) chunks are gone, shared content stays
    assert len(ids["app0"] - kept) > 0 and store.stats().stored_bytes < before.stored_bytes
    assert [r.manifest_digest[-1] for r in store.images()] == ["2", "1"]
    assert all(store.get(cid) for cid in kept)
    report = json.loads(chunksync("store", "gc", "--keep", "0", "--store", tmp_path, "--json").stdout)
    assert report["chunks_deleted"] == len(kept) and len(report["images_dropped"]) == 2 and store.count() == 0


def test_store_gc_stops_on_an_unreadable_index(layers: dict[str, Path], tmp_path: Path) -> None:
    store, _ = image_store(tmp_path, layers)
    store.put_image("app", "sha256:" + "f" * 64, b"not an index")
    count = store.count()
    proc = chunksync("store", "gc", "--keep", "2", "--store", tmp_path)
    assert proc.returncode == 1 and "unreadable" in proc.stderr and "deleted nothing" in proc.stderr
    assert store.count() == count and len(store.images()) == 4


@pytest.mark.parametrize("args,message", [
    (["gc", "--keep", "-1"], "want a whole number"),
    (["gc"], "--keep"),
    (["fsck"], "invalid choice"),
])
def test_store_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    proc = chunksync("store", *args, "--store", tmp_path)
    assert proc.returncode == 2 and message in proc.stderr


def test_store_commands_without_a_store(tmp_path: Path) -> None:
    for action in ("stats", "verify"):
        proc = chunksync("store", action, env={"CHUNKSYNC_STORE": str(tmp_path / "none")})
        assert proc.returncode == 1 and f"no store at {tmp_path / 'none'}" in proc.stderr
