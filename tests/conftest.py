"""Shared fixtures: real `docker-registry` processes (anonymous and htpasswd), started once per session.

Helpers that build and push images live in tests/helpers.py.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import USERS, Registry, start_registry as _start_registry

StartRegistry = Callable[..., Registry]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="the long reliability runs: hundreds of faults, tens of thousands of fuzz cases "
                          "(docs/RELIABILITY.md)")


def pytest_configure(config: pytest.Config) -> None:
    # Before test modules are imported, so their trial and example counts (tests/soak.py) can depend on it.
    if config.getoption("--soak"):
        os.environ["CHUNKSYNC_SOAK"] = "1"


@pytest.fixture(scope="session")
def start_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartRegistry]:
    """Factory: `start_registry(notify_url=None, htpasswd=None)` starts a fresh registry with its own storage.

    `htpasswd` is a {user: password} dict (pass `helpers.USERS` for alice/bob). Every registry started is
    stopped at the end of the session; call `.stop()` sooner if a test wants to.
    """
    started: list[Registry] = []

    def start(notify_url: str | None = None, htpasswd: dict[str, str] | None = None) -> Registry:
        workdir: Path = tmp_path_factory.mktemp("registry")
        registry = _start_registry(workdir, notify_url=notify_url, users=htpasswd)
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


@pytest.fixture(scope="session")
def registry(start_registry: StartRegistry) -> Registry:
    """An anonymous registry shared by the whole session: use a repository name unique to your test."""
    return start_registry()


@pytest.fixture(scope="session")
def auth_registry(start_registry: StartRegistry) -> Registry:
    """A registry with htpasswd auth: users alice/secret1 and bob/secret2 (`helpers.USERS`)."""
    return start_registry(htpasswd=dict(USERS))
