"""The rate budget per credential: a sliding window, in memory or in Redis.

Publer allows 100 requests per 2 minutes per user account, across all its keys. The proxy
spends that budget locally and answers 429 itself before Publer would, so one noisy app
cannot lock every other app out of the shared key. Publer's own X-RateLimit-Remaining and
X-RateLimit-Reset re-sync the budget: when Publer has counted more than we have (another
client of the same account), its Remaining becomes a ceiling until its reset.

With `redis_url`, every replica spends one budget: the window is a sorted set per
credential and the ceiling a counter beside it, changed only by Lua scripts (atomic),
timed by the Redis server's clock.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from proxy.settings import RateLimitSettings

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Grant:
    """The outcome of one attempt to spend from the budget."""

    allowed: bool
    remaining: int
    retry_after: float  # seconds until a slot frees up, when not allowed


class Budget(Protocol):
    """A budget of `requests` per `per_seconds` for each credential."""

    async def take(self, credential: str) -> Grant:
        """Spend one request if the window allows it."""
        ...

    async def sync(self, credential: str, remaining: int, reset_seconds: float) -> None:
        """Believe Publer when it has fewer requests left than we count."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass
class _Ceiling:
    """What Publer said is left of its own window: `left` requests until `until`."""

    left: int
    until: float


def _ceiling_seconds(reset_seconds: float, period: float) -> float | None:
    """How long to believe Publer's Remaining: until its reset, never past our own
    window, and not at all for a reset that is not a finite number."""
    if not math.isfinite(reset_seconds) or reset_seconds <= 0:
        return None
    return min(reset_seconds, period)


class MemoryBudget:
    """A sliding-window log per credential, for one process, under a ceiling taken from
    Publer's headers when Publer has counted more than we have.

    The ceiling is one number per credential, not placeholder entries in the log: the gap
    between our limit and Publer's Remaining can be as large as the configured limit.
    """

    def __init__(self, settings: RateLimitSettings) -> None:
        self._limit = settings.requests
        self._period = settings.per_seconds
        self._windows: dict[str, deque[float]] = {}
        self._ceilings: dict[str, _Ceiling] = {}

    def _window(self, credential: str, now: float) -> deque[float]:
        window = self._windows.setdefault(credential, deque())
        horizon = now - self._period
        while window and window[0] <= horizon:
            window.popleft()
        return window

    def _ceiling(self, credential: str, now: float) -> _Ceiling | None:
        ceiling = self._ceilings.get(credential)
        if ceiling is not None and ceiling.until <= now:
            del self._ceilings[credential]
            return None
        return ceiling

    async def take(self, credential: str) -> Grant:
        now = time.monotonic()
        window = self._window(credential, now)
        ceiling = self._ceiling(credential, now)
        if ceiling is not None and ceiling.left <= 0:
            return Grant(False, 0, ceiling.until - now)
        if len(window) >= self._limit:
            return Grant(False, 0, window[0] + self._period - now)
        window.append(now)
        remaining = self._limit - len(window)
        if ceiling is not None:
            ceiling.left -= 1
            remaining = min(remaining, ceiling.left)
        return Grant(True, remaining, 0.0)

    async def sync(self, credential: str, remaining: int, reset_seconds: float) -> None:
        seconds = _ceiling_seconds(reset_seconds, self._period)
        if seconds is None:
            return
        now = time.monotonic()
        left = max(remaining, 0)
        if left >= self._limit - len(self._window(credential, now)):
            return
        ceiling = self._ceiling(credential, now)
        if ceiling is None or left < ceiling.left:
            self._ceilings[credential] = _Ceiling(left, now + seconds)

    async def close(self) -> None:
        return None

    def adopt(self, previous: MemoryBudget) -> None:
        """Carry on the windows of the budget this one replaces (a config reload), so a
        changed limit does not forget what was already spent."""
        self._windows = previous._windows
        self._ceilings = previous._ceilings


_TAKE = """
local key, ceiling_key = KEYS[1], KEYS[2]
local limit, period, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ceiling = tonumber(redis.call('GET', ceiling_key))
if ceiling and ceiling <= 0 then
  return {0, 0, tostring(math.max(redis.call('PTTL', ceiling_key), 0) / 1000)}
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, math.ceil(period * 1000))
  local remaining = limit - count - 1
  if ceiling then
    remaining = math.min(remaining, redis.call('DECR', ceiling_key))
  end
  return {1, remaining, '0'}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, 0, tostring(tonumber(oldest[2]) + period - now)}
"""

_SYNC = """
local key, ceiling_key = KEYS[1], KEYS[2]
local limit, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local left, milliseconds = math.max(tonumber(ARGV[3]), 0), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
if left >= limit - redis.call('ZCARD', key) then
  return 0
end
local ceiling = tonumber(redis.call('GET', ceiling_key))
if ceiling and ceiling <= left then
  return 0
end
-- DECR in _TAKE keeps this expiry: the ceiling lasts until Publer's reset.
redis.call('SET', ceiling_key, left, 'PX', milliseconds)
return 1
"""


class RedisBudget:
    """One sliding window per credential in Redis, shared by every replica.

    When Redis cannot be reached, each replica falls back to its own in-memory window:
    neither failing open (no limit at all) nor closed (no traffic at all).
    """

    def __init__(self, settings: RateLimitSettings, url: str) -> None:
        # Imported here: the client costs 6 MiB of RSS that a single replica never needs.
        from redis.asyncio import Redis
        from redis.exceptions import RedisError

        self._error: type[RedisError] = RedisError
        self._limit = settings.requests
        self._period = settings.per_seconds
        self._redis: Redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._take = self._redis.register_script(_TAKE)
        self._sync = self._redis.register_script(_SYNC)
        self._fallback = MemoryBudget(settings)
        self._degraded = False

    def _note(self, error: RedisError | None) -> None:
        if error is not None and not self._degraded:
            log.warning(
                "rate_limit_redis_unavailable",
                error=type(error).__name__,
                fallback="per-process budget",
            )
        elif error is None and self._degraded:
            log.info("rate_limit_redis_recovered")
        self._degraded = error is not None

    @staticmethod
    def _keys(credential: str) -> list[str]:
        # One hash tag for both keys: a Redis Cluster keeps them in one slot, as a
        # script that touches both needs.
        window = f"publer-proxy:budget:{{{credential}}}"
        return [window, f"{window}:ceiling"]

    async def take(self, credential: str) -> Grant:
        try:
            allowed, remaining, retry_after = await self._take(
                keys=self._keys(credential),
                args=[self._limit, self._period, uuid.uuid4().hex],
            )
        except self._error as exc:
            self._note(exc)
            return await self._fallback.take(credential)
        self._note(None)
        return Grant(bool(allowed), int(remaining), float(retry_after))

    async def sync(self, credential: str, remaining: int, reset_seconds: float) -> None:
        seconds = _ceiling_seconds(reset_seconds, self._period)
        if seconds is None:
            return
        try:
            await self._sync(
                keys=self._keys(credential),
                args=[self._limit, self._period, remaining, math.ceil(seconds * 1000)],
            )
        except self._error as exc:
            self._note(exc)
            await self._fallback.sync(credential, remaining, reset_seconds)

    async def close(self) -> None:
        await self._redis.aclose()


def make_budget(settings: RateLimitSettings) -> Budget:
    """The Redis budget when `redis_url` is set, else the in-process one."""
    if settings.redis_url:
        return RedisBudget(settings, settings.redis_url)
    return MemoryBudget(settings)


async def spend(budget: Budget, credential: str, max_wait: float) -> Grant:
    """Take from the budget, queueing up to `max_wait` seconds for a slot to free up."""
    deadline = time.monotonic() + max_wait
    while True:
        grant = await budget.take(credential)
        if grant.allowed:
            return grant
        left = deadline - time.monotonic()
        if grant.retry_after > left:
            return grant
        await asyncio.sleep(max(grant.retry_after, 0.01))


def retry_after_header(grant: Grant) -> int:
    """Whole seconds for the Retry-After header, at least 1."""
    return max(1, math.ceil(grant.retry_after))
