"""The forward-proxy listener's other forms: absolute-form requests (axios), refusals that
explain themselves, ALPN offers it cannot serve, and HTTP/1.0 inside a tunnel.

Real axios and raw sockets against a real proxy; the stand-in of Publer tells what arrived.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bao import Bao
from tests.test_tunnel_clients import (
    ACCOUNTS,
    assert_keyed_call,
    last_request,
    node,
    run_client,
)
from tests.test_tunnel_hostile import client_context, connect_raw, open_tunnel, read_all
from tests.tunnel_stack import (
    AGENT_WORKSPACE,
    CLIENTS_DIR,
    OPEN_WORKSPACE,
    PUBLER_HOST,
    TunnelStack,
    start_tunnel_stack,
)
from tests.waiting import eventually

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, api_key: str
) -> Iterator[TunnelStack]:
    """The proxy with its forward-proxy listener, in front of app.publer.com's stand-in."""
    built = start_tunnel_stack(tmp_path_factory.mktemp("tunnel-forms"), bao, token_file, api_key)
    yield built
    built.proxy.stop()
    built.sandbox.stop()


PLAIN_TEXT_AXIOS = "axios-plain-text"  # axios 1.16.0: absolute form to HTTPS_PROXY


def axios(stack: TunnelStack, proxy_url: str, package: str = PLAIN_TEXT_AXIOS, **extra: str) -> str:
    """Run an axios client with only HTTPS_PROXY (and what `extra` adds) set."""
    if not (CLIENTS_DIR / "node_modules" / package).is_dir():
        pytest.fail(f"{package} is not in tests/clients: run `make test` (it installs it)")
    env = stack.env(HTTPS_PROXY=proxy_url, **extra)
    return run_client([node(), str(CLIENTS_DIR / "axios_get.mjs"), ACCOUNTS, package], env)


def test_axios_with_only_https_proxy_and_the_token_as_api_key(
    stack: TunnelStack, api_key: str
) -> None:
    """axios (absolute form, plain text) with its client token as "API key" reaches Publer
    keyed, through the route of that token, and the access log says which form."""
    stack.sandbox.clear()
    output = axios(stack, stack.forward_url, PUBLER_API_KEY=stack.client_token)
    assert json.loads(output)["status"] == 200
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)
    events = [e for e in stack.proxy.events() if e.get("via") == "absolute-form"]
    assert events and events[-1]["route"] == "agents" and events[-1]["client"] == "agent"
    assert stack.client_token not in stack.proxy.output()


def test_axios_with_the_token_in_the_proxy_url(stack: TunnelStack, api_key: str) -> None:
    """axios with HTTPS_PROXY=http://agent:TOKEN@... sends Proxy-Authorization: the route of
    that token serves it."""
    stack.sandbox.clear()
    output = axios(stack, stack.forward_url_with_token())
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)


def test_current_axios_tunnels_with_the_ca_variable(stack: TunnelStack, api_key: str) -> None:
    """axios 1.16.1 and later tunnel with CONNECT: HTTPS_PROXY and NODE_EXTRA_CA_CERTS."""
    stack.sandbox.clear()
    output = axios(
        stack,
        stack.forward_url,
        "axios",
        PUBLER_API_KEY=stack.client_token,
        NODE_EXTRA_CA_CERTS=str(stack.ca_file),
    )
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)


def test_axios_without_a_token_takes_the_open_route(stack: TunnelStack, api_key: str) -> None:
    """axios with no token is served by the open route, as a tunnel would be."""
    stack.sandbox.clear()
    output = axios(stack, stack.forward_url)
    assert_keyed_call(stack, api_key, output, OPEN_WORKSPACE)


def absolute(target: str, host: str = PUBLER_HOST, extra: str = "") -> bytes:
    """An absolute-form GET, kept alive."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response with a Content-Length from a plain socket: head (lower case) and body."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head.lower(), body


def test_each_absolute_form_request_on_a_connection_is_checked(stack: TunnelStack) -> None:
    """On one kept-alive connection, a first request for Publer is served; later requests
    for another host, scheme or port, or in origin form, are refused and reach nothing."""
    stack.sandbox.clear()
    users = f"https://{PUBLER_HOST}/api/v1/users/me"
    with socket.create_connection(("127.0.0.1", stack.forward_port), timeout=TIMEOUT) as sock:
        sock.sendall(absolute(users))
        head, _ = read_response(sock)
        assert head.startswith(b"http/1.1 200 ")
        for request in (
            absolute("https://evil.example/api/v1/users/me", "evil.example"),
            absolute(f"http://{PUBLER_HOST}/api/v1/users/me"),
            absolute(f"https://{PUBLER_HOST}:8443/api/v1/users/me", f"{PUBLER_HOST}:8443"),
            absolute("https://127.0.0.1/api/v1/users/me", "127.0.0.1"),
            absolute(users, "evil.example"),
            b"GET /api/v1/users/me HTTP/1.1\r\nHost: app.publer.com\r\n\r\n",
        ):
            sock.sendall(request)
            head, body = read_response(sock)
            assert head.split(b" ")[1] in (b"403", b"421"), (request, head)
            assert b"proxy-status: publer-proxy; error=" in head
            assert json.loads(body)["code"] in ("tunnel_refused", "misdirected_request")
    assert len(stack.sandbox.requests()) == 1


def test_a_malformed_request_on_an_absolute_form_connection_explains_itself(
    stack: TunnelStack,
) -> None:
    """What the strict parser refuses on an absolute-form connection (ambiguous framing)
    is a 400 with Proxy-Status too, and reaches nothing."""
    stack.sandbox.clear()
    users = f"https://{PUBLER_HOST}/api/v1/users/me"
    smuggling = "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    answer = connect_raw(stack, absolute(users, extra=smuggling))
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"proxy-status: publer-proxy; error=http_request_error" in answer
    assert stack.sandbox.requests() == []


def test_absolute_form_for_another_origin_is_refused_before_anything(stack: TunnelStack) -> None:
    """A first absolute-form request for anything but Publer's origin is refused and closed."""
    stack.sandbox.clear()
    for request in (
        absolute("http://evil.example/", "evil.example"),
        absolute(f"http://{PUBLER_HOST}/api/v1/users/me"),
        absolute("https://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ):
        answer = connect_raw(stack, request)
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        assert b"proxy-status: publer-proxy; error=" in answer
    assert stack.sandbox.requests() == []


@pytest.mark.parametrize(
    ("target", "error", "logged"),
    [
        ("127.0.0.1:443", "destination_ip_prohibited", "127.0.0.1:443"),
        ("[::1]:8200", "destination_ip_prohibited", "[::1]:8200"),
        ("0x7f.1:443", "destination_ip_prohibited", "0x7f.1:443"),
        ("evil.example:443", "http_request_denied", "evil.example:443"),
        (f"{PUBLER_HOST}:80", "http_request_denied", f"{PUBLER_HOST}:80"),
    ],
)
def test_refused_connects_explain_themselves(
    stack: TunnelStack, target: str, error: str, logged: str
) -> None:
    """A refused CONNECT carries Proxy-Status with its error type, and its log line names
    the refused host and port, IP literals included."""
    answer = connect_raw(stack, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert f"proxy-status: publer-proxy; error={error}; details=".encode() in head
    eventually(
        lambda: any(
            e.get("event") == "tunnel_refused" and e.get("target") == logged
            for e in stack.proxy.events()
        ),
        timeout=10,
    )


@pytest.mark.parametrize("bad", ["\n", "\t", "\x00", "\x7f", " "])
def test_a_connect_authority_with_a_control_byte_is_refused(stack: TunnelStack, bad: str) -> None:
    """A line end, TAB, NUL, DEL or space inside the CONNECT authority opens no tunnel."""
    request = f"CONNECT {PUBLER_HOST}{bad}:443 HTTP/1.1\r\nHost: {PUBLER_HOST}:443\r\n\r\n"
    answer = connect_raw(stack, request.encode())
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 403 ")), answer
    assert b"proxy-status: publer-proxy; error=http_request_error" in answer


def test_a_connect_whose_host_names_another_host_is_refused(stack: TunnelStack) -> None:
    """CONNECT app.publer.com:443 with Host: evil.example opens no tunnel."""
    request = f"CONNECT {PUBLER_HOST}:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
    answer = connect_raw(stack, request.encode())
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert b"proxy-status: publer-proxy; error=http_request_error" in answer


def test_a_client_offering_only_h2_gets_the_no_application_protocol_alert(
    stack: TunnelStack,
) -> None:
    """ALPN h2 alone: the handshake fails with the fatal no_application_protocol alert."""
    context = client_context(stack)
    context.set_alpn_protocols(["h2"])
    sock = open_tunnel(stack)
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        context.wrap_socket(sock, server_hostname=PUBLER_HOST)
    sock.close()


def test_openssl_s_client_offering_h2_is_told_no_application_protocol(stack: TunnelStack) -> None:
    """`openssl s_client -alpn h2` through the tunnel reads the no_application_protocol alert."""
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-proxy",
            f"127.0.0.1:{stack.forward_port}",
            "-connect",
            f"{PUBLER_HOST}:443",
            "-servername",
            PUBLER_HOST,
            "-alpn",
            "h2",
        ],
        input=b"",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert b"no application protocol" in done.stderr.lower(), done.stderr


def test_a_client_offering_no_alpn_is_served(stack: TunnelStack) -> None:
    """A ClientHello without ALPN completes the handshake and is served."""
    context = client_context(stack)
    with context.wrap_socket(open_tunnel(stack), server_hostname=PUBLER_HOST) as tls:
        assert tls.selected_alpn_protocol() is None
        tls.sendall(f"GET /api/v1/users/me HTTP/1.1\r\nHost: {PUBLER_HOST}\r\n\r\n".encode())
        assert tls.recv(100).startswith(b"HTTP/1.1 200 ")


def test_http10_inside_a_tunnel_gets_an_unchunked_answer(stack: TunnelStack) -> None:
    """An HTTP/1.0 request inside a tunnel is answered without chunked framing, then closed."""
    stack.sandbox.clear()
    with client_context(stack).wrap_socket(open_tunnel(stack), server_hostname=PUBLER_HOST) as tls:
        tls.sendall(f"GET /api/v1/accounts HTTP/1.0\r\nHost: {PUBLER_HOST}\r\n\r\n".encode())
        received = read_all(tls)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert json.loads(body)  # the whole body, read to EOF, with no chunk sizes inside
    assert last_request(stack)["path"] == "/api/v1/accounts"
