"""What an answer may carry back to the client: no secret the process knows.

An origin that echoes what it received (`WWW-Authenticate: Bearer-API <the key it got>`,
a debug body repeating the request's headers) would otherwise hand the injected key to the
app that must never hold it. Pure functions: the forwarder calls `screen_answer` once per
answer, with the body when it holds the body whole.

What is checked: every header name and value, and a body held whole, as sent or, for
`gzip` and `deflate` (RFC 9110 section 8.4.1), decoded (then re-encoded when a secret was
masked). What is not: bodies that stream through (large or without a Content-Length),
other content codings (`br`, `zstd`), and secrets in another form than the one Vault gave
(base64, percent- or JSON-escaped).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable

RawHeaders = list[tuple[bytes, bytes]]
Redact = Callable[[bytes], bytes]

# A compressed body is decoded for checking up to this size; beyond, it passes as is.
MAX_DECODED_BYTES = 1024 * 1024
_GZIP = frozenset({b"gzip", b"x-gzip"})


def mask_headers(headers: RawHeaders, redact: Redact) -> RawHeaders:
    """The headers with every known secret masked, in names and values alike."""
    # One search over all fields first: almost every answer holds no secret at all.
    # (NUL cannot occur in a field, so no secret spans two of them.)
    joined = b"\0".join([part for field in headers for part in field])
    if redact(joined) == joined:
        return list(headers)
    return [(redact(name), redact(value)) for name, value in headers]


def _decode(body: bytes, coding: bytes) -> bytes | None:
    """The body decoded, or None when it cannot be (malformed, or over the size cap)."""
    wbits = 16 + zlib.MAX_WBITS if coding in _GZIP else zlib.MAX_WBITS
    for bits in (wbits, -zlib.MAX_WBITS):  # "deflate" is zlib-wrapped; some send it raw
        decoder = zlib.decompressobj(bits)
        try:
            decoded = decoder.decompress(body, MAX_DECODED_BYTES)
        except zlib.error:
            continue
        if decoder.eof and not decoder.unconsumed_tail:
            return decoded
        return None
    return None


def _encode(body: bytes, coding: bytes) -> bytes:
    return gzip.compress(body, mtime=0) if coding in _GZIP else zlib.compress(body)


def mask_body(body: bytes, coding: bytes, redact: Redact) -> bytes:
    """The body with every known secret masked. `coding` is its Content-Encoding, lower
    case (b"" for none); a body in a coding this cannot read is returned as it is."""
    if coding in (b"", b"identity"):
        return redact(body)
    if coding not in _GZIP and coding != b"deflate":
        return body
    decoded = _decode(body, coding)
    if decoded is None:
        return body
    masked = redact(decoded)
    return body if masked == decoded else _encode(masked, coding)


def screen_answer(
    headers: RawHeaders, body: bytes | None, redact: Redact
) -> tuple[RawHeaders, bytes | None]:
    """The answer's headers, and its body when held whole, as they may reach the client.

    With a body, Content-Length is set to the length of the masked body (a mask is shorter
    than the secret it replaces).
    """
    screened = mask_headers(headers, redact)
    if body is None:
        return screened, None
    codings = [value.strip().lower() for name, value in headers if name == b"content-encoding"]
    coding = b"" if not codings else codings[0] if len(codings) == 1 else b"(several)"
    masked = mask_body(body, coding, redact)
    if masked == body:
        return screened, body
    out = [(name, value) for name, value in screened if name != b"content-length"]
    out.append((b"content-length", str(len(masked)).encode("ascii")))
    return out, masked
