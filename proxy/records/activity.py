"""The proxy's recent refusals, by code and the last few, as the status page shows them.

Counts live in a ring of time buckets per refusal code, so memory is bounded by the
refusal codes, never by traffic. A window is summed from its buckets: the figure lags the
exact sliding window by at most one bucket (a twelfth of the window).

Each client's use of its share of the budget is not counted here: the budget counts it
(in Redis when replicas share one), and `proxy.budget.stores.window_use` reads it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

BUCKETS_PER_WINDOW = 12
REFUSAL_WINDOW_SECONDS = 15 * 60.0
RECENT_REFUSALS = 20


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
    """Recent refusals; one per process, shared by every config generation so that a
    reload keeps the counts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._refusals = _Counts(REFUSAL_WINDOW_SECONDS)
        self._recent: deque[Refused] = deque(maxlen=RECENT_REFUSALS)

    def refused(
        self, code: str, status: int, route: str | None, client: str | None, request_id: str
    ) -> None:
        """The proxy answered a request with one of its own refusals."""
        self._refusals.add(code, self._clock())
        self._recent.append(Refused(time.time(), code, status, route, client, request_id))

    def refusals_by_code(self) -> dict[str, int]:
        """Refusals in the last `REFUSAL_WINDOW_SECONDS`, by code, largest first."""
        now = self._clock()
        counts = {str(code): self._refusals.total(code, now) for code in self._refusals.names()}
        return dict(sorted(((c, n) for c, n in counts.items() if n), key=lambda i: -i[1]))

    def recent_refusals(self) -> list[Refused]:
        """The last `RECENT_REFUSALS` refusals, newest first."""
        return list(reversed(self._recent))
