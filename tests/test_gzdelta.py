"""Gzip items (protocol 5 and 6): a changed .gz file goes as a delta of its text and is compressed again on the
device, exactly, by zlib or by GNU gzip; anything not reproduced exactly keeps the plain delta; hostile shapes and
items are refused, never guessed."""
from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from chunkstore.gzdelta import (ENGINES, GNU_GZIP, ZLIB_MEM8, ZLIB_MEM9, GzipError, GzipShape, decode_shape, gunzip,
                                rebuild, shape_of)
from chunkstore.index import ImageIndex, decode_index
from chunkstore.store import LocalStore
from chunkstore.wire import (DELTA_GZIP, FRAME_DELTA, PROTOCOL_VERSION, DeltaGzip, ProtocolError, SyncRequest, decode_delta,
                             decode_item, read_frames)
from client.deltas import DeltaApplier
from helpers import Registry, build_image, push_image
from pull_tools import pull
from server.deltas import Planner, gzip_engines, target_ids
from server_process import Answer, ServerProcess, post
from tarkit import gnu_tar
from test_delta import Layer, indexed
from test_pull_e2e import layer_files_match_config

STDLIB = Path("/usr/lib/python3.11")
BIG = STDLIB / "_pydecimal.py"    # `gzip -9n` of it is GNU gzip's own: zlib does not reproduce it (checked below)
SMALL = STDLIB / "argparse.py"    # ... of it zlib reproduces


def gnu(data: bytes, level: int = 9) -> bytes:
    return subprocess.run(["gzip", f"-{level}", "-n"], input=data, capture_output=True, check=True).stdout


def edited(text: bytes) -> bytes:
    """A new version as Debian makes them: an entry on top, one line changed further down."""
    return b"# version 2.0.1: a security fix\n\n" + text.replace(b"import", b"import  ", 1)


@pytest.mark.parametrize("make,engine", [
    (lambda text: gzip.compress(text, mtime=0), ZLIB_MEM8),               # Python's gzip module
    (lambda text: gnu(SMALL.read_bytes()), ZLIB_MEM8),                   # small `gzip -9n`: zlib reproduces it
    (lambda text: gnu(text), GNU_GZIP),                                  # big `gzip -9n`
    (lambda text: gnu(text, 6), GNU_GZIP),
])
def test_a_reproducible_gzip_file_is_rebuilt_exactly_from_its_text(make, engine: int) -> None:
    data = make(BIG.read_bytes())
    shape, text = shape_of(data)
    assert shape.engine == engine and zlib.decompress(data, 31) == text
    assert rebuild(shape, text) == data
    assert decode_shape(shape.to_obj()) == shape


def test_gnu_gzip_output_is_not_reproduced_by_zlib_alone() -> None:
    data = gnu(BIG.read_bytes())
    assert shape_of(data, (ZLIB_MEM8, ZLIB_MEM9)) is None
    assert shape_of(data, ENGINES)[0].engine == GNU_GZIP


def test_files_no_engine_reproduces_keep_the_plain_delta() -> None:
    text = BIG.read_bytes()
    with_name = gzip.compress(text)[:3] + b"\x08" + gzip.compress(text)[4:10] + b"name.txt\0" + \
        zlib.compress(text, 9, )[2:-4] + zlib.crc32(text).to_bytes(4, "little") + len(text).to_bytes(4, "little")
    assert shape_of(with_name) is not None  # a name in the header is kept verbatim
    assert shape_of(b"not gzip at all" * 10) is None
    assert shape_of(gzip.compress(text) + b"trailing garbage") is None
    assert shape_of(gzip.compress(text[:500]) + gzip.compress(text[500:])) is None  # two members
    strategy = zlib.compressobj(9, zlib.DEFLATED, 31, 8, zlib.Z_FILTERED)
    assert shape_of(strategy.compress(text) + strategy.flush()) is None  # a strategy no engine uses
    assert shape_of(gzip.compress(text)[:-3]) is None  # truncated


def test_gunzip_stops_at_its_limit_and_checks_the_trailer() -> None:
    bomb = gzip.compress(bytes(50 << 20))
    with pytest.raises(GzipError, match="over"):
        gunzip(bomb, limit=1 << 20)
    good = gzip.compress(b"text" * 100)
    with pytest.raises(GzipError, match="trailer"):
        gunzip(good[:-8] + bytes(8))


@pytest.mark.parametrize("obj", [
    [b"\x1f\x8b\x08\0\0\0\0\0\2\3", 7, 9, 10],                          # unknown engine
    [b"\x1f\x8b\x08\0\0\0\0\0\2\3", ZLIB_MEM8, 0, 10],                   # level 0
    [b"\x1f\x8b\x08\0\0\0\0\0\2\3", ZLIB_MEM8, 9, -1],                   # negative size
    [b"\x1f\x8b\x08\0\0\0\0\0\2\3", ZLIB_MEM8, 9, 1 << 40],              # over the delta limit
    [b"\x1f\x8b\x08\0\0\0\0\0\2\3extra", ZLIB_MEM8, 9, 10],              # bytes after the header
    [b"PK\3\4\0\0\0\0\0\2", ZLIB_MEM8, 9, 10],                           # not a gzip header
    [b"\x1f\x8b\x08\x08\0\0\0\0\2\3no-end", ZLIB_MEM8, 9, 10],           # FNAME never ends
    [b"\x1f\x8b\x08\0\0\0\0\0\2\3", ZLIB_MEM8, True, 10],               # bool
    [b"\x1f\x8b\x08\0\0\0\0\0\2\3", ZLIB_MEM8, 9],                       # short
])
def test_hostile_shapes_are_refused(obj: list) -> None:
    with pytest.raises(GzipError):
        decode_shape(obj)
    with pytest.raises(ProtocolError):
        decode_item([DELTA_GZIP, [0, 0, 1], [0, 0, 1], [obj], b"d"])


def test_gzip_items_need_version_5_and_gnu_gzip_items_version_6() -> None:
    shape = GzipShape(b"\x1f\x8b\x08\0\0\0\0\0\2\3", GNU_GZIP, 9, 10)
    item = DeltaGzip(((0, 1, 2),), ((0, 3, 1),), (shape,), b"zstd")
    assert decode_item(item.to_obj(), 6) == item
    for version in (4, 5):  # 4: not an item at all; 5: a zlib-only device
        with pytest.raises(ProtocolError):
            decode_item(item.to_obj(), version)
    with pytest.raises(ProtocolError, match="one shape per target"):
        decode_item([DELTA_GZIP, [0, 1, 2, 0, 5, 1], [0, 3, 1], [shape.to_obj()], b"d"], 6)
    assert gzip_engines(4) == () and GNU_GZIP not in gzip_engines(5) and GNU_GZIP in gzip_engines(6)


def docs_tree(root: Path, new: bool) -> Path:
    """Gzipped docs as a distribution update leaves them (`new`: each text edited and compressed again): changelogs
    by GNU gzip, a man page small enough for zlib, a Python-made archive, a file named .gz that is not gzip."""
    doc = root / "usr/share/doc"
    doc.mkdir(parents=True)
    change = edited if new else (lambda text: text)
    for name in ("_pydecimal.py", "tarfile.py", "difflib.py"):
        (doc / f"{name}.changelog.gz").write_bytes(gnu(change((STDLIB / name).read_bytes())))
    (doc / "argparse.1.gz").write_bytes(gnu(change(SMALL.read_bytes())))
    (doc / "json.gz").write_bytes(gzip.compress(change((STDLIB / "json/decoder.py").read_bytes()), mtime=0))
    (doc / "fake.gz").write_bytes(change(STDLIB.joinpath("locale.py").read_bytes()))
    return root


@pytest.fixture(scope="module")
def gz_tars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Layer]:
    tmp = tmp_path_factory.mktemp("gz-tars")
    return {version: indexed(gnu_tar(docs_tree(tmp / version, version == "new"), tmp / f"{version}.tar",
                                     "--sort=name", "--mtime=2024-01-01"))
            for version in ("old", "new")}


def _pair(gz_tars: dict[str, Layer]) -> tuple[ImageIndex, ImageIndex, dict[bytes, bytes]]:
    old, new = gz_tars["old"], gz_tars["new"]
    return (ImageIndex("sha256:" + "a" * 64, [old.index]), ImageIndex("sha256:" + "b" * 64, [new.index]),
            {**old.chunks, **new.chunks})


def _device(tmp_path: Path, gz_tars: dict[str, Layer], old_image: ImageIndex) -> DeltaApplier:
    store = LocalStore(tmp_path / "device")  # a device holding the old image, exactly as a pull leaves it
    store.put_many(gz_tars["old"].chunks.items())
    store.put_image("test/docs", old_image.manifest_digest, old_image.encode(), complete=True)
    return DeltaApplier(store, [("test/docs", old_image.manifest_digest)])


@pytest.mark.parametrize("version", [4, 5, 6])
def test_planner_sends_changed_gzip_files_as_text_deltas_and_the_device_rebuilds_them(
        gz_tars: dict[str, Layer], tmp_path: Path, version: int) -> None:
    old_image, new_image, chunks = _pair(gz_tars)
    plain = list(Planner(new_image, old_image, chunks.__getitem__).items(grouped=True))
    items = list(Planner(new_image, old_image, chunks.__getitem__, gzip_engines(version)).items(grouped=True))
    gz_items = [item for item in items if isinstance(item, DeltaGzip)]
    engines = {shape.engine for item in gz_items for shape in item.shapes}
    files = sum(len(item.shapes) for item in gz_items)
    assert files == {4: 0, 5: 2, 6: 5}[version]  # 5: only the zlib-made files; never fake.gz
    assert (GNU_GZIP in engines) == (version == 6)
    assert {cid for i in plain for cid in target_ids(new_image, i)} <= \
        {cid for i in items for cid in target_ids(new_image, i)}
    plain_bytes, bytes_ = sum(len(i.data) for i in plain), sum(len(i.data) for i in items)
    if version == 6:
        assert bytes_ < plain_bytes / 5, (bytes_, plain_bytes)

    applier = _device(tmp_path, gz_tars, old_image)
    for item in gz_items:
        assert applier.apply(("test/docs", old_image.manifest_digest), item, new_image) == \
            [(cid, chunks[cid]) for cid in target_ids(new_image, item)]


def test_hostile_gzip_items_are_refused(gz_tars: dict[str, Layer], tmp_path: Path) -> None:
    from chunkstore.delta import DeltaError
    old_image, new_image, chunks = _pair(gz_tars)
    item = next(i for i in Planner(new_image, old_image, chunks.__getitem__, ENGINES).items(grouped=True)
                if isinstance(i, DeltaGzip))
    shape = item.shapes[0]
    applier = _device(tmp_path, gz_tars, old_image)
    other_engine = ZLIB_MEM9 if shape.engine != ZLIB_MEM9 else ZLIB_MEM8
    bad = {
        "damaged data": DeltaGzip(item.targets, item.bases, item.shapes, item.data[:-3] + b"xyz"),
        "wrong engine": DeltaGzip(item.targets, item.bases,
                                  (GzipShape(shape.header, other_engine, shape.level, shape.size),) + item.shapes[1:],
                                  item.data),
        "wrong level": DeltaGzip(item.targets, item.bases,
                                 (GzipShape(shape.header, shape.engine, 1, shape.size),) + item.shapes[1:], item.data),
        "base not gzip": DeltaGzip(item.targets, ((0, 0, 1),), item.shapes, item.data),
        "outside": DeltaGzip(((0, len(new_image.layers[0].chunks), 1),) + item.targets[1:], item.bases, item.shapes,
                             item.data),
    }
    for name, hostile in bad.items():
        with pytest.raises(DeltaError):
            applier.apply(("test/docs", old_image.manifest_digest), hostile, new_image)
            pytest.fail(name)


def test_a_device_without_gnu_gzip_refuses_gnu_items_and_speaks_version_5(
        gz_tars: dict[str, Layer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine without GNU gzip (busybox) cannot be made for real inside this test: PATH without it is the fault.
    from chunkstore import gzdelta
    from chunkstore.delta import DeltaError
    from client.deltas import protocol_version
    old_image, new_image, chunks = _pair(gz_tars)
    item = next(i for i in Planner(new_image, old_image, chunks.__getitem__, ENGINES).items(grouped=True)
                if isinstance(i, DeltaGzip) and any(s.engine == GNU_GZIP for s in i.shapes))
    applier = _device(tmp_path, gz_tars, old_image)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    gzdelta.gnu_gzip.cache_clear()
    try:
        assert protocol_version() == 5
        with pytest.raises(DeltaError, match="GNU gzip"):
            applier.apply(("test/docs", old_image.manifest_digest), item, new_image)
    finally:
        monkeypatch.undo()
        gzdelta.gnu_gzip.cache_clear()
    assert shutil.which("gzip") and protocol_version() == PROTOCOL_VERSION


# --- end to end: the real registry, `chunksync serve` and `chunksync pull` -----------------------------------------

def test_a_distribution_update_of_gzipped_docs_pulls_as_text_deltas(registry: Registry, tmp_path: Path) -> None:
    layout = build_image(tmp_path, [docs_tree(tmp_path / "v1", new=False)], "v1", layout=tmp_path / "layout")
    build_image(tmp_path, [docs_tree(tmp_path / "v2", new=True)], "v2", layout=layout)
    for tag in ("v1", "v2"):
        push_image(layout, tag, registry, "test/gz-docs")
    ref = f"{registry.host}/test/gz-docs"
    with ServerProcess(registry.url, store=tmp_path / "server") as server:
        store = tmp_path / "device"
        assert pull(f"{ref}:v1", server.url, store).report["path"] == "diff"
        report = pull(f"{ref}:v2", server.url, store, "--out", f"oci:{tmp_path / 'out'}").report
        assert report["path"] == "diff" and report["delta_items"] > 0 and report["delta_rejected"] == 0
        layer_files_match_config(tmp_path / "out", "v2")

        # What a version-4 device (no gzip items) and this one are sent for the same update, by the same server.
        digests = {tag: Answer(post(server.url, "/v1/sync", SyncRequest("test/gz-docs", tag).encode()))
                   .header["manifest_digest"] for tag in ("v1", "v2")}
        sizes, delivered = {}, {}
        v2 = decode_index(Answer(post(server.url, "/v1/sync", SyncRequest("test/gz-docs", "v2").encode()))
                          .header["index"])
        for version in (4, 5, 6):
            request = SyncRequest("test/gz-docs", digests["v2"], have_images=[("test/gz-docs", digests["v1"])],
                                  version=version)
            response = post(server.url, "/v1/sync", request.encode())
            assert response.status_code == 200, response.text
            frames = list(read_frames(io.BytesIO(response.content)))
            items = [item for f in frames if f.type == FRAME_DELTA for item in decode_delta(f.payload, version)[1]]
            assert any(isinstance(item, DeltaGzip) for item in items) == (version >= 5)
            sizes[version] = len(response.content)
            delivered[version] = {cid for item in items for cid in target_ids(v2, item)} | \
                {cid for cid, _ in Answer(response).chunks}
    assert delivered[4] == delivered[5] == delivered[6]
    print(f"\ngzipped docs update: version 4 answer {sizes[4]} bytes, 5 (zlib) {sizes[5]}, 6 (GNU gzip) {sizes[6]}")
    assert sizes[6] < sizes[5] < sizes[4] and sizes[6] < sizes[4] / 4
