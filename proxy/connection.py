"""One HTTP/1.1 connection to the origin: the request head as given, the answer by llhttp.

The proxy talks to exactly one origin, one request per connection at a time, and never
needs redirects, cookies, proxies, decompression or URL handling: a general client spends
most of its time on those. A connection writes the request head as the bytes it was given
and hands the answer back as raw header pairs and body chunks, parsed by llhttp
(httptools, already the parser of the server side). Failures are raised as httpx's
exceptions, so the transport in proxy/upstream.py is a plain httpx transport to its
callers. The pool of these connections is proxy/pool.py.

Rules a connection keeps:
  - it is reusable only after an answer was read to its end, the request went out whole
    (never more or fewer body bytes than its Content-Length) and neither side asked to
    close; an answer that breaks any framing rule closes it;
  - reading pauses while `read_buffer` bytes of answer wait for the client, and writing
    waits while the socket's buffer is full: memory per request stays bounded both ways;
  - an early answer (a 413 while the body is still going up) ends the upload and is
    returned, not lost to a write timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools
import httpx

# Framing headers: the pool decides them for requests and reads them on answers.
_TRANSFER_ENCODING = b"transfer-encoding"
_LENGTH = b"content-length"
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
MAX_ANSWER_HEAD_BYTES = 64 * 1024


class _Exchange:
    """The state of one request and its answer on a connection."""

    __slots__ = (
        "buffered",
        "chunks",
        "complete",
        "error",
        "head",
        "head_bytes",
        "head_only",
        "headers",
        "interim",
        "sent",
        "status",
        "until_close",
        "waiter",
    )

    def __init__(self, head: asyncio.Future[None], head_only: bool) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head = head
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.head_only = head_only
        self.until_close = False
        self.interim = False
        self.sent = False


def _frames_body(name: bytes, value: bytes) -> bool:
    """Whether this header gives the answer's body an end other than the connection's."""
    lower = name.lower()
    if lower == _LENGTH:
        return True
    return lower == _TRANSFER_ENCODING and value.rstrip().lower().endswith(b"chunked")


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future[None], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class Owner(Protocol):
    """What a connection needs of its pool."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the pool's connections live on."""
        ...

    @property
    def read_buffer(self) -> int:
        """Bytes of answer buffered before reading pauses."""
        ...

    def forget(self, connection: Connection) -> None:
        """Stop counting a connection that closed."""
        ...


class Connection(asyncio.Protocol):
    """One connection to the origin; httptools calls the `on_*` methods while parsing."""

    def __init__(self, pool: Owner) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._exchange: _Exchange | None = None
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        self.closed = False
        self.keep_alive = True
        self.idle_since = 0.0
        self.counted = True  # still counted in the pool's size
        self.in_transit = False  # handed to a waiter that has not yet taken it

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the Transport methods without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._exchange is None:
            # Bytes while idle: the origin is not speaking HTTP as agreed.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed answer from upstream: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        self.keep_alive = False
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep_alive = False
        exchange = self._exchange
        if exchange is not None and not exchange.complete:
            if exchange.until_close and exchange.head.done() and exc is None:
                exchange.complete = True  # a body framed by the end of the connection
                _wake(exchange.waiter)
            else:
                self._fail(httpx.RemoteProtocolError("upstream closed the connection mid-answer"))
        drain = self._drain
        if drain is not None and not drain.done():
            if exchange is not None and exchange.head.done():
                drain.set_result(None)  # answered already: the upload loop stops and returns it
            else:
                drain.set_exception(httpx.WriteError("upstream closed the connection"))
        self._pool.forget(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        _wake(self._drain)

    # httptools callbacks

    def on_message_begin(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        if exchange.complete:
            # A second answer to one request: the two sides no longer agree where the
            # messages are, so the connection must not be used again.
            self.keep_alive = False
            raise httpx.RemoteProtocolError("upstream sent more than one answer")
        exchange.headers = []
        exchange.head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        exchange.head_bytes += len(name) + len(value) + 4
        if exchange.head_bytes > MAX_ANSWER_HEAD_BYTES:
            raise httpx.RemoteProtocolError("upstream answer head is too large")
        exchange.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        status = self._parser.get_status_code()
        if status < 200:
            exchange.interim = True  # 100 Continue and the like: wait for the real answer
            return
        exchange.status = status
        if exchange.head_only:
            # An answer to HEAD has no body whatever its Content-Length says; llhttp cannot
            # be told so through httptools, so the connection is not used again.
            exchange.complete = True
            self.keep_alive = False
        elif status not in (204, 304):
            exchange.until_close = not any(
                _frames_body(name, value) for name, value in exchange.headers
            )
        _wake(exchange.head)
        _wake(self._drain)  # an early answer (a 413, say) ends an upload that is stuck

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        if exchange.interim:
            raise httpx.RemoteProtocolError("upstream sent a body with an interim answer")
        if exchange.complete:
            return
        exchange.chunks.append(body)
        exchange.buffered += len(body)
        if exchange.buffered >= self._pool.read_buffer and not self._reading_paused:
            assert self._transport is not None
            self._reading_paused = True
            self._transport.pause_reading()
        _wake(exchange.waiter)

    def on_message_complete(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        if exchange.interim:
            exchange.interim = False
            return
        exchange.complete = True
        if not self._parser.should_keep_alive():
            self.keep_alive = False
        _wake(exchange.waiter)

    # used by the pool and the answer

    def _fail(self, error: Exception) -> None:
        exchange = self._exchange
        if exchange is None or exchange.complete or exchange.error is not None:
            return
        exchange.error = error
        head = exchange.head
        if not head.done():
            head.set_exception(error)
            head.exception()  # retrieved here: a request that already gave up never awaits it
        _wake(exchange.waiter)
        _wake(self._drain)

    def close(self) -> None:
        """Drop the connection at once; it is never used again. (A graceful close would
        wait to flush what is unsent, for ever if the origin stopped reading.)"""
        self.keep_alive = False
        if self._transport is not None and not self.closed:
            self._transport.abort()
        self.closed = True

    @property
    def usable(self) -> bool:
        """Whether the connection can take a request: neither side closed it or asked to,
        not even in a way the event loop has yet to report."""
        transport = self._transport
        return (
            not self.closed
            and self.keep_alive
            and transport is not None
            and not transport.is_closing()
        )

    @property
    def reusable(self) -> bool:
        """Whether the exchange left the connection ready for another request: the request
        went out whole and its answer was read to the end, and nobody asked to close."""
        exchange = self._exchange
        return (
            exchange is not None
            and exchange.sent
            and exchange.complete
            and exchange.error is None
            and not exchange.chunks
            and self.usable
        )

    def park(self, now: float) -> None:
        """Mark the connection idle; bytes arriving now would close it."""
        self._exchange = None
        self.idle_since = now

    async def _drained(self, write_timeout: float | None) -> None:
        if not self._writing_paused:
            return
        drain = self._drain = self._loop.create_future()
        timer = None
        if write_timeout is not None:
            timer = self._loop.call_later(
                write_timeout, _expire, drain, httpx.WriteTimeout("upstream stopped reading")
            )
        try:
            await drain
        finally:
            self._drain = None
            if timer is not None:
                timer.cancel()

    async def request(
        self,
        head: Head,
        body: bytes | AsyncIterable[bytes] | None,
        head_only: bool,
        timeouts: tuple[float | None, float | None],
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send one request; return the answer's status and headers once they arrived."""
        read_timeout, write_timeout = timeouts
        transport = self._transport
        assert transport is not None
        exchange = self._exchange = _Exchange(self._loop.create_future(), head_only)
        if body is None or isinstance(body, bytes):
            # request_head checked the declared length against these bytes.
            transport.write(head.data + body if body else head.data)
            exchange.sent = True
        else:
            transport.write(head.data)
            exchange.sent = await self._upload(body, head, write_timeout)
        if not exchange.head.done():
            timer = None
            if read_timeout is not None:
                timer = self._loop.call_later(
                    read_timeout,
                    _expire,
                    exchange.head,
                    httpx.ReadTimeout("upstream did not answer in time"),
                )
            try:
                await exchange.head
            finally:
                if timer is not None:
                    timer.cancel()
        elif exchange.error is not None:
            raise exchange.error
        return exchange.status, exchange.headers

    async def _upload(
        self, body: AsyncIterable[bytes], head: Head, write_timeout: float | None
    ) -> bool:
        """Write a streamed body as it comes; False if the answer (or a failure) came first.

        Never more and never fewer bytes than a declared Content-Length: a body that
        disagrees with it would leave the origin reading the next request from the wrong
        place, so it fails the request and the connection is not used again.
        """
        transport = self._transport
        exchange = self._exchange
        assert transport is not None and exchange is not None
        written = 0
        async for chunk in body:
            if exchange.head.done() or self.closed:
                return False
            if not chunk:
                continue
            written += len(chunk)
            if head.length is not None and written > head.length:
                raise httpx.LocalProtocolError("the request body is longer than its Content-Length")
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if head.chunked else chunk)
            await self._drained(write_timeout)
            if exchange.head.done() or self.closed:
                return False
        if head.length is not None and written != head.length:
            raise httpx.LocalProtocolError("the request body is shorter than its Content-Length")
        if head.chunked:
            transport.write(b"0\r\n\r\n")
        return True

    async def read(self, read_timeout: float | None) -> bytes:
        """The next part of the answer's body; b"" at its end."""
        exchange = self._exchange
        assert exchange is not None
        while not exchange.chunks:
            if exchange.error is not None:
                raise exchange.error
            if exchange.complete:
                return b""
            waiter = exchange.waiter = self._loop.create_future()
            timer = None
            if read_timeout is not None:
                timer = self._loop.call_later(
                    read_timeout,
                    _expire,
                    waiter,
                    httpx.ReadTimeout("upstream stopped sending its answer"),
                )
            try:
                await waiter
            finally:
                exchange.waiter = None
                if timer is not None:
                    timer.cancel()
        chunks = exchange.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        exchange.buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return data


@dataclass(frozen=True)
class Head:
    """A request's line and header section, and how its body is framed."""

    data: bytes
    chunked: bool
    length: int | None  # the declared Content-Length


def request_head(
    method: str, target: str, headers: list[tuple[bytes, bytes]], body: object
) -> Head:
    """The request line and header section, and how the body goes.

    Headers go out as given, in order; the framing headers are the proxy's to decide: a
    given Content-Length stays (the body is passed on byte for byte, and must match it), a
    streamed body of unknown length is chunked, and a body-less POST says
    Content-Length: 0 as RFC 9110 asks. A CR, LF or NUL inside any name or value is
    refused: it would split the request.
    """
    lines = [f"{method} {target} HTTP/1.1".encode("ascii")]
    length: int | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == _TRANSFER_ENCODING:
            continue
        if lower == _LENGTH:
            declared = int(value) if value.isdigit() else -1
            if declared < 0 or (length is not None and declared != length):
                raise httpx.LocalProtocolError("the Content-Length header is not one number")
            length = declared
        lines.append(name + b": " + value)
    chunked = False
    if body is None or isinstance(body, bytes):
        size = len(body) if body else 0
        if length is None and (size or method not in _NO_BODY_METHODS):
            lines.append(b"content-length: %d" % size)
        elif length is not None and length != size:
            raise httpx.LocalProtocolError("the request body does not match its Content-Length")
    elif length is None:
        chunked = True
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"\r\n")
    data = b"\r\n".join(lines)
    # Exactly one CRLF per line and the blank line: anything more came from a value.
    if data.count(b"\n") != len(lines) or data.count(b"\r") != len(lines) or b"\0" in data:
        raise httpx.LocalProtocolError("a header name or value holds CR, LF or NUL")
    return Head(data, chunked, length)
