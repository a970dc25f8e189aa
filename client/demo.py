"""`chunksync demo`: a local registry, the server and a device on this machine; two versions of a real image
(the Python standard library, then a patch release of it); pulls v1, then v2, and shows what each cost."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from chunkstore.oci import parse_image_ref

from .layout import LayoutTarget
from .progress import ProgressBar, mb, size
from .pull import Pull, PullError, PullOptions
from .sandbox import SandboxError, build_image, push_image, require_tools, run, start_registry, start_server

SOURCE = Path("/usr/lib/python3.11")
SKIP = shutil.ignore_patterns("test", "tests", "idle_test", "site-packages", "dist-packages", "config-3.*")
REPOSITORY = "demo/python-stdlib"


def say(message: str) -> None:
    print(message, flush=True)


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def make_versions(work: Path) -> tuple[Path, Path]:
    """v1: a copy of the standard library; v2: the same with a few files changed, one added, one removed."""
    v1 = work / "v1" / "usr" / "lib" / "python3.11"
    shutil.copytree(SOURCE, v1, symlinks=True, ignore=SKIP)
    v2 = work / "v2" / "usr" / "lib" / "python3.11"
    shutil.copytree(v1, v2, symlinks=True)
    for name in ("json/__init__.py", "email/utils.py", "http/client.py"):
        target = v2 / name
        if target.is_file():
            target.write_bytes(target.read_bytes() + b"\n# patch release: fixed in v2\n")
    (v2 / "chunksync_demo_new.py").write_text("NEW_IN_V2 = True\n" * 200)
    (v2 / "antigravity.py").unlink(missing_ok=True)
    return v1.parents[2], v2.parents[2]


def pull(image: str, server: str, store: Path, out: Path, tag: str) -> dict:
    options = PullOptions(image=parse_image_ref(image), server=server, store=store, out=LayoutTarget(out, tag))
    puller = Pull(options, ProgressBar(), warn=lambda message: print(f"  ! {message}", file=sys.stderr))
    try:
        return puller.run().to_json()
    finally:
        puller.close()


def show(label: str, report: dict) -> None:
    say(f"  {label}: downloaded {size(report['bytes_received'])} of a {mb(report['full_pull_bytes'])} full pull "
        f"({report['saved_percent']:.1f}% saved), sent {size(report['bytes_sent'])}, {report['chunks_received']} "
        f"chunks, path {report['path']}, {report['seconds']:.1f} s")


def main(keep: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="chunksync-demo-"))
    processes = []
    try:
        require_tools("docker-registry", "umoci", "skopeo")
        say(f"chunksync demo (work dir {work})")
        registry, host = start_registry(work / "registry")
        processes.append(registry)
        say(f"  registry   http://{host} (docker-registry, loopback)")
        v1_tree, v2_tree = make_versions(work / "trees")
        say(f"  images     {REPOSITORY}:v1 = Python 3.11 standard library, {mb(tree_size(v1_tree))}, one layer; "
            "v2 = 3 files changed, 1 added, 1 removed, rebuilt from scratch")
        layout = work / "build"
        for tag, tree in (("v1", v1_tree), ("v2", v2_tree)):
            build_image(layout, tag, tree, work / f"bundle-{tag}")
            push_image(layout, tag, f"{host}/{REPOSITORY}:{tag}")
        say("             built with umoci, pushed with skopeo")
        server, server_url = start_server(f"http://{host}", work / "server-store", work / "server.log")
        processes.append(server)
        say(f"  server     {server_url} (chunksync serve)")

        store, out = work / "device-store", work / "device-images"
        say(f"device: store {store}, images into oci:{out}")
        first = pull(f"{host}/{REPOSITORY}:v1", server_url, store, out, "v1")
        show("pull v1 (empty store)", first)
        second = pull(f"{host}/{REPOSITORY}:v2", server_url, store, out, "v2")
        show("pull v2 (store has v1)", second)

        inspected = json.loads(run("skopeo", "inspect", "--config", "--raw", f"oci:{out}:v2"))
        registry_manifest = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false",
                                           f"docker://{host}/{REPOSITORY}:v2"))
        config_digest = registry_manifest["config"]["digest"]
        if second["config_digest"] != config_digest or "rootfs" not in inspected:
            say(f"FAILED: the pulled v2 has config {second['config_digest']}, the registry's is {config_digest}")
            return 1
        say(f"  skopeo inspect oci:{out}:v2: ok, config {config_digest[:19]}... is the registry's (same image ID)")
        say(f"v2 cost {size(second['bytes_received'])} instead of {mb(second['full_pull_bytes'])}: "
            f"{second['saved_percent']:.1f}% less to download.")
        return 0
    except (SandboxError, PullError) as exc:
        print(f"chunksync demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for process in reversed(processes):
            process.stop()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
