"""The upstream connection pool (proxy/pool.py) against a scripted server on loopback.

Each test runs a real TCP server that answers with exact bytes, so framing, keep-alive and
failure cases are under the test's control; the end-to-end behaviour through the proxy is
in test_forwarding, test_streaming and test_hostile.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from proxy.connection import MAX_ANSWER_HEAD_BYTES, request_head
from proxy.settings import UpstreamSettings
from proxy.upstream import PoolAnswer, PoolTransport, Timeouts

TIMEOUTS = Timeouts(connect=2.0, read=2.0, write=2.0, pool=2.0)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The request body that follows `head`, as sent (chunked framing included)."""
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.strip(), 16)
            body += line + await reader.readexactly(size + 2)
            if size == 0:
                return body
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


@dataclass
class Answer:
    """What the server writes for one request, and whether it closes afterwards."""

    data: bytes
    close: bool = False
    hold: bool = False  # write nothing and keep the connection open
    early: bool = False  # answer after the head, never reading the body
    reset: bool = False  # end with a TCP reset instead of a close


@dataclass
class Scripted:
    """A loopback HTTP server answering requests with the next scripted answer."""

    answers: list[Answer]
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    answer = self.answers.pop(0)
                    body = b"" if answer.early else await read_body(reader, head)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client gave up mid-request
                self.requests.append(head + body)
                if answer.hold:
                    await asyncio.sleep(3600)
                writer.write(answer.data)
                await writer.drain()
                if answer.reset:
                    await asyncio.sleep(0.05)
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if answer.close or answer.early:
                    return
        finally:
            writer.close()

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()


def transport(server: Scripted, **kwargs: float) -> PoolTransport:
    settings = UpstreamSettings(
        url=f"http://127.0.0.1:{server.port}", max_connections=int(kwargs.pop("max", 10))
    )
    return PoolTransport(settings, **kwargs)  # type: ignore[arg-type]


async def fetch(
    pool: PoolTransport,
    method: str = "GET",
    body: bytes | AsyncIterator[bytes] | None = None,
    timeouts: Timeouts = TIMEOUTS,
) -> tuple[int, bytes]:
    answer = await pool.send(method, "/api/v1/posts?x=%2F", [(b"host", b"h")], body, timeouts)
    try:
        return answer.status_code, b"".join([c async for c in answer.aiter_raw()])
    finally:
        await answer.aclose()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_request_head_frames_the_body_and_refuses_line_breaks() -> None:
    """The head is the given headers in order plus framing the proxy decides."""
    head = request_head("POST", "/a?b", [(b"host", b"h"), (b"x-a", b"1")], None)
    assert head.data == b"POST /a?b HTTP/1.1\r\nhost: h\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n"
    assert not head.chunked
    assert request_head("GET", "/a", [(b"host", b"h")], None).data == (
        b"GET /a HTTP/1.1\r\nhost: h\r\n\r\n"
    )
    assert request_head("POST", "/a", [], b"abc").data.endswith(b"content-length: 3\r\n\r\n")

    async def stream() -> AsyncIterator[bytes]:
        yield b"x"

    head = request_head("PUT", "/a", [(b"host", b"h"), (b"transfer-encoding", b"gzip")], stream())
    assert head.chunked and head.length is None
    assert head.data.endswith(b"host: h\r\ntransfer-encoding: chunked\r\n\r\n")
    head = request_head("PUT", "/a", [(b"content-length", b"3")], stream())
    assert not head.chunked and head.length == 3 and b"transfer-encoding" not in head.data
    for length in (b"-1", b"3x", b""):
        with pytest.raises(httpx.LocalProtocolError):
            request_head("PUT", "/a", [(b"content-length", length)], stream())
    for bad in (b"v\r\nx-evil: 1", b"v\nx", b"v\rx", b"v\0"):
        with pytest.raises(httpx.LocalProtocolError):
            request_head("GET", "/a", [(b"x-a", bad)], None)


def test_keep_alive_reuses_one_connection_until_the_origin_closes() -> None:
    """Answers read to the end leave the connection pooled; `Connection: close` does not."""

    async def scenario() -> None:
        closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        script = [Answer(OK), Answer(OK), Answer(closing, close=True), Answer(OK)]
        async with Scripted(script) as server:
            pool = transport(server)
            for _ in range(4):
                assert await fetch(pool) == (200, b"ok")
            assert server.connections == 2
            assert server.requests[0].startswith(b"GET /api/v1/posts?x=%2F HTTP/1.1\r\n")
            await pool.aclose()

    run(scenario)


def test_an_idle_connection_the_origin_closed_is_not_used() -> None:
    """The origin closing an idle connection costs no failed request."""

    async def scenario() -> None:
        async with Scripted([Answer(OK, close=True), Answer(OK)]) as server:
            pool = transport(server)
            assert await fetch(pool) == (200, b"ok")  # keep-alive answer, then closed
            await asyncio.sleep(0.1)
            assert await fetch(pool) == (200, b"ok")
            assert server.connections == 2
            assert pool.pool.size == (1, 1)

    run(scenario)


def test_body_until_close_head_without_body_and_interim_answers() -> None:
    """A body framed by the end of the connection is read whole; an answer to HEAD has no
    body whatever its Content-Length says; 1xx answers are skipped."""

    async def scenario() -> None:
        script = [
            Answer(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close=True),
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
            Answer(b"HTTP/1.1 100 Continue\r\n\r\n" + OK),
        ]
        async with Scripted(script) as server:
            pool = transport(server)
            assert await fetch(pool) == (200, b"until the end")
            assert await fetch(pool, "HEAD") == (200, b"")
            assert await fetch(pool) == (200, b"ok")
            assert server.connections == 3  # neither of the first two was reused

    run(scenario)


def test_more_than_one_answer_to_a_request_closes_the_connection() -> None:
    """Bytes past the end of the answer (a second answer, or gzip-only framing that ends
    with the connection) never leave a connection in the pool out of step."""

    async def scenario() -> None:
        gzip_only = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw"
        script = [Answer(OK + OK), Answer(gzip_only, close=True), Answer(OK)]
        async with Scripted(script) as server:
            pool = transport(server)
            assert await fetch(pool) == (200, b"ok")
            assert await fetch(pool) == (200, b"raw")
            assert await fetch(pool) == (200, b"ok")
            assert server.connections == 3

    run(scenario)


def test_an_answer_not_read_to_its_end_closes_the_connection() -> None:
    """A body left unread makes the connection unusable; it is closed, not pooled."""

    async def scenario() -> None:
        big = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000
        async with Scripted([Answer(big), Answer(OK)]) as server:
            pool = transport(server)
            answer = await pool.send("GET", "/", [(b"host", b"h")], None, TIMEOUTS)
            await answer.aclose()
            assert pool.pool.size == (0, 0)
            assert await fetch(pool) == (200, b"ok")
            assert server.connections == 2

    run(scenario)


def test_streamed_upload_goes_chunked_byte_for_byte() -> None:
    """A body of unknown length is sent in chunked framing as it is produced."""

    async def scenario() -> None:
        async def body() -> AsyncIterator[bytes]:
            for part in (b"abc", b"", b"de"):
                yield part

        async with Scripted([Answer(OK)]) as server:
            pool = transport(server)
            assert await fetch(pool, "POST", body()) == (200, b"ok")
            head, _, sent = server.requests[0].partition(b"\r\n\r\n")
            assert b"transfer-encoding: chunked" in head
            assert sent == b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"

    run(scenario)


def test_failures_are_httpx_exceptions_and_free_their_connection() -> None:
    """A malformed answer, an oversized head, a silent origin and a refused connection
    each raise httpx's exception, and leave no connection counted."""

    async def scenario() -> None:
        huge = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_ANSWER_HEAD_BYTES + b"\r\n\r\n"
        script = [Answer(b"NOT HTTP\r\n\r\n"), Answer(huge), Answer(b"", hold=True)]
        async with Scripted(script) as server:
            pool = transport(server)
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(pool)
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(pool)
            quick = Timeouts(connect=2.0, read=0.2, write=2.0, pool=2.0)
            with pytest.raises(httpx.ReadTimeout):
                await fetch(pool, timeouts=quick)
            await asyncio.sleep(0.05)
            assert pool.pool.size == (0, 0)
        async with Scripted([]) as gone:
            port = gone.port
        closed = PoolTransport(UpstreamSettings(url=f"http://127.0.0.1:{port}"))
        with pytest.raises(httpx.ConnectError):
            await fetch(closed)
        assert closed.pool.size == (0, 0)

    run(scenario)


def test_pool_limit_waits_then_times_out() -> None:
    """With every connection busy a request waits for one, up to the pool timeout."""

    async def scenario() -> None:
        async with Scripted([Answer(OK), Answer(OK)]) as server:
            pool = transport(server, max=1)
            held: PoolAnswer = await pool.send("GET", "/", [(b"host", b"h")], None, TIMEOUTS)
            quick = Timeouts(connect=2.0, read=2.0, write=2.0, pool=0.2)
            with pytest.raises(httpx.PoolTimeout):
                await fetch(pool, timeouts=quick)
            waiting = asyncio.create_task(fetch(pool))
            await asyncio.sleep(0.05)
            assert b"".join([c async for c in held.aiter_raw()]) == b"ok"
            await held.aclose()
            assert await waiting == (200, b"ok")
            assert server.connections == 1

    run(scenario)


def test_idle_connections_close_after_the_keepalive_expiry() -> None:
    """Idle connections do not linger past keepalive_expiry, traffic or not."""

    async def scenario() -> None:
        async with Scripted([Answer(OK)]) as server:
            pool = transport(server, keepalive_expiry=0.2)
            assert await fetch(pool) == (200, b"ok")
            assert pool.pool.size == (1, 1)
            await asyncio.sleep(0.5)
            assert pool.pool.size == (0, 0)

    run(scenario)


def test_httpx_client_over_the_transport() -> None:
    """The transport serves httpx.AsyncClient like any httpx transport, to its origin only."""

    async def scenario() -> None:
        async with Scripted([Answer(OK)]) as server:
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(transport=transport(server), base_url=base) as client:
                answer = await client.get("/api/v1/posts")
                assert (answer.status_code, answer.content) == (200, b"ok")
                with pytest.raises(httpx.UnsupportedProtocol):
                    await client.get("http://127.0.0.2:1/elsewhere")

    run(scenario)


def test_an_early_answer_ends_a_stuck_upload() -> None:
    """An origin that answers (413, say) without reading the body gets its answer to the
    client, not a write timeout; the connection is not used again."""

    async def scenario() -> None:
        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * 65536

        refusal = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig"
        async with Scripted([Answer(refusal, early=True), Answer(OK)]) as server:
            pool = transport(server)
            slow_write = Timeouts(connect=2.0, read=2.0, write=10.0, pool=2.0)
            assert await fetch(pool, "POST", endless(), timeouts=slow_write) == (413, b"big")
            assert await fetch(pool) == (200, b"ok")
            assert server.connections == 2

    run(scenario)


def test_a_reset_cuts_a_body_framed_by_the_close() -> None:
    """A body that ends with the connection is complete only when the connection closed
    cleanly; a reset means it broke off."""

    async def scenario() -> None:
        cut = b"HTTP/1.1 200 OK\r\n\r\npartial-"
        async with Scripted([Answer(cut, reset=True)]) as server:
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(transport(server))

    run(scenario)


def test_a_body_that_disagrees_with_its_length_is_never_sent_whole() -> None:
    """More or fewer bytes than the declared Content-Length fail the request before the
    origin could read a second request out of the first one's body."""

    async def scenario() -> None:
        def body(*parts: bytes) -> AsyncIterator[bytes]:
            async def produce() -> AsyncIterator[bytes]:
                for part in parts:
                    yield part

            return produce()

        smuggled = b"abcGET /smuggled HTTP/1.1\r\nhost: h\r\n\r\n"
        async with Scripted([Answer(OK)] * 3) as server:
            pool = transport(server)
            for parts, length in (((b"abc", smuggled[3:]), b"3"), ((b"ab",), b"3")):
                with pytest.raises(httpx.LocalProtocolError):
                    await pool.send(
                        "POST", "/", [(b"content-length", length)], body(*parts), TIMEOUTS
                    )
            with pytest.raises(httpx.LocalProtocolError):
                await pool.send("POST", "/", [(b"content-length", b"3")], b"abcd", TIMEOUTS)
            assert await fetch(pool) == (200, b"ok")
            assert all(b"/smuggled" not in request for request in server.requests)
            assert pool.pool.size == (1, 1)

    run(scenario)


def test_a_waiter_that_leaves_passes_its_turn_on() -> None:
    """A queued request woken and then cancelled does not swallow the free connection;
    the queue is served in order, within its pool timeout."""

    async def scenario() -> None:
        async with Scripted([Answer(OK), Answer(OK), Answer(OK)]) as server:
            pool = transport(server, max=1)
            held = await pool.send("GET", "/", [(b"host", b"h")], None, TIMEOUTS)
            first = asyncio.create_task(fetch(pool))
            second = asyncio.create_task(
                fetch(pool, timeouts=Timeouts(connect=2.0, read=2.0, write=2.0, pool=1.0))
            )
            await asyncio.sleep(0.05)
            assert b"".join([c async for c in held.aiter_raw()]) == b"ok"
            await held.aclose()  # handed to `first` ...
            first.cancel()  # ... which leaves before it runs
            assert await second == (200, b"ok")
            assert pool.pool.size == (1, 1)

    run(scenario)


def test_a_body_on_an_interim_answer_is_refused() -> None:
    """A 1xx answer carries no body; bytes after it are not glued onto the real answer."""

    async def scenario() -> None:
        junk = b"HTTP/1.1 199 Odd\r\nContent-Length: 4\r\n\r\nJUNK" + OK
        async with Scripted([Answer(junk)]) as server:
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(transport(server))

    run(scenario)


def test_many_requests_share_a_small_pool_in_order() -> None:
    """Forty concurrent requests over three connections each get one answer, none twice; the
    origin never sees more than three connections."""

    async def scenario() -> None:
        answers = [
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n%03d" % i) for i in range(40)
        ]
        async with Scripted(answers) as server:
            pool = transport(server, max=3)
            results = await asyncio.gather(*(fetch(pool) for _ in range(40)))
            assert sorted(body for _, body in results) == [b"%03d" % i for i in range(40)]
            assert server.connections <= 3
            assert pool.pool.size == (server.connections, server.connections)

    run(scenario)


def test_a_cancelled_waiter_ends_with_its_own_exception() -> None:
    """A queued request cancelled just before a connection comes back ends cancelled (not
    with an internal error), and the connection stays pooled."""

    async def scenario() -> None:
        async with Scripted([Answer(OK), Answer(OK)]) as server:
            pool = transport(server, max=1)
            held = await pool.send("GET", "/", [(b"host", b"h")], None, TIMEOUTS)
            assert b"".join([c async for c in held.aiter_raw()]) == b"ok"
            waiting = asyncio.create_task(fetch(pool))
            await asyncio.sleep(0.05)
            waiting.cancel()  # its place in the queue is cancelled before it runs again
            await held.aclose()
            [outcome] = await asyncio.gather(waiting, return_exceptions=True)
            assert isinstance(outcome, asyncio.CancelledError)
            assert pool.pool.size == (1, 1)
            assert await fetch(pool) == (200, b"ok")
            await pool.aclose()

    run(scenario)


class ClosingOrigin(threading.Thread):
    """An origin whose first connection answers once and closes when told to; later
    connections answer every request. Threaded, so its close lands while the client's
    event loop is busy, as a real origin's would."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.close_first = threading.Event()
        self.requests = 0

    def _serve(self, conn: socket.socket, first: bool) -> None:
        pending = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending += data
                _, _, pending = pending.partition(b"\r\n\r\n")
                self.requests += 1
                conn.sendall(OK)
                if first:
                    self.close_first.wait(10)
                    return

    def run(self) -> None:
        first = True
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(conn, first), daemon=True).start()
            first = False


@pytest.mark.parametrize("passed_on", [False, True])
def test_a_connection_closed_on_its_way_to_a_waiter_is_replaced(passed_on: bool) -> None:
    """The origin closes a connection after it was handed to a queued request but before
    that request ran (or after the request left and passed it on): the request gets a new
    connection instead of failing on the dead one."""
    origin = ClosingOrigin()
    origin.start()

    async def scenario() -> None:
        settings = UpstreamSettings(url=f"http://127.0.0.1:{origin.port}", max_connections=1)
        pool = PoolTransport(settings)
        first = asyncio.create_task(fetch(pool))
        second = asyncio.create_task(fetch(pool)) if passed_on else None
        held = await pool.send("GET", "/", [(b"host", b"h")], None, TIMEOUTS)
        assert b"".join([c async for c in held.aiter_raw()]) == b"ok"
        origin.close_first.set()
        time.sleep(0.05)  # noqa: ASYNC251 - a busy loop: the origin's FIN waits in the kernel
        await asyncio.sleep(0)
        await held.aclose()  # reusable as far as the pool knows: handed to `first`
        if second is not None:
            first.cancel()  # `first` leaves and passes the connection to `second`
            assert await second == (200, b"ok")
        else:
            assert await first == (200, b"ok")
        assert origin.requests == 2  # nothing was sent on the dead connection
        assert pool.pool.size == (1, 1)
        await pool.aclose()

    run(scenario)
