"""The upstream pool under random load: thousands of mixed exchanges on two connections.

Answers of every framing (length, chunked, until close, reset mid-body, Connection: close,
slow, large), bodies as bytes or streams, answers read whole, in part or not at all,
random cancellations, refused connects, stalled event-loop turns and pool closes. The
pool's accounting is checked on every loop turn and at the end; it was written after a
review found hand-over bugs that only such interleavings show.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from proxy.connection import Connection
from proxy.pool import Pool
from proxy.settings import UpstreamSettings
from proxy.upstream import PoolTransport, Timeouts
from tests.test_pool import read_body

MAX_CONNECTIONS = 2
OPERATIONS = 1500
KINDS = ["ok"] * 8 + ["slow"] * 4 + ["big", "close", "chunked", "until", "reset", "fin", "hold"]
ANSWERS = {
    "big": b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300000,
    "close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "until": b"HTTP/1.1 200 OK\r\n\r\nuntil-close",
    "reset": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart",
}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Origin:
    """A loopback origin whose answer depends on the request path (`/kind`)."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.open = 0

    async def _read_request(self, reader: asyncio.StreamReader) -> str:
        head = await reader.readuntil(b"\r\n\r\n")
        await read_body(reader, head)
        return head.split(b" ")[1][1:].decode()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                try:
                    kind = await self._read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    return
                if kind in ("slow", "hold"):
                    await asyncio.sleep(0.2 if kind == "hold" else self.rnd.random() * 0.02)
                writer.write(ANSWERS.get(kind, OK))
                try:
                    await writer.drain()
                except ConnectionError:
                    return
                if kind == "reset":
                    await asyncio.sleep(0.002)
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if kind in ("close", "until", "fin"):
                    return
        finally:
            self.open -= 1
            writer.close()


class Watch:
    """Wraps the pool's hand-out and take-back, and the connections' life, to check them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.violations: Counter[str] = Counter()
        self.in_use: set[Connection] = set()
        self.live: set[Connection] = set()
        acquire, release = Pool.acquire, Pool.release
        made, lost = Connection.connection_made, Connection.connection_lost

        async def watched_acquire(pool: Pool, *args: float | None) -> Connection:
            connection = await acquire(pool, *args)
            if connection in self.in_use:
                self.violations["a connection handed out twice"] += 1
            if not connection.usable:
                self.violations["a dead connection handed out"] += 1
            self.in_use.add(connection)
            return connection

        def watched_release(pool: Pool, connection: Connection) -> None:
            if connection not in self.in_use:
                self.violations["a connection released that was not handed out"] += 1
            self.in_use.discard(connection)
            release(pool, connection)

        def watched_made(connection: Connection, transport: asyncio.BaseTransport) -> None:
            self.live.add(connection)
            made(connection, transport)

        def watched_lost(connection: Connection, exc: Exception | None) -> None:
            self.live.discard(connection)
            lost(connection, exc)

        monkeypatch.setattr(Pool, "acquire", watched_acquire)
        monkeypatch.setattr(Pool, "release", watched_release)
        monkeypatch.setattr(Connection, "connection_made", watched_made)
        monkeypatch.setattr(Connection, "connection_lost", watched_lost)


async def exchange(transport: PoolTransport, rnd: random.Random, outcomes: Counter[str]) -> None:
    """One request of a random kind, its answer read whole, in part or not at all."""
    kind = rnd.choice(KINDS)
    reading = rnd.choice(["whole", "whole", "whole", "part", "none"])
    timeouts = Timeouts(connect=1.0, read=1.0, write=1.0, pool=rnd.choice([0.05, 0.5, 2.0]))
    body: bytes | AsyncIterator[bytes] | None = None
    if rnd.random() < 0.2:

        async def stream(parts: int) -> AsyncIterator[bytes]:
            for _ in range(parts):
                await asyncio.sleep(0)
                yield b"z" * 100

        body = b"y" * rnd.randint(0, 2000) if rnd.random() < 0.5 else stream(rnd.randint(0, 3))
    method = "GET" if body is None else "POST"
    try:
        answer = await transport.send(method, f"/{kind}", [(b"host", b"h")], body, timeouts)
        try:
            async for _ in answer.aiter_raw():
                if reading == "part":
                    break
                if reading == "none":
                    break
        finally:
            await answer.aclose()
        outcomes["answered"] += 1
    except httpx.HTTPError as exc:
        outcomes[type(exc).__name__] += 1


@pytest.mark.parametrize("seed", [1, 2])
def test_pool_accounting_holds_under_random_load(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never more than max_connections, never a connection handed out twice or dead,
    nothing left waiting, and at the end the pool, the client sockets and the origin's
    sockets all agree."""
    rnd = random.Random(seed)
    watch = Watch(monkeypatch)
    outcomes: Counter[str] = Counter()

    async def scenario() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        create_connection = loop.create_connection

        async def flaky_connect(*args: Any, **kwargs: Any) -> Any:
            if rnd.random() < 0.05:
                raise ConnectionRefusedError(111, "refused by the test")
            return await create_connection(*args, **kwargs)

        monkeypatch.setattr(loop, "create_connection", flaky_connect)
        origin = Origin(rnd)
        server = await asyncio.start_server(origin.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        settings = UpstreamSettings(url=f"http://127.0.0.1:{port}", max_connections=MAX_CONNECTIONS)
        transport = PoolTransport(settings, keepalive_expiry=0.05)
        watching = True

        def check() -> None:
            count, _ = transport.pool.size
            if count > MAX_CONNECTIONS:
                watch.violations["more connections than max_connections"] += 1
            if sum(1 for c in watch.live if c.counted and not c.closed) > count:
                watch.violations["live connections not counted"] += 1
            if watching:
                loop.call_soon(check)

        loop.call_soon(check)
        tasks = []
        for index in range(OPERATIONS):
            task = asyncio.create_task(exchange(transport, rnd, outcomes))
            tasks.append(task)
            chance = rnd.random()
            if chance < 0.25:
                loop.call_later(rnd.random() * 0.03, task.cancel)
            elif chance < 0.30:
                loop.call_soon(task.cancel)
            if rnd.random() < 0.002:
                await transport.aclose()
            if index % 10 == 0:
                await asyncio.sleep(rnd.random() * 0.03)
            if rnd.random() < 0.02:
                time.sleep(0.003)  # noqa: ASYNC251 - a stalled loop turn: timers bunch up
        _, pending = await asyncio.wait(tasks, timeout=30)
        await asyncio.sleep(0.3)  # past the keep-alive expiry: every connection closes
        watching = False
        end = {
            "pending": len(pending),
            "pool": transport.pool.size,
            "client sockets": len(watch.live),
            "origin sockets": origin.open,
            "in use": len(watch.in_use),
            "errors": [t.exception() for t in tasks if t.done() and not t.cancelled()],
        }
        await transport.aclose()
        server.close()
        return end

    end = asyncio.run(scenario())
    assert not watch.violations, watch.violations
    assert end["pending"] == 0
    assert [e for e in end["errors"] if e is not None] == []  # only httpx errors, handled
    assert end["in use"] == 0
    assert end["pool"] == (end["client sockets"], end["client sockets"])
    assert end["client sockets"] == end["origin sockets"]
    assert outcomes["answered"] > OPERATIONS // 4, outcomes
