"""HTTP/1.0 clients on the reverse path get responses they can read: never chunked framing.

An HTTP/1.0 client knows no Transfer-Encoding: a chunked body would reach it with the chunk
sizes inside. Raw sockets send `GET ... HTTP/1.0` and read to EOF; a scripted origin
answers chunked, with a Content-Length, to HEAD, and with 204 and 304.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bao import Bao
from tests.origins import Origin, Request, Step, Write
from tests.servers import Proxy, proxy_config, start_proxy

CHUNKS = [b"first-part;", b"second-part;", b"last"]


def script(request: Request) -> list[Step]:
    """Each case answers as its name says."""
    case = request.query.get("case")
    if case == "chunked":
        body = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"
        return [Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)]
    if case == "length":
        return [Write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")]
    if case == "head":
        return [Write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")]
    if case == "no-content":
        return [Write(b"HTTP/1.1 204 No Content\r\n\r\n")]
    if case == "not-modified":
        return [Write(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n')]
    raise AssertionError(f"unknown case {case}")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path) -> Iterator[Proxy]:
    """The proxy in front of the scripted origin."""
    with Origin(script) as origin:
        config = proxy_config(bao.url, origin.url, token_file=token_file)
        config["upstream"] = {"url": origin.url, "retries": 0}
        server = start_proxy(tmp_path_factory.mktemp("http10"), config)
        yield server
        server.stop()


def http10(proxy: Proxy, method: str, case: str) -> tuple[bytes, bytes]:
    """Send one HTTP/1.0 request and read to EOF: the response head and body."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            f"{method} /api/v1/posts?case={case} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head.lower(), body


def test_a_chunked_answer_reaches_an_http10_client_close_delimited(proxy: Proxy) -> None:
    """An upstream's chunked answer is sent to an HTTP/1.0 client unchunked, then closed."""
    head, body = http10(proxy, "GET", "chunked")
    assert head.startswith(b"http/1.1 200 ")
    assert b"transfer-encoding" not in head
    assert b"connection: close" in head
    assert body == b"".join(CHUNKS)


def test_a_content_length_answer_keeps_its_length(proxy: Proxy) -> None:
    """A Content-Length answer is sent as it is to an HTTP/1.0 client."""
    head, body = http10(proxy, "GET", "length")
    assert b"content-length: 5" in head
    assert b"transfer-encoding" not in head
    assert body == b"hello"


@pytest.mark.parametrize(
    ("method", "case", "status"),
    [
        ("HEAD", "head", b" 200 "),
        ("GET", "no-content", b" 204 "),
        ("GET", "not-modified", b" 304 "),
    ],
)
def test_bodiless_answers_have_no_body_and_no_chunking(
    proxy: Proxy, method: str, case: str, status: bytes
) -> None:
    """HEAD, 204 and 304 reach an HTTP/1.0 client with no body and no chunked framing."""
    head, body = http10(proxy, method, case)
    assert status in head.split(b"\r\n")[0]
    assert b"transfer-encoding" not in head
    assert body == b""


def test_http11_clients_still_get_chunked(proxy: Proxy) -> None:
    """An HTTP/1.1 client keeps chunked framing (and its connection) for a streamed answer."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            f"GET /api/v1/posts?case=chunked HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert b"transfer-encoding: chunked" in received.lower()
