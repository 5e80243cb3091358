"""The browser checks of proxy/rules/browser.py, run before routing on every listener, as pure
ASGI middleware.

`BrowserGuard` wraps the whole app of a listener: the reverse proxy's (API routes, the
status page, /readyz, /metrics, /healthz) and each forward-proxy tunnel's. It refuses a
`Host` that does not name the listener (not inside a tunnel, whose own Host rule names the
tunnel's target) and a request a browser marked as coming from another site, answers CORS
preflights for the origins listed in `browser.allowed_origins`, and lets no
`Access-Control-*` header out except its own for a listed origin. The config in service is
read per request, so a reload changes the listed names and origins.
"""

from __future__ import annotations

from typing import Literal

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.config.hosts import parse_origin
from proxy.config.settings import ForwardProxySettings
from proxy.hop.forwarder import send_refusal
from proxy.hop.services import LiveServices, Services
from proxy.records.request_ids import REQUEST_ID_KEY
from proxy.rules.browser import (
    check_browser,
    check_host,
    cors_response_headers,
    is_preflight,
    listener_names,
    preflight_headers,
    without_cors,
)
from proxy.rules.heads import parse_head
from proxy.rules.refusals import Refusal

access_log = structlog.get_logger("proxy.records.access_log")

Listener = Literal["listen", "tunnel"]
PREFLIGHT_REFUSED = (
    "this CORS preflight asks for a method or header a browser app may not use here"
    " (methods: GET, POST, PUT, PATCH, DELETE; headers: Authorization, Content-Type,"
    " Publer-Workspace-Id, X-Request-Id)"
)


class BrowserGuard:
    """Host and browser-provenance checks in front of `app` (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, live_key: str, listener: Listener) -> None:
        self.app = app
        self.live_key = live_key
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        live: LiveServices = scope["state"][self.live_key]
        services = live.services
        settings = services.settings
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        hosts = [value for name, value in headers if name == b"host"]
        own: list[str] = []
        if self.listener == "listen":
            refusal = self._host_refusal(scope, services, hosts)
            if refusal is not None:
                await _refuse(scope, send, services, refusal, hosts)
                return
            mine = parse_origin("http://" + hosts[0].decode("latin-1")) if hosts else None
            own = [mine] if mine is not None else []
        verdict = check_browser(headers, own, frozenset(settings.browser.allowed_origins))
        if verdict.refusal is not None:
            await _refuse(scope, send, services, verdict.refusal, hosts)
            return
        origin = verdict.cors_origin
        if origin is not None and is_preflight(scope["method"], headers):
            answer = preflight_headers(origin, headers)
            if answer is None:
                refusal = Refusal.of("origin_denied", PREFLIGHT_REFUSED)
                await _refuse(scope, send, services, refusal, hosts)
                return
            answer.append((b"content-length", b"0"))
            await send({"type": "http.response.start", "status": 204, "headers": answer})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_filtered(message: Message) -> None:
            if message["type"] == "http.response.start":
                filtered = without_cors(message.get("headers", []))
                if origin is not None:
                    filtered += cors_response_headers(origin)
                message["headers"] = filtered
            await send(message)

        await self.app(scope, receive, send_filtered)

    def _host_refusal(self, scope: Scope, services: Services, hosts: list[bytes]) -> Refusal | None:
        listen = services.settings.listen
        server = scope.get("server")
        port = server[1] if isinstance(server, tuple | list) and len(server) > 1 else None
        if listen.unix_socket is not None and not listen.allowed_hosts:
            # No browser can open a unix socket; whoever bridges it to TCP lists its names.
            return None
        names = listener_names(
            "" if listen.unix_socket is not None else listen.host, listen.allowed_hosts
        )
        return check_host(
            hosts,
            names,
            port if isinstance(port, int) else None,
            http_version=str(scope.get("http_version", "1.1")),
            key="listen.allowed_hosts",
        )


async def _refuse(
    scope: Scope, send: Send, services: Services, refusal: Refusal, hosts: list[bytes]
) -> None:
    request_id: str = scope[REQUEST_ID_KEY]
    await send_refusal(send, refusal, request_id, scope["method"] == "HEAD")
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    origin = b",".join(v for n, v in headers if n == b"origin")
    site = b",".join(v for n, v in headers if n == b"sec-fetch-site")
    logged = {
        "host": b",".join(hosts)[:256].decode("latin-1"),
        "origin": origin[:256].decode("latin-1") or None,
        "sec_fetch_site": site[:40].decode("latin-1") or None,
    }
    services.access_log.refused(scope, refusal.code, refusal.status, logged)


def forward_proxy_host_refusal(
    head: bytes, settings: ForwardProxySettings, port: int
) -> Refusal | None:
    """The Host check of the forward-proxy listener, for one request head.

    A request in origin form (`GET /path`) or asterisk form is addressed to the listener
    itself, so its Host must name the listener (`forward_proxy.allowed_hosts`); a CONNECT
    or absolute-form request names its target instead, which the tunnel's own rules check.
    """
    parsed = parse_head(head)
    if isinstance(parsed, Refusal):
        return None  # the tunnel's own parser refuses it with the reason
    _method, target, fields = parsed
    if not (target.startswith(b"/") or target == b"*"):
        return None
    version = "1.0" if head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0") else "1.1"
    return check_host(
        [value for name, value in fields if name == b"host"],
        listener_names(settings.host, settings.allowed_hosts),
        port,
        http_version=version,
        key="forward_proxy.allowed_hosts",
    )
