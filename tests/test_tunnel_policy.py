"""The forward proxy's pure parts: CONNECT targets, Host, Proxy-Authorization, the CA."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.settings import ConfigError, RouteSettings, parse_settings
from proxy.rules.policy import build_routes, hash_token
from proxy.rules.refusals import Refusal
from proxy.tunnel.ca import CAError, InterceptionCA, constraint_problem, generate_ca, normalize_host
from proxy.tunnel.decisions import (
    Connect,
    check_target,
    decide_connect,
    host_matches,
    proxy_token,
    tunnel_route,
)

HOST = "app.publer.com"


@pytest.mark.parametrize(
    "target",
    [
        "app.publer.com:443",
        "APP.PUBLER.COM:443",
        "app.publer.com.:443",
        "App.Publer.Com.:443",
    ],
)
def test_target_spellings_of_the_upstream_are_accepted(target: str) -> None:
    """Case and one trailing root dot do not change the host."""
    assert check_target(target.encode(), HOST, 443) == (HOST, 443)


@pytest.mark.parametrize(
    "target",
    [
        b"app.publer.com:80",
        b"app.publer.com:0443",
        b"app.publer.com:+443",
        b"app.publer.com: 443",
        b"app.publer.com:443 ",
        b"app.publer.com",
        b"app.publer.com:",
        b":443",
        b"app.publer.com..:443",
        b".app.publer.com:443",
        b"app..publer.com:443",
        b"x.app.publer.com:443",
        b"app.publer.com.evil.example:443",
        b"app.publer.com@evil.example:443",
        b"evil.example:443",
        b"127.0.0.1:443",
        b"[::1]:443",
        b"[app.publer.com]:443",
        b"::1:443",
        b"2130706433:443",
        b"0x7f.1:443",
        b"017700000001:443",
        b"169.254.169.254:80",
        b"https://app.publer.com:443",
        b"//app.publer.com:443",
        b"app.publer.com/:443",
        b"app.publer.com%2e:443",
        b"app.publer.com\x00:443",
        b"app.publer.c\xc3\xb3m:443",
        b"app_publer.com:443",
    ],
)
def test_other_targets_are_refused(target: bytes) -> None:
    """Another host, port, IP literal or spelling is refused as tunnel_refused."""
    refused = check_target(target, HOST, 443)
    assert isinstance(refused, Refusal)
    assert refused.code == "tunnel_refused"
    assert refused.status == 403


@given(st.binary(max_size=40))
def test_no_target_but_the_upstream_is_ever_accepted(target: bytes) -> None:
    """Whatever the bytes, an accepted target is the upstream's host and port."""
    decided = check_target(target, HOST, 443)
    if not isinstance(decided, Refusal):
        assert decided == (HOST, 443)
        assert normalize_host(target.decode("ascii").rpartition(":")[0]) == HOST


def head(*lines: str) -> bytes:
    """A request head from its lines."""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_connect_carries_the_token_of_proxy_authorization() -> None:
    """Basic client:TOKEN, Basic TOKEN: and Bearer TOKEN all give TOKEN."""
    for value in (
        "Basic " + base64.b64encode(b"agent:tok").decode(),
        "Basic " + base64.b64encode(b"tok:").decode(),
        "Bearer tok",
        "Bearer-API tok",
    ):
        decided = decide_connect(
            head("CONNECT app.publer.com:443 HTTP/1.1", f"Proxy-Authorization: {value}"), HOST, 443
        )
        assert decided == Connect(HOST, 443, "tok"), value


@pytest.mark.parametrize(
    ("request_head", "code"),
    [
        (head("GET http://app.publer.com/ HTTP/1.1"), "tunnel_refused"),
        (head("GET /api/v1/users/me HTTP/1.1"), "tunnel_refused"),
        (head("connect app.publer.com:443 HTTP/1.1"), "tunnel_refused"),
        (head("CONNECT app.publer.com:443"), "bad_request"),
        (head("CONNECT  app.publer.com:443 HTTP/1.1"), "bad_request"),
        (head("CONNECT app.publer.com:443 HTTP/2"), "bad_request"),
        (head("CONNECT app.publer.com:443 HTTP/1.1", "Bad Header: x"), "bad_request"),
        (head("CONNECT app.publer.com:443 HTTP/1.1", "X: a\x00b"), "bad_request"),
        (b"CONNECT app.publer.com:443 HTTP/1.1\n\n", "bad_request"),
        (
            head(
                "CONNECT app.publer.com:443 HTTP/1.1",
                "Proxy-Authorization: Bearer a",
                "Proxy-Authorization: Bearer b",
            ),
            "proxy_unauthenticated",
        ),
        (head("CONNECT app.publer.com:443 HTTP/1.1", "Proxy-Authorization: Basic %%"), None),
        (
            head(
                "CONNECT app.publer.com:443 HTTP/1.1",
                "Proxy-Authorization: Basic " + base64.b64encode("a:tök".encode()).decode(),
            ),
            "proxy_unauthenticated",
        ),
    ],
)
def test_malformed_or_other_requests_are_refused(request_head: bytes, code: str | None) -> None:
    """Anything but a well-formed CONNECT to the upstream is refused with the right code."""
    decided = decide_connect(request_head, HOST, 443)
    assert isinstance(decided, Refusal)
    if code is not None:
        assert decided.code == code


def test_proxy_token_absent_is_none() -> None:
    """No Proxy-Authorization: no token, and no refusal (identity may come inside)."""
    assert proxy_token([(b"host", b"app.publer.com:443")]) is None


@pytest.mark.parametrize(
    ("hosts", "ok"),
    [
        ([b"app.publer.com"], True),
        ([b"APP.publer.com."], True),
        ([b"app.publer.com:443"], True),
        ([b"app.publer.com:8443"], False),
        ([b"app.publer.com:"], False),
        ([b"evil.example"], False),
        ([b"127.0.0.1"], False),
        ([b"app.publer.com", b"app.publer.com"], False),
        ([], False),
        ([b"app.publer.com@evil.example"], False),
        ([b"app.publer.com\xff"], False),
    ],
)
def test_host_inside_the_tunnel(hosts: list[bytes], ok: bool) -> None:
    """Exactly one Host naming the tunnel's target passes."""
    assert host_matches(hosts, HOST, 443) is ok


def routes(*specs: dict[str, Any]) -> Any:
    """Built routes from settings dicts."""
    return build_routes(
        [
            RouteSettings.model_validate({"credential": "publer", "scopes": ["users"], **s})
            for s in specs
        ]
    )


def client(name: str, token: str) -> list[dict[str, str]]:
    """A route's clients: one, with this token."""
    return [{"name": name, "token_sha256": hash_token(token)}]


def test_route_by_token_else_open_route() -> None:
    """A client's token picks its route; no token or an unknown one gets the open route."""
    built = routes(
        {
            "name": "a",
            "prefix": "/a",
            "clients": [{"name": "ca", "token_sha256": hash_token("ta")}],
        },
        {
            "name": "b",
            "prefix": "/b",
            "clients": [{"name": "cb", "token_sha256": hash_token("tb")}],
        },
        {"name": "open", "prefix": "/open"},
        {"name": "root"},
    )
    assert tunnel_route(built, "ta").name == "a"
    assert tunnel_route(built, "tb").name == "b"
    assert tunnel_route(built, None).name == "root"
    assert tunnel_route(built, "unknown").name == "root"
    closed = routes({"name": "a", "prefix": "/a", "clients": client("ca", "ta")})
    assert tunnel_route(closed, None).name == "a"  # which then refuses: no valid token


def test_generated_ca_is_limited_by_a_critical_name_constraint() -> None:
    """The CA permits only the host, excludes every IP, and marks the constraint critical."""
    cert, _key = generate_ca(HOST)
    found = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert found.critical
    assert found.value.permitted_subtrees == [x509.DNSName(HOST)]
    assert x509.DNSName(f".{HOST}") in (found.value.excluded_subtrees or [])
    assert constraint_problem(cert, HOST) is None
    assert constraint_problem(cert, "other.example") is not None
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0


def constraint_of(host: str) -> x509.NameConstraints:
    """The name constraint a generated CA for `host` carries."""
    return generate_ca(host)[0].extensions.get_extension_for_class(x509.NameConstraints).value


def _ca_with(extensions: list[tuple[x509.ExtensionType, bool]]) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256()), key


def test_a_ca_from_elsewhere_must_be_limited_to_the_host() -> None:
    """A CA without the constraint, with it not critical, or for another name is refused."""
    basic = (x509.BasicConstraints(ca=True, path_length=0), True)
    dns_only = x509.NameConstraints(permitted_subtrees=[x509.DNSName(HOST)], excluded_subtrees=None)
    limited = constraint_of(HOST)
    below_allowed = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(HOST)],
        excluded_subtrees=[
            e for e in limited.excluded_subtrees or [] if isinstance(e, x509.IPAddress)
        ],
    )
    cases: list[list[tuple[x509.ExtensionType, bool]]] = [
        [basic],
        [basic, (dns_only, True)],  # IP addresses not excluded
        [basic, (below_allowed, True)],  # x.host would be vouched for
        [basic, (limited, False)],  # not critical: a client may ignore it
        [basic, (constraint_of("evil.example"), True)],
        [(limited, True)],  # not a CA
    ]
    for extensions in cases:
        cert, key = _ca_with(extensions)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with pytest.raises(CAError):
            InterceptionCA.from_pem(pem, key_pem, HOST)


def test_a_ca_from_pem_round_trips_and_checks_its_key() -> None:
    """The CA's own PEM loads back; another key is refused."""
    cert, key = generate_ca(HOST)
    pem = cert.public_bytes(serialization.Encoding.PEM)

    def pkcs8(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    assert InterceptionCA.from_pem(pem, pkcs8(key), HOST).fingerprint.count(":") == 31
    with pytest.raises(CAError, match="does not belong"):
        InterceptionCA.from_pem(pem, pkcs8(ec.generate_private_key(ec.SECP256R1())), HOST)


def test_leaf_is_short_lived_and_renewed_at_half_life() -> None:
    """The leaf names only the host, lives the configured time, and is replaced half-way."""
    ca = InterceptionCA.generate(HOST, leaf_lifetime=dt.timedelta(hours=2))
    now = dt.datetime.now(dt.UTC)
    first = ca.leaf(now)
    assert ca.leaf(now + dt.timedelta(minutes=50)) is first
    second = ca.leaf(now + dt.timedelta(minutes=70))
    assert second is not first
    chain, _key = ca.issue(HOST, now)
    leaf = x509.load_pem_x509_certificate(chain)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(hours=2, minutes=5)
    with pytest.raises(CAError):
        ca.issue("evil.example")
    assert "PRIVATE" not in repr(ca)


def settings_with(**forward: Any) -> dict[str, Any]:
    """A config with one open route and a forward proxy."""
    return {
        "credentials": {"publer": {"path": "publer/api"}},
        "routes": [{"name": "open", "credential": "publer", "scopes": ["users"]}],
        "forward_proxy": {"ca_certificate_file": "/run/publer-proxy/ca.pem", **forward},
    }


def test_open_route_with_forward_proxy_beyond_loopback_is_a_config_error() -> None:
    """An open route and a forward proxy listening beyond loopback: the key path is named."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(settings_with(host="0.0.0.0"))
    assert any(line.startswith("forward_proxy.host:") for line in caught.value.problems)
    assert parse_settings(settings_with()).forward_proxy is not None


def test_forward_proxy_port_must_differ_from_the_listen_port() -> None:
    """The two listeners on one port is a config error naming forward_proxy.port."""
    data = settings_with(port=8080)
    data["listen"] = {"port": 8080}
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    assert any(line.startswith("forward_proxy.port:") for line in caught.value.problems)


def test_forward_proxy_needs_an_https_upstream_named_by_dns() -> None:
    """Tunnels are opened to a name: an IP-literal or plain-HTTP upstream is a config error."""
    for url in ("https://203.0.113.7", "http://127.0.0.1:8090", "https://[::1]:8443"):
        data = settings_with()
        data["upstream"] = {"url": url}
        with pytest.raises(ConfigError) as caught:
            parse_settings(data)
        assert any("upstream.connect_to" in line for line in caught.value.problems), url


def test_forward_proxy_changes_need_a_restart() -> None:
    """A reload that turns the forward proxy on or off, or changes it, is refused by key."""
    from proxy.reload import restart_only_changes

    without = parse_settings({k: v for k, v in settings_with().items() if k != "forward_proxy"})
    with_it = parse_settings(settings_with())
    moved = parse_settings(settings_with(port=3129))
    assert [line.split(":")[0] for line in restart_only_changes(without, with_it)] == [
        "forward_proxy"
    ]
    assert [line.split(":")[0] for line in restart_only_changes(with_it, moved)] == [
        "forward_proxy.port"
    ]
    assert restart_only_changes(with_it, parse_settings(settings_with())) == []
