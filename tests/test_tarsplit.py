"""Real layers made by real tools: every one is rebuilt byte for byte from the store, and the tar-aware split
shares every content chunk across rebuilds that only change mtimes or member order."""
from __future__ import annotations

import io
import random
import re
import tarfile
from pathlib import Path

import pytest

from chunkstore import oci
from chunkstore.index import index_layer
from chunkstore.layers import LayerFormatError
from chunkstore.store import LocalStore
from chunkstore.tarsplit import Content, Header, RawRest, TarSplitter
from tarkit import (compress, content_ids, content_members, gnu_tar, gzip_bytes, index_and_rebuild, make_tree,
                    sha256, skopeo_zstd_layer, touched_copy, umoci_layer, uncompressed)

TAR, GZIP, ZSTD = oci.OCI_LAYER_TAR, oci.OCI_LAYER_GZIP, oci.OCI_LAYER_ZSTD


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tarsplit")


@pytest.fixture(scope="session")
def tree(work: Path) -> Path:
    return make_tree(work / "tree")


@pytest.fixture(scope="session")
def store(work: Path) -> LocalStore:
    return LocalStore(work / "store")


@pytest.fixture(scope="session")
def tars(work: Path, tree: Path) -> dict[str, Path]:
    """Plain tars of the tree in each format GNU tar writes."""
    return {
        "gnu": gnu_tar(tree, work / "gnu.tar", "--format=gnu", "-S"),
        "pax": gnu_tar(tree, work / "pax.tar", "--format=pax", "-S"),  # sparse format 1.0
        "pax-sparse-0.1": gnu_tar(tree, work / "pax01.tar", "--format=pax", "--sparse-version=0.1"),
        "pax-sparse-0.0": gnu_tar(tree, work / "pax00.tar", "--format=pax", "--sparse-version=0.0"),
        "oldgnu": gnu_tar(tree, work / "oldgnu.tar", "--format=oldgnu", "-S"),
    }


# name -> (media type, how to make the blob from the session's tars)
def _cases(work: Path, tree: Path, tars: dict[str, Path]) -> dict[str, tuple[str, Path]]:
    gnu = tars["gnu"].read_bytes()
    header_offset = next(m.offset for m in tarfile.open(tars["gnu"]).getmembers() if m.offset > 0)
    content_offset = next(m.offset_data for m in tarfile.open(tars["gnu"]).getmembers() if m.size > 100_000)
    made: dict[str, tuple[str, Path]] = {}

    def blob(name: str, data: bytes) -> Path:
        path = work / f"case-{name}"
        path.write_bytes(data)
        return path

    made["gnu tar + GNU gzip"] = (GZIP, compress(tars["gnu"], "gzip"))
    made["gnu tar, docker media type"] = (oci.DOCKER_LAYER_GZIP, compress(tars["gnu"], "gzip"))
    made["pax tar, plain"] = (TAR, tars["pax"])
    made["pax tar + zstd"] = (ZSTD, compress(tars["pax"], "zstd"))
    made["pax sparse 0.1"] = (TAR, tars["pax-sparse-0.1"])
    made["pax sparse 0.0"] = (TAR, tars["pax-sparse-0.0"])
    made["oldgnu"] = (TAR, tars["oldgnu"])
    made["umoci repack"] = umoci_layer(work, tree)
    made["skopeo zstd"] = skopeo_zstd_layer(work, work / "umoci-layout")
    made["trailing bytes after end-of-archive"] = (TAR, blob("trailing", gnu + b"trailing garbage\n" * 100))
    made["truncated inside a content"] = (GZIP, blob("trunc-content.gz", gzip_bytes(gnu[:content_offset + 1000])))
    made["truncated inside a header"] = (TAR, blob("trunc-header", gnu[:header_offset + 200]))
    made["not a tar: random bytes"] = (TAR, blob("random", random.Random(1).randbytes(3_000_000)))
    made["random bytes, gzipped"] = (GZIP, blob("random.gz", gzip_bytes(random.Random(2).randbytes(700_000))))
    made["empty blob"] = (TAR, blob("empty", b""))
    made["empty gzip"] = (GZIP, blob("empty.gz", gzip_bytes(b"")))
    made["empty tar"] = (TAR, blob("empty-tar", b"\0" * 10240))
    made["tar then a second tar"] = (TAR, blob("concat", gnu[:header_offset] + b"\0" * 1024 + gnu))
    return made


CASES = ["gnu tar + GNU gzip", "gnu tar, docker media type", "pax tar, plain", "pax tar + zstd", "pax sparse 0.1",
         "pax sparse 0.0", "oldgnu", "umoci repack", "skopeo zstd", "trailing bytes after end-of-archive",
         "truncated inside a content", "truncated inside a header", "not a tar: random bytes",
         "random bytes, gzipped", "empty blob", "empty gzip", "empty tar", "tar then a second tar"]


@pytest.fixture(scope="session")
def cases(work: Path, tree: Path, tars: dict[str, Path]) -> dict[str, tuple[str, Path]]:
    return _cases(work, tree, tars)


@pytest.mark.parametrize("name", CASES)
def test_real_layer_rebuilt_byte_for_byte(name: str, cases: dict[str, tuple[str, Path]], store: LocalStore) -> None:
    media_type, path = cases[name]
    expected = uncompressed(path)
    result = index_and_rebuild(path, media_type, store)
    assert result.rebuilt == expected
    layer = result.layer
    assert layer.diff_id == sha256(expected)
    assert layer.uncompressed_size == len(expected)
    assert layer.digest == sha256(path.read_bytes()) and layer.size == path.stat().st_size
    assert layer.compression == {"\x1f\x8b": "gzip", "\x28\xb5": "zstd"}.get(
        path.read_bytes()[:2].decode("latin-1"), "none")


@pytest.mark.parametrize("name", ["gnu tar + GNU gzip", "pax tar, plain", "pax sparse 0.1", "pax sparse 0.0",
                                  "oldgnu", "umoci repack", "skopeo zstd"])
def test_one_content_run_per_file(name: str, cases: dict[str, tuple[str, Path]], store: LocalStore) -> None:
    media_type, path = cases[name]
    layer = index_and_rebuild(path, media_type, store).layer
    content_runs = [c for _, c in layer.run_pairs() if c]
    assert len(content_runs) == content_members(uncompressed(path))
    assert max(layer.chunks.lengths) <= 256 * 1024


def test_random_bytes_are_one_content_stream(cases: dict[str, tuple[str, Path]], store: LocalStore) -> None:
    layer = index_and_rebuild(cases["not a tar: random bytes"][1], TAR, store).layer
    assert list(layer.run_pairs()) == [(0, 3_000_000), (0, 0)]
    assert len(layer.chunks) > 10  # content-defined chunks, not one blob


def test_truncated_tar_keeps_every_byte(cases: dict[str, tuple[str, Path]]) -> None:
    splitter = TarSplitter(io.BytesIO(uncompressed(cases["truncated inside a content"][1])))
    for event in splitter:
        if isinstance(event, Content):
            while splitter.read_content(1 << 16):
                pass
    assert splitter.truncated


@pytest.mark.parametrize("fmt", ["gnu", "pax", "pax-sparse-0.1", "oldgnu"])
def test_rebuild_with_new_mtimes_and_order_shares_every_content_chunk(
        fmt: str, work: Path, tree: Path, tars: dict[str, Path], store: LocalStore) -> None:
    options = {"gnu": ["--format=gnu", "-S"], "pax": ["--format=pax", "-S"],
               "pax-sparse-0.1": ["--format=pax", "--sparse-version=0.1"], "oldgnu": ["--format=oldgnu", "-S"]}[fmt]
    touched = work / f"touched-{fmt}"
    if not touched.exists():
        touched_copy(tree, touched)
    rebuilt = gnu_tar(touched, work / f"rebuilt-{fmt}.tar", *options, reverse=True)
    original = index_and_rebuild(tars[fmt], TAR, store).layer
    again = index_and_rebuild(rebuilt, TAR, store).layer
    assert again.diff_id != original.diff_id  # the tar bytes differ...
    assert {cid for cid, _ in again.header_chunks}.isdisjoint({cid for cid, _ in original.header_chunks})
    assert content_ids(again) == content_ids(original)  # ...but every content chunk is shared


def test_umoci_rebuild_of_touched_tree_shares_every_content_chunk(
        work: Path, tree: Path, cases: dict[str, tuple[str, Path]], store: LocalStore) -> None:
    touched = touched_copy(tree, work / "touched-umoci")
    (work / "umoci-touched").mkdir()
    media_type, blob = umoci_layer(work / "umoci-touched", touched)
    original = index_and_rebuild(cases["umoci repack"][1], cases["umoci repack"][0], store).layer
    again = index_and_rebuild(blob, media_type, store).layer
    assert again.diff_id != original.diff_id
    assert content_ids(again) == content_ids(original)


@pytest.mark.parametrize("declared,blob,says", [
    (TAR, gzip_bytes(b"x" * 1000), "gzip"),
    (GZIP, b"\x28\xb5\x2f\xfd" + b"\0" * 100, "zstd"),
    (ZSTD, b"plain tar bytes" * 100, "none"),
    (oci.DOCKER_LAYER_GZIP, b"plain tar bytes" * 100, "none"),
])
def test_media_type_and_magic_disagree(declared: str, blob: bytes, says: str) -> None:
    with pytest.raises(LayerFormatError, match=f"media type {re.escape(declared)} says .*first bytes say {says}"):
        index_layer(io.BytesIO(blob), declared)


@pytest.mark.parametrize("what,blob,media_type", [
    ("truncated gzip", gzip_bytes(random.Random(3).randbytes(200_000))[:50_000], GZIP),
    ("corrupt gzip", b"\x1f\x8b" + bytes(range(256)) * 4, GZIP),
    ("gzip with trailing garbage", gzip_bytes(b"x" * 5000) + b"junkjunk", GZIP),
    ("corrupt zstd", b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 4, ZSTD),
])
def test_undecodable_blob_is_a_layer_format_error(what: str, blob: bytes, media_type: str) -> None:
    with pytest.raises(LayerFormatError, match="layer blob is not valid"):
        index_layer(io.BytesIO(blob), media_type)


def test_events_concatenate_to_the_input(tars: dict[str, Path]) -> None:
    data = tars["pax"].read_bytes()
    splitter = TarSplitter(io.BytesIO(data), read_size=4096)
    out = bytearray()
    for event in splitter:
        if isinstance(event, Header):
            out += event.data
        elif isinstance(event, Content):
            while piece := splitter.read_content(1000):
                out += piece
        else:
            assert isinstance(event, RawRest)
            out += event.head + event.stream.read()
    assert bytes(out) == data and splitter.is_tar and not splitter.truncated


def test_skipping_a_content_is_a_programming_error(tars: dict[str, Path]) -> None:
    events = iter(TarSplitter(io.BytesIO(tars["gnu"].read_bytes())))
    while not isinstance(next(events), Content):
        pass
    with pytest.raises(RuntimeError, match="content was not read"):
        next(events)
