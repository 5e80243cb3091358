"""The effective routes of a configuration, as `check` and `dev` print them.

Pure: settings and scope map in, lines of text out. One block per route: its prefix, the
credential it uses, its workspaces, scopes, the methods those scopes allow, and its clients.
"""

from __future__ import annotations

from proxy.scopes import READ_METHODS, ScopeMap
from proxy.settings import Settings


def describe_routes(settings: Settings, scope_map: ScopeMap) -> list[str]:
    """The effective routes, one block of seven lines each."""
    lines: list[str] = []
    for route in settings.routes:
        methods = scope_map.methods_for(route.scopes)
        if route.read_only:
            methods &= READ_METHODS
        workspaces = ", ".join(route.allowed_workspaces) or "(none)"
        clients = (
            ", ".join(c.name for c in route.clients) if route.clients else "(open: no client auth)"
        )
        lines += [
            f"route {route.name}",
            f"  prefix:     {route.prefix or '(none)'}  -> {route.prefix}/api/v1/...",
            f"  credential: {route.credential}",
            f"  workspace:  {workspaces}",
            f"  scopes:     {', '.join(route.scopes)}",
            f"  methods:    {', '.join(sorted(methods))}",
            f"  clients:    {clients}",
        ]
    return lines
