"""Throwaway real parts on this machine, for `chunksync demo`: a loopback `docker-registry`, the chunksync server
as a process, images built with umoci (unpack/repack) and pushed with skopeo."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REGISTRY_BIN = "docker-registry"


class SandboxError(RuntimeError):
    """A tool the demo drives failed; the message carries its output."""


def run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SandboxError(f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SandboxError(f"missing tools: {', '.join(missing)}; run ./setup.sh to install them")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (callers race other processes for it, so starts retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process with its output in a log file, up once `health_url` answers 200 (or 401)."""

    def __init__(self, args: list[str], log: Path, health_url: str, what: str, timeout: float = 20.0,
                 env: dict[str, str] | None = None) -> None:
        self.log = log
        self.what = what
        with log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(health_url, timeout=1).status_code in (200, 401):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise SandboxError(f"{what} did not start: {log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it has not ended within 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_registry(workdir: Path) -> tuple[Process, str]:
    """A registry on a free loopback port with storage in `workdir`; returns it and its host:port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}, "delete": {"enabled": True}},
              "http": {"addr": f"127.0.0.1:{port}", "secret": "demo"}}
    (workdir / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    process = Process([REGISTRY_BIN, "serve", str(workdir / "config.yml")], workdir / "registry.log",
                      f"http://127.0.0.1:{port}/v2/", "docker-registry")
    return process, f"127.0.0.1:{port}"


def start_server(registry_url: str, store: Path, log: Path) -> tuple[Process, str]:
    """`chunksync serve` next to the registry, on a free loopback port; returns it and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "client.cli", "serve", "--registry", registry_url, "--listen",
            f"127.0.0.1:{port}", "--store", str(store)]
    return Process(args, log, f"{url}/healthz", "chunksync serve"), url


def build_image(layout: Path, tag: str, rootfs: Path, bundle: Path) -> None:
    """`layout:tag` with one layer holding the tree `rootfs`, built from scratch (umoci unpack/repack; not
    `umoci insert`, whose 0.4.7 writes truncated tars)."""
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", layout)
    image = f"{layout}:{tag}"
    run("umoci", "new", "--image", image)
    run("umoci", "unpack", *rootless, "--image", image, bundle)
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True, dirs_exist_ok=True)
    run("umoci", "repack", "--image", image, bundle)
    shutil.rmtree(bundle)


def push_image(layout: Path, tag: str, destination: str) -> None:
    """skopeo copy `layout:tag` to `docker://destination` (a loopback registry: no TLS)."""
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{destination}")
