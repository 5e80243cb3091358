"""The forward-proxy listener's pure readings: a strict CONNECT, absolute-form targets,
Proxy-Status on refusals, what a log line may show of a target, the ClientHello's ALPN."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.connect import (
    AbsoluteForm,
    ClientHello,
    Connect,
    check_absolute,
    decide_connect,
    decide_request,
    logged_target,
    read_client_hello,
)
from proxy.errors import Refusal

HOST = "app.publer.com"
FORBIDDEN = [b"\r", b"\n", b"\t", b"\x00", b" ", b"\x7f", b"\x0b", b"\x0c"]


def head(*lines: bytes) -> bytes:
    """A request head from its lines."""
    return b"\r\n".join(lines) + b"\r\n\r\n"


def refused(decided: object) -> Refusal:
    """The refusal a decision must be."""
    assert isinstance(decided, Refusal), decided
    return decided


@pytest.mark.parametrize("bad", FORBIDDEN)
@pytest.mark.parametrize("at", [0, 3, 14, 15, 18])
def test_whitespace_or_control_anywhere_in_the_authority_is_refused(bad: bytes, at: int) -> None:
    """CR, LF, TAB, NUL, space, DEL at any place of the CONNECT target: refused, not trimmed."""
    target = b"app.publer.com:443"
    spliced = target[:at] + bad + target[at:]
    decided = decide_connect(head(b"CONNECT " + spliced + b" HTTP/1.1"), HOST, 443)
    assert refused(decided).status in (400, 403)


def test_a_line_end_before_the_port_is_refused() -> None:
    """`app.publer.com<LF>:443` was once accepted: `$` matched before the newline."""
    decided = decide_connect(head(b"CONNECT app.publer.com\n:443 HTTP/1.1"), HOST, 443)
    assert refused(decided).proxy_status == "http_request_error"


@given(st.sampled_from(FORBIDDEN), st.integers(min_value=0, max_value=18))
def test_no_spliced_control_byte_is_ever_accepted(bad: bytes, at: int) -> None:
    """Whatever the place, a target with a control or whitespace byte is never a Connect."""
    target = b"app.publer.com:443"
    spliced = target[:at] + bad + target[at:]
    assert isinstance(
        decide_connect(head(b"CONNECT " + spliced + b" HTTP/1.1"), HOST, 443), Refusal
    )


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        (b"app.publer.com:443", True),
        (b"app.publer.com", True),
        (b"APP.publer.com.:443", True),
        (b"evil.example:443", False),
        (b"app.publer.com:8443", False),
        (b"127.0.0.1:443", False),
    ],
)
def test_a_host_header_must_agree_with_the_connect_target(host: bytes, ok: bool) -> None:
    """CONNECT app.publer.com:443 with a Host naming anything else is refused."""
    decided = decide_connect(
        head(b"CONNECT app.publer.com:443 HTTP/1.1", b"Host: " + host), HOST, 443
    )
    if ok:
        assert decided == Connect(HOST, 443, None)
    else:
        assert refused(decided).code == "tunnel_refused"


def test_two_host_headers_are_refused() -> None:
    """Two Host fields, even both right, are refused."""
    decided = decide_connect(
        head(b"CONNECT app.publer.com:443 HTTP/1.1", b"Host: app.publer.com", b"Host: x.example"),
        HOST,
        443,
    )
    refused(decided)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        (b"127.0.0.1:443", "destination_ip_prohibited"),
        (b"[::1]:443", "destination_ip_prohibited"),
        (b"2130706433:443", "destination_ip_prohibited"),
        (b"evil.example:443", "http_request_denied"),
        (b"app.publer.com:80", "http_request_denied"),
        (b"app.publer.com", "http_request_error"),
        (b"app.publer.com:443\x00", "http_request_error"),
    ],
)
def test_refusals_carry_the_proxy_status_of_their_case(target: bytes, error: str) -> None:
    """Each refused CONNECT names its RFC 9209 error type in Proxy-Status."""
    refusal = refused(decide_connect(head(b"CONNECT " + target + b" HTTP/1.1"), HOST, 443))
    assert refusal.proxy_status == error
    value = dict(refusal.headers(0))[b"proxy-status"]
    assert value.startswith(b"publer-proxy; error=" + error.encode() + b'; details="')
    assert value.isascii() and b"\r" not in value and b"\n" not in value


@given(st.text(max_size=60))
def test_proxy_status_details_are_always_a_valid_string(message: str) -> None:
    """Whatever the message, the details are a structured-field string: printable ASCII,
    quotes and backslashes escaped, nothing that ends the header line."""
    refusal = Refusal.of("tunnel_refused", message, proxy_status="http_request_denied")
    value = refusal.proxy_status_value()
    details = value.split(b'details="', 1)[1]
    assert details.endswith(b'"')
    inner = details[:-1]
    assert all(0x20 <= b <= 0x7E for b in value)
    assert b'"' not in inner.replace(b'\\"', b"").replace(b"\\\\", b"")


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"https://app.publer.com/api/v1/users/me", b"/api/v1/users/me"),
        (b"https://APP.publer.com./api/v1/users/me", b"/api/v1/users/me"),
        (b"HTTPS://app.publer.com:443/api/v1/posts", b"/api/v1/posts"),
    ],
)
def test_absolute_form_for_the_upstream_gives_its_path(target: bytes, path: bytes) -> None:
    """An absolute-form target naming the upstream's origin gives the path it names."""
    assert check_absolute(target, HOST, 443) == path


@pytest.mark.parametrize(
    "target",
    [
        b"http://app.publer.com/api/v1/users/me",
        b"https://app.publer.com:8443/api/v1/users/me",
        b"https://evil.example/api/v1/users/me",
        b"https://app.publer.com.evil.example/api/v1/users/me",
        b"https://user:pw@app.publer.com/api/v1/users/me",
        b"https://app.publer.com@evil.example/api/v1/users/me",
        b"https://127.0.0.1/api/v1/users/me",
        b"https://[::1]/api/v1/users/me",
        b"https://app.publer.com?x=/api",
        b"https://app.publer.com/api/v1/users/me\x00",
        b"https://app.publer.com\n/api/v1/users/me",
        b"ftp://app.publer.com/api",
        b"app.publer.com/api",
        b"//app.publer.com/api",
    ],
)
def test_every_other_absolute_form_target_is_refused(target: bytes) -> None:
    """Other schemes, hosts, ports, userinfo, IP literals and control bytes are refused."""
    refused(check_absolute(target, HOST, 443))


def test_absolute_form_is_served_to_loopback_clients_only() -> None:
    """The plain-text form is decided only for a loopback client; from elsewhere it is refused."""
    request = head(b"GET https://app.publer.com/api/v1/users/me HTTP/1.1", b"Host: app.publer.com")
    assert decide_request(request, HOST, 443, loopback=True) == AbsoluteForm(b"/api/v1/users/me")
    refusal = refused(decide_request(request, HOST, 443, loopback=False))
    assert refusal.proxy_status == "http_request_denied"


def test_absolute_form_with_a_host_naming_another_host_is_refused() -> None:
    """`GET https://app.publer.com/...` with `Host: evil.example` is refused."""
    request = head(b"GET https://app.publer.com/api/v1/users/me HTTP/1.1", b"Host: evil.example")
    refused(decide_request(request, HOST, 443, loopback=True))


@given(st.binary(max_size=60))
def test_no_absolute_target_but_the_upstreams_is_ever_accepted(target: bytes) -> None:
    """Whatever the bytes, an accepted absolute-form target names https://app.publer.com."""
    decided = check_absolute(target, HOST, 443)
    if not isinstance(decided, Refusal):
        scheme, _, rest = target.decode("ascii").lower().partition("://")
        authority, slash, _ = rest.partition("/")
        assert scheme == "https" and slash == "/"
        assert authority in {HOST, HOST + ".", HOST + ":443", HOST + ".:443"}
        assert target.endswith(decided)


@given(
    st.sampled_from(["https://app.publer.com", "https://APP.publer.com.:443"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
)
def test_any_visible_path_of_the_origin_is_passed_on_as_sent(origin: str, path: str) -> None:
    """For the upstream's origin, the path (what the reverse proxy's checks judge) is passed
    on byte for byte; nothing before it leaks into it."""
    target = f"{origin}/{path}".encode()
    assert check_absolute(target, HOST, 443) == f"/{path}".encode()


@pytest.mark.parametrize(
    ("request_line", "shown"),
    [
        (b"CONNECT 127.0.0.1:443 HTTP/1.1", "127.0.0.1:443"),
        (b"CONNECT [::1]:22 HTTP/1.1", "[::1]:22"),
        (b"CONNECT a\x00b:443 HTTP/1.1", "a\\x00b:443"),
        (b"GET https://u:secret@evil.example/x?token=secret HTTP/1.1", "https://evil.example"),
    ],
)
def test_the_logged_target_names_host_and_port_and_never_a_secret(
    request_line: bytes, shown: str
) -> None:
    """A refusal's log line names the target (IP literals too), never userinfo or a query."""
    assert logged_target(head(request_line)) == shown


def client_hello(alpn: list[str] | None) -> bytes:
    """The first flight of a real Python TLS client offering `alpn`."""
    context = ssl.create_default_context()
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    ("alpn", "offered"),
    [(["h2"], (b"h2",)), (["h2", "http/1.1"], (b"h2", b"http/1.1")), (None, None)],
)
def test_the_alpn_offer_of_a_real_client_hello(
    alpn: list[str] | None, offered: tuple[bytes, ...] | None
) -> None:
    """The ALPN names of a ClientHello are read as offered; none when it offers none."""
    assert read_client_hello(client_hello(alpn)) == ClientHello(offered)


def test_a_client_hello_in_pieces_waits_for_the_whole_record() -> None:
    """Until the first record has arrived whole there is no answer yet."""
    hello = client_hello(["h2"])
    for cut in (0, 3, 5, len(hello) // 2, len(hello) - 1):
        assert read_client_hello(hello[:cut]) is None


@given(st.binary(max_size=300))
def test_any_bytes_give_an_answer_or_wait(data: bytes) -> None:
    """Garbage never raises: it reads as an offer, no offer, or not yet whole."""
    result = read_client_hello(data)
    assert result is None or isinstance(result, ClientHello)


@pytest.mark.parametrize(
    ("request_line", "named"),
    [
        (b"CONNECT evil.example:443 HTTP/1.1", "list it in NO_PROXY"),
        (b"CONNECT 10.0.0.1:443 HTTP/1.1", "to reach 10.0.0.1 directly, list it in NO_PROXY"),
        (b"CONNECT [::1]:8200 HTTP/1.1", "to reach [::1] directly, list it in NO_PROXY"),
        (b"GET https://[::1]/x HTTP/1.1", "to reach [::1] directly, list it in NO_PROXY"),
    ],
)
def test_a_refused_host_is_told_to_go_in_no_proxy(request_line: bytes, named: str) -> None:
    """A refusal for another host says how the client reaches it: NO_PROXY."""
    request = head(request_line, b"Host: x")
    refusal = refused(decide_request(request, HOST, 443, loopback=True))
    assert named in refusal.message
