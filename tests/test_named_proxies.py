"""A proxy named on purpose (vault.proxy, upstream.proxy) is used, its password never
shown; the environment's proxy variables never are."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.config.settings import UpstreamSettings, VaultAuthSettings, VaultSettings
from proxy.keys.outbound import publer_http_client, vault_http_session
from proxy.keys.sources.vault import VaultError, VaultSession
from proxy.masking.secrets import SecretRegistry
from tests.bao import Bao, free_port
from tests.peers import echo_origin, forwarding_proxy, recording_listener
from tests.servers import Sandbox, proxy_config, start_proxy


def check(config_path: Path, env: dict[str, str], *online: str) -> subprocess.CompletedProcess[str]:
    """`publer-proxy check` on a config, with extra environment."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", *online, "--config", str(config_path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )


def test_vault_proxy_carries_every_vault_call(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """With vault.proxy (user and password in its URL) and proxy variables naming another
    listener: every Vault call of `serve` and `check --online` goes through the named
    proxy with its Proxy-Authorization, the listener gets nothing, and the password shows
    nowhere (the URL is shown as user:***@)."""
    password = "proxy-pw-" + secrets.token_hex(8)
    with forwarding_proxy() as named, recording_listener() as listener:
        named_url = named.url.replace("http://", f"http://svc:{password}@")
        config = proxy_config(bao.url, sandbox.url, token_file=token_file)
        config["vault"]["proxy"] = named_url
        proxy = start_proxy(tmp_path / "serve", config, env=listener.environment())
        try:
            answer = httpx.get(f"{proxy.url}/api/v1/users/me", trust_env=False)
            assert answer.status_code == 200, answer.text
            offline = check(proxy.config_path, listener.environment())
            online = check(proxy.config_path, listener.environment(), "--online")
        finally:
            assert proxy.stop() == 0
        assert online.returncode == 0, online.stdout + online.stderr
        lines = [line for line, _ in named.requests]
        assert f"GET {bao.url}/v1/auth/token/lookup-self HTTP/1.1" in lines
        assert f"GET {bao.url}/v1/secret/data/publer/api HTTP/1.1" in lines
        expected = "Basic " + base64.b64encode(f"svc:{password}".encode()).decode()
        assert {auth for _, auth in named.requests} == {expected}
        assert listener.received() == b""
    outputs = proxy.output() + offline.stdout + offline.stderr + online.stdout + online.stderr
    assert password not in outputs
    assert "svc:***@127.0.0.1" in offline.stderr  # the plain-HTTP Vault warning names it
    assert "svc:***@127.0.0.1" in proxy.output()  # and the start log


def test_upstream_proxy_carries_the_online_check(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """`check --online` asks Publer through upstream.proxy, and Vault directly."""
    with forwarding_proxy() as named:
        config = proxy_config(bao.url, sandbox.url, token_file=token_file)
        config["upstream"]["proxy"] = named.url
        path = tmp_path / "proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        online = check(path, {}, "--online")
        assert online.returncode == 0, online.stdout + online.stderr
        assert "Publer accepts the key" in online.stdout
        # One probe, to whichever endpoint the route's scopes make cheapest.
        [(line, _)] = named.requests
        assert line.startswith(f"GET {sandbox.url}/api/v1/"), line
        assert line.endswith(" HTTP/1.1"), line


def test_unreachable_vault_proxy_is_named_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vault.proxy that refuses connections is the reason given, shown masked."""
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    (tmp_path / "token").write_text("s.whatever")
    settings = VaultSettings(
        url="http://127.0.0.1:1",
        proxy=f"http://svc:hidden-pw-1@127.0.0.1:{free_port()}",
        auth=VaultAuthSettings(method="token", token_file=tmp_path / "token"),
    )
    with pytest.raises(VaultError) as caught:
        VaultSession(settings, SecretRegistry()).login()
    assert caught.value.kind == "unreachable"
    assert "the proxy http://svc:***@127.0.0.1" in caught.value.reason
    assert "hidden-pw-1" not in caught.value.reason


def test_upstream_proxy_carries_every_forwarded_request(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """With upstream.proxy (user and password in its URL) and proxy variables naming another
    listener: the forwarded requests go through the named proxy with its
    Proxy-Authorization, the key reaches Publer, the listener gets nothing, and the
    password shows nowhere."""
    password = "hop-pw-" + secrets.token_hex(8)
    with forwarding_proxy() as named, recording_listener() as listener:
        config = proxy_config(bao.url, sandbox.url, token_file=token_file)
        config["upstream"]["proxy"] = named.url.replace("http://", f"http://svc:{password}@")
        proxy = start_proxy(tmp_path / "serve", config, env=listener.environment())
        try:
            for _ in range(2):
                answer = httpx.get(f"{proxy.url}/api/v1/users/me", trust_env=False)
                assert answer.status_code == 200, answer.text
            upload = httpx.post(
                f"{proxy.url}/api/v1/posts", content=b"x" * 300_000, trust_env=False
            )
            assert upload.status_code < 500, upload.text
        finally:
            assert proxy.stop() == 0
        lines = [line for line, _ in named.requests]
        assert lines.count(f"GET {sandbox.url}/api/v1/users/me HTTP/1.1") == 2
        assert f"POST {sandbox.url}/api/v1/posts HTTP/1.1" in lines
        expected = "Basic " + base64.b64encode(f"svc:{password}".encode()).decode()
        assert {auth for _, auth in named.requests} == {expected}
        assert listener.received() == b""
    assert password not in proxy.output()
    assert "svc:***@127.0.0.1" in proxy.output()


def test_clients_ignore_the_environment_and_use_the_named_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Vault session and check --online's client, with every proxy variable (and
    REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) set: they reach the origin directly and the
    listener named by the variables gets nothing; given a named proxy, they use it."""
    with recording_listener() as listener, echo_origin() as origin, forwarding_proxy() as named:
        for name, value in listener.environment().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
        monkeypatch.setenv("CURL_CA_BUNDLE", "/nonexistent/ca.pem")
        url = f"{origin.url}/api/v1/workspaces"
        with vault_http_session(None) as session:
            assert session.get(url, headers={"Authorization": "Bearer-API a"}).status_code == 200
        with publer_http_client(UpstreamSettings(url=origin.url)) as client:
            assert client.get(url, headers={"Authorization": "Bearer-API b"}).status_code == 200
        assert origin.seen == ["Bearer-API a", "Bearer-API b"]
        assert listener.received() == b""
        with vault_http_session(named.url) as session:
            assert session.get(url).status_code == 200
        with publer_http_client(UpstreamSettings(url=origin.url, proxy=named.url)) as client:
            assert client.get(url).status_code == 200
        assert [line for line, _ in named.requests] == [f"GET {url} HTTP/1.1"] * 2
        assert listener.received() == b""
