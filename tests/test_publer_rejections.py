"""Publer's 401 and 403 through the real proxy, as documented and as the live API answers.

The live API answers a wrong or revoked key 403 "Invalid API key or not active for this
account." and a workspace problem 401 "You don't have access on this workspace"; the docs
say the reverse. The proxy decides from status and message together: it re-reads the key
only when the key was rejected, and its hint names the cause either way.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.bao import Bao
from tests.servers import Sandbox, proxy_config, start_proxy, start_sandbox
from tests.waiting import eventually

MODES = ["docs", "live"]
KEY_STATUS = {"docs": 401, "live": 403}
WORKSPACE_STATUS = {"docs": 403, "live": 401}


@pytest.fixture(scope="module", params=MODES)
def modes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Sandbox]]:
    """A sandbox answering 401/403 the documented way, then the live way."""
    mode: str = request.param
    server = start_sandbox(
        tmp_path_factory.mktemp(f"publer-{mode}"), "placeholder-key", auth_errors=mode
    )
    yield mode, server
    server.stop()


# The smallest create call Publer documents: one private draft, on no account.
DRAFT = {"bulk": {"state": "draft_private", "posts": [{"networks": {"facebook": {"text": "x"}}}]}}


def test_rejected_key_is_reread_once_and_the_client_never_sees_it(
    tmp_path: Path, bao: Bao, token_file: Path, modes: tuple[str, Sandbox]
) -> None:
    """The key was rotated in Vault and Publer now rejects the old one (401 by the docs,
    403 live): the proxy re-reads the key once and replays; the client gets 200."""
    _, publer = modes
    path = f"rejected/{secrets.token_hex(4)}"
    old_key, new_key = "pk_old_" + secrets.token_hex(12), "pk_new_" + secrets.token_hex(12)
    bao.write_key(path, old_key)
    publer.set_keys({"key": old_key})
    config = proxy_config(
        bao.url,
        publer.url,
        token_file=token_file,
        credential={"path": path, "refresh_seconds": 3600},
    )
    proxy = start_proxy(tmp_path, config)
    try:
        bao.write_key(path, new_key)
        publer.set_keys({"key": new_key})
        publer.clear()
        answer = httpx.post(f"{proxy.url}/api/v1/posts", json=DRAFT)
        assert answer.status_code == 200, answer.text
        sent = [dict(r["headers"])["authorization"] for r in publer.requests()]
        assert sent == [f"Bearer-API {old_key}", f"Bearer-API {new_key}"]
        eventually(lambda: any(e.get("event") == "key_rotated" for e in proxy.events()))
    finally:
        proxy.stop()


def test_rejected_workspace_is_not_a_key_problem(
    tmp_path: Path,
    bao: Bao,
    token_file: Path,
    modes: tuple[str, Sandbox],
    api_key: str,
) -> None:
    """A workspace the key cannot use (403 by the docs, 401 live) passes through once,
    with no re-read of the key, and the hint names the workspace, not the key."""
    mode, publer = modes
    path = f"workspace/{secrets.token_hex(4)}"
    bao.write_key(path, api_key)
    publer.set_keys({"key": api_key, "workspaces": ["aaaaaaaaaaaaaaaaaaaaaaaa"]})
    config = proxy_config(bao.url, publer.url, token_file=token_file, credential={"path": path})
    proxy = start_proxy(tmp_path, config)
    try:
        publer.clear()
        answer = httpx.get(f"{proxy.url}/api/v1/posts")
        assert answer.status_code == WORKSPACE_STATUS[mode]
        assert answer.headers["x-publer-proxy-hint"].startswith("workspace rejected")
        assert "x-publer-proxy-error" not in answer.headers
        assert len(publer.requests()) == 1
        eventually(lambda: any(e.get("event") == "upstream_auth_failed" for e in proxy.events()))
        [event] = [e for e in proxy.events() if e.get("event") == "upstream_auth_failed"]
        assert event["rejected"] == "workspace"
        assert not any(e.get("event") == "key_reread_after_rejection" for e in proxy.events())
    finally:
        proxy.stop()


def test_revoked_key_is_named_as_the_key(
    tmp_path: Path,
    bao: Bao,
    token_file: Path,
    modes: tuple[str, Sandbox],
    api_key: str,
) -> None:
    """A key that stays revoked (the re-read finds the same key) reaches the client with
    Publer's own status for it and a hint that names the key."""
    mode, publer = modes
    path = f"revoked/{secrets.token_hex(4)}"
    bao.write_key(path, api_key)
    publer.set_keys({"key": api_key, "revoked": True})
    config = proxy_config(bao.url, publer.url, token_file=token_file, credential={"path": path})
    proxy = start_proxy(tmp_path, config)
    try:
        answer = httpx.get(f"{proxy.url}/api/v1/posts")
        assert answer.status_code == KEY_STATUS[mode]
        assert answer.headers["x-publer-proxy-hint"].startswith("key rejected")
        assert answer.json()["errors"]
        # A HEAD has no message to read: the status decides, and nothing waits for a body.
        head = httpx.head(f"{proxy.url}/api/v1/posts", timeout=10)
        assert head.status_code == KEY_STATUS[mode]
        assert head.headers["x-publer-proxy-hint"]
    finally:
        proxy.stop()
