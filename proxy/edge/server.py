"""Running the app under uvicorn: httptools and uvloop, one worker, graceful SIGTERM.

httptools, not h11: it responds 400 to a request with both Content-Length and
Transfer-Encoding, to bare LF line ends and to control bytes in header values, the
ingredients of request smuggling. uvicorn's httptools protocol is made strict
here, because the apps that call the proxy are not trusted to be well-behaved:

- the policy decides on the request target exactly as it was sent: httptools' URL parser
  drops a `#fragment` and keeps only the path of an absolute-form target, so the raw target
  is put back into the scope, and absolute-form targets are marked for the forwarder to
  refuse (a request line naming another host is a probe, never a Publer call);
- the request head and the trailer section are bounded (httptools buffers a header of any
  size in memory), and trailer fields are dropped, never merged into the headers
  (RFC 9110 section 6.5.1);
- a request head must arrive within `HEADER_TIMEOUT_SECONDS` and a body may pause at most
  `BODY_IDLE_TIMEOUT_SECONDS` (slowloris); a client that reads nothing of its response for
  `SEND_TIMEOUT_SECONDS` is dropped, since it holds one of the pooled connections to
  Publer; uvicorn itself only times out idle keep-alive;
- `Upgrade` requests are refused: the proxy speaks HTTP/1.1 to Publer and nothing else;
- whatever httptools refuses gets a response in the proxy's refusal envelope (`bad_request`).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httptools
import structlog
import uvicorn
from starlette.types import Message
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from proxy.config.settings import Settings
from proxy.edge import signals
from proxy.rules.paths import ABSOLUTE_FORM_KEY
from proxy.rules.refusals import ProxyStatusError, Refusal

log = structlog.get_logger("proxy.edge.server")

GRACEFUL_SHUTDOWN_SECONDS = 30
MAX_HEADER_BYTES = 32 * 1024  # request line + header fields; the trailer section alike
HEADER_TIMEOUT_SECONDS = 10.0
BODY_IDLE_TIMEOUT_SECONDS = 10.0
SEND_TIMEOUT_SECONDS = 10.0
KEEP_ALIVE_SECONDS = 30
TOO_LARGE = f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes"
MALFORMED = (
    "the request is not valid HTTP/1.1 (a malformed request line or header, or ambiguous body"
    " framing such as both Content-Length and Transfer-Encoding); fix the client"
)

_Phase = Literal["head", "body", "trailers", "done"]


class StrictHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring.

    A protocol class given as uvicorn's `http=` setting is its extension point, but the
    methods overridden here, and the cycle's attributes `_close_delimited` sets, are
    uvicorn's own and undocumented: uvicorn has no setting for a head or body timeout, a
    head size bound (its `h11_max_incomplete_event_size` serves h11 only, which accepts
    the smuggling ingredients httptools refuses), trailer handling, the raw target, or
    the body of its 400. Every hook is exercised by tests/test_server_hooks.py, which
    fails when a uvicorn release stops calling one.
    """

    # Set where the protocol serves the forward-proxy listener: its 400s then carry
    # Proxy-Status (RFC 9209) like the listener's other refusals.
    proxy_status: ProxyStatusError | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: _Phase = "head"
        self._phase_changes = 0
        self._unparsed = 0  # bytes of the current head or trailer section seen so far
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._reason = MALFORMED
        self._made_to_wait = False  # the body's timer found the app not reading

    # -- phases and timers ---------------------------------------------------------------

    def _enter(self, phase: _Phase) -> None:
        if phase != self._phase:
            self._phase = phase
            self._phase_changes += 1
            self._unparsed = 0

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._on_timer)

    def _disarm(self) -> None:
        _cancel(self._timer)
        self._timer = None

    def _on_timer(self) -> None:
        """A head's deadline runs from its first byte; a body's is an idle timeout."""
        self._timer = None
        if self.transport.is_closing() or self._phase == "done":
            return
        if self.flow.read_paused or (
            self.cycle is not None and self.cycle.waiting_for_100_continue
        ):
            self._made_to_wait = True
            self._arm(BODY_IDLE_TIMEOUT_SECONDS)
            return
        if self._made_to_wait:
            # The app has since read on (or sent 100 Continue): the client's idle time
            # starts now, not at its last byte, which it sent before we made it wait.
            self._made_to_wait = False
            self._last_data = self.loop.time()
        idle = self.loop.time() - self._last_data
        if self._phase != "head" and idle < BODY_IDLE_TIMEOUT_SECONDS:
            self._arm(BODY_IDLE_TIMEOUT_SECONDS - idle)
            return
        log.warning("client_timed_out", phase=self._phase, client=_peer(self.client))
        self.transport.close()

    def _too_large(self) -> None:
        log.warning("request_head_too_large", phase=self._phase, client=_peer(self.client))
        if self._phase == "head" and (self.cycle is None or self.cycle.response_complete):
            self._reason = TOO_LARGE
            self.send_400_response(self._reason)
        else:
            self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._last_data = self.loop.time()
        self._arm(HEADER_TIMEOUT_SECONDS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._reading_again()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(SEND_TIMEOUT_SECONDS, self._not_reading)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._reading_again()

    def _reading_again(self) -> None:
        _cancel(self._send_timer)
        self._send_timer = None

    def _not_reading(self) -> None:
        self._send_timer = None
        log.warning("client_not_reading", client=_peer(self.client))
        self.transport.abort()  # close() would wait for the buffer that never drains

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        if self._phase == "done":
            self._enter("head")  # a keep-alive connection sends its next request
            self._arm(HEADER_TIMEOUT_SECONDS)
        phase, changes = self._phase, self._phase_changes
        super().data_received(data)
        # httptools buffers an unfinished header field whole: count what a head or trailer
        # section has taken so far. A read in which the phase changed is not counted, so a
        # body is never mistaken for a head; the bound is then off by one read at most.
        if phase in ("head", "trailers") and changes == self._phase_changes:
            self._unparsed += len(data)
            if self._unparsed > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._too_large()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._enter("head")
        if self._timer is None:
            self._arm(HEADER_TIMEOUT_SECONDS)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase == "head":
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        target = self.url
        # As on the wire: each field also takes ': ' and CRLF.
        if len(target) + sum(len(n) + len(v) + 4 for n, v in self.headers) > MAX_HEADER_BYTES:
            self._reason = TOO_LARGE
            raise httptools.HttpParserCallbackError(self._reason)
        if self.parser.should_upgrade():
            self._reason = "Upgrade is not supported: the proxy speaks HTTP/1.1 only"
            raise httptools.HttpParserCallbackError(self._reason)
        self.scope[ABSOLUTE_FORM_KEY] = not target.startswith(b"/")  # type: ignore[literal-required]
        super().on_headers_complete()
        # After uvicorn filled the scope (its ASGI task has not run yet): the target as sent.
        path, _, query = target.partition(b"?")
        self.scope["raw_path"] = path
        self.scope["query_string"] = query
        if self.scope["http_version"] == "1.0" and self.cycle is not None:
            _close_delimited(self.cycle)
        self._enter("body")
        self._arm(BODY_IDLE_TIMEOUT_SECONDS)

    def on_chunk_header(self) -> None:
        # Either a chunk's data follows (on_body), or this was the last chunk: trailers.
        self._enter("trailers")

    def on_body(self, body: bytes) -> None:
        self._enter("body")
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._made_to_wait = False
        self._enter("done")
        self._disarm()

    def send_400_response(self, msg: str) -> None:
        """Respond 400 to what httptools refused, in the proxy's refusal envelope; then close."""
        refusal = Refusal.of("bad_request", self._reason, proxy_status=self.proxy_status)
        request_id = uuid.uuid4().hex
        body = refusal.body(request_id)
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in refusal.headers(len(body)):
            head += [name, b": ", value, b"\r\n"]
        head += [b"x-request-id: ", request_id.encode(), b"\r\nconnection: close\r\n\r\n"]
        log.warning(
            "request_refused",
            request_id=request_id,
            decision=refusal.code,
            status=refusal.status,
            reason=self._reason,
            client=_peer(self.client),
        )
        self._enter("done")
        self.transport.write(b"".join(head) + (b"" if self._method() == b"HEAD" else body))
        self.transport.close()

    def _method(self) -> bytes | None:
        try:
            method: bytes = self.parser.get_method()
        except (AttributeError, httptools.HttpParserError):  # no parser, or no request line
            return None
        return method


def _close_delimited(cycle: RequestResponseCycle) -> None:
    """Frame the cycle's response without chunked coding, which an HTTP/1.0 client cannot
    read (RFC 9112 section 6.1): a response without Content-Length is delimited by closing
    the connection (section 6.3), which uvicorn already does after an HTTP/1.0 response.

    uvicorn adds `Transfer-Encoding: chunked` whenever the Content-Length is missing; it is
    told here that the framing is decided, and its byte count is kept even as bodies come.
    """
    send: Callable[[Any], Awaitable[None]] = cycle.send
    close_delimited = False

    async def send_close_delimited(message: Message) -> None:
        nonlocal close_delimited
        if message["type"] == "http.response.start":
            headers = [
                (name, value)
                for name, value in message.get("headers", [])
                if name.lower() != b"transfer-encoding"
            ]
            if not any(name.lower() == b"content-length" for name, _ in headers):
                close_delimited = True
                cycle.chunked_encoding = False
                cycle.keep_alive = False
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and close_delimited:
            cycle.expected_content_length += len(message.get("body", b""))
        await send(message)

    cycle.send = send_close_delimited  # type: ignore[method-assign, assignment]


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def _peer(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    """The uvicorn settings the proxy runs with: the strict protocol, uvloop, no access log
    and no `date`/`server` headers (the proxy's log and Publer's headers replace them)."""
    listen = settings.listen
    return uvicorn.Config(
        app,
        host=listen.host,
        port=listen.port,
        uds=str(listen.unix_socket) if listen.unix_socket else None,
        http=StrictHttpToolsProtocol,
        ws="none",
        loop="uvloop",
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        log_config=None,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


def serve(settings: Settings, app: Any, sockets: list[socket.socket] | None = None) -> int:
    """Serve until SIGINT/SIGTERM, finishing requests in flight; the exit status.

    `sockets`, when given, are bound sockets to serve on instead of `settings.listen`.

    SIGTERM and SIGHUP belong to `proxy.edge.signals` until uvicorn takes SIGTERM over (and
    after it gives it back): a SIGTERM at any moment stops the server gracefully and the
    status is 0; a SIGHUP waits for the reloader.
    """
    signals.install()
    server = uvicorn.Server(uvicorn_config(settings, app))
    signals.register_server(server.handle_exit)
    try:
        server.run(sockets=sockets)
    finally:
        signals.register_server(None)
    return 0 if server.started else 1
