"""What a response may carry back to the client: no secret the process knows.

An origin that echoes what it received (`WWW-Authenticate: Bearer-API <the key it got>`,
a debug body repeating the request's headers) would otherwise hand the injected key to the
app that must never hold it. Pure functions: the forwarder calls `screen_response` once per
response, with the body when it holds the body whole.

What is checked: every header name and value, and a body held whole, as sent or, for
`gzip` and `deflate` (RFC 9110 section 8.4.1), decoded (then re-encoded when a secret was
masked); a body that streams through (too large to hold) when it has no content coding,
by `StreamMask`, a secret split across chunks included. What is not: a streamed body in a
content coding, other content codings (`br`, `zstd`) of a held body, and secrets in
another form than the one Vault gave (base64, percent- or JSON-escaped).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable

from proxy.masking.secrets import SecretRegistry

RawHeaders = list[tuple[bytes, bytes]]
Redact = Callable[[bytes], bytes]

# A compressed body is decoded for checking up to this size; beyond, it passes as is.
MAX_DECODED_BYTES = 1024 * 1024
_GZIP = frozenset({b"gzip", b"x-gzip"})


def mask_headers(headers: RawHeaders, redact: Redact) -> RawHeaders:
    """The headers with every known secret masked, in names and values alike."""
    # One search over all fields first: almost every response holds no secret at all.
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


def content_coding(headers: RawHeaders) -> bytes:
    """The response's Content-Encoding, lower case: b"" for none, b"(several)" for a list."""
    codings = [value.strip().lower() for name, value in headers if name == b"content-encoding"]
    return b"" if not codings else codings[0] if len(codings) == 1 else b"(several)"


class StreamMask:
    """Masks known secrets in a body as it streams through, chunk by chunk.

    The end of a chunk that could begin a secret is held back until the next chunk says
    whether it does (nothing else is delayed); each mask has the secret's length, so the
    Content-Length already sent stays true.
    """

    def __init__(self, secrets: SecretRegistry) -> None:
        self._secrets = secrets
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of `chunk` (after those held back) that may go to the client now."""
        data = self._held + chunk
        pairs = self._secrets.same_length_masks()
        for value, masked in pairs:
            if value in data:
                data = data.replace(value, masked)
        held = _secret_start(data, pairs)
        self._held = data[len(data) - held :]
        return data[: len(data) - held]

    def flush(self) -> bytes:
        """What was held back, at the end of the body: it was no secret."""
        held, self._held = self._held, b""
        return held


def _secret_start(data: bytes, pairs: tuple[tuple[bytes, bytes], ...]) -> int:
    """The length of the longest end of `data` that is the start of a secret."""
    longest = 0
    for value, _ in pairs:
        # Only where the secret's first byte occurs in its reach of the end (few places).
        at = data.find(value[:1], max(len(data) - len(value) + 1, 0))
        while at != -1 and len(data) - at > longest:
            if value.startswith(data[at:]):
                longest = len(data) - at
                break
            at = data.find(value[:1], at + 1)
    return longest


def screen_response(
    headers: RawHeaders, body: bytes | None, redact: Redact
) -> tuple[RawHeaders, bytes | None]:
    """The response's headers, and its body when held whole, as they may reach the client.

    With a body, Content-Length is set to the length of the masked body (a mask is shorter
    than the secret it replaces).
    """
    screened = mask_headers(headers, redact)
    if body is None:
        return screened, None
    masked = mask_body(body, content_coding(headers), redact)
    if masked == body:
        return screened, body
    out = [(name, value) for name, value in screened if name != b"content-length"]
    out.append((b"content-length", str(len(masked)).encode("ascii")))
    return out, masked
