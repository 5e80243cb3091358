"""No secret ever reaches any output: run everything at debug level and search."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from proxy.policy import hash_token
from tests.bao import start_bao
from tests.origins import Origin, Request, Reset, Step, Write
from tests.servers import proxy_config, start_proxy, start_sandbox
from tests.waiting import eventually

POLICY = 'path "secret/data/publer/api" { capabilities = ["read"] }'


def test_no_secret_in_any_output_at_debug_level(tmp_path: Path) -> None:
    """Traffic, refusals, an upstream 401 with a re-read, Vault sealed and killed, token
    renewal and AppRole login, all at debug level: no API key, Vault token, client token
    or secret id appears in stdout, stderr, a log line, an error body or check's output;
    the masked key does appear."""
    api_key = "pk_leak_" + secrets.token_hex(20)
    rotated_key = "pk_leak_rotated_" + secrets.token_hex(20)
    client_token = "client-" + secrets.token_hex(16)
    vault = start_bao(tmp_path / "bao")
    sandbox = start_sandbox(tmp_path / "sandbox", api_key)
    root = vault.client()
    vault.write_key("publer/api", api_key)
    root.sys.create_or_update_policy("proxy", POLICY)
    root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle(
        "proxy", token_policies=["proxy"], token_ttl="3s", token_max_ttl="6s"
    )
    role_id = root.auth.approle.read_role_id("proxy")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("proxy")["data"]["secret_id"]
    child = root.auth.token.create(policies=["proxy"], ttl="3s", renewable=True)
    child_token = child["auth"]["client_token"]
    (tmp_path / "secret-id").write_text(secret_id)
    (tmp_path / "token").write_text(child_token)
    known = {
        "api key": api_key,
        "rotated key": rotated_key,
        "client token": client_token,
        "secret id": secret_id,
        "child token": child_token,
        "root token": vault.root_token,
    }

    routes: list[dict[str, Any]] = [
        {
            "name": "default",
            "credential": "publer",
            "workspace_id": "5f8d7a62c9e77e001f36e3a1",
            "scopes": ["posts", "users"],
        },
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "workspace_id": "5f8d7a62c9e77e001f36e3a1",
            "scopes": ["posts"],
            "clients": [{"name": "app", "token_sha256": hash_token(client_token)}],
        },
    ]
    approle = proxy_config(
        vault.url,
        sandbox.url,
        routes=routes,
        credential={"refresh_seconds": 1, "max_stale_seconds": 2},
    )
    approle["vault"]["auth"] = {
        "method": "approle",
        "role_id": role_id,
        "secret_id_file": str(tmp_path / "secret-id"),
    }
    by_token = proxy_config(
        vault.url,
        sandbox.url,
        token_file=tmp_path / "token",
        routes=routes,
        credential={"refresh_seconds": 1},
    )
    outputs: dict[str, str] = {}
    bodies: list[str] = []
    proxies = [
        start_proxy(tmp_path / "approle", approle),
        start_proxy(tmp_path / "token-auth", by_token),
    ]
    try:
        for proxy in proxies:
            for path, headers in [
                ("/api/v1/posts", {"Authorization": f"Bearer-API {client_token}"}),
                ("/team/api/v1/posts", {"Authorization": f"Bearer-API {client_token}"}),
                ("/team/api/v1/posts", {"Authorization": f"Bearer {client_token}x"}),
                ("/api/v1/analytics/charts", {}),
                ("/api/v1/%2e%2e/admin", {}),
                ("/api/v1/nope", {"Authorization": f"Bearer-API {api_key}"}),
                ("/elsewhere", {}),
                ("/readyz", {}),
                ("/metrics", {}),
            ]:
                answer = httpx.get(f"{proxy.url}{path}", headers=headers)
                bodies.append(answer.text + str(answer.headers))
        # Publer starts rejecting the key: 401, one re-read, the new key.
        sandbox.set_keys({"key": rotated_key})
        vault.write_key("publer/api", rotated_key)
        for proxy in proxies:
            answer = httpx.post(f"{proxy.url}/api/v1/posts", json={"text": api_key})
            bodies.append(answer.text + str(answer.headers))
        time.sleep(4)  # token renewals and AppRole re-logins happen
        vault.seal()
        time.sleep(1.5)
        vault.stop()
        # The AppRole proxy's key expires (max_stale_seconds 2): 503s with reasons.
        eventually(lambda: httpx.get(f"{proxies[0].url}/api/v1/posts").status_code == 503)
        for proxy in proxies:
            for path in ("/api/v1/posts", "/readyz"):
                answer = httpx.get(f"{proxy.url}{path}")
                bodies.append(answer.text + str(answer.headers))
        check = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "check",
                "--online",
                "--config",
                str(proxies[0].config_path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        outputs["check --online"] = check.stdout + check.stderr
    finally:
        for number, proxy in enumerate(proxies):
            assert proxy.stop() == 0
            outputs[f"proxy {number}"] = proxy.output()
        sandbox.stop()
        vault.stop()
    outputs["answers"] = "\n".join(bodies)
    for where, text in outputs.items():
        for what, value in known.items():
            assert value not in text, f"the {what} appears in {where}"
    everything = "\n".join(outputs.values())
    assert "***" + api_key[-4:] in everything
    assert "***" + rotated_key[-4:] in everything
    assert '"level":"debug"' in outputs["proxy 0"]
    assert "credential_unavailable" in outputs["answers"]


def _echo_key(request: Request) -> list[Step]:
    """An origin that puts the Authorization it got into responses HTTP does not allow."""
    key = request.headers.get("authorization", "").encode()
    case = request.query.get("case")
    if case == "status":
        return [Write(b"HTTP/1.1 600 " + key + b"\r\nContent-Length: 0\r\n\r\n")]
    if case == "status-line":
        return [Write(b"XTTP/1.1 200 " + key + b"\r\n\r\n")]
    if case == "control":
        return [Write(b"HTTP/1.1 200 OK\r\nX-Echo: " + key + b"\x01\r\nContent-Length: 0\r\n\r\n")]
    if case == "switch":
        return [Write(b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nX-Echo: " + key + b"\r\n\r\n")]
    if case == "field":
        return [Write(b"HTTP/1.1 200 OK\r\nX-Echo: " + key * 400 + b"\r\n\r\n")]
    return [Write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + key[:20]), Reset()]


def test_no_key_in_any_output_when_the_origin_echoes_it_in_broken_responses(
    tmp_path: Path,
) -> None:
    """An origin that echoes the key inside responses the hop refuses (a status of 600, a
    garbage status line, control bytes, a 101, a header field over the limit, a body cut
    by a reset), at debug level: the key is in no log line and in no response."""
    api_key = "pk_leak_" + secrets.token_hex(20)
    vault = start_bao(tmp_path / "bao")
    vault.write_key("publer/api", api_key)
    (tmp_path / "token").write_text(vault.root_token)
    with Origin(_echo_key) as origin:
        config = proxy_config(origin.url, origin.url, token_file=tmp_path / "token")
        config["vault"]["url"] = vault.url
        config["upstream"] = {"url": origin.url, "retries": 1}
        proxy = start_proxy(tmp_path / "proxy", config)
        bodies = []
        try:
            for case in ("status", "status-line", "control", "switch", "field", "cut"):
                try:
                    answer = httpx.get(f"{proxy.url}/api/v1/posts?case={case}", timeout=10)
                    bodies.append(answer.text + str(answer.headers))
                except httpx.HTTPError as exc:
                    bodies.append(repr(exc))
        finally:
            proxy.stop()
            vault.stop()
    assert len(origin.requests) >= 6  # every case reached the origin with the key
    output = proxy.output()
    assert '"level":"debug"' in output
    assert "upstream_unreachable" in "\n".join(bodies)
    for where, text in (("the proxy's output", output), ("a response", "\n".join(bodies))):
        assert api_key not in text, f"the key appears in {where}"
