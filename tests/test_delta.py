"""Delta encodings on real tars (GNU tar, umoci): header streams, indexes and file contents round-trip exactly,
rebuilds that only change mtimes or order cost next to nothing, and hostile delta bytes raise, never guess."""
from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from chunkstore.chunker import ALGORITHM
from chunkstore.varint import varints
from chunkstore.delta import DeltaError, PathMatcher, header_entries, normalised, zstd_decode, zstd_encode
from chunkstore.headerdelta import decode_headers, encode_headers
from chunkstore.index import ID_SIZE, ImageIndex, IndexFormatError, LayerIndex, chunk_id, index_layer
from chunkstore.indexdelta import decode_index_delta, encode_index_delta, flat, is_placeholder, with_placeholders
from chunkstore.store import LocalStore
from chunkstore.wire import DELTA_CONTENT, DELTA_HEADERS, DeltaGroup, item_spans
from client.deltas import DeltaApplier
from server.deltas import Planner, header_members, run_paths, target_ids
from tarkit import LONG_DIR, gnu_tar, make_tree, touched_copy

TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Layer:
    index: LayerIndex
    chunks: dict[bytes, bytes]

    @property
    def header(self) -> bytes:
        return b"".join(self.chunks[cid] for cid, _ in self.index.header_chunks)


def indexed(tar: Path | bytes) -> Layer:
    chunks: dict[bytes, bytes] = {}
    data = tar.read_bytes() if isinstance(tar, Path) else tar
    layer = index_layer(io.BytesIO(data), TAR, on_chunk=lambda cid, piece: chunks.setdefault(cid, bytes(piece)))
    return Layer(layer, chunks)


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Layer]:
    tmp = tmp_path_factory.mktemp("delta-tars")
    tree = make_tree(tmp / "tree")
    edited = tmp / "edited"
    shutil.copytree(tree, edited, symlinks=True)
    topics = edited / "usr/lib/python3.11/pydoc_data/topics.py"
    text = topics.read_bytes()
    topics.write_bytes(text[:300_000] + b"# an edit in the middle of a big file\n" + text[300_000:])
    (edited / "etc/apt/NEW-3.2.1.conf").write_bytes(b"new file\n" * 30)
    for name in ("encoders.py", "errors.py", "base64mime.py"):  # small files edited: version 3 groups them
        small = edited / "usr/lib/python3.11/email" / name
        small.write_bytes(small.read_bytes().replace(b"\n\n", b"\n\n# edited\n\n", 1))
    shutil.move(edited / "usr/lib/python3.11/json", edited / "usr/lib/python3.11/json-2.0.1")
    out = {
        "old": gnu_tar(tree, tmp / "old.tar", "--sort=name"),
        "mtime": gnu_tar(touched_copy(tree, tmp / "touched"), tmp / "mtime.tar", "--sort=name"),
        "reorder": gnu_tar(tree, tmp / "reorder.tar", reverse=True),
        "edited": gnu_tar(edited, tmp / "edited.tar", "--sort=name"),
        "pax": gnu_tar(edited, tmp / "pax.tar", "--sort=name", "--format=pax"),
    }
    return {name: indexed(path) for name, path in out.items()}


def header_delta(new: Layer, old: Layer) -> tuple[dict, bytes]:
    delta = encode_headers(new.header, new.index.runs, old.header, old.index.runs)
    back = decode_headers(delta, len(new.header), new.index.runs, old.header, old.index.runs)
    return delta, back


@pytest.mark.parametrize("name", ["mtime", "reorder", "edited", "pax", "old"])
def test_header_stream_round_trips(tars: dict[str, Layer], name: str) -> None:
    delta, back = header_delta(tars[name], tars["old"])
    assert back == tars[name].header


def test_mtime_only_rebuild_header_delta_is_tiny(tars: dict[str, Layer]) -> None:
    delta, _ = header_delta(tars["mtime"], tars["old"])
    size = len(msgpack.packb(delta))
    assert delta["fields"] == 1  # mtimes and checksums travel as numbers
    assert size < 300, size
    assert size < len(tars["mtime"].header) / 500


def test_reordered_members_are_copies_not_literals(tars: dict[str, Layer]) -> None:
    delta, _ = header_delta(tars["reorder"], tars["old"])
    assert len(msgpack.packb(delta)) < len(tars["reorder"].header) / 20


def test_non_canonical_headers_keep_their_fields_in_the_residual(tars: dict[str, Layer]) -> None:
    # An mtime written with a space instead of a leading zero: legal for tar readers, not our canonical form.
    header = bytearray(tars["mtime"].header)
    entry = next(e for e in header_entries(bytes(header), tars["mtime"].index.runs) if e.path)
    block = entry.offset + entry.length - 512
    header[block + 136] = ord(" ")
    checksum = sum(header[block:block + 148]) + 256 + sum(header[block + 156:block + 512])
    header[block + 148:block + 156] = b"%06o\0 " % checksum
    old = tars["old"]
    delta = encode_headers(bytes(header), tars["mtime"].index.runs, old.header, old.index.runs)
    assert delta["fields"] == 0
    assert decode_headers(delta, len(header), tars["mtime"].index.runs, old.header, old.index.runs) == header


def test_header_entries_name_long_paths_and_files(tars: dict[str, Layer]) -> None:
    for name in ("old", "pax"):
        layer = tars[name]
        paths = {e.path for e in header_entries(layer.header, layer.index.runs) if e.path}
        assert any(p.endswith(LONG_DIR + "/file-with-a-long-name.txt") for p in paths), name
        assert any(p.endswith("naïve-ünïcödé-名前.txt") for p in paths), name


def test_paths_match_exactly_then_with_digits_normalised() -> None:
    matcher = PathMatcher([("site/flask-3.0.0.dist-info/RECORD", 1), ("site/flask/app.py", 2)])
    assert matcher.find("site/flask/app.py") == 2
    assert matcher.find("site/flask-3.0.2.dist-info/RECORD") == 1
    assert matcher.find("site/other.py") is None
    assert normalised("lib/libssl.so.3.0.11") == "lib/libssl.so.#.#.#"


@pytest.mark.parametrize("damage", ["ops", "residual", "mtime mode", "mtimes", "fields", "missing"])
def test_hostile_header_deltas_raise(tars: dict[str, Layer], damage: str) -> None:
    new, old = tars["edited"], tars["old"]
    delta = encode_headers(new.header, new.index.runs, old.header, old.index.runs)
    if damage == "ops":
        delta["ops"] = delta["ops"][:-3] + b"\xff\xff\xff"
    elif damage == "residual":
        delta["residual"] = delta["residual"][: len(delta["residual"]) // 2]
    elif damage == "mtime mode":
        delta["mtime_mode"] = 7
    elif damage == "mtimes":
        delta["mtimes"] = b"not zstd"
    elif damage == "fields":
        delta["fields"] = 9
    else:
        del delta["ops"]
    with pytest.raises(DeltaError):
        decode_headers(delta, len(new.header), new.index.runs, old.header, old.index.runs)


def test_header_delta_against_another_stream_fails_verification_not_silently(tars: dict[str, Layer]) -> None:
    new, old, other = tars["edited"], tars["old"], tars["reorder"]
    delta = encode_headers(new.header, new.index.runs, old.header, old.index.runs)
    try:
        back = decode_headers(delta, len(new.header), new.index.runs, other.header, other.index.runs)
    except DeltaError:
        return
    assert back != new.header  # the device then sees chunk ids that do not match, and asks again plainly


def image(layer: Layer, digest: str) -> ImageIndex:
    return ImageIndex(digest, [layer.index])


@pytest.mark.parametrize("name", ["mtime", "reorder", "edited"])
def test_index_delta_round_trips_and_is_small(tars: dict[str, Layer], name: str) -> None:
    old, new = image(tars["old"], "sha256:" + "a" * 64), image(tars[name], "sha256:" + "b" * 64)
    delta = encode_index_delta(new, old)
    assert decode_index_delta(delta, old).encode() == new.encode()
    assert len(delta["data"]) < len(new.encode()) / 4


@pytest.mark.parametrize("damage", ["garbage", "size", "wrong base", "not a map"])
def test_hostile_index_deltas_raise(tars: dict[str, Layer], damage: str) -> None:
    old, new = image(tars["old"], "sha256:" + "a" * 64), image(tars["edited"], "sha256:" + "b" * 64)
    delta: object = encode_index_delta(new, old)
    base = old
    if damage == "garbage":
        delta = {"size": 1000, "data": b"\x28\xb5\x2f\xfd" + bytes(100)}
    elif damage == "size":
        delta = {**delta, "size": delta["size"] + 1}  # type: ignore[dict-item]
    elif damage == "wrong base":
        base = image(tars["reorder"], "sha256:" + "c" * 64)
    else:
        delta = [1, 2]
    with pytest.raises(IndexFormatError):
        decode_index_delta(delta, base)


def test_content_delta_round_trips_and_refuses_wrong_sizes() -> None:
    base = bytes(range(256)) * 400
    target = base[:50_000] + b"changed" + base[50_000:]
    data = zstd_encode(target, base, 10)
    assert len(data) < 100
    assert zstd_decode(data, base, len(target)) == target
    with pytest.raises(DeltaError):
        zstd_decode(data, base, len(target) - 1)
    with pytest.raises(DeltaError):
        zstd_decode(data[:20], base, len(target))


def test_a_hash_cap_bounds_the_table_and_changes_nothing_above_the_levels_own() -> None:
    base = bytes(range(256)) * 4000
    target = base[:500_000] + b"changed" + base[500_000:]
    assert zstd_encode(target, base, 9, max_hash_log=30) == zstd_encode(target, base, 9)
    capped = zstd_encode(target, base, 9, max_hash_log=12)
    assert zstd_decode(capped, base, len(target)) == target


def test_planner_bases_each_changed_file_on_its_old_version(tars: dict[str, Layer]) -> None:
    old, new = tars["old"], tars["edited"]
    chunks = {**old.chunks, **new.chunks}
    old_image, new_image = image(old, "sha256:" + "a" * 64), image(new, "sha256:" + "b" * 64)
    planner = Planner(new_image, old_image, chunks.__getitem__)
    items = list(planner.items())
    kinds = [item.kind for item in items]
    assert kinds.count(DELTA_HEADERS) == 1 and DELTA_CONTENT in kinds
    missing = {cid for cid, _ in new.index.all_chunks()} - old_image.chunk_ids()
    covered = {cid for item in items for cid in target_ids(new_image, item)}
    assert missing <= covered | {chunk_id(b"new file\n" * 30)}  # the new file has no old version
    content = sum(len(item.data) for item in items if item.kind == DELTA_CONTENT)
    plain = sum(len(chunks[cid]) for cid in missing)
    assert content < plain / 20, (content, plain)


def test_an_edit_in_a_big_file_is_based_on_the_old_chunks_around_it_not_the_whole_file(
        tars: dict[str, Layer], tmp_path: Path) -> None:
    old, new = tars["old"], tars["edited"]
    chunks = {**old.chunks, **new.chunks}
    old_image, new_image = image(old, "sha256:" + "a" * 64), image(new, "sha256:" + "b" * 64)
    planner = Planner(new_image, old_image, chunks.__getitem__)
    topics = "pydoc_data/topics.py"
    paths = run_paths(old.index, header_members(old.index, old.header))
    old_run = next(run for run, path in paths.items() if path.endswith(topics))
    first, end = old.index.run_ranges()[old_run]
    items = [item for item in planner.items() if item.kind == DELTA_CONTENT and first <= item.base_first < end]
    assert len(items) == 1  # the one edit in its middle
    item = items[0]
    assert end - first > 3 and item.base_count < (end - first) / 2, (item, end - first)
    assert first <= item.base_first and item.base_first + item.base_count <= end
    assert sum(old.index.chunks.lengths[item.base_first:item.base_first + item.base_count]) < 2 * sum(
        new.index.chunks.lengths[item.first:item.first + item.count])

    store = LocalStore(tmp_path / "device")
    store.put_many(old.chunks.items())
    store.put_image("test/app", old_image.manifest_digest, old_image.encode(), complete=True)
    applier = DeltaApplier(store, [("test/app", old_image.manifest_digest)])
    assert applier.apply(("test/app", old_image.manifest_digest), item, new_image) == \
        [(cid, chunks[cid]) for cid in target_ids(new_image, item)]


def test_grouped_items_deliver_the_same_chunks_in_fewer_bytes_and_the_device_rebuilds_them(
        tars: dict[str, Layer], tmp_path: Path) -> None:
    old, new = tars["old"], tars["edited"]
    chunks = {**old.chunks, **new.chunks}
    old_image, new_image = image(old, "sha256:" + "a" * 64), image(new, "sha256:" + "b" * 64)
    single = list(Planner(new_image, old_image, chunks.__getitem__).items())
    grouped = list(Planner(new_image, old_image, chunks.__getitem__).items(grouped=True))
    groups = [item for item in grouped if isinstance(item, DeltaGroup)]
    assert groups and len(grouped) < len(single)
    delivered = [cid for item in grouped for cid in target_ids(new_image, item)]
    assert sorted(delivered) == sorted(cid for item in single for cid in target_ids(new_image, item))
    assert sum(len(item.data) for item in grouped) < sum(len(item.data) for item in single)

    store = LocalStore(tmp_path / "device")  # a device holding the old image, exactly as a pull leaves it
    store.put_many(old.chunks.items())
    store.put_image("test/app", old_image.manifest_digest, old_image.encode(), complete=True)
    applier = DeltaApplier(store, [("test/app", old_image.manifest_digest)])
    for item in groups:
        assert applier.apply(("test/app", old_image.manifest_digest), item, new_image) == \
            [(cid, chunks[cid]) for cid in target_ids(new_image, item)]
    damaged = DeltaGroup(groups[0].targets, groups[0].bases, groups[0].data[:-3] + b"xyz")
    outside = DeltaGroup(((0, len(new.index.chunks), 1),), groups[0].bases, groups[0].data)
    whole = (0, 0, len(old.index.chunks))  # the whole old layer, 65,536 times: refused before any byte is read
    too_big = DeltaGroup(groups[0].targets, (whole,) * 65_536, groups[0].data)
    for bad in (damaged, outside, too_big):
        with pytest.raises(DeltaError):
            applier.apply(("test/app", old_image.manifest_digest), bad, new_image)


def test_placeholders_are_filled_with_the_ids_of_what_items_rebuild_and_a_wrong_check_refuses_the_item(
        tars: dict[str, Layer], tmp_path: Path) -> None:
    old, new = tars["old"], tars["edited"]
    chunks = {**old.chunks, **new.chunks}
    old_image, new_image = image(old, "sha256:" + "a" * 64), image(new, "sha256:" + "b" * 64)
    items = list(Planner(new_image, old_image, chunks.__getitem__).items(grouped=True))
    spans = [span for item in items for span in item_spans(item)]
    rebuilt = sum(count for _, _, _, count in spans)
    delta = encode_index_delta(with_placeholders(new_image, spans), old_image, runs=True)
    assert len(delta["data"]) < len(encode_index_delta(new_image, old_image, runs=True)["data"]) - 20 * rebuilt

    store = LocalStore(tmp_path / "device")
    store.put_many(old.chunks.items())
    store.put_image("test/app", old_image.manifest_digest, old_image.encode(), complete=True)
    ref = ("test/app", old_image.manifest_digest)
    applier = DeltaApplier(store, [ref])
    implied = decode_index_delta(delta, old_image)
    assert implied.encode() != new_image.encode()
    for item in items:
        assert [cid for cid, _ in applier.apply(ref, item, implied)] == target_ids(new_image, item)
    assert implied.encode() == new_image.encode()  # every placeholder filled with the id it stood for

    wrong = decode_index_delta(delta, old_image)
    layer, headers, first, _ = item_spans(items[-1])[0]
    held = wrong.layers[layer].chunk_list(headers)
    assert is_placeholder(held.id_at(first))
    held.ids[first * ID_SIZE] ^= 1  # another chunk's check
    with pytest.raises(DeltaError, match="do not hash"):
        applier.apply(ref, items[-1], wrong)


def test_runs_layout_sends_a_reordered_index_as_old_run_numbers(tars: dict[str, Layer]) -> None:
    old, new = image(tars["old"], "sha256:" + "a" * 64), image(tars["reorder"], "sha256:" + "b" * 64)
    flat_delta, runs_delta = encode_index_delta(new, old), encode_index_delta(new, old, runs=True)
    assert "layout" not in flat_delta and runs_delta["layout"] == "runs"  # version 3 devices never see the key
    assert decode_index_delta(runs_delta, old).encode() == new.encode()
    assert len(runs_delta["data"]) < len(flat_delta["data"]) * 0.7


@pytest.mark.parametrize("name", ["mtime", "edited", "old"])
def test_version_4_index_deltas_are_never_larger_and_round_trip(tars: dict[str, Layer], name: str) -> None:
    old, new = image(tars["old"], "sha256:" + "a" * 64), image(tars[name], "sha256:" + "b" * 64)
    delta = encode_index_delta(new, old, runs=True)
    assert decode_index_delta(delta, old).encode() == new.encode()
    assert len(delta["data"]) <= len(encode_index_delta(new, old)["data"])


def _truncated(old: ImageIndex) -> dict:
    delta = runs_layout(old, [1], [2], b"", 1)
    raw = zstd_decode(delta["data"], flat(old), delta["size"]).replace(b"\xc4\x01\x01", b"\xc4\x01\x81", 1)
    return {**delta, "data": zstd_encode(raw, flat(old), 3)}


def runs_layout(old: ImageIndex, refs: list[int], heads: list[int], body: bytes, runs: int) -> dict:
    """A runs-layout index delta of one layer as a hostile server might write it."""
    layer = old.layers[0]
    raw = (msgpack.packb({"manifest_digest": "sha256:" + "b" * 64, "layers": 1,
                          "chunking": [ALGORITHM, old.params.min_size, old.params.avg_size, old.params.max_size]})
           + msgpack.packb({"media_type": TAR, "digest": layer.digest, "size": layer.size, "diff_id": layer.diff_id,
                            "uncompressed_size": layer.uncompressed_size, "runs": runs, "header_chunks": 0})
           + b"".join(msgpack.packb(part, use_bin_type=True) for part in (varints(refs), varints(heads), body)))
    return {"layout": "runs", "size": len(raw), "data": zstd_encode(raw, flat(old), 3)}


@pytest.mark.parametrize(("damage", "message"), [
    ("ref past the base", "refers to base run"), ("refs short", "1 refs and 2 heads for 2 runs"),
    ("truncated varint", "truncated number"), ("unknown layout", "unknown layout"),
    ("literal without chunks", "malformed layout"), ("sizes do not add up", "layer 0: runs hold"),
])
def test_hostile_runs_layouts_raise(tars: dict[str, Layer], damage: str, message: str) -> None:
    old = image(tars["old"], "sha256:" + "a" * 64)
    runs = len(old.layers[0].runs) // 2
    delta = {
        "ref past the base": runs_layout(old, [2 * runs + 1], [2], b"", 1),
        "refs short": runs_layout(old, [1], [2, 2], b"", 2),
        "truncated varint": _truncated(old),
        "unknown layout": {**runs_layout(old, [1], [2], b"", 1), "layout": "tree"},
        "literal without chunks": runs_layout(old, [0], [2], (1000).to_bytes(8, "little"), 1),
        "sizes do not add up": runs_layout(old, [3], [2], b"", 1),  # base run 1 alone is not the layer
    }[damage]
    with pytest.raises(IndexFormatError, match=message):
        decode_index_delta(delta, old)
