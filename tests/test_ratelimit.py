"""The in-memory sliding window: pure timing on the event loop."""

from __future__ import annotations

import asyncio

from proxy.budget.shares import Share
from proxy.budget.stores import MemoryBudget, Queue, retry_after_header
from proxy.config.settings import RateLimitSettings


def one(credential: str) -> Share:
    """The only shareholder of `credential`: an open route."""
    return Share(credential=credential, route="default", client="anonymous")


def test_window_spends_then_refuses_with_retry_after() -> None:
    """N requests pass per window, the next is refused with the time until a slot frees."""

    async def scenario() -> None:
        budget = MemoryBudget(RateLimitSettings(requests=3, per_seconds=60))
        grants = [await budget.take(one("c")) for _ in range(4)]
        assert [g.allowed for g in grants] == [True, True, True, False]
        assert [g.remaining for g in grants[:3]] == [2, 1, 0]
        assert 59 < grants[3].retry_after <= 60
        assert retry_after_header(grants[3]) == 60
        assert (await budget.take(one("other"))).allowed  # budgets are per credential

    asyncio.run(scenario())


def test_sync_believes_publer_when_it_counted_more() -> None:
    """Publer's lower Remaining shrinks the local window until Publer's reset."""

    async def scenario() -> None:
        budget = MemoryBudget(RateLimitSettings(requests=10, per_seconds=60))
        await budget.take(one("c"))
        await budget.sync("c", remaining=1, reset_seconds=0.3)
        assert (await budget.take(one("c"))).allowed
        assert not (await budget.take(one("c"))).allowed
        await asyncio.sleep(0.35)
        assert (await budget.take(one("c"))).allowed
        await budget.sync("c", remaining=50, reset_seconds=10)  # more than ours: ignored
        assert (await budget.take(one("c"))).remaining == 6

    asyncio.run(scenario())


def test_spend_queues_up_to_max_wait() -> None:
    """Queue.spend waits for a slot when it frees within max_wait, else refuses at once."""

    async def scenario() -> None:
        budget = MemoryBudget(RateLimitSettings(requests=1, per_seconds=0.2))
        assert (await Queue().spend(budget, one("c"), 0)).allowed
        assert not (await Queue().spend(budget, one("c"), 0)).allowed
        assert (await Queue().spend(budget, one("c"), 1.0)).allowed

    asyncio.run(scenario())


def test_sync_under_a_huge_limit_costs_no_memory() -> None:
    """The gap between our limit and Publer's Remaining becomes one ceiling, not one entry
    per missing request: a limit of ten million once cost 80 MB per re-sync."""
    import tracemalloc

    async def scenario() -> None:
        budget = MemoryBudget(RateLimitSettings(requests=10_000_000, per_seconds=120))
        await budget.take(one("c"))
        tracemalloc.start()
        await budget.sync("c", remaining=2, reset_seconds=30)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 64 * 1024, f"sync allocated {peak} bytes"
        grants = [await budget.take(one("c")) for _ in range(3)]
        assert [g.allowed for g in grants] == [True, True, False]
        assert [g.remaining for g in grants[:2]] == [1, 0]
        assert 29 < grants[2].retry_after <= 30  # until Publer's reset, not our window

    asyncio.run(scenario())


def test_sync_keeps_the_lowest_ceiling_and_ignores_bad_resets() -> None:
    """A later, higher Remaining from an answer that overtook another does not lift the
    ceiling; a reset that is not a positive finite number is not believed at all."""

    async def scenario() -> None:
        budget = MemoryBudget(RateLimitSettings(requests=100, per_seconds=60))
        for reset in (float("nan"), float("inf"), -1.0, 0.0):
            await budget.sync("c", remaining=0, reset_seconds=reset)
            assert (await budget.take(one("c"))).allowed, reset
        await budget.sync("c", remaining=1, reset_seconds=10)
        await budget.sync("c", remaining=5, reset_seconds=10)
        assert (await budget.take(one("c"))).allowed
        assert not (await budget.take(one("c"))).allowed

    asyncio.run(scenario())
