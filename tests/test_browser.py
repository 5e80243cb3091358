"""The Host and browser-provenance decisions (proxy/rules/browser.py), with hostile inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.hosts import HostName, parse_host, parse_origin
from proxy.rules.browser import (
    CORS_REQUEST_HEADERS,
    check_browser,
    check_host,
    is_preflight,
    listener_names,
    preflight_headers,
    without_cors,
)
from proxy.rules.headers import downstream_headers

LOOPBACK = listener_names("127.0.0.1", [])
SERVICE = listener_names("0.0.0.0", ["proxy", "publer-proxy.tools.svc:80"])


def _host(values: list[bytes], names: tuple[HostName, ...] = LOOPBACK, version: str = "1.1") -> str:
    refusal = check_host(values, names, 8080, http_version=version, key="listen.allowed_hosts")
    return "ok" if refusal is None else refusal.code


@pytest.mark.parametrize(
    "host",
    [
        b"127.0.0.1",
        b"127.0.0.1:8080",
        b"localhost",
        b"localhost:8080",
        b"LOCALHOST:8080",
        b"localhost.:8080",
        b"[::1]",
        b"[::1]:8080",
        b"[0:0:0:0:0:0:0:1]:8080",
        b" localhost:8080 ",
    ],
)
def test_loopback_names_pass(host: bytes) -> None:
    """Every spelling of the loopback names, with the listener's port or none, is accepted."""
    assert _host([host]) == "ok"


@pytest.mark.parametrize(
    "host",
    [
        b"attacker.example",
        b"attacker.test:8080",
        b"localhost:8081",  # another port: not this listener
        b"127.0.0.1:80",
        b"localhost.attacker.example",
        b"127.0.0.1.nip.io:8080",
        b"2130706433:8080",  # 127.0.0.1 as one number: a browser never sends it
        b"0x7f.1:8080",
        b"127.1:8080",
        b"0177.0.0.1:8080",
        b"[::1",
        b"::1:8080",
        b"[::ffff:127.0.0.1]:8080",
        b"localhost:08080",
        b"localhost:99999",
        b"localhost:",
        b"localhost..",
        b"",
        b"local\xc3\xa9host",
        b"localhost/x",
        b"user@localhost:8080",
        b"http://localhost:8080",
    ],
)
def test_other_hosts_refused(host: bytes) -> None:
    """A Host that is not one of the listener's names (or on another port) is host_denied."""
    assert _host([host]) == "host_denied"


def test_missing_host() -> None:
    """HTTP/1.0 may omit Host; HTTP/1.1 may not, and two Host fields are refused."""
    assert _host([], version="1.0") == "ok"
    assert _host([]) == "host_denied"
    assert _host([b"localhost", b"localhost"]) == "host_denied"
    assert _host([b"localhost", b"attacker.test"]) == "host_denied"


def test_listed_names() -> None:
    """A listener beyond loopback answers to the names listed (a pinned port exactly), its
    own address, and loopback names only when it also listens on loopback."""
    assert _host([b"proxy:8080"], SERVICE) == "ok"
    assert _host([b"proxy"], SERVICE) == "ok"
    assert _host([b"publer-proxy.tools.svc"], SERVICE) == "ok"
    assert _host([b"publer-proxy.tools.svc:80"], SERVICE) == "ok"
    assert _host([b"publer-proxy.tools.svc:8080"], SERVICE) == "host_denied"
    assert _host([b"localhost:8080"], SERVICE) == "ok"  # a wildcard takes loopback too
    assert _host([b"0.0.0.0:8080"], SERVICE) == "host_denied"
    assert _host([b"10.0.0.5:8080"], SERVICE) == "host_denied"
    assert _host([b"10.0.0.5:8080"], listener_names("10.0.0.5", [])) == "ok"
    assert _host([b"localhost:8080"], listener_names("10.0.0.5", [])) == "host_denied"


def test_refusal_says_what_to_do() -> None:
    """The refusal names the names accepted and the config key that adds one."""
    refusal = check_host(
        [b"attacker.test:8080"], LOOPBACK, 8080, http_version="1.1", key="listen.allowed_hosts"
    )
    assert refusal is not None and refusal.status == 421
    assert "localhost" in refusal.message and "listen.allowed_hosts" in refusal.message


@given(st.binary(max_size=40))
def test_arbitrary_host_never_crashes(host: bytes) -> None:
    """Any bytes as Host give a decision, and only a loopback name passes."""
    verdict = _host([host])
    if verdict == "ok":
        parsed = parse_host(host.decode("latin-1"))
        assert parsed is not None and parsed.host in ("localhost", "127.0.0.1", "[::1]")


@given(st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True), st.integers(1, 65535))
def test_foreign_names_refused(name: str, port: int) -> None:
    """No generated name other than the loopback ones passes, whatever its port."""
    parsed = parse_host(name)
    if parsed is None or parsed.host not in ("localhost", "127.0.0.1"):
        assert _host([f"{name}:{port}".encode()]) == "host_denied"


def _browser(*headers: tuple[bytes, bytes], allowed: frozenset[str] = frozenset()) -> str:
    verdict = check_browser(list(headers), ["http://127.0.0.1:8080"], allowed)
    if verdict.refusal is not None:
        return verdict.refusal.code
    return verdict.cors_origin or "ok"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ((), "ok"),  # curl, Python, Go
        (((b"sec-fetch-mode", b"cors"),), "ok"),  # Node's fetch
        (((b"sec-fetch-site", b"none"),), "ok"),  # typed in the address bar
        (((b"sec-fetch-site", b"same-origin"),), "ok"),
        (((b"origin", b"http://127.0.0.1:8080"), (b"sec-fetch-site", b"same-origin")), "ok"),
        (((b"origin", b"http://attacker.example"),), "origin_denied"),
        (((b"origin", b"null"),), "origin_denied"),
        (((b"origin", b""),), "origin_denied"),
        (((b"origin", b"http://127.0.0.1:8080"), (b"origin", b"http://a.test")), "origin_denied"),
        (((b"sec-fetch-site", b"cross-site"),), "origin_denied"),
        (((b"sec-fetch-site", b"same-site"),), "origin_denied"),
        (((b"sec-fetch-site", b"CROSS-SITE"),), "origin_denied"),
        (((b"sec-fetch-site", b"none"), (b"sec-fetch-site", b"cross-site")), "origin_denied"),
        (
            ((b"origin", b"http://localhost:8080"), (b"sec-fetch-site", b"same-site")),
            "origin_denied",
        ),
    ],
)
def test_browser_provenance(headers: tuple[tuple[bytes, bytes], ...], expected: str) -> None:
    """Requests a browser marks as another site's are refused; non-browsers pass."""
    assert _browser(*headers) == expected


def test_listed_origin_gets_cors() -> None:
    """A listed origin passes, even cross-site, and is the one CORS is granted to."""
    allowed = frozenset({"http://localhost:5173"})
    headers = ((b"origin", b"http://localhost:5173"), (b"sec-fetch-site", b"same-site"))
    assert _browser(*headers, allowed=allowed) == "http://localhost:5173"
    assert _browser((b"origin", b"http://localhost:5174"), allowed=allowed) == "origin_denied"
    assert _browser((b"origin", b"null"), allowed=allowed) == "origin_denied"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://localhost:5173", "http://localhost:5173"),
        ("HTTPS://App.Example.com:443", "https://app.example.com"),
        ("http://[::1]:80", "http://[::1]"),
        ("null", None),
        ("*", None),
        ("http://a.test/path", None),
        ("file://", None),
        ("http://user@a.test", None),
    ],
)
def test_parse_origin(value: str, expected: str | None) -> None:
    """Origins are normalised as browsers serialise them; anything else is not one."""
    assert parse_origin(value) == expected


def test_preflight() -> None:
    """A preflight is answered for allowed methods and headers only, for the one origin."""
    asked = [
        (b"access-control-request-method", b"POST"),
        (b"access-control-request-headers", b"authorization,content-type"),
    ]
    assert is_preflight("OPTIONS", asked) and not is_preflight("OPTIONS", [])
    answer = dict(preflight_headers("http://localhost:5173", asked) or [])
    assert answer[b"access-control-allow-origin"] == b"http://localhost:5173"
    assert answer[b"access-control-allow-methods"] == b"POST"
    assert answer[b"access-control-allow-headers"] == b"authorization, content-type"
    assert b"access-control-allow-credentials" not in answer
    assert (
        preflight_headers("http://x.test", [(b"access-control-request-method", b"TRACE")]) is None
    )
    cookie = [*asked[:1], (b"access-control-request-headers", b"x-forwarded-for")]
    assert preflight_headers("http://x.test", cookie) is None
    assert "cookie" not in CORS_REQUEST_HEADERS


def test_no_cors_header_relayed() -> None:
    """Access-Control-* from Publer (or anyone) is dropped, in any case spelling."""
    upstream = [
        (b"Access-Control-Allow-Origin", b"*"),
        (b"access-control-allow-credentials", b"true"),
        (b"content-type", b"application/json"),
    ]
    assert downstream_headers(upstream) == [(b"content-type", b"application/json")]
    assert without_cors(upstream) == [(b"content-type", b"application/json")]
