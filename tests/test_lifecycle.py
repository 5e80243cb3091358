"""The key's life over real processes: rotation, Vault outages, AppRole, never-read keys."""

from __future__ import annotations

import concurrent.futures
import secrets
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.bao import Bao, restart_bao, start_bao
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy
from tests.waiting import eventually

POLICY = """
path "secret/data/publer/api" { capabilities = ["read"] }
"""


def draft(n: int) -> dict[str, object]:
    """The smallest create call Publer documents: one private draft, on no account."""
    networks = {"facebook": {"type": "status", "text": f"draft {n}"}}
    return {"bulk": {"state": "draft_private", "posts": [{"networks": networks}]}}


def _status(proxy: Proxy, path: str = "/api/v1/posts") -> int:
    return httpx.get(f"{proxy.url}{path}", timeout=10).status_code


def _seen_keys(sandbox: Sandbox) -> list[str]:
    return [
        value.removeprefix("Bearer-API ")
        for record in sandbox.requests()
        for name, value in record["headers"]
        if name == "authorization"
    ]


def test_rotation_is_picked_up_without_restart(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """A new KV v2 version is used after refresh_seconds, and the rotation is logged
    with both masked keys and versions."""
    path = f"rotation/{secrets.token_hex(4)}"
    old_version = bao.write_key(path, api_key)
    config = proxy_config(
        bao.url,
        sandbox.url,
        token_file=token_file,
        credential={"path": path, "refresh_seconds": 1},
    )
    proxy = start_proxy(tmp_path, config)
    try:
        new_key = "pk_rotated_" + secrets.token_hex(16)
        sandbox.set_keys({"key": api_key}, {"key": new_key})
        new_version = bao.write_key(path, new_key)
        sandbox.clear()
        eventually(lambda: _status(proxy) == 200 and _seen_keys(sandbox)[-1] == new_key)
        rotated = [e for e in proxy.events() if e.get("event") == "key_rotated"]
        assert rotated, proxy.output()[-2000:]
        assert rotated[0]["old_key"] == "***" + api_key[-4:]
        assert rotated[0]["key"] == "***" + new_key[-4:]
        assert (rotated[0]["old_version"], rotated[0]["key_version"]) == (old_version, new_version)
        assert proxy.stop() == 0
    finally:
        proxy.stop()
        sandbox.set_keys({"key": api_key})


def _proxy_on_own_vault(
    tmp_path: Path, sandbox: Sandbox, api_key: str, *, max_stale_seconds: float
) -> tuple[Bao, Proxy]:
    """A Vault of the test's own (to break it) and a proxy refreshing from it every second."""
    vault = start_bao(tmp_path / "bao")
    vault.write_key("publer/api", api_key)
    token = tmp_path / "token"
    token.write_text(vault.root_token)
    credential = {"refresh_seconds": 1, "max_stale_seconds": max_stale_seconds}
    config = proxy_config(vault.url, sandbox.url, token_file=token, credential=credential)
    return vault, start_proxy(tmp_path / "proxy", config)


def _credential_state(proxy: Proxy) -> str:
    state: str = httpx.get(f"{proxy.url}/readyz").json()["credentials"]["publer"]["state"]
    return state


def test_vault_killed_stale_key_then_503_then_recovery(
    tmp_path: Path, sandbox: Sandbox, api_key: str
) -> None:
    """With Vault down the held key serves (readyz 200, stale with a reason) until
    max_stale_seconds, then 503 credential_unavailable; Vault back means recovery."""
    # Long enough that the stale-but-serving checks below fit in it on a loaded machine.
    vault, proxy = _proxy_on_own_vault(tmp_path, sandbox, api_key, max_stale_seconds=12)
    try:
        assert _status(proxy) == 200
        vault.stop()
        eventually(lambda: _credential_state(proxy) == "stale")
        ready = httpx.get(f"{proxy.url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["credentials"]["publer"]["reason"]
        assert _status(proxy) == 200
        eventually(lambda: _status(proxy) == 503, timeout=60)
        refused = httpx.get(f"{proxy.url}/api/v1/posts")
        assert refused.json()["code"] == "credential_unavailable"
        assert refused.headers["x-publer-proxy-error"] == "credential_unavailable"
        assert httpx.get(f"{proxy.url}/readyz").status_code == 503
        vault = restart_bao(vault)
        vault.write_key("publer/api", api_key)
        eventually(lambda: _status(proxy) == 200, timeout=60)
        assert httpx.get(f"{proxy.url}/readyz").json()["status"] == "ready"
    finally:
        proxy.stop()
        vault.stop()


def test_vault_sealed_mid_traffic(tmp_path: Path, sandbox: Sandbox, api_key: str) -> None:
    """A sealed Vault is an outage like any other: the held key keeps serving, readyz
    names the reason, and unsealing heals it."""
    vault, proxy = _proxy_on_own_vault(tmp_path, sandbox, api_key, max_stale_seconds=60)
    try:
        vault.seal()
        eventually(lambda: _credential_state(proxy) == "stale")
        reason = httpx.get(f"{proxy.url}/readyz").json()["credentials"]["publer"]["reason"]
        assert "sealed" in reason
        assert all(_status(proxy) == 200 for _ in range(10))
        vault.unseal()
        eventually(lambda: httpx.get(f"{proxy.url}/readyz").json()["status"] == "ready")
    finally:
        proxy.stop()
        vault.stop()


def test_key_never_read_is_503_and_nothing_forwarded(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A key that was never read: 503 from the first request, readyz 503, nothing sent."""
    config = proxy_config(
        bao.url, sandbox.url, token_file=token_file, credential={"path": "does/not/exist"}
    )
    proxy = start_proxy(tmp_path, config, wait_ready=False)
    try:
        sandbox.clear()
        answer = httpx.get(f"{proxy.url}/api/v1/posts")
        assert answer.status_code == 503
        assert answer.json()["code"] == "credential_unavailable"
        ready = httpx.get(f"{proxy.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["credentials"]["publer"]["state"] == "missing"
        assert sandbox.requests() == []
    finally:
        proxy.stop()


def test_approle_login_serves_traffic(
    tmp_path: Path, bao: Bao, sandbox: Sandbox, api_key: str
) -> None:
    """AppRole with a least-privilege policy: the proxy logs in, renews and forwards."""
    root = bao.client()
    if "approle/" not in root.sys.list_auth_methods():
        root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy("publer-proxy-test", POLICY)
    root.auth.approle.create_or_update_approle(
        "publer-proxy-test",
        token_policies=["publer-proxy-test"],
        token_ttl="3s",
        token_max_ttl="8s",
    )
    role_id = root.auth.approle.read_role_id("publer-proxy-test")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("publer-proxy-test")["data"]["secret_id"]
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id)
    config = proxy_config(bao.url, sandbox.url, credential={"refresh_seconds": 1})
    config["vault"]["auth"] = {
        "method": "approle",
        "role_id": role_id,
        "secret_id_file": str(secret_file),
    }
    proxy = start_proxy(tmp_path / "proxy", config)
    try:

        def read_after_relogin() -> bool:
            names = [e.get("event") for e in proxy.events()]
            return (
                "vault_token_relogin" in names
                and "key_read" in names[names.index("vault_token_relogin") :]
            )

        # Serving all along until, past the token's max TTL, the proxy logged in again and
        # read the key with the new token.
        deadline = time.monotonic() + 60
        while not read_after_relogin():
            assert time.monotonic() < deadline, "no re-login and key read within 60 s"
            assert _status(proxy) == 200
            time.sleep(0.5)  # the pace of the probing requests
        assert _status(proxy) == 200
        assert httpx.get(f"{proxy.url}/readyz").json()["status"] == "ready"
        assert secret_id not in proxy.output()
    finally:
        proxy.stop()


def test_upstream_401_rereads_once_and_no_client_sees_it(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """Rotate the key in Vault and make Publer accept only the new one while 20 clients
    send traffic: no client sees a 401, and the re-read is shared."""
    path = f"f7/{secrets.token_hex(4)}"
    bao.write_key(path, api_key)
    config = proxy_config(
        bao.url,
        sandbox.url,
        token_file=token_file,
        credential={"path": path, "refresh_seconds": 3600},
    )
    proxy = start_proxy(tmp_path, config)
    new_key = "pk_f7_" + secrets.token_hex(16)
    try:
        statuses: list[int] = []
        answered: list[int] = []
        rotated = threading.Event()

        def client(n: int) -> list[int]:
            found = []
            with httpx.Client(timeout=30) as session:
                for i in range(15):
                    if i == 5:  # the rest is sent once the key was rotated
                        rotated.wait(60)
                    if i % 2:
                        found.append(session.get(f"{proxy.url}/api/v1/posts").status_code)
                    else:
                        answer = session.post(f"{proxy.url}/api/v1/posts", json=draft(n))
                        found.append(answer.status_code)
                    answered.append(n)
            return found

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(client, n) for n in range(20)]
            eventually(lambda: len(answered) >= 20, timeout=60)  # the traffic flows
            bao.write_key(path, new_key)
            sandbox.set_keys({"key": new_key})
            rotated.set()
            for future in futures:
                statuses += future.result()
        assert 401 not in statuses
        assert set(statuses) <= {200, 202}
        reads = [e for e in proxy.events() if e.get("event") == "key_rotated"]
        assert len(reads) == 1
    finally:
        proxy.stop()
        sandbox.set_keys({"key": api_key})


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_idempotent_retries_only(
    tmp_path_factory: pytest.TempPathFactory,
    bao: Bao,
    token_file: Path,
    sandbox: Sandbox,
    method: str,
) -> None:
    """GET is retried on 503 and on a dropped connection; POST never is."""
    proxy = start_proxy(
        tmp_path_factory.mktemp("retry"),
        proxy_config(bao.url, sandbox.url, token_file=token_file),
    )
    try:
        for fault in ({"status": 503, "count": 2}, {"drop": True, "count": 1}):
            sandbox.clear()
            sandbox.fault(**fault)
            answer = httpx.request(
                method, f"{proxy.url}/api/v1/posts", json={} if method == "POST" else None
            )
            attempts = len(sandbox.requests())
            if method == "GET":
                assert answer.status_code == 200
                assert attempts == fault["count"] + 1
            else:
                assert answer.status_code in (502, 503)
                assert attempts == 1
            sandbox.fault(count=0)
    finally:
        proxy.stop()
