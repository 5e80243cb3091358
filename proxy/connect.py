"""The forward proxy's decisions, as pure functions with no I/O.

A CONNECT request (RFC 9110 section 9.3.6) opens a tunnel only to the configured upstream's
host and port, spelled in authority form `host:port`. Everything else is refused, so the
listener is never an open proxy: another host, another port, an IP literal (brackets
included), an absolute-form or origin-form request, a method other than CONNECT.
Host names compare case-insensitively, with one trailing root dot ignored (RFC 1034
section 3.1: `app.publer.com.` is the same name).

Inside the tunnel, each request's `Host` must name the tunnel's target too
(RFC 9110 section 7.4: a server answers 421 to a request not meant for it).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.ca import normalize_host
from proxy.errors import Refusal
from proxy.policy import Route, authenticate, presented_token

MAX_CONNECT_HEAD_BYTES = 8 * 1024
# \Z, not $: `$` also matches before a final newline, which let "host\n:443" through.
_TOKEN_CHARS = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 section 5.6.2
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_REG_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?\Z")
_ABSOLUTE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>.*)\Z"
)
_VISIBLE = re.compile(rb"[\x21-\x7e]+\Z")  # no whitespace, no control byte (CR LF TAB NUL DEL)
NOT_OPEN = "this listener only opens tunnels to {target}; it is not an open proxy"
GO_DIRECT = "; to reach {name} directly, list it in NO_PROXY"


@dataclass(frozen=True)
class Connect:
    """An accepted CONNECT: its target and the client token it carried, if any."""

    host: str
    port: int
    token: str | None


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


def check_target(target: bytes, host: str, port: int) -> tuple[str, int] | Refusal:
    """The normalised host and port of a CONNECT target, if it is exactly `host:port`.

    The target is read as sent: whitespace or a control byte anywhere (CR, LF, TAB, NUL,
    space, DEL) refuses it rather than being trimmed away.
    """
    if not _VISIBLE.match(target):
        return _malformed("the CONNECT target has whitespace, a control or a non-ASCII byte")
    text = target.decode("ascii")
    if text.startswith("[") or text.count(":") > 1:
        return _ip_literal(host, port, _host_part(text))
    name, _, port_text = text.partition(":")
    return _check_authority(name, port_text, host, port)


def _check_authority(name: str, port_text: str, host: str, port: int) -> tuple[str, int] | Refusal:
    refused = NOT_OPEN.format(target=f"{host}:{port}")
    if not port_text.isdigit() or port_text != str(int(port_text)) or not name:
        return _malformed(f"the target must be host:port; {refused}")
    if _is_ip_literal(name):
        return _ip_literal(host, port, name)
    if not _REG_NAME.match(name.lower()):
        return _denied(f"host {name[:100]!r} is refused; {refused}")
    if normalize_host(name) != host:
        go_direct = GO_DIRECT.format(name=name[:100])
        return _denied(f"host {name[:100]!r} is refused; {refused}{go_direct}")
    if int(port_text) != port:
        return _denied(f"port {port_text} is refused; {refused}")
    return host, port


def _bad(message: str) -> Refusal:
    return Refusal.of("bad_request", message, proxy_status="http_request_error")


def _malformed(message: str) -> Refusal:
    return Refusal.of("tunnel_refused", message, proxy_status="http_request_error")


def _denied(message: str) -> Refusal:
    return Refusal.of("tunnel_refused", message, proxy_status="http_request_denied")


def _ip_literal(host: str, port: int, literal: str) -> Refusal:
    go_direct = GO_DIRECT.format(name=literal[:100])
    return Refusal.of(
        "tunnel_refused",
        f"IP literals are refused; {NOT_OPEN.format(target=f'{host}:{port}')}{go_direct}",
        proxy_status="destination_ip_prohibited",
    )


def _unauthenticated(message: str) -> Refusal:
    return Refusal.of("proxy_unauthenticated", message, proxy_status="http_request_denied")


def _host_part(authority: str) -> str:
    if authority.startswith("[") and "]" in authority:
        return authority[: authority.index("]") + 1]
    return authority.rpartition(":")[0] or authority


def _is_ip_literal(name: str) -> bool:
    candidate = name.removesuffix(".")
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        # inet_aton's spellings: 2130706433, 0x7f.1, 017700000001 all reach 127.0.0.1.
        labels = candidate.split(".")
        return all(label.isdigit() or label.lower().startswith("0x") for label in labels)
    return True


def proxy_token(fields: Sequence[tuple[bytes, bytes]]) -> str | Refusal | None:
    """The client token of `Proxy-Authorization`: Basic (the password, else the user) or Bearer.

    `HTTPS_PROXY=http://client:TOKEN@host:port` makes every common client send Basic.
    """
    values = [value for name, value in fields if name == b"proxy-authorization"]
    if not values:
        return None
    if len(values) > 1:
        return _unauthenticated("send at most one Proxy-Authorization header")
    scheme, _, credentials = values[0].decode("latin-1").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return _unauthenticated("Proxy-Authorization: Basic is malformed")
        user, _, password = decoded.partition(":")
        token: str | None = password or user or None
    else:
        token = presented_token(values[0].decode("latin-1"))
        if token is None:
            return _unauthenticated(
                "Proxy-Authorization must be Basic (client:TOKEN) or Bearer TOKEN",
            )
    if token is not None and not (token.isascii() and token.isprintable()):
        return _unauthenticated("a client token is printable ASCII")
    return token


def decide_connect(head: bytes, host: str, port: int) -> Connect | Refusal:
    """Accept a CONNECT to exactly `host:port`, or say why not.

    A `Host` field, when sent, must name the same host and port as the request line.
    """
    parsed = parse_head(head)
    if isinstance(parsed, Refusal):
        return parsed
    method, target, fields = parsed
    if method != b"CONNECT":
        return _denied(
            f"only CONNECT is accepted here, not {method[:20].decode('ascii')};"
            f" {NOT_OPEN.format(target=f'{host}:{port}')}"
        )
    checked = check_target(target, host, port)
    if isinstance(checked, Refusal):
        return checked
    hosts = [value for name, value in fields if name == b"host"]
    if hosts and not host_matches(hosts, host, port):
        return _malformed("the Host header names another host than the CONNECT target")
    token = proxy_token(fields)
    if isinstance(token, Refusal):
        return token
    return Connect(checked[0], checked[1], token)


@dataclass(frozen=True)
class AbsoluteForm:
    """An accepted absolute-form request for the upstream's origin (RFC 9112 section 3.2.2)."""

    path: bytes  # what follows the authority in the target: the path (and query, if any)


def check_absolute(target: bytes, host: str, port: int) -> bytes | Refusal:
    """The path of an absolute-form target naming exactly `https://host:port`.

    The scheme is https (the upstream's), the port is `port` (443 may be left out), no
    userinfo; the rest is the path, which the reverse proxy's own path checks then judge.
    """
    if not _VISIBLE.match(target):
        return _malformed("the request target has whitespace, a control or a non-ASCII byte")
    text = target.decode("ascii")
    found = _ABSOLUTE.match(text)
    origin = f"https://{host}" + ("" if port == 443 else f":{port}")
    if found is None or found["scheme"].lower() != "https":
        return _denied(f"absolute-form requests are served for {origin} only")
    authority, path = found["authority"], found["path"]
    if "@" in authority:
        return _denied(f"userinfo in the request target is refused; send {origin}/...")
    if authority.startswith("[") or authority.count(":") > 1:
        return _ip_literal(host, port, _host_part(authority))
    name, colon, port_text = authority.partition(":")
    checked = _check_authority(name, port_text if colon else "443", host, port)
    if isinstance(checked, Refusal):
        return checked
    if not path.startswith("/"):
        return _malformed(f"the request target must be {origin}/PATH")
    return path.encode("ascii")


def decide_request(
    head: bytes, host: str, port: int, *, loopback: bool
) -> Connect | AbsoluteForm | Refusal:
    """A CONNECT (see `decide_connect`) or, from a loopback client, an absolute-form request
    for the upstream's origin (the plain-text form axios sends to HTTPS_PROXY)."""
    parsed = parse_head(head)
    if isinstance(parsed, Refusal):
        return parsed
    method, target, fields = parsed
    if method == b"CONNECT" or target.startswith(b"/"):
        return decide_connect(head, host, port)
    if not loopback:
        return _denied(
            "absolute-form requests travel in plain text and are served to loopback clients"
            " only; use CONNECT (most clients do with HTTPS_PROXY)"
        )
    path = check_absolute(target, host, port)
    if isinstance(path, Refusal):
        return path
    hosts = [value for name, value in fields if name == b"host"]
    if not host_matches(hosts, host, port):
        return Refusal.of(
            "misdirected_request",
            "the Host header must name the host of the request target",
            proxy_status="http_request_error",
        )
    token = proxy_token(fields)
    if isinstance(token, Refusal):
        return token
    return AbsoluteForm(path)


def client_route(routes: Sequence[Route], token: str | None) -> tuple[Route, str] | None:
    """The route with a client whose token this is, and the client's name."""
    if token is None:
        return None
    authorization = "Bearer-API " + token
    found: tuple[Route, str] | None = None
    for route in routes:
        if route.clients is None:
            continue
        name = authenticate(route, authorization)
        if isinstance(name, str) and found is None:
            found = route, name
    return found


def tunnel_route(routes: Sequence[Route], token: str | None) -> Route:
    """The route a tunnel's request goes to: its client's, else the open route of shortest prefix.

    With neither, a route with clients, which then refuses the request as unauthenticated
    in the usual way.
    """
    found = client_route(routes, token)
    if found is not None:
        return found[0]
    open_routes = [route for route in routes if route.clients is None]
    return min(open_routes or routes, key=lambda route: len(route.api_root))


def host_matches(values: Sequence[bytes], host: str, port: int) -> bool:
    """True when there is one Host and it names the tunnel's target (default port or given)."""
    if len(values) != 1:
        return False
    try:
        text = values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        return False
    name, colon, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if colon and (not port_text.isdigit() or int(port_text) != port):
        return False
    return bool(_REG_NAME.match(name.lower())) and normalize_host(name) == host


def logged_target(head: bytes) -> str:
    """The request target of a head as a log line may show it: printable ASCII (other bytes
    escaped), at most 256 characters, and of an absolute-form target only its scheme and
    host and port (a path or query may carry a token, userinfo is a password)."""
    line = head.split(b"\r\n", 1)[0].split(b" ")
    target = line[1] if len(line) > 1 else b""
    found = _ABSOLUTE.match(target.decode("latin-1"))
    if found is not None:
        authority = found["authority"].rpartition("@")[2]
        target = f"{found['scheme']}://{authority}".encode("latin-1")
    text = "".join(chr(b) if 0x21 <= b <= 0x7E else f"\\x{b:02x}" for b in target[:256])
    return text


@dataclass(frozen=True)
class ClientHello:
    """What the listener reads of a TLS ClientHello: the ALPN protocols it offers, if any."""

    alpn: tuple[bytes, ...] | None


_ALPN_EXTENSION = 16  # RFC 7301 section 3.1


def read_client_hello(data: bytes) -> ClientHello | None:
    """The ALPN offer of the TLS ClientHello at the start of `data`; None while the first
    record has not arrived whole. Anything unreadable counts as no offer: the TLS layer
    then judges it."""
    if len(data) < 5:
        return None
    end = 5 + int.from_bytes(data[3:5], "big")
    if data[0] != 0x16 or end > 5 + 2**14 + 256:
        return ClientHello(None)
    if len(data) < end:
        return None
    body = data[5:end]
    try:
        if body[0] != 1:  # client_hello
            return ClientHello(None)
        at = 4 + 2 + 32  # handshake header, legacy_version, random
        at += 1 + body[at]  # legacy_session_id
        at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher_suites
        at += 1 + body[at]  # legacy_compression_methods
        extensions_end = at + 2 + int.from_bytes(body[at : at + 2], "big")
        at += 2
        while at + 4 <= min(extensions_end, len(body)):
            kind = int.from_bytes(body[at : at + 2], "big")
            size = int.from_bytes(body[at + 2 : at + 4], "big")
            value = body[at + 4 : at + 4 + size]
            at += 4 + size
            if kind == _ALPN_EXTENSION:
                names, cursor = [], 2
                while cursor < len(value):
                    length = value[cursor]
                    names.append(value[cursor + 1 : cursor + 1 + length])
                    cursor += 1 + length
                return ClientHello(tuple(names))
    except IndexError:
        return ClientHello(None)
    return ClientHello(None)
