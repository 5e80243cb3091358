"""No secret ever reaches any output: run everything at debug level and search."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from proxy.policy import hash_token
from tests.bao import start_bao
from tests.moto import REGION, start_moto
from tests.servers import proxy_config, start_proxy, start_sandbox
from tests.waiting import eventually

POLICY = 'path "secret/data/publer/api" { capabilities = ["read"] }'
SOURCES = ("file", "env", "aws")


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


def test_no_secret_in_any_output_for_file_env_and_aws_sources(tmp_path: Path) -> None:
    """A proxy per non-Vault source (a key file, a .env file, AWS Secrets Manager on
    moto), at debug level: traffic, refusals, rotation with Publer revoking the old key
    (401 and re-read), the file removed and AWS down until 503, and `check --online` for
    each: no API key, AWS secret access key or client token appears anywhere."""
    keys = {f"{source} key": f"pk_leak_{source}_" + secrets.token_hex(20) for source in SOURCES}
    rotated = {
        f"rotated {source} key": "pk_leak_new_" + secrets.token_hex(20) for source in SOURCES
    }
    aws_secret = "aws/" + secrets.token_hex(20)
    client_token = "client-" + secrets.token_hex(16)
    known = {**keys, **rotated, "aws secret access key": aws_secret, "client token": client_token}
    sandbox = start_sandbox(tmp_path / "sandbox", *keys.values())
    moto = start_moto(tmp_path / "moto")
    moto.create_secret("publer/api", keys["aws key"])
    key_file = tmp_path / "api_key"
    key_file.write_text(keys["file key"] + "\n")
    key_file.chmod(0o600)
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"PUBLER_API_KEY={keys['env key']}\n")
    stale = {"refresh_seconds": 1, "max_stale_seconds": 2}
    credentials: dict[str, dict[str, Any]] = {
        "file": {"source": "file", "path": str(key_file), **stale},
        "env": {"source": "env", "env_file": str(dotenv)},
        "aws": {
            "source": "aws_secrets_manager",
            "secret_id": "publer/api",
            "region": REGION,
            "endpoint_url": moto.url,
            **stale,
        },
    }
    routes: list[dict[str, Any]] = [
        {"name": "default", "credential": "publer", "scopes": ["posts", "users"]},
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "scopes": ["posts"],
            "clients": [{"name": "app", "token_sha256": hash_token(client_token)}],
        },
    ]
    aws_env = {"AWS_ACCESS_KEY_ID": "AKIALEAKTEST00000000", "AWS_SECRET_ACCESS_KEY": aws_secret}
    proxies = {}
    for source in SOURCES:
        config = proxy_config("http://127.0.0.1:9", sandbox.url, routes=routes)
        config["credentials"]["publer"] = credentials[source]
        proxies[source] = start_proxy(tmp_path / source, config, env=aws_env)
    outputs: dict[str, str] = {}
    bodies: list[str] = []
    try:
        for proxy in proxies.values():
            for path, headers in [
                ("/api/v1/posts", {"Authorization": f"Bearer-API {client_token}"}),
                ("/team/api/v1/posts", {"Authorization": f"Bearer-API {client_token}"}),
                ("/team/api/v1/posts", {"Authorization": f"Bearer {client_token}x"}),
                ("/api/v1/analytics/charts", {}),
                ("/api/v1/nope", {"Authorization": f"Bearer-API {keys['file key']}"}),
                ("/readyz", {}),
                ("/metrics", {}),
            ]:
                answer = httpx.get(f"{proxy.url}{path}", headers=headers)
                bodies.append(answer.text + str(answer.headers))
        # Rotation: the file is rewritten and AWS gets a new version; Publer drops the old keys.
        sandbox.set_keys(*({"key": key} for key in [*keys.values(), *rotated.values()]))
        key_file.write_text(rotated["rotated file key"])
        moto.rotate("publer/api", rotated["rotated aws key"])
        sandbox.set_keys(*({"key": key} for key in rotated.values()), {"key": keys["env key"]})
        for proxy in proxies.values():
            answer = httpx.post(f"{proxy.url}/api/v1/posts", json={"text": keys["aws key"]})
            bodies.append(answer.text + str(answer.headers))
        key_file.unlink()
        moto.stop()
        for source in ("file", "aws"):
            url = proxies[source].url
            eventually(lambda url=url: httpx.get(f"{url}/api/v1/posts").status_code == 503)  # type: ignore[misc]
        for proxy in proxies.values():
            for path in ("/api/v1/posts", "/readyz"):
                answer = httpx.get(f"{proxy.url}{path}")
                bodies.append(answer.text + str(answer.headers))
            config_path = str(proxy.config_path)
            check = subprocess.run(
                [sys.executable, "-m", "proxy", "check", "--online", "--config", config_path],
                capture_output=True,
                text=True,
                env={**os.environ, **aws_env, "HOME": str(tmp_path)},
                check=False,
            )
            outputs[f"check --online {proxy.config_path.name}"] = check.stdout + check.stderr
    finally:
        for source, proxy in proxies.items():
            assert proxy.stop() == 0
            outputs[f"proxy {source}"] = proxy.output()
        sandbox.stop()
        moto.stop()
    outputs["answers"] = "\n".join(bodies)
    for where, text in outputs.items():
        for what, value in known.items():
            assert value not in text, f"the {what} appears in {where}"
    everything = "\n".join(outputs.values())
    for value in [*keys.values(), rotated["rotated file key"], rotated["rotated aws key"]]:
        assert "***" + value[-4:] in everything
    assert '"level":"debug"' in outputs["proxy aws"]
    assert "credential_unavailable" in outputs["answers"]
