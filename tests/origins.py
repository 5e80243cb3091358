"""Scripted origins: loopback HTTP/1.1 servers that misbehave exactly as a test says.

An `Origin` runs a raw asyncio server in a thread of its own. It parses each request
(head, then a Content-Length or chunked body) and hands it to the test's `script`, which
returns the steps to perform: bytes to write, pauses, a close, a reset, or silence. Every
request and every connection is recorded, so a test can tell what the origin really saw
(and whether the proxy closed its connection).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

# Steps a script returns for one request, performed in order.


@dataclass(frozen=True)
class Write:
    """Write these bytes."""

    data: bytes


@dataclass(frozen=True)
class Sleep:
    """Pause, in seconds."""

    seconds: float


@dataclass(frozen=True)
class Close:
    """Close the connection (FIN)."""


@dataclass(frozen=True)
class Reset:
    """Close the connection with a TCP reset."""


@dataclass(frozen=True)
class Hold:
    """Write nothing more and wait until the peer closes the connection."""


Step = Write | Sleep | Close | Reset | Hold


@dataclass
class Request:
    """A request as the origin read it."""

    connection: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    idle_before: float  # seconds the connection was idle before this request
    # Set once the origin performed every step of its script for this request (its last
    # bytes written, its close or reset done, or the peer gone after a Hold).
    performed: threading.Event = field(default_factory=threading.Event)

    @property
    def query(self) -> dict[str, str]:
        """The query parameters (last value wins)."""
        _, _, query = self.target.partition("?")
        return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


@dataclass
class Connection:
    """One connection the origin accepted; `closed_by_peer` when the proxy closed it."""

    number: int
    closed_by_peer: threading.Event = field(default_factory=threading.Event)


Script = Callable[[Request], list[Step]]


def response(status: int = 200, body: bytes = b"ok", *headers: str, reason: str = "OK") -> bytes:
    """A well-framed response with Content-Length."""
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Origin:
    """A scripted HTTP/1.1 origin on a free loopback port, in a thread."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.connections: list[Connection] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """The origin, as `upstream.url`."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Origin:
        self._thread.start()
        self._ready.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    def requests_for(self, key: str, value: str) -> list[Request]:
        """The requests whose query has `key=value`."""
        return [r for r in self.requests if r.query.get(key) == value]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(len(self.connections))
        self.connections.append(connection)
        self._writers.add(writer)
        idle_since = time.monotonic()
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    return
                request = _parse(connection.number, head, time.monotonic() - idle_since)
                try:
                    request.body = await _read_body(reader, request.headers)
                except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                    self.requests.append(request)  # seen, though its body broke off
                    return
                self.requests.append(request)
                for step in self.script(request):
                    if isinstance(step, Write):
                        writer.write(step.data)
                        try:
                            await writer.drain()
                        except ConnectionError:
                            return
                    elif isinstance(step, Sleep):
                        await asyncio.sleep(step.seconds)
                    elif isinstance(step, Close):
                        request.performed.set()
                        return
                    elif isinstance(step, Reset):
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        writer.transport.abort()
                        request.performed.set()
                        return
                    else:
                        try:
                            while await reader.read(65536):  # until the peer closes
                                pass
                        except ConnectionError:
                            pass
                        connection.closed_by_peer.set()
                        request.performed.set()
                        return
                request.performed.set()
                idle_since = time.monotonic()
        finally:
            if reader.at_eof():
                connection.closed_by_peer.set()
            self._writers.discard(writer)
            writer.close()


def _parse(connection: int, head: bytes, idle: float) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return Request(connection, method, target, headers, b"", idle)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                return body
    return await reader.readexactly(int(headers.get("content-length", "0")))
