"""Which headers pass each way, as pure functions on raw ASGI header lists.

References: RFC 9110 section 7.6.1 (Connection and the hop-by-hop fields it names),
RFC 9112 section 6.1 (Transfer-Encoding is hop-by-hop). Headers stay a list of pairs, so
repeated fields such as Set-Cookie keep each value and are never comma-joined.

Names are compared with '_' read as '-': CGI-style servers (Rack, WSGI, PHP) turn both into
the same variable, so `Publer_Workspace_Id` would reach Publer as the workspace header and
`X_Forwarded_For` as the forwarding one (the class of CVE-2024-45614 in Puma).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

RawHeaders = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Never forwarded upstream: identity the proxy replaces, and client-side routing hints.
_DROP_UPSTREAM = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"cookie",
    b"forwarded",
    b"x-real-ip",
    b"via",
    b"expect",
    b"publer-workspace-id",
    b"x-request-id",
    b"content-length",
    # A method or path other than the one checked: Rack::MethodOverride (on in Rails apps)
    # turns a POST with X-HTTP-Method-Override into another method; IIS, Symfony and Zend
    # route by X-Original-URL / X-Rewrite-URL.
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
    b"x-original-url",
    b"x-rewrite-url",
}
# The proxy's own response headers (X-Publer-Proxy-Error, X-Publer-Proxy-Hint) start so.
PROXY_MARKER_PREFIX = b"x-publer-proxy-"
# uvicorn's own date/server are turned off; Publer's pass through as Publer sent them.
_DROP_DOWNSTREAM = HOP_BY_HOP


def field_name(name: bytes) -> bytes:
    """A header name as CGI-style servers read it: lower case, '_' the same as '-'."""
    return name.lower().replace(b"_", b"-")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names listed in every Connection header (RFC 9110 7.6.1)."""
    names: set[bytes] = set()
    for name, value in headers:
        if field_name(name) == b"connection":
            names.update(field_name(t.strip()) for t in value.split(b",") if t.strip())
    return frozenset(names)


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """Every value of one header, in order, decoded as latin-1 (never joined)."""
    return [value.decode("latin-1") for key, value in headers if key.lower() == name]


def upstream_headers(
    client_headers: Sequence[tuple[bytes, bytes]],
    *,
    host: bytes,
    api_key: str,
    workspace: str | None,
    request_id: str,
    content_length: int | None,
) -> RawHeaders:
    """The headers sent to Publer, as raw (lower-case name, value) pairs: the client's,
    filtered, plus the key (`Authorization: Bearer-API <key>`, Publer's scheme) and the
    workspace (`Publer-Workspace-Id`). `content_length` in bytes, None to send none.

    The Authorization and Publer-Workspace-Id the proxy sets are appended after every
    client header was filtered, so neither a client value nor a `Connection: authorization`
    trick can replace or remove them.
    """
    named = connection_tokens(client_headers)
    out: RawHeaders = [(b"host", host)]
    saw_accept_encoding = False
    for name, value in client_headers:
        lower = name.lower()
        canonical = field_name(name)
        if (
            canonical in _DROP_UPSTREAM
            or canonical in named
            or canonical.startswith(b"x-forwarded-")
            or canonical.startswith(b"proxy-")
        ):
            continue
        if canonical == b"accept-encoding":
            saw_accept_encoding = True
        out.append((lower, value))
    if not saw_accept_encoding:
        # Otherwise the HTTP client adds its own, and a client that never asked for gzip
        # would get a compressed body passed through untouched.
        out.append((b"accept-encoding", b"identity"))
    if content_length is not None:
        out.append((b"content-length", str(content_length).encode()))
    out.append((b"x-request-id", request_id.encode("ascii")))
    out.append((b"authorization", b"Bearer-API " + api_key.encode("ascii")))
    if workspace is not None:
        out.append((b"publer-workspace-id", workspace.encode("ascii")))
    return out


def downstream_headers(upstream: Sequence[tuple[bytes, bytes]]) -> RawHeaders:
    """The headers sent back to the client: Publer's minus hop-by-hop ones, and minus any
    named like the proxy's own (`X-Publer-Proxy-*`), so that a client can trust those
    came from the proxy, and minus Publer's `Access-Control-*`.

    Content-Length stays when Publer sent it: the body is passed on byte for byte.
    """
    named = connection_tokens(upstream)
    out: RawHeaders = []
    for name, value in upstream:
        canonical = field_name(name)
        if (
            canonical in _DROP_DOWNSTREAM
            or canonical in named
            or canonical == b"x-request-id"
            or canonical.startswith(PROXY_MARKER_PREFIX)
            # CORS is the proxy's to grant (browser.allowed_origins), never Publer's: an
            # upstream `Access-Control-Allow-Origin: *` would let any page read answers.
            or canonical.startswith(b"access-control-")
        ):
            continue
        out.append((name.lower(), value))
    return out


def request_body_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The request body's length from its framing (RFC 9112 section 6): the Content-Length
    in bytes, -1 for `Transfer-Encoding: chunked`, None for no body.

    Raises ValueError, with a sentence for the client, for framing that a server and
    Publer could read differently (RFC 9112 section 6.3: both headers, a malformed or
    repeated length, a coding other than chunked).
    """
    headers = list(headers)
    lengths = header_values(headers, b"content-length")
    chunked = header_values(headers, b"transfer-encoding")
    if lengths and chunked:
        raise ValueError("send Content-Length or Transfer-Encoding, not both")
    if len(set(lengths)) > 1 or (lengths and not lengths[0].strip().isdigit()):
        raise ValueError("the Content-Length header is malformed or repeated")
    if chunked and [v.strip().lower() for v in chunked] != ["chunked"]:
        raise ValueError("only Transfer-Encoding: chunked is accepted")
    if lengths:
        return int(lengths[0])
    return -1 if chunked else None


def response_body_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """A response's Content-Length in bytes (the first one, names lower case), or None
    when it has none or it is not a number (RFC 9110 section 8.6)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
