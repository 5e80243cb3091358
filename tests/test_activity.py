"""Recent refusals, as the status page counts them (pure, on a clock the test moves)."""

from __future__ import annotations

from proxy.records.activity import (
    BUCKETS_PER_WINDOW,
    RECENT_REFUSALS,
    REFUSAL_WINDOW_SECONDS,
    Activity,
)


class Clock:
    """A monotonic clock the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusals_leave_the_count_one_window_later() -> None:
    """Each code counts its own refusals; they leave the count one window later, give or
    take one bucket."""
    clock = Clock()
    activity = Activity(clock)
    for _ in range(3):
        activity.refused("scope_denied", 403, "team", "a", "x")
    activity.refused("no_route", 404, None, None, "y")
    clock.now += REFUSAL_WINDOW_SECONDS / 2
    activity.refused("scope_denied", 403, "team", "b", "z")
    assert activity.refusals_by_code() == {"scope_denied": 4, "no_route": 1}
    clock.now += REFUSAL_WINDOW_SECONDS / 2 + REFUSAL_WINDOW_SECONDS / BUCKETS_PER_WINDOW
    assert activity.refusals_by_code() == {"scope_denied": 1}  # only the later one is left


def test_memory_is_bounded_by_codes_not_traffic() -> None:
    """A code refused for a long time keeps at most one bucket per twelfth of a window."""
    clock = Clock()
    activity = Activity(clock)
    step = REFUSAL_WINDOW_SECONDS / 2000
    for _ in range(5000):
        activity.refused("scope_denied", 403, "team", "a", "x")
        clock.now += step
    ring = activity._refusals._rings["scope_denied"]
    assert len(ring) == BUCKETS_PER_WINDOW
    assert 1800 <= activity.refusals_by_code()["scope_denied"] <= 2000


def test_refusals_by_code_and_the_most_recent() -> None:
    """Refusals are counted by code over 15 minutes, largest first; the last 20 are kept,
    newest first."""
    clock = Clock()
    activity = Activity(clock)
    for n in range(25):
        activity.refused("scope_denied" if n % 5 else "no_route", 403, "team", "a", f"id{n}")
    assert activity.refusals_by_code() == {"scope_denied": 20, "no_route": 5}
    recent = activity.recent_refusals()
    assert len(recent) == RECENT_REFUSALS
    assert [r.request_id for r in recent[:2]] == ["id24", "id23"]
    clock.now += REFUSAL_WINDOW_SECONDS * 1.1
    assert activity.refusals_by_code() == {}
