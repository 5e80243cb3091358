"""A request head as a listener reads it before any server parses it (RFC 9112 section 3).

The forward-proxy listener reads the first head of a connection itself (to decide CONNECT
or absolute form before handing the socket on); this is its one strict reading.
"""

from __future__ import annotations

import re

from proxy.rules.refusals import Refusal

_TOKEN_CHARS = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 section 5.6.2
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")


def parse_head(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | Refusal:
    """The method, target and header fields of a request head ending in CRLF CRLF."""
    if not head.endswith(b"\r\n\r\n"):
        return _bad("the request head must end with an empty line (CRLF)")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return _bad("the request line must be: METHOD target HTTP/1.1")
    method, target, _version = parts
    if not _TOKEN_CHARS.match(method) or not target:
        return _bad("the request line is malformed")
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN_CHARS.match(name) or not _FIELD_VALUE.match(value):
            return _bad("a header field is malformed")
        fields.append((name.lower(), value.strip(b" \t")))
    return method, target, fields


def _bad(message: str) -> Refusal:
    return Refusal.of("bad_request", message, proxy_status="http_request_error")
