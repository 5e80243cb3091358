"""The rate budget per credential: a sliding window, in memory or in Redis.

Publer allows 100 requests per 2 minutes per user account, across all its keys. The proxy
spends that budget locally and responds 429 itself before Publer would, so one noisy app
cannot lock every other app out of the shared key. Publer's own X-RateLimit-Remaining and
X-RateLimit-Reset re-sync the budget: when Publer has counted more than we have (another
client of the same account), its Remaining becomes a ceiling until its reset.

Within a credential's budget, each request spends for its shareholder (a route's client,
or an open route), which gets its weighted share and may borrow what others leave unused
(`proxy.budget.shares` holds the rule); a request refused says which limit refused it.

With `redis_url`, every replica spends one budget: the window is a sorted set per
credential, beside it one per shareholder and route, the shareholders active in the
window and the ceiling; only Lua scripts (atomic) change them, timed by the Redis
server's clock.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import structlog

from proxy.budget import redis_client as redisclient
from proxy.budget.shares import (
    Limit,
    Share,
    SharePlan,
    ShareUse,
    Standing,
    WindowUse,
    admit_with,
    guarantees,
)
from proxy.config.settings import RateLimitSettings

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Grant:
    """The outcome of one attempt to spend from the budget."""

    allowed: bool
    remaining: int  # requests left in the credential's window
    retry_after: float  # seconds until a slot frees up, when not allowed
    limit: Limit | None = None  # which limit refused it, when not allowed
    used: int = 0  # the shareholder's requests in the window, this one included


@dataclass(frozen=True)
class Usage:
    """Requests granted in a credential's current window: in all, and per shareholder."""

    used: int
    by_share: dict[str, int]  # Share.key -> requests


class Budget(Protocol):
    """A budget of `requests` per `per_seconds` for each credential, shared fairly."""

    async def take(self, share: Share, *, first: bool = True) -> Grant:
        """Spend one request for `share` if the window and its share allow it.

        `first` is False when the same request asks again after a refusal: its demand
        counts once.
        """
        ...

    async def sync(self, credential: str, remaining: int, reset_seconds: float) -> None:
        """Believe Publer when it has fewer requests left than we count."""
        ...

    async def usage(self, credential: str, shares: Sequence[Share]) -> Usage:
        """The current window's use, read only: nothing is spent or changed."""
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


def _pruned(log: deque[float], horizon: float) -> deque[float]:
    while log and log[0] <= horizon:
        log.popleft()
    return log


def _log(logs: dict[str, deque[float]], key: str, horizon: float) -> deque[float]:
    log = logs.get(key)
    if log is None:
        log = logs[key] = deque()
    return _pruned(log, horizon)


@dataclass
class _Window:
    """One credential's sliding window, and who spent it."""

    total: deque[float] = field(default_factory=deque)
    used: dict[str, deque[float]] = field(default_factory=dict)  # per Share.key
    asked: dict[str, deque[float]] = field(default_factory=dict)  # refused, not yet served
    routes: dict[str, deque[float]] = field(default_factory=dict)
    active: dict[str, tuple[float, Share]] = field(default_factory=dict)  # last asked
    _guarantees: dict[str, float] | None = None  # of the active, until they change

    def touch(self, share: Share, now: float) -> None:
        """Note that `share` asked now."""
        previous = self.active.get(share.key)
        if previous is None or previous[1] is not share:
            self._guarantees = None
        self.active[share.key] = (now, share)

    def forget_idle(self, horizon: float) -> None:
        """Drop shareholders that asked nothing in the window (their logs are empty)."""
        for key in [k for k, (last, _) in self.active.items() if last <= horizon]:
            del self.active[key]
            self.used.pop(key, None)
            self.asked.pop(key, None)
            self._guarantees = None

    def forget_guarantees(self) -> None:
        """Compute the guarantees again on the next request (the limit changed)."""
        self._guarantees = None

    def guarantees(self, limit: int) -> dict[str, float]:
        """The active shareholders' guarantees, computed again only when they change."""
        if self._guarantees is None:
            self._guarantees = guarantees((s for _, s in self.active.values()), limit)
        return self._guarantees


class MemoryBudget:
    """A sliding-window log per credential, for one process, under a ceiling taken from
    Publer's headers when Publer has counted more than we have.

    The ceiling is one number per credential, not placeholder entries in the log: the gap
    between our limit and Publer's Remaining can be as large as the configured limit.
    """

    def __init__(self, settings: RateLimitSettings) -> None:
        self._limit = settings.requests
        self._period = settings.per_seconds
        self._windows: dict[str, _Window] = {}
        self._ceilings: dict[str, _Ceiling] = {}

    def _ceiling(self, credential: str, now: float) -> _Ceiling | None:
        ceiling = self._ceilings.get(credential)
        if ceiling is not None and ceiling.until <= now:
            del self._ceilings[credential]
            return None
        return ceiling

    async def take(self, share: Share, *, first: bool = True) -> Grant:
        now = time.monotonic()
        horizon = now - self._period
        window = self._windows.get(share.credential) or self._windows.setdefault(
            share.credential, _Window()
        )
        total = _pruned(window.total, horizon)
        ceiling = self._ceiling(share.credential, now)
        if ceiling is not None and ceiling.left <= 0:
            return Grant(False, 0, ceiling.until - now, "credential")
        used = _log(window.used, share.key, horizon)
        if share.max_requests is not None and len(used) >= share.max_requests:
            return Grant(False, 0, used[0] + self._period - now, "client_cap", len(used))
        route = _log(window.routes, share.route, horizon)
        if share.route_max_requests is not None and len(route) >= share.route_max_requests:
            return Grant(False, 0, route[0] + self._period - now, "route_cap", len(used))
        window.forget_idle(horizon)
        window.touch(share, now)
        asked = _log(window.asked, share.key, horizon)
        free = self._limit - len(total)
        if ceiling is not None:
            free = min(free, ceiling.left)

        def others() -> list[Standing]:
            return [
                Standing(
                    other,
                    len(_log(window.used, key, horizon)),
                    len(_log(window.asked, key, horizon)),
                )
                for key, (_, other) in window.active.items()
                if key != share.key
            ]

        guarantee = window.guarantees(self._limit)
        refused = admit_with(Standing(share, len(used), len(asked)), others, free, guarantee)
        if refused is None:
            for log in (total, used, route):
                log.append(now)
            if not first and asked:
                asked.popleft()
            remaining = self._limit - len(total)
            if ceiling is not None:
                ceiling.left -= 1
                remaining = min(remaining, ceiling.left)
            return Grant(True, remaining, 0.0, None, len(used))
        if first and len(asked) + len(used) < self._limit:
            asked.append(now)
        retry = total[0] + self._period - now if total else 0.0
        return Grant(False, 0, retry, refused, len(used))

    def record(self, share: Share) -> None:
        """Count a request granted elsewhere (in the shared window) as spent here too."""
        now = time.monotonic()
        horizon = now - self._period
        window = self._windows.setdefault(share.credential, _Window())
        for log in (
            _pruned(window.total, horizon),
            _log(window.used, share.key, horizon),
            _log(window.routes, share.route, horizon),
        ):
            log.append(now)

    async def sync(self, credential: str, remaining: int, reset_seconds: float) -> None:
        seconds = _ceiling_seconds(reset_seconds, self._period)
        if seconds is None:
            return
        now = time.monotonic()
        left = max(remaining, 0)
        window = self._windows.setdefault(credential, _Window())
        if left >= self._limit - len(_pruned(window.total, now - self._period)):
            return
        ceiling = self._ceiling(credential, now)
        if ceiling is None or left < ceiling.left:
            self._ceilings[credential] = _Ceiling(left, now + seconds)

    async def usage(self, credential: str, shares: Sequence[Share]) -> Usage:
        horizon = time.monotonic() - self._period
        window = self._windows.get(credential, _Window())

        def count(log: deque[float] | None) -> int:
            return sum(1 for t in log or () if t > horizon)

        return Usage(count(window.total), {s.key: count(window.used.get(s.key)) for s in shares})

    async def close(self) -> None:
        return None

    def adopt(self, previous: MemoryBudget) -> None:
        """Carry on the windows of the budget this one replaces (a config reload), so a
        changed limit does not forget what was already spent."""
        self._windows = previous._windows
        self._ceilings = previous._ceilings
        for window in self._windows.values():
            window.forget_guarantees()  # they were parts of the old limit


_TAKE = """
local base, ceiling_key, epoch_key = KEYS[1], KEYS[2], KEYS[3]
local limit, period, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local me, route = ARGV[4], ARGV[5]
local route_weight, client_weight = tonumber(ARGV[6]), tonumber(ARGV[7])
local cap, route_cap, first = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10] == '1'
-- Another epoch than the caller knows (or none): Redis lost the window, or the caller
-- has grants Redis never saw. The caller restores them before anything is granted.
local epoch = redis.call('GET', epoch_key)
if not epoch or epoch ~= ARGV[11] then return {-1, 0, '0', '', 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local horizon = now - period
local ttl = math.ceil(period * 1000)
local function count(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
  return redis.call('ZCARD', key)
end
local function frees_in(key)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if oldest[2] then return tonumber(oldest[2]) + period - now end
  return 0
end
local function refuse(retry, limit_hit, used)
  return {0, 0, tostring(math.max(retry, 0)), limit_hit, used}
end
local used_key, asked_key = base .. ':used:' .. me, base .. ':asked:' .. me
local route_key = base .. ':route:' .. route
local active_key, meta_key = base .. ':active', base .. ':meta'
local ceiling = tonumber(redis.call('GET', ceiling_key))
if ceiling and ceiling <= 0 then
  return refuse(redis.call('PTTL', ceiling_key) / 1000, 'credential', 0)
end
local total = count(base)
local used = count(used_key)
if cap > 0 and used >= cap then return refuse(frees_in(used_key), 'client_cap', used) end
if route_cap > 0 and count(route_key) >= route_cap then
  return refuse(frees_in(route_key), 'route_cap', used)
end
-- Shareholders idle for a whole window are forgotten; their logs have expired.
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', active_key, '-inf', horizon)) do
  redis.call('HDEL', meta_key, gone)
end
redis.call('ZREMRANGEBYSCORE', active_key, '-inf', horizon)
redis.call('ZADD', active_key, now, me)
-- Names hold no '|' (letters, digits, '.', '_', '-'): a safe separator.
redis.call('HSET', meta_key, me, table.concat({route, route_weight, client_weight, cap}, '|'))
redis.call('PEXPIRE', active_key, ttl)
redis.call('PEXPIRE', meta_key, ttl)
local asked = count(asked_key)
local free = limit - total
if ceiling then free = math.min(free, ceiling) end
-- The same rule as proxy.budget.shares.admit: guarantees among the active shareholders.
local standing, route_weights, client_weights = {}, {}, {}
for _, key in ipairs(redis.call('ZRANGE', active_key, 0, -1)) do
  local meta = redis.call('HGET', meta_key, key)
  if meta then
    local r, rw, cw, c = string.match(meta, '^(.-)|(.-)|(.-)|(.-)$')
    local s = {key = key, route = r, rw = tonumber(rw), cw = tonumber(cw), cap = tonumber(c)}
    if key == me then
      s.used, s.asked = used, asked
    else
      s.used, s.asked = count(base .. ':used:' .. key), count(base .. ':asked:' .. key)
    end
    standing[#standing + 1] = s
    route_weights[r] = s.rw
    client_weights[r] = (client_weights[r] or 0) + s.cw
  end
end
local weight = 0
for _, w in pairs(route_weights) do weight = weight + w end
local mine, reserved = 0, 0
for _, s in ipairs(standing) do
  local guarantee = limit * (s.rw / weight) * (s.cw / client_weights[s.route])
  if s.key == me then
    mine = guarantee
  else
    if s.cap > 0 then guarantee = math.min(guarantee, s.cap) end
    reserved = reserved + math.max(0, math.min(guarantee - s.used, s.asked + 1))
  end
end
local verdict = ''
if free <= 0 then
  verdict = (#standing > 1 and used >= mine) and 'client_share' or 'credential'
elseif used >= mine and free <= reserved then
  verdict = 'client_share'
end
if verdict == '' then
  for _, key in ipairs({base, used_key, route_key}) do
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, ttl)
  end
  if not first and asked > 0 then redis.call('ZPOPMIN', asked_key) end
  local remaining = limit - total - 1
  if ceiling then
    remaining = math.min(remaining, redis.call('DECR', ceiling_key))
  end
  return {1, remaining, '0', '', used + 1}
end
if first and asked + used < limit then
  redis.call('ZADD', asked_key, now, member)
  redis.call('PEXPIRE', asked_key, ttl)
end
return refuse(frees_in(base), verdict, used)
"""

# The caller's grants of the window, back into it (NX: one Redis still holds keeps its
# time); then the epoch, made when missing, with how long the window it replaces lasts.
_RESTORE = """
local base, epoch_key = KEYS[1], KEYS[2]
local period, fresh = tonumber(ARGV[1]), ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = math.ceil(period * 1000)
for i = 3, #ARGV, 4 do
  local at = now - tonumber(ARGV[i])
  if at > now - period then
    local keys = {base, base .. ':used:' .. ARGV[i + 2], base .. ':route:' .. ARGV[i + 3]}
    for _, key in ipairs(keys) do
      redis.call('ZADD', key, 'NX', at, ARGV[i + 1])
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
redis.call('SET', epoch_key, fresh .. ':' .. now, 'NX')
local epoch = redis.call('GET', epoch_key)
local made = tonumber(string.match(epoch, ':(.*)$'))
return {epoch, tostring(made + period - now)}
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

# Read only: ZCOUNT over the window instead of pruning it.
_USAGE = """
local base, period = KEYS[1], tonumber(ARGV[1])
local t = redis.call('TIME')
local horizon = '(' .. (tonumber(t[1]) + tonumber(t[2]) / 1000000 - period)
local counts = {redis.call('ZCOUNT', base, horizon, '+inf')}
for i = 2, #ARGV do
  counts[i] = redis.call('ZCOUNT', base .. ':used:' .. ARGV[i], horizon, '+inf')
end
return counts
"""


@dataclass(frozen=True)
class _Granted:
    """One request this replica granted: when (monotonic), its member in the Redis window,
    and whose it was."""

    at: float
    member: str
    share: str
    route: str


class RedisBudget:
    """One sliding window per credential in Redis, shared by every replica.

    Each replica also remembers what it granted itself in the current window. While Redis
    cannot be reached it goes on alone, on that count, up to its part of the budget
    (`requests // replicas`): neither failing open (no limit at all) nor closed (no
    traffic at all). A window Redis lost (a restart, a flush) is noticed by its epoch, a
    key made beside the windows that is gone with them: before granting more, a replica
    puts its own grants of the window back, and until the lost window is over each
    replica spends at most its part on its own count too, because what the others granted
    before is gone. So in any window the replicas together grant at most
    `requests + replicas * (requests // replicas)`, about twice the budget, and
    `requests` whenever Redis kept its window.
    """

    def __init__(self, settings: RateLimitSettings, url: str) -> None:
        # Imported here: the client costs 6 MiB of RSS that a single replica never needs.
        from redis.exceptions import RedisError

        self._error: type[RedisError] = RedisError
        self._limit = settings.requests
        self._period = settings.per_seconds
        self._part = max(1, settings.requests // settings.replicas)
        self._redis: Redis = redisclient.connect(url)
        self._take = self._redis.register_script(_TAKE)
        self._restore = self._redis.register_script(_RESTORE)
        self._sync = self._redis.register_script(_SYNC)
        self._usage = self._redis.register_script(_USAGE)
        self._fallback = MemoryBudget(settings.model_copy(update={"requests": self._part}))
        self._granted: dict[str, deque[_Granted]] = {}
        self._epochs: dict[str, str] = {}  # the window's epoch each credential last saw
        self._alone_until: dict[str, float] = {}  # monotonic end of a lost window
        self._degraded = False

    def _note(self, error: RedisError | None) -> None:
        if error is not None and not self._degraded:
            log.warning(
                "rate_limit_redis_unavailable",
                error=type(error).__name__,
                fallback="per-replica part of the budget",
                requests=self._part,
            )
        elif error is None and self._degraded:
            log.info("rate_limit_redis_recovered")
        if error is not None:
            # Grants made meanwhile go back into Redis before the next one there.
            self._epochs.clear()
        self._degraded = error is not None

    @staticmethod
    def _keys(credential: str) -> list[str]:
        # One hash tag for every key of a credential: a Redis Cluster keeps them in one
        # slot, as a script that touches them all needs.
        window = f"publer-proxy:budget:{{{credential}}}"
        return [window, f"{window}:ceiling", f"{window}:epoch"]

    def _mine(self, credential: str) -> deque[_Granted]:
        """This replica's grants of the current window, oldest first."""
        granted = self._granted.setdefault(credential, deque())
        horizon = time.monotonic() - self._period
        while granted and granted[0].at <= horizon:
            granted.popleft()
        return granted

    async def _rejoin(self, credential: str) -> None:
        """Put this replica's grants of the window back into Redis, and learn its epoch."""
        now = time.monotonic()
        args: list[str | float] = [self._period, uuid.uuid4().hex]
        for grant in self._mine(credential):
            args += [now - grant.at, grant.member, grant.share, grant.route]
        keys = self._keys(credential)
        epoch, left = await self._restore(keys=[keys[0], keys[2]], args=args)
        self._epochs[credential] = epoch.decode()
        seconds = float(left)
        if seconds > 0:
            # A window made less than a window ago: what the other replicas granted before
            # it may be lost, so this one spends on its own count until that one is over.
            self._alone_until[credential] = now + seconds
            say = log.warning if self._part < self._limit else log.debug
            say(
                "rate_limit_redis_new_window",
                credential=credential,
                seconds=round(seconds, 1),
                requests=self._part,
            )

    async def take(self, share: Share, *, first: bool = True) -> Grant:
        credential = share.credential
        member = uuid.uuid4().hex
        try:
            for _ in range(3):
                if credential not in self._epochs:
                    await self._rejoin(credential)
                if self._alone_until.get(credential, 0) > time.monotonic():
                    mine = self._mine(credential)
                    if len(mine) >= self._part:
                        retry = mine[0].at + self._period - time.monotonic()
                        return Grant(False, 0, retry, "credential")
                allowed, remaining, retry_after, limit, used = await self._take(
                    keys=self._keys(credential),
                    args=[
                        self._limit,
                        self._period,
                        member,
                        share.key,
                        share.route,
                        share.route_weight,
                        share.client_weight,
                        share.max_requests or 0,
                        share.route_max_requests or 0,
                        1 if first else 0,
                        self._epochs.get(credential, ""),
                    ],
                )
                if int(allowed) >= 0:
                    break
                self._epochs.pop(credential, None)
            else:
                raise self._error("the budget's epoch in Redis keeps changing")
        except self._error as exc:
            self._note(exc)
            grant = await self._fallback.take(share, first=first)
            if grant.allowed:
                self._remember(share, member, record=False)
            return grant
        self._note(None)
        if allowed:
            self._remember(share, member, record=True)
        refused = cast("Limit", limit.decode()) if limit else None
        return Grant(bool(allowed), int(remaining), float(retry_after), refused, int(used))

    def _remember(self, share: Share, member: str, *, record: bool) -> None:
        self._mine(share.credential).append(
            _Granted(time.monotonic(), member, share.key, share.route)
        )
        if record:  # the fallback's own take counted it already
            self._fallback.record(share)

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

    async def usage(self, credential: str, shares: Sequence[Share]) -> Usage:
        try:
            counts = await self._usage(
                keys=self._keys(credential)[:1], args=[self._period, *(s.key for s in shares)]
            )
        except self._error as exc:
            self._note(exc)
            return await self._fallback.usage(credential, shares)
        by_share = {s.key: int(n) for s, n in zip(shares, counts[1:], strict=True)}
        return Usage(int(counts[0]), by_share)

    async def close(self) -> None:
        await self._redis.aclose()


def make_budget(settings: RateLimitSettings) -> Budget:
    """The Redis budget when `redis_url` is set, else the in-process one."""
    if settings.redis_url:
        return RedisBudget(settings, settings.redis_url)
    return MemoryBudget(settings)


class Queue:
    """The requests of this process waiting for budget: one line per shareholder.

    Each line is first come, first served (an `asyncio.Lock` wakes its waiters in
    order), and only its head asks the budget again, so a client with a hundred waiting
    requests asks no more often than a client with one; which head gets a slot that
    frees up is the budget's fair-share rule, across every replica.
    """

    def __init__(self) -> None:
        self._lines: dict[str, asyncio.Lock] = {}

    async def spend(self, budget: Budget, share: Share, max_wait: float) -> Grant:
        """Take from the budget for `share`, queueing up to `max_wait` seconds."""
        grant = await budget.take(share)
        if grant.allowed or grant.retry_after > max_wait:
            return grant
        deadline = time.monotonic() + max_wait
        line = self._lines.setdefault(share.key, asyncio.Lock())
        behind = line.locked()
        try:
            async with asyncio.timeout(max_wait):
                await line.acquire()
        except TimeoutError:
            return grant
        try:
            if behind:  # the budget moved on while this request waited in line
                grant = await budget.take(share, first=False)
            while not grant.allowed:
                left = deadline - time.monotonic()
                if grant.retry_after > left:
                    return grant
                # A slot frees up no sooner than retry_after: sleep until then, not less.
                await asyncio.sleep(max(grant.retry_after, 0.005))
                grant = await budget.take(share, first=False)
            return grant
        finally:
            line.release()


def retry_after_header(grant: Grant) -> int:
    """Whole seconds for the Retry-After header, at least 1."""
    return max(1, math.ceil(grant.retry_after))


async def window_use(
    budget: Budget, plan: SharePlan, settings: RateLimitSettings
) -> list[WindowUse]:
    """Each credential's current window and every shareholder's use of it, read only."""
    found: list[WindowUse] = []
    for credential in plan.credentials():
        shares = plan.of_credential(credential)
        usage = await budget.usage(credential, shares)
        nominal = plan.nominal(credential, settings.requests)
        found.append(
            WindowUse(
                credential=credential,
                limit=settings.requests,
                per_seconds=settings.per_seconds,
                used=usage.used,
                shares=tuple(
                    ShareUse(
                        route=s.route,
                        client=s.client,
                        used=usage.by_share.get(s.key, 0),
                        share=nominal[s.key],
                        cap=s.max_requests,
                        route_cap=s.route_max_requests,
                    )
                    for s in shares
                ),
            )
        )
    return found
