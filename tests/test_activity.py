"""Per-client use and recent refusals, as the status page counts them (pure, on a clock
the test moves)."""

from __future__ import annotations

from proxy.activity import BUCKETS_PER_WINDOW, RECENT_REFUSALS, REFUSAL_WINDOW_SECONDS, Activity


class Clock:
    """A monotonic clock the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_use_is_counted_per_client_over_the_window() -> None:
    """Each (route, client) counts its own requests; they leave the count one window later,
    give or take one bucket."""
    clock = Clock()
    activity = Activity(120.0, clock)
    for _ in range(3):
        activity.spent("team", "a")
    activity.spent("team", "b")
    activity.spent("open", None)
    clock.now += 60
    activity.spent("team", "a")
    assert (activity.used("team", "a"), activity.used("team", "b")) == (4, 1)
    assert activity.used("open", None) == 1
    assert activity.used("team", "nobody") == 0
    clock.now += 60 + 120 / BUCKETS_PER_WINDOW
    assert activity.used("team", "a") == 1  # only the later one is left
    clock.now += 120
    assert activity.used("team", "a") == 0


def test_memory_is_bounded_by_names_not_traffic() -> None:
    """A client sending for a long time keeps at most one bucket per twelfth of a window."""
    clock = Clock()
    activity = Activity(120.0, clock)
    for _ in range(5000):
        activity.spent("team", "a")
        clock.now += 0.5
    ring = activity._spent._rings[("team", "a")]
    assert len(ring) == BUCKETS_PER_WINDOW
    assert activity.used("team", "a") <= 240 and activity.used("team", "a") >= 220


def test_refusals_by_code_and_the_most_recent() -> None:
    """Refusals are counted by code over 15 minutes, largest first; the last 20 are kept,
    newest first."""
    clock = Clock()
    activity = Activity(120.0, clock)
    for n in range(25):
        activity.refused("scope_denied" if n % 5 else "no_route", 403, "team", "a", f"id{n}")
    assert activity.refusals_by_code() == {"scope_denied": 20, "no_route": 5}
    recent = activity.recent_refusals()
    assert len(recent) == RECENT_REFUSALS
    assert [r.request_id for r in recent[:2]] == ["id24", "id23"]
    clock.now += REFUSAL_WINDOW_SECONDS * 1.1
    assert activity.refusals_by_code() == {}


def test_a_new_window_width_starts_the_counts_over() -> None:
    """A reload that changes the rate window resizes the counts; the same width keeps them."""
    activity = Activity(120.0, Clock())
    activity.spent("team", "a")
    activity.resize(120.0)
    assert activity.used("team", "a") == 1
    activity.resize(60.0)
    assert activity.used("team", "a") == 0
