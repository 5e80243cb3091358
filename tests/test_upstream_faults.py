"""Misbehaving origins against the real proxy process: every fault is contained.

Each test points the proxy at a scripted loopback origin (tests/origins.py) that answers
with exact bytes. Whatever the origin does, three things must hold: no byte of one
response reaches another request, the proxy keeps serving (and never crashes inside
uvicorn), and the access record says what really happened.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.bao import Bao
from tests.origins import Close, Hold, Origin, Request, Reset, Sleep, Step, Write, response
from tests.servers import Proxy, proxy_config, start_proxy
from tests.waiting import eventually

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: yes\r\n\r\nSMUGGLED"
BIG_FIELD_BYTES = 48 * 1024 * 1024
MIB = 1024 * 1024


def _late(head: bytes) -> list[Step]:
    # The announced body arrives later, shaped as a whole response of its own.
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return [Write(head), Sleep(0.1), Write(SMUGGLED.ljust(length, b"x"))]


def _keep_alive(request: Request, seconds: int) -> list[Step]:
    # The origin closes connections idle for `seconds`; a request that reaches it on a
    # connection idle for most of that is lost in the close (it never sees it).
    if request.idle_before > 0.7 * seconds:
        return [Reset()]
    return [Write(response(200, b"kept", f"Keep-Alive: timeout={seconds}"))]


def script(request: Request) -> list[Step]:
    """What the origin does, by the request's `case` query parameter."""
    case = request.query.get("case", "echo")
    nonce = request.query.get("nonce", "")
    if case == "echo":
        return [Write(response(200, nonce.encode(), f"X-Nonce: {nonce}"))]
    if case.startswith("late-"):
        status = int(case.removeprefix("late-"))
        framing = "Transfer-Encoding: chunked" if status == 100 else "Content-Length: 85"
        head = f"HTTP/1.1 {status} X\r\n{framing}\r\n\r\n".encode()
        if status == 100:
            return [Write(head + b"5\r\nhello\r\n0\r\n\r\n"), Write(response(200, b"final"))]
        return _late(head.replace(b"chunked", b""))
    if case == "garbage-now":
        return [Write(response(200, b"ok") + SMUGGLED)]
    if case == "garbage-later":
        return [Write(response(200, b"ok")), Sleep(0.05), Write(SMUGGLED)]
    if case == "two-lengths":
        return [Write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 8\r\n\r\nok")]
    if case == "length-and-chunked":
        return [
            Write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\n\r\n" + SMUGGLED
            )
        ]
    if case == "long-length":
        return [Write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"), Close()]
    if case == "truncated-chunked":
        return [
            Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
            Close(),
        ]
    if case.startswith("status-"):
        return [
            Write(
                f"HTTP/1.1 {case.removeprefix('status-')} Odd\r\nContent-Length: 0\r\n\r\n".encode()
            )
        ]
    if case == "obs-fold":
        return [Write(b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 2\r\n\r\nok")]
    if case == "control-byte":
        return [Write(b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nContent-Length: 2\r\n\r\nok")]
    if case == "nul-in-name":
        return [Write(b"HTTP/1.1 200 OK\r\nX-\x00A: b\r\nContent-Length: 2\r\n\r\nok")]
    if case == "switch":
        return [
            Write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n"
            ),
            Write(SMUGGLED),
        ]
    if case == "big-field":
        return [Write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * BIG_FIELD_BYTES + b"\r\n\r\n")]
    if case.startswith("keep-alive-"):
        return _keep_alive(request, int(case.removeprefix("keep-alive-")))
    if case == "head":
        return [Write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")]
    if case == "hold":
        return [Hold()]
    if case == "slow-body":
        return [
            Write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"b" * 100_000),
            Hold(),
        ]
    if case == "cut-after-head":
        return [
            Write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"c" * 200_000),
            Sleep(0.1),
            Reset(),
        ]
    if case == "cut-chunked":
        chunk = b"%x\r\n%b\r\n" % (100_000, b"d" * 100_000)
        return [
            Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2),
            Close(),
        ]
    if case == "drop":
        return [Close()]
    raise AssertionError(f"unknown case {case}")


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    """The scripted origin of this module."""
    with Origin(script) as server:
        yield server


def _config(bao: Bao, token_file: Path, origin: Origin, **upstream: object) -> dict[str, object]:
    config = proxy_config(bao.url, origin.url, token_file=token_file)
    config["upstream"] = {
        "url": origin.url,
        "retries": 0,  # a fault must show as it is, never hidden by a retry
        "read_timeout_seconds": 30,
        "connect_timeout_seconds": 2,
        **upstream,
    }
    return config


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, origin: Origin
) -> Iterator[Proxy]:
    """The proxy in front of the scripted origin."""
    server = start_proxy(tmp_path_factory.mktemp("faults"), _config(bao, token_file, origin))
    yield server
    server.stop()


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    """An HTTP client of the proxy."""
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as http:
        yield http


def call(client: httpx.Client, case: str, method: str = "GET", **kwargs: object) -> httpx.Response:
    """One request for `case`, with a fresh nonce and request id."""
    nonce = uuid.uuid4().hex
    return client.request(
        method,
        f"/api/v1/posts?case={case}&nonce={nonce}",
        headers={"X-Request-Id": nonce},
        **kwargs,  # type: ignore[arg-type]
    )


def echo(client: httpx.Client) -> None:
    """A well-behaved request gets its own response."""
    nonce = uuid.uuid4().hex
    answer = client.get(f"/api/v1/posts?case=echo&nonce={nonce}")
    assert (answer.status_code, answer.content) == (200, nonce.encode())
    assert answer.headers["x-nonce"] == nonce


def assert_refused(
    proxy: Proxy, answer: httpx.Response, code: str = "upstream_unreachable"
) -> None:
    """The proxy answered the fault itself, and its access record says so."""
    assert answer.status_code == (504 if code == "upstream_timeout" else 502), answer.text
    assert answer.headers["x-publer-proxy-error"] == code
    event = proxy.access_event(answer.headers["x-request-id"])
    assert (event["decision"], event["status"]) == (code, answer.status_code)


@pytest.fixture(autouse=True)
def log_mark(request: pytest.FixtureRequest) -> None:
    """Where the proxy's output stood when the test began."""
    if "proxy" in request.fixturenames:
        proxy: Proxy = request.getfixturevalue("proxy")
        proxy.mark = len(proxy.output())  # type: ignore[attr-defined]


def assert_no_crash(proxy: Proxy) -> None:
    """Nothing escaped into uvicorn or the event loop during this test."""
    output = proxy.output()[getattr(proxy, "mark", 0) :]
    for sign in ("Exception in ASGI application", "Fatal error", "Traceback", "forward_failed"):
        assert sign not in output


@pytest.mark.parametrize("status", [204, 304, 100])
def test_body_announced_by_a_bodiless_status_never_reaches_the_next_request(
    client: httpx.Client, proxy: Proxy, status: int
) -> None:
    """A 204/304 announcing a body whose bytes come late (shaped as a whole response), or a
    100 with a body, never gives those bytes to the next request on the connection."""
    first = call(client, f"late-{status}")
    assert first.status_code in (status, 200, 502)
    assert b"SMUGGLED" not in first.content
    for _ in range(3):
        echo(client)
    assert_no_crash(proxy)


@pytest.mark.parametrize("case", ["garbage-now", "garbage-later"])
def test_bytes_after_a_response_never_reach_the_next_request(
    client: httpx.Client, proxy: Proxy, origin: Origin, case: str
) -> None:
    """Bytes after a complete response (in the same packet, or later on the idle
    connection) are never read as the next request's response."""
    first = call(client, case)
    assert first.status_code in (200, 502)
    if first.status_code == 200:
        assert first.content == b"ok"
    # The origin wrote its late bytes to the idle connection (on loopback they are then in
    # the proxy's receive buffer).
    [seen] = origin.requests_for("nonce", first.headers["x-request-id"])
    assert seen.performed.wait(30)
    for _ in range(3):
        echo(client)
    assert_no_crash(proxy)


@pytest.mark.parametrize(
    "case",
    [
        "two-lengths",
        "length-and-chunked",
        "long-length",
        "truncated-chunked",
        "status-600",
        "status-099",
        "control-byte",
        "nul-in-name",
        "switch",
    ],
)
def test_misframed_response_is_a_clean_502_logged_as_such(
    client: httpx.Client, proxy: Proxy, origin: Origin, case: str
) -> None:
    """Conflicting or lying lengths, truncation, a status outside 200-599, a 101 to a plain
    GET, obs-fold and control bytes: 502 upstream_unreachable, logged so, the origin asked
    once, and the next request served with its own response."""
    answer = call(client, case)
    assert_refused(proxy, answer)
    assert len(origin.requests_for("nonce", answer.headers["x-request-id"])) == 1
    echo(client)
    assert_no_crash(proxy)


def test_obs_fold_is_refused_or_replaced_by_spaces(client: httpx.Client, proxy: Proxy) -> None:
    """A folded header line (obs-fold) is either a 502 or reaches the client with the fold
    replaced by spaces (the two choices RFC 9112 section 5.2 gives a proxy), never a CR or
    LF inside a value."""
    answer = call(client, "obs-fold")
    if answer.status_code == 502:
        assert_refused(proxy, answer)
    else:
        assert answer.status_code == 200
        assert re.fullmatch(r"a +b", answer.headers["x-folded"]), answer.headers["x-folded"]
    echo(client)
    assert_no_crash(proxy)


def test_header_field_of_48_mib_is_refused_with_memory_bounded(
    client: httpx.Client, proxy: Proxy
) -> None:
    """A 48 MiB response header field is a 502 while the proxy's peak memory grows by
    less than 16 MiB (the field is refused once it passes the limit, never buffered)."""
    pid = proxy.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = _peak_kib(pid)
    answer = call(client, "big-field")
    assert_refused(proxy, answer)
    assert (_peak_kib(pid) - before) * 1024 < 16 * MIB
    echo(client)


def _peak_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("seconds", [1, 3])
def test_post_never_meets_a_connection_the_origin_closes_as_announced(
    client: httpx.Client, origin: Origin, seconds: int
) -> None:
    """An origin announcing `Keep-Alive: timeout=N` closes idle connections after N s; a POST
    sent once most of N passed goes on a new connection and succeeds, sent once."""
    assert call(client, f"keep-alive-{seconds}").status_code == 200
    time.sleep(0.85 * seconds)  # the idle time itself is the scenario
    nonce = uuid.uuid4().hex
    answer = client.post(
        f"/api/v1/posts?case=keep-alive-{seconds}&nonce={nonce}", content=b'{"post": 1}'
    )
    assert (answer.status_code, answer.content) == (200, b"kept")
    [seen] = origin.requests_for("nonce", nonce)
    assert seen.body == b'{"post": 1}'


def test_head_keeps_its_connection(client: httpx.Client, origin: Origin) -> None:
    """A response to HEAD (with the Content-Length a GET would have) leaves its connection
    open for the next request."""
    call(client, "head", "HEAD")  # may open a connection
    answers = [call(client, "head", "HEAD") for _ in range(3)]
    assert all(a.status_code == 200 and a.headers["content-length"] == "1234" for a in answers)
    used = {origin.requests_for("nonce", a.headers["x-request-id"])[0].connection for a in answers}
    assert len(used) == 1
    echo(client)


def test_delete_is_never_resent_by_the_client_library(
    client: httpx.Client, proxy: Proxy, origin: Origin
) -> None:
    """An origin that closes without responding to a DELETE sees it once: only the proxy
    decides about resends, and DELETE is never resent."""
    answer = call(client, "drop", "DELETE")
    assert_refused(proxy, answer)
    assert len(origin.requests_for("nonce", answer.headers["x-request-id"])) == 1


@pytest.mark.parametrize("case", ["cut-after-head", "cut-chunked"])
def test_crash_after_the_head_is_logged_as_what_happened(
    client: httpx.Client, proxy: Proxy, case: str
) -> None:
    """An origin that resets or closes mid-body after the status line went out: the client
    gets a truncated body, and the access record says upstream_broken, not allowed."""
    nonce = uuid.uuid4().hex
    with pytest.raises(httpx.HTTPError):
        client.get(f"/api/v1/posts?case={case}&nonce={nonce}", headers={"X-Request-Id": nonce})
    event = proxy.access_event(nonce)
    assert (event["decision"], event["upstream_status"]) == ("upstream_broken", 200)
    echo(client)
    assert_no_crash(proxy)


# --- clients that leave ------------------------------------------------------------------


def head(method: str, case: str, nonce: str, extra: str = "") -> bytes:
    """A raw request head for `case`, its nonce also the request id."""
    target = f"/api/v1/posts?case={case}&nonce={nonce}"
    return (
        f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: {nonce}\r\n{extra}\r\n"
    ).encode()


def _raw(proxy: Proxy, data: bytes) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(data)
    return sock


def _in_use(client: httpx.Client) -> float:
    return _gauge(client, 'publer_proxy_upstream_connections{state="in_use"}')


def _abort_before_head(proxy: Proxy, client: httpx.Client, origin: Origin, nonce: str) -> None:
    sock = _raw(
        proxy,
        head("GET", "hold", nonce),
    )
    # The origin has the request and holds back its answer.
    eventually(lambda: bool(origin.requests_for("nonce", nonce)), timeout=30)
    sock.close()


def _abort_during_upload(proxy: Proxy, client: httpx.Client, origin: Origin, nonce: str) -> None:
    sock = _raw(
        proxy,
        head("POST", "hold", nonce, f"Content-Length: {4 * MIB}\r\n") + b"u" * (MIB // 2),
    )
    # The proxy streams the upload to the origin on a connection of its pool (the origin
    # records a request only once its body is whole or broken off).
    eventually(lambda: _in_use(client) == 1, timeout=30)
    sock.close()


def _abort_during_response(proxy: Proxy, client: httpx.Client, origin: Origin, nonce: str) -> None:
    sock = _raw(
        proxy,
        head("GET", "slow-body", nonce),
    )
    received = b""
    while len(received) < 50_000:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()


@pytest.mark.parametrize(
    "abort", [_abort_before_head, _abort_during_upload, _abort_during_response]
)
def test_client_leaving_cancels_the_upstream_request(
    client: httpx.Client, proxy: Proxy, origin: Origin, abort: object
) -> None:
    """A client that leaves before the response head, during its upload, or during the
    response: the proxy closes its connection to the origin at once (not at the read
    timeout), logs client_disconnected, and holds no connection for it afterwards."""
    nonce = uuid.uuid4().hex
    abort(proxy, client, origin, nonce)  # type: ignore[operator]
    eventually(lambda: bool(origin.requests_for("nonce", nonce)), timeout=30)
    [seen] = origin.requests_for("nonce", nonce)
    # Well before the 30 s read timeout would have closed it.
    assert origin.connections[seen.connection].closed_by_peer.wait(20)
    event = proxy.access_event(nonce)
    assert event["decision"] == "client_disconnected"
    eventually(lambda: _in_use(client) == 0, timeout=30)
    echo(client)
    assert_no_crash(proxy)


def _gauge(client: httpx.Client, series: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match is not None, series
    return float(match.group(1))


def test_full_pool_is_refused_as_busy_and_shown_in_metrics(
    tmp_path: Path, bao: Bao, token_file: Path, origin: Origin
) -> None:
    """With every connection held by a request, the next one waits (waiting gauge 1), then
    gets 503 upstream_busy, which says what to do; the in-use gauge shows the held ones."""
    proxy = start_proxy(
        # The third request waits up to connect_timeout_seconds for a connection: long
        # enough for the test to see it waiting on a loaded machine.
        tmp_path,
        _config(bao, token_file, origin, max_connections=2, connect_timeout_seconds=5),
    )
    held = [
        _raw(
            proxy,
            head("GET", "hold", uuid.uuid4().hex),
        )
        for _ in range(2)
    ]
    try:
        with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as http:
            eventually(
                lambda: _gauge(http, 'publer_proxy_upstream_connections{state="in_use"}') == 2,
                timeout=30,
            )
            result: list[httpx.Response] = []
            waiting = threading.Thread(target=lambda: result.append(call(http, "echo")))
            waiting.start()
            eventually(
                lambda: _gauge(http, "publer_proxy_upstream_waiting_requests") == 1, timeout=30
            )
            waiting.join(60)
            [answer] = result
            assert answer.status_code == 503
            assert answer.headers["x-publer-proxy-error"] == "upstream_busy"
            assert "max_connections" in answer.json()["errors"][0]
            assert proxy.access_event(answer.headers["x-request-id"])["decision"] == "upstream_busy"
            for sock in held:
                sock.close()
            eventually(
                lambda: _gauge(http, 'publer_proxy_upstream_connections{state="in_use"}') == 0,
                timeout=30,
            )
            echo(http)
    finally:
        proxy.stop()


def test_connections_the_origin_closed_are_not_kept() -> None:
    """The hop's record of the connections it handed out drops closed ones: 50 requests to
    an origin that closes every connection leave at most the last two recorded, none idle."""
    import asyncio

    from proxy.config.settings import UpstreamSettings
    from proxy.hop.upstream import Upstream

    async def scenario() -> tuple[int, int]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream(
            UpstreamSettings(url=f"http://127.0.0.1:{port}", insecure_allow_plain_http=True)
        )
        try:
            for _ in range(50):
                got = await upstream.send("GET", "/", [(b"host", b"origin")], None)
                assert [chunk async for chunk in got.aiter_raw()] == [b"ok"]
                await got.aclose()
            connector = upstream.connector
            assert connector is not None
            return len(connector.handed_out), upstream.stats().idle
        finally:
            await upstream.aclose()
            server.close()
            await server.wait_closed()

    recorded, idle = asyncio.run(scenario())
    assert recorded <= 2 and idle == 0
