"""The forwarding hop to Publer: one shared connection pool, streaming both ways.

Requests go straight to an httpx transport, not through `httpx.AsyncClient`: the client's
conveniences are each a hazard here (a cookie jar that replays one app's cookies on
another's request, redirect following that could carry the key elsewhere, `trust_env`
letting HTTPS_PROXY reroute keys, URL normalisation). The transport does none of them.
Low-level errors are mapped to the proxy's refusals in one place, `Upstream.send`.

The shipped transport, `PoolTransport`, is the HTTP/1.1 pool of proxy/pool.py behind
httpx's transport interface. `make bench` compares it with httpx's own transport (httpcore,
which re-checks every pooled connection on each request: encode/httpx#3215), with
`httpx_aiohttp` and with the aiohttp pool shipped before (bench/aiohttp_transport.py).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from proxy.connection import Connection, request_head
from proxy.errors import Refusal, UpstreamFailed
from proxy.pool import Pool
from proxy.settings import UpstreamSettings

KEEPALIVE_EXPIRY_SECONDS = 30.0
# Reading from Publer pauses while this much of its answer waits unsent to the client.
READ_BUFFER_BYTES = 256 * 1024

RawHeaders = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True)
class Timeouts:
    """Seconds for each phase of an exchange (None: no limit), as httpx names them."""

    connect: float | None
    read: float | None
    write: float | None
    pool: float | None

    @classmethod
    def of(cls, extension: dict[str, float | None]) -> Timeouts:
        """From httpx's `timeout` request extension."""
        get = extension.get
        return cls(get("connect"), get("read"), get("write"), get("pool"))

    def as_extension(self) -> dict[str, float | None]:
        """As httpx's `timeout` request extension."""
        return {"connect": self.connect, "read": self.read, "write": self.write, "pool": self.pool}


class Answer(Protocol):
    """Publer's answer as the forwarder uses it: head read, body not yet."""

    @property
    def status_code(self) -> int:
        """The status Publer answered."""
        ...

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """Publer's headers as received, in order."""
        ...

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, byte for byte. Raises httpx's exceptions."""
        ...

    async def aclose(self) -> None:
        """Free the connection (pooled again only if the body was read to its end)."""
        ...


class PoolAnswer:
    """An answer on a pooled connection."""

    __slots__ = ("_connection", "_open", "_pool", "_read_timeout", "raw_headers", "status_code")

    def __init__(
        self,
        status: int,
        headers: RawHeaders,
        connection: Connection,
        pool: Pool,
        read_timeout: float | None,
    ) -> None:
        self.status_code = status
        self.raw_headers = headers
        self._connection = connection
        self._pool = pool
        self._read_timeout = read_timeout
        self._open = True

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while chunk := await self._connection.read(self._read_timeout):
            yield chunk

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._pool.release(self._connection)


class HttpxAnswer:
    """An `httpx.Response` from any other httpx transport, seen as an Answer."""

    __slots__ = ("_response", "raw_headers", "status_code")

    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.raw_headers = response.headers.raw
        self._response = response

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def aclose(self) -> None:
        await self._response.aclose()


class _AnswerStream(httpx.AsyncByteStream):
    def __init__(self, answer: PoolAnswer) -> None:
        self._answer = answer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._answer.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        await self._answer.aclose()


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    # Python's default client context: certificates and host names verified, TLS >= 1.2.
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _dial(connect_to: str | None) -> tuple[str, int] | None:
    if connect_to is None:
        return None
    host, _, port = connect_to.rpartition(":")
    return host.strip("[]"), int(port)


class PoolTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over one `Pool` to the configured origin.

    It sends the target exactly as given (no requoting or normalisation), the headers as
    given, in order, and adds none but the body framing; it keeps no cookies, follows no
    redirects, decodes no content and reads no proxy settings from the environment.
    `Upstream` calls `send` directly, which skips building an `httpx.Request` and an
    `httpx.Response` on every request; other callers use `handle_async_request`.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        keepalive_expiry: float = KEEPALIVE_EXPIRY_SECONDS,
        read_buffer: int = READ_BUFFER_BYTES,
    ) -> None:
        parts = urlsplit(settings.url)
        https = parts.scheme == "https"
        self._origin = (parts.scheme, parts.hostname or "", parts.port or (443 if https else 80))
        self._pool = Pool(
            self._origin[1],
            self._origin[2],
            # A plain-HTTP origin (loopback, or an explicit opt-out in the settings) gets
            # no TLS context: loading the CA bundle costs start-up time and memory.
            _ssl_context(settings) if https else None,
            max_connections=settings.max_connections,
            keepalive_expiry=keepalive_expiry,
            read_buffer=read_buffer,
            dial=_dial(settings.connect_to),
        )

    @property
    def pool(self) -> Pool:
        return self._pool

    async def send(
        self, method: str, target: str, headers: RawHeaders, body: Body, timeouts: Timeouts
    ) -> PoolAnswer:
        """Send one request and return the answer with its body unread.

        `target` is the path and query as they go on the request line. Raises httpx's
        exceptions, or what iterating `body` raised.
        """
        head = request_head(method, target, headers, body)
        connection = await self._pool.acquire(timeouts.connect, timeouts.pool)
        try:
            status, answer_headers = await connection.request(
                head, body, method == "HEAD", (timeouts.read, timeouts.write)
            )
        except BaseException:
            self._pool.release(connection)  # not reusable mid-exchange: closed
            raise
        return PoolAnswer(status, answer_headers, connection, self._pool, timeouts.read)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx's transport interface, for callers that hold an `httpx.Request`."""
        url = request.url
        if (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)) != (
            self._origin
        ):
            raise httpx.UnsupportedProtocol(f"this transport only reaches {self._origin}")
        body: Body
        try:
            body = request.content
        except httpx.RequestNotRead:
            assert isinstance(request.stream, AsyncIterable)
            body = request.stream
        answer = await self.send(
            request.method,
            url.raw_path.decode("ascii"),
            request.headers.raw,
            body,
            Timeouts.of(request.extensions.get("timeout", {})),
        )
        return httpx.Response(
            status_code=answer.status_code,
            headers=answer.raw_headers,
            stream=_AnswerStream(answer),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._pool.aclose()


def make_transport(settings: UpstreamSettings) -> httpx.AsyncBaseTransport:
    """The shipped transport (bench/launch.py swaps this for the transport comparison)."""
    return PoolTransport(settings)


class Upstream:
    """Sends requests to the one configured origin and returns streaming answers."""

    def __init__(
        self, settings: UpstreamSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        parts = urlsplit(settings.url)
        self.scheme = parts.scheme
        self.hostname = parts.hostname or ""
        self.port = parts.port
        self.host_header = parts.netloc.encode("ascii")
        self._transport = transport or make_transport(settings)
        self._timeouts = Timeouts(
            connect=settings.connect_timeout_seconds,
            read=settings.read_timeout_seconds,
            write=settings.read_timeout_seconds,
            pool=settings.connect_timeout_seconds,
        )

    async def _send(self, method: str, target: str, headers: RawHeaders, body: Body) -> Answer:
        if isinstance(self._transport, PoolTransport):
            return await self._transport.send(method, target, headers, body, self._timeouts)
        request = httpx.Request(
            method,
            httpx.URL(
                scheme=self.scheme,
                host=self.hostname,
                port=self.port,
                raw_path=target.encode("ascii"),
            ),
            headers=headers,
            content=body,
            extensions={"timeout": self._timeouts.as_extension()},
        )
        return HttpxAnswer(await self._transport.handle_async_request(request))

    async def send(self, method: str, target: str, headers: RawHeaders, body: Body) -> Answer:
        """Send one request; the answer's body is not read. Raises UpstreamFailed.

        `target` is the path and query exactly as checked; the origin never comes from
        the request, so no client input can send the key anywhere else.
        """
        try:
            return await self._send(method, target, headers, body)
        except httpx.TimeoutException:
            raise UpstreamFailed(
                Refusal.of("upstream_timeout", "Publer did not answer in time")
            ) from None
        except (httpx.TransportError, OSError) as exc:
            raise UpstreamFailed(
                Refusal.of(
                    "upstream_unreachable",
                    f"Publer could not be reached ({type(exc).__name__})",
                )
            ) from None

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._transport.aclose()
