"""Answers are screened for known secrets; proxy URLs are checked and shown masked."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.settings import ConfigError, parse_settings
from proxy.masking.responses import MAX_DECODED_BYTES, mask_body, mask_headers, screen_response
from proxy.masking.secrets import SecretRegistry, masked_url, url_secrets
from proxy.rules.headers import downstream_headers

KEY = "pk_live_0123456789abcdef0123456789abcdef"
TOKEN = "hvs.CAESIJ0aVaultTokenForTests"


def registry(*values: str) -> SecretRegistry:
    """A registry holding the given secrets."""
    secrets = SecretRegistry()
    for value in values:
        secrets.add(value)
    return secrets


SECRETS = registry(KEY, TOKEN)
REDACT = SECRETS.redact_bytes


def test_redact_bytes_masks_every_known_secret() -> None:
    """Each secret becomes `***` plus its last 4 characters; other bytes stay."""
    text = f"a {KEY} b {TOKEN} c {KEY}".encode()
    assert REDACT(text) == b"a ***cdef b ***ests c ***cdef"
    assert REDACT(b"nothing here") == b"nothing here"


@pytest.mark.parametrize(
    "header",
    [
        (b"www-authenticate", f"Bearer-API {KEY}".encode()),
        (b"x-echo", f'{{"authorization": "Bearer-API {KEY}"}}'.encode()),
        (b"set-cookie", f"session={TOKEN}; Path=/".encode()),
        (f"x-key-{KEY}".encode(), b"1"),
    ],
)
def test_header_holding_a_secret_is_masked(header: tuple[bytes, bytes]) -> None:
    """A secret in a header value or name never passes; the header itself stays."""
    (name, value) = mask_headers([header], REDACT)[0]
    assert KEY.encode() not in name + value
    assert TOKEN.encode() not in name + value
    assert b"***" in name + value


def test_small_body_is_masked_and_content_length_follows() -> None:
    """A body held whole is masked, and Content-Length is the masked body's length."""
    body = f'{{"errors": ["bad key Bearer-API {KEY}"]}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    out, masked = screen_response(headers, body, REDACT)
    assert masked == b'{"errors": ["bad key Bearer-API ***cdef"]}'
    assert out == [(b"content-type", b"application/json"), (b"content-length", b"42")]
    assert len(masked) == 42


def test_clean_answer_is_passed_as_it_is() -> None:
    """Without a secret, headers and body are unchanged (and the body not copied)."""
    body = b'{"id": 1}'
    headers = [(b"content-length", b"9"), (b"etag", b'"x"')]
    out, same = screen_response(headers, body, REDACT)
    assert out == headers
    assert same is body


@pytest.mark.parametrize(
    ("coding", "encode", "decode"),
    [
        (b"gzip", gzip.compress, gzip.decompress),
        (b"x-gzip", gzip.compress, gzip.decompress),
        (b"deflate", zlib.compress, zlib.decompress),
        (
            b"deflate",
            lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS),
            lambda data: zlib.decompress(data),
        ),
    ],
)
def test_compressed_small_body_is_checked_decoded(
    coding: bytes, encode: object, decode: object
) -> None:
    """gzip and deflate bodies (zlib-wrapped or raw) are decoded, masked, re-encoded."""
    assert callable(encode) and callable(decode)
    body = encode(f"echo: Bearer-API {KEY}".encode())
    headers = [(b"content-encoding", coding), (b"content-length", b"%d" % len(body))]
    out, masked = screen_response(headers, body, REDACT)
    assert masked is not None
    assert decode(masked) == b"echo: Bearer-API ***cdef"
    assert (b"content-length", b"%d" % len(masked)) in out


def test_unreadable_codings_pass_unchecked() -> None:
    """A coding this cannot read (br, several codings, a bomb over the cap) is left as is:
    the security model page says such bodies are not checked."""
    secret = f"Bearer-API {KEY}".encode()
    assert mask_body(secret, b"br", REDACT) == secret
    assert mask_body(secret, b"gzip, br", REDACT) == secret
    bomb = gzip.compress(secret + b"\0" * (MAX_DECODED_BYTES + 1))
    assert mask_body(bomb, b"gzip", REDACT) == bomb
    assert mask_body(b"not gzip", b"gzip", REDACT) == b"not gzip"


@given(
    prefix=st.binary(max_size=300),
    middle=st.binary(max_size=300),
    suffix=st.binary(max_size=300),
)
def test_no_secret_survives_screening(prefix: bytes, middle: bytes, suffix: bytes) -> None:
    """Whatever surrounds them, no secret is left in a screened body, and Content-Length
    always equals the length of the body that is sent."""
    body = prefix + KEY.encode() + middle + TOKEN.encode() + suffix
    headers = [(b"content-length", b"%d" % len(body))]
    out, masked = screen_response(headers, body, REDACT)
    assert masked is not None
    assert KEY.encode() not in masked
    assert TOKEN.encode() not in masked
    assert dict(out)[b"content-length"] == b"%d" % len(masked)


@pytest.mark.parametrize(
    "name",
    [
        b"X-Publer-Proxy-Error",
        b"x-publer-proxy-hint",
        b"X-PUBLER-PROXY-ANYTHING",
        b"X_Publer_Proxy_Error",
    ],
)
def test_upstream_cannot_imitate_the_proxy_markers(name: bytes) -> None:
    """Headers named like the proxy's own (any spelling) are dropped from answers."""
    out = downstream_headers([(name, b"forged"), (b"content-type", b"text/plain")])
    assert out == [(b"content-type", b"text/plain")]


@pytest.mark.parametrize(
    ("url", "shown", "secrets"),
    [
        ("http://proxy.internal:3128", "http://proxy.internal:3128", []),
        ("http://svc:s3cr%40t@proxy:3128", "http://svc:***@proxy:3128", ["s3cr%40t", "s3cr@t"]),
        ("https://:hunter22@proxy", "https://:***@proxy", ["hunter22", "hunter22"]),
        ("http://user@proxy:8080", "http://user@proxy:8080", []),
    ],
)
def test_proxy_url_shown_masked(url: str, shown: str, secrets: list[str]) -> None:
    """A proxy URL is shown without its password; the password is what gets registered."""
    assert masked_url(url) == shown
    assert url_secrets(url) == secrets


def config(**vault: object) -> dict[str, object]:
    """A minimal valid config, with extra vault keys."""
    return {
        "vault": {"url": "http://127.0.0.1:8200", **vault},
        "credentials": {"publer": {"path": "publer/api"}},
        "routes": [{"name": "default", "credential": "publer", "scopes": ["posts"]}],
    }


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("socks5://proxy:1080", "vault.proxy: must be an HTTP proxy URL"),
        ("proxy:3128", "vault.proxy: must be an HTTP proxy URL"),
        ("http://proxy:port", "vault.proxy: has a port that is not a number"),
        ("http://proxy:3128/path", "vault.proxy: must be a proxy address only"),
        ("http://u:topsecret1@proxy:x", "vault.proxy: has a port that is not a number"),
    ],
)
def test_bad_proxy_url_names_the_key_and_never_the_password(value: str, problem: str) -> None:
    """A bad vault.proxy is refused with its key path and the fix, without its password."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(config(proxy=value))
    text = "\n".join(caught.value.problems)
    assert problem in text
    assert "topsecret1" not in text


def test_config_passwords_are_secrets_and_proxies_never_in_reprs() -> None:
    """Settings list the proxy and Redis passwords for redaction; no repr shows a proxy
    URL."""
    data = config(proxy="http://svc:vaultpass1@proxy:3128")
    data["upstream"] = {"url": "https://app.publer.com", "proxy": "http://svc:uppass22@proxy:3128"}
    data["rate_limit"] = {"redis_url": "redis://:redis%2Fpw@127.0.0.1:6379/0"}
    settings = parse_settings(data)
    assert settings.secret_values() == [
        *("vaultpass1", "vaultpass1", "uppass22", "uppass22"),
        *("redis%2Fpw", "redis/pw"),
    ]
    assert "pass" not in repr(settings)
    assert settings.warnings() == [
        "vault.proxy: Vault is plain HTTP (http://127.0.0.1:8200), so the proxy"
        " http://svc:***@proxy:3128 sees the Vault token and the key; use https://"
    ]
