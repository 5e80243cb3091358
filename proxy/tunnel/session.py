"""The forward-proxy listener: CONNECT to Publer's origin, TLS ended here, the same app inside.

For clients that hard-code `https://app.publer.com` and honour `HTTPS_PROXY`. A tunnel is
opened only to the configured upstream's host and port (proxy/tunnel/decisions.py decides), then
TLS is ended inside it with a leaf of the interception CA (proxy/tunnel/ca.py), and the decrypted
stream is served by the very protocol and ASGI app of the reverse proxy: each request goes
through the same route, client check, scope allow-list, key injection, budget, access log
and metrics. The only differences are made at the tunnel's edge:

- the request's `Host` (and the TLS SNI) must name the tunnel's target, else 421;
- the path `/api/v1/...` is served by the route of the client's token (from
  `Proxy-Authorization` on the CONNECT, else the `Authorization: Bearer-API` the client
  sends as its "API key"), or by the open route of shortest prefix.

The CONNECT head is read with MSG_PEEK, so the bytes a client sends right after it (its TLS
ClientHello, before waiting for our 200) stay in the socket for the TLS layer. The
ClientHello is peeked at too: a client offering by ALPN only protocols other than HTTP/1.1
gets the no_application_protocol alert (RFC 7301 section 3.2), which OpenSSL would not send.

A loopback client may instead send absolute-form requests for the upstream's origin in
plain text (axios before 1.16.1 does, with HTTPS_PROXY): the connection is then served by
the same protocol without TLS, each request checked to name that origin (`AbsoluteFormApp`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.config.settings import ForwardProxySettings
from proxy.edge.guard import BrowserGuard, forward_proxy_host_refusal
from proxy.hop.services import LIVE_KEY, LiveServices, Services
from proxy.records.request_ids import REQUEST_ID_KEY, RequestContext
from proxy.rules.headers import header_values
from proxy.rules.paths import ABSOLUTE_FORM_KEY
from proxy.rules.policy import Route, presented_token
from proxy.rules.refusals import Refusal
from proxy.tunnel.ca import InterceptionCA, Leaf, normalize_host
from proxy.tunnel.decisions import (
    MAX_CONNECT_HEAD_BYTES,
    AbsoluteForm,
    ClientHello,
    Connect,
    check_absolute,
    client_route,
    decide_request,
    host_matches,
    logged_target,
    proxy_token,
    read_client_hello,
    tunnel_route,
)

log = structlog.get_logger("proxy.tunnel.session")
access_log = structlog.get_logger("proxy.records.access_log")

CONNECT_HEAD_TIMEOUT_SECONDS = 10.0
HANDSHAKE_TIMEOUT_SECONDS = 10.0
# Closing waits this long for the client's TLS close_notify (asyncio's default is 30 s, which
# held a graceful shutdown for as long whenever an idle client did not answer).
TLS_SHUTDOWN_TIMEOUT_SECONDS = 2.0
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    421: "Misdirected Request",
}
# A fatal no_application_protocol alert (RFC 7301 section 3.2; RFC 8446 section 6): what a
# client offering only protocols other than HTTP/1.1 (h2 alone) must get. OpenSSL, behind
# Python's ssl module, would complete the handshake with no protocol instead.
NO_APPLICATION_PROTOCOL_ALERT = b"\x15\x03\x03\x00\x02\x02\x78"
CLIENT_HELLO_POLL_SECONDS = 0.005
PROXY_AUTHENTICATE = (b"proxy-authenticate", b'Basic realm="publer-proxy"')

ProtocolFactory = Callable[[ASGIApp], asyncio.Protocol]


class HeadError(Exception):
    """The CONNECT head did not arrive whole: closed, too large or too slow."""


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def read_connect_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The request head up to and including CRLF CRLF, and not one byte more."""
    head = b""
    while True:
        await _readable(loop, sock)
        try:
            peeked = sock.recv(MAX_CONNECT_HEAD_BYTES + 4 - len(head), socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not peeked:
            raise HeadError("closed before the end of the request head")
        if not head and peeked.startswith(b"\x16"):  # a TLS record: ClientHello
            raise HeadError(
                "TLS arrived where a CONNECT was expected; the proxy URL is http://, not https://"
            )
        tail = head[-3:]
        end = (tail + peeked).find(b"\r\n\r\n")
        take = end + 4 - len(tail) if end >= 0 else len(peeked)
        head += sock.recv(take)
        if end >= 0:
            return head
        if len(head) > MAX_CONNECT_HEAD_BYTES:
            raise HeadError(f"the request head is larger than {MAX_CONNECT_HEAD_BYTES} bytes")


async def peek_client_hello(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> ClientHello:
    """The client's first TLS record, read with MSG_PEEK so the TLS layer still gets it."""
    while True:
        await _readable(loop, sock)
        try:
            peeked = sock.recv(5 + 2**14 + 256, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not peeked:
            raise HeadError("closed before the TLS ClientHello")
        hello = read_client_hello(peeked)
        if hello is not None:
            return hello
        # The socket stays readable while the peeked bytes sit in it: poll for the rest.
        await asyncio.sleep(CLIENT_HELLO_POLL_SECONDS)


def refusal_response(refusal: Refusal, request_id: str) -> bytes:
    """The whole HTTP/1.1 response refusing a CONNECT, in the proxy's refusal envelope."""
    body = refusal.body(request_id)
    head = [f"HTTP/1.1 {refusal.status} {_REASONS.get(refusal.status, 'Error')}\r\n".encode()]
    headers = refusal.headers(len(body))
    if refusal.status == 407:
        headers.append(PROXY_AUTHENTICATE)
    headers += [(b"x-request-id", request_id.encode()), (b"connection", b"close")]
    head += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join([*head, b"\r\n", body])


class TunnelApp:
    """The ASGI app of one tunnel: checks Host, picks the route, hands over to the forwarder."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        structlog.contextvars.bind_contextvars(via="tunnel")
        live: LiveServices = scope["state"][LIVE_KEY]
        services = live.services  # the config in service (a reload may replace it)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        hosts = [value for name, value in headers if name == b"host"]
        if not host_matches(hosts, self.connect.host, self.connect.port):
            refusal = Refusal.of(
                "misdirected_request",
                "this tunnel serves only the host it was opened to; send Host: that host",
            )
            await _refuse_request(scope, send, services, refusal, hosts)
            return
        raw_path: bytes = scope.get("raw_path") or b""
        await _serve(live, scope, receive, send, self.connect.token, raw_path)


class AbsoluteFormApp:
    """The ASGI app of a loopback connection sending absolute-form requests (axios with
    HTTPS_PROXY): each request must name the upstream's origin, and is then served
    exactly as one inside a tunnel."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        structlog.contextvars.bind_contextvars(via="absolute-form")
        live: LiveServices = scope["state"][LIVE_KEY]
        services = live.services
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        hosts = [value for name, value in headers if name == b"host"]
        target: bytes = scope.get("raw_path") or b""
        path: bytes | Refusal = check_absolute(target, self.host, self.port)
        if not scope.get(ABSOLUTE_FORM_KEY):
            origin = f"https://{self.host}:{self.port}"
            path = Refusal.of(
                "tunnel_refused",
                f"this connection serves absolute-form requests for {origin} only",
                proxy_status="http_request_denied",
            )
        elif not isinstance(path, Refusal) and not host_matches(hosts, self.host, self.port):
            path = Refusal.of(
                "misdirected_request",
                "the Host header must name the host of the request target",
                proxy_status="http_request_error",
            )
        token = proxy_token(headers)
        if isinstance(path, Refusal) or isinstance(token, Refusal):
            refusal = path if isinstance(path, Refusal) else token
            assert isinstance(refusal, Refusal)
            await _refuse_request(scope, send, services, refusal, hosts)
            return
        if token is not None and client_route(services.routes, token) is None:
            refusal = Refusal.of(
                "proxy_unauthenticated",
                "the Proxy-Authorization token is not a client of any route",
                proxy_status="http_request_denied",
            )
            await _refuse_request(scope, send, services, refusal, hosts)
            return
        await _serve(live, scope, receive, send, token, path)


async def _serve(
    live: LiveServices, scope: Scope, receive: Receive, send: Send, token: str | None, path: bytes
) -> None:
    """Serve a request for the upstream's origin by the route its client token picks."""
    headers: list[tuple[bytes, bytes]] = [
        h for h in scope["headers"] if h[0] != b"proxy-authorization"
    ]
    if token is None:
        token = presented_token(next(iter(header_values(headers, b"authorization")), None))
    else:
        # The proxy's own token stands for the client; its "API key" goes nowhere.
        headers = [h for h in headers if h[0] != b"authorization"]
        headers.append((b"authorization", b"Bearer-API " + token.encode("latin-1")))
    route = tunnel_route(live.services.routes, token)
    scope = {
        **scope,
        "headers": headers,
        "raw_path": route.settings.prefix.encode("ascii") + path,
        ABSOLUTE_FORM_KEY: False,
    }
    await live(scope, receive, send)


async def _refuse_request(
    scope: Scope, send: Send, services: Services, refusal: Refusal, hosts: list[bytes]
) -> None:
    request_id: str = scope[REQUEST_ID_KEY]
    body = refusal.body(request_id)
    headers = refusal.headers(len(body))
    if refusal.status == 407:
        headers.append(PROXY_AUTHENTICATE)
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
    # Of an absolute-form target only the origin: its userinfo would be a password.
    target = logged_target(b"X " + (scope.get("raw_path") or b"/") + b" HTTP/1.1")
    logged = {"path": target, "host": b",".join(hosts)[:256].decode("latin-1")}
    services.access_log.refused(scope, refusal.code, refusal.status, logged)


class _Prefed(asyncio.Protocol):
    """A protocol given the bytes already read from its socket before any that follow."""

    def __init__(self, inner: asyncio.Protocol, first: bytes) -> None:
        self._inner, self._first = inner, first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)
        self._inner.data_received(self._first)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class TunnelListener:
    """Accepts CONNECTs on the forward proxy's address and serves each tunnel."""

    def __init__(
        self,
        settings: ForwardProxySettings,
        target: tuple[str, int],
        ca: InterceptionCA,
        make_protocol: ProtocolFactory,
        sock: socket.socket,
    ) -> None:
        self._settings = settings
        self._host, self._port = target
        self._ca = ca
        self._make_protocol = make_protocol
        self._sock = sock
        self._pending: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self._leaf: Leaf | None = None
        self._tunnels: Counter | None = None
        self._refusals: Counter | None = None
        self._routes: Callable[[], Sequence[Route]] = tuple

    @classmethod
    def bind(cls, settings: ForwardProxySettings) -> socket.socket:
        """The listening socket (bound before the app starts, so a taken port fails early)."""
        sock = socket.create_server((settings.host, settings.port), backlog=1024)
        sock.setblocking(False)
        return sock

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the listener is bound to."""
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(
        self, routes: Callable[[], Sequence[Route]], tunnels: Counter, refusals: Counter
    ) -> None:
        """Start accepting; `routes` gives the routes in service (a reload may change them);
        count tunnels by outcome, refusals by code."""
        self._routes = routes
        self._tunnels = tunnels
        self._refusals = refusals
        self._accepting = asyncio.create_task(self._accept())

    async def close(self) -> None:
        """Stop accepting and drop tunnels not yet handed to the app."""
        tasks = [t for t in (self._accepting, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: wait, do not spin
                log.warning("tunnel_accept_failed", error=type(exc).__name__)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._tunnel(conn, _peer(peer), _is_loopback(peer)))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _count(self, outcome: str) -> None:
        if self._tunnels is not None:
            self._tunnels.labels(outcome).inc()

    async def _tunnel(self, sock: socket.socket, peer: str, loopback: bool) -> None:
        loop = asyncio.get_running_loop()
        handed_over = False
        try:
            try:
                async with asyncio.timeout(CONNECT_HEAD_TIMEOUT_SECONDS):
                    head = await read_connect_head(loop, sock)
            except (HeadError, TimeoutError, OSError) as exc:
                log.warning("tunnel_head_failed", client=peer, reason=str(exc) or "timed out")
                self._count("bad_head")
                return
            decided = forward_proxy_host_refusal(
                head, self._settings, self.address[1]
            ) or decide_request(head, self._host, self._port, loopback=loopback)
            if (
                isinstance(decided, Connect)
                and decided.token is not None
                and client_route(self._routes(), decided.token) is None
            ):
                decided = Refusal.of(
                    "proxy_unauthenticated",
                    "the Proxy-Authorization token is not a client of any route",
                    proxy_status="http_request_denied",
                )
            if isinstance(decided, Refusal):
                await self._refuse(loop, sock, decided, peer, logged_target(head))
                return
            if isinstance(decided, AbsoluteForm):
                # Plain HTTP on loopback: the same protocol and app, given the head read here.
                app = RequestContext(_guarded(AbsoluteFormApp(self._host, self._port)))
                await loop.connect_accepted_socket(lambda: _Prefed(self._plain(app), head), sock)
                handed_over = True
                self._count("absolute_form")
                return
            await loop.sock_sendall(sock, ESTABLISHED)
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_SECONDS):
                    hello = await peek_client_hello(loop, sock)
            except (HeadError, TimeoutError, OSError) as exc:
                log.warning("tunnel_handshake_failed", client=peer, error=str(exc) or "timed out")
                self._count("handshake_failed")
                return
            if hello.alpn is not None and b"http/1.1" not in hello.alpn:
                offered = ",".join(p[:32].decode("latin-1") for p in hello.alpn[:8])
                log.warning(
                    "tunnel_refused",
                    client=peer,
                    target=f"{self._host}:{self._port}",
                    decision="no_application_protocol",
                    reason=f"the client offers only ALPN {offered}; this proxy speaks http/1.1",
                )
                self._count("no_application_protocol")
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(sock, NO_APPLICATION_PROTOCOL_ALERT)
                return
            try:
                await loop.connect_accepted_socket(
                    lambda: self._make_protocol(RequestContext(_guarded(TunnelApp(decided)))),
                    sock,
                    ssl=self._context(),
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS,
                    ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_SECONDS,
                )
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                log.warning("tunnel_handshake_failed", client=peer, error=type(exc).__name__)
                self._count("handshake_failed")
                return
            handed_over = True
            self._count("opened")
            log.debug("tunnel_opened", client=peer, target=f"{self._host}:{self._port}")
        finally:
            if not handed_over:
                sock.close()

    async def _refuse(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        refusal: Refusal,
        peer: str,
        target: str,
    ) -> None:
        request_id = uuid.uuid4().hex
        log.warning(
            "tunnel_refused",
            request_id=request_id,
            client=peer,
            target=target,
            decision=refusal.code,
            status=refusal.status,
            reason=refusal.message,
        )
        self._count(refusal.code)
        if self._refusals is not None:
            self._refusals.labels(refusal.code).inc()
        with contextlib.suppress(OSError):
            await loop.sock_sendall(sock, refusal_response(refusal, request_id))

    def _plain(self, app: ASGIApp) -> asyncio.Protocol:
        protocol = self._make_protocol(app)
        if hasattr(protocol, "proxy_status"):  # the strict protocol of proxy/edge/server.py
            protocol.proxy_status = "http_request_error"
        return protocol

    def _context(self) -> ssl.SSLContext:
        leaf = self._ca.leaf()
        if leaf is not self._leaf:
            self._leaf = leaf
            leaf.context.sni_callback = self._check_sni
            log.info("tunnel_leaf_issued", host=self._host, not_after=leaf.not_after.isoformat())
        return leaf.context

    def _check_sni(self, _ssl: ssl.SSLObject, server_name: str | None, _ctx: Any) -> int | None:
        # No SNI at all is let through: the certificate names the one host anyway, and each
        # request's Host is checked.
        if server_name is not None and normalize_host(server_name) != self._host:
            log.warning(
                "tunnel_refused",
                target=server_name[:256],
                decision="misdirected_request",
                reason="the TLS SNI names another host",
            )
            self._count("misdirected_request")
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None


def _is_loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return False
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return False


def _guarded(app: ASGIApp) -> ASGIApp:
    return BrowserGuard(app, live_key=LIVE_KEY, listener="tunnel")


def _peer(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
