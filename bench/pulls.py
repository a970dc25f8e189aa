"""chunksync measured end to end on one pair: its two images in a real registry, `chunksync index`, the real
`chunksync serve` process, real `chunksync pull` processes for a device on v1 and for an empty device."""

from __future__ import annotations

import json
import shutil
import sqlite3
import statistics
import sys
from pathlib import Path

import httpx

from bench import applyref, images, measure
from bench.tap import Tap
from client.sandbox import Process, start_server
from server.metrics import parse_metrics

CHUNKSYNC = str(Path(sys.executable).with_name("chunksync"))

# Per pair: the server gets a fresh store and process (its numbers belong to this pair alone); `chunksync index`
# runs first, in its own process on the same store, so the one-time indexing cost is measured apart from the
# answers and the server's peak RSS is not its high-water mark from indexing. Both the device's registry traffic
# and its server traffic pass through a counting TCP proxy (bench/tap.py), the ground truth the client's own
# `--json` byte counts are checked against.
#
# The first device on v1 to ask for v2 makes the server compute the pair's deltas (once, then cached): that pull is
# measured on its own ("update_cold"), the later ones ("update", the median) get the cached answer. Whole-segment
# CHUNKS frames (server/segments.py) are cached too, and the empty devices' first pulls of v2 fill that cache: it
# is emptied before the cold update, which so pays for every frame of the pair as the first device would. The first
# pull is measured twice, the first empty device ("first_pull") and a later one ("first_pull_later").


def _changed_layer_bytes(old: dict, new: dict) -> int:
    """A plain registry pull of `new` by a device holding `old`: registries skip layers whose digest it has."""
    have = {layer["digest"] for layer in old["layers"]}
    return sum(layer["size"] for layer in new["layers"] if layer["digest"] not in have)


def _index(ref: str, store: Path) -> dict:
    run = measure.timed([CHUNKSYNC, "index", ref, "--store", str(store), "--json"])
    if run.returncode != 0:
        raise RuntimeError(f"chunksync index {ref} failed: {run.stderr[-2000:]}")
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return {"cpu_s": run.cpu_s, "wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb,
            "uncompressed_bytes": report["uncompressed_bytes"], "chunks": report["chunks"]}


class Bench:
    """One pair's server and its two taps; `pull()` runs one device pull and measures both ends."""

    def __init__(self, registry_host: str, registry_tap: Tap, work: Path) -> None:
        self.registry_host = registry_host
        self.registry_tap = registry_tap
        self.work = work
        self.server: Process | None = None
        self.server_tap: Tap | None = None
        self.server_url = ""

    def start_server(self, store: Path) -> None:
        self.server, url = start_server(f"http://{self.registry_host}", store, self.work / "server.log")
        self.server_url = url
        host, port = url.removeprefix("http://").split(":")
        self.server_tap = Tap((host, int(port)))

    def stop(self) -> None:
        if self.server_tap:
            self.server_tap.close()
        if self.server:
            self.server.stop()

    def delta_metrics(self) -> tuple[float, float]:
        """(pairs computed, delta compute seconds) so far, from the server's /metrics (not through the tap)."""
        values = parse_metrics(httpx.get(f"{self.server_url}/metrics", timeout=10).text)
        return (values.get('chunksync_delta_pairs_total{outcome="computed"}', 0.0),
                values.get("chunksync_delta_compute_seconds_sum", 0.0))

    def pull(self, repo: str, tag: str, device: Path) -> dict:
        assert self.server and self.server_tap
        pid = self.server.process.pid
        out = self.work / f"out-{device.name}-{tag}"
        self.registry_tap.reset()
        self.server_tap.reset()
        rss_before = measure.rss_mb(pid)
        rss_reset = measure.reset_peak_rss(pid)
        cpu0 = measure.cpu_seconds(pid)
        run = measure.timed([CHUNKSYNC, "pull", f"{self.registry_tap.host}/{repo}:{tag}", "--server",
                             f"http://{self.server_tap.host}", "--store", str(device), "--out", f"oci:{out}:{tag}",
                             "--json"])
        server_cpu = measure.cpu_seconds(pid) - cpu0
        server_rss = measure.peak_rss_mb(pid)
        if run.returncode != 0:
            raise RuntimeError(f"chunksync pull {repo}:{tag} failed ({run.returncode}): {run.stderr[-2000:]}")
        report = json.loads(run.stdout.strip().splitlines()[-1])
        shutil.rmtree(out, ignore_errors=True)  # checked by the pull itself (diff_ids); only the bytes matter here
        srv, reg = self.server_tap.reset(), self.registry_tap.reset()
        return {
            "path": report["path"], "warnings": report["warnings"], "manifest_digest": report["manifest_digest"],
            "client_bytes_received": report["bytes_received"], "client_bytes_sent": report["bytes_sent"],
            "wire_received": srv.received + reg.received, "wire_sent": srv.sent + reg.sent,
            "wire_bytes": srv.received + reg.received + srv.sent + reg.sent,
            "server_wire_bytes": srv.received + srv.sent, "registry_wire_bytes": reg.received + reg.sent,
            "server_requests": srv.requests, "registry_requests": reg.requests,
            "connections": srv.connections + reg.connections,
            "chunks_received": report["chunks_received"], "repair_chunks": report["repair_chunks"],
            "bloom_bytes": report["bloom_bytes"], "have_images": report["have_images"],
            "full_pull_bytes": report["full_pull_bytes"],
            "delta_items": report["delta_items"], "delta_chunks": report["delta_chunks"],
            "index_delta_bytes": report["index_delta_bytes"], "client_apply_cpu_s": report["apply_cpu_s"],
            "client_cpu_s": run.cpu_s, "client_wall_s": run.wall_s, "client_peak_rss_mb": run.peak_rss_mb,
            "server_cpu_s": round(server_cpu, 3), "server_peak_rss_mb": round(server_rss, 1),
            "server_rss_before_mb": round(rss_before, 1), "server_peak_is_lifetime": not rss_reset,
        }

    @staticmethod
    def empty_frame_cache(store: Path) -> None:
        """Drops the server's cached whole-segment frames (the server keeps running; SQLite takes the concurrent
        writer)."""
        with sqlite3.connect(store / "frames.db", timeout=60) as db:
            db.execute("DELETE FROM frames")

    def cold_update(self, repo: str, device: Path) -> dict:
        """The first v2-after-v1 pull: the server computes the pair's deltas in it; /metrics says how long."""
        computed0, seconds0 = self.delta_metrics()
        run = self.pull(repo, "new", device)
        computed1, seconds1 = self.delta_metrics()
        return {**run, "delta_pairs_computed": int(computed1 - computed0),
                "delta_compute_s": round(seconds1 - seconds0, 3)}


def _median_run(runs: list[dict]) -> dict:
    """The first run, with its CPU and peak RSS numbers replaced by the median over all runs."""
    out = dict(runs[0])
    for key in ("client_cpu_s", "client_wall_s", "client_peak_rss_mb", "client_apply_cpu_s", "server_cpu_s",
                "server_peak_rss_mb"):
        out[key] = statistics.median(r[key] for r in runs)
    return out


def measure_pair(pair_dir: Path, cache: Path, registry_host: str, registry_tap: Tap, work: Path,
                 repeat: int = 3) -> dict:
    """Everything chunksync does for one pair; `work` is emptied first and removed after. The update (v2 on a
    device holding v1) is pulled once cold (deltas computed), then `repeat` times cached, each from a copy of the
    same device store: the server's CPU per cached answer is small next to /proc's 10 ms tick, so the median of a
    few is reported. Then v2 once more on a device that holds it (path "local": output and checks without the
    answer), and the zstd yardstick of the payload the update delivered (bench/applyref.py)."""
    name = Path(pair_dir).name
    repo = f"bench/{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    built = images.build_oci_images(pair_dir, registry_host, repo=repo, cache=cache)
    store = work / "server-store"
    result: dict = {
        "pair": name,
        "full_pull_bytes": sum(layer["size"] for layer in built["new"]["layers"]),
        "changed_layer_bytes": _changed_layer_bytes(built["old"], built["new"]),
        "index": {tag: _index(f"{registry_host}/{repo}:{tag}", store) for tag in ("old", "new")},
    }
    bench = Bench(registry_host, registry_tap, work)
    try:
        bench.start_server(store)
        result["first_pull"] = bench.pull(repo, "new", work / "device-empty")
        result["first_pull_later"] = bench.pull(repo, "new", work / "device-empty-2")
        result["v1_pull"] = bench.pull(repo, "old", work / "device-v1")
        for i in range(repeat):
            shutil.copytree(work / "device-v1", work / f"device-v1-copy{i}")
        bench.empty_frame_cache(store)
        result["update_cold"] = bench.cold_update(repo, work / "device-v1")
        updates = [bench.pull(repo, "new", work / f"device-v1-copy{i}") for i in range(repeat)]
        result["update"] = _median_run(updates)
        result["update_runs"] = updates
        result["local_pull"] = bench.pull(repo, "new", work / "device-v1")
        result["apply_reference"] = applyref.measure(work / "device-v1", repo, result["v1_pull"]["manifest_digest"],
                                                     result["update"]["manifest_digest"])
    finally:
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)
    return result
