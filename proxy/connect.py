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
_TOKEN_CHARS = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 section 5.6.2
_FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_REG_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?$")
NOT_OPEN = "this listener only opens tunnels to {target}; it is not an open proxy"


@dataclass(frozen=True)
class Connect:
    """An accepted CONNECT: its target and the client token it carried, if any."""

    host: str
    port: int
    token: str | None


def parse_head(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | Refusal:
    """The method, target and header fields of a request head ending in CRLF CRLF."""
    if not head.endswith(b"\r\n\r\n"):
        return Refusal.of("bad_request", "the request head must end with an empty line (CRLF)")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return Refusal.of("bad_request", "the request line must be: METHOD target HTTP/1.1")
    method, target, _version = parts
    if not _TOKEN_CHARS.match(method) or not target:
        return Refusal.of("bad_request", "the request line is malformed")
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN_CHARS.match(name) or not _FIELD_VALUE.match(value):
            return Refusal.of("bad_request", "a header field is malformed")
        fields.append((name.lower(), value.strip(b" \t")))
    return method, target, fields


def check_target(target: bytes, host: str, port: int) -> tuple[str, int] | Refusal:
    """The normalised host and port of a CONNECT target, if it is exactly `host:port`."""
    wanted = f"{host}:{port}"
    refused = NOT_OPEN.format(target=wanted)
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        return Refusal.of("tunnel_refused", f"the CONNECT target is not ASCII; {refused}")
    if text.startswith("[") or text.count(":") != 1:
        return Refusal.of("tunnel_refused", f"IP literals are refused; {refused}")
    name, _, port_text = text.partition(":")
    if not port_text.isdigit() or port_text != str(int(port_text)) or not name:
        return Refusal.of("tunnel_refused", f"the CONNECT target must be host:port; {refused}")
    if _is_ip_literal(name):
        return Refusal.of("tunnel_refused", f"IP literals are refused; {refused}")
    if not _REG_NAME.match(name.lower()) or normalize_host(name) != host:
        return Refusal.of("tunnel_refused", f"host {name[:100]!r} is refused; {refused}")
    if int(port_text) != port:
        return Refusal.of("tunnel_refused", f"port {port_text} is refused; {refused}")
    return host, port


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
        return Refusal.of("proxy_unauthenticated", "send at most one Proxy-Authorization header")
    scheme, _, credentials = values[0].decode("latin-1").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return Refusal.of("proxy_unauthenticated", "Proxy-Authorization: Basic is malformed")
        user, _, password = decoded.partition(":")
        token: str | None = password or user or None
    else:
        token = presented_token(values[0].decode("latin-1"))
        if token is None:
            return Refusal.of(
                "proxy_unauthenticated",
                "Proxy-Authorization must be Basic (client:TOKEN) or Bearer TOKEN",
            )
    if token is not None and not (token.isascii() and token.isprintable()):
        return Refusal.of("proxy_unauthenticated", "a client token is printable ASCII")
    return token


def decide_connect(head: bytes, host: str, port: int) -> Connect | Refusal:
    """Accept a CONNECT to exactly `host:port`, or say why not."""
    parsed = parse_head(head)
    if isinstance(parsed, Refusal):
        return parsed
    method, target, fields = parsed
    if method != b"CONNECT":
        return Refusal.of(
            "tunnel_refused",
            f"only CONNECT is accepted here, not {method[:20].decode('ascii')};"
            f" {NOT_OPEN.format(target=f'{host}:{port}')}",
        )
    checked = check_target(target, host, port)
    if isinstance(checked, Refusal):
        return checked
    token = proxy_token(fields)
    if isinstance(token, Refusal):
        return token
    return Connect(checked[0], checked[1], token)


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
