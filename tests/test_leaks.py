"""No secret ever reaches any output: run everything at debug level and search."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from proxy.policy import hash_token
from tests.bao import free_port, start_bao
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


def test_no_secret_in_the_dev_stack_output(tmp_path: Path) -> None:
    """`publer-proxy dev` with a key of one's own (PUBLER_API_KEY, to a sandbox that takes
    it): while clients call both routes, nothing it prints holds the key, the OpenBao root
    token or the client token, only the files that hold them and the masked key."""
    api_key = "pk_leak_" + secrets.token_hex(20)
    sandbox = start_sandbox(tmp_path / "sandbox", api_key)
    port = free_port()
    log_path = tmp_path / "dev.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["PUBLER_API_KEY"] = api_key
    args = [sys.executable, "-m", "proxy", "dev", "--port", str(port), "--upstream", sandbox.url]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: "Ctrl-C stops" in log_path.read_text(), timeout=60)
        files = dict(re.findall(r"(\w+)=\$\(cat (\S+)\)", log_path.read_text()))
        client_token = Path(files["CLIENT_TOKEN"]).read_text()
        root_token = Path(files["VAULT_TOKEN"]).read_text()
        bodies, statuses = [], []
        for path, token in [
            ("/api/v1/users/me", None),
            ("/posting/api/v1/posts", client_token),
            ("/posting/api/v1/posts", client_token + "x"),
            ("/posting/api/v1/analytics/charts", client_token),
        ]:
            headers = {"Authorization": f"Bearer-API {token}"} if token else {}
            response = httpx.get(f"{url}{path}", headers=headers, trust_env=False)
            bodies.append(response.text + str(response.headers))
            statuses.append(response.status_code)
        assert statuses == [200, 200, 401, 403], bodies
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        sandbox.stop()
    printed = log_path.read_text() + "\n".join(bodies)
    for what, value in [("key", api_key), ("root token", root_token), ("client", client_token)]:
        assert value not in printed, f"the {what} appears in what dev printed or sent"
    assert "***" + api_key[-4:] in printed
