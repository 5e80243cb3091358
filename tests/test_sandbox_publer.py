"""The sandbox follows Publer: documented shapes, and the live behaviour where it differs."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.dev.sandbox import (
    DEFAULT_WORKSPACE_ID,
    LIVE_KEY_REJECTED,
    LIVE_WORKSPACE_REJECTED,
    SandboxKey,
    create_app,
)
from tests.servers import Sandbox, start_sandbox

KEY = "sandbox-test-key-0002"
AUTH = {"Authorization": f"Bearer-API {KEY}"}
WORKSPACE = {**AUTH, "Publer-Workspace-Id": DEFAULT_WORKSPACE_ID}
FACEBOOK = "6120c1f3a1b2c3d4e5f60001"
INSTAGRAM = "6120c1f3a1b2c3d4e5f60002"

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The sandbox runs under uvicorn, so asyncio is the loop that matters."""
    return "asyncio"


def client_for(*keys: SandboxKey, **options: Any) -> httpx.AsyncClient:
    """An in-process client of a fresh sandbox."""
    app = create_app(keys or [SandboxKey(KEY)], **options)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A sandbox that accepts KEY with every scope, docs mode."""
    async with client_for() as client:
        yield client


async def _job(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    return [
        (await client.get(f"/api/v1/job_status/{job_id}", headers=WORKSPACE)).json()
        for _ in range(2)
    ]


# --- 401 and 403: the docs, and the live API -------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "key_status", "workspace_status"), [("docs", 401, 403), ("live", 403, 401)]
)
async def test_auth_errors_follow_the_chosen_mode(
    mode: str, key_status: int, workspace_status: int
) -> None:
    """Docs: a bad key is 401, a missing or foreign workspace 403. Live: the reverse, with
    the messages recorded from the live API. A missing scope is 403 in both."""
    keys = [
        SandboxKey(KEY, workspaces=frozenset({DEFAULT_WORKSPACE_ID})),
        SandboxKey("narrow-key-0002", scopes=frozenset({"posts"})),
        SandboxKey("revoked-key-0002", revoked=True),
    ]
    async with client_for(*keys, auth_errors=mode) as client:
        wrong = await client.get("/api/v1/users/me", headers={"Authorization": "Bearer-API x"})
        revoked = await client.get(
            "/api/v1/users/me", headers={"Authorization": "Bearer-API revoked-key-0002"}
        )
        missing = await client.get("/api/v1/accounts", headers=AUTH)
        foreign = await client.get(
            "/api/v1/accounts", headers={**AUTH, "Publer-Workspace-Id": "aaaaaaaaaaaaaaaaaaaaaaaa"}
        )
        scope = await client.get(
            "/api/v1/accounts",
            headers={**WORKSPACE, "Authorization": "Bearer-API narrow-key-0002"},
        )
    assert [wrong.status_code, revoked.status_code] == [key_status] * 2
    assert [missing.status_code, foreign.status_code] == [workspace_status] * 2
    assert scope.status_code == 403 and "scope" in scope.json()["errors"][0]
    if mode == "live":
        assert wrong.json() == {"errors": [LIVE_KEY_REJECTED]}
        assert missing.json() == {"errors": [LIVE_WORKSPACE_REJECTED]}


async def test_auth_error_mode_can_be_switched_at_run_time(client: httpx.AsyncClient) -> None:
    """PUT /__sandbox/auth-errors switches docs and live; anything else is 400."""
    bad_key = {"Authorization": "Bearer-API nope"}
    assert (await client.get("/api/v1/users/me", headers=bad_key)).status_code == 401
    assert (await client.put("/__sandbox/auth-errors", json={"mode": "live"})).status_code == 200
    assert (await client.get("/api/v1/users/me", headers=bad_key)).status_code == 403
    assert (await client.put("/__sandbox/auth-errors", json={"mode": "x"})).status_code == 400


# --- jobs ------------------------------------------------------------------------------------


async def test_job_is_working_then_complete(client: httpx.AsyncClient) -> None:
    """A job is `working` on its first poll, then `complete` with its payload."""
    post = {"networks": {"facebook": {"text": "a"}}, "accounts": [{"id": FACEBOOK}]}
    bulk = {"bulk": {"state": "scheduled", "posts": [post]}}
    accepted = await client.post("/api/v1/posts/schedule", headers=WORKSPACE, json=bulk)
    working, complete = await _job(client, accepted.json()["job_id"])
    assert working["status"] == "working"
    assert complete["status"] == "complete" and complete["payload"]["failures"] == {}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/media/from-url", {"media": [{"url": "ftp://nowhere/cat.png"}], "type": "single"}),
        (
            "/posts/schedule",
            {"bulk": {"state": "scheduled", "posts": [{"accounts": [{"id": "nope"}]}]}},
        ),
    ],
)
async def test_job_fails_on_a_documented_failure_input(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    """A URL Publer cannot download, or posts for accounts outside the workspace: the job
    goes working, then failed, with the failures in its payload."""
    accepted = await client.post(f"/api/v1{path}", headers=WORKSPACE, json=body)
    working, failed = await _job(client, accepted.json()["job_id"])
    assert (working["status"], failed["status"]) == ("working", "failed")
    assert failed["payload"]["failures"] and failed["error"]


# --- posts -----------------------------------------------------------------------------------


async def _schedule(client: httpx.AsyncClient, posts: list[dict[str, Any]]) -> list[Any]:
    bulk = {"bulk": {"state": "scheduled", "posts": posts}}
    accepted = await client.post("/api/v1/posts/schedule", headers=WORKSPACE, json=bulk)
    _, done = await _job(client, accepted.json()["job_id"])
    created: list[Any] = done["payload"]["posts"]
    return created


async def test_posts_of_the_documented_shape_keep_their_text(client: httpx.AsyncClient) -> None:
    """bulk.posts[].networks.<provider>.text is the post's text, one post per account."""
    post = {
        "networks": {"facebook": {"type": "status", "text": "Hello from the docs"}},
        "accounts": [
            {"id": FACEBOOK, "scheduled_at": "2025-06-10T09:30:00+00:00"},
            {"id": INSTAGRAM, "scheduled_at": "2025-06-11T09:30:00+00:00"},
        ],
    }
    created = await _schedule(client, [post])
    assert [p["text"] for p in created] == ["Hello from the docs"] * 2
    assert {p["account_id"] for p in created} == {FACEBOOK, INSTAGRAM}


async def test_delete_posts_takes_repeated_post_ids(client: httpx.AsyncClient) -> None:
    """DELETE /posts?post_ids=A&post_ids=B deletes both (and post_ids[] too)."""
    posts = [
        {"networks": {"facebook": {"text": str(n)}}, "accounts": [{"id": FACEBOOK}]}
        for n in range(3)
    ]
    a, b, c = [p["id"] for p in await _schedule(client, posts)]
    deleted = await client.delete(f"/api/v1/posts?post_ids={a}&post_ids={b}", headers=WORKSPACE)
    assert sorted(deleted.json()["deleted_ids"]) == sorted([a, b])
    deleted = await client.delete(f"/api/v1/posts?post_ids[]={c}", headers=WORKSPACE)
    assert deleted.json()["deleted_ids"] == [c]


async def test_post_list_honours_filters_and_pages(client: httpx.AsyncClient) -> None:
    """GET /posts filters by state, account and query, and pages with page, per_page and
    total_pages."""
    many = [
        {"networks": {"facebook": {"text": f"sale {n}"}}, "accounts": [{"id": FACEBOOK}]}
        for n in range(25)
    ]
    await _schedule(client, many)
    other = {"networks": {"instagram": {"text": "launch"}}, "accounts": [{"id": INSTAGRAM}]}
    await _schedule(client, [other])
    first = (await client.get("/api/v1/posts?page=0", headers=WORKSPACE)).json()
    assert (first["total"], first["page"], first["per_page"], first["total_pages"]) == (
        26,
        0,
        20,
        2,
    )
    second = (await client.get("/api/v1/posts?page=1", headers=WORKSPACE)).json()
    assert len(first["posts"]) + len(second["posts"]) == 26
    by_account = await client.get(f"/api/v1/posts?account_ids[]={INSTAGRAM}", headers=WORKSPACE)
    assert [p["text"] for p in by_account.json()["posts"]] == ["launch"]
    by_query = await client.get("/api/v1/posts?query=SALE%201", headers=WORKSPACE)
    assert {p["text"] for p in by_query.json()["posts"]} >= {"sale 1", "sale 10"}
    drafts = await client.get("/api/v1/posts?state=draft", headers=WORKSPACE)
    assert drafts.json()["total"] == 0


async def test_media_list_honours_filters(client: httpx.AsyncClient) -> None:
    """GET /media filters by types[] and search, with the paging fields."""
    for name, kind in (("a.png", "image/png"), ("b.mp4", "video/mp4")):
        files = {"file": (name, b"x" * 10, kind)}
        assert (await client.post("/api/v1/media", headers=WORKSPACE, files=files)).is_success
    videos = (await client.get("/api/v1/media?types[]=video", headers=WORKSPACE)).json()
    assert [m["name"] for m in videos["media"]] == ["b.mp4"]
    assert (videos["page"], videos["total_pages"]) == (0, 1)
    found = (await client.get("/api/v1/media?search=A.P", headers=WORKSPACE)).json()
    assert [m["name"] for m in found["media"]] == ["a.png"]


# --- analytics -------------------------------------------------------------------------------


@pytest.mark.parametrize("account", ["", f"/{FACEBOOK}"])
async def test_post_insights_without_dates_is_500(client: httpx.AsyncClient, account: str) -> None:
    """post_insights needs from and to: without them the live API answers 500."""
    path = f"/api/v1/analytics{account}/post_insights"
    assert (await client.get(path, headers=WORKSPACE)).status_code == 500
    dated = await client.get(f"{path}?from=2025-01-01&to=2025-02-01", headers=WORKSPACE)
    assert dated.status_code == 200
    assert set(dated.json()) >= {"posts", "total"}


@pytest.mark.parametrize(
    ("path", "check"),
    [
        ("/analytics/charts", lambda b: isinstance(b, list) and "group_id" in b[0]),
        ("/analytics/chart_data?chart_ids[]=reach", lambda b: set(b) == {"current", "previous"}),
        ("/analytics/best_times?from=2025-01-01&to=2025-02-01", lambda b: len(b["Monday"]) == 24),
        ("/analytics/hashtag_insights", lambda b: set(b) == {"records", "total"}),
        ("/analytics/hashtag_performing_posts?hashtag=%23a", lambda b: isinstance(b, list)),
        ("/analytics/members?from=2025-01-01&to=2025-02-01", lambda b: "user" in b[0]),
        ("/competitors", lambda b: "social_id" in b[0]),
        ("/competitors/analytics", lambda b: set(b) == {"insights", "total"}),
    ],
)
async def test_each_analytics_report_has_its_own_shape(
    client: httpx.AsyncClient, path: str, check: Any
) -> None:
    """Each report answers in the shape Publer documents for it."""
    answer = await client.get(f"/api/v1{path}", headers=WORKSPACE)
    assert answer.status_code == 200
    assert check(answer.json()), answer.json()


@pytest.mark.parametrize("path", ["/analytics/members", "/analytics/hashtag_performing_posts"])
async def test_reports_refuse_missing_required_parameters(
    client: httpx.AsyncClient, path: str
) -> None:
    """Reports with required parameters (dates, hashtag) refuse a call without them."""
    answer = await client.get(f"/api/v1{path}", headers=WORKSPACE)
    assert answer.status_code == 400 and answer.json()["errors"]


# --- rate limit ------------------------------------------------------------------------------


async def test_rate_limit_is_per_account_not_per_key() -> None:
    """Two keys of one account share its budget; another account's key has its own."""
    keys = [
        SandboxKey(KEY),
        SandboxKey("second-key-0002"),
        SandboxKey("other-account-key", account="someone-else"),
    ]
    async with client_for(*keys, rate_limit=2, rate_period_seconds=60) as client:

        async def call(key: str) -> int:
            headers = {"Authorization": f"Bearer-API {key}"}
            return (await client.get("/api/v1/users/me", headers=headers)).status_code

        assert [await call(KEY), await call("second-key-0002")] == [200, 200]
        assert await call("second-key-0002") == 429
        assert await call("other-account-key") == 200


# --- uploads over a real socket -------------------------------------------------------------


@pytest.fixture(scope="module")
def real_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The sandbox as a process, to talk to over a socket."""
    server = start_sandbox(tmp_path_factory.mktemp("sandbox-publer"), KEY)
    yield server
    server.stop()


def test_declared_length_over_200_mb_is_413_before_the_body(real_sandbox: Sandbox) -> None:
    """An upload that declares more than 200 MB is answered 413 at once, from its head:
    neither an `Expect: 100-continue` client nor one that sends at once has to send it."""
    host, port = real_sandbox.url.removeprefix("http://").split(":")
    for expect in (True, False):
        head = (
            f"POST /api/v1/media HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer-API {KEY}\r\nPubler-Workspace-Id: {DEFAULT_WORKSPACE_ID}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 200000001\r\n"
            + ("Expect: 100-continue\r\n" if expect else "")
            + "\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            started = time.monotonic()
            conn.sendall(head.encode())
            if not expect:
                conn.sendall(b"--b\r\n" + b"x" * 1000)
            answer = _read_answer(conn)
            assert answer.startswith("HTTP/1.1 413"), answer
            assert time.monotonic() - started < 3
            assert "200 MB" in json.loads(answer.split("\r\n\r\n", 1)[1])["errors"][0]


def _read_answer(conn: socket.socket) -> str:
    """One whole answer with a Content-Length, as text."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += conn.recv(65536)
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_sandbox_cli_selects_live_auth_errors(tmp_path: Path) -> None:
    """`publer-proxy sandbox --auth-errors live` answers a wrong key 403, as live."""
    import subprocess
    import sys

    from tests.bao import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "sandbox", "--port", str(port), "--auth-errors", "live"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/api/v1/users/me",
                    headers={"Authorization": "Bearer-API wrong"},
                    trust_env=False,
                )
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert answer.status_code == 403
        assert answer.json() == {"errors": [LIVE_KEY_REJECTED]}
    finally:
        process.terminate()
        process.wait(10)


def test_dev_stack_sandbox_follows_the_environment_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run`'s sandbox answers the live way when PUBLER_SANDBOX_AUTH_ERRORS=live."""
    from proxy.dev.stack import sandbox_process

    monkeypatch.setenv("PUBLER_SANDBOX_AUTH_ERRORS", "live")
    with sandbox_process(tmp_path, "dev-stack-key-0001") as url:
        answer = httpx.get(
            f"{url}/api/v1/users/me", headers={"Authorization": "Bearer-API wrong"}, trust_env=False
        )
    assert answer.status_code == 403
    assert answer.json() == {"errors": [LIVE_KEY_REJECTED]}


def test_unknown_auth_errors_mode_is_a_clear_error() -> None:
    """A mistyped mode in the environment is refused with a sentence, not a traceback."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "proxy", "sandbox", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PUBLER_SANDBOX_AUTH_ERRORS": "livee"},
    )
    assert result.returncode == 1
    assert "use docs or live" in result.stderr and "Traceback" not in result.stderr


# --- documented request shapes -----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"state": "scheduled", "posts": [{"accounts": [{"id": FACEBOOK}]}]},
        {"posts": [{"accounts": [{"id": FACEBOOK}]}]},
        {"bulk": {"state": "scheduled"}},
        {"bulk": {"state": "scheduled", "posts": []}},
        {"bulk": {"state": "published", "posts": [{"accounts": [{"id": FACEBOOK}]}]}},
    ],
)
async def test_a_create_call_without_the_bulk_shape_is_refused(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    """A create body not in Publer's documented {"bulk": {"state", "posts"}} shape is a 400
    and starts no job: no post appears on any account."""
    for path in ("/posts/schedule", "/posts/schedule/publish"):
        answer = await client.post(f"/api/v1{path}", headers=WORKSPACE, json=body)
        assert answer.status_code == 400 and answer.json()["errors"], answer.text
    listed = (await client.get("/api/v1/posts", headers=WORKSPACE)).json()
    assert listed["posts"] == []


async def test_a_post_naming_no_account_is_made_only_as_a_workspace_draft(
    client: httpx.AsyncClient,
) -> None:
    """A scheduled post with no accounts fails its job (no post on any account); a
    draft_public post needs none."""
    failed = await client.post(
        "/api/v1/posts/schedule",
        headers=WORKSPACE,
        json={"bulk": {"state": "scheduled", "posts": [{"networks": {"x": {"text": "a"}}}]}},
    )
    _, done = await _job(client, failed.json()["job_id"])
    assert done["status"] == "failed"
    drafted = await client.post(
        "/api/v1/posts/schedule",
        headers=WORKSPACE,
        json={"bulk": {"state": "draft_public", "posts": [{"networks": {"x": {"text": "b"}}}]}},
    )
    _, done = await _job(client, drafted.json()["job_id"])
    [post] = done["payload"]["posts"]
    assert (post["state"], post["account_id"], post["text"]) == ("draft_public", None, "b")


async def test_an_update_keeps_the_fields_it_does_not_give(client: httpx.AsyncClient) -> None:
    """PUT /posts/{id} changes the text it is given and keeps the account, time and type;
    an unknown id is a 404."""
    post = {
        "networks": {"facebook": {"type": "status", "text": "before"}},
        "accounts": [{"id": INSTAGRAM, "scheduled_at": "2030-06-10T09:30:00+00:00"}],
    }
    [created] = await _schedule(client, [post])
    answer = await client.put(
        f"/api/v1/posts/{created['id']}", headers=WORKSPACE, json={"text": "after"}
    )
    assert answer.status_code == 200
    updated = answer.json()
    assert updated["text"] == "after"
    assert {k: updated[k] for k in ("account_id", "scheduled_at", "type", "state")} == {
        k: created[k] for k in ("account_id", "scheduled_at", "type", "state")
    }
    missing = await client.put("/api/v1/posts/000000000000", headers=WORKSPACE, json={"text": "x"})
    assert missing.status_code == 404


async def test_best_times_without_dates_uses_a_default_window(client: httpx.AsyncClient) -> None:
    """best_times without from/to answers the heatmap over Publer's default recent window."""
    for path in ("/analytics/best_times", f"/analytics/{FACEBOOK}/best_times"):
        answer = await client.get(f"/api/v1{path}", headers=WORKSPACE)
        assert answer.status_code == 200 and len(answer.json()["Monday"]) == 24
