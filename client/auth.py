"""Registry credentials for a pull: from flags, or from the auth files skopeo and docker read, in their order."""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path


class AuthFileError(ValueError):
    """An auth file that exists but cannot be used."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # where they came from, for messages ("--creds", a file path)

    def basic(self) -> str:
        """The `Authorization` header value, as forwarded to the chunksync server."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def auth_file_paths() -> list[Path]:
    """The files containers/image (skopeo, podman) consults, first match wins; docker's config last."""
    paths = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        paths.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    paths.append(Path.home() / ".docker" / "config.json")
    return paths


def parse_creds(text: str) -> tuple[str, str]:
    """`USER:PASSWORD` as skopeo's --creds takes it (the password may contain ':')."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ValueError("--creds wants USERNAME:PASSWORD")
    return user, password


def _keys_for(registry: str, repository: str) -> list[str]:
    # Most specific first, as containers-auth.json(5) says: host/ns/repo, host/ns, host.
    parts = repository.split("/")
    keys = [f"{registry}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + [registry]
    if registry == "docker.io":
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    return keys


def _normalise(key: str) -> str:
    # docker writes "https://host/v1/" style keys; match them by host (and path) only.
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
    return key.rstrip("/").removesuffix("/v1").removesuffix("/v2")


def lookup(path: Path, registry: str, repository: str) -> Credentials | None:
    """Credentials for `registry`/`repository` in one auth file, or None when it has none (or does not exist)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc.strerror}") from None
    try:
        auths = json.loads(text).get("auths") or {}
    except (ValueError, AttributeError):
        raise AuthFileError(f"auth file {path} is not a JSON object with 'auths'; fix or remove it") from None
    by_key = {_normalise(key): entry for key, entry in auths.items() if isinstance(entry, dict)}
    for key in _keys_for(registry, repository):
        entry = by_key.get(_normalise(key))
        if entry is None or not entry.get("auth"):
            continue
        try:
            user, password = parse_creds(base64.b64decode(entry["auth"], validate=True).decode())
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise AuthFileError(f"auth file {path}: entry {key!r} is not base64 of USER:PASSWORD") from None
        return Credentials(user, password, str(path))
    return None


def find_credentials(registry: str, repository: str, *, username: str | None = None, password: str | None = None,
                     creds: str | None = None) -> Credentials | None:
    """Flags first (`--username/--password` or `--creds`), then the auth files; None means anonymous."""
    if creds is not None:
        user, secret = parse_creds(creds)
        return Credentials(user, secret, "--creds")
    if username is not None:
        return Credentials(username, password or "", "--username")
    for path in auth_file_paths():
        found = lookup(path, registry, repository)
        if found is not None:
            return found
    return None
