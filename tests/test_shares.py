"""Shares of a credential's budget: the pure rule, then the budgets that apply it, in
memory and in a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxy.budget.shares import (
    Share,
    SharePlan,
    ShareUse,
    Standing,
    WindowUse,
    admit,
    guarantees,
    headroom,
    nearest_limit,
    refusal_text,
)
from proxy.budget.stores import Budget, Grant, MemoryBudget, Queue, RedisBudget, window_use
from proxy.config.settings import ConfigError, RateLimitSettings, RouteSettings, parse_settings
from tests.servers import start_redis

FLOOD = Share("publer", "team", "flood")
QUIET = Share("publer", "team", "quiet")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


def test_guarantees_split_routes_then_clients_among_the_active() -> None:
    """A route's weight is split among its active clients; idle ones take no part."""
    a = Share("c", "team", "a", route_weight=3)
    b = Share("c", "team", "b", route_weight=3)
    open_route = Share("c", "open", "anonymous", route_weight=1)
    assert guarantees([a, b, open_route], 100) == {
        "team/a": 37.5,
        "team/b": 37.5,
        "open/anonymous": 25.0,
    }
    assert guarantees([a, open_route], 100) == {"team/a": 75.0, "open/anonymous": 25.0}
    heavy = Share("c", "team", "b", route_weight=3, client_weight=2)
    assert guarantees([a, heavy], 90) == {"team/a": 30.0, "team/b": 60.0}


def test_admit_lends_what_others_leave_and_keeps_what_they_claim() -> None:
    """Below its guarantee a client takes any free slot; above it, it borrows only the
    slots the other active clients cannot claim (unmet demand plus one, within their
    guarantee and cap)."""
    assert admit(Standing(FLOOD, 9, 0), [], 1, 10) is None  # alone: everything is lent
    quiet_asking = Standing(QUIET, 1, 2)  # holds 1 of its 5, was refused twice
    assert admit(Standing(FLOOD, 5, 0), [quiet_asking], 3, 10) == "client_share"
    assert admit(Standing(FLOOD, 5, 0), [quiet_asking], 4, 10) is None
    assert admit(Standing(FLOOD, 4, 0), [quiet_asking], 1, 10) is None  # within its own
    assert admit(Standing(QUIET, 1, 2), [Standing(FLOOD, 9, 0)], 1, 10) is None
    capped = Standing(Share("publer", "team", "quiet", max_requests=2), 1, 5)
    assert admit(Standing(FLOOD, 7, 0), [capped], 2, 10) is None  # claims 1, not 4
    assert admit(Standing(FLOOD, 10, 0), [Standing(QUIET, 0, 3)], 0, 10) == "client_share"
    assert admit(Standing(FLOOD, 5, 0), [Standing(QUIET, 5, 3)], 0, 10) == "client_share"
    assert admit(Standing(QUIET, 4, 1), [Standing(FLOOD, 6, 0)], 0, 10) == "credential"
    assert admit(Standing(FLOOD, 10, 0), [], 0, 10) == "credential"


def test_headroom_names_the_nearest_limit() -> None:
    """Each client's headroom before its share, its cap, its route's cap and the
    credential's budget; the nearest is the least, a hard limit winning a tie."""
    uses = (
        ShareUse("team", "a", used=24, share=30.0, cap=None, route_cap=None),
        ShareUse("team", "b", used=4, share=10.0, cap=6, route_cap=None),
        ShareUse("team", "c", used=12, share=10.0, cap=None, route_cap=None),
        ShareUse("bulk", "anonymous", used=3, share=25.0, cap=None, route_cap=5),
    )
    window = WindowUse("publer", limit=50, per_seconds=600, used=43, shares=uses)
    found = {u.client: headroom(window, u) for u in uses}
    assert found["a"] == {"credential": 7, "client_share": 6.0}
    assert found["b"] == {"credential": 7, "client_cap": 2, "client_share": 6.0}
    assert found["c"] == {"credential": 7, "client_share": -2.0}  # borrowed two
    assert found["anonymous"] == {"credential": 7, "route_cap": 2, "client_share": 22.0}
    nearest = {client: nearest_limit(left) for client, left in found.items()}
    assert nearest == {
        "a": "client_share",
        "b": "client_cap",
        "c": "client_share",
        "anonymous": "route_cap",
    }
    alone = WindowUse("publer", 50, 600, 0, (ShareUse("x", "y", 0, 50.0, None, None),))
    assert nearest_limit(headroom(alone, alone.shares[0])) == "credential"


def test_plan_from_config_and_its_messages() -> None:
    """Clients and open routes become shareholders with their weights and caps; the 429
    sentence names the limit and whose it is."""
    digest = "sha256:" + "0" * 64
    routes = [
        RouteSettings.model_validate(
            {
                "name": "team",
                "prefix": "/team",
                "credential": "publer",
                "scopes": ["posts"],
                "weight": 2,
                "max_requests": 50,
                "clients": [
                    {"name": "a", "token_sha256": digest, "weight": 3, "max_requests": 7},
                    {"name": "b", "token_sha256": digest},
                ],
            }
        ),
        RouteSettings.model_validate({"name": "open", "credential": "publer", "scopes": ["posts"]}),
    ]
    plan = SharePlan.of(routes)
    a = plan.share("team", "a")
    assert (a.route_weight, a.client_weight, a.max_requests, a.route_max_requests) == (
        2,
        3,
        7,
        50,
    )
    assert plan.share("open", None).client == "anonymous"
    assert plan.nominal("publer", 120) == {"team/a": 60.0, "team/b": 20.0, "open/anonymous": 40.0}
    assert "client 'a' on route 'team' has used its cap of 7 requests per 120 s" in (
        refusal_text(a, "client_cap", 100, 120)
    )
    assert "route 'team' has used its cap of 50" in refusal_text(a, "route_cap", 100, 120)
    assert "has used its share of credential 'publer'" in refusal_text(a, "client_share", 100, 120)
    assert "route 'open' (no client token)" in refusal_text(
        plan.share("open", None), "client_share", 100, 120
    )
    assert "budget of credential 'publer' (100 requests per 120 s) is spent" in refusal_text(
        a, "credential", 100, 120
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("weight", 0, "routes.0.clients.0.weight: Input should be greater than 0"),
        ("max_requests", 0, "routes.0.clients.0.max_requests: Input should be greater than 0"),
        ("name", "anonymous", "'anonymous' is reserved for requests without a client"),
        ("name", "a b", "routes.0.clients.0.name: must be letters, digits"),
    ],
)
def test_share_settings_are_checked(key: str, value: object, expected: str) -> None:
    """A bad weight, cap or client name is refused with its key path and the fix."""
    client = {"name": "a", "token_sha256": "sha256:" + "0" * 64, key: value}
    data = {
        "credentials": {"publer": {"path": "publer/api"}},
        "routes": [{"name": "r", "credential": "publer", "scopes": ["posts"], "clients": [client]}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    assert any(expected in line for line in caught.value.problems), caught.value.problems


def test_duplicate_client_names_and_unreachable_caps() -> None:
    """Two clients of one name on a route are an error; a cap above the credential's
    limit is a warning."""
    digest = "sha256:" + "0" * 64
    route = {"name": "r", "credential": "publer", "scopes": ["posts"]}
    data = {
        "credentials": {"publer": {"path": "publer/api"}},
        "routes": [{**route, "clients": [{"name": "a", "token_sha256": digest}] * 2}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    assert any("client name 'a' is used twice" in line for line in caught.value.problems)
    data["routes"] = [{**route, "max_requests": 500}]
    warnings = parse_settings(data).warnings()
    assert "routes.0.max_requests: 500 is above rate_limit.requests (100)" in warnings[0]


async def _flood_and_trickle(
    budget: Budget, flood: Share, quiet: Share, seconds: float
) -> tuple[int, int, int, int]:
    """Three flooding loops and one steady client for `seconds`; what each got, then what
    each asked, in the second half (after the flood had the whole window to itself
    first)."""
    got = {flood.key: 0, quiet.key: 0}
    asked = {flood.key: 0, quiet.key: 0}
    loop = asyncio.get_running_loop()
    start = loop.time()
    counting_from = start + seconds / 2
    flood_served = asyncio.Event()

    async def run(share: Share, pause: float) -> None:
        if share is quiet:  # it comes once the flood was served
            await asyncio.wait_for(flood_served.wait(), 30)
        while loop.time() - start < seconds:
            grant = await budget.take(share)
            if grant.allowed and share is flood:
                flood_served.set()
            if loop.time() >= counting_from:
                asked[share.key] += 1
                got[share.key] += grant.allowed
            await asyncio.sleep(pause)  # the pace each client asks at

    await asyncio.gather(
        *(run(flood, 0.001) for _ in range(3)),
        run(quiet, 0.01),
    )
    return got[flood.key], got[quiet.key], asked[flood.key], asked[quiet.key]


@pytest.mark.parametrize(("flood_weight", "quiet_weight"), [(1, 1), (3, 1), (1, 3)])
@pytest.mark.parametrize("store", ["memory", "redis"])
def test_the_quiet_client_gets_its_weighted_share_under_a_flood(
    store: str, flood_weight: int, quiet_weight: int, request: pytest.FixtureRequest
) -> None:
    """One client floods from the start; the other, arriving later and asking steadily,
    still gets at least its weighted share of the budget, and the flood has the rest
    (nothing is left unused)."""
    settings = RateLimitSettings(requests=20, per_seconds=1.0)
    flood = Share("c", "team", "flood", client_weight=flood_weight)
    quiet = Share("c", "team", "quiet", client_weight=quiet_weight)

    async def scenario() -> tuple[int, int, int, int]:
        budget: Budget
        if store == "redis":
            url: str = request.getfixturevalue("redis_url")
            budget = RedisBudget(settings, url)
            # Each run has its own credential name: nothing left from another run.
            nonlocal flood, quiet
            credential = f"c{flood_weight}{quiet_weight}"
            flood = Share(credential, "team", "flood", client_weight=flood_weight)
            quiet = Share(credential, "team", "quiet", client_weight=quiet_weight)
        else:
            budget = MemoryBudget(settings)
        try:
            return await _flood_and_trickle(budget, flood, quiet, 5.0)
        finally:
            await budget.close()

    flooded, quieted, flood_asked, quiet_asked = asyncio.run(scenario())
    windows = 2.5  # the counted half of the run, in windows
    share = settings.requests * quiet_weight / (flood_weight + quiet_weight)
    # At least its share, or all it asked for when a busy machine let it ask less; slack
    # for the window's edges. Without the share rule the quiet client got one or two
    # requests in the same run.
    numbers = (flooded, quieted, flood_asked, quiet_asked)
    assert quieted >= min(share * windows, quiet_asked) * 0.8, numbers
    total_due = min(settings.requests * windows, flood_asked + quiet_asked)
    assert flooded + quieted >= total_due * 0.8, numbers


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_caps_refuse_with_their_own_limit(store: str, request: pytest.FixtureRequest) -> None:
    """A client's cap and a route's cap refuse with their own limit, even with budget
    left; another client of the route is refused by the route's cap too."""
    settings = RateLimitSettings(requests=100, per_seconds=60)
    a = Share(f"caps-{store}", "team", "a", max_requests=2, route_max_requests=3)
    b = Share(f"caps-{store}", "team", "b", route_max_requests=3)

    async def scenario() -> list[tuple[bool, str | None]]:
        budget: Budget = (
            RedisBudget(settings, request.getfixturevalue("redis_url"))
            if store == "redis"
            else MemoryBudget(settings)
        )
        try:
            grants = [await budget.take(s) for s in (a, a, a, b, b)]
            return [(g.allowed, g.limit) for g in grants]
        finally:
            await budget.close()

    assert asyncio.run(scenario()) == [
        (True, None),
        (True, None),
        (False, "client_cap"),
        (True, None),
        (False, "route_cap"),
    ]


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_window_use_reports_each_client(store: str, request: pytest.FixtureRequest) -> None:
    """window_use() reads every shareholder's use of the current window without spending."""
    digest = "sha256:" + "0" * 64
    credential = f"use-{store}"
    plan = SharePlan.of(
        [
            RouteSettings.model_validate(
                {
                    "name": "team",
                    "credential": credential,
                    "scopes": ["posts"],
                    "clients": [
                        {"name": "a", "token_sha256": digest, "max_requests": 9},
                        {"name": "b", "token_sha256": digest},
                    ],
                }
            )
        ]
    )
    settings = RateLimitSettings(requests=10, per_seconds=60)

    async def scenario() -> list[tuple[str, int, float, int | None]]:
        budget: Budget = (
            RedisBudget(settings, request.getfixturevalue("redis_url"))
            if store == "redis"
            else MemoryBudget(settings)
        )
        try:
            for _ in range(3):
                await budget.take(plan.share("team", "a"))
            await budget.take(plan.share("team", "b"))
            first = await window_use(budget, plan, settings)
            again = await window_use(budget, plan, settings)
            assert first == again
            (window,) = first
            assert (window.credential, window.used, window.limit) == (credential, 4, 10)
            return [(u.client, u.used, u.share, u.cap) for u in window.shares]
        finally:
            await budget.close()

    assert asyncio.run(scenario()) == [("a", 3, 5.0, 9), ("b", 1, 5.0, None)]


def test_queue_serves_each_client_in_turn() -> None:
    """Waiting requests of a flooding client do not crowd out a quiet client's one: it is
    served by the first slots that free up, ahead of the flood's earlier waiters."""
    settings = RateLimitSettings(requests=4, per_seconds=0.5)

    async def scenario() -> list[str]:
        flood_waiting = asyncio.Event()

        class Watched(MemoryBudget):
            """Sets flood_waiting once the flood's ten requests (four served, six to wait
            in line) each asked the budget."""

            asked = 0

            async def take(self, share: Share, *, first: bool = True) -> Grant:
                grant = await super().take(share, first=first)
                if share is FLOOD and first:
                    Watched.asked += 1
                    if Watched.asked == 10:
                        flood_waiting.set()
                return grant

        budget = Watched(settings)
        queue = Queue()
        served: list[str] = []
        for _ in range(4):
            assert (await queue.spend(budget, FLOOD, 0)).allowed

        async def ask(share: Share, delay: float) -> None:
            if share is QUIET:  # it comes once every flood request asked and waits
                await asyncio.wait_for(flood_waiting.wait(), 30)
            await asyncio.sleep(delay)  # the flood's requests arrive one after the other
            if (await queue.spend(budget, share, 2.0)).allowed:
                served.append(share.client)

        await asyncio.gather(*(ask(FLOOD, 0.01 * n) for n in range(6)), ask(QUIET, 0))
        return served

    served = asyncio.run(scenario())
    assert "quiet" in served[:2], served
    assert len(served) == 7
