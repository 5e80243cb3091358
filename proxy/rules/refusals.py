"""The refusals the proxy sends itself, and their Publer-shaped envelope.

    ProxyError                      an exception carrying a Refusal up to the app
    ├── CredentialUnavailable       503 credential_unavailable (no usable key)
    └── UpstreamFailed              502 upstream_unreachable / 503 upstream_busy /
                                    504 upstream_timeout

Every refusal body is `{"errors": [...], "code": ..., "request_id": ...}` with the header
`X-Publer-Proxy-Error: <code>`, so a client can tell the proxy's response from Publer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import orjson

Code = Literal[
    "bad_path",
    "bad_request",
    "client_unauthenticated",
    "scope_denied",
    "unknown_endpoint",
    "method_denied",
    "workspace_denied",
    "no_route",
    "body_too_large",
    "rate_limited",
    "upstream_unreachable",
    "credential_unavailable",
    "upstream_timeout",
    "tunnel_refused",
    "proxy_unauthenticated",
    "misdirected_request",
    "upstream_busy",
    "host_denied",
    "origin_denied",
    "limit_denied",
    "body_uninspectable",
    "response_unfilterable",
]

STATUS: dict[Code, int] = {
    "bad_path": 400,
    "bad_request": 400,
    "client_unauthenticated": 401,
    "scope_denied": 403,
    "unknown_endpoint": 403,
    "method_denied": 403,
    "workspace_denied": 403,
    "no_route": 404,
    "body_too_large": 413,
    "rate_limited": 429,
    "upstream_unreachable": 502,
    "credential_unavailable": 503,
    "upstream_timeout": 504,
    # The forward proxy: a CONNECT to anything but Publer's origin, a bad Proxy-Authorization,
    # a request inside a tunnel naming another host (RFC 9110 section 15.5.20).
    "tunnel_refused": 403,
    "proxy_unauthenticated": 407,
    "misdirected_request": 421,
    "upstream_busy": 503,
    # A Host naming neither this listener nor a name listed for it: a page that re-pointed
    # its own name at this machine (DNS rebinding). 421, not 403: the request was meant for
    # another site, and no credential would change the answer (RFC 9110 section 15.5.20).
    "host_denied": 421,
    # A request a browser marked as sent by a page of another site (Origin, Sec-Fetch-Site).
    "origin_denied": 403,
    # Limits finer than scopes: an account or action the route may not touch; a body the
    # proxy cannot read with certainty; an answer it cannot narrow to the allowed accounts.
    "limit_denied": 403,
    "body_uninspectable": 403,
    "response_unfilterable": 502,
}
# The RFC 9209 error types the forward-proxy listener's refusals use (section 2.3).
ProxyStatusError = Literal[
    "http_request_error",  # the request is malformed
    "http_request_denied",  # well-formed, but this proxy does not forward it
    "destination_ip_prohibited",  # an IP literal named as the destination
]
PROXY_NAME = "publer-proxy"
ERROR_HEADER = "x-publer-proxy-error"
RATE_LIMIT_MESSAGE = "Rate limit exceeded. Retry later."


@dataclass(frozen=True)
class RateLimitHeaders:
    """The `X-RateLimit-*` headers Publer sends with its 429, which clients read to wait:
    the budget, what is left of it, and the UNIX time (seconds) the window resets."""

    limit: int
    remaining: int
    reset: int

    def raw(self) -> list[tuple[bytes, bytes]]:
        """The three headers as raw ASGI pairs."""
        return [
            (b"x-ratelimit-limit", str(self.limit).encode()),
            (b"x-ratelimit-remaining", str(self.remaining).encode()),
            (b"x-ratelimit-reset", str(self.reset).encode()),
        ]


@dataclass(frozen=True)
class Refusal:
    """A response of the proxy's own: a refusal code and a sentence for the client."""

    code: Code
    message: str
    status: int
    retry_after: int | None = None
    rate_limit: RateLimitHeaders | None = None
    limit: str | None = None  # rate_limited: which limit refused (`limit` in the body)
    # The forward-proxy listener's refusals: the RFC 9209 error type its Proxy-Status names.
    proxy_status: ProxyStatusError | None = None

    @classmethod
    def of(
        cls,
        code: Code,
        message: str,
        *,
        retry_after: int | None = None,
        rate_limit: RateLimitHeaders | None = None,
        limit: str | None = None,
        proxy_status: ProxyStatusError | None = None,
    ) -> Refusal:
        """A refusal with the status that the refusal table gives its code."""
        return cls(code, message, STATUS[code], retry_after, rate_limit, limit, proxy_status)

    def body(self, request_id: str) -> bytes:
        """The JSON body, UTF-8: Publer's error envelope `{"errors": [message]}` (its API
        reference, https://publer.com/docs) plus `code` and `request_id`; a 429 also has
        Publer's own `"error"` field."""
        payload: dict[str, object] = {
            "errors": [self.message],
            "code": self.code,
            "request_id": request_id,
        }
        if self.code == "rate_limited":
            payload["error"] = RATE_LIMIT_MESSAGE
        if self.limit is not None:
            payload["limit"] = self.limit
        return orjson.dumps(payload)

    def headers(self, body_length: int) -> list[tuple[bytes, bytes]]:
        """The raw ASGI headers of the refusal response, for a body of `body_length` bytes."""
        headers = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(body_length).encode()),
            (ERROR_HEADER.encode(), self.code.encode()),
            (b"cache-control", b"no-store"),
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        if self.rate_limit is not None:
            headers += self.rate_limit.raw()
        if self.proxy_status is not None:
            headers.append((b"proxy-status", self.proxy_status_value()))
        return headers

    def proxy_status_value(self) -> bytes:
        """`Proxy-Status` (RFC 9209): `publer-proxy; error=TYPE; details="message"`, the
        message made a structured-field string (printable ASCII, `"` and `\\` escaped)."""
        details = "".join(c if " " <= c <= "~" else "?" for c in self.message)
        details = details.replace("\\", "\\\\").replace('"', '\\"')
        return f'{PROXY_NAME}; error={self.proxy_status}; details="{details}"'.encode("ascii")


class ProxyError(Exception):
    """Raised below the app to respond with `refusal` instead of forwarding."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class CredentialUnavailable(ProxyError):
    """No usable key for a credential: never read, or stale past max_stale_seconds."""

    def __init__(self, credential: str, reason: str) -> None:
        super().__init__(
            Refusal.of(
                "credential_unavailable",
                f"no usable key for credential '{credential}': {reason}",
            )
        )


class UpstreamFailed(ProxyError):
    """Publer could not be reached, broke the connection, did not respond in time, or every
    connection to it was busy (`upstream_busy`: the proxy's own pool is full; retry shortly
    or raise `upstream.max_connections`)."""
