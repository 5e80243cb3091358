"""Two clients on one key, one flooding: the other still gets its weighted share, through
one proxy and through two replicas sharing a real redis-server."""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.rules.policy import hash_token
from tests.bao import Bao
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy, start_redis
from tests.test_budget import metric

FLOOD_TOKEN = "flood-" + secrets.token_hex(8)
QUIET_TOKEN = "quiet-" + secrets.token_hex(8)
REQUESTS, PER_SECONDS = 20, 2.0
RUN_SECONDS = 8.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


def _config(
    bao: Bao, sandbox: Sandbox, token_file: Path, flood_weight: int, **rate: Any
) -> dict[str, Any]:
    routes = [
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "workspace_id": "5f8d7a62c9e77e001f36e3a1",
            "scopes": ["posts"],
            "clients": [
                {"name": "flood", "token_sha256": hash_token(FLOOD_TOKEN), "weight": flood_weight},
                {"name": "quiet", "token_sha256": hash_token(QUIET_TOKEN)},
            ],
        }
    ]
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, routes=routes)
    config["rate_limit"] = {"requests": REQUESTS, "per_seconds": PER_SECONDS, **rate}
    return config


def _run(flood_targets: list[Proxy], quiet_target: Proxy) -> dict[str, Any]:
    """Flood from four threads per target from the start; the other client asks from two
    threads once the flood got its first answer. Counts what each got in the second half
    of the run.

    Both ask far more than their share, so the outcome does not depend on how fast this
    machine answers; and the flood asks twice as often, so a first-come budget without
    shares would leave the other client well under its share."""
    start = time.monotonic()
    half = start + RUN_SECONDS / 2
    got: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    refusals: list[httpx.Response] = []
    lock = threading.Lock()
    flood_answered = threading.Event()

    def client(proxy: Proxy, token: str, name: str, pause: float) -> None:
        if name != "flood":  # the other client comes once the flood was served
            flood_answered.wait(60)
        headers = {"Authorization": f"Bearer-API {token}"}
        with httpx.Client(headers=headers) as http:
            while time.monotonic() - start < RUN_SECONDS:
                answer = http.get(f"{proxy.url}/team/api/v1/posts")
                if name == "flood":
                    flood_answered.set()
                with lock:
                    if time.monotonic() < half:
                        continue  # the flood alone had the budget at first: not counted
                    asked[name] += 1
                    if answer.status_code == 200:
                        got[name] += 1
                    elif answer.status_code == 429 and name == "flood" and len(refusals) < 200:
                        refusals.append(answer)
                time.sleep(pause)  # a yield to the other threads (pause 0)

    threads = [
        threading.Thread(target=client, args=(proxy, FLOOD_TOKEN, "flood", 0.0))
        for proxy in flood_targets
        for _ in range(4)
    ]
    threads += [
        threading.Thread(target=client, args=(quiet_target, QUIET_TOKEN, "quiet", 0.0))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"got": got, "asked": asked, "refusals": refusals}


def _check_shares(result: dict[str, Any], flood_weight: int) -> None:
    got, asked = result["got"], result["asked"]
    windows = (RUN_SECONDS / 2) / PER_SECONDS
    share = REQUESTS / (flood_weight + 1)
    # The steady client gets at least its share, or all it asked for when a busy machine
    # let it ask less (a little slack for the window edges), and the flood takes what it
    # leaves; the budget, not this machine's speed, is what is measured.
    quiet_due = min(share * windows, asked["quiet"])
    assert got["quiet"] >= quiet_due * 0.85 - 1, (got, asked)
    total_due = min(REQUESTS * windows, asked["flood"] + asked["quiet"])
    assert got["flood"] + got["quiet"] >= total_due * 0.85 - 1, (got, asked)
    assert got["flood"] + got["quiet"] <= REQUESTS * (windows + 1), got


def _check_refusals(result: dict[str, Any]) -> None:
    refused = result["refusals"]  # the flood's only: the other client may pass its share too
    assert refused, "the flood was never refused"
    by_limit = Counter(answer.json()["limit"] for answer in refused)
    assert by_limit["client_share"] > 0, by_limit
    sample = next(a for a in refused if a.json()["limit"] == "client_share")
    body = sample.json()
    assert body["code"] == "rate_limited"
    assert body["error"] == "Rate limit exceeded. Retry later."
    assert "client 'flood' on route 'team' has used its share" in body["errors"][0]
    assert sample.headers["x-publer-proxy-error"] == "rate_limited"
    assert int(sample.headers["retry-after"]) >= 1
    assert sample.headers["x-ratelimit-limit"] == str(REQUESTS)
    assert sample.headers["x-ratelimit-remaining"] == "0"
    assert int(sample.headers["x-ratelimit-reset"]) > time.time() - 60


@pytest.mark.parametrize("flood_weight", [1, 3])
def test_one_proxy_keeps_the_quiet_clients_share(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox, flood_weight: int
) -> None:
    """Through one proxy, a flooding client leaves the other at least its weighted share;
    the flood's 429s say it was its share, and the logs and metrics name both clients."""
    proxy = start_proxy(tmp_path, _config(bao, sandbox, token_file, flood_weight))
    try:
        result = _run([proxy], proxy)
        _check_shares(result, flood_weight)
        _check_refusals(result)
        clients = Counter(event["client"] for event in proxy.access())
        assert set(clients) == {"flood", "quiet"}
        for name in ("flood", "quiet"):
            assert metric(proxy, "publer_proxy_client_requests_total", client=name) > 0
            assert metric(proxy, "publer_proxy_share_requests", client=name) > 0
        assert (
            metric(proxy, "publer_proxy_rate_limited_total", client="flood", limit="client_share")
            > 0
        )
    finally:
        proxy.stop()


def test_two_replicas_keep_the_quiet_clients_share(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox, redis_url: str
) -> None:
    """Two proxies sharing one redis-server: the flood hits both, the quiet client one;
    together they never pass the budget and the quiet client keeps its share."""
    first = start_proxy(tmp_path / "a", _config(bao, sandbox, token_file, 1, redis_url=redis_url))
    second = start_proxy(tmp_path / "b", _config(bao, sandbox, token_file, 1, redis_url=redis_url))
    try:
        result = _run([first, second], second)
        _check_shares(result, 1)
        _check_refusals(result)
    finally:
        first.stop()
        second.stop()


def test_a_cap_is_named_in_the_429(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A client at its cap gets 429 with limit client_cap while the budget has room; the
    other client is still served."""
    config = _config(bao, sandbox, token_file, 1)
    config["routes"][0]["clients"][0]["max_requests"] = 2
    config["rate_limit"] = {"requests": 100, "per_seconds": 60}
    proxy = start_proxy(tmp_path, config)
    try:
        url = f"{proxy.url}/team/api/v1/posts"
        flood = {"Authorization": f"Bearer-API {FLOOD_TOKEN}"}
        statuses = [httpx.get(url, headers=flood).status_code for _ in range(2)]
        capped = httpx.get(url, headers=flood)
        assert statuses == [200, 200]
        assert capped.status_code == 429
        assert capped.json()["limit"] == "client_cap"
        assert "client 'flood' on route 'team' has used its cap of 2" in capped.json()["errors"][0]
        assert capped.headers["x-ratelimit-limit"] == "2"
        quiet = httpx.get(url, headers={"Authorization": f"Bearer-API {QUIET_TOKEN}"})
        assert quiet.status_code == 200
    finally:
        proxy.stop()
