"""How host names and origins are spelled: in `Host` headers, in `Origin`, in the config.

Pure parsing, shared by the settings' checks (`listen.allowed_hosts`,
`browser.allowed_origins`) and the browser rules that compare requests against them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_PORT = re.compile(r"^[1-9][0-9]{0,4}$")
_ORIGIN = re.compile(r"^(https?)://([^/?#@\s]+)$")


@dataclass(frozen=True)
class HostName:
    """One name a listener answers to: a normalised host and, when pinned, its port."""

    host: str
    port: int | None = None


def parse_host(value: str) -> HostName | None:
    """A Host value (or a config entry) as `HostName`, or None when it is not one.

    Lower case; one trailing root dot dropped (RFC 1034 section 3.1); IPv6 in brackets,
    compared in its compressed form; IPv4 only in dotted-quad form (the other spellings
    that reach an address, `2130706433` or `0x7f.1`, are refused, as browsers never send them).
    """
    text = value.strip().lower()
    if not text or not text.isascii():
        return None
    port: int | None = None
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket:
            return None
        try:
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            return None
        if rest:
            if not rest.startswith(":") or not _PORT.match(rest[1:]):
                return None
            port = int(rest[1:])
        host = f"[{address.compressed}]"
        return HostName(host, port) if port is None or port <= 65535 else None
    name, colon, port_text = text.partition(":")
    if colon:
        if not _PORT.match(port_text):
            return None
        port = int(port_text)
    name = name.removesuffix(".")
    if not _NAME.match(name):
        return None
    labels = name.split(".")
    if all(label.isdigit() for label in labels) or labels[-1].isdigit():
        try:
            name = str(ipaddress.IPv4Address(name))
        except ValueError:
            return None
        if len(labels) != 4 or any(label != str(int(label)) for label in labels):
            return None
    return HostName(name, port) if port is None or port <= 65535 else None


def parse_origin(value: str) -> str | None:
    """An origin as a browser serialises it (`scheme://host[:port]`), normalised, or None."""
    found = _ORIGIN.match(value.strip().lower())
    if found is None:
        return None
    scheme, authority = found.groups()
    host = parse_host(authority)
    if host is None:
        return None
    default = 443 if scheme == "https" else 80
    port = "" if host.port in (None, default) else f":{host.port}"
    return f"{scheme}://{host.host}{port}"
