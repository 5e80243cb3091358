"""Who may call the proxy from a web browser, as pure functions with no I/O.

Every web page the developer's browser opens can send requests to a loopback address:
HTML forms and `fetch(..., {mode: "no-cors"})` need no CORS preflight, and DNS
rebinding (a page's own host name re-pointed at 127.0.0.1) even lets a page read the
answers. Two checks stop both, before anything is routed or a key is read:

- the `Host` must name the listener itself (RFC 9110 section 7.2): its loopback names,
  or the names the operator lists (`listen.allowed_hosts`, `forward_proxy.allowed_hosts`);
  a rebound page sends its own name, so it is refused with 421 Misdirected Request
  (RFC 9110 section 15.5.20: this server will not answer for that target);
- a request that a browser says came from another site is refused (403): an `Origin`
  that is neither the proxy's own nor listed in `browser.allowed_origins` (`Origin: null`
  never is), or a `Sec-Fetch-Site` other than `same-origin` or `none` (Fetch Metadata).
  Programs that are not browsers send neither field and are not affected.

For a listed origin, CORS preflights (an OPTIONS with `Access-Control-Request-Method`) are
answered here and responses carry `Access-Control-Allow-Origin` for that origin only; no
other `Access-Control-*` header leaves the proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config.hosts import HostName, parse_host, parse_origin
from proxy.rules.refusals import Refusal

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
SAME_SITE_VALUES = frozenset({b"same-origin", b"none"})
# What a browser app may send and read across origins; the key header is the proxy's.
CORS_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
CORS_REQUEST_HEADERS = frozenset(
    {"authorization", "content-type", "publer-workspace-id", "x-request-id"}
)
CORS_EXPOSED_HEADERS = (
    "x-request-id, x-publer-proxy-error, retry-after,"
    " x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset"
)
CORS_MAX_AGE_SECONDS = 600

HOST_DENIED = (
    "the Host header {host} does not name this proxy; it answers only to {names}. A web page"
    " that re-points its own name at this machine is refused this way; if a program really"
    " calls the proxy by this name, add it to {key}"
)
NO_HOST = "an HTTP/1.1 request needs exactly one Host header naming this proxy ({names})"
ORIGIN_DENIED = (
    "requests from web pages are refused: the Origin {origin} is not listed in"
    " browser.allowed_origins; list it there only for a browser app meant to call the proxy"
)
OPERATOR_ONLY = (
    "the operational endpoints (the status page, /readyz, /metrics, /healthz) answer no web"
    " page, not even one listed in browser.allowed_origins (that list grants the API routes);"
    " open them in a tab of their own or call them from a program"
)
FETCH_SITE_DENIED = (
    "requests from web pages are refused: the browser marked this request"
    " Sec-Fetch-Site: {site}; list the page's origin in browser.allowed_origins only for a"
    " browser app meant to call the proxy"
)


def listener_names(listen_host: str, allowed_hosts: Sequence[str]) -> tuple[HostName, ...]:
    """The names a listener bound to `listen_host` answers to: its loopback names when it is
    a loopback or wildcard address (`0.0.0.0` and `::` take loopback connections too), its
    own address when that is one address, and the operator's."""
    names: list[str] = list(allowed_hosts)
    if _is_loopback(listen_host) or listen_host.strip("[]") in ("0.0.0.0", "::"):
        names += LOOPBACK_NAMES
    own = parse_host(f"[{listen_host}]" if ":" in listen_host else listen_host)
    if own is not None and own.host not in ("0.0.0.0", "[::]"):
        names.append(own.host)
    return tuple(dict.fromkeys(n for n in map(parse_host, names) if n is not None))


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(
    values: Sequence[bytes],
    names: Sequence[HostName],
    port: int | None,
    *,
    http_version: str,
    key: str,
) -> Refusal | None:
    """None when the request's Host names this listener, else the refusal (`host_denied`).

    `values` are the request's Host fields, `port` the port the request arrived on (None
    on a unix socket). A name listed without a port matches with no port or with the
    listener's own; a name listed with a port matches that port only. An HTTP/1.0 request
    may omit Host (it predates the field); HTTP/1.1 may not (RFC 9112 section 3.2).
    """
    shown = ", ".join(_show(n) for n in names) or f"the names listed in {key}"
    if not values:
        if http_version == "1.0":
            return None
        return Refusal.of("host_denied", NO_HOST.format(names=shown))
    if len(values) > 1:
        return Refusal.of("host_denied", NO_HOST.format(names=shown))
    raw = values[0].decode("latin-1")
    given = parse_host(raw)
    if given is not None:
        for name in names:
            if name.host != given.host:
                continue
            wanted = name.port if name.port is not None else port
            if given.port is None or given.port == wanted:
                return None
    return Refusal.of("host_denied", HOST_DENIED.format(host=repr(raw[:100]), names=shown, key=key))


def own_origin(host: bytes, port: int | None) -> str | None:
    """The origin of a page the proxy served itself, from the request's checked `Host` and
    the `port` the request arrived on (None on a unix socket): `http://host:port`, or None
    when `host` is not a host name.

    A Host without a port stands for the listener's own port here, not for 80: a browser
    names any other port in Host (RFC 9110 section 7.2), so a page of `http://localhost`
    (port 80, another server) is not this listener's own.
    """
    name = parse_host(host.decode("latin-1"))
    if name is None:
        return None
    given = name.port if name.port is not None else port
    return parse_origin(f"http://{name.host}" + ("" if given is None else f":{given}"))


def _show(name: HostName) -> str:
    return name.host if name.port is None else f"{name.host}:{name.port}"


@dataclass(frozen=True)
class BrowserVerdict:
    """What to do with a request: refuse it, or serve it with CORS for `cors_origin`."""

    refusal: Refusal | None = None
    cors_origin: str | None = None  # a listed origin, echoed in Access-Control-Allow-Origin


def check_browser(
    headers: Sequence[tuple[bytes, bytes]],
    own_origins: Sequence[str],
    allowed_origins: frozenset[str],
) -> BrowserVerdict:
    """Refuse what a browser marked as coming from another site, unless its origin is listed.

    `own_origins` are the proxy's own origins for this request (`http://` + its checked
    Host): a page the proxy served itself (the status page) is same-origin.
    """
    origins = [value for name, value in headers if name == b"origin"]
    sites = [value.strip().lower() for name, value in headers if name == b"sec-fetch-site"]
    if len(origins) > 1:
        return BrowserVerdict(Refusal.of("origin_denied", ORIGIN_DENIED.format(origin="(several)")))
    listed: str | None = None
    if origins:
        raw = origins[0].decode("latin-1")
        origin = parse_origin(raw)
        if origin is not None and origin in allowed_origins:
            listed = origin
        elif origin is None or origin not in own_origins:
            shown = repr(raw[:100])
            return BrowserVerdict(Refusal.of("origin_denied", ORIGIN_DENIED.format(origin=shown)))
    foreign = [site for site in sites if site not in SAME_SITE_VALUES]
    if listed is None and foreign:
        site = foreign[0][:40].decode("latin-1")
        return BrowserVerdict(Refusal.of("origin_denied", FETCH_SITE_DENIED.format(site=site)))
    return BrowserVerdict(cors_origin=listed)


def is_preflight(method: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True for a CORS preflight: OPTIONS with Access-Control-Request-Method."""
    return method == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in headers
    )


def preflight_headers(
    origin: str, headers: Sequence[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]] | None:
    """The headers answering a preflight from the listed `origin`, or None when the method
    or a header it asks for is not one a browser app may use."""
    methods = [v for n, v in headers if n == b"access-control-request-method"]
    asked = b",".join(v for n, v in headers if n == b"access-control-request-headers")
    wanted = {h.strip().lower() for h in asked.decode("latin-1").split(",") if h.strip()}
    method = methods[0].decode("latin-1").strip() if len(methods) == 1 else ""
    if method not in CORS_METHODS or not wanted <= CORS_REQUEST_HEADERS:
        return None
    found = [
        (b"access-control-allow-origin", origin.encode()),
        (b"access-control-allow-methods", method.encode()),
        (b"access-control-max-age", str(CORS_MAX_AGE_SECONDS).encode()),
        (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    ]
    if wanted:
        found.append((b"access-control-allow-headers", ", ".join(sorted(wanted)).encode()))
    return found


def cors_response_headers(origin: str) -> list[tuple[bytes, bytes]]:
    """The CORS headers of an actual response to the listed `origin` (no credentials)."""
    return [
        (b"access-control-allow-origin", origin.encode()),
        (b"access-control-expose-headers", CORS_EXPOSED_HEADERS.encode()),
        (b"vary", b"Origin"),
    ]


def without_cors(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` minus every `Access-Control-*` field (whoever wrote it)."""
    return [(n, v) for n, v in headers if not n.lower().startswith(b"access-control-")]
