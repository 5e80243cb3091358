"""The hooks proxy/edge/server.py takes in uvicorn's httptools protocol are still called.

`StrictHttpToolsProtocol` overrides methods of uvicorn's internal protocol class; a
uvicorn release that renamed or stopped calling one would silently drop a limit (a
slow-client timer, the head bound, the raw target, trailers, HTTP/1.0 framing, the 400's
envelope). pyproject allows the uvicorn releases these tests passed on; they fail loudly
when a hook stops working, each one through a real socket against uvicorn serving on
uvloop, with the timeouts shortened.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from structlog.testing import capture_logs

import proxy.edge.server
from proxy.edge.server import MAX_HEADER_BYTES, StrictHttpToolsProtocol
from proxy.rules.paths import ABSOLUTE_FORM_KEY
from tests.bao import free_port

SEEN: list[dict[str, Any]] = []


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Records the scope; streams 64 MiB for /big; /late-read reads its body only after a
    second and answers with the header names it then sees; /chunks streams two chunks
    without a length; else a short body."""
    if scope["type"] != "http":
        return
    SEEN.append(dict(scope))
    if scope["path"] == "/late-read":
        await asyncio.sleep(1.0)  # the app is slow to ask for the body: longer than its timer
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        names = b",".join(sorted(name for name, _ in scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": names + b"|" + body})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/chunks":
        await send({"type": "http.response.body", "body": b"one,", "more_body": True})
        await send({"type": "http.response.body", "body": b"two"})
        return
    if scope["path"] == "/big":
        chunk = b"x" * (1024 * 1024)
        for _ in range(64):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    """uvicorn with the strict protocol on uvloop, in a thread, short timeouts."""
    patch = pytest.MonkeyPatch()
    patch.setattr(proxy.edge.server, "HEADER_TIMEOUT_SECONDS", 0.5)
    patch.setattr(proxy.edge.server, "BODY_IDLE_TIMEOUT_SECONDS", 0.5)
    patch.setattr(proxy.edge.server, "SEND_TIMEOUT_SECONDS", 0.5)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=StrictHttpToolsProtocol,
        ws="none",
        loop="uvloop",
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield "127.0.0.1", port
    uvicorn_server.should_exit = True
    thread.join(10)
    patch.undo()


def exchange(address: tuple[str, int], data: bytes, wait: float = 3.0) -> bytes:
    """Send `data`, return everything received until the server closes (or `wait`)."""
    with socket.create_connection(address, timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        return received


def closed_within(address: tuple[str, int], data: bytes, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds` after `data`."""
    with socket.create_connection(address, timeout=seconds) as sock:
        sock.sendall(data)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True


def test_head_timer_still_closes_a_slow_client(server: tuple[str, int]) -> None:
    """connection_made and data_received: a head that never ends is closed at its timer."""
    with capture_logs() as logs:
        assert closed_within(server, b"GET / HTTP/1.1\r\nHost: x\r\n", 3.0)
    assert any(e["event"] == "client_timed_out" and e["phase"] == "head" for e in logs)


def test_body_idle_timer_still_closes_a_stalled_upload(server: tuple[str, int]) -> None:
    """on_headers_complete arms the body timer: an upload that stops is closed."""
    with capture_logs() as logs:
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
        assert closed_within(server, head, 3.0)
    assert any(e["event"] == "client_timed_out" and e["phase"] == "body" for e in logs)


def test_send_timer_still_drops_a_client_that_reads_nothing(server: tuple[str, int]) -> None:
    """pause_writing: a client that reads nothing of a large response is dropped."""
    with capture_logs() as logs:
        sock = socket.create_connection(server)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        while not any(e["event"] == "client_not_reading" for e in logs):
            assert time.monotonic() < deadline, "the send timer never fired"
            time.sleep(0.05)
        sock.close()


def test_raw_target_and_absolute_form_still_reach_the_scope(server: tuple[str, int]) -> None:
    """on_headers_complete puts the target back as sent (fragment included) and marks an
    absolute-form target."""
    SEEN.clear()
    exchange(server, b"GET /a/b#frag?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    exchange(server, b"GET http://evil.test/p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first, second = SEEN
    assert first["raw_path"] == b"/a/b#frag" and first["query_string"] == b"x=1"
    assert first[ABSOLUTE_FORM_KEY] is False and second[ABSOLUTE_FORM_KEY] is True


def test_oversized_and_malformed_heads_get_the_refusal_envelope(server: tuple[str, int]) -> None:
    """data_received bounds the head and send_400_response answers in the proxy's envelope."""
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1024) + b"\r\n\r\n"
    for data in (big, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"):
        answer = exchange(server, data)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"x-publer-proxy-error: bad_request" in answer


def test_a_head_that_never_ends_is_cut_at_the_bound(server: tuple[str, int]) -> None:
    """data_received counts an unfinished head as it streams in: past the bound it is
    refused at once, not buffered until the head timer fires."""
    with capture_logs() as logs, socket.create_connection(server, timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        try:  # the server resets the connection once it gives up on the head
            while sent < 4 * MAX_HEADER_BYTES:
                sock.sendall(b"a" * 1024)
                sent += 1024
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert any(e["event"] == "request_head_too_large" for e in logs)


def test_keep_alive_next_request_gets_the_head_timer(server: tuple[str, int]) -> None:
    """on_message_complete ends a request: on a kept-alive connection the next request's
    head is timed as a head (a slow one is closed in phase 'head', not as a body)."""
    with capture_logs() as logs, socket.create_connection(server, timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"ok" not in first:
            first += sock.recv(65536)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            pytest.fail("the slow second head was never closed")
        except ConnectionResetError:
            pass
    timed_out = [e for e in logs if e["event"] == "client_timed_out"]
    assert [e["phase"] for e in timed_out] == ["head"]


def test_trailer_fields_never_reach_the_headers(server: tuple[str, int]) -> None:
    """on_chunk_header and on_header: a field in a chunked body's trailer section is
    dropped, never added to the request's headers."""
    answer = exchange(
        server,
        b"POST /late-read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: evil\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    names = answer.partition(b"|abc\r\n")[0].rpartition(b"\r\n")[2].split(b",")
    assert b"host" in names and b"transfer-encoding" in names
    assert b"x-trailer" not in names


def test_upgrade_is_refused_in_the_envelope(server: tuple[str, int]) -> None:
    """on_headers_complete asks the parser whether the request upgrades: it is refused."""
    answer = exchange(
        server,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Upgrade is not supported" in answer


def test_http10_response_is_close_delimited(server: tuple[str, int]) -> None:
    """The cycle's send is wrapped for an HTTP/1.0 request: a response without a length is
    sent unchunked and ended by closing the connection."""
    answer = exchange(server, b"GET /chunks HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding" not in head.lower()
    assert body == b"one,two"


def test_a_body_not_yet_asked_for_is_not_timed_out(server: tuple[str, int]) -> None:
    """The body timer reads the cycle's 100-continue state: a client waiting for
    `100 Continue` while the app has not asked for the body yet is not cut off, and once
    it is asked, its idle time starts then, not at the head it sent a second before."""
    with capture_logs() as logs, socket.create_connection(server, timeout=5) as sock:
        sock.sendall(
            b"POST /late-read HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        time.sleep(0.25)  # the client takes half its idle allowance to start the body
        sock.sendall(b"abc")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"|abc\r\n" in answer
    assert not any(e["event"] == "client_timed_out" for e in logs)


def test_a_refused_head_request_gets_no_body(server: tuple[str, int]) -> None:
    """send_400_response asks the parser for the method: a refused HEAD gets the head only."""
    big = b"HEAD / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1024)
    answer = exchange(server, big + b"\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head[:200]
    assert b"content-length: " in head.lower() and body == b""
