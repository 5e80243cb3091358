"""Request ids and per-request log context, as pure ASGI middleware.

Pure ASGI rather than BaseHTTPMiddleware, because the latter runs the app in another task
and breaks contextvars propagation: the request id would be missing from log lines.
"""

from __future__ import annotations

import re
import secrets

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_KEY = "publer_proxy.request_id"
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:-]{8,128}$")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is sane (and alone), else a new random one."""
    found = [value for name, value in headers if name == b"x-request-id"]
    if len(found) == 1 and _SANE_ID.match(found[0]):
        return found[0].decode("ascii")
    return secrets.token_hex(16)


class RequestContext:
    """Binds request_id into structlog's context and returns it on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        scope[REQUEST_ID_KEY] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != header[0]]
                headers.append(header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
