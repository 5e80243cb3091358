"""Path safety on the raw request target.

Decided on the bytes the client sent, before any decoding, because every layer that
normalises (uvicorn's `scope["path"]`, httpx's URL builder, the upstream's router) does it
differently: `/x/%2e%2e/admin` is harmless to one and `/admin` to the next. A path that
passes here is forwarded exactly as it is, so what was checked is what Publer sees.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 8192
# The ASGI scope key the server sets when the request target was in absolute form
# (`GET http://host/path`, RFC 9112 section 3.2.2): a proxy for one origin refuses it.
ABSOLUTE_FORM_KEY = "publer_proxy.absolute_form"

# RFC 3986 pchar without ';' (path parameters, used in `..;/` tricks) and without
# '%' (handled separately): unreserved, sub-delims minus ';', ':' and '@'.
_SAFE_PATH_BYTES = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,=:@"
)
# Query bytes are forwarded byte for byte: printable ASCII except the fragment mark and the
# bytes RFC 3986 requires to be escaped, which an HTTP client would re-encode on the way.
_SAFE_QUERY_BYTES = frozenset(range(0x21, 0x7F)) - set(b'#"<>')
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Encoded forms that turn into separators, dot segments or a second round of decoding.
_FORBIDDEN_DECODED = frozenset(b"/\\.%")


@dataclass(frozen=True)
class UnsafePath:
    """Why a raw path was refused, as a sentence for the `bad_path` response."""

    reason: str


def check_path(raw_path: bytes) -> str | UnsafePath:
    """The raw path as a str when it is safe to route and forward, else why not."""
    if not raw_path.startswith(b"/"):
        return UnsafePath("the request target must be a path starting with '/'")
    if len(raw_path) > MAX_PATH_BYTES:
        return UnsafePath(f"the path is longer than {MAX_PATH_BYTES} bytes")
    index = 0
    length = len(raw_path)
    while index < length:
        byte = raw_path[index]
        if byte == 0x25:  # '%'
            pair = raw_path[index + 1 : index + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                return UnsafePath("the path has a malformed percent-escape")
            decoded = int(pair, 16)
            if decoded in _FORBIDDEN_DECODED or decoded < 0x20 or decoded >= 0x7F:
                return UnsafePath(
                    f"the path has an encoded '%{pair.decode().upper()}', which is refused"
                    " (encoded separators, dots, percent signs and control bytes)"
                )
            index += 3
            continue
        if byte == 0x2F:  # '/'
            index += 1
            continue
        if byte not in _SAFE_PATH_BYTES:
            if byte == 0x5C:
                return UnsafePath("the path has a backslash")
            if byte < 0x20 or byte == 0x7F:
                return UnsafePath("the path has a control byte")
            if byte >= 0x80:
                return UnsafePath("the path has a non-ASCII byte")
            return UnsafePath(f"the path has a character that is refused: {chr(byte)!r}")
        index += 1
    for segment in raw_path.split(b"/")[1:]:
        if segment == b"":
            return UnsafePath("the path has an empty segment ('//' or a trailing '/')")
        if segment in (b".", b".."):
            return UnsafePath("the path has a '.' or '..' segment")
    return raw_path.decode("ascii")


def check_query(raw_query: bytes) -> str | UnsafePath:
    """The raw query string when it can be forwarded byte for byte, else why not."""
    if len(raw_query) > MAX_QUERY_BYTES:
        return UnsafePath(f"the query string is longer than {MAX_QUERY_BYTES} bytes")
    if not set(raw_query) <= _SAFE_QUERY_BYTES:
        return UnsafePath("the query string has a byte that is not printable ASCII")
    return raw_query.decode("ascii")
