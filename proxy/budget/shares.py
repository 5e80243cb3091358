"""Shares of a credential's budget: who may spend the next request, decided fairly.

Every request spends from its credential's budget on behalf of a *shareholder*: a client
of a route, or the route itself when it is open (client `anonymous`). Each route has a
weight, split among its clients by their weights, and each route and client may have a
hard cap of requests per window.

Among the shareholders active in the window (those that asked within it), a
shareholder's *guarantee* is its weighted part of the budget: the route's weight over the
active routes' weights, times the client's weight over its route's active clients'
weights, times the limit. The rule for one request (`admit`) is work-conserving:

- below its guarantee, a shareholder takes any free slot;
- at or above it, it borrows a free slot only when more slots are free than the other
  active shareholders may still claim: for each, the smaller of what is left of its
  guarantee and its unmet demand plus one (the requests it was refused, plus the next).

So an idle shareholder lends all of its part, and one that comes back gets the slots
that free up until it holds its guarantee again. The same rule runs in memory and, for
replicas sharing one budget, in a Redis script (`proxy.budget.stores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from proxy.config.settings import ANONYMOUS_CLIENT, RouteSettings

# Which limit refused a request: the machine-readable `limit` of a 429.
Limit = Literal["credential", "client_share", "client_cap", "route_cap"]


@dataclass(frozen=True)
class Share:
    """One shareholder of a credential's budget, with its weights and caps."""

    credential: str
    route: str
    client: str  # a configured client name, or `anonymous` on an open route
    route_weight: float = 1.0
    client_weight: float = 1.0
    max_requests: int | None = None  # the client's cap per window
    route_max_requests: int | None = None  # the route's cap per window

    @cached_property
    def key(self) -> str:
        """`route/client`: unique per credential, as route and client names hold no `/`."""
        return f"{self.route}/{self.client}"


@dataclass(frozen=True)
class Standing:
    """A shareholder active in the window: what it holds and what it was refused."""

    share: Share
    used: int
    asked: int  # requests refused in the window and not served since


def guarantees(active: Iterable[Share], limit: int) -> dict[str, float]:
    """Each active shareholder's weighted part of `limit` requests, by `Share.key`."""
    shares = list(active)
    route_weights: dict[str, float] = {}
    client_weights: dict[str, float] = {}
    for share in shares:
        route_weights[share.route] = share.route_weight
        client_weights[share.route] = client_weights.get(share.route, 0.0) + share.client_weight
    total = sum(route_weights.values())
    return {
        share.key: limit
        * (share.route_weight / total)
        * (share.client_weight / client_weights[share.route])
        for share in shares
    }


def claimable(standing: Standing, guarantee: float) -> float:
    """How many free slots a shareholder may still claim from borrowers: never past its
    cap, never more than its unmet demand plus one."""
    cap = standing.share.max_requests
    if cap is not None:
        guarantee = min(guarantee, cap)
    return max(0.0, min(guarantee - standing.used, standing.asked + 1))


def admit(me: Standing, others: Sequence[Standing], free: int, limit: int) -> Limit | None:
    """None when `me` may take one of `free` slots now, else the limit that refuses it.

    `others` are the other shareholders active in the window; caps are checked before.
    """
    guarantee = guarantees([me.share, *(o.share for o in others)], limit)
    return admit_with(me, lambda: others, free, guarantee)


def admit_with(
    me: Standing,
    others: Callable[[], Iterable[Standing]],
    free: int,
    guarantee: dict[str, float],
) -> Limit | None:
    """`admit` with the guarantees already known, asking for the others' standing only
    when `me` is at or above its guarantee (the common case needs none of it)."""
    mine = guarantee[me.share.key]
    if free <= 0:
        # Spent, with others asking too: the client's share when it holds it already.
        shared = len(guarantee) > 1
        return "client_share" if shared and me.used >= mine else "credential"
    if me.used < mine:
        return None
    reserved = sum(claimable(o, guarantee[o.share.key]) for o in others())
    return None if free > reserved else "client_share"


@dataclass(frozen=True)
class SharePlan:
    """The shareholders of every credential, from the routes of the config."""

    by_key: dict[tuple[str, str], Share]

    @classmethod
    def of(cls, routes: Sequence[RouteSettings]) -> SharePlan:
        """Every route's shareholders: its clients, or `anonymous` on an open route."""
        by_key: dict[tuple[str, str], Share] = {}
        for route in routes:
            clients = [(c.name, c.weight, c.max_requests) for c in route.clients or ()]
            for name, weight, cap in clients or [(ANONYMOUS_CLIENT, 1.0, None)]:
                by_key[route.name, name] = Share(
                    credential=route.credential,
                    route=route.name,
                    client=name,
                    route_weight=route.weight,
                    client_weight=weight,
                    max_requests=cap,
                    route_max_requests=route.max_requests,
                )
        return cls(by_key)

    def share(self, route: str, client: str | None) -> Share:
        """The shareholder a request of `client` (None: no client) on `route` spends for."""
        return self.by_key[route, client or ANONYMOUS_CLIENT]

    def credentials(self) -> list[str]:
        """The credentials that have shareholders, in config order."""
        return list(dict.fromkeys(s.credential for s in self.by_key.values()))

    def of_credential(self, credential: str) -> list[Share]:
        """The shareholders of one credential, in config order."""
        return [s for s in self.by_key.values() if s.credential == credential]

    def nominal(self, credential: str, limit: int) -> dict[str, float]:
        """Each shareholder's part of `limit` when all of them are active."""
        return guarantees(self.of_credential(credential), limit)


@dataclass(frozen=True)
class ShareUse:
    """One shareholder's use of its credential's current window."""

    route: str
    client: str
    used: int  # requests granted in the current window
    share: float  # its weighted part of the limit when every shareholder is active
    cap: int | None  # the client's cap, if any
    route_cap: int | None


@dataclass(frozen=True)
class WindowUse:
    """A credential's current window: requests spent of `limit`, and each shareholder's."""

    credential: str
    limit: int
    per_seconds: float
    used: int
    shares: tuple[ShareUse, ...]


def headroom(window: WindowUse, use: ShareUse) -> dict[Limit, float]:
    """Requests `use`'s shareholder may still spend in `window` before each limit that
    applies to it; negative past its share, by what it borrowed. Hard limits come first,
    so a tie names the one that refuses outright."""
    left: dict[Limit, float] = {"credential": window.limit - window.used}
    if use.route_cap is not None:
        route_used = sum(u.used for u in window.shares if u.route == use.route)
        left["route_cap"] = use.route_cap - route_used
    if use.cap is not None:
        left["client_cap"] = use.cap - use.used
    left["client_share"] = use.share - use.used
    return left


def nearest_limit(left: dict[Limit, float]) -> Limit:
    """The limit with the least headroom in `left` (as `headroom` gives it)."""
    return min(left, key=left.__getitem__)


def refusal_text(share: Share, limit: Limit, requests: int, per_seconds: float) -> str:
    """The sentence of a 429: which limit refused the request, and whose it is."""
    window = f"per {per_seconds:g} s"
    who = (
        f"route '{share.route}' (no client token)"
        if share.client == ANONYMOUS_CLIENT
        else f"client '{share.client}' on route '{share.route}'"
    )
    if limit == "client_cap":
        return f"{who} has used its cap of {share.max_requests} requests {window}; retry later"
    if limit == "route_cap":
        return (
            f"route '{share.route}' has used its cap of {share.route_max_requests} requests"
            f" {window}; retry later"
        )
    if limit == "client_share":
        return (
            f"{who} has used its share of credential '{share.credential}''s budget"
            f" ({requests} requests {window}, shared with other clients that are waiting);"
            " retry later"
        )
    return (
        f"the rate budget of credential '{share.credential}' ({requests} requests {window})"
        " is spent; retry later"
    )


def limit_requests(share: Share, limit: Limit, requests: int) -> int:
    """The number of requests per window of the limit that refused, for X-RateLimit-Limit."""
    if limit == "client_cap" and share.max_requests is not None:
        return share.max_requests
    if limit == "route_cap" and share.route_max_requests is not None:
        return share.route_max_requests
    return requests
