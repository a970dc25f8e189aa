"""A disk that fills up, for real: the device's store, then its output layout, on a small tmpfs. The pull says
so clearly, nothing corrupt or half-written stays behind, and once there is room the next pull succeeds and
downloads only what it lacks. Needs root to mount tmpfs; skipped with the reason otherwise."""
from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkstore.index import decode_index
from chunkstore.store import LocalStore
from helpers import Registry, build_image, push_image, real_files
from pull_tools import layout_images, pull, skopeo_config_digest
from server_process import ServerProcess
from test_faults import store_verify


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {proc.stderr.strip()}")


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "1m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(reference, manifest digest, config digest) of an image of about 3 MB that does not compress (so its
    chunks cannot fit in 1 MB either way)."""
    tmp = tmp_path_factory.mktemp("disk-image")
    rng = random.Random(3)
    files: dict[str, bytes | None] = {f"data/blob{i}.bin": rng.randbytes(600_000) for i in range(5)}
    layout = build_image(tmp, [real_files(200_000), files], "v1")
    digest = push_image(layout, "v1", registry, "test/faults-disk")
    ref = f"{registry.host}/test/faults-disk:v1"
    return ref, digest, skopeo_config_digest(ref)


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(registry.url, store=tmp_path_factory.mktemp("disk-server") / "store") as process:
        yield process


def needed_ids(store: Path, digest: str) -> set[bytes]:
    record = LocalStore(store).get_image("test/faults-disk", digest)
    assert record is not None
    return decode_index(record.index_data).chunk_ids()


def fails_for_lack_of_space(ref: str, server: ServerProcess, store: Path, layout: Path, *words: str) -> None:
    """A pull that runs out of space says so, and leaves no index.json naming blobs that are not there."""
    full = pull(ref, server.url, store, "--out", f"oci:{layout}")
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert all(word in full.stderr for word in words), full.stderr
    assert layout_images(layout) == {}


def test_store_disk_full(image: tuple[str, str, str], server: ServerProcess, small_disk: Path,
                         tmp_path: Path) -> None:
    ref, digest, config = image
    store, layout = small_disk / "store", tmp_path / "out"
    fails_for_lack_of_space(ref, server, store, layout, "out of disk space", "Free space")
    store_verify(store)  # what the store holds is intact: the failed transaction left nothing behind
    kept = set(LocalStore(store).ids())

    grow(small_disk, "64m")
    report = pull(ref, server.url, store, "--out", f"oci:{layout}").report
    assert report["manifest_digest"] == digest and report["registry_layers"] == 0
    assert layout_images(layout)["v1"]["config"]["digest"] == config
    assert report["chunks_received"] == len(needed_ids(store, digest) - kept)


def test_output_disk_full(image: tuple[str, str, str], server: ServerProcess, small_disk: Path,
                          tmp_path: Path) -> None:
    ref, digest, config = image
    store, layout = tmp_path / "store", small_disk / "out"
    fails_for_lack_of_space(ref, server, store, layout, "No space left", "free space")
    assert not [p for p in layout.rglob("*") if p.name.endswith(".partial")]  # temporary files cleaned up
    os.sync()

    grow(small_disk, "64m")
    again = pull(ref, server.url, store, "--out", f"oci:{layout}").report
    # The store kept every chunk of the first attempt: the have-set covers them all, none is sent again.
    assert again["chunks_received"] == 0 and again["registry_layers"] == 0
    assert layout_images(layout)["v1"]["config"]["digest"] == config
