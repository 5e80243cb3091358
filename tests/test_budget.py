"""The rate budget and the metrics that count it, over real processes."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.bao import Bao, free_port
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy, start_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, without persistence."""
    redis = start_redis(tmp_path_factory.mktemp("redis"))
    yield redis.url
    redis.stop()


def _budget_config(
    bao: Bao, sandbox: Sandbox, token_file: Path, **rate: object
) -> dict[str, object]:
    config = proxy_config(bao.url, sandbox.url, token_file=token_file)
    config["rate_limit"] = {"requests": 10, "per_seconds": 60, **rate}
    return config


def metric(proxy: Proxy, name: str, **labels: str) -> float:
    """The value of one sample of the proxy's /metrics."""
    text = httpx.get(f"{proxy.url}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_local_429_before_publer(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """Past the budget the proxy answers 429 rate_limited itself, with Retry-After and
    Publer's own error field; Publer saw only the budget's worth; metrics add up."""
    proxy = start_proxy(tmp_path, _budget_config(bao, sandbox, token_file))
    try:
        sandbox.clear()
        answers = [httpx.get(f"{proxy.url}/api/v1/posts") for _ in range(15)]
        statuses = [a.status_code for a in answers]
        assert statuses == [200] * 10 + [429] * 5
        refused = answers[-1]
        assert refused.json()["code"] == "rate_limited"
        assert refused.json()["error"] == "Rate limit exceeded. Retry later."
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-publer-proxy-error"] == "rate_limited"
        # The headers clients read from Publer's own 429 to know when to come back.
        assert refused.headers["x-ratelimit-limit"] == "10"
        assert refused.headers["x-ratelimit-remaining"] == "0"
        reset = int(refused.headers["x-ratelimit-reset"])
        assert time.time() <= reset <= time.time() + 61
        assert len(sandbox.requests()) == 10
        assert metric(proxy, "publer_proxy_requests_total", status="200") == 10
        assert metric(proxy, "publer_proxy_requests_total", status="429") == 5
        assert metric(proxy, "publer_proxy_refusals_total", code="rate_limited") == 5
        assert metric(proxy, "publer_proxy_rate_limit_remaining", credential="publer") == 0
        assert metric(proxy, "publer_proxy_upstream_latency_seconds_count") == 10
        assert (
            metric(proxy, "publer_proxy_vault_operations_total", operation="read", outcome="ok")
            >= 1
        )
        assert metric(proxy, "publer_proxy_key_age_seconds", credential="publer") > 0
    finally:
        proxy.stop()


def test_queueing_waits_for_budget(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """With max_wait_seconds, a request past the budget waits for a slot instead of 429."""
    config = _budget_config(bao, sandbox, token_file, requests=2, per_seconds=1, max_wait_seconds=3)
    proxy = start_proxy(tmp_path, config)
    try:
        started = time.monotonic()
        statuses = [httpx.get(f"{proxy.url}/api/v1/posts").status_code for _ in range(4)]
        assert statuses == [200] * 4
        assert time.monotonic() - started >= 0.9  # the third had to wait for the window
    finally:
        proxy.stop()


def test_publer_headers_resync_the_budget(
    tmp_path: Path,
    bao: Bao,
    token_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    api_key: str,
) -> None:
    """When Publer says fewer requests are left than the proxy counted (another client of
    the same account), the proxy believes Publer."""
    from tests.servers import start_sandbox

    strict = start_sandbox(tmp_path_factory.mktemp("strict"), api_key, rate_limit=5)
    # Another client of the account spends 3 of Publer's 5 directly.
    for _ in range(3):
        httpx.get(
            f"{strict.url}/api/v1/posts",
            headers={
                "Authorization": f"Bearer-API {api_key}",
                "Publer-Workspace-Id": "5f8d7a62c9e77e001f36e3a1",
            },
        )
    config = _budget_config(bao, strict, token_file, requests=100, per_seconds=120)
    proxy = start_proxy(tmp_path, config)
    try:
        statuses = [httpx.get(f"{proxy.url}/api/v1/posts").status_code for _ in range(4)]
        assert statuses[:2] == [200, 200]
        assert statuses[2:] == [429, 429]
        refused = httpx.get(f"{proxy.url}/api/v1/posts")
        assert refused.headers["x-publer-proxy-error"] == "rate_limited"
        # The sandbox saw 3 direct + 2 through the proxy: never past its limit.
        assert len(strict.requests()) == 5
    finally:
        proxy.stop()
        strict.stop()


def test_two_replicas_share_one_budget_in_redis(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox, redis_url: str
) -> None:
    """Two proxies with one redis_url never send more than the budget in total."""
    config_a = _budget_config(bao, sandbox, token_file, requests=25, redis_url=redis_url)
    config_b = _budget_config(bao, sandbox, token_file, requests=25, redis_url=redis_url)
    first = start_proxy(tmp_path / "a", config_a)
    second = start_proxy(tmp_path / "b", config_b)
    try:
        sandbox.clear()

        def burst(proxy: Proxy) -> list[int]:
            with httpx.Client() as client:
                return [client.get(f"{proxy.url}/api/v1/posts").status_code for _ in range(30)]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(burst, [first, second, first, second]))
        statuses = [s for r in results for s in r]
        assert statuses.count(200) == 25
        assert statuses.count(429) == len(statuses) - 25
        assert len(sandbox.requests()) == 25
    finally:
        first.stop()
        second.stop()


def test_redis_ceiling_under_a_huge_limit(redis_url: str) -> None:
    """In Redis too, Publer's lower Remaining is one counter with Publer's reset as its
    expiry: a limit of a billion adds no members to the window (once it added one per
    missing request, in a Lua loop that blocked Redis)."""
    import asyncio

    import redis

    from proxy.budget.shares import Share
    from proxy.budget.stores import RedisBudget
    from proxy.config.settings import RateLimitSettings

    settings = RateLimitSettings(requests=1_000_000_000, per_seconds=120, redis_url=redis_url)

    async def scenario() -> list[tuple[bool, int, float]]:
        budget = RedisBudget(settings, redis_url)
        try:
            await budget.take(Share(credential="huge", route="r", client="anonymous"))
            await budget.sync("huge", remaining=50, reset_seconds=30)  # lowers the ceiling
            await budget.sync("huge", remaining=2, reset_seconds=30)
            await budget.sync("huge", remaining=40, reset_seconds=30)  # higher: ignored
            grants = [
                await budget.take(Share(credential="huge", route="r", client="anonymous"))
                for _ in range(3)
            ]
            return [(g.allowed, g.remaining, g.retry_after) for g in grants]
        finally:
            await budget.close()

    grants = asyncio.run(scenario())
    assert [(allowed, remaining) for allowed, remaining, _ in grants[:2]] == [
        (True, 1),
        (True, 0),
    ]
    allowed, _, retry_after = grants[2]
    assert not allowed
    assert 29 < retry_after <= 30
    client = redis.Redis.from_url(redis_url)
    try:
        window = "publer-proxy:budget:{huge}"
        assert client.zcard(window) == 3
        assert 29_000 < client.pttl(f"{window}:ceiling") <= 30_000
    finally:
        client.close()


def test_large_budget_resyncs_in_flat_memory(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A budget far above Publer's own (the sandbox sends X-RateLimit-* on every answer)
    keeps the proxy's memory flat through many re-syncs."""
    from tests.test_streaming import rss_bytes

    config = _budget_config(bao, sandbox, token_file, requests=10_000_000, per_seconds=120)
    proxy = start_proxy(tmp_path, config)
    try:
        with httpx.Client() as client:
            client.get(f"{proxy.url}/api/v1/posts")
            before = rss_bytes(proxy.process.pid)
            statuses = [client.get(f"{proxy.url}/api/v1/posts").status_code for _ in range(30)]
        growth_mib = (rss_bytes(proxy.process.pid) - before) / 2**20
        assert statuses == [200] * 30
        assert growth_mib < 10, f"RSS grew {growth_mib:.1f} MiB over 30 requests"
    finally:
        proxy.stop()


def test_redis_down_falls_back_to_a_local_budget(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """With Redis unreachable the proxy keeps serving under a per-process budget, never
    unlimited and never a 500."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = start_proxy(tmp_path, _budget_config(bao, sandbox, token_file, redis_url=dead))
    try:
        statuses = [httpx.get(f"{proxy.url}/api/v1/posts").status_code for _ in range(12)]
        assert statuses == [200] * 10 + [429] * 2
        assert any(e.get("event") == "rate_limit_redis_unavailable" for e in proxy.events())
    finally:
        proxy.stop()


def _seed_old_window(url: str, credential: str) -> None:
    """Make Redis look like it has held the budget for long: its epoch key is old."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        seconds, _ = client.time()
        client.set(f"publer-proxy:budget:{{{credential}}}:epoch", f"seed:{seconds - 10_000}")
    finally:
        client.close()


def test_redis_lost_and_restarted_empty_keeps_one_budget(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """Two replicas with Redis stopped and restarted empty grant, within one window, at
    most the budget plus each replica's part while Redis was away: here 10 + 5, where
    each replica once spent a fresh budget of its own before and after the restart."""
    redis_server = start_redis(tmp_path / "redis")
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    _seed_old_window(redis_server.url, "publer")
    rate = {"requests": 10, "per_seconds": 300, "redis_url": redis_server.url, "replicas": 2}
    first = start_proxy(tmp_path / "a", _budget_config(bao, sandbox, token_file, **rate))
    second = start_proxy(tmp_path / "b", _budget_config(bao, sandbox, token_file, **rate))

    def granted(proxy: Proxy, count: int) -> int:
        with httpx.Client() as client:
            statuses = [client.get(f"{proxy.url}/api/v1/posts").status_code for _ in range(count)]
        assert set(statuses) <= {200, 429}, statuses
        return statuses.count(200)

    try:
        sandbox.clear()
        assert (granted(first, 12), granted(second, 2)) == (10, 0)
        redis_server.stop()
        # Alone, each replica spends up to its part (10 // 2) on its own count, which
        # holds what it granted through Redis before.
        assert (granted(first, 5), granted(second, 8)) == (0, 5)
        redis_server = start_redis(tmp_path / "redis-again", port=port)
        assert (granted(second, 5), granted(first, 5)) == (0, 0)
        assert len(sandbox.requests()) == 15
        assert any(e.get("event") == "rate_limit_redis_new_window" for e in first.events())
    finally:
        first.stop()
        second.stop()
        redis_server.stop()


def test_a_replica_idle_through_the_outage_spends_its_part_only(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A replica that saw nothing of the outage finds the window Redis lost by its epoch
    and spends only its part until that window is over, not a whole fresh budget."""
    redis_server = start_redis(tmp_path / "redis")
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    _seed_old_window(redis_server.url, "publer")
    rate = {"requests": 10, "per_seconds": 300, "redis_url": redis_server.url, "replicas": 2}
    first = start_proxy(tmp_path / "a", _budget_config(bao, sandbox, token_file, **rate))
    second = start_proxy(tmp_path / "b", _budget_config(bao, sandbox, token_file, **rate))
    try:
        sandbox.clear()
        with httpx.Client() as client:
            spent = [client.get(f"{first.url}/api/v1/posts").status_code for _ in range(10)]
            assert spent == [200] * 10
            redis_server.stop()
            redis_server = start_redis(tmp_path / "redis-again", port=port)
            later = [client.get(f"{second.url}/api/v1/posts").status_code for _ in range(10)]
            again = [client.get(f"{first.url}/api/v1/posts").status_code for _ in range(3)]
        assert later == [200] * 5 + [429] * 5
        assert again == [429] * 3
        assert len(sandbox.requests()) == 15
    finally:
        first.stop()
        second.stop()
        redis_server.stop()
