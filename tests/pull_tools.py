"""What the pull tests share: running `chunksync pull` as a real process, a pushed v1/v2 image pair, skopeo checks."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers import Registry, build_image, push_image, real_files, run


@dataclass
class PullRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict:
        """The --json object: the last line of stdout."""
        assert self.returncode == 0, f"pull failed ({self.returncode}):\n{self.stderr}"
        return json.loads(self.stdout.strip().splitlines()[-1])


def pull_command(image: str, server: str, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "client.cli", "pull", image, "--server", server, "--store", str(store),
            "--json", *extra]


def pull_env(**overrides: str) -> dict[str, str]:
    """The environment of a pull: no auth file from the machine leaks in unless a test sets one."""
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
    env["HOME"] = overrides.pop("HOME", env.get("HOME", "/nonexistent"))
    env.update(overrides)
    return env


def pull(image: str, server: str, store: Path, *extra: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> PullRun:
    proc = subprocess.run(pull_command(image, server, store, *extra), capture_output=True, text=True,
                          env=env or pull_env(), timeout=timeout)
    return PullRun(proc.returncode, proc.stdout, proc.stderr)


def app_files(size: int, changed: bool) -> dict[str, bytes | None]:
    """An app layer of real files; the `changed` version edits two files, adds one and removes one."""
    files: dict[str, bytes | None] = dict(real_files(size, skip=100, prefix="app/"))
    if changed:
        names = sorted(k for k in files)
        assert len(names) >= 3, "app layer too small to change"
        files[names[0]] = files[names[0]] + b"\n# patched in v2\n"  # type: ignore[operator]
        files[names[-1]] = b"# rewritten in v2\n" + files[names[-1]]  # type: ignore[operator]
        files["app/NEW_IN_V2.txt"] = b"a new file\n" * 50
        files.pop(names[len(names) // 2])
    return files


@dataclass(frozen=True)
class ImagePair:
    """v1 and v2 of one repository; v2 rebuilds both layers (new layer digests, mostly the same content)."""
    registry: Registry
    repo: str
    digests: dict[str, str]  # tag -> manifest digest

    def ref(self, tag: str) -> str:
        return f"{self.registry.host}/{self.repo}:{tag}"


def push_pair(tmp_path: Path, registry: Registry, repo: str, base_size: int = 1_500_000, app_size: int = 600_000,
              creds: str | None = None) -> ImagePair:
    base = real_files(base_size, prefix="usr/lib/")
    digests = {}
    for tag, changed in (("v1", False), ("v2", True)):
        layout = build_image(tmp_path, [base, app_files(app_size, changed)], tag, layout=tmp_path / "layout")
        digests[tag] = push_image(layout, tag, registry, repo, creds=creds)
    return ImagePair(registry, repo, digests)


def skopeo_inspect(layout: Path, tag: str) -> dict:
    return json.loads(run("skopeo", "inspect", f"oci:{layout}:{tag}"))


def skopeo_config_digest(ref: str, creds: str | None = None) -> str:
    """The config digest (image ID) of a registry image, as skopeo sees it."""
    args = ["skopeo", "inspect", "--tls-verify=false", "--raw"]
    if creds:
        args.append(f"--creds={creds}")
    manifest = json.loads(run(*args, f"docker://{ref}"))
    return manifest["config"]["digest"]


def write_auth_file(path: Path, entries: dict[str, str]) -> Path:
    """A containers-auth.json: {registry key: "user:password"}, each stored base64 as skopeo login writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    auths = {key: {"auth": base64.b64encode(value.encode()).decode()} for key, value in entries.items()}
    path.write_text(json.dumps({"auths": auths}))
    return path


def push_auth_pair(tmp_path: Path, registry: Registry, repo: str, user: str) -> tuple[ImagePair, Path]:
    """A small v1/v2 pair pushed as `user`, and an auth file holding `user`'s credentials for the registry."""
    pair = push_pair(tmp_path / "img", registry, repo, 400_000, 100_000, creds=registry.creds(user))
    return pair, write_auth_file(tmp_path / "auth.json", {registry.host: registry.creds(user)})


def _blob_ok(layout: Path, digest: str, size: int | None = None) -> bool:
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            sha.update(data)
    return "sha256:" + sha.hexdigest() == digest


def layout_images(layout: Path) -> dict[str, dict]:
    """tag -> manifest of every image the layout's index.json names, each checked completely (without skopeo,
    so it is cheap enough for hundreds of trials): manifest, config and layer blobs present and hashing to their
    digests, layers equal to the config's diff_ids. Fails the test if index.json names an image it does not hold;
    a layout without index.json holds nothing ({})."""
    index_path = layout / "index.json"
    if not index_path.exists():
        return {}
    images = {}
    for entry in json.loads(index_path.read_text())["manifests"]:
        tag = entry.get("annotations", {}).get("org.opencontainers.image.ref.name")
        assert _blob_ok(layout, entry["digest"], entry["size"]), f"{layout}: manifest of {tag} missing or damaged"
        manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_bytes())
        config_desc = manifest["config"]
        assert _blob_ok(layout, config_desc["digest"], config_desc["size"]), f"{layout}: config of {tag} is bad"
        config = json.loads((layout / "blobs" / "sha256" / config_desc["digest"].split(":")[1]).read_bytes())
        layers = [layer["digest"] for layer in manifest["layers"]]
        assert layers == config["rootfs"]["diff_ids"], f"{layout}: layers of {tag} are not its diff_ids"
        for layer in manifest["layers"]:
            assert _blob_ok(layout, layer["digest"], layer["size"]), f"{layout}: layer {layer['digest']} of {tag}"
        images[tag] = manifest
    return images
