"""Which headers pass each way: a table of hostile header lists, and a property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rules.headers import (
    downstream_headers,
    request_body_length,
    response_body_length,
    upstream_headers,
)

KEY = "pk_headers_test_1234"


def _up(
    headers: list[tuple[bytes, bytes]], workspace: str | None = "ws1"
) -> list[tuple[bytes, bytes]]:
    return upstream_headers(
        headers,
        host=b"app.publer.com",
        api_key=KEY,
        workspace=workspace,
        request_id="rid-12345678",
        content_length=None,
    )


def test_client_credentials_and_hops_are_dropped() -> None:
    """Authorization, cookies, forwarding and hop-by-hop headers never go upstream."""
    sent = _up(
        [
            (b"authorization", b"Bearer-API client"),
            (b"Authorization", b"Basic x"),
            (b"cookie", b"a=b"),
            (b"host", b"evil.test"),
            (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-forwarded-host", b"evil.test"),
            (b"forwarded", b"for=x"),
            (b"x-real-ip", b"1.2.3.4"),
            (b"via", b"1.1 x"),
            (b"proxy-authorization", b"Basic y"),
            (b"te", b"trailers"),
            (b"upgrade", b"websocket"),
            (b"keep-alive", b"timeout=5"),
            (b"trailer", b"x"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"close, X-Custom, Authorization"),
            (b"x-custom", b"drop"),
            (b"publer-workspace-id", b"other"),
            (b"x-app", b"keep"),
        ]
    )
    assert sent == [
        (b"host", b"app.publer.com"),
        (b"x-app", b"keep"),
        (b"accept-encoding", b"identity"),
        (b"x-request-id", b"rid-12345678"),
        (b"authorization", b"Bearer-API " + KEY.encode()),
        (b"publer-workspace-id", b"ws1"),
    ]


def test_response_keeps_repeated_values_and_drops_hops() -> None:
    """Set-Cookie values stay separate; Connection-named and hop-by-hop headers go."""
    back = downstream_headers(
        [
            (b"Set-Cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"connection", b"x-hop"),
            (b"x-hop", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"10"),
            (b"x-request-id", b"upstream-id"),
        ]
    )
    assert back == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"content-length", b"10")]


_NAMES = st.sampled_from(
    [
        b"authorization",
        b"Authorization",
        b"connection",
        b"cookie",
        b"publer-workspace-id",
        b"x-a",
        b"host",
        b"proxy-x",
        b"te",
    ]
)
_VALUES = st.sampled_from(
    [
        b"authorization",
        b"x",
        b"Bearer-API other",
        b"close, authorization",
        b"publer-workspace-id",
        b"keep-alive",
    ]
)


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=12))
def test_injected_key_and_workspace_always_survive(headers: list[tuple[bytes, bytes]]) -> None:
    """Whatever the client sends, exactly one Authorization (the key) and one workspace
    header leave, and one Host (the upstream's)."""
    sent = _up(headers)
    assert [v for k, v in sent if k == b"authorization"] == [b"Bearer-API " + KEY.encode()]
    assert [v for k, v in sent if k == b"publer-workspace-id"] == [b"ws1"]
    assert [v for k, v in sent if k == b"host"] == [b"app.publer.com"]
    assert all(k == k.lower() for k, _ in sent)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"content-length", b"12")], 12),
        ([(b"content-length", b" 0 ")], 0),
        ([(b"transfer-encoding", b"chunked")], -1),
        ([(b"transfer-encoding", b" Chunked ")], -1),
        ([(b"content-length", b"5"), (b"content-length", b"5")], 5),
    ],
)
def test_request_body_length(headers: list[tuple[bytes, bytes]], expected: int | None) -> None:
    """A request's framing gives its body length: bytes, -1 for chunked, None for none."""
    assert request_body_length(headers) == expected


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], "not both"),
        ([(b"content-length", b"5"), (b"content-length", b"6")], "malformed or repeated"),
        ([(b"content-length", b"-5")], "malformed or repeated"),
        ([(b"content-length", b"0x10")], "malformed or repeated"),
        ([(b"transfer-encoding", b"gzip, chunked")], "only Transfer-Encoding: chunked"),
        ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], "only"),
    ],
)
def test_ambiguous_request_framing_is_refused(
    headers: list[tuple[bytes, bytes]], message: str
) -> None:
    """Framing two servers could read differently raises, with a sentence for the client."""
    with pytest.raises(ValueError, match=message):
        request_body_length(headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"content-length", b"64")], 64),
        ([(b"content-length", b"abc")], None),
        ([(b"content-length", b"3"), (b"content-length", b"9")], 3),
    ],
)
def test_response_body_length(headers: list[tuple[bytes, bytes]], expected: int | None) -> None:
    """A response's Content-Length, or None when missing or not a number."""
    assert response_body_length(headers) == expected
