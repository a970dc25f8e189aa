"""Real layer blobs for chunkstore tests: a small rootfs of real files with every tar oddity (sparse, hard and
symbolic links, long and non-ASCII names, empty files and dirs), archived by GNU tar, gzip, zstd, umoci, skopeo."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from chunkstore import oci
from chunkstore.index import LayerIndex, index_layer
from chunkstore.reassemble import write_layer
from chunkstore.store import ChunkWriter, LocalStore
from helpers import build_image, run

LONG_DIR = "d" * 90 + "/" + "e" * 60  # a path over 100 characters: PAX path records / GNU ././@LongLink


def make_tree(root: Path) -> Path:
    """A rootfs of real files (Python stdlib sources, /etc/apt) plus the tar edge cases, deterministic."""
    root.mkdir(parents=True)
    lib = root / "usr/lib/python3.11"
    for name in ("json", "email", "pydoc_data"):  # pydoc_data/topics.py (~740 KB) spans many chunks
        shutil.copytree(f"/usr/lib/python3.11/{name}", lib / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree("/etc/apt", root / "etc/apt", symlinks=True)
    (root / "emptydir").mkdir()
    (root / "empty-file").write_bytes(b"")
    os.link(lib / "json/decoder.py", root / "hardlink-to-decoder.py")
    os.symlink("usr/lib/python3.11/json", root / "symlink-to-json")
    (root / LONG_DIR).mkdir(parents=True)
    (root / LONG_DIR / "file-with-a-long-name.txt").write_bytes(b"long path\n" * 50)
    (root / "naïve-ünïcödé-名前.txt").write_text("non-ASCII name\n")
    sparse = root / "sparse.img"
    with open(sparse, "wb") as f:  # mostly a hole: `tar -S` stores only the written regions
        f.truncate(3 << 20)
        for offset in (100_000, 1_500_001, (3 << 20) - 7):
            f.seek(offset)
            f.write(b"written")
    return root


def touched_copy(tree: Path, dest: Path) -> Path:
    """The same tree with every mtime changed (a rebuild that changes nothing but timestamps)."""
    run("cp", "-a", tree, dest)
    run("find", dest, "-exec", "touch", "-h", "-d", "2001-02-03 04:05:06", "{}", "+")
    return dest


def gnu_tar(tree: Path, out: Path, *options: str, reverse: bool = False) -> Path:
    """`tar -c` of the tree's contents; `reverse` archives members in reverse name order."""
    if not reverse:
        run("tar", "-cf", out, *options, "-C", tree, ".")
        return out
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))[::-1]
    listing = out.with_suffix(".list")
    listing.write_text("\n".join(names) + "\n")
    run("tar", "-cf", out, *options, "--no-recursion", "-C", tree, "-T", listing)
    return out


def compress(path: Path, tool: str) -> Path:
    """`gzip -n` or `zstd` of a file, next to it."""
    if tool == "gzip":
        run("gzip", "-k", "-n", "-f", path)
        return path.with_name(path.name + ".gz")
    run("zstd", "-q", "-f", "-3", path)
    return path.with_name(path.name + ".zst")


def layout_layers(layout: Path, tag: str) -> list[tuple[str, Path]]:
    """(media type, blob path) of each layer of `layout:tag`, bottom first."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blob = lambda digest: layout / "blobs" / Path(*oci.validate_digest(digest).split(":"))  # noqa: E731
    manifest = json.loads(blob(entry["digest"]).read_bytes())
    return [(layer["mediaType"], blob(layer["digest"])) for layer in manifest["layers"]]


def umoci_layer(tmp: Path, tree: Path) -> tuple[str, Path]:
    """The layer `umoci repack` makes of `tree` (Go's archive/tar and compress/gzip)."""
    layout = build_image(tmp, [tree], tag="t", layout=tmp / "umoci-layout")
    return layout_layers(layout, "t")[0]


def skopeo_zstd_layer(tmp: Path, layout: Path) -> tuple[str, Path]:
    """The same image after `skopeo copy --dest-compress-format zstd` (Go's zstd encoder)."""
    dest = tmp / "skopeo-zstd"
    run("skopeo", "copy", "-q", "--dest-compress-format", "zstd", f"oci:{layout}:t", f"oci:{dest}:t")
    return layout_layers(dest, "t")[0]


def uncompressed(blob: Path) -> bytes:
    """The blob's uncompressed bytes, decoded by the reference tools (not by chunkstore)."""
    head = blob.read_bytes()[:4]
    if head.startswith(b"\x1f\x8b"):
        return subprocess.run(["gzip", "-dc", blob], check=True, capture_output=True).stdout
    if head == b"\x28\xb5\x2f\xfd":
        return subprocess.run(["zstd", "-dc", blob], check=True, capture_output=True).stdout
    return blob.read_bytes()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Indexed:
    layer: LayerIndex
    rebuilt: bytes


def index_and_rebuild(blob: bytes | Path, media_type: str, store: LocalStore) -> Indexed:
    """index_layer into a real store, then write_layer back out of it."""
    writer = ChunkWriter(store, batch_bytes=1 << 20, verify=True)
    stream = open(blob, "rb") if isinstance(blob, Path) else io.BytesIO(blob)
    with stream:
        layer = index_layer(stream, media_type, on_chunk=writer)
    writer.flush()
    out = io.BytesIO()
    write_layer(layer, store.get, out)
    return Indexed(layer, out.getvalue())


def content_ids(layer: LayerIndex) -> set[bytes]:
    return {cid for cid, _ in layer.chunks}


def content_members(tar: bytes) -> int:
    """How many members carry content, as Python's tarfile reads the archive."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return sum(1 for m in archive.getmembers() if m.isreg() and m.size > 0)

