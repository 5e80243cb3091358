"""The upstream connection pool: keep-alive connections to one origin, handed out fairly.

Idle connections are reused newest first; one the origin closed is dropped before it is
picked, and idle ones close after `keepalive_expiry` seconds, shorter than common server
timeouts, so a request seldom meets a connection closing under it. Nothing is ever sent
twice: the proxy's own retries of GET and HEAD are the only resends. Connections are
proxy/connection.py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

import httpx

from proxy.connection import Connection


class Pool:
    """Up to `max_connections` connections to one origin, idle ones reused newest first.

    Requests that find every connection busy queue in order: a connection coming back is
    handed to the first of them, and a slot freed by a closed connection is reserved for
    it, so a newcomer cannot overtake the queue and `pool_timeout` bounds the wait.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        max_connections: int,
        keepalive_expiry: float,
        read_buffer: int,
        dial: tuple[str, int] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._dial = dial or (host, port)  # where to connect; TLS still checks `host`
        self._ssl = ssl_context
        self._max = max_connections
        self._expiry = keepalive_expiry
        self.read_buffer = read_buffer
        self._idle: list[Connection] = []
        self._count = 0  # connections open, opening, or reserved for a waiter
        # Each waiter gets a connection, or None: a slot reserved to open one.
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def size(self) -> tuple[int, int]:
        """(connections open or opening, of which idle): for tests and metrics."""
        return self._count, len(self._idle)

    async def acquire(
        self, connect_timeout: float | None, pool_timeout: float | None
    ) -> Connection:
        """An idle connection, or a new one once there is room for it."""
        if not self._waiters:
            idle = self._idle
            now = self.loop.time()
            while idle:
                connection = idle.pop()
                if connection.usable and now - connection.idle_since < self._expiry:
                    return connection
                self._discard(connection)
            if self._count < self._max:
                self._count += 1
                return await self._open(connect_timeout)
        handed = self._arrived(await self._wait_turn(pool_timeout))
        if handed is not None:
            return handed
        return await self._open(connect_timeout)  # into the slot reserved for us

    @staticmethod
    def _arrived(handed: Connection | None) -> Connection | None:
        """What a waiter was handed: a live connection, or None for a slot of its own. A
        connection closed on its way gives its slot to the waiter (forget skipped it)."""
        if handed is None:
            return None
        handed.in_transit = False
        if handed.usable:
            return handed
        handed.close()
        handed.counted = False
        return None

    async def _wait_turn(self, pool_timeout: float | None) -> Connection | None:
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(pool_timeout):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Our turn came as we gave up: pass it on rather than lose it.
                handed = self._arrived(waiter.result())
                if handed is not None:
                    self._hand_over(handed)
                else:
                    self._release_slot()
            else:
                waiter.cancel()
                if waiter in self._waiters:  # release may have popped it already
                    self._waiters.remove(waiter)  # a dead waiter must not make others queue
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout("no upstream connection became free in time") from None
            raise

    async def _open(self, connect_timeout: float | None) -> Connection:
        """Connect, in a slot already counted for this connection."""
        made: list[Connection] = []

        def factory() -> Connection:
            made.append(Connection(self))
            return made[0]

        try:
            async with asyncio.timeout(connect_timeout):
                await self.loop.create_connection(
                    factory,
                    *self._dial,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except BaseException as exc:
            if made:
                self._discard(made[0])
            else:
                self._release_slot()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout("connecting to upstream timed out") from None
            if isinstance(exc, OSError):
                raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from None
            raise
        return made[0]

    def _next_waiter(self) -> asyncio.Future[Connection | None] | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _release_slot(self) -> None:
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(None)  # the slot passes to the waiter, still counted
        else:
            self._count -= 1

    def _discard(self, connection: Connection) -> None:
        connection.close()
        self.forget(connection)

    def forget(self, connection: Connection) -> None:
        """Stop counting a connection that is closed (counted down once per connection)."""
        if connection.counted and not connection.in_transit:
            connection.counted = False
            if connection in self._idle:
                self._idle.remove(connection)
            self._release_slot()

    def release(self, connection: Connection) -> None:
        """Take a connection back after an exchange: to the next waiter or the idle
        list if it can take another request, else closed."""
        if not connection.reusable:
            self._discard(connection)
            return
        connection.park(self.loop.time())
        self._hand_over(connection)

    def _hand_over(self, connection: Connection) -> None:
        waiter = self._next_waiter()
        if waiter is not None:
            connection.in_transit = True
            waiter.set_result(connection)
            return
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._expiry, self._close_expired)

    def _close_expired(self) -> None:
        self._sweep = None
        horizon = self.loop.time() - self._expiry
        for connection in [c for c in self._idle if c.idle_since <= horizon]:
            self._discard(connection)
        if self._idle:
            oldest = min(c.idle_since for c in self._idle)
            self._sweep = self.loop.call_at(oldest + self._expiry, self._close_expired)

    async def aclose(self) -> None:
        """Close every idle connection."""
        for connection in list(self._idle):
            self._discard(connection)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
