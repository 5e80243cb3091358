"""The forward proxy against clients that try to use it as an open proxy or to mislead it.

Raw sockets, so every byte on the wire is the test's: CONNECT to other hosts, ports and
addresses (Vault's, the proxy's own), spellings of the right host, a second request in a
tunnel naming another host, SNI naming another host, and a ClientHello sent in the same
write as the CONNECT. Nothing refused may reach the stand-in of Publer.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.ca import InterceptionCA, generate_ca
from tests.bao import Bao
from tests.test_tunnel_clients import header
from tests.tunnel_stack import PUBLER_HOST, TunnelStack, start_tunnel_stack

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, api_key: str
) -> Iterator[TunnelStack]:
    """The proxy with its forward-proxy listener, in front of app.publer.com's stand-in."""
    built = start_tunnel_stack(tmp_path_factory.mktemp("tunnel-hostile"), bao, token_file, api_key)
    yield built
    built.proxy.stop()
    built.sandbox.stop()


def read_head(sock: socket.socket) -> bytes:
    """Read up to the end of an HTTP head, one byte at a time (nothing of what follows)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return head


def read_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def connect_raw(stack: TunnelStack, request: bytes) -> bytes:
    """Send a request head to the forward proxy; its whole answer (it must close after)."""
    with socket.create_connection(("127.0.0.1", stack.forward_port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        return read_all(sock)


def open_tunnel(stack: TunnelStack, target: str = f"{PUBLER_HOST}:443") -> socket.socket:
    """A socket with an established tunnel (the 200 read), TLS not started."""
    sock = socket.create_connection(("127.0.0.1", stack.forward_port), timeout=TIMEOUT)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock


def client_context(stack: TunnelStack) -> ssl.SSLContext:
    """A client TLS context trusting the proxy's CA only."""
    return ssl.create_default_context(cafile=str(stack.ca_file))


def refused_targets(stack: TunnelStack, bao: Bao) -> list[str]:
    """CONNECT targets that must each be refused."""
    proxy_port = stack.proxy.url.rsplit(":", 1)[1]
    return [
        "evil.example:443",
        f"{PUBLER_HOST}:80",
        f"{PUBLER_HOST}:8443",
        f"{PUBLER_HOST}:0443",
        f"{PUBLER_HOST}:443:443",
        f"{PUBLER_HOST}",
        f"{PUBLER_HOST}..:443",
        f"x.{PUBLER_HOST}:443",
        f"{PUBLER_HOST}.evil.example:443",
        "127.0.0.1:443",
        "[::1]:443",
        "2130706433:443",
        "0x7f.1:443",
        "169.254.169.254:80",
        f"127.0.0.1:{bao.port}",
        f"localhost:{bao.port}",
        f"127.0.0.1:{proxy_port}",
        f"127.0.0.1:{stack.forward_port}",
        f"localhost:{stack.forward_port}",
        f"https://{PUBLER_HOST}:443",
        f"{PUBLER_HOST}%2e:443",
        f"{PUBLER_HOST}\t:443",
    ]


def test_connect_elsewhere_is_refused(stack: TunnelStack, bao: Bao) -> None:
    """Every CONNECT target but the upstream's host:443 is refused with 403 and closed."""
    stack.sandbox.clear()
    for target in refused_targets(stack, bao):
        answer = connect_raw(stack, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 "), (target, answer)
        assert b"x-publer-proxy-error: tunnel_refused" in head.lower(), target
        assert json.loads(body)["code"] == "tunnel_refused"
    assert stack.sandbox.requests() == []
    metrics = subprocess.run(
        ["curl", "-sS", f"{stack.proxy.url}/metrics"], capture_output=True, timeout=30, check=True
    ).stdout.decode()
    assert 'publer_proxy_refusals_total{code="tunnel_refused"}' in metrics
    assert 'publer_proxy_tunnels_total{outcome="tunnel_refused"}' in metrics


def test_other_methods_and_absolute_form_are_refused(stack: TunnelStack) -> None:
    """A plain-proxy GET for another origin (http://) or an origin-form request opens nothing
    (absolute form for https://app.publer.com itself is served: see test_tunnel_forms)."""
    stack.sandbox.clear()
    for request in (
        f"GET http://{PUBLER_HOST}/api/v1/users/me HTTP/1.1\r\nHost: {PUBLER_HOST}\r\n\r\n",
        "GET /api/v1/users/me HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        f"POST {PUBLER_HOST}:443 HTTP/1.1\r\nHost: {PUBLER_HOST}\r\n\r\n",
    ):
        answer = connect_raw(stack, request.encode())
        assert answer.startswith(b"HTTP/1.1 403 "), answer
    for malformed in (b"CONNECT app.publer.com:443\r\n\r\n", b"\x00\x03\x01\x00\x05hi\r\n\r\n"):
        assert connect_raw(stack, malformed).startswith(b"HTTP/1.1 400 ")
    assert stack.sandbox.requests() == []


def test_tls_instead_of_connect_is_closed_at_once(stack: TunnelStack) -> None:
    """A client told https:// for the proxy URL sends TLS first: it is closed, not left waiting."""
    context = ssl.create_default_context(cafile=str(stack.ca_file))
    with (
        socket.create_connection(("127.0.0.1", stack.forward_port), timeout=3) as sock,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        context.wrap_socket(sock, server_hostname=PUBLER_HOST)
    deadline = time.monotonic() + 5
    while "TLS arrived where a CONNECT was expected" not in stack.proxy.output():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_spellings_of_the_right_host_open_a_tunnel(stack: TunnelStack) -> None:
    """Upper case and the trailing root dot name the same host: the tunnel opens."""
    for target in ("APP.Publer.COM:443", f"{PUBLER_HOST}.:443"):
        open_tunnel(stack, target).close()


def test_wrong_proxy_authorization_is_refused(stack: TunnelStack) -> None:
    """A Proxy-Authorization with a token no client has is 407, before any tunnel."""
    basic = base64.b64encode(b"agent:not-a-token").decode()
    for value in (f"Basic {basic}", "Bearer not-a-token", "Digest abc", "Basic !!"):
        request = f"CONNECT {PUBLER_HOST}:443 HTTP/1.1\r\nProxy-Authorization: {value}\r\n\r\n"
        answer = connect_raw(stack, request.encode())
        assert answer.startswith(b"HTTP/1.1 407 "), (value, answer)
        assert b"proxy-authenticate: Basic" in answer


def get(host: str) -> bytes:
    """A GET of /users/me naming `host`, on a kept-alive connection."""
    return f"GET /api/v1/users/me HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def read_response(tls: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One response with a Content-Length: its head and its body."""
    head = read_head(tls)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = b""
    while len(body) < length:
        body += tls.recv(length - len(body))
    return head, body


def test_second_request_to_another_host_is_refused(stack: TunnelStack) -> None:
    """Inside one tunnel, a request whose Host is not the tunnel's target gets 421."""
    stack.sandbox.clear()
    sock = open_tunnel(stack)
    with client_context(stack).wrap_socket(sock, server_hostname=PUBLER_HOST) as tls:
        tls.sendall(get(PUBLER_HOST))
        head, _ = read_response(tls)
        assert head.startswith(b"HTTP/1.1 200 ")
        for other in ("evil.example", "127.0.0.1", f"{PUBLER_HOST}:8443", "localhost"):
            tls.sendall(get(other))
            head, body = read_response(tls)
            assert head.startswith(b"HTTP/1.1 421 "), (other, head)
            assert json.loads(body)["code"] == "misdirected_request"
    assert len(stack.sandbox.requests()) == 1


def test_sni_naming_another_host_fails_the_handshake(stack: TunnelStack) -> None:
    """A ClientHello whose SNI names another host gets no certificate at all."""
    context = ssl.create_default_context(cafile=str(stack.ca_file))
    context.check_hostname = False
    sock = open_tunnel(stack)
    with pytest.raises(ssl.SSLError):
        context.wrap_socket(sock, server_hostname="evil.example").close()
    sock.close()


def test_client_hello_in_the_same_write_as_connect(stack: TunnelStack, api_key: str) -> None:
    """Bytes sent right after the CONNECT head (no wait for 200) reach the TLS layer."""
    stack.sandbox.clear()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(stack).wrap_bio(incoming, outgoing, server_hostname=PUBLER_HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", stack.forward_port), timeout=TIMEOUT) as sock:
        sock.sendall(f"CONNECT {PUBLER_HOST}:443 HTTP/1.1\r\n\r\n".encode() + hello)
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        tls.write(get(PUBLER_HOST))
        sock.sendall(outgoing.read())
        answer = b""
        while b"Sandbox User" not in answer:
            incoming.write(sock.recv(65536))
            while True:  # one read may bring several records (a session ticket, the answer)
                try:
                    answer += tls.read(65536)
                except ssl.SSLWantReadError:
                    break
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert header(stack.sandbox.requests()[-1], "authorization") == [f"Bearer-API {api_key}"]


def test_tunnel_speaks_http11_only(stack: TunnelStack) -> None:
    """A client offering h2 by ALPN is told http/1.1."""
    context = client_context(stack)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with context.wrap_socket(open_tunnel(stack), server_hostname=PUBLER_HOST) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"


def test_refusals_never_leak_the_token_or_key(stack: TunnelStack, api_key: str) -> None:
    """Neither the client token nor the key appears in anything the proxy printed."""
    basic = base64.b64encode(f"agent:{stack.client_token}".encode()).decode()
    request = f"CONNECT evil.example:443 HTTP/1.1\r\nProxy-Authorization: Basic {basic}\r\n\r\n"
    assert connect_raw(stack, request.encode()).startswith(b"HTTP/1.1 403 ")
    output = stack.proxy.output()
    assert stack.client_token not in output
    assert api_key not in output


def serve_once(context: ssl.SSLContext) -> tuple[int, threading.Thread]:
    """A loopback TLS server that does one handshake; its port and thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return port, thread


def test_ca_signed_certificate_for_another_name_is_rejected(tmp_path: Path) -> None:
    """A leaf the CA signs for another name fails the name constraint in Python, curl, Node."""
    cert, key = generate_ca(PUBLER_HOST)
    ca = InterceptionCA(cert, key, PUBLER_HOST)
    ca_file = tmp_path / "ca.pem"
    ca.write_certificate(ca_file)
    # The CA refuses to issue it; forge it with the CA's key as a thief would.
    with pytest.raises(Exception, match="only"):
        ca.issue("evil.example")
    forged = InterceptionCA.__new__(InterceptionCA)
    forged.__dict__.update(ca.__dict__, host="evil.example")
    chain, leaf_key = forged.issue("evil.example")
    (tmp_path / "leaf.pem").write_bytes(chain)
    (tmp_path / "leaf.key").write_bytes(leaf_key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")

    port, thread = serve_once(server)
    client = ssl.create_default_context(cafile=str(ca_file))
    with (
        pytest.raises(ssl.SSLCertVerificationError, match="subtree"),
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
    ):
        client.wrap_socket(sock, server_hostname="evil.example")
    thread.join(TIMEOUT)

    port, thread = serve_once(server)
    done = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca_file),
         "--connect-to", f"evil.example:443:127.0.0.1:{port}", "https://evil.example/"],
        capture_output=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    thread.join(TIMEOUT)
    assert done.returncode == 60, done.stderr  # CURLE_PEER_FAILED_VERIFICATION
    assert b"permitted subtree violation" in done.stderr, done.stderr

    port, thread = serve_once(server)
    program = (
        "const tls = require('node:tls');"
        f"const s = tls.connect({{host: '127.0.0.1', port: {port}, servername: 'evil.example'}});"
        "s.on('secureConnect', () => { console.log('ACCEPTED'); s.destroy(); });"
        "s.on('error', (e) => { console.log('REJECTED ' + e.message); });"
    )
    done = subprocess.run(
        ["node", "-e", program],
        env={"PATH": os.environ["PATH"], "NODE_EXTRA_CA_CERTS": str(ca_file)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    thread.join(TIMEOUT)
    assert done.stdout.startswith(b"REJECTED permitted subtree violation"), done.stdout


@pytest.mark.parametrize(
    "name", [f"x.{PUBLER_HOST}", f"a.b.{PUBLER_HOST}", f"evil-{PUBLER_HOST}", f"evil{PUBLER_HOST}"]
)
def test_ca_vouches_for_no_name_below_or_beside_the_host(tmp_path: Path, name: str) -> None:
    """A leaf the CA's key signs for a subdomain or a look-alike fails in Python and curl."""
    cert, key = generate_ca(PUBLER_HOST)
    ca = InterceptionCA(cert, key, PUBLER_HOST)
    ca_file = tmp_path / "ca.pem"
    ca.write_certificate(ca_file)
    forged = InterceptionCA.__new__(InterceptionCA)
    forged.__dict__.update(ca.__dict__, host=name)
    chain, leaf_key = forged.issue(name)
    (tmp_path / "leaf.pem").write_bytes(chain)
    (tmp_path / "leaf.key").write_bytes(leaf_key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")

    port, thread = serve_once(server)
    client = ssl.create_default_context(cafile=str(ca_file))
    with (
        pytest.raises(ssl.SSLCertVerificationError, match="subtree violation"),
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
    ):
        client.wrap_socket(sock, server_hostname=name)
    thread.join(TIMEOUT)

    port, thread = serve_once(server)
    done = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca_file),
         "--connect-to", f"{name}:443:127.0.0.1:{port}", f"https://{name}/"],
        capture_output=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    thread.join(TIMEOUT)
    assert done.returncode == 60, done.stderr  # CURLE_PEER_FAILED_VERIFICATION
    assert b"subtree violation" in done.stderr, done.stderr
