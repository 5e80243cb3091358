"""The rate budget per credential (SPEC R1-R3): a sliding window, in memory or in Redis.

Publer allows 100 requests per 2 minutes per user account, across all its keys. The proxy
spends that budget locally and answers 429 itself before Publer would, so one noisy app
cannot lock every other app out of the shared key. Publer's own X-RateLimit-Remaining and
X-RateLimit-Reset re-sync the window: when Publer has counted more than we have (another
client of the same account), we believe Publer.

With `redis_url`, every replica spends one budget: the window is a sorted set per
credential, changed only by Lua scripts (atomic), timed by the Redis server's clock.
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


class MemoryBudget:
    """A sliding-window log per credential, for one process."""

    def __init__(self, settings: RateLimitSettings) -> None:
        self._limit = settings.requests
        self._period = settings.per_seconds
        self._windows: dict[str, deque[float]] = {}

    def _window(self, credential: str, now: float) -> deque[float]:
        window = self._windows.setdefault(credential, deque())
        horizon = now - self._period
        while window and window[0] <= horizon:
            window.popleft()
        return window

    async def take(self, credential: str) -> Grant:
        now = time.monotonic()
        window = self._window(credential, now)
        if len(window) < self._limit:
            window.append(now)
            return Grant(True, self._limit - len(window), 0.0)
        return Grant(False, 0, window[0] + self._period - now)

    async def sync(self, credential: str, remaining: int, reset_seconds: float) -> None:
        now = time.monotonic()
        window = self._window(credential, now)
        missing = self._limit - len(window) - max(remaining, 0)
        if missing <= 0:
            return
        # Placeholders that expire when Publer's window resets.
        expires = now + min(max(reset_seconds, 0.0), self._period) - self._period
        entries = sorted([*window, *([expires] * missing)])
        window.clear()
        window.extend(entries)

    async def close(self) -> None:
        return None


_TAKE = """
local key, limit, period, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, math.ceil(period * 1000))
  return {1, limit - count - 1, '0'}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, 0, tostring(tonumber(oldest[2]) + period - now)}
"""

_SYNC = """
local key, limit, period = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local remaining, reset, prefix = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
local missing = limit - redis.call('ZCARD', key) - math.max(remaining, 0)
local score = now + math.min(math.max(reset, 0), period) - period
for i = 1, missing do
  redis.call('ZADD', key, score, prefix .. i)
end
redis.call('PEXPIRE', key, math.ceil(period * 1000))
return missing
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
    def _key(credential: str) -> str:
        return f"publer-proxy:budget:{credential}"

    async def take(self, credential: str) -> Grant:
        try:
            allowed, remaining, retry_after = await self._take(
                keys=[self._key(credential)],
                args=[self._limit, self._period, uuid.uuid4().hex],
            )
        except self._error as exc:
            self._note(exc)
            return await self._fallback.take(credential)
        self._note(None)
        return Grant(bool(allowed), int(remaining), float(retry_after))

    async def sync(self, credential: str, remaining: int, reset_seconds: float) -> None:
        try:
            await self._sync(
                keys=[self._key(credential)],
                args=[self._limit, self._period, remaining, reset_seconds, uuid.uuid4().hex],
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
