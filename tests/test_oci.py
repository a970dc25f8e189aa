"""OCI grammar and image reference parsing (chunkstore.oci)."""
from __future__ import annotations

import hashlib

import pytest

from chunkstore.oci import (
    OCI_EMPTY_DATA,
    OCI_EMPTY_DIGEST,
    ImageRef,
    InvalidReference,
    is_loopback_host,
    parse_image_ref,
    referrers_tag,
    sha256_digest,
    validate_digest,
    validate_host,
    validate_reference,
    validate_repository,
    validate_tag,
)

HEX = "a" * 64
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    "name",
    ["app", "library/app", "a/b/c", "my-app", "my--app", "my_app", "my__app", "my.app", "a0/b1.c2_d3__e4-f5", "x" * 255],
)
def test_valid_repository(name: str) -> None:
    assert validate_repository(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "", "App", "library/App", "../etc", "a/../b", "a/./b", "..", ".", "/app", "app/", "a//b", "%2e%2e/app",
        "a%2fb", "app_", "-app", "app-", "a___b", "a..b", "a b", "a\nb", "app\n", "a\\b", "a:b", "a@b", "é",
        "x" * 256, "a/" * 128 + "a",
    ],
)
def test_invalid_repository(name: str) -> None:
    with pytest.raises(InvalidReference):
        validate_repository(name)


def test_invalid_repository_message_is_truncated() -> None:
    with pytest.raises(InvalidReference) as err:
        validate_repository("A" * 10_000)
    assert len(str(err.value)) < 200 and "AAAA" in str(err.value)


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A-b_c.d", "1", "x" * 128, "sha256-" + HEX])
def test_valid_tag(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a/b", "..", "../x", "a:b", "x" * 129, "a b", "v1\n", "%2e", "é"])
def test_invalid_tag(tag: str) -> None:
    with pytest.raises(InvalidReference):
        validate_tag(tag)


@pytest.mark.parametrize("digest", [DIGEST, "sha512:" + "0" * 128])
def test_valid_digest(digest: str) -> None:
    assert validate_digest(digest) == digest


@pytest.mark.parametrize(
    "digest",
    [
        "", HEX, "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha256:" + "a" * 65, "md5:" + "a" * 32,
        "sha256:../" + "a" * 61, DIGEST + "\n", "SHA256:" + HEX, "sha512:" + "a" * 64,
    ],
)
def test_invalid_digest(digest: str) -> None:
    with pytest.raises(InvalidReference):
        validate_digest(digest)


def test_validate_reference() -> None:
    assert validate_reference("v2") == "v2"
    assert validate_reference(DIGEST) == DIGEST
    for bad in ["", "a:b", "../x", "sha256:zz", "x" * 200]:
        with pytest.raises(InvalidReference):
            validate_reference(bad)


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "localhost", "registry.example.org", "[::1]:5000", "a-b.c:443"])
def test_valid_host(host: str) -> None:
    assert validate_host(host) == host


@pytest.mark.parametrize("host", ["", "http://x", "x/y", "user@x", "x:99999", "x:", "-x", "a b", "x:80/"])
def test_invalid_host(host: str) -> None:
    with pytest.raises(InvalidReference):
        validate_host(host)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:5000/library/app:v2", ImageRef("127.0.0.1:5000", "library/app", "v2", None)),
        ("127.0.0.1:5000/app", ImageRef("127.0.0.1:5000", "app", "latest", None)),
        (f"127.0.0.1:5000/app@{DIGEST}", ImageRef("127.0.0.1:5000", "app", None, DIGEST)),
        (f"127.0.0.1:5000/a/b:v1@{DIGEST}", ImageRef("127.0.0.1:5000", "a/b", "v1", DIGEST)),
        ("localhost/app:1", ImageRef("localhost", "app", "1", None)),
        ("localhost:5000/app", ImageRef("localhost:5000", "app", "latest", None)),
        ("ubuntu", ImageRef("docker.io", "library/ubuntu", "latest", None)),
        ("ubuntu:22.04", ImageRef("docker.io", "library/ubuntu", "22.04", None)),
        ("user/app:v1", ImageRef("docker.io", "user/app", "v1", None)),
        ("ghcr.io/org/app:v1", ImageRef("ghcr.io", "org/app", "v1", None)),
        ("[::1]:5000/app:v1", ImageRef("[::1]:5000", "app", "v1", None)),
    ],
)
def test_parse_image_ref(text: str, expected: ImageRef) -> None:
    assert parse_image_ref(text) == expected


def test_image_ref_reference_and_str() -> None:
    ref = parse_image_ref(f"127.0.0.1:5000/a/b:v1@{DIGEST}")
    assert ref.reference == DIGEST
    assert str(ref) == f"127.0.0.1:5000/a/b:v1@{DIGEST}"
    assert parse_image_ref("127.0.0.1:5000/a:v1").reference == "v1"


@pytest.mark.parametrize(
    "text",
    [
        "", "127.0.0.1:5000/", "127.0.0.1:5000/App", "127.0.0.1:5000/a/../b", "127.0.0.1:5000/app:", "app@sha256:x",
        "127.0.0.1:5000/app:bad/tag", "Upper/app", "host.io/" + "a" * 250, "app:v1:v2", "127.0.0.1:5000/%2e%2e/x",
    ],
)
def test_parse_image_ref_rejects(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_image_ref(text)


@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "127.0.0.1", "127.1.2.3:80", "::1", "[::1]:5000"])
def test_loopback(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["docker.io", "10.0.0.1:5000", "128.0.0.1", "localhost.example.com", "[::2]:1"])
def test_not_loopback(host: str) -> None:
    assert not is_loopback_host(host)


def test_digests() -> None:
    assert sha256_digest(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert sha256_digest(OCI_EMPTY_DATA) == OCI_EMPTY_DIGEST
    assert referrers_tag(DIGEST) == f"sha256-{HEX}"
    assert referrers_tag("sha512:" + "b" * 128) == "sha512-" + "b" * 64
