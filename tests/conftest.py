"""Shared fixtures: one OpenBao, one sandbox and a test key per session, on loopback."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bao import Bao, start_bao
from tests.peers import PROXY_VARIABLES
from tests.servers import Sandbox, start_sandbox

WORKSPACE = "5f8d7a62c9e77e001f36e3a1"

# Test requests carry keys and tokens: none may go through a proxy that the shell running
# the tests exports. A test that wants proxy variables gives them to the process it starts.
for _name in PROXY_VARIABLES:
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def api_key() -> str:
    """The Publer key of this session: random, so a leak test can search for it."""
    return "pk_test_" + secrets.token_hex(20)


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> Iterator[Bao]:
    """A real OpenBao dev server holding the key at secret/publer/api."""
    server = start_bao(tmp_path_factory.mktemp("bao"))
    server.write_key("publer/api", api_key)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_file(bao: Bao, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file holding the root token, as `vault.auth.token_file` reads it."""
    path = tmp_path_factory.mktemp("token") / "vault-token"
    path.write_text(bao.root_token + "\n")
    return path


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> Iterator[Sandbox]:
    """The Publer sandbox, accepting the session key."""
    server = start_sandbox(tmp_path_factory.mktemp("sandbox"), api_key)
    yield server
    server.stop()
