"""The aiohttp transport publer-proxy shipped before its own pool (bench variant `aiohttp`).

aiohttp's connection pool behind httpx's transport interface, called directly with a
pre-encoded yarl URL; kept here so that `make bench --variants aiohttp` can measure it
against proxy/pool.py in the same run. aiohttp is a test dependency, not a runtime one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from urllib.parse import urlsplit

import aiohttp
import httpx
import yarl
from multidict import CIMultiDict

from proxy.settings import UpstreamSettings

KEEPALIVE_EXPIRY_SECONDS = 30.0
# aiohttp reads the upstream socket in pieces of this size and pauses reading while about
# twice as much waits unsent to the client: that bounds memory per streamed answer.
READ_BUFFER_BYTES = 256 * 1024
# Headers that aiohttp would add on its own when the request has none. The proxy sends
# exactly the client's headers minus the hop-by-hop and identity headers plus its own
# (proxy/headers.py), so none of these may appear unless the client sent it.
_NO_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def make_transport(settings: UpstreamSettings) -> httpx.AsyncBaseTransport:
    """The aiohttp transport, with certificate checks and no environment proxies.

    A plain-HTTP origin (loopback, or an explicit opt-out in the settings) never uses TLS,
    so its transport gets no TLS context: loading the CA bundle costs 40 ms of start-up.
    """
    https = urlsplit(settings.url).scheme == "https"
    return AiohttpTransport(
        ssl_context=_ssl_context(settings) if https else None,
        max_connections=settings.max_connections,
    )


class _RequestBody:
    """The request body as aiohttp pulls it, with httpx's write timeout and error passing.

    aiohttp writes the body in a task of its own and turns any error there into a
    connection error. This keeps what the body's source raised (the client left, the body
    grew too large), so `send` raises that, as httpx's own transport would. The write
    timeout runs only while aiohttp holds a chunk it cannot get rid of (the upstream stopped
    reading), never while the source waits for the client.
    """

    def __init__(self, body: bytes | AsyncIterable[bytes], write_timeout: float | None) -> None:
        self._body = body
        self._write_timeout = write_timeout
        self._deadline: asyncio.Timeout | None = None
        self.error: Exception | None = None
        self.stalled = False

    def watch(self, deadline: asyncio.Timeout | None) -> None:
        """Arm the write timeout on `deadline` (None: the request no longer waits on it)."""
        self._deadline = deadline

    def _arm(self, when: float | None) -> None:
        deadline = self._deadline
        if deadline is not None and self._write_timeout is not None and not deadline.expired():
            deadline.reschedule(when)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk."""
        loop = asyncio.get_running_loop()
        try:
            async for chunk in _pieces(self._body):
                if self._write_timeout is not None:
                    self.stalled = True
                    self._arm(loop.time() + self._write_timeout)
                yield chunk
                self.stalled = False
                self._arm(None)
        except Exception as exc:
            self.error = exc
            raise


async def _pieces(body: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(body, bytes):
        yield body
    else:
        async for chunk in body:
            yield chunk


class _ResponseBody(httpx.AsyncByteStream):
    """An aiohttp response body as an httpx stream; closing it frees the connection."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _httpx_error(exc) from exc

    async def aclose(self) -> None:
        # A body not read to the end leaves the connection unusable: aiohttp closes it
        # rather than pooling it.
        self._response.release()


def _httpx_error(exc: BaseException, *, writing: bool = False) -> httpx.TransportError:
    """The httpx exception for an aiohttp (or socket) failure."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, TimeoutError):
        return httpx.WriteTimeout(message) if writing else httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError | aiohttp.ClientPayloadError,
    ):
        return httpx.RemoteProtocolError(message)
    return httpx.ReadError(message)


def _header_text(value: bytes) -> str:
    # aiohttp encodes header text as UTF-8, so a value survives byte for byte only when
    # it is valid UTF-8 (ASCII in practice).
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise httpx.LocalProtocolError("a header value is not ASCII or UTF-8") from None


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over one aiohttp connection pool.

    It keeps the guarantees of httpx's own transport where aiohttp's defaults would not:
    no cookie jar, no redirects, no decompression, no environment proxies, no header that
    aiohttp would add by itself, the target sent exactly as given (`encoded=True`: no
    requoting or normalisation), streaming both ways, a write timeout, and errors raised
    as httpx's exceptions. `Upstream` calls `send` directly, which skips building an
    `httpx.Request` (a URL parse and a header copy) on every request.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        keepalive_expiry: float = KEEPALIVE_EXPIRY_SECONDS,
    ) -> None:
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, because an aiohttp session belongs to the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_expiry,
                # Without a context of ours, aiohttp's default: certificates verified.
                # (`ssl=False` would mean "do not verify", never pass it.)
                ssl=self._ssl_context if self._ssl_context is not None else True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                requote_redirect_url=False,
                raise_for_status=False,
                read_bufsize=READ_BUFFER_BYTES,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    def _timeout(self, timeouts: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        connect, read, pool = timeouts.get("connect"), timeouts.get("read"), timeouts.get("pool")
        key = (connect, read, pool)
        found = self._timeouts.get(key)
        if found is None:
            # aiohttp's `connect` covers waiting for a pooled connection and connecting.
            waiting = None if connect is None or pool is None else connect + pool
            found = aiohttp.ClientTimeout(
                total=None, connect=waiting, sock_connect=connect, sock_read=read
            )
            self._timeouts[key] = found
        return found

    async def send(
        self,
        method: str,
        url: yarl.URL,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes] | None,
        timeouts: Mapping[str, float | None],
        request: httpx.Request | None = None,
    ) -> httpx.Response:
        """Send one request and return the response with its body unread.

        `url` must be built with `encoded=True`; `headers` are sent as they are, in order,
        repeated ones included. Raises httpx's exceptions, or what `body` raised.
        """
        session = self._client()
        fields = CIMultiDict(
            (name.decode("latin-1"), _header_text(value))
            for name, value in headers
            # aiohttp frames the body itself: chunked only when there is no Content-Length.
            if name.lower() != b"transfer-encoding"
        )
        timeout = self._timeout(timeouts)
        if body is None or body == b"":
            try:
                response = await session.request(
                    method, url, headers=fields, allow_redirects=False, timeout=timeout
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise _httpx_error(exc) from exc
        else:
            source = _RequestBody(body, timeouts.get("write"))
            try:
                async with asyncio.timeout(None) as deadline:
                    source.watch(deadline)
                    response = await session.request(
                        method,
                        url,
                        headers=fields,
                        data=source.chunks(),
                        allow_redirects=False,
                        timeout=timeout,
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if source.error is not None:
                    raise source.error from None
                raise _httpx_error(exc, writing=source.stalled) from exc
            finally:
                source.watch(None)
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseBody(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx's transport interface, for callers that hold an `httpx.Request`."""
        url = request.url
        target = yarl.URL(
            f"{url.scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}",
            encoded=True,
        )
        body: bytes | AsyncIterable[bytes] | None
        try:
            body = request.content
        except httpx.RequestNotRead:
            assert isinstance(request.stream, AsyncIterable)
            body = request.stream
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        return await self.send(request.method, target, request.headers.raw, body, timeouts, request)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None
