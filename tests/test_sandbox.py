"""The Publer sandbox answers like Publer and records what it received."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from proxy.dev import sandbox
from proxy.dev.sandbox import (
    ALL_SCOPES,
    DEFAULT_WORKSPACE_ID,
    SandboxKey,
    create_app,
    parse_key_spec,
)

KEY = "sandbox-test-key-0001"
AUTH = {"Authorization": f"Bearer-API {KEY}"}
WORKSPACE = {**AUTH, "Publer-Workspace-Id": DEFAULT_WORKSPACE_ID}

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The sandbox runs under uvicorn, so asyncio is the loop that matters."""
    return "asyncio"


def client_for(
    *keys: SandboxKey, rate_limit: int = 100, rate_period_seconds: float = 120.0
) -> httpx.AsyncClient:
    """An in-process client of a fresh sandbox."""
    app = create_app(
        keys or [SandboxKey(KEY)], rate_limit=rate_limit, rate_period_seconds=rate_period_seconds
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A sandbox that accepts KEY with every scope."""
    async with client_for() as client:
        yield client


# --- parse_key_spec ------------------------------------------------------------------------


def test_key_spec_without_scopes_grants_all() -> None:
    """'KEY' alone grants every scope Publer documents."""
    assert parse_key_spec("abc123") == SandboxKey("abc123", ALL_SCOPES)


def test_key_spec_with_scopes_grants_only_those() -> None:
    """'KEY=a,b' grants exactly the scopes listed."""
    assert parse_key_spec("abc123=posts, media").scopes == {"posts", "media"}


@pytest.mark.parametrize("spec", ["", "   ", "abc=", "abc=,", "abc=posts,telepathy", "a b=posts"])
def test_bad_key_specs_are_refused_without_echoing_the_key(spec: str) -> None:
    """Empty keys, empty or unknown scopes are errors whose message never holds the key."""
    with pytest.raises(ValueError, match=r"scope|key") as caught:
        parse_key_spec(spec)
    assert "abc" not in str(caught.value)


# --- authentication, scopes, workspaces --------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": KEY},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer-api {KEY}"},
        {"Authorization": "Bearer-API not-the-key"},
    ],
)
async def test_missing_or_wrong_key_is_401(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """Only 'Authorization: Bearer-API <known key>' is accepted; else 401 with errors."""
    response = await client.get("/api/v1/users/me", headers=headers)
    assert response.status_code == 401
    assert list(response.json()) == ["errors"]


async def test_revoked_key_is_401() -> None:
    """A revoked key is refused like an unknown one."""
    async with client_for(SandboxKey(KEY, revoked=True)) as client:
        assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 401


async def test_missing_workspace_is_403_not_401(client: httpx.AsyncClient) -> None:
    """Endpoints that need Publer-Workspace-Id answer 403 without it."""
    response = await client.get("/api/v1/accounts", headers=AUTH)
    assert response.status_code == 403
    assert "Publer-Workspace-Id" in response.json()["errors"][0]


async def test_workspace_outside_the_key_is_403() -> None:
    """A key limited to some workspaces refuses any other, in the header or the path."""
    async with client_for(SandboxKey(KEY, workspaces=frozenset({"w1"}))) as client:
        other = {**AUTH, "Publer-Workspace-Id": "w2"}
        assert (await client.get("/api/v1/accounts", headers=other)).status_code == 403
        ok = {**AUTH, "Publer-Workspace-Id": "w1"}
        assert (await client.get("/api/v1/accounts", headers=ok)).status_code == 200
        options = "/api/v1/workspaces/w2/media_options"
        assert (await client.get(options, headers=AUTH)).status_code == 403


async def test_endpoint_outside_the_key_scopes_is_403() -> None:
    """A key without the endpoint's scope gets 403 errors."""
    async with client_for(parse_key_spec(f"{KEY}=posts")) as client:
        response = await client.get("/api/v1/analytics/charts", headers=WORKSPACE)
        assert response.status_code == 403
        assert "analytics" in response.json()["errors"][0]
        assert (await client.get("/api/v1/posts", headers=WORKSPACE)).status_code == 200


async def test_unknown_path_is_404_and_wrong_method_405(client: httpx.AsyncClient) -> None:
    """Unknown paths and unsupported methods answer in the errors envelope."""
    missing = await client.get("/api/v1/nothing/here", headers=WORKSPACE)
    assert (missing.status_code, list(missing.json())) == (404, ["errors"])
    wrong = await client.patch("/api/v1/accounts", headers=WORKSPACE)
    assert (wrong.status_code, list(wrong.json())) == (405, ["errors"])
    assert "GET" in wrong.headers["allow"]


# --- rate limit ----------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_publer_body_and_headers() -> None:
    """Past the budget: 429, Publer's exact body, X-RateLimit-* and Retry-After."""
    async with client_for(rate_limit=2, rate_period_seconds=60) as client:
        first = await client.get("/api/v1/users/me", headers=AUTH)
        second = await client.get("/api/v1/users/me", headers=AUTH)
        third = await client.get("/api/v1/users/me", headers=AUTH)
    assert [r.headers["x-ratelimit-remaining"] for r in (first, second, third)] == ["1", "0", "0"]
    assert third.status_code == 429
    assert third.content == b'{"error":"Rate limit exceeded. Retry later."}'
    assert third.headers["x-ratelimit-limit"] == "2"
    assert 0 < int(third.headers["retry-after"]) <= 60
    reset = int(third.headers["x-ratelimit-reset"])
    assert time.time() < reset <= time.time() + 61


async def test_rate_limit_window_resets() -> None:
    """A fixed window: once it ends, the full budget is back."""
    async with client_for(rate_limit=1, rate_period_seconds=0.05) as client:
        assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 200
        assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 429
        await asyncio.sleep(0.06)
        assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 200


# --- recording -----------------------------------------------------------------------------


async def test_requests_are_recorded_as_received_even_when_refused(
    client: httpx.AsyncClient,
) -> None:
    """Method, raw path, raw query, duplicate headers and body digest, before any check."""
    body = b'{"bulk": {"posts": []}}'
    headers = [("X-Dup", "one"), ("X-Dup", "two"), ("Authorization", "Bearer-API wrong")]
    url = "/api/v1/posts/a%2Fb?tags[]=x&tags[]=y%20z"
    refused = await client.put(url, headers=headers, content=body)
    assert refused.status_code == 401
    assert refused.headers["x-sandbox-request-index"] == "0"
    await client.get("/__sandbox/stats")
    [record] = (await client.get("/__sandbox/requests")).json()["requests"]
    assert record["method"] == "PUT"
    assert record["path"] == "/api/v1/posts/a%2Fb"
    assert record["query"] == "tags[]=x&tags[]=y%20z"
    assert [v for n, v in record["headers"] if n == "x-dup"] == ["one", "two"]
    assert record["body_bytes"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert record["timestamp"] <= time.time()
    assert (await client.delete("/__sandbox/requests")).json() == {"requests": []}
    assert (await client.get("/__sandbox/requests")).json() == {"requests": []}


async def test_stats_count_api_requests(client: httpx.AsyncClient) -> None:
    """Stats count /api/v1 requests in total and in flight, not control calls."""
    await client.get("/api/v1/users/me", headers=AUTH)
    await client.get("/api/v1/users/me")
    assert (await client.get("/__sandbox/stats")).json() == {"active_requests": 0, "total": 2}
    assert (await client.get("/__sandbox/health")).status_code == 200


# --- control: keys and faults -------------------------------------------------------------


async def test_keys_can_be_replaced_at_runtime(client: httpx.AsyncClient) -> None:
    """PUT /__sandbox/keys swaps the accepted keys, as a key rotation would."""
    new = {"keys": [{"key": "rotated-key-2", "scopes": ["users"]}, {"key": KEY, "revoked": True}]}
    assert (await client.put("/__sandbox/keys", json=new)).json() == {"keys": 2}
    assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 401
    rotated = {"Authorization": "Bearer-API rotated-key-2", "Publer-Workspace-Id": "w"}
    assert (await client.get("/api/v1/users/me", headers=rotated)).status_code == 200
    assert (await client.get("/api/v1/accounts", headers=rotated)).status_code == 403


@pytest.mark.parametrize(
    "body",
    [{"keys": "k"}, {"keys": [{"key": ""}]}, {"keys": [{"key": "k", "scopes": ["nope"]}]}, []],
)
async def test_malformed_key_replacement_is_400(client: httpx.AsyncClient, body: object) -> None:
    """A malformed key list is refused and the old keys stay."""
    assert (await client.put("/__sandbox/keys", json=body)).status_code == 400
    assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 200


async def test_status_fault_answers_the_next_requests(client: httpx.AsyncClient) -> None:
    """{"status": 503, "count": 2} makes exactly the next two requests 503 errors."""
    await client.put("/__sandbox/faults", json={"status": 503, "count": 2})
    statuses = [(await client.get("/api/v1/users/me", headers=AUTH)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [503, 503, 200]
    assert list(statuses[0].json()) == ["errors"]


async def test_drop_fault_answers_nothing(client: httpx.AsyncClient) -> None:
    """A dropped request gets no answer at all; the next one is served."""
    await client.put("/__sandbox/faults", json={"drop": True, "count": 1})
    with pytest.raises(ConnectionResetError):
        await client.get("/api/v1/users/me", headers=AUTH)
    assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 200


async def test_drop_fault_closes_a_real_connection() -> None:
    """Under uvicorn the client sees the connection close without a response."""
    server = uvicorn.Server(
        uvicorn.Config(create_app([SandboxKey(KEY)]), port=0, lifespan="off", log_config=None)
    )
    serving = asyncio.create_task(server.serve())
    for _ in range(500):  # uvicorn exposes only a flag, no event, for "listening"
        if server.started:
            break
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await client.put("/__sandbox/faults", json={"drop": True})
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/api/v1/users/me", headers=AUTH)
            assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 200
    finally:
        server.should_exit = True
        await serving


async def test_delay_fault_delays_the_answer(client: httpx.AsyncClient) -> None:
    """{"delay_seconds": x} holds the next answer back by x seconds."""
    await client.put("/__sandbox/faults", json={"delay_seconds": 0.2, "count": 1})
    started = time.monotonic()
    assert (await client.get("/api/v1/users/me", headers=AUTH)).status_code == 200
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize(
    "body", [{"status": 200}, {"status": 503, "drop": True}, {"count": -1}, {"colour": 1}]
)
async def test_malformed_fault_is_400(client: httpx.AsyncClient, body: object) -> None:
    """Faults that are not an error status, a drop or a delay are refused."""
    assert (await client.put("/__sandbox/faults", json=body)).status_code == 400


# --- endpoints -----------------------------------------------------------------------------


async def _poll(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    answers = []
    for _ in range(3):
        answer = await client.get(f"/api/v1/job_status/{job_id}", headers=WORKSPACE)
        assert answer.status_code == 200
        answers.append(answer.json())
    return answers


async def test_schedule_returns_a_job_that_completes(client: httpx.AsyncClient) -> None:
    """POST /posts/schedule answers a job_id that /job_status reports working, then
    complete (the word live clients poll for), with the posts made."""
    post = {"text": "hello", "accounts": [{"id": "6120c1f3a1b2c3d4e5f60001"}]}
    bulk = {"bulk": {"state": "scheduled", "posts": [post]}}
    accepted = await client.post("/api/v1/posts/schedule", headers=WORKSPACE, json=bulk)
    assert accepted.status_code == 200
    working, done, again = await _poll(client, accepted.json()["job_id"])
    assert working["status"] == "working" and "payload" not in working
    assert done == again
    assert done["status"] == "complete"
    [post] = done["payload"]["posts"]
    listed = (await client.get("/api/v1/posts", headers=WORKSPACE)).json()
    assert [p["text"] for p in listed["posts"]] == ["hello"]
    deleted = await client.delete(f"/api/v1/posts/{post['id']}", headers=WORKSPACE)
    assert deleted.json() == {"deleted_ids": [post["id"]]}
    unknown = await client.get("/api/v1/job_status/000000000000", headers=WORKSPACE)
    assert (unknown.status_code, list(unknown.json())) == (404, ["errors"])


async def test_media_upload_reports_the_file_size(client: httpx.AsyncClient) -> None:
    """A multipart upload is measured while streaming: the file bytes and the body bytes."""
    data = bytes(range(256)) * 4099
    files = {"file": ("clip.mp4", data, "video/mp4")}
    response = await client.post("/api/v1/media", headers=WORKSPACE, files=files)
    assert response.status_code == 200
    assert (response.json()["size"], response.json()["type"]) == (len(data), "video")
    [record] = (await client.get("/__sandbox/requests")).json()["requests"]
    assert record["body_bytes"] > len(data)


async def test_media_upload_over_the_limit_is_413(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed (chunked) file over Publer's limit answers 413, yet the whole body is
    still recorded."""
    monkeypatch.setattr(sandbox, "MAX_MEDIA_BYTES", 1000)
    boundary = "sandboxboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"'
        f"\r\nContent-Type: image/png\r\n\r\n".encode()
        + b"x" * 5000
        + f"\r\n--{boundary}--\r\n".encode()
    )

    async def chunked() -> AsyncIterator[bytes]:
        yield body

    headers = {**WORKSPACE, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = await client.post("/api/v1/media", headers=headers, content=chunked())
    assert (response.status_code, list(response.json())) == (413, ["errors"])
    [record] = (await client.get("/__sandbox/requests")).json()["requests"]
    assert record["body_bytes"] > 5000


async def test_media_upload_without_file_field_is_400(client: httpx.AsyncClient) -> None:
    """A body that is not multipart with a 'file' field is refused."""
    response = await client.post("/api/v1/media", headers=WORKSPACE, files={"other": b"x"})
    assert response.status_code == 400


async def test_sandbox_bytes_streams_exactly_that_many_bytes_of_json(
    client: httpx.AsyncClient,
) -> None:
    """GET /media?sandbox_bytes=N streams a valid JSON body of exactly N bytes."""
    size = 3 * 64 * 1024 + 17
    response = await client.get(f"/api/v1/media?sandbox_bytes={size}", headers=WORKSPACE)
    assert len(response.content) == int(response.headers["content-length"]) == size
    assert json.loads(response.content)["media"] == []
    head = await client.head(f"/api/v1/media?sandbox_bytes={size}", headers=WORKSPACE)
    assert (head.status_code, head.headers["content-length"]) == (200, str(size))


async def test_users_me_sets_two_distinct_cookies(client: httpx.AsyncClient) -> None:
    """Two Set-Cookie headers arrive, so proxies can be checked for not joining them."""
    response = await client.get("/api/v1/users/me", headers=AUTH)
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 2
    assert len({cookie.split("=")[0] for cookie in cookies}) == 2


@pytest.mark.parametrize(
    "path",
    [
        "/workspaces",
        f"/workspaces/{DEFAULT_WORKSPACE_ID}/media_options",
        "/accounts",
        "/locations?q=Tirana",
        "/analytics/charts",
        "/analytics/members?from=2025-01-01&to=2025-02-01",
        "/analytics/6120c1f3a1b2c3d4e5f60001/best_times?from=2025-01-01&to=2025-02-01",
        "/analytics/best_times?from=2025-01-01&to=2025-02-01",
        "/analytics/post_insights?from=2025-01-01&to=2025-02-01",
        "/analytics/chart_data?chart_ids[]=reach",
        "/analytics/hashtag_insights",
        "/analytics/hashtag_performing_posts?hashtag=%23sandbox",
        "/competitors",
        "/competitors/analytics",
        "/competitors/6120c1f3a1b2c3d4e5f60001/analytics",
    ],
)
async def test_read_endpoints_answer_json_to_get_and_head(
    client: httpx.AsyncClient, path: str
) -> None:
    """Every documented read endpoint answers JSON to GET and also answers HEAD."""
    got = await client.get("/api/v1" + path, headers=WORKSPACE)
    assert got.status_code == 200
    assert got.json() is not None
    assert (await client.head("/api/v1" + path, headers=WORKSPACE)).status_code == 200


async def test_media_from_url_returns_a_job(client: httpx.AsyncClient) -> None:
    """POST /media/from-url answers a job whose payload names the media."""
    body = {"media": [{"url": "https://example.com/cat.png"}], "type": "single"}
    accepted = await client.post("/api/v1/media/from-url", headers=WORKSPACE, json=body)
    _, job, _ = await _poll(client, accepted.json()["job_id"])
    assert job["status"] == "complete"
    assert [media["name"] for media in job["payload"]] == ["cat.png"]
