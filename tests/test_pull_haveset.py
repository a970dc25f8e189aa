"""The device's have-set (client.haveset) and credential lookup (client.auth), against a real LocalStore and
real auth files."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from chunkstore.index import ImageIndex, LayerIndex, chunk_id
from chunkstore.store import LocalStore
from client.auth import AuthFileError, find_credentials
from client.haveset import build_have_set
from pull_tools import write_auth_file

DIGESTS = [f"sha256:{i:064x}" for i in range(1, 5)]


def _record(store: LocalStore, repository: str, digest: str, payloads: list[bytes], complete: bool) -> set[bytes]:
    layer = LayerIndex("application/vnd.oci.image.layer.v1.tar", DIGESTS[0], 1, DIGESTS[0], 0)
    layer.runs.extend((0, sum(map(len, payloads))))
    for data in payloads:
        layer.chunks.append(chunk_id(data), len(data))
    layer.runs.extend((0, 0))
    layer.uncompressed_size = sum(map(len, payloads))
    store.put_many((chunk_id(d), d) for d in payloads)
    store.put_image(repository, digest, ImageIndex(digest, [layer]).encode(), complete=complete)
    return {chunk_id(d) for d in payloads}


def test_named_images_exact_others_in_the_bloom(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _record(store, "other/repo", DIGESTS[0], [b"a" * 100, b"b" * 100], complete=True)
    same_repo = _record(store, "app", DIGESTS[1], [b"c" * 100], complete=True)
    partial = _record(store, "app", DIGESTS[2], [b"d" * 100, b"e" * 100], complete=False)
    have = build_have_set(store, "app", fp_rate=0.01)
    assert have.images == [("app", DIGESTS[1]), ("other/repo", DIGESTS[0])]  # same repository first
    assert have.bloom_ids == len(partial) and have.bloom is not None and have.bloom_bytes == len(have.bloom.bits)
    assert all(cid in have.bloom for cid in partial)
    # The image being pulled is never named; its chunks then count as "other" ids.
    target = build_have_set(store, "app", target=DIGESTS[1])
    assert ("app", DIGESTS[1]) not in target.images and target.bloom_ids == len(partial) + len(same_repo)


def test_empty_store_sends_nothing(tmp_path: Path) -> None:
    have = build_have_set(LocalStore(tmp_path / "store"), "app")
    assert have.images == [] and have.bloom is None and have.bloom_bytes == 0


def test_credentials_in_skopeo_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert find_credentials("reg.example:5000", "team/app") is None
    write_auth_file(tmp_path / "home/.docker/config.json", {"https://reg.example:5000/v1/": "docker:d"})
    assert find_credentials("reg.example:5000", "team/app").username == "docker"
    write_auth_file(tmp_path / "run/containers/auth.json", {"reg.example:5000": "runtime:r",
                                                       "reg.example:5000/team/app": "narrow:n"})
    found = find_credentials("reg.example:5000", "team/app")
    assert (found.username, found.password) == ("narrow", "n")  # most specific key wins
    assert find_credentials("reg.example:5000", "team/other").username == "runtime"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(write_auth_file(tmp_path / "explicit.json", {"reg.example:5000": "e:p:q"})))
    assert find_credentials("reg.example:5000", "team/app").password == "p:q"
    assert find_credentials("reg.example:5000", "x", creds="flag:f").source == "--creds"
    assert find_credentials("reg.example:5000", "x", username="u", password="p").basic() == \
        "Basic " + base64.b64encode(b"u:p").decode()


def test_broken_auth_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text("{not json")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(bad))
    with pytest.raises(AuthFileError, match="not a JSON object"):
        find_credentials("reg.example", "app")
    bad.write_text(json.dumps({"auths": {"reg.example": {"auth": "***"}}}))
    with pytest.raises(AuthFileError, match="base64"):
        find_credentials("reg.example", "app")
