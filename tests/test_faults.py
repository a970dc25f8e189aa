"""Faults on the way, for real: the device's link cut at random byte offsets, the device killed at random
instants, the server killed and restarted mid-stream, frame bytes flipped, the registry failing. Real registry,
real `chunksync serve` and `chunksync pull` processes, faults made by our own loopback proxies
(tests/fault_proxy.py, tests/frame_proxy.py). Disk-full faults: tests/test_faults_disk.py.

Every trial checks what a user sees: the failed attempt says why (no traceback) and leaves nothing that looks like
an image; the next attempt ends with the verified image and downloads no chunk the store already held.
`pytest --soak` runs 100 cuts and 50 kills instead of a dozen (docs/RELIABILITY.md).
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from chunkstore.index import decode_index
from chunkstore.oci import OCI_MANIFEST
from chunkstore.store import LocalStore
from fault_proxy import FaultProxy, Link, address_of
from frame_proxy import FLIP, FrameProxy
from helpers import Registry, build_image, push_image, surviving_bytes_bound
from pull_tools import PullRun, layout_images, pull, pull_command, pull_env, push_pair, skopeo_config_digest
from server_process import CHUNKSYNC, ServerProcess
from soak import trials

CUT_TRIALS = trials(10, 100)
KILL_TRIALS = trials(8, 50)
FLIP_TRIALS = trials(8, 60)
TOTALS: dict[str, int] = {}  # what the trials survived, printed at the end of the module (docs/RELIABILITY.md)


@dataclass
class Target:
    repo: str
    digests: dict[str, str]       # tag -> manifest digest
    configs: dict[str, str]       # tag -> config digest (image ID)
    needed: dict[str, set[bytes]]  # tag -> every chunk id of its index


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(registry.url, store=tmp_path_factory.mktemp("fault-server") / "store") as process:
        yield process


@pytest.fixture(scope="module")
def target(registry: Registry, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Target:
    # About 9 MB uncompressed: three CHUNKS frames, so faults land before, between and inside them.
    tmp = tmp_path_factory.mktemp("fault-images")
    pair = push_pair(tmp, registry, "test/faults", 8_000_000, 800_000)
    configs, needed = {}, {}
    store = tmp / "reference-store"
    for tag in ("v1", "v2"):
        pull(pair.ref(tag), server.url, store).report  # indexes both on the server; records the indexes here
        record = LocalStore(store).get_image(pair.repo, pair.digests[tag])
        assert record is not None
        needed[tag] = decode_index(record.index_data).chunk_ids()
        configs[tag] = skopeo_config_digest(pair.ref(tag))
    return Target(pair.repo, pair.digests, configs, needed)


@pytest.fixture(scope="module")
def v1_store(registry: Registry, server: ServerProcess, target: Target,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device store holding v1 completely: copied for trials that update to v2."""
    store = tmp_path_factory.mktemp("fault-v1") / "store"
    pull(f"{registry.host}/{target.repo}:v1", server.url, store).report
    return store


@pytest.fixture(scope="module", autouse=True)
def print_totals() -> Iterator[None]:
    yield
    print(f"\nfault totals: {json.dumps(TOTALS)}")


def count(key: str, n: int = 1) -> None:
    TOTALS[key] = TOTALS.get(key, 0) + n


def stored_ids(store: Path) -> set[bytes]:
    if not (store / "store.db").exists():
        return set()
    return set(LocalStore(store).ids())


def fresh_store(tmp_path: Path, name: str, tag: str, v1_store: Path) -> Path:
    """An empty store for a v1 pull, a copy of the v1 store for a v2 pull (an update)."""
    store = tmp_path / name
    if tag == "v2":
        shutil.copytree(v1_store, store)
    return store


def assert_clear_failure(run: PullRun) -> None:
    assert run.returncode in (0, 1), run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    if run.returncode:
        assert run.stderr.strip().startswith("chunksync pull:") or "chunksync pull:" in run.stderr, run.stderr


def assert_retry_complete(run: PullRun, target: Target, tag: str, layout: Path, kept: set[bytes]) -> dict:
    """The retry's image is the registry's, verified in the layout, and no stored chunk came again."""
    report = run.report
    assert report["manifest_digest"] == target.digests[tag]
    assert report["config_digest"] == target.configs[tag]
    images = layout_images(layout)
    assert images[tag]["config"]["digest"] == target.configs[tag]
    assert report["chunks_rejected"] == 0 and report["registry_layers"] == 0
    # Every chunk came exactly once: what the store kept from the failed attempt plus what the retry got is
    # exactly the image (chunks_received counts verified chunks taken from the server, repair round included).
    assert report["chunks_received"] == len(target.needed[tag] - kept), report
    return report


def store_verify(store: Path) -> dict:
    proc = subprocess.run([str(CHUNKSYNC), "store", "verify", "--store", str(store), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads(proc.stdout)
    assert result["bad"] == []
    return result


# --- the link cut at random byte offsets --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def link(registry: Registry, server: ServerProcess) -> Iterator[tuple[Link, FaultProxy, FaultProxy]]:
    """The device's one line to the world: the registry and the chunksync server behind the same flaky link."""
    link = Link()
    with FaultProxy(address_of(server.url), link) as to_server, FaultProxy(address_of(registry.url), link) as to_reg:
        yield link, to_server, to_reg


def test_link_cut_at_random_offsets_then_retry(link: tuple[Link, FaultProxy, FaultProxy], target: Target,
                                               v1_store: Path, tmp_path: Path) -> None:
    link_, to_server, to_registry = link
    ref = {tag: f"{to_registry.host}/{target.repo}:{tag}" for tag in ("v1", "v2")}
    # What a clean pull puts on the link, so cuts fall anywhere in it.
    total = {}
    for tag in ("v1", "v2"):
        link_.heal()
        link_.reset_counts()
        pull(ref[tag], to_server.url, fresh_store(tmp_path, f"clean-{tag}", tag, v1_store)).report
        total[tag] = link_.delivered
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    for trial in range(CUT_TRIALS):
        tag = ("v1", "v2")[trial % 2]
        store, layout = fresh_store(tmp_path, f"store-{trial}", tag, v1_store), tmp_path / f"out-{trial}"
        offset = rng.randrange(total[tag])
        link_.heal()
        link_.reset_counts()
        link_.cut_after(offset)
        first = pull(ref[tag], to_server.url, store, "--out", f"oci:{layout}")
        link_.heal()
        assert_clear_failure(first)
        context = f"trial {trial}: {tag} cut after {offset} of {total[tag]} bytes"
        if first.returncode == 0:  # the cut came after everything the pull needed
            assert layout_images(layout)[tag]["config"]["digest"] == target.configs[tag], context
        else:
            assert tag not in layout_images(layout), context  # nothing that looks like the image
        kept = stored_ids(store)
        assert kept <= target.needed["v1"] | target.needed["v2"], context
        retry = pull(ref[tag], to_server.url, store, "--out", f"oci:{layout}")
        report = assert_retry_complete(retry, target, tag, layout, kept)
        outcomes[report["path"]] = outcomes.get(report["path"], 0) + 1
        count("cut_trials")
        count("cut_first_pull_failed", first.returncode)
        count("cut_chunks_kept", len(kept - (target.needed["v1"] if tag == "v2" else set())))
    print(f"\n{CUT_TRIALS} cuts; retries by path: {outcomes}")


def test_link_cut_inside_the_registry_manifest(link: tuple[Link, FaultProxy, FaultProxy], target: Target,
                                               tmp_path: Path) -> None:
    """The first bytes on the link are the registry's manifest answer: a cut inside its body (found by the soak
    run: it was a traceback) is a clear failure, and the retry works."""
    link_, to_server, to_registry = link
    ref = f"{to_registry.host}/{target.repo}:v1"
    link_.heal()
    link_.reset_counts()
    manifest = httpx.get(f"{to_registry.url}/v2/{target.repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert manifest.status_code == 200
    link_.cut_after(link_.delivered - len(manifest.content) // 2)  # the pull's first answer is this one: cut its JSON
    first = pull(ref, to_server.url, tmp_path / "store", "--out", f"oci:{tmp_path / 'out'}")
    link_.heal()
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
    assert "broke off" in first.stderr and "registry is unreachable" in first.stderr
    assert layout_images(tmp_path / "out") == {}
    kept = stored_ids(tmp_path / "store")
    retry = pull(ref, to_server.url, tmp_path / "store", "--out", f"oci:{tmp_path / 'out'}")
    assert_retry_complete(retry, target, "v1", tmp_path / "out", kept)


# --- the device killed at random instants -------------------------------------------------------------------------


def test_device_killed_at_random_instants_then_retry(registry: Registry, server: ServerProcess, target: Target,
                                                     v1_store: Path, tmp_path: Path) -> None:
    ref = {tag: f"{registry.host}/{target.repo}:{tag}" for tag in ("v1", "v2")}
    started = time.monotonic()
    pull(ref["v1"], server.url, tmp_path / "clean", "--out", f"oci:{tmp_path / 'clean-out'}").report
    duration = time.monotonic() - started  # the kill instants spread over a whole pull, startup included
    rng = random.Random(11)
    killed_mid_pull = 0
    for trial in range(KILL_TRIALS):
        tag = ("v1", "v2")[trial % 2]
        store, layout = fresh_store(tmp_path, f"store-{trial}", tag, v1_store), tmp_path / f"out-{trial}"
        process = subprocess.Popen(pull_command(ref[tag], server.url, store, "--out", f"oci:{layout}"),
                                   env=pull_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, duration))  # picks the instant; nothing is asserted about time
        process.send_signal(signal.SIGKILL)
        killed_mid_pull += process.wait() == -signal.SIGKILL
        context = f"trial {trial}: {tag}"
        if (store / "store.db").exists():
            store_verify(store)
        images = layout_images(layout)  # asserts every image index.json names is whole and verified
        if tag in images:
            assert images[tag]["config"]["digest"] == target.configs[tag], context
        kept = stored_ids(store)
        retry = pull(ref[tag], server.url, store, "--out", f"oci:{layout}")
        assert_retry_complete(retry, target, tag, layout, kept)
        count("kill_trials")
    count("kills_landed_mid_pull", killed_mid_pull)
    print(f"\n{KILL_TRIALS} SIGKILLs, {killed_mid_pull} before the pull ended")


# --- the server killed and restarted mid-stream -------------------------------------------------------------------

HOLD_AT = 1_000_000  # bytes of the answer let through before the link holds: past the HEADER, inside the chunks


@pytest.fixture(scope="module")
def bulky(registry: Registry, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Target:
    """An image of incompressible content whose answer is MBs longer than HOLD_AT plus every buffer that outlives
    a killed server; with compressible text, the whole rest of the answer could sit in the dead server's socket
    buffer and arrive anyway (seen: path "diff", no repair)."""
    tmp = tmp_path_factory.mktemp("fault-bulky")
    size = HOLD_AT + surviving_bytes_bound() + (4 << 20)
    layout = build_image(tmp, [{"data/random.bin": random.Random(3).randbytes(size)}], "v1")
    repo = "test/faults-bulky"
    digest = push_image(layout, "v1", registry, repo)
    ref = f"{registry.host}/{repo}:v1"
    store = tmp / "reference-store"
    pull(ref, server.url, store).report
    record = LocalStore(store).get_image(repo, digest)
    assert record is not None
    return Target(repo, {"v1": digest}, {"v1": skopeo_config_digest(ref)},
                  {"v1": decode_index(record.index_data).chunk_ids()})


def test_server_killed_and_restarted_mid_stream(registry: Registry, bulky: Target, tmp_path: Path) -> None:
    server_store = tmp_path / "server" / "store"
    server = ServerProcess(registry.url, store=server_store)
    link = Link()
    try:
        with FaultProxy(address_of(server.url), link) as proxy:
            link.hold_after(HOLD_AT)
            store, layout = tmp_path / "store", tmp_path / "out"
            process = subprocess.Popen(
                pull_command(f"{registry.host}/{bulky.repo}:v1", proxy.url, store, "--out", f"oci:{layout}"),
                env=pull_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert link.held.wait(60), "the answer never reached the hold point"
                server.kill()  # mid-stream: the rest of the answer is more than the dead server's buffers hold
                server = ServerProcess(registry.url, store=server_store, port=server.port)
            finally:
                link.release()
                stdout, stderr = process.communicate(timeout=120)
    finally:
        server.stop()
    run = PullRun(process.returncode, stdout, stderr)
    report = assert_retry_complete(run, bulky, "v1", layout, set())
    # The cut cost one repair round to the restarted server, not a registry pull.
    assert report["path"] == "repair" and report["repair_chunks"] > 0, report
    assert "asking for" in stderr
    count("server_restarts_survived")


# --- frame bytes flipped in transit -------------------------------------------------------------------------------


def test_flipped_frame_bytes_never_reach_the_image(registry: Registry, server: ServerProcess, target: Target,
                                                   tmp_path: Path) -> None:
    ref = f"{registry.host}/{target.repo}:v1"
    with FrameProxy(server.url) as clean:
        length = pull(ref, clean.url, tmp_path / "clean").report["bytes_received"]  # a bound on the frames' length
    rng = random.Random(5)
    outcomes: dict[str, int] = {}
    for trial in range(FLIP_TRIALS):
        # Half the flips in the first 4 KiB (prefixes, the HEADER's manifest, config and index), half anywhere.
        offset = rng.randrange(4096) if trial % 2 else rng.randrange(length)
        store, layout = tmp_path / f"store-{trial}", tmp_path / f"out-{trial}"
        with FrameProxy(server.url, FLIP, flip_at=offset) as proxy:
            run = pull(ref, proxy.url, store, "--out", f"oci:{layout}")
        assert_clear_failure(run)
        report = run.report  # the registry is reachable, so a verified image always comes out
        assert report["manifest_digest"] == target.digests["v1"]
        assert layout_images(layout)["v1"]["config"]["digest"] == target.configs["v1"]
        store_verify(store)
        outcomes[report["path"]] = outcomes.get(report["path"], 0) + 1
        count("flip_trials")
        count("flips_landed", proxy.damaged_frames)
    print(f"\n{FLIP_TRIALS} flipped bytes; pulls by path: {outcomes}")


# --- the registry failing -----------------------------------------------------------------------------------------


def test_device_registry_503_is_a_clear_error_then_works(registry: Registry, server: ServerProcess, target: Target,
                                                         tmp_path: Path) -> None:
    with FaultProxy(address_of(registry.url)) as to_registry:
        ref = f"{to_registry.host}/{target.repo}:v1"
        to_registry.link.http_status = 503
        failed = pull(ref, server.url, tmp_path / "store", "--out", f"oci:{tmp_path / 'out'}")
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert "the registry failed" in failed.stderr and "503" in failed.stderr
        assert layout_images(tmp_path / "out") == {}
        to_registry.link.heal()
        report = pull(ref, server.url, tmp_path / "store", "--out", f"oci:{tmp_path / 'out'}").report
    assert report["path"] == "diff" and layout_images(tmp_path / "out")["v1"]
    count("registry_faults_survived")


def test_device_registry_down_or_slow(registry: Registry, server: ServerProcess, target: Target,
                                      tmp_path: Path) -> None:
    with FaultProxy(address_of(registry.url)) as to_registry:
        ref = f"{to_registry.host}/{target.repo}:v1"
        to_registry.link.down()
        # The server's answer is verified against its own manifest digest chain; without the registry there is
        # no fallback, and the device is told so.
        down = pull(ref, server.url, tmp_path / "a", "--out", f"oci:{tmp_path / 'out'}")
        assert "unreachable" in down.stderr and down.report["path"] == "diff"
        to_registry.link.heal()
        to_registry.link.delay = 0.05  # every piece of every registry answer arrives late
        slow = pull(ref, server.url, tmp_path / "b", "--out", f"oci:{tmp_path / 'out'}").report
    assert slow["manifest_digest"] == target.digests["v1"]
    assert layout_images(tmp_path / "out")["v1"]["config"]["digest"] == target.configs["v1"]
    count("registry_faults_survived", 2)


def test_server_registry_503_down_slow_falls_back_then_recovers(registry: Registry, target: Target,
                                                                tmp_path: Path) -> None:
    """The server's own line to the registry fails: the device gets its image from the registry anyway."""
    ref = f"{registry.host}/{target.repo}:v2"
    with FaultProxy(address_of(registry.url)) as proxy, \
            ServerProcess(proxy.url, store=tmp_path / "server" / "store") as server:
        for fault in ("503", "down"):
            if fault == "503":
                proxy.link.http_status = 503
            else:
                proxy.link.down()
            run = pull(ref, server.url, tmp_path / f"store-{fault}", "--out", f"oci:{tmp_path / fault}")
            report = run.report
            assert report["path"] == "fallback" and "pulling plainly from the registry" in run.stderr
            assert "502" in run.stderr or "registry" in report["fallback_reason"]
            assert layout_images(tmp_path / fault)["v2"]["config"]["digest"] == target.configs["v2"]
            proxy.link.heal()
        proxy.link.delay = 0.02
        report = pull(ref, server.url, tmp_path / "store-slow", "--out", f"oci:{tmp_path / 'slow'}").report
        assert report["path"] == "diff"
        assert layout_images(tmp_path / "slow")["v2"]["config"]["digest"] == target.configs["v2"]
    count("registry_faults_survived", 3)
