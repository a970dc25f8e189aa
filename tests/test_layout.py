"""client.layout: OCI layouts written atomically, several tags side by side, accepted by skopeo."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from chunkstore.index import index_layer
from chunkstore.oci import sha256_digest
from chunkstore.reassemble import ReassemblyError, reassemble_to_file
from client.layout import LayerBlob, Layout, LayoutError, build_manifest, parse_target
from helpers import run


def test_parse_target() -> None:
    assert parse_target("oci:/a/b").path == Path("/a/b") and parse_target("oci:/a/b").tag is None
    assert parse_target("oci:/a/b:v2") == parse_target("oci:/a/b:v2")
    assert parse_target("oci:/a/b:v2").tag == "v2" and parse_target("oci:rel").path == Path("rel")
    for bad in ("docker://x/y", "oci:", "oci:/a:bad tag!"):
        with pytest.raises(LayoutError):
            parse_target(bad)


def make_tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _layer(tmp_path: Path, name: str, data: bytes):
    tar = tmp_path / f"{name}.tar"
    tar.write_bytes(make_tar({f"{name}.txt": data}))
    chunks: dict[bytes, bytes] = {}
    with tar.open("rb") as f:
        layer = index_layer(f, "application/vnd.oci.image.layer.v1.tar", on_chunk=chunks.__setitem__)
    return layer, chunks


def _config(diff_ids: list[str]) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def test_two_tags_side_by_side_and_skopeo_reads_them(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    for tag, text in (("one", b"first\n" * 1000), ("two", b"second\n" * 1000)):
        layer, chunks = _layer(tmp_path, tag, text)
        reassemble_to_file(layer, chunks.__getitem__, layout.blob_path(layer.diff_id))
        config = _config([layer.diff_id])
        layout.put_blob(config)
        layout.tag_manifest(build_manifest(config, [LayerBlob(layer.diff_id, layer.uncompressed_size)]), tag)
    for tag in ("one", "two"):
        inspected = json.loads(run("skopeo", "inspect", f"oci:{tmp_path / 'out'}:{tag}"))
        assert len(inspected["Layers"]) == 1
    # Re-tagging replaces only that tag's entry.
    config = _config([])
    layout.put_blob(config)
    layout.tag_manifest(build_manifest(config, []), "one")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]) == ["one", "two"]
    assert layout.manifest_for("one")["layers"] == []


def test_a_layer_that_fails_verification_leaves_nothing(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    layer, chunks = _layer(tmp_path, "x", b"payload\n" * 5000)
    cid = next(iter(chunks))
    chunks[cid] = b"not the chunk"
    with pytest.raises(ReassemblyError):
        reassemble_to_file(layer, chunks.__getitem__, layout.blob_path(layer.diff_id))
    assert sorted(p.name for p in (tmp_path / "out" / "blobs" / "sha256").iterdir()) == []
    assert not (tmp_path / "out" / "index.json").exists()


def test_has_blob_checks_content(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    digest = layout.put_blob(b"hello")
    assert digest == sha256_digest(b"hello") and layout.has_blob(digest, 5)
    layout.blob_path(digest).write_bytes(b"jello")  # same size, other bytes
    assert not layout.has_blob(digest, 5)
    assert layout.put_blob(b"hello") == digest and layout.blob_path(digest).read_bytes() == b"hello"
