"""Reassembly: layers rebuilt from the store, and every way a chunk source can lie is caught without leaving a file."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from chunkstore import oci
from chunkstore.index import ImageIndex, LayerIndex, decode_index, index_layer
from chunkstore.reassemble import ChunkMismatch, ReassemblyError, layer_pieces, reassemble_to_file, write_layer
from chunkstore.store import CorruptChunk, LocalStore
from tarkit import compress, gnu_tar, make_tree, sha256, uncompressed
from test_store import corrupt


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[LayerIndex, LocalStore, bytes]:
    work = tmp_path_factory.mktemp("reassemble")
    blob = compress(gnu_tar(make_tree(work / "tree"), work / "l.tar", "--format=gnu", "-S"), "gzip")
    store = LocalStore(work / "store")
    batch: list[tuple[bytes, bytes]] = []
    with open(blob, "rb") as f:
        layer = index_layer(f, oci.OCI_LAYER_GZIP, on_chunk=lambda cid, data: batch.append((cid, data)))
    store.put_many(batch)
    return layer, store, uncompressed(blob)


def test_reassemble_to_file(indexed, tmp_path: Path) -> None:
    layer, store, expected = indexed
    path = reassemble_to_file(layer, store.get, tmp_path / "layer.tar")
    assert path.read_bytes() == expected and list(tmp_path.iterdir()) == [path]


def test_from_a_decoded_index(indexed) -> None:
    layer, store, expected = indexed
    decoded = decode_index(ImageIndex("sha256:" + "0" * 64, [layer]).encode()).layers[0]
    out = io.BytesIO()
    assert write_layer(decoded, store.get, out) == sha256(expected) and out.getvalue() == expected
    assert all(len(piece) <= 256 * 1024 for piece in layer_pieces(decoded, store.get))


def lying(store: LocalStore, victim: bytes, lie: bytes):
    def get(cid: bytes) -> bytes:
        return lie if cid == victim else store.get(cid)
    return get


@pytest.mark.parametrize("how", ["other bytes, same length", "one byte more", "another chunk's bytes"])
def test_wrong_chunk_is_a_mismatch_and_leaves_no_file(indexed, tmp_path: Path, how: str) -> None:
    layer, store, _ = indexed
    victim, length = list(layer.chunks)[len(layer.chunks) // 2]
    good = store.get(victim)
    lie = {"other bytes, same length": bytes(b ^ 1 for b in good[:1]) + good[1:],
           "one byte more": good + b"!",
           "another chunk's bytes": store.get(layer.chunks.id_at(0))}[how]
    with pytest.raises(ChunkMismatch, match=victim.hex()) as caught:
        reassemble_to_file(layer, lying(store, victim, lie), tmp_path / "layer.tar")
    assert caught.value.chunk_id == victim
    assert list(tmp_path.iterdir()) == []  # neither the output nor the partial file


def test_wrong_header_chunk_is_a_mismatch(indexed, tmp_path: Path) -> None:
    layer, store, _ = indexed
    victim = layer.header_chunks.id_at(0)
    with pytest.raises(ChunkMismatch):
        reassemble_to_file(layer, lying(store, victim, b"\0" * 512), tmp_path / "layer.tar")
    assert list(tmp_path.iterdir()) == []


def test_missing_chunk_leaves_no_file_and_an_existing_output_untouched(indexed, tmp_path: Path) -> None:
    layer, store, _ = indexed
    out = tmp_path / "layer.tar"
    out.write_bytes(b"previous")

    def get(cid: bytes) -> bytes:
        if cid == layer.chunks.id_at(len(layer.chunks) - 1):
            raise KeyError(cid.hex())
        return store.get(cid)
    with pytest.raises(KeyError):
        reassemble_to_file(layer, get, out)
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"previous"


def test_index_that_lies_about_the_diff_id(indexed, tmp_path: Path) -> None:
    layer, store, _ = indexed
    decoded = decode_index(ImageIndex("sha256:" + "0" * 64, [layer]).encode()).layers[0]
    decoded.diff_id = "sha256:" + "f" * 64
    with pytest.raises(ReassemblyError, match="expected sha256:f"):
        reassemble_to_file(decoded, store.get, tmp_path / "layer.tar")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verify_chunks", [True, False])
def test_corrupt_chunk_in_the_store_stops_reassembly(indexed, tmp_path: Path, verify_chunks: bool) -> None:
    # verify_chunks=False (what a pull passes): the store's own check is the one that catches it.
    layer, store, _ = indexed
    victim = layer.chunks.id_at(1)
    corrupt(store, victim, "flip a byte of the chunk")
    try:
        with pytest.raises(CorruptChunk):
            reassemble_to_file(layer, store.get, tmp_path / "layer.tar", verify_chunks=verify_chunks)
        assert list(tmp_path.iterdir()) == [] and not store.has(victim)
    finally:  # put it back for the other tests of this module
        store.put(victim, uncompressed_chunk(layer, victim, tmp_path))


def uncompressed_chunk(layer: LayerIndex, cid: bytes, tmp_path: Path) -> bytes:
    tar = gnu_tar(make_tree(tmp_path / "again"), tmp_path / "again.tar", "--format=gnu", "-S")
    found = {}
    index_layer(open(tar, "rb"), oci.OCI_LAYER_TAR, on_chunk=lambda c, d: found.setdefault(c, d))
    return found[cid]
