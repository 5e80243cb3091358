"""The effective routes of a configuration, as `check` and `dev` print them.

Pure: settings and scope map in, lines of text out. One block per route: its prefix, the
credential it uses, its workspaces, scopes, the methods those scopes allow, its clients
with their shares, and the budget it spends.
"""

from __future__ import annotations

from proxy.config.settings import RouteSettings, Settings
from proxy.rules.limits import effective_limits
from proxy.rules.scopes import READ_METHODS, ScopeMap


def _share_terms(weight: float, cap: int | None) -> str:
    """A client's or route's share of its credential's budget, when not the default."""
    terms = ([f"weight {weight:g}"] if weight != 1 else []) + (
        [f"at most {cap} per window"] if cap is not None else []
    )
    return f" ({', '.join(terms)})" if terms else ""


def describe_limits(route: RouteSettings) -> list[tuple[str | None, str]]:
    """The route's effective limits (client None) and each limited client's, narrowed by
    the route's, as (client, one line); empty when neither the route nor a client has any."""
    found: list[tuple[str | None, str]] = []
    own = effective_limits(route.limits, None)
    if own is not None:
        found.append((None, own.describe()))
    for client in route.clients or ():
        narrowed = effective_limits(route.limits, client.limits)
        if client.limits is not None and narrowed is not None:
            found.append((client.name, narrowed.describe()))
    return found


def describe_routes(settings: Settings, scope_map: ScopeMap) -> list[str]:
    """The effective routes, one block of eight lines each, and a line for the route's
    limits and for each limited client's when there are any."""
    lines: list[str] = []
    for route in settings.routes:
        methods = scope_map.methods_for(route.scopes)
        if route.read_only:
            methods &= READ_METHODS
        workspaces = ", ".join(route.allowed_workspaces) or "(none)"
        clients = (
            ", ".join(c.name + _share_terms(c.weight, c.max_requests) for c in route.clients)
            if route.clients
            else "(open: no client auth)"
        )
        lines += [
            f"route {route.name}",
            f"  prefix:     {route.prefix or '(none)'}  -> {route.prefix}/api/v1/...",
            f"  credential: {route.credential}",
            f"  workspace:  {workspaces}",
            f"  scopes:     {', '.join(route.scopes)}",
            f"  methods:    {', '.join(sorted(methods))}",
            f"  clients:    {clients}",
            f"  budget:     {route.credential}{_share_terms(route.weight, route.max_requests)}",
        ]
        lines += [
            f"  limits:     {text}" if client is None else f"  limits of client {client}: {text}"
            for client, text in describe_limits(route)
        ]
    return lines
