"""Keys in Azure Key Vault, against the Key Vault and Entra ID stand-in as a process.

The proxy reaches the stand-in by the real names (https://publer.vault.azure.net,
https://login.microsoftonline.com) through `connect_to`, with TLS verified against the
stand-in's CA and the SDK's challenge-resource check on: nothing is turned off.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.config.settings import AzureCredentialSettings, ConfigError, parse_settings
from proxy.dev.azure_standin import TENANT, StandIn, start_standin
from proxy.keys.sources import sdk_problems
from proxy.keys.sources.azure import AzureKeySource, cloud_authority
from proxy.keys.sources.base import SourceError
from proxy.masking.secrets import SecretRegistry
from tests.peers import recording_listener
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy
from tests.test_devstack import REPO, alive, descendants, wait_ready
from tests.waiting import eventually

CLIENT_ID = "publer-proxy-test"
VAULT = "https://publer.vault.azure.net"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    """One stand-in for the tests that do not break it."""
    server = start_standin(tmp_path_factory.mktemp("azure"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client_secret_file(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registered application's client secret, in a 0600 file."""
    secret = "cs-" + secrets.token_urlsafe(24)
    standin.add_client(CLIENT_ID, secret)
    path = tmp_path_factory.mktemp("identity") / "client-secret"
    path.touch(0o600)
    path.write_text(secret)
    return path


def azure_credential(
    standin: StandIn, name: str, secret_file: Path | None, **extra: Any
) -> dict[str, Any]:
    """The config of a credential in the stand-in, refreshed every second."""
    identity: dict[str, Any] = {"type": "managed_identity"}
    if secret_file is not None:
        identity = {
            "type": "client_secret",
            "tenant_id": TENANT,
            "client_id": CLIENT_ID,
            "client_secret_file": str(secret_file),
        }
    return {
        "source": "azure_key_vault",
        "vault_url": VAULT,
        "secret_name": name,
        "connect_to": standin.connect_to,
        "ca_file": str(standin.ca),
        "credential": identity,
        "refresh_seconds": 1,
        **extra,
    }


def azure_proxy(
    workdir: Path,
    standin: StandIn,
    sandbox: Sandbox,
    name: str,
    secret_file: Path | None,
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    **extra: Any,
) -> Proxy:
    """A proxy whose one credential is `name` in the stand-in (its Vault settings unused)."""
    config = proxy_config("http://127.0.0.1:9", sandbox.url)
    config["credentials"]["publer"] = azure_credential(standin, name, secret_file, **extra)
    return start_proxy(workdir, config, env=env, wait_ready=wait_ready)


def source(standin: StandIn, name: str, secret_file: Path | None, **extra: Any) -> AzureKeySource:
    """The source alone, in this process."""
    settings = AzureCredentialSettings.model_validate(
        azure_credential(standin, name, secret_file, **extra)
    )
    return AzureKeySource(settings, SecretRegistry())


def _seen_keys(sandbox: Sandbox) -> list[str]:
    return [
        value.removeprefix("Bearer-API ")
        for record in sandbox.requests()
        for name, value in record["headers"]
        if name == "authorization"
    ]


def _readyz(proxy: Proxy) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{proxy.url}/readyz").json()["credentials"]["publer"]
    return body


def _vault_reads(standin: StandIn, name: str) -> list[dict[str, Any]]:
    return [s for s in standin.seen() if s["kind"] == "vault" and f"/{name}/" in s["path"] + "/"]


def _fresh_name() -> str:
    return f"publer-{secrets.token_hex(4)}"


def test_reads_the_latest_version_through_the_challenge(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """The first request carries no token, the 401 challenge names tenant and resource,
    the client secret gets one token that later reads reuse; the latest version's value
    is injected, /readyz names the source, version and identity, the start log says which
    identity was used, and proxy variables in the environment see nothing."""
    name = _fresh_name()
    version = standin.put_secret(name, api_key)
    with recording_listener() as trap:
        env = {**trap.environment(), "NO_PROXY": "", "REQUESTS_CA_BUNDLE": "/nonexistent"}
        proxy = azure_proxy(tmp_path, standin, sandbox, name, client_secret_file, env=env)
        try:
            sandbox.clear()
            answer = httpx.get(f"{proxy.url}/api/v1/users/me")
            assert answer.status_code == 200, answer.text
            assert _seen_keys(sandbox) == [api_key]
            state = _readyz(proxy)
            assert state["source"] == "azure_key_vault"
            assert state["key_version"] == version
            assert state["key"] == "***" + api_key[-4:]
            assert state["where"] == f"secret {name} in {VAULT} as client_secret"
            eventually(lambda: len(_vault_reads(standin, name)) >= 4)
            reads = _vault_reads(standin, name)
            assert not reads[0]["bearer"] and all(r["bearer"] for r in reads[1:])
            assert {r["host"] for r in reads} == {"publer.vault.azure.net"}
            tokens = [s for s in standin.seen() if s["kind"] == "token"]
            assert tokens and {t["host"] for t in tokens} == {"login.microsoftonline.com"}
            events = proxy.events()
            said = [e for e in events if e.get("event") == "azure_identity"]
            assert said and said[0]["identity"] == "client_secret"
            loaded = [e for e in events if e.get("event") == "key_loaded"]
            assert loaded[0]["where"].endswith("as client_secret")
            assert trap.connections == 0
        finally:
            proxy.stop()


def test_managed_identity_is_never_reached_through_a_proxy(
    tmp_path: Path, standin: StandIn, sandbox: Sandbox, api_key: str
) -> None:
    """Managed identity (IMDS, `Metadata: true`) gives the token, with HTTP_PROXY and
    HTTPS_PROXY set: the proxy variables receive no connection, and the key is served."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    with recording_listener() as trap:
        env = {
            **trap.environment(),
            "NO_PROXY": "",
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": standin.imds,
        }
        proxy = azure_proxy(tmp_path, standin, sandbox, name, None, env=env)
        try:
            assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
            asked = [s for s in standin.seen() if s["kind"] == "imds"]
            assert asked and all(s["metadata"] == "true" for s in asked)
            assert _readyz(proxy)["where"].endswith("as managed_identity")
            assert trap.connections == 0
        finally:
            proxy.stop()


def test_rotation_under_load_is_invisible_to_clients(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """A new latest version while clients send requests, and Publer revoking the old key at
    the same moment: every request succeeds, `key_rotated` names both masked keys and
    both versions, and Publer sees the new key after."""
    name = _fresh_name()
    old_version = standin.put_secret(name, api_key)
    proxy = azure_proxy(tmp_path, standin, sandbox, name, client_secret_file)
    new_key = "pk_azure_rotated_" + secrets.token_hex(16)
    stop = threading.Event()

    def client() -> list[int]:
        statuses = []
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                statuses.append(http.get(f"{proxy.url}/api/v1/posts").status_code)
        return statuses

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client) for _ in range(6)]
            time.sleep(1.0)  # load before the rotation
            sandbox.set_keys({"key": api_key}, {"key": new_key})
            new_version = standin.put_secret(name, new_key)
            sandbox.set_keys({"key": new_key})
            eventually(lambda: _readyz(proxy)["key_version"] == new_version)
            time.sleep(0.5)  # load after the rotation
            stop.set()
            statuses = [status for future in futures for status in future.result()]
        assert len(statuses) > 50
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        sandbox.clear()
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
        assert _seen_keys(sandbox) == [new_key]
        rotated = [e for e in proxy.events() if e.get("event") == "key_rotated"]
        assert len(rotated) == 1, rotated
        assert rotated[0]["source"] == "azure_key_vault"
        assert (rotated[0]["old_key"], rotated[0]["key"]) == (
            "***" + api_key[-4:],
            "***" + new_key[-4:],
        )
        assert (rotated[0]["old_version"], rotated[0]["key_version"]) == (old_version, new_version)
    finally:
        stop.set()
        proxy.stop()
        sandbox.set_keys({"key": api_key})


def test_versions_that_are_disabled_expired_or_not_yet_valid_are_never_used(
    standin: StandIn, client_secret_file: Path, api_key: str
) -> None:
    """Key Vault answers an expired or not-yet-valid version with 200: the source reads
    `exp` and `nbf` itself and refuses it; a disabled version (403 SecretDisabled) is
    refused and asks the store to drop the key it holds; the value is in no reason."""
    now = int(time.time())
    cases: dict[str, dict[str, Any]] = {
        "expired": {"exp": now - 60},
        "not_yet_valid": {"nbf": now + 3600},
        "disabled": {"enabled": False},
    }
    for kind, attributes in cases.items():
        name = _fresh_name()
        value = f"pk_{kind}_" + secrets.token_hex(12)
        standin.put_secret(name, value, **attributes)
        with pytest.raises(SourceError) as refused:
            source(standin, name, client_secret_file).read()
        assert refused.value.kind == kind, refused.value
        assert value not in refused.value.reason
        assert refused.value.drop_key is (kind == "disabled")
    name = _fresh_name()
    standin.put_secret(name, api_key, exp=now + 3600, nbf=now - 60)
    read = source(standin, name, client_secret_file).read()
    assert read.value == api_key and read.not_after is not None


def test_a_disabled_or_expiring_held_version_stops_being_served(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """A newer version that is already expired is not used (the held key serves on,
    stale, with the reason); the held version reaching its own `exp` is 503 at once; a
    new valid version heals; disabling the latest version withdraws the held key (503,
    `disabled`) instead of serving it stale; the expired key never reached Publer."""
    name = _fresh_name()
    held = standin.put_secret(name, api_key, exp=int(time.time()) + 600)
    proxy = azure_proxy(tmp_path, standin, sandbox, name, client_secret_file, max_stale_seconds=600)
    try:
        changed_at = time.time()
        standin.set_attributes(name, held, exp=int(changed_at) + 5)
        eventually(lambda: any(r["at"] > changed_at for r in _vault_reads(standin, name)))
        bad = "pk_expired_" + secrets.token_hex(12)
        standin.put_secret(name, bad, exp=int(time.time()) - 60)
        eventually(lambda: "expired" in _readyz(proxy).get("reason", ""))
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200  # the held one
        eventually(lambda: httpx.get(f"{proxy.url}/api/v1/posts").status_code == 503)
        refused = httpx.get(f"{proxy.url}/api/v1/posts")
        assert refused.json()["code"] == "credential_unavailable"
        assert "past its expiry time" in refused.text
        good = "pk_good_" + secrets.token_hex(12)
        sandbox.set_keys({"key": api_key}, {"key": good})
        version = standin.put_secret(name, good)
        eventually(lambda: httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200)
        standin.set_attributes(name, version, enabled=False)
        eventually(lambda: httpx.get(f"{proxy.url}/api/v1/posts").status_code == 503)
        refused = httpx.get(f"{proxy.url}/api/v1/posts")
        assert "is disabled" in refused.text
        assert _readyz(proxy)["state"] == "missing"
        assert bad not in "".join(_seen_keys(sandbox))
        withdrawn = [e for e in proxy.events() if e.get("event") == "key_withdrawn"]
        assert withdrawn and withdrawn[0]["key"] == "***" + good[-4:]
    finally:
        proxy.stop()
        sandbox.set_keys({"key": api_key})


def test_throttling_honours_retry_after_but_never_past_the_stale_window(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """A 429 with Retry-After of an hour: the proxy does not ask again at its usual pace,
    says `throttled` in /readyz, asks once more before the held key would expire (so it
    never does) and is fresh again when Key Vault answers, the wait then over."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    proxy = azure_proxy(tmp_path, standin, sandbox, name, client_secret_file, max_stale_seconds=5)
    try:
        standin.control("PUT", "throttle", {"count": 1, "retry_after": 3600})
        eventually(lambda: "throttling" in _readyz(proxy).get("reason", ""))
        throttled_at = time.time()
        assert _readyz(proxy)["state"] == "stale"
        while _readyz(proxy)["state"] != "fresh":
            assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
            assert time.time() - throttled_at < 15
            time.sleep(0.2)
        after = [r for r in _vault_reads(standin, name) if r["at"] > throttled_at]
        assert after, "asked again"
        assert after[0]["at"] - throttled_at > 2.5  # not the one-second refresh
        # Answering again ends the wait: a key Publer rejects is re-read at once.
        new_key = "pk_after_throttle_" + secrets.token_hex(8)
        standin.put_secret(name, new_key)
        sandbox.set_keys({"key": new_key})
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
    finally:
        proxy.stop()
        sandbox.set_keys({"key": api_key})


def test_a_rejected_key_does_not_override_retry_after(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """While Key Vault has asked to wait (429, Retry-After), Publer rejecting the key does
    not send the proxy back to Key Vault: the re-read that a rejection triggers waits too."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    proxy = azure_proxy(tmp_path, standin, sandbox, name, client_secret_file, max_stale_seconds=60)
    try:
        standin.control("PUT", "throttle", {"count": 1, "retry_after": 3600})
        eventually(lambda: "throttling" in _readyz(proxy).get("reason", ""))
        throttled_at = time.time()
        sandbox.set_keys({"key": "pk_someone_else_" + secrets.token_hex(8)})
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert httpx.get(f"{proxy.url}/api/v1/posts").status_code in (401, 403)
            time.sleep(0.1)
        assert not [r for r in _vault_reads(standin, name) if r["at"] > throttled_at]
    finally:
        proxy.stop()
        sandbox.set_keys({"key": api_key})


def test_outage_serves_the_last_key_then_503_then_recovers(
    tmp_path: Path, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """Key Vault down: the last good key serves (readyz degraded, stale, unreachable)
    until max_stale_seconds, then 503 naming the source; back up, the proxy reads the key
    again by itself."""
    server = start_standin(tmp_path / "azure")
    secret = client_secret_file.read_text()
    server.add_client(CLIENT_ID, secret)
    server.put_secret("publer-api", api_key)
    proxy = azure_proxy(
        tmp_path, server, sandbox, "publer-api", client_secret_file, max_stale_seconds=4
    )
    try:
        server.stop()
        eventually(lambda: _readyz(proxy)["state"] == "stale")
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
        ready = httpx.get(f"{proxy.url}/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert "unreachable" in _readyz(proxy)["reason"]
        eventually(lambda: httpx.get(f"{proxy.url}/api/v1/posts").status_code == 503)
        refused = httpx.get(f"{proxy.url}/api/v1/posts")
        assert refused.json()["code"] == "credential_unavailable"
        assert "Key Vault" in refused.text and "unreachable" in refused.text
        server = start_standin(tmp_path / "azure", tls_port=server.tls_port, port=server.port)
        server.add_client(CLIENT_ID, secret)
        server.put_secret("publer-api", api_key)
        eventually(lambda: httpx.get(f"{proxy.url}/readyz").status_code == 200, timeout=20)
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
    finally:
        proxy.stop()
        server.stop()


def test_wrong_credentials_and_denials_are_clear_and_leak_nothing(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """A wrong client secret: /readyz, the 503 and `check --online` (exit 2) say Entra ID
    refused it and why, in the proxy's words; an identity without the role is `denied`;
    a deleted secret is `not found` and only ever read. No key, client secret or access
    token appears in any output."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("wrong-" + secrets.token_urlsafe(20))
    wrong.chmod(0o600)
    proxy = azure_proxy(tmp_path / "wrong", standin, sandbox, name, wrong, wait_ready=False)
    try:
        eventually(lambda: "reason" in _readyz(proxy))
        reason = _readyz(proxy)["reason"]
        assert "Microsoft Entra ID refused" in reason and "client secret is wrong" in reason
        answer = httpx.get(f"{proxy.url}/api/v1/posts")
        assert answer.status_code == 503 and "Entra ID refused" in answer.text
        assert "Invalid client secret provided" not in answer.text  # not Entra's own words
    finally:
        proxy.stop()
    check = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--online", "--config", str(proxy.config_path)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("AZURE_")},
        check=False,
    )
    assert check.returncode == 2
    assert "client secret is wrong" in check.stdout
    good = azure_proxy(tmp_path / "denied", standin, sandbox, name, client_secret_file)
    try:
        standin.control("PUT", "readers", ["client:someone-else"])
        eventually(lambda: "denied" in _readyz(good).get("reason", ""))
        assert "Key Vault Secrets User" in _readyz(good)["reason"]
        standin.control("PUT", "readers", None)
        eventually(lambda: _readyz(good)["state"] == "fresh")
        standin.delete_secret(name)
        eventually(lambda: "deleted" in _readyz(good).get("reason", ""))
        assert "never recovers or purges" in _readyz(good)["reason"]
    finally:
        good.stop()
        standin.control("PUT", "readers", None)
    assert not [s for s in standin.seen() if s["kind"] == "unknown"]
    hidden = [api_key, wrong.read_text(), client_secret_file.read_text()]
    hidden += standin.control("GET", "tokens")["tokens"]
    outputs = [proxy.output(), good.output(), check.stdout + check.stderr, answer.text]
    for text in outputs:
        for secret in hidden:
            assert secret not in text


def test_access_token_is_reused_and_renewed_before_it_expires(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """With tokens valid 304 s, the SDK asks for a new one once less than 5 minutes are
    left (so every 3 to 4 s: expiry is kept in whole seconds), never presents an expired
    one, and the reads in between (one a second) reuse the token."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    standin.control("PUT", "token-seconds", 304)
    client = f"renew-{secrets.token_hex(3)}"
    secret_file = tmp_path / "secret"
    secret_file.write_text("cs-" + secrets.token_hex(16))
    standin.add_client(client, secret_file.read_text())
    settings = azure_credential(standin, name, secret_file)
    settings["credential"]["client_id"] = client
    config = proxy_config("http://127.0.0.1:9", sandbox.url)
    config["credentials"]["publer"] = settings
    try:
        proxy = start_proxy(tmp_path, config)
        try:
            eventually(
                lambda: len([s for s in standin.seen() if s.get("client") == client]) >= 3,
                timeout=30,
            )
        finally:
            proxy.stop()
    finally:
        standin.control("PUT", "token-seconds", 3600)
    tokens = [s for s in standin.seen() if s.get("client") == client]
    reads = [r for r in _vault_reads(standin, name) if r["bearer"]]
    assert len(reads) >= 2 * len(tokens), (reads, tokens)
    assert not [r for r in _vault_reads(standin, name) if r.get("expired_token")]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(tokens)]
    assert all(gap >= 2.5 for gap in gaps), gaps


def test_a_token_key_vault_refuses_is_not_presented_again(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """Key Vault refusing a token the identity still thinks valid (revoked): the read
    fails once as `auth_failed`, the next read signs in again and the key is fresh, where
    the SDK alone would present the cached token until it expires."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    proxy = azure_proxy(tmp_path, standin, sandbox, name, client_secret_file)
    try:
        revoked_at = time.time()
        standin.control("PUT", "revoke-tokens")
        eventually(lambda: "did not accept the access token" in _readyz(proxy).get("reason", ""))
        eventually(lambda: _readyz(proxy)["state"] == "fresh")
        refused = [
            r for r in _vault_reads(standin, name) if r["at"] > revoked_at and "identity" not in r
        ]
        assert 1 <= len(refused) <= 4, refused
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
    finally:
        proxy.stop()


def test_no_secret_or_token_in_any_output_at_debug_level(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """At debug level (and AZURE_LOG_LEVEL=DEBUG), with App Service's managed identity and
    with a client secret: reads, a rotation, a throttled read, a wrong client secret and `check
    --online`: no API key, client secret, IMDS header or access token the stand-in issued
    appears in any output or answer; the masked key does."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    rotated = "pk_leak_azure_" + secrets.token_hex(16)
    identity_header = "ih-" + secrets.token_hex(16)
    standin.control("PUT", "identity-header", identity_header)
    env = {"AZURE_LOG_LEVEL": "DEBUG"}
    app_service = {
        **env,
        "IDENTITY_ENDPOINT": f"{standin.imds}/msi/token",
        "IDENTITY_HEADER": identity_header,
    }
    outputs: list[str] = []
    managed = azure_proxy(tmp_path / "mi", standin, sandbox, name, None, env=app_service)
    secret = azure_proxy(tmp_path / "cs", standin, sandbox, name, client_secret_file, env=env)
    try:
        sandbox.set_keys({"key": api_key}, {"key": rotated})
        for proxy in (managed, secret):
            outputs.append(httpx.get(f"{proxy.url}/api/v1/posts").text)
        standin.put_secret(name, rotated)
        standin.control("PUT", "throttle", {"count": 2, "retry_after": 1})
        for proxy in (managed, secret):

            def rotated_in(proxy: Proxy = proxy) -> bool:
                return bool(_readyz(proxy)["key"] == "***" + rotated[-4:])

            eventually(rotated_in)
            outputs.append(httpx.get(f"{proxy.url}/readyz").text)
            outputs.append(httpx.get(f"{proxy.url}/metrics").text)
    finally:
        for proxy in (managed, secret):
            proxy.stop()
            outputs.append(proxy.output())
        sandbox.set_keys({"key": api_key})
    check = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--online", "--config", str(secret.config_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "AZURE_LOG_LEVEL": "DEBUG"},
        check=False,
    )
    outputs.append(check.stdout + check.stderr)
    assert "***" + rotated[-4:] in check.stdout, check.stdout
    hidden = [api_key, rotated, client_secret_file.read_text(), identity_header]
    hidden += standin.control("GET", "tokens")["tokens"]
    assert len(hidden) > 5  # tokens were issued
    for text in outputs:
        for value in hidden:
            assert value not in text
    assert "***" + api_key[-4:] in outputs[-2]
    assert [s for s in standin.seen() if s["kind"] == "app_service"]


def test_a_garbled_token_answer_leaks_no_token(
    tmp_path: Path, standin: StandIn, sandbox: Sandbox, api_key: str
) -> None:
    """The managed-identity endpoint answering a token with an expiry that is not a
    number: the SDK rejects the answer (quoting it whole in its own error), the proxy says
    the identity failed, and the token appears in no output."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    standin.control("PUT", "imds-garbled", True)
    env = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": standin.imds}
    try:
        proxy = azure_proxy(tmp_path, standin, sandbox, name, None, env=env, wait_ready=False)
        try:
            eventually(lambda: "reason" in _readyz(proxy))
            assert _readyz(proxy)["state"] == "missing"
            answer = httpx.get(f"{proxy.url}/api/v1/posts")
            assert answer.status_code == 503
        finally:
            proxy.stop()
    finally:
        standin.control("PUT", "imds-garbled", False)
    tokens = standin.control("GET", "tokens")["tokens"]
    for text in (proxy.output(), answer.text):
        for token in tokens:
            assert token not in text


def test_sdk_loggers_stay_above_debug_whatever_the_level() -> None:
    """The Azure SDK's and MSAL's loggers are kept at WARNING even when the proxy logs at
    debug: at DEBUG the network trace prints whole answers and the Authorization header."""
    import io
    import logging

    from proxy.config.settings import LoggingSettings
    from proxy.records.log_setup import configure_logging

    configure_logging(
        LoggingSettings(format="json", level="debug"), SecretRegistry(), io.StringIO()
    )
    for name in ("azure", "azure.core.pipeline.policies.http_logging_policy", "msal"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name


def test_a_named_proxy_carries_vault_and_sign_in_but_never_managed_identity(
    tmp_path: Path,
    standin: StandIn,
    client_secret_file: Path,
    sandbox: Sandbox,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`proxy:` named in config tunnels the vault's and the sign-in host's connections
    (CONNECT by their real names, TLS checked end to end), while the managed-identity
    endpoint is asked directly, never through the proxy; environment proxies stay unused."""
    import socket

    import tests.peers as peers

    real = socket.create_connection

    def dial(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host, port = address
        if host.endswith((".vault.azure.net", "login.microsoftonline.com")) and port == 443:
            address = ("127.0.0.1", standin.tls_port)  # the stand-in answers for both
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", dial)  # the forwarding proxy dials
    name = _fresh_name()
    standin.put_secret(name, api_key)
    forwarding = peers.ForwardingProxy()
    try:
        with recording_listener() as trap:
            for identity, secret_file in (("secret", client_secret_file), ("mi", None)):
                env = {**trap.environment(), "AZURE_POD_IDENTITY_AUTHORITY_HOST": standin.imds}
                config = proxy_config("http://127.0.0.1:9", sandbox.url)
                credential = azure_credential(standin, name, secret_file, proxy=forwarding.url)
                del credential["connect_to"]
                config["credentials"]["publer"] = credential
                proxy = start_proxy(tmp_path / identity, config, env=env)
                try:
                    assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
                finally:
                    proxy.stop()
            assert trap.connections == 0
        lines = [line for line, _ in forwarding.requests]
        assert any(line.startswith("CONNECT publer.vault.azure.net:443 ") for line in lines)
        assert any(line.startswith("CONNECT login.microsoftonline.com:443 ") for line in lines)
        assert all(line.startswith("CONNECT ") for line in lines), lines
        assert [s for s in standin.seen() if s["kind"] == "imds"]
        assert api_key.encode() not in forwarding.passed()
    finally:
        forwarding.close()


def test_workload_identity_signs_in_with_the_federated_token(
    tmp_path: Path, standin: StandIn, api_key: str
) -> None:
    """Workload identity (AKS): the token file's content is the client assertion, the key
    is read, and the federated token is registered as a secret."""
    client = f"workload-{secrets.token_hex(3)}"
    federated = "eyJ" + secrets.token_urlsafe(40)
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(federated)
    standin.control("PUT", "federated", {client: federated})
    name = _fresh_name()
    standin.put_secret(name, api_key)
    settings = azure_credential(standin, name, None)
    settings["credential"] = {
        "type": "workload_identity",
        "tenant_id": TENANT,
        "client_id": client,
        "token_file": str(token_file),
    }
    registry = SecretRegistry()
    found = AzureKeySource(AzureCredentialSettings.model_validate(settings), registry)
    assert found.read().value == api_key
    assert found.where.endswith("as workload_identity")
    assert federated not in registry.redact(f"token {federated}")
    grants = [s for s in standin.seen() if s.get("client") == client]
    assert grants and grants[0]["grant"] == "client_credentials"


def test_the_default_chain_with_no_identity_says_where_it_looked(
    standin: StandIn, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`type: default` where no identity exists (no variables, no managed-identity
    endpoint, no Azure CLI): the reason lists where the chain looked and how to name one,
    not a refusal; with the environment's client secret, the chain finds that one."""
    for variable in [v for v in os.environ if v.startswith(("AZURE_", "IDENTITY_", "MSI_"))]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("PATH", "/nonexistent")  # no `az`
    name = _fresh_name()
    standin.put_secret(name, api_key)
    settings = azure_credential(standin, name, None)
    settings["credential"] = {"type": "default"}
    found = AzureKeySource(AzureCredentialSettings.model_validate(settings), SecretRegistry())
    with pytest.raises(SourceError) as none:
        found.read()
    assert none.value.kind == "auth_failed"
    assert none.value.reason.startswith("no Azure identity found"), none.value.reason
    secret = "cs-env-" + secrets.token_hex(12)
    client = f"env-{secrets.token_hex(3)}"
    standin.add_client(client, secret)
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", client)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", secret)
    registry = SecretRegistry()
    found = AzureKeySource(AzureCredentialSettings.model_validate(settings), registry)
    assert found.read().value == api_key
    assert found.where.endswith("as default chain: environment client_secret")
    assert secret not in registry.redact(secret)


@pytest.mark.parametrize("identity", ["client_secret", "default"])
def test_a_private_authority_is_reached_as_written(
    tmp_path: Path,
    standin: StandIn,
    client_secret_file: Path,
    api_key: str,
    identity: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`credential.authority` (or AZURE_AUTHORITY_HOST) naming a sign-in host by its
    address (https://localhost:PORT) is dialled as written while the vault's name goes to
    `connect_to`, and MSAL does not ask Microsoft about an authority it cannot know; the
    default chain takes the same setting (here finding the managed identity)."""
    for variable in [v for v in os.environ if v.startswith(("AZURE_", "IDENTITY_", "MSI_"))]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", standin.imds)
    name = _fresh_name()
    standin.put_secret(name, api_key)
    settings = azure_credential(standin, name, client_secret_file)
    settings["credential"]["type"] = identity
    settings["credential"]["authority"] = f"https://localhost:{standin.tls_port}"
    if identity == "default":
        settings["credential"] = {"type": "default"}
        monkeypatch.setenv("AZURE_AUTHORITY_HOST", f"https://localhost:{standin.tls_port}")
    since = time.time()
    found = AzureKeySource(AzureCredentialSettings.model_validate(settings), SecretRegistry())
    assert found.read().value == api_key
    seen = [s for s in standin.seen() if s.get("at", 0) >= since]
    assert not [s for s in seen if s["kind"] in ("unknown", "discovery")], seen
    if identity == "client_secret":
        assert [s for s in seen if s["kind"] == "token" and s["host"] == "localhost"]


def test_connect_to_as_a_mapping_dials_only_the_names_given(
    standin: StandIn, client_secret_file: Path, api_key: str
) -> None:
    """`connect_to: {name: host:port}` dials those names only: the vault and the sign-in
    host listed are reached; a name left out is resolved (and here not found)."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    both = {"publer.vault.azure.net": standin.connect_to}
    both["login.microsoftonline.com"] = standin.connect_to
    assert source(standin, name, client_secret_file, connect_to=both).read().value == api_key
    vault_only = {"publer.vault.azure.net": standin.connect_to}
    only = source(standin, name, client_secret_file, connect_to=vault_only, timeout_seconds=2)
    with pytest.raises(SourceError) as unresolved:
        only.read()
    assert unresolved.value.kind == "unreachable"


def test_a_challenge_for_another_resource_gets_no_token(
    standin: StandIn, client_secret_file: Path, api_key: str
) -> None:
    """A 401 whose challenge names a resource that is not a parent of the vault's host
    (a token for another service): the SDK's check, left on, refuses; no token is asked
    for or sent, and the reason says to check vault_url."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    vault = f"https://other-{secrets.token_hex(3)}.vault.azure.net"  # no cached challenge
    standin.control("PUT", "challenge-resource", "https://management.azure.com")
    since = time.time()
    try:
        found = source(standin, name, client_secret_file, vault_url=vault)
        with pytest.raises(SourceError) as refused:
            found.read()
    finally:
        standin.control("PUT", "challenge-resource", None)
    assert refused.value.kind == "invalid"
    assert "asked for a token for another service" in refused.value.reason
    seen = [s for s in standin.seen() if s.get("at", 0) >= since]
    assert [s["kind"] for s in seen] == ["vault"] and not seen[0]["bearer"], seen


def _client_certificate(path: Path) -> str:
    """An RSA key and a self-signed certificate in one PEM file; the certificate's PEM."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "publer-proxy")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.touch(0o600)
    path.write_bytes(key_pem + cert_pem)
    return cert_pem.decode()


def test_client_certificate_signs_in_and_a_wrong_one_is_refused(
    tmp_path: Path, standin: StandIn, api_key: str
) -> None:
    """A client certificate: MSAL's signed assertion is accepted and the key read; a
    certificate the application does not have is refused with the code, in the proxy's
    words."""
    client = f"cert-{secrets.token_hex(3)}"
    registered = _client_certificate(tmp_path / "good.pem")
    _client_certificate(tmp_path / "other.pem")
    standin.control("PUT", "certificates", {client: registered})
    name = _fresh_name()
    standin.put_secret(name, api_key)
    settings = azure_credential(standin, name, None)
    for pem, works in (("good.pem", True), ("other.pem", False)):
        settings["credential"] = {
            "type": "client_certificate",
            "tenant_id": TENANT,
            "client_id": client,
            "certificate_file": str(tmp_path / pem),
        }
        found = AzureKeySource(AzureCredentialSettings.model_validate(settings), SecretRegistry())
        if works:
            assert found.read().value == api_key
            assert found.where.endswith("as client_certificate")
            continue
        with pytest.raises(SourceError) as refused:
            found.read()
        assert refused.value.kind == "auth_failed"
        assert "AADSTS700027" in refused.value.reason
        assert "signature validation" not in refused.value.reason


def test_sovereign_clouds_are_reached_by_vault_url(
    standin: StandIn, client_secret_file: Path, api_key: str
) -> None:
    """A vault in the China or US Government cloud: the challenge names that cloud's
    resource (the SDK checks it is a parent of the vault's host), and the token comes
    from that cloud's sign-in host, chosen from vault_url alone."""
    for suffix, login in (
        ("vault.azure.cn", "login.chinacloudapi.cn"),
        ("vault.usgovcloudapi.net", "login.microsoftonline.us"),
    ):
        name = _fresh_name()
        standin.put_secret(name, api_key)
        found = source(standin, name, client_secret_file, vault_url=f"https://publer.{suffix}")
        assert found.read().value == api_key
        assert cloud_authority(f"https://publer.{suffix}") == f"https://{login}"
        assert any(s.get("host") == login for s in standin.seen() if s["kind"] == "token")


def test_tls_is_verified_against_the_vault_name(
    tmp_path: Path, standin: StandIn, client_secret_file: Path, api_key: str
) -> None:
    """Without the stand-in's CA (the system's trust store), and with a vault name the
    certificate does not hold, the read fails as unreachable (TLS), never succeeds."""
    name = _fresh_name()
    standin.put_secret(name, api_key)
    settings = azure_credential(standin, name, client_secret_file)
    del settings["ca_file"]
    plain = AzureKeySource(AzureCredentialSettings.model_validate(settings), SecretRegistry())
    with pytest.raises(SourceError) as untrusted:
        plain.read()
    assert untrusted.value.kind in ("unreachable", "auth_failed")
    assert "TLS" in untrusted.value.reason
    other = source(standin, name, client_secret_file, vault_url="https://publer.vault.example.net")
    with pytest.raises(SourceError) as wrong_name:
        other.read()
    assert "TLS" in wrong_name.value.reason


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"vault_url": "http://publer.vault.azure.net"}, "vault_url: must be the vault's"),
        ({"vault_url": "https://127.0.0.1:8443"}, "vault_url: must be the vault's"),
        ({"vault_url": "https://v.vault.azure.net/secrets/x"}, "vault_url: must be the vault's"),
        ({"secret_name": "bad name"}, "secret_name"),
        ({"version": "../x"}, "version"),
        ({"proxy": "http://proxy:3128"}, "connect_to and proxy exclude each other"),
        ({"connect_to": "nowhere"}, "connect_to: must be host:port"),
        ({"credential": {"type": "client_secret"}}, "needs tenant_id, client_id"),
        ({"credential": {"type": "magic"}}, "credential.type"),
        ({"credential": {"type": "default", "authority": "http://x"}}, "authority: must be"),
        ({"client_secret": "x"}, "client_secret: unknown key"),
    ],
)
def test_config_mistakes_name_the_key(change: dict[str, Any], expected: str) -> None:
    """Each mistake in an azure_key_vault credential is one line naming its key path."""
    config = proxy_config("http://127.0.0.1:9", "http://127.0.0.1:9")
    credential = {
        "source": "azure_key_vault",
        "vault_url": VAULT,
        "secret_name": "publer-api",
        "connect_to": "127.0.0.1:8443",
    }
    config["credentials"]["publer"] = {**credential, **change}
    with pytest.raises(ConfigError) as error:
        parse_settings(config)
    assert any(
        line.startswith("credentials.publer") and expected in line for line in error.value.problems
    ), error.value.problems


def test_readme_example_is_a_valid_config() -> None:
    """The key sources page's azure_key_vault example is accepted as written."""
    text = (REPO / "docs" / "key-sources.md").read_text()
    block = text.split("<!-- azure-example -->\n```yaml\n", 1)[1].split("```", 1)[0]
    config = proxy_config("http://127.0.0.1:9", "http://127.0.0.1:9")
    config["credentials"] = yaml.safe_load(block)["credentials"]
    settings = parse_settings(config).credentials["publer"]
    assert isinstance(settings, AzureCredentialSettings)
    assert settings.credential.type == "managed_identity"


def test_the_sdk_is_imported_only_when_a_credential_uses_it() -> None:
    """A proxy whose keys are elsewhere never loads azure or msal (tens of modules)."""
    code = (
        "import sys, proxy.runtime, proxy.keys.store, proxy.online, proxy.keys.sources\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('azure', 'msal')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_missing_sdk_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without Microsoft's SDK installed, an azure_key_vault credential is a config problem
    that names the key and the extra to install, for `check` and `serve` alike."""
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name.startswith("azure.") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    settings = AzureCredentialSettings(
        source="azure_key_vault", vault_url=VAULT, secret_name="publer-api"
    )
    assert sdk_problems({"publer": settings}) == [
        "credentials.publer.source: azure_key_vault needs Microsoft's Azure SDK"
        " (azure-keyvault-secrets, azure-identity), which is not installed:"
        " pip install 'publer-proxy[azure]'"
    ]
    config = proxy_config("http://127.0.0.1:9", "http://127.0.0.1:9")
    config["credentials"]["publer"] = {
        "source": "azure_key_vault",
        "vault_url": VAULT,
        "secret_name": "publer-api",
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    from proxy.cli import main

    assert main(["check", "--config", str(path)]) == 1


def test_dev_with_the_azure_source(tmp_path: Path) -> None:
    """`dev --source azure` serves with the key in the local Key Vault stand-in, signing in
    with a client secret, says how to rotate the key, and leaves nothing running."""
    from proxy.dev.stack import free_port

    port = free_port()
    log = tmp_path / "stack.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PUBLER_", "VAULT_", "AWS_", "AZURE_"))
    }
    command = [sys.executable, "-m", "proxy", "dev", "--port", str(port), "--source", "azure"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        assert httpx.get(f"{url}/api/v1/users/me").status_code == 200
        state = httpx.get(f"{url}/readyz").json()["credentials"]["publer"]
        assert state["source"] == "azure_key_vault"
        assert state["where"].endswith("as client_secret")
        started = descendants(process.pid)
        eventually(lambda: "Rotate the key:" in log.read_text())
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        eventually(lambda: not [pid for pid in started if alive(pid)])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
