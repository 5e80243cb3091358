"""The hop to Publer: aiohttp's client, configured once, and every failure mapped once.

aiohttp's `ClientSession` is used directly (an httpx-style adapter around it cost more
than the hop itself). Its conveniences are each a hazard on a path that carries a key, so
`_session` turns them off one by one, with the reason beside each setting.

What this module adds to aiohttp, because an origin may misbehave (RFC 9112):
  - an idle connection is reused only when it is clean: nothing arrived on it since its
    last response (no late body of a 204, no garbage, no FIN waiting in the kernel), and
    it has been idle for less than the origin's own `Keep-Alive: timeout` (less a margin)
    and less than `IDLE_SECONDS`;
  - a response that may still have bytes on their way (a 1xx, 204 or 304 that announced a
    body) never leaves its connection for another request;
  - a status outside 200-599 (a 101 to a plain request, 600) and header fields that are
    not tokens or carry control bytes fail the request with 502, and the connection closes;
  - requests wait for one of `max_connections` in a queue of their own, so a full pool is
    told apart from a slow Publer (`upstream_busy`, not `upstream_timeout`);
  - nothing is ever resent by the client library: the proxy's own retries of GET and HEAD
    (proxy/hop/forwarder.py) are the only resends.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

import aiohttp
import aiohttp.abc
import yarl
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from proxy.config.settings import UpstreamSettings
from proxy.records.metrics import PoolStats
from proxy.rules.refusals import Refusal, UpstreamFailed

# Idle connections close after this many seconds: shorter than common server keep-alive
# timeouts (nginx 75 s, Apache 5 s and Node 5 s announce theirs; we honour announcements).
IDLE_SECONDS = 4.0
# An announced `Keep-Alive: timeout=N` is trusted only up to N less this margin: the
# origin's clock starts when it sent the response, ours when we finished reading it.
KEEP_ALIVE_MARGIN_SECONDS = 1.0
# aiohttp reads the upstream socket in pieces of this size and pauses reading while about
# twice as much waits unsent to the client: that bounds memory per streamed response.
READ_BUFFER_BYTES = 256 * 1024
# Response head limits (aiohttp's defaults, named): a longer field fails the request with
# 502 once this many bytes arrived, so a 64 MiB header never grows the process.
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 128
# Headers aiohttp would add on its own when the request has none. The proxy sends exactly
# the client's headers minus the hop-by-hop and identity ones, plus its own.
_NO_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_NO_BODY_STATUSES = frozenset({204, 304})
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CTL = frozenset(range(0x20)) - {0x09} | {0x7F}

RawHeaders = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes] | None


def _timeout() -> Refusal:
    return Refusal.of("upstream_timeout", "Publer did not respond in time")


def _unreachable(what: str) -> Refusal:
    return Refusal.of("upstream_unreachable", what)


def _readable(transport: asyncio.BaseTransport | None) -> bool:
    """Whether bytes or a FIN wait in the kernel for a connection that expects none."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(0))


# The connection the connector last handed to the request running in this task: the
# response checks (`Upstream.send`) mark it when it must never serve another request.
_handed: contextvars.ContextVar[object | None] = contextvars.ContextVar("handed", default=None)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, handing out only clean idle connections (the module docstring).

    It wraps `connect`, aiohttp's documented "get from pool or create new connection":
    a pooled connection that is not clean is closed and the next one taken. aiohttp itself
    already drops connections idle for longer than `keepalive_timeout`. It reads the
    protocol's `should_close`, which aiohttp sets when bytes or a FIN arrive on an idle
    connection but does not document; the late-byte tests of tests/test_upstream_faults.py
    fail if it stops meaning that.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Until when a connection may be reused, decided by each response on it (`reuse`):
        # at once (0.0) from being handed out until its response is checked, or when that
        # response may still have bytes on their way; else the origin's `Keep-Alive:
        # timeout=N`. A connection whose response was never checked is never reused.
        self.reuse_until: WeakKeyDictionary[object, float] = WeakKeyDictionary()
        # The connections handed out, by their protocol, for the count of open ones and to
        # tell a pooled connection from a new one. Not weak: a transport holds its protocol.
        # Closed ones are dropped whenever a new connection is added, so this holds at
        # most the open connections and those closed since the last new one.
        self.handed_out: dict[object, asyncio.BaseTransport] = {}

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> aiohttp.connector.Connection:
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            transport = connection.transport
            # A connection seen before comes from the pool; a new one is clean (its TLS
            # session tickets may be waiting to be read).
            new = protocol not in self.handed_out
            if new or self.is_clean(protocol, transport):
                if protocol is not None:
                    if new and transport is not None:
                        self._forget_closed()
                        self.handed_out[protocol] = transport
                    self.reuse_until[protocol] = 0.0  # until its response is checked
                _handed.set(protocol)
                return connection
            connection.close()

    def is_clean(
        self, protocol: ResponseHandler | None, transport: asyncio.BaseTransport | None
    ) -> bool:
        """Whether a pooled connection may serve another request."""
        # `should_close`: the connection's protocol saw bytes while idle, or a FIN.
        return (
            protocol is not None
            and not protocol.should_close
            and time.monotonic() < self.reuse_until.get(protocol, math.inf)
            and not _readable(transport)
        )

    def reuse(self, protocol: object, for_seconds: float = math.inf) -> None:
        """Let `protocol` serve other requests for `for_seconds` from now (0: never)."""
        self.reuse_until[protocol] = time.monotonic() + for_seconds

    def _forget_closed(self) -> None:
        for protocol, transport in list(self.handed_out.items()):
            if transport.is_closing():
                del self.handed_out[protocol]

    def open_count(self) -> int:
        """Connections open, serving a request or idle in the pool."""
        return sum(1 for transport in self.handed_out.values() if not transport.is_closing())


class _DialTo(aiohttp.abc.AbstractResolver):
    """Resolves the origin's name to `upstream.connect_to` (curl's --connect-to): the
    connection goes there, while TLS still checks the origin's own name."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        found = await self._resolver.resolve(self._host, self._port, family)
        return [{**result, "hostname": host} for result in found]

    async def close(self) -> None:
        await self._resolver.close()


def _dial(connect_to: str | None) -> _DialTo | None:
    if connect_to is None:
        return None
    host, _, port = connect_to.rpartition(":")
    return _DialTo(host.strip("[]"), int(port))


def _keep_alive_timeout(headers: Sequence[tuple[bytes, bytes]]) -> float | None:
    """The `timeout=N` of a Keep-Alive header, in seconds (RFC 2068 19.7.1.1)."""
    for name, value in headers:
        if name.lower() == b"keep-alive":
            for part in value.split(b","):
                key, _, number = part.strip().partition(b"=")
                if key.strip().lower() == b"timeout":
                    try:
                        return float(number.strip())
                    except ValueError:
                        return 0.0
    return None


def _announces_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding" or (lower == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _reuse(connector: _Connector, protocol: object, response: aiohttp.ClientResponse) -> None:
    """Let `protocol` serve other requests as its response allows: never after a 1xx, 204
    or 304 that announced a body (its bytes may still be on their way), else within the
    origin's own `Keep-Alive: timeout=N` (less a margin) if it announced one."""
    headers = response.raw_headers
    status = response.status
    if (status in _NO_BODY_STATUSES or status < 200) and _announces_body(headers):
        connector.reuse(protocol, 0.0)
        return
    announced = _keep_alive_timeout(headers)
    if announced is None:
        connector.reuse(protocol)
    else:
        connector.reuse(protocol, max(0.0, announced - KEEP_ALIVE_MARGIN_SECONDS))


class _Gate:
    """At most `size` requests hold a connection; the others queue in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def enter(self, wait_seconds: float) -> None:
        """Take a place, waiting at most `wait_seconds`. Raises TimeoutError."""
        if self.in_use < self.size and not self._waiters:
            self.in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_seconds):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed a place as we gave up: pass it on
            else:
                waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        """Give the place back: to the first in the queue, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_use -= 1


class _RequestBody:
    """A streamed request body as aiohttp pulls it, with a write timeout and error passing.

    aiohttp writes the body in a task of its own and turns any error there into a
    connection error: this keeps what the body's source raised (the client left, the body
    grew too large), so `send` raises that instead. The write timeout runs only while
    aiohttp holds a chunk it cannot get rid of (Publer stopped reading), never while the
    source waits for the client.
    """

    def __init__(self, body: AsyncIterable[bytes], write_timeout: float) -> None:
        self._body = body
        self._write_timeout = write_timeout
        self._deadline: asyncio.Timeout | None = None
        self.error: BaseException | None = None
        self.stalled = False
        self.finished = False

    def watch(self, deadline: asyncio.Timeout | None) -> None:
        """Arm the write timeout on `deadline` (None: nobody waits on the request now)."""
        self._deadline = deadline

    def _arm(self, when: float | None) -> None:
        deadline = self._deadline
        if deadline is not None and not deadline.expired():
            deadline.reschedule(when)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk."""
        loop = asyncio.get_running_loop()
        try:
            async for chunk in self._body:
                self.stalled = True
                self._arm(loop.time() + self._write_timeout)
                yield chunk
                self.stalled = False
                self._arm(None)
        except Exception as exc:
            self.error = exc
            raise
        self.finished = True


class Response(Protocol):
    """Publer's response as the forwarder uses it: status and headers read, body not yet."""

    @property
    def status_code(self) -> int:
        """The status Publer responded with."""
        ...

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """Publer's header fields as received, in order."""
        ...

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, byte for byte. Raises UpstreamFailed."""
        ...

    async def aclose(self) -> None:
        """Free the connection."""
        ...


class AiohttpResponse:
    """A response on one of aiohttp's connections.

    `aclose` frees the connection: back to the pool only when the body was read to its
    end and the request went out whole, else closed.
    """

    __slots__ = ("_body", "_done", "_gate", "_response", "raw_headers", "status_code")

    def __init__(
        self, response: aiohttp.ClientResponse, body: _RequestBody | None, gate: _Gate
    ) -> None:
        self.status_code = response.status
        self.raw_headers: Sequence[tuple[bytes, bytes]] = response.raw_headers
        self._response = response
        self._body = body
        self._gate = gate
        self._done = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, byte for byte. Raises UpstreamFailed."""
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (aiohttp.ClientError, HttpProcessingError) as exc:
            raise UpstreamFailed(
                _unreachable(f"Publer's response broke off ({type(exc).__name__})")
            ) from None
        except TimeoutError:
            raise UpstreamFailed(_timeout()) from None

    async def aclose(self) -> None:
        """Free the connection (idempotent)."""
        if self._done:
            return
        self._done = True
        response = self._response
        if response.content.is_eof() and (self._body is None or self._body.finished):
            response.release()
        else:
            response.close()
        self._gate.leave()


def _ssl_setting(settings: UpstreamSettings) -> ssl.SSLContext | bool:
    """What aiohttp's `ssl=` gets: never False, which would mean "do not verify".

    Without `upstream.ca_file`, True: aiohttp's own verified context (Python's default:
    certificates and host names checked, TLS >= 1.2), whose CA bundle it loaded at import;
    a second copy would cost a quarter of a second of start-up and some MiB.
    """
    if settings.ca_file is None:
        return True
    context = ssl.create_default_context(cafile=str(settings.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _aiohttp_headers(headers: RawHeaders) -> CIMultiDict[str]:
    """The request headers as aiohttp takes them; non-ASCII values are refused.

    aiohttp encodes header text as UTF-8, so only ASCII survives byte for byte.
    """
    fields: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        if name == b"transfer-encoding":
            continue  # aiohttp frames the body itself: chunked when no Content-Length
        try:
            fields.add(name.decode("ascii"), value.decode("ascii"))
        except UnicodeDecodeError:
            raise UpstreamFailed(
                Refusal.of(
                    "bad_request",
                    f"the value of header '{name.decode('latin-1')}' is not ASCII; Publer's"
                    " headers are ASCII, so send it percent-encoded or leave it out",
                )
            ) from None
    return fields


def _check_head(response: aiohttp.ClientResponse) -> Refusal | None:
    """Why Publer's response head cannot be passed on, if it cannot."""
    status = response.status
    if status == 101:
        return _unreachable("Publer switched protocols though none was asked for (101)")
    if not 200 <= status <= 599:
        return _unreachable(f"Publer responded with status {status}, which HTTP does not define")
    for name, value in response.raw_headers:
        if not name or not _TCHAR.issuperset(name) or not _CTL.isdisjoint(value):
            return _unreachable("Publer's response has a malformed header field")
    return None


class Upstream:
    """Sends requests to the one configured origin and returns streaming responses."""

    def __init__(self, settings: UpstreamSettings) -> None:
        parts = urlsplit(settings.url)
        self._settings = settings
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host_header = parts.netloc.encode("ascii")
        self._gate = _Gate(settings.max_connections)
        # Only the proxy the operator named (`upstream.proxy`), never the environment's;
        # its credentials go in Proxy-Authorization (to the proxy, never to Publer).
        named = yarl.URL(settings.proxy) if settings.proxy else None
        self._proxy = named.with_user(None) if named is not None else None
        self._proxy_auth = aiohttp.BasicAuth.from_url(named) if named is not None else None
        self._session: aiohttp.ClientSession | None = None
        self._connector: _Connector | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            # `connect` covers waiting for a pooled connection, which the gate already
            # bounds, and connecting; `sock_read` runs between any two reads.
            connect=settings.connect_timeout_seconds,
            sock_connect=settings.connect_timeout_seconds,
            sock_read=settings.read_timeout_seconds,
        )

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, because an aiohttp session belongs to the running event loop.
        if self._session is None:
            settings = self._settings
            connector = self._connector = _Connector(
                limit=settings.max_connections,
                limit_per_host=0,
                keepalive_timeout=IDLE_SECONDS,
                ssl=_ssl_setting(settings),
                # Where to connect, when upstream.connect_to names it; else DNS as usual.
                resolver=_dial(settings.connect_to),
            )
            session = aiohttp.ClientSession(
                connector=connector,
                # Otherwise a Set-Cookie from one app's response is replayed on the next
                # app's request.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Otherwise HTTP(S)_PROXY and ~/.netrc could reroute keys or add
                # credentials.
                trust_env=False,
                # Otherwise a gzip body is decoded and no longer matches its headers.
                auto_decompress=False,
                # Otherwise User-Agent, Accept, Accept-Encoding and Content-Type are added.
                skip_auto_headers=_NO_AUTO_HEADERS,
                # Otherwise a redirect's Location is re-quoted (it is never followed).
                requote_redirect_url=False,
                read_bufsize=READ_BUFFER_BYTES,
                max_field_size=MAX_FIELD_BYTES,
                max_headers=MAX_HEADERS,
                timeout=self._timeout,
            )
            # Otherwise aiohttp resends PUT and DELETE (and GET) once when a connection
            # closes before the response; the proxy decides about resends itself (GET and
            # HEAD only). The one private attribute this module sets: aiohttp has no public
            # switch for it (its request traces start once per request, not per attempt).
            # tests/test_upstream_faults.py's DELETE test fails if a release renames it.
            session._retry_connection = False
            self._session = session
        return self._session

    def stats(self) -> PoolStats:
        """Connections in use, idle, and requests waiting for one (for /metrics)."""
        open_ = self._connector.open_count() if self._connector is not None else 0
        in_use = self._gate.in_use
        return PoolStats(in_use, max(0, open_ - in_use), self._gate.waiting)

    @property
    def connector(self) -> _Connector | None:
        """aiohttp's connector, once the first request made it (for tests)."""
        return self._connector

    async def send(self, method: str, target: str, headers: RawHeaders, body: Body) -> Response:
        """Send one request; the response's body is not read. Raises UpstreamFailed.

        `target` is the path and query exactly as checked; the origin never comes from
        the request, so no client input can send the key anywhere else. Whatever the
        body's source raised (the client left) is raised as it is.
        """
        fields = _aiohttp_headers(headers)
        url = yarl.URL(self.origin + target, encoded=True)  # sent byte for byte
        session = self._client()
        try:
            await self._gate.enter(self._settings.connect_timeout_seconds)
        except TimeoutError:
            raise UpstreamFailed(
                Refusal.of(
                    "upstream_busy",
                    f"all {self._settings.max_connections} connections to Publer are in use;"
                    " retry shortly, or raise upstream.max_connections",
                )
            ) from None
        source = (
            None
            if body is None or isinstance(body, bytes)
            else _RequestBody(body, self._settings.read_timeout_seconds)
        )
        try:
            # The deadline stays off unless a streamed body's write stalls (_RequestBody).
            async with asyncio.timeout(None) as deadline:
                if source is not None:
                    source.watch(deadline)
                _handed.set(None)
                response = await session.request(
                    method,
                    url,
                    headers=fields,
                    data=body if source is None else source.chunks(),
                    allow_redirects=False,
                    proxy=self._proxy,
                    proxy_auth=self._proxy_auth,
                )
        except BaseException as exc:
            self._gate.leave()
            if source is not None and source.error is not None and isinstance(exc, Exception):
                raise source.error from None  # the client left, or its body grew too large
            if isinstance(exc, aiohttp.ConnectionTimeoutError | TimeoutError):
                raise UpstreamFailed(_timeout()) from None
            if isinstance(exc, aiohttp.ClientResponseError | HttpProcessingError):
                raise UpstreamFailed(
                    _unreachable(f"Publer's response is not valid HTTP ({type(exc).__name__})")
                ) from None
            if isinstance(exc, aiohttp.ClientError | OSError | ValueError):
                raise UpstreamFailed(
                    _unreachable(f"Publer could not be reached ({type(exc).__name__})")
                ) from None
            raise
        finally:
            if source is not None:
                source.watch(None)
        protocol = _handed.get()
        if protocol is not None and self._connector is not None:
            # Until now no other request could take the connection, even if aiohttp already
            # put it back in the pool (an empty body ends at once): the connector hands out
            # a pooled connection only once its last response was checked here.
            _reuse(self._connector, protocol, response)
        refusal = _check_head(response)
        if refusal is not None:
            response.close()
            self._gate.leave()
            raise UpstreamFailed(refusal)
        return AiohttpResponse(response, source, self._gate)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None
