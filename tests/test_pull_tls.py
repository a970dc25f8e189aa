"""A pull from a registry that speaks only HTTPS, with a certificate of its own: the device and the server verify
it against the CA file they are given (SSL_CERT_FILE), and a device that does not trust it learns why.

The registry is reached by this machine's host name (else the address of its default route), which the client
does not treat as loopback (those get plain HTTP, as docker does), so every request to it goes over TLS."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Registry, make_tls_cert, start_registry
from pull_tools import ImagePair, pull, pull_env, push_pair, skopeo_config_digest
from server_process import ServerProcess


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Path]]:
    workdir = tmp_path_factory.mktemp("tls-registry")
    tls = make_tls_cert(workdir)
    if tls is None:
        pytest.fail("this machine has neither a host name that resolves nor a default route: the HTTPS registry "
                    "has no non-loopback name to serve under")
    registry = start_registry(workdir, tls=tls)
    yield registry, tls.cert
    registry.stop()


@pytest.fixture(scope="module")
def tls_pair(tls_registry: tuple[Registry, Path], tmp_path_factory: pytest.TempPathFactory) -> ImagePair:
    return push_pair(tmp_path_factory.mktemp("tls-img"), tls_registry[0], "tls/app", 400_000, 100_000)


@pytest.fixture(scope="module")
def tls_server(tls_registry: tuple[Registry, Path], tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[ServerProcess]:
    registry, cert = tls_registry
    with pytest.MonkeyPatch.context() as patch:  # the server trusts the registry's certificate, the tests' devices not
        patch.setenv("SSL_CERT_FILE", str(cert))
        server = ServerProcess(registry.url, store=tmp_path_factory.mktemp("tls-server") / "store")
    try:
        yield server
    finally:
        server.stop()


def test_pull_over_https_verifies_the_registry_certificate(tls_registry: tuple[Registry, Path],
                                                           tls_pair: ImagePair, tls_server: ServerProcess,
                                                           tmp_path: Path) -> None:
    registry, cert = tls_registry
    assert registry.url.startswith("https://")
    store, layout = tmp_path / "store", tmp_path / "out"

    untrusted = pull(tls_pair.ref("v1"), tls_server.url, store, "--out", f"oci:{layout}")
    assert untrusted.returncode != 0
    # Not taken for an unreachable registry (whose tag the server would then be trusted for): a refusal that says why.
    assert "TLS certificate does not verify" in untrusted.stderr and "SSL_CERT_FILE" in untrusted.stderr, \
        untrusted.stderr
    assert "unreachable" not in untrusted.stderr and "Traceback" not in untrusted.stderr
    assert not (layout / "index.json").exists()

    trusted = pull_env(SSL_CERT_FILE=str(cert))
    first = pull(tls_pair.ref("v1"), tls_server.url, store, "--out", f"oci:{layout}", env=trusted).report
    assert first["path"] == "diff" and first["manifest_digest"] == tls_pair.digests["v1"]
    second = pull(tls_pair.ref("v2"), tls_server.url, store, "--out", f"oci:{layout}", env=trusted).report
    assert second["path"] == "diff" and second["have_images"] == 1
    assert second["manifest_digest"] == tls_pair.digests["v2"]
    assert second["config_digest"] == skopeo_config_digest(tls_pair.ref("v2"))
    assert second["bytes_received"] < 0.2 * second["full_pull_bytes"]


def test_a_server_that_does_not_trust_the_registry_says_so(tls_registry: tuple[Registry, Path],
                                                           tls_pair: ImagePair, tmp_path: Path) -> None:
    registry, cert = tls_registry
    with ServerProcess(registry.url, store=tmp_path / "server-store") as server:  # no SSL_CERT_FILE
        run = pull(tls_pair.ref("v1"), server.url, tmp_path / "store", "--out", f"oci:{tmp_path / 'out'}",
                   env=pull_env(SSL_CERT_FILE=str(cert))).report
    # The device trusts the registry and pulls plainly from it; the warning carries the server's reason.
    assert run["path"] == "fallback" and run["manifest_digest"] == tls_pair.digests["v1"]
    assert any("TLS certificate does not verify" in warning for warning in run["warnings"]), run["warnings"]
