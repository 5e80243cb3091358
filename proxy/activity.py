"""Recent traffic as the status page shows it: each client's use of the budget in the
current window, and the proxy's recent refusals by code.

Counts live in a ring of time buckets per key (a route and client pair, or a refusal
code), so memory is bounded by the names in the config and the refusal codes, never by
traffic. A window is summed from its buckets: the figure lags the exact sliding window by
at most one bucket (a twelfth of the window).

Per-client shares of a credential's budget are the budget's to tell: a budget that
implements `ReportsShares` gives the status page each client's share and use; without
one, the page shows each client's use against the credential's whole budget.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

BUCKETS_PER_WINDOW = 12
REFUSAL_WINDOW_SECONDS = 15 * 60.0
RECENT_REFUSALS = 20


@dataclass(frozen=True)
class ShareUse:
    """One client's part of a credential's budget in the current window.

    `share` is what the client may spend in the window (its weighted part, or its hard
    cap when that is lower); `used` what it spent; `cap` its hard cap, if it has one.
    `client` is None for the requests of an open route (no client authentication).
    """

    credential: str
    route: str
    client: str | None
    used: int
    share: float
    cap: int | None = None


@runtime_checkable
class ReportsShares(Protocol):
    """A budget that knows each client's share; the status page asks it when it can."""

    async def share_usage(self) -> Sequence[ShareUse]:
        """Every configured client's share and use in the current window."""
        ...


class _Counts:
    """Counts per key over a sliding window, in `BUCKETS_PER_WINDOW` buckets."""

    def __init__(self, window_seconds: float) -> None:
        self._width = window_seconds / BUCKETS_PER_WINDOW
        self._rings: dict[object, deque[list[int]]] = {}  # key -> [bucket number, count]

    def add(self, key: object, now: float) -> None:
        bucket = math.floor(now / self._width)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = deque(maxlen=BUCKETS_PER_WINDOW)
        if ring and ring[-1][0] == bucket:
            ring[-1][1] += 1
        else:
            ring.append([bucket, 1])

    def total(self, key: object, now: float) -> int:
        ring = self._rings.get(key)
        if not ring:
            return 0
        oldest = math.floor(now / self._width) - BUCKETS_PER_WINDOW + 1
        return sum(count for bucket, count in ring if bucket >= oldest)

    def names(self) -> list[object]:
        return list(self._rings)


@dataclass(frozen=True)
class Refused:
    """One refusal, as the status page lists it (no path, no header: nothing a client
    sent but the names the config gave it)."""

    at: float  # time.time()
    code: str
    status: int
    route: str | None
    client: str | None
    request_id: str


class Activity:
    """Per-client use of the budget and recent refusals; one per process, shared by every
    config generation so that a reload keeps the counts."""

    def __init__(self, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_seconds = window_seconds
        self._clock = clock
        self._spent = _Counts(window_seconds)
        self._refusals = _Counts(REFUSAL_WINDOW_SECONDS)
        self._recent: deque[Refused] = deque(maxlen=RECENT_REFUSALS)

    def resize(self, window_seconds: float) -> None:
        """Follow a reloaded rate window; counts start over at the new width."""
        if window_seconds != self.window_seconds:
            self.window_seconds = window_seconds
            self._spent = _Counts(window_seconds)

    def spent(self, route: str, client: str | None) -> None:
        """A request of `client` on `route` spent one unit of its credential's budget."""
        self._spent.add((route, client), self._clock())

    def refused(
        self, code: str, status: int, route: str | None, client: str | None, request_id: str
    ) -> None:
        """The proxy answered a request with one of its own refusals."""
        self._refusals.add(code, self._clock())
        self._recent.append(Refused(time.time(), code, status, route, client, request_id))

    def used(self, route: str, client: str | None) -> int:
        """What `client` on `route` spent in the current window."""
        return self._spent.total((route, client), self._clock())

    def refusals_by_code(self) -> dict[str, int]:
        """Refusals in the last `REFUSAL_WINDOW_SECONDS`, by code, largest first."""
        now = self._clock()
        counts = {str(code): self._refusals.total(code, now) for code in self._refusals.names()}
        return dict(sorted(((c, n) for c, n in counts.items() if n), key=lambda i: -i[1]))

    def recent_refusals(self) -> list[Refused]:
        """The last `RECENT_REFUSALS` refusals, newest first."""
        return list(reversed(self._recent))
