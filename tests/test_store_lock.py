"""The store lock between `chunksync store gc` and what writes chunks (pulls, `chunk --add`): real processes holding
it, SIGKILLed with it, a real pull held mid-stream by a proxy while gc runs, and gc of a serving server's store."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkstore.store import LOCK_FILE, LocalStore, StoreBusy
from frame_proxy import HOLD, FrameProxy
from helpers import Registry, build_image, push_image, surviving_bytes_bound
from pull_tools import ImagePair, pull, pull_command, pull_env, push_pair
from server_process import ServerProcess
from test_cli_chunkstore import chunksync, image_store, layers  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
CHUNKSYNC = str(Path(sys.executable).parent / "chunksync")
# Holds the store lock as a pull (shared) or gc (exclusive) does, until its stdin closes.
HOLDER = """
import sys
from chunkstore.store import LocalStore
with LocalStore(sys.argv[1]).lock(exclusive=sys.argv[2] == "exclusive"):
    print("held", flush=True)
    sys.stdin.read()
"""


class Holder:
    def __init__(self, store: Path, mode: str = "shared") -> None:
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(store), mode], cwd=ROOT, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None and self.process.stdout.readline() == "held\n"

    def release(self) -> None:
        self.process.communicate(timeout=30)  # closes stdin: the holder lets go and exits
        assert self.process.returncode == 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.communicate(timeout=30)
        assert self.process.returncode == -signal.SIGKILL

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()  # waits, and closes the pipes


def start(args: list[str], stderr: Path, **kwargs: object) -> subprocess.Popen[str]:
    with stderr.open("w") as sink:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=sink, text=True, **kwargs)


def wait_for(text: str, stderr: Path, process: subprocess.Popen[str]) -> None:
    """Until `process` says `text` on stderr (it then waits for the lock), failing if it ends first."""
    deadline = time.monotonic() + 120
    while text not in stderr.read_text():
        assert process.poll() is None, f"ended without waiting: {stderr.read_text()}"
        assert time.monotonic() < deadline, f"never said {text!r}: {stderr.read_text()}"
        time.sleep(0.05)


def pull_report(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def snapshot(store: LocalStore) -> tuple[set[bytes], list[str]]:
    return set(store.ids()), [r.manifest_digest for r in store.images()]


def test_gc_refuses_while_a_pull_holds_the_store(layers: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    store, _ = image_store(tmp_path, layers)
    before = snapshot(store)
    with Holder(tmp_path):
        started = time.monotonic()
        proc = chunksync("store", "gc", "--keep", "0", "--wait", "1", "--store", tmp_path)
        waited = time.monotonic() - started
        assert proc.returncode == 1 and proc.stdout == ""
        assert f"a pull, a chunksync server or another writer is using the store at {tmp_path}" in proc.stderr
        assert "waited 1 s and deleted nothing" in proc.stderr and "--wait" in proc.stderr
        assert waited >= 1
        assert snapshot(store) == before
    proc = chunksync("store", "gc", "--keep", "0", "--wait", "0", "--store", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert store.count() == 0 and store.images() == []


def test_gc_waits_for_a_pull_that_finishes(layers: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    image_store(tmp_path, layers)
    with Holder(tmp_path) as holder:
        stderr = tmp_path / "gc.stderr"
        gc = start([CHUNKSYNC, "store", "gc", "--keep", "0", "--wait", "60", "--store", str(tmp_path), "--json"],
                   stderr)
        wait_for(f"a pull, a chunksync server or another writer is using the store at {tmp_path}; waiting up to 60 s",
                 stderr, gc)
        assert LocalStore(tmp_path).count() > 0
        holder.release()
        out, _ = gc.communicate(timeout=60)
    assert gc.returncode == 0, stderr.read_text()
    assert json.loads(out)["chunks_deleted"] > 0 and LocalStore(tmp_path).count() == 0


def test_a_killed_holder_does_not_block_gc(layers: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    store, ids = image_store(tmp_path, layers)
    with Holder(tmp_path) as holder:
        holder.kill()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays; only a live holder's flock counts
    proc = chunksync("store", "gc", "--keep", "1", "--wait", "0", "--store", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "waiting" not in proc.stderr
    assert set(store.ids()) == ids["app1"] | ids["db2"]


def test_chunk_add_waits_for_gc(layers: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    store = LocalStore(tmp_path)
    with Holder(tmp_path, "exclusive") as holder:
        stderr = tmp_path / "chunk.stderr"
        add = start([CHUNKSYNC, "chunk", str(layers["small"]), "--add", "--store", str(tmp_path), "--json"], stderr)
        wait_for(f"waiting for `store gc` on {tmp_path} to finish", stderr, add)
        assert store.count() == 0
        holder.release()
        out, _ = add.communicate(timeout=60)
    assert add.returncode == 0, stderr.read_text()
    assert json.loads(out)["store"]["chunks_added"] == store.count() == 2


def test_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    """The server indexes in threads of one process: a shared lock taken in one must hold off gc in another."""
    store = LocalStore(tmp_path)
    held, done = threading.Event(), threading.Event()

    def writer() -> None:
        with store.lock():
            held.set()
            done.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(30)
        with store.lock():  # shared with shared
            pass
        with pytest.raises(StoreBusy, match="a pull"):
            with store.lock(exclusive=True, wait=0.2):
                pass
    finally:
        done.set()
        thread.join()
    with store.lock(exclusive=True, wait=0):
        pass


# --- with a real pull ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> ImagePair:
    return push_pair(tmp_path_factory.mktemp("lock-images"), registry, "test/store-lock", 3_000_000, 1_000_000)


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(registry.url, store=tmp_path_factory.mktemp("lock-server") / "store") as process:
        yield process


def test_gc_during_a_pull_deletes_nothing_and_the_pull_stays_a_diff(pair: ImagePair, server: ServerProcess,
                                                                    tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    pull(pair.ref("v1"), server.url, store_dir)
    store = LocalStore(store_dir)
    with FrameProxy(server.url, HOLD) as proxy:
        process = subprocess.Popen(pull_command(pair.ref("v2"), proxy.url, store_dir), env=pull_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proxy.forwarded_first_chunks.wait(120), "the pull never got its first CHUNKS frame"
            # Without the lock, this gc dropped v1 (the pull's own record is the newest) and the chunks only v1
            # names: the delta bases of the pull's DELTA items.
            chunks, images = snapshot(store)
            gc = chunksync("store", "gc", "--keep", "1", "--wait", "1", "--store", store_dir)
            assert gc.returncode == 1 and "is using the store" in gc.stderr and "deleted nothing" in gc.stderr
            # The pull may still be storing what it got; nothing went.
            now_chunks, now_images = snapshot(store)
            assert chunks <= now_chunks and set(images) <= set(now_images) and pair.digests["v1"] in now_images
        finally:
            proxy.release()
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    report = pull_report(out)
    assert report["path"] == "diff" and report["delta_rejected"] == 0 and report["repair_chunks"] == 0

    # In sequence, as before: gc drops v1, v2 is still whole, the next pull of it needs nothing.
    gc = chunksync("store", "gc", "--keep", "1", "--wait", "0", "--store", store_dir, "--json")
    assert gc.returncode == 0, gc.stderr
    assert [r.manifest_digest for r in store.images()] == [pair.digests["v2"]]
    again = pull(pair.ref("v2"), server.url, store_dir).report
    assert again["path"] == "local" and again["chunks_received"] == 0
    assert chunksync("store", "verify", "--store", store_dir).returncode == 0


def test_a_pull_waits_for_gc(pair: ImagePair, server: ServerProcess, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with Holder(store_dir, "exclusive") as holder:
        stderr = tmp_path / "pull.stderr"
        process = start(pull_command(pair.ref("v1"), server.url, store_dir), stderr, env=pull_env())
        wait_for(f"`chunksync store gc` is running on the store at {store_dir}; waiting for it to finish", stderr,
                 process)
        time.sleep(0.5)  # a pull that said so but did not wait would store chunks meanwhile
        assert LocalStore(store_dir).count() == 0 and LocalStore(store_dir).images() == []
        holder.release()
        out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.read_text()
    assert pull_report(out)["path"] == "diff"
    assert LocalStore(store_dir).get_image(pair.repo, pair.digests["v1"]).complete


def test_gc_of_a_serving_store_waits_for_answers_in_flight(registry: Registry, tmp_path: Path) -> None:
    # Incompressible, so the answer is MBs longer than what the proxy forwarded plus every buffer on the way: while
    # the proxy holds, the server is mid-answer, with chunks still to read from its store.
    size = (8 << 20) + surviving_bytes_bound()
    layout = build_image(tmp_path / "img", [{"data/random.bin": random.Random(5).randbytes(size)}], "v1")
    repo = "test/store-lock-serving"
    digest = push_image(layout, "v1", registry, repo)
    ref, server_store = f"{registry.host}/{repo}:v1", tmp_path / "server" / "store"
    with ServerProcess(registry.url, store=server_store) as server:
        with FrameProxy(server.url, HOLD) as proxy:
            process = subprocess.Popen(pull_command(ref, proxy.url, tmp_path / "device"), env=pull_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert proxy.forwarded_first_chunks.wait(120), "the pull never got its first CHUNKS frame"
                before = LocalStore(server_store).count()
                # Without the answer's lock, this deleted every chunk the answer had still to send.
                gc = chunksync("store", "gc", "--keep", "0", "--wait", "1", "--store", server_store)
                assert gc.returncode == 1 and "is using the store" in gc.stderr and "deleted nothing" in gc.stderr
                assert LocalStore(server_store).count() == before > 0
            finally:
                proxy.release()
            out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert pull_report(out)["path"] == "diff" and pull_report(out)["repair_chunks"] == 0

        # Between answers gc has the store; the next device's answer refills it from the registry (a cache).
        gc = chunksync("store", "gc", "--keep", "0", "--wait", "10", "--store", server_store)
        assert gc.returncode == 0, gc.stderr
        assert LocalStore(server_store).count() == 0
        rechunked = server.metrics().get("chunksync_layers_rechunked_total", 0.0)
        again = pull(ref, server.url, tmp_path / "device-2", "--out", f"oci:{tmp_path / 'out'}").report
        assert again["path"] == "diff" and again["manifest_digest"] == digest and again["repair_chunks"] == 0
        assert server.metrics()["chunksync_layers_rechunked_total"] > rechunked
