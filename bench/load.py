"""`python -m bench.load [--devices 50]`: many devices pulling at once from one `chunksync serve` next to a real
registry — empty stores and stores holding older versions, updating to mixed versions — every image verified,
the server's peak RSS (/proc VmHWM) and CPU, and throughput; writes bench/results/LOAD.md."""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import measure
from client.sandbox import SandboxError, build_image, push_image, require_tools, start_registry, start_server
from server.metrics import parse_metrics

CHUNKSYNC = str(Path(sys.executable).with_name("chunksync"))
RESULTS = Path(__file__).parent / "results"
REPO = "load/app"
# (what the device holds, what it pulls), cycled over the devices: first pulls, one-version and two-version updates.
MIX = [(None, "v3"), ("v1", "v3"), ("v2", "v3"), (None, "v2"), ("v1", "v2")]


def log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


def _rootfs(base: Path, version: int, source: Path, size: int) -> Path:
    """Real files from `source` (about `size` bytes); each later version edits a few of them and adds one."""
    root = base / f"rootfs-v{version}"
    files = sorted(p for p in source.rglob("*.py") if p.is_file() and "__pycache__" not in p.parts)
    total = 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        for v in range(2, version + 1):
            if i % 97 == v:  # about 1% of the files change per version
                data += f"\n# changed in v{v}\n".encode()
        target = root / "app" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        total += len(data)
        if total >= size:
            break
    (root / "app" / f"VERSION-{version}").write_text(f"{version}\n")
    return root


@dataclass
class Device:
    name: str
    holds: str | None
    pulls: str
    store: Path
    out: Path


def _verify_layout(out: Path, tag: str) -> str:
    """The config digest of `tag` in the OCI layout `out`, after hashing every blob the manifest names."""
    index = json.loads((out / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)

    def blob(digest: str) -> bytes:
        data = (out / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise AssertionError(f"{out}: blob {digest} does not match its digest")
        return data

    manifest = json.loads(blob(entry["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    layers = [layer["digest"] for layer in manifest["layers"]]
    if layers != config["rootfs"]["diff_ids"]:
        raise AssertionError(f"{out}: layers are not the config's diff_ids")
    for digest in layers:
        blob(digest)
    return manifest["config"]["digest"]


def _pull(ref: str, server: str, store: Path, out: Path | None = None) -> subprocess.Popen:
    args = [CHUNKSYNC, "pull", ref, "--server", server, "--store", str(store), "--json"]
    if out is not None:
        args += ["--out", f"oci:{out}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _server_metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)


def run(devices: int, work: Path, size: int = 6_000_000) -> dict:
    require_tools("docker-registry", "umoci", "skopeo")
    registry, host = start_registry(work / "registry")
    server = None
    try:
        source = Path("/usr/lib/python3.11")
        for version in (1, 2, 3):
            rootfs = _rootfs(work, version, source, size)
            build_image(work / "layout", f"v{version}", rootfs, work / f"bundle-{version}")
            push_image(work / "layout", f"v{version}", f"{host}/{REPO}:v{version}")
        log("pushed v1, v2, v3")
        server, url = start_server(f"http://{host}", work / "server-store", work / "server.log")
        configs, templates = {}, {}
        for tag in ("v1", "v2", "v3"):  # indexes every version, and makes the device stores that hold v1 or v2
            templates[tag] = work / f"template-{tag}"
            proc = _pull(f"{host}/{REPO}:{tag}", url, templates[tag], work / "template-out")
            stdout, stderr = proc.communicate()
            if proc.returncode:
                raise SandboxError(f"warm-up pull of {tag} failed: {stderr[-2000:]}")
            configs[tag] = json.loads(stdout.strip().splitlines()[-1])["config_digest"]
        fleet = []
        for i in range(devices):
            holds, pulls = MIX[i % len(MIX)]
            store = work / f"device-{i}"
            if holds:
                shutil.copytree(templates[holds], store)
            fleet.append(Device(f"device-{i}", holds, pulls, store, work / f"out-{i}"))
        pid = server.process.pid
        peak_reset = measure.reset_peak_rss(pid)
        cpu0, before = measure.cpu_seconds(pid), _server_metrics(url)
        log(f"{devices} devices pulling at once")
        started = time.monotonic()
        procs = [(d, time.monotonic(), _pull(f"{host}/{REPO}:{d.pulls}", url, d.store, d.out)) for d in fleet]
        results = []
        for device, t0, proc in procs:
            stdout, stderr = proc.communicate()
            results.append((device, time.monotonic() - t0, proc.returncode, stdout, stderr))
        wall = time.monotonic() - started
        server_cpu = measure.cpu_seconds(pid) - cpu0
        server_peak = measure.peak_rss_mb(pid)
        after = _server_metrics(url)
    finally:
        if server is not None:
            server.stop()
        registry.stop()

    failures, rows = [], []
    for device, seconds, code, stdout, stderr in results:
        if code != 0:
            failures.append(f"{device.name}: exit {code}: {stderr.strip()[-300:]}")
            continue
        report = json.loads(stdout.strip().splitlines()[-1])
        verified = _verify_layout(device.out, device.pulls) == configs[device.pulls] == report["config_digest"]
        if not verified:
            failures.append(f"{device.name}: image does not match the registry's")
        rows.append({"device": device.name, "holds": device.holds or "nothing", "pulls": device.pulls,
                     "path": report["path"], "bytes_received": report["bytes_received"],
                     "full_pull_bytes": report["full_pull_bytes"], "seconds": seconds,
                     "chunks_received": report["chunks_received"], "verified": verified})

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    received = sum(r["bytes_received"] for r in rows)
    seconds = sorted(r["seconds"] for r in rows)
    return {
        "devices": devices, "verified": sum(r["verified"] for r in rows), "failures": failures,
        "wall_s": round(wall, 2), "pulls_per_s": round(len(rows) / wall, 2),
        "device_bytes_received": received, "device_mb_per_s": round(received / wall / 1e6, 2),
        "full_pull_bytes": sum(r["full_pull_bytes"] for r in rows),
        "server_response_bytes": int(delta("chunksync_response_bytes_total")),
        "server_chunks_sent": int(delta("chunksync_chunks_sent_total")),
        "server_cpu_s": round(server_cpu, 2), "server_peak_rss_mb": round(server_peak, 1),
        "server_peak_is_lifetime": not peak_reset,
        "pull_s_p50": round(statistics.median(seconds), 2) if seconds else None,
        "pull_s_p95": round(seconds[int(0.95 * (len(seconds) - 1))], 2) if seconds else None,
        "image_mb": round(size / 1e6, 1), "by_mix": _by_mix(rows),
        "machine": f"{platform.machine()}, {shutil.os.cpu_count()} cores, Python {platform.python_version()}",
    }


def _by_mix(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["holds"], row["pulls"]), []).append(row)
    return [{"holds": holds, "pulls": pulls, "devices": len(g), "paths": sorted({r["path"] for r in g}),
             "mb_received_each": round(statistics.median(r["bytes_received"] for r in g) / 1e6, 3),
             "full_pull_mb": round(g[0]["full_pull_bytes"] / 1e6, 3),
             "seconds_p50": round(statistics.median(r["seconds"] for r in g), 2)}
            for (holds, pulls), g in sorted(groups.items())]


def write(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Load: many devices, one server",
        "",
        f"`python -m bench.load --devices {result['devices']}` on {result['machine']}: one `chunksync serve` next "
        f"to a real `docker-registry`, {result['devices']} `chunksync pull` processes started at once, images of "
        f"about {result['image_mb']} MB (one layer of real files; v2 and v3 each change ~1% of them).",
        "",
        "| | |",
        "|---|---|",
        f"| devices verified | **{result['verified']} of {result['devices']}** (diff_ids in the pull, every blob of "
        "the output layout hashed again here, config digest = the registry's) |",
        f"| wall time, all devices | {result['wall_s']} s ({result['pulls_per_s']} pulls/s) |",
        f"| pull time per device | p50 {result['pull_s_p50']} s, p95 {result['pull_s_p95']} s |",
        f"| bytes to devices | {result['device_bytes_received'] / 1e6:.1f} MB "
        f"({result['device_mb_per_s']} MB/s), a plain pull of the same would be "
        f"{result['full_pull_bytes'] / 1e6:.1f} MB |",
        f"| server: chunks sent, answer bytes | {result['server_chunks_sent']:,}, "
        f"{result['server_response_bytes'] / 1e6:.1f} MB |",
        f"| server CPU | {result['server_cpu_s']} s |",
        f"| server peak RSS (VmHWM) | **{result['server_peak_rss_mb']} MB**"
        f"{' (lifetime peak: the kernel refused a reset)' if result['server_peak_is_lifetime'] else ''} |",
        "",
        "| device holds | pulls | devices | path | MB received each (median) | plain pull MB | s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in result["by_mix"]:
        lines.append(f"| {g['holds']} | {g['pulls']} | {g['devices']} | {', '.join(g['paths'])} | "
                     f"{g['mb_received_each']} | {g['full_pull_mb']} | {g['seconds_p50']} |")
    if result["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in result["failures"]]
    lines += ["", "The server holds about one CHUNKS frame (4 MiB) per answer in flight; its peak RSS is measured "
              "from a reset at the start of the concurrent phase (the warm-up that indexes the images is "
              "excluded). Devices are processes on the same 2 cores as the server and the registry, so wall "
              "times are an upper bound.", ""]
    path = out / "LOAD.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--devices", type=int, default=50, help="devices pulling at once (default 50)")
    parser.add_argument("--image-mb", type=float, default=6.0, help="uncompressed size of each image (default 6)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where LOAD.md goes (default {RESULTS})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="chunksync-load-"))
    try:
        result = run(args.devices, work, int(args.image_mb * 1e6))
    except SandboxError as exc:
        print(f"bench.load: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    path = write(result, args.out)
    print(f"{result['verified']} of {result['devices']} devices verified in {result['wall_s']} s; server peak RSS "
          f"{result['server_peak_rss_mb']} MB; wrote {path}")
    return 0 if result["verified"] == result["devices"] else 1


if __name__ == "__main__":
    sys.exit(main())
