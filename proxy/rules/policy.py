"""The allow/deny decision, as pure functions with no I/O.

`decide` reads like the request path: pick the route, authenticate the client, check
the path against the scope allow-list, decide the workspace. It returns a `Verdict`:
what to forward, or a `Refusal` whose code is one of `proxy.rules.refusals.STATUS`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from proxy.config.settings import RouteSettings
from proxy.rules.paths import UnsafePath, check_path, check_query
from proxy.rules.refusals import Refusal
from proxy.rules.scopes import READ_METHODS, Match, ScopeMap

API_ROOT = "/api/v1"
_SCHEMES = ("Bearer-API ", "Bearer ")


@dataclass(frozen=True)
class Route:
    """A configured route, with its clients looked up by the SHA-256 digest of their token."""

    settings: RouteSettings
    api_root: str  # prefix + /api/v1
    clients: Mapping[bytes, str] | None  # token digest -> client name; None: an open route

    @property
    def name(self) -> str:
        """The route's configured name."""
        return self.settings.name


class RouteTable(Sequence[Route]):
    """The routes, longest `{prefix}/api/v1` first, and a dict of them by that root.

    A path is matched by looking up each of its segment-prefixes that ends in `/api/v1`
    (longest first), so finding the route costs the same with one route or thousands.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(sorted(routes, key=lambda r: len(r.api_root), reverse=True))
        self._by_root = {route.api_root: route for route in self._routes}

    def __len__(self) -> int:
        return len(self._routes)

    def __getitem__(self, index: int) -> Route:  # type: ignore[override]
        return self._routes[index]

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def select(self, path: str) -> tuple[Route, str] | None:
        """The route whose `{prefix}/api/v1` is a segment-prefix of `path`, and the rest."""
        ends: list[int] = []
        start = path.find(API_ROOT)
        while start != -1:
            end = start + len(API_ROOT)
            if end == len(path) or path[end] == "/":
                ends.append(end)
            start = path.find(API_ROOT, end)
        for end in reversed(ends):
            route = self._by_root.get(path[:end])
            if route is not None:
                return route, path[end:]
        return None


def build_routes(routes: Sequence[RouteSettings]) -> RouteTable:
    """The route table: `/team-a-eu` is tried before `/team-a`."""
    return RouteTable(
        [
            Route(
                settings=route,
                api_root=route.prefix + API_ROOT,
                clients=(
                    None
                    if not route.clients
                    else {stored_digest(c.token_sha256): c.name for c in route.clients}
                ),
            )
            for route in routes
        ]
    )


def hash_token(token: str) -> str:
    """The `sha256:<hex>` form of a client token, as pasted into `clients`."""
    return "sha256:" + token_digest(token).hex()


def token_digest(token: str) -> bytes:
    """The SHA-256 digest of a presented token (32 bytes)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def stored_digest(token_sha256: str) -> bytes:
    """The 32 bytes of a configured `sha256:<hex>` digest (the config checked its form)."""
    return bytes.fromhex(token_sha256.removeprefix("sha256:"))


def select_route(routes: Sequence[Route], path: str) -> tuple[Route, str] | None:
    """The route whose `{prefix}/api/v1` is a segment-prefix of `path`, and the rest.

    `routes` is normally the table `build_routes` made; any other sequence is indexed
    first (tests pass lists)."""
    table = routes if isinstance(routes, RouteTable) else RouteTable(routes)
    return table.select(path)


def presented_token(authorization: str | None) -> str | None:
    """The client token from `Authorization: Bearer-API <t>` or `Bearer <t>`."""
    if not authorization:
        return None
    for scheme in _SCHEMES:
        if authorization.startswith(scheme):
            token = authorization[len(scheme) :].strip()
            return token or None
    return None


def authenticate(route: Route, authorization: str | None) -> str | Refusal | None:
    """The client's name on a route with clients, None on an open route, else a refusal.

    The token's SHA-256 digest is looked up in a dict, so the cost does not grow with the
    number of clients. It needs no constant-time comparison: its timing can only reveal how
    much of a stored *digest* matches the digest of a guess, and a caller cannot steer the
    digest of a guess (SHA-256 is preimage resistant), so learning digest bytes brings
    nobody closer to a token. Tokens made as docs/operators.md says have 256 bits of entropy.
    """
    if route.clients is None:
        return None
    token = presented_token(authorization)
    if token is None:
        return Refusal.of(
            "client_unauthenticated",
            f"route '{route.name}' needs a client token: send Authorization: Bearer-API <token>",
        )
    found = route.clients.get(token_digest(token))
    if found is None:
        return Refusal.of(
            "client_unauthenticated", f"the client token is not valid on route '{route.name}'"
        )
    return found


def choose_workspace(route: Route, requested: Sequence[str]) -> str | Refusal | None:
    """The workspace id to send: the route's, or the client's choice among the route's.

    An empty header is a client that chose no workspace: it counts as absent.
    """
    allowed = route.settings.allowed_workspaces
    requested = [value for value in requested if value.strip()]
    if len(requested) > 1:
        return Refusal.of("workspace_denied", "send at most one Publer-Workspace-Id header")
    if not requested:
        return allowed[0] if allowed else None
    wanted = requested[0].strip()
    if wanted in allowed:
        return wanted
    return Refusal.of(
        "workspace_denied", f"workspace '{wanted}' is not allowed on route '{route.name}'"
    )


@dataclass(frozen=True)
class RequestHead:
    """The parts of a request's head that `decide` reads, taken from the ASGI scope: the
    method, the request target as sent (RFC 9112 section 3.2), and two header fields."""

    method: str
    raw_path: bytes  # the target's path, as sent: percent-escapes undecoded
    raw_query: bytes  # the target's query, without '?'
    authorization: str | None  # the first Authorization field, if any
    workspace_headers: Sequence[str]  # every Publer-Workspace-Id field, in order


@dataclass(frozen=True)
class Verdict:
    """The decision on one request: a refusal, or what to forward; with what the log needs."""

    refusal: Refusal | None
    route: Route | None = None
    client: str | None = None
    scope: str | None = None
    workspace: str | None = None
    upstream_target: str = ""  # /api/v1 + the checked rest of the path, + '?' + raw query
    needs_workspace: bool = False


def decide(request: RequestHead, routes: Sequence[Route], scope_map: ScopeMap) -> Verdict:
    """Route, authenticate, check the scope allow-list, choose the workspace."""
    if request.raw_path == b"/":
        return Verdict(Refusal.of("no_route", "no route serves /; call {prefix}/api/v1/..."))
    path = check_path(request.raw_path)
    if isinstance(path, UnsafePath):
        return Verdict(Refusal.of("bad_path", path.reason))
    query = check_query(request.raw_query)
    if isinstance(query, UnsafePath):
        return Verdict(Refusal.of("bad_path", query.reason))
    selected = select_route(routes, path)
    if selected is None:
        return Verdict(Refusal.of("no_route", f"no route serves {path}"))
    route, rest = selected
    client = authenticate(route, request.authorization)
    if isinstance(client, Refusal):
        return Verdict(client, route)
    found = scope_map.lookup(request.method, rest or "/")
    if not isinstance(found, Match):
        if found.code == "method_denied":
            methods = ", ".join(sorted(found.allowed_methods))
            text = f"{request.method} is not allowed on {rest}; Publer accepts {methods}"
        else:
            text = f"{rest or '/'} is not a Publer endpoint in the scope map"
        return Verdict(Refusal.of(found.code, text), route, client)
    scope = found.endpoint.scope
    if scope not in route.settings.scopes:
        text = f"scope '{scope}' is not allowed on route '{route.name}'"
        return Verdict(Refusal.of("scope_denied", text), route, client, scope)
    if route.settings.read_only and request.method not in READ_METHODS:
        text = f"route '{route.name}' is read-only: only GET and HEAD pass"
        return Verdict(Refusal.of("method_denied", text), route, client, scope)
    workspace: str | None = None
    if found.endpoint.needs_workspace:
        chosen = choose_workspace(route, request.workspace_headers)
        if isinstance(chosen, Refusal):
            return Verdict(chosen, route, client, scope)
        workspace = chosen
    # Else the endpoint takes no workspace (/users/me, /workspaces): whatever the client
    # sent is dropped with its other workspace headers, and none is sent.
    target = API_ROOT + rest + ("?" + query if query else "")
    return Verdict(None, route, client, scope, workspace, target, found.endpoint.needs_workspace)
