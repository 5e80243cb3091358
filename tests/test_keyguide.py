"""What Publer's key-security guide asks for, built in (issue: HTTPS, age, hints)."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest

from proxy.config.settings import ConfigError, load_settings, parse_settings
from tests.bao import Bao
from tests.servers import Sandbox, proxy_config, start_proxy
from tests.waiting import eventually

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("url", "opt_out", "ok"),
    [
        ("https://app.publer.com", False, True),
        ("http://127.0.0.1:9000", False, True),
        ("http://localhost:9000", False, True),
        ("http://[::1]:9000", False, True),
        ("http://app.publer.com", False, False),
        ("http://10.0.0.5:8080", False, False),
        ("http://publer.internal", True, True),
        ("ftp://app.publer.com", False, False),
        ("https://app.publer.com/api/v1", False, False),
    ],
)
def test_upstream_must_be_https_unless_loopback(url: str, opt_out: bool, ok: bool) -> None:
    """Plain HTTP to a non-loopback upstream is a config error naming upstream.url,
    unless the loudly named opt-out is set."""
    config = proxy_config("http://127.0.0.1:8200", url)
    config["upstream"]["insecure_allow_plain_http"] = opt_out
    if ok:
        parse_settings(config)
    else:
        with pytest.raises(ConfigError) as error:
            parse_settings(config)
        assert any(line.startswith("upstream") for line in error.value.problems)


def test_https_upstream_is_verified_against_its_ca(
    tmp_path: Path, bao: Bao, token_file: Path, api_key: str
) -> None:
    """The key travels only over TLS whose certificate checks out: with the private CA in
    `upstream.ca_file` the request goes through; without it, or under a host name the
    certificate does not name, it is refused before a byte of the request is sent."""
    from tests.servers import make_tls, start_sandbox

    tls = make_tls(tmp_path / "tls")
    secure = start_sandbox(tmp_path / "sandbox", api_key, tls=tls)
    port = secure.url.rsplit(":", 1)[1]
    proxies = []
    try:
        cases = [
            (secure.url, tls.ca, 200),
            (secure.url, None, 502),  # the system CAs do not know ours
            (f"https://localhost:{port}", tls.ca, 502),  # the certificate names 127.0.0.1
        ]
        for index, (url, ca_file, status) in enumerate(cases):
            config = proxy_config(bao.url, url, token_file=token_file)
            if ca_file is not None:
                config["upstream"]["ca_file"] = str(ca_file)
            proxy = start_proxy(tmp_path / f"proxy{index}", config)
            proxies.append(proxy)
            answer = httpx.get(f"{proxy.url}/api/v1/posts")
            assert answer.status_code == status, (url, ca_file, answer.text)
            if status == 502:
                assert answer.headers["x-publer-proxy-error"] == "upstream_unreachable"
        recorded = secure.requests()
        assert len(recorded) == 1
        sent = [value for name, value in recorded[0]["headers"] if name == "authorization"]
        assert sent == [f"Bearer-API {api_key}"]
    finally:
        for proxy in proxies:
            proxy.stop()
        secure.stop()


def test_plain_http_vault_off_loopback_is_warned() -> None:
    """A Vault address that is plain HTTP beyond loopback gets a warning, not silence."""
    settings = parse_settings(proxy_config("http://vault.internal:8200", "https://app.publer.com"))
    assert any(w.startswith("vault.url") for w in settings.warnings())
    local = parse_settings(proxy_config("http://127.0.0.1:8200", "https://app.publer.com"))
    assert local.warnings() == []


def test_least_privilege_example_is_valid() -> None:
    """The two-key example config validates: two credentials, two routes, each with clients."""
    settings = load_settings(REPO / "config" / "least-privilege.yaml")
    assert len(settings.credentials) == 2
    assert {r.credential for r in settings.routes} == set(settings.credentials)
    assert all(r.clients for r in settings.routes)


@pytest.mark.parametrize(
    ("sandbox_key", "status", "hint"),
    [
        ({"revoked": True}, 401, "key rejected"),
        ({"scopes": ["users"]}, 403, "missing scope"),
        ({"workspaces": ["aaaaaaaaaaaaaaaaaaaaaaaa"]}, 403, "workspace rejected"),
    ],
)
def test_publer_auth_failures_are_explained(
    tmp_path: Path,
    bao: Bao,
    token_file: Path,
    sandbox: Sandbox,
    api_key: str,
    sandbox_key: dict[str, object],
    status: int,
    hint: str,
) -> None:
    """Publer's 401/403 reaches the app unchanged, with X-Publer-Proxy-Hint saying why,
    and the log names the masked key and its version."""
    proxy = start_proxy(tmp_path, proxy_config(bao.url, sandbox.url, token_file=token_file))
    try:
        sandbox.set_keys({"key": api_key, **sandbox_key})
        answer = httpx.get(f"{proxy.url}/api/v1/posts")
        assert answer.status_code == status
        assert "x-publer-proxy-error" not in answer.headers
        assert answer.json()["errors"]  # Publer's own body, passed through
        assert hint in answer.headers["x-publer-proxy-hint"]
        eventually(lambda: any(e.get("event") == "upstream_auth_failed" for e in proxy.events()))
        [event] = [e for e in proxy.events() if e.get("event") == "upstream_auth_failed"]
        assert event["key"] == "***" + api_key[-4:] and event["key_version"] >= 1
    finally:
        proxy.stop()
        sandbox.set_keys({"key": api_key})


def test_old_key_is_flagged_for_rotation(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A key older than rotate_after_days is flagged in /readyz and logged once (not on
    every refresh); its age is a metric."""
    path = f"aged/{secrets.token_hex(4)}"
    bao.write_key(path, "pk_aged_" + secrets.token_hex(10))
    config = proxy_config(
        bao.url,
        sandbox.url,
        token_file=token_file,
        credential={"path": path, "refresh_seconds": 0.5, "rotate_after_days": 0.00002},
    )
    proxy = start_proxy(tmp_path, config)
    try:

        def flagged() -> bool:
            state = httpx.get(f"{proxy.url}/readyz").json()["credentials"]["publer"]
            return bool(state["rotation_due"])

        eventually(flagged)
        eventually(lambda: any(e.get("event") == "key_rotation_due" for e in proxy.events()))

        def refreshes_after_warning() -> int:
            names = [e.get("event") for e in proxy.events()]
            return names[names.index("key_rotation_due") :].count("key_refreshed")

        # Several refreshes later (each one's age check is logged before the next read):
        eventually(lambda: refreshes_after_warning() >= 3, timeout=60)
        warnings = [e for e in proxy.events() if e.get("event") == "key_rotation_due"]
        assert len(warnings) == 1
        assert warnings[0]["rotate_after_days"] == 0.00002
        assert "publer_proxy_key_age_seconds" in httpx.get(f"{proxy.url}/metrics").text
    finally:
        proxy.stop()
