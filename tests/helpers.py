"""Real parts for tests: a throwaway `docker-registry`, small OCI images built with umoci and pushed with skopeo.

Import from tests as `from helpers import ...` (pytest puts tests/ on sys.path via the rootdir conftest).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from chunkstore.oci import OCI_INDEX, sha256_digest, validate_digest
from client.registry import RegistryClient
from client.sandbox import free_port  # noqa: F401 - tests import it from here too


def serve_http(handle: Callable[[BaseHTTPRequestHandler], None]) -> tuple[ThreadingHTTPServer, str]:
    """A loopback HTTP server in a daemon thread that passes every GET and POST to `handle`, and its URL; stop it
    with `shutdown()` and `server_close()`."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            handle(self)

        def do_GET(self) -> None:  # noqa: N802
            handle(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"

REGISTRY_BIN = "/usr/bin/docker-registry"

# htpasswd users of the `auth_registry` fixture.
USERS: dict[str, str] = {"alice": "secret1", "bob": "secret2"}

# A layer's content: path in the image -> bytes, a file to copy, or None to delete the path (a whiteout).
LayerFiles = Mapping[str, "bytes | Path | None"]


def run(*args: str | Path, cwd: Path | None = None) -> str:
    """Run a command, return its stdout; on failure raise with its stderr so the test log says why."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout


# --- the registry --------------------------------------------------------------------------------------------------


@dataclass
class Registry:
    """A running `docker-registry serve` on 127.0.0.1 with filesystem storage in `root`."""

    url: str  # http://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT, for image references and skopeo
    root: Path  # storage directory (blobs under docker/registry/v2/blobs)
    process: subprocess.Popen[bytes] = field(repr=False)
    users: dict[str, str] = field(default_factory=dict)  # htpasswd users, empty when anonymous

    def client(self, user: str | None = None, **kwargs: object) -> RegistryClient:
        """A RegistryClient for this registry, as `user` (one of `users`) or anonymous."""
        if user is not None:
            kwargs.update(username=user, password=self.users[user])
        return RegistryClient(self.url, **kwargs)  # type: ignore[arg-type]

    def creds(self, user: str) -> str:
        """`user:password`, as skopeo's --dest-creds wants it."""
        return f"{user}:{self.users[user]}"

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob (manifests too) on disk; lets tests tamper with stored content."""
        algorithm, hexdigest = validate_digest(digest).split(":")
        return self.root / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()



@dataclass(frozen=True)
class TlsCert:
    """A self-signed certificate for `name` (a host name that is not loopback to the client, so it speaks HTTPS),
    which resolves to `address`."""
    cert: Path
    key: Path
    name: str
    address: str


def make_tls_cert(workdir: Path) -> TlsCert | None:
    """A certificate for a name of this machine that the client does not take for loopback (which gets plain
    HTTP): its host name if that resolves, else the address of its default route; None if it has neither."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name) if name and name.lower() != "localhost" else None
    except OSError:
        address = None
    if address is not None:
        san = f"DNS:{name}"
    else:
        name = address = _default_route_address()
        if address is None:
            return None
        san = f"IP:{address}"
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
        "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}")
    return TlsCert(cert, key, name, address)


def _default_route_address() -> str | None:
    """The local address this machine would send from to the outside (connecting a UDP socket sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def make_htpasswd(users: Mapping[str, str], path: Path) -> Path:
    """Write a bcrypt htpasswd file (distribution accepts only bcrypt entries) using apache2-utils' htpasswd."""
    lines = [run("htpasswd", "-Bbn", user, password).strip() for user, password in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_registry(workdir: Path, *, notify_url: str | None = None, users: Mapping[str, str] | None = None,
                   auth: Mapping[str, object] | None = None, tls: TlsCert | None = None,
                   timeout: float = 10.0) -> Registry:
    """Start a registry with storage in `workdir`/data; optional push notifications and htpasswd users.

    `auth` is a raw `auth:` section of the registry config (e.g. `{"token": {...}}`), used instead of `users`.
    With `tls` it serves HTTPS only, as https://`tls.name`:PORT on `tls.address`.

    `delete` is enabled. Returns once `/v2/` answers; call `.stop()` when done.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "data"
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
    }
    if auth:
        config["auth"] = dict(auth)
    elif users:
        config["auth"] = {"htpasswd": {"realm": "test", "path": str(make_htpasswd(users, workdir / "htpasswd"))}}
    if notify_url:
        config["notifications"] = {"endpoints": [
            {"name": "test", "url": notify_url, "timeout": "2s", "threshold": 5, "backoff": "1s"}]}
    address, name, scheme = (tls.address, tls.name, "https") if tls else ("127.0.0.1", "127.0.0.1", "http")
    probe = ssl.create_default_context(cafile=str(tls.cert)) if tls else True
    last_error = ""
    for _ in range(3):  # the free port may be taken between free_port() and the registry's bind
        port = free_port()
        config["http"] = {"addr": f"{address}:{port}", "secret": "test"}
        if tls:
            config["http"]["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}  # type: ignore[index]
        config_path = workdir / "config.yml"
        config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        log = (workdir / "registry.log").open("wb")
        process = subprocess.Popen([REGISTRY_BIN, "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        registry = Registry(url=f"{scheme}://{name}:{port}", host=f"{name}:{port}", root=root, process=process,
                            users=dict(users or {}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{registry.url}/v2/", timeout=1, verify=probe).status_code in (200, 401):
                    return registry
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        registry.stop()
        last_error = (workdir / "registry.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"docker-registry did not start:\n{last_error}")


def surviving_bytes_bound() -> int:
    """What a server's answer can hold in buffers past what a proxy forwarded: the server socket's send buffer (up
    to tcp_wmem's maximum; a killed server's kernel still sends it) plus the proxy's receive buffer (128 KiB,
    doubled by Linux). An answer longer than that by MBs is still in the server while the proxy holds it."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2]) + (256 << 10)


# --- images --------------------------------------------------------------------------------------------------------


def real_files(total_bytes: int = 300_000, root: str | Path = "/usr/lib/python3.11", skip: int = 0,
               prefix: str = "app/") -> dict[str, bytes]:
    """Real files from the machine (deterministic order) adding up to about `total_bytes`, keyed `prefix+relpath`.

    `skip` leaves out the first files, so two calls can give different content.
    """
    root = Path(root)
    found: dict[str, bytes] = {}
    size = 0
    candidates = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts and "test" not in p.parts)
    for path in candidates[skip:]:
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if not data:
            continue
        found[prefix + str(path.relative_to(root))] = data
        size += len(data)
        if size >= total_bytes:
            break
    return found


def _write_layer(rootfs: Path, layer: LayerFiles | Path) -> None:
    if isinstance(layer, Path):
        shutil.copytree(layer, rootfs, symlinks=True, dirs_exist_ok=True)
        return
    for name, content in layer.items():
        target = rootfs / name.lstrip("/")
        if content is None:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)


def build_image(tmp_path: Path, layers: Sequence[LayerFiles | Path], tag: str = "v1", *,
                layout: Path | None = None, base_tag: str | None = None, architecture: str | None = None,
                os_name: str | None = None, variant: str | None = None) -> Path:
    """Build `layout:tag`, an OCI image layout with one layer per entry of `layers`; return the layout dir.

    Each entry is {path: bytes | Path | None (delete)} or a directory copied into the root. With `base_tag`, the
    image starts from that tag of the same layout (so v2 shares v1's layers). `architecture`/`os_name`/`variant`
    set the config's platform. Uses unpack/repack per layer, since `umoci insert` 0.4.7 writes truncated tars.
    """
    layout = layout or tmp_path / "layout"
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", layout)
    image = f"{layout}:{tag}"
    if base_tag:
        run("umoci", "tag", "--image", f"{layout}:{base_tag}", tag)
    else:
        run("umoci", "new", "--image", image)
    platform_args = [f"--{k}={v}" for k, v in (("architecture", architecture), ("os", os_name)) if v]
    if platform_args:
        run("umoci", "config", "--image", image, *platform_args)
    if variant:
        _set_config_variant(layout, tag, variant)
    for i, layer in enumerate(layers):
        bundle = tmp_path / f".bundle-{tag}-{i}"
        run("umoci", "unpack", "--image", image, bundle)
        _write_layer(bundle / "rootfs", layer)
        run("umoci", "repack", "--image", image, bundle)
        shutil.rmtree(bundle)
    run("umoci", "gc", "--layout", layout)
    return layout


def _set_config_variant(layout: Path, tag: str, variant: str) -> None:
    # umoci 0.4.7 has no --variant; rewrite the config and manifest blobs by hand and retag.
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads(_blob(layout, entry["digest"]).read_bytes())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_bytes())
    config["variant"] = variant
    manifest["config"].update(_put_blob(layout, json.dumps(config).encode()))
    entry.update(_put_blob(layout, json.dumps(manifest).encode()))
    (layout / "index.json").write_text(json.dumps(index))


def _blob(layout: Path, digest: str) -> Path:
    algorithm, hexdigest = validate_digest(digest).split(":")
    return layout / "blobs" / algorithm / hexdigest


def _put_blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = sha256_digest(data)
    _blob(layout, digest).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def push_image(layout: Path, tag: str, registry: Registry, repo: str, *, creds: str | None = None,
               dest_tag: str | None = None, docker_format: bool = False) -> str:
    """Push `layout:tag` to `registry`/`repo`:`dest_tag or tag` with skopeo; return the manifest digest.

    `docker_format` converts to Docker v2 schema 2 media types (as docker push would store it).
    """
    digest_file = layout.parent / f".digest-{tag}-{os.getpid()}"
    args = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--digestfile", str(digest_file)]
    if creds:
        args.append(f"--dest-creds={creds}")
    if docker_format:
        args.append("--format=v2s2")
    run(*args, f"oci:{layout}:{tag}", f"docker://{registry.host}/{repo}:{dest_tag or tag}")
    digest = digest_file.read_text().strip()
    digest_file.unlink()
    return validate_digest(digest)


@dataclass(frozen=True)
class MultiArchImage:
    """A pushed image index and the per-platform manifests it lists."""

    index_digest: str
    manifests: dict[str, str]  # "linux/arm64" -> manifest digest


def push_multiarch(tmp_path: Path, registry: Registry, repo: str, tag: str,
                   platforms: Mapping[str, Sequence[LayerFiles | Path]], *, user: str | None = None) -> MultiArchImage:
    """Build one image per `os/arch[/variant]` in `platforms`, push each, then push an OCI image index at `tag`."""
    layout = tmp_path / f"layout-{tag}-multi"
    descriptors: list[dict[str, object]] = []
    digests: dict[str, str] = {}
    with registry.client(user) as client:
        for platform, layers in platforms.items():
            os_name, architecture, *rest = platform.split("/")
            arch_tag = f"{tag}-{os_name}-{architecture}{'-' + rest[0] if rest else ''}"
            build_image(tmp_path, layers, arch_tag, layout=layout, architecture=architecture, os_name=os_name,
                        variant=rest[0] if rest else None)
            digest = push_image(layout, arch_tag, registry, repo, dest_tag=arch_tag,
                                creds=registry.creds(user) if user else None)
            manifest = client.get_raw_manifest(repo, digest)
            entry_platform = {"architecture": architecture, "os": os_name}
            if rest:
                entry_platform["variant"] = rest[0]
            descriptors.append({"mediaType": manifest.media_type, "digest": digest, "size": len(manifest.data),
                                "platform": entry_platform})
            digests[platform] = digest
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        index_digest = client.push_manifest(repo, tag, json.dumps(index).encode(), OCI_INDEX)
    return MultiArchImage(index_digest=index_digest, manifests=digests)
