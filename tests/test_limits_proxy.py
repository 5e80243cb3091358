"""Limits through a real proxy process and the sandbox: every forbidden form is refused
with the proxy's envelope and never reaches Publer; allowed calls pass byte for byte;
answers are narrowed; `check`, the status page and the audit line show the limits."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.rules.policy import hash_token
from tests.conftest import WORKSPACE
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy, start_sandbox
from tests.waiting import eventually

FB, IG = "6120c1f3a1b2c3d4e5f60001", "6120c1f3a1b2c3d4e5f60002"
DRAFTER_TOKEN, FULL_TOKEN = "drafter-" + "d" * 40, "full-" + "f" * 40
JSON_TYPE = {"Content-Type": "application/json"}
SCOPES = ["posts", "accounts", "analytics", "job_status", "media", "workspaces"]


def _route(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "prefix": f"/{name}",
        "credential": "publer",
        "workspace_id": WORKSPACE,
        "scopes": SCOPES,
        **extra,
    }


ROUTES = [
    _route("open"),
    _route("regional", limits={"accounts": [FB]}),
    _route(
        "drafting",
        limits={
            "accounts": [FB],
            "posts": {"states": ["draft"], "publish_now": False, "delete": False, "update": False},
        },
    ),
    _route(
        "agency",
        limits={"accounts": [FB, IG]},
        clients=[
            {
                "name": "drafter",
                "token_sha256": hash_token(DRAFTER_TOKEN),
                "limits": {"accounts": [FB], "posts": {"states": ["draft"]}},
            },
            {"name": "full", "token_sha256": hash_token(FULL_TOKEN)},
        ],
    ),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, Sandbox, Path]]:
    """A sandbox, and a proxy with an open, a regional, a drafting and an agency route."""
    workdir = tmp_path_factory.mktemp("limits")
    key = "pk_limits_" + "k" * 24
    key_file = workdir / "key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    upstream = start_sandbox(workdir, key)
    audit = workdir / "audit.jsonl"
    config = proxy_config(
        "http://127.0.0.1:9",
        upstream.url,
        credential={"source": "file", "path": str(key_file)},
        routes=ROUTES,
        audit={"sink": str(audit)},
    )
    proxy = start_proxy(workdir, config)
    yield proxy, upstream, audit
    proxy.stop()
    upstream.stop()


def schedule_body(*accounts: str, state: str = "scheduled", timed: bool = True) -> bytes:
    """A create body in Publer's documented shape."""
    entries = [
        {"id": a, **({"scheduled_at": "2030-01-01T09:00:00Z"} if timed else {})} for a in accounts
    ]
    post = {"networks": {"facebook": {"type": "status", "text": "hello"}}, "accounts": entries}
    return json.dumps({"bulk": {"state": state, "posts": [post]}}).encode()


def _send(proxy: Proxy, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{proxy.url}{path}", trust_env=False, timeout=30, **kwargs)


GOOD = schedule_body(FB)
HOSTILE: list[tuple[str, str, str, dict[str, Any]]] = [
    ("POST", "/regional/api/v1/posts/schedule", "limit_denied",
     {"content": schedule_body(IG), "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts/schedule/publish", "limit_denied",
     {"content": schedule_body(FB, IG, timed=False), "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts", "limit_denied",
     {"content": schedule_body(IG), "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": GOOD[:-3] + b'],"accounts":[{"id":"' + IG.encode() + b'"}]}]}}',
      "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts/schedule", "limit_denied",
     {"content": GOOD.replace(b'"accounts"', b'"Accounts"'), "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": b"\xef\xbb\xbf" + GOOD, "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": GOOD + b"//", "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": gzip.compress(schedule_body(IG)),
      "headers": {**JSON_TYPE, "Content-Encoding": "gzip"}}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": f"bulk[state]=scheduled&bulk[posts][][accounts][][id]={IG}".encode(),
      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"files": {"bulk[posts][][accounts][][id]": (None, IG)}}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": schedule_body(IG), "headers": {"Content-Type": "text/plain"}}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": schedule_body(IG), "headers": {"Content-Type": "text/x-json"}}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": schedule_body(FB), "headers": {"Content-Type": "application/jsonrequest"}}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": schedule_body(FB).decode().encode("utf-16"),
      "headers": {"Content-Type": "application/json; charset=utf-16"}}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": GOOD + b" " * 300_000, "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts/schedule?_method=DELETE", "limit_denied",
     {"content": GOOD, "headers": JSON_TYPE}),
    ("POST", "/regional/api/v1/posts/schedule", "limit_denied",
     {"content": GOOD, "headers": {**JSON_TYPE, "X-HTTP-Method-Override": "DELETE"}}),
    ("POST", "/regional/api/v1/posts/schedule", "body_uninspectable",
     {"content": GOOD, "headers": {**JSON_TYPE,
                                   "Content_Type": "application/x-www-form-urlencoded"}}),
    ("POST", "/regional/api/v1/media", "body_uninspectable",
     {"content": schedule_body(IG), "headers": JSON_TYPE}),
    ("GET", f"/regional/api/v1/posts?account_ids[]={IG}", "limit_denied", {}),
    ("GET", f"/regional/api/v1/posts?account_ids%5B%5D={IG}", "limit_denied", {}),
    ("GET", f"/regional/api/v1/posts?account_ids={IG}", "limit_denied", {}),
    ("GET", f"/regional/api/v1/analytics/{IG}/chart_data", "limit_denied", {}),
    ("GET", "/regional/api/v1/analytics/best_times", "limit_denied", {}),
    ("GET", f"/regional/api/v1/competitors/{IG}/analytics", "limit_denied", {}),
    ("GET", "/regional/api/v1/competitors", "limit_denied", {}),
    ("PUT", "/regional/api/v1/posts/abc", "limit_denied",
     {"content": b'{"text": "x"}', "headers": JSON_TYPE}),
    ("DELETE", "/regional/api/v1/posts/abc", "limit_denied", {}),
    ("DELETE", "/regional/api/v1/posts?post_ids=a", "limit_denied", {}),
    ("POST", "/drafting/api/v1/posts/schedule", "limit_denied",
     {"content": schedule_body(FB), "headers": JSON_TYPE}),
    ("POST", "/drafting/api/v1/posts/schedule/publish", "limit_denied",
     {"content": schedule_body(FB, state="draft", timed=False), "headers": JSON_TYPE}),
    ("POST", "/drafting/api/v1/posts/schedule", "limit_denied",
     {"content": schedule_body(FB, state="draft"), "headers": JSON_TYPE}),
    ("POST", "/agency/api/v1/posts/schedule", "limit_denied",
     {"content": schedule_body(FB), "headers": {**JSON_TYPE,
                                                "Authorization": f"Bearer-API {DRAFTER_TOKEN}"}}),
    ("POST", "/agency/api/v1/posts/schedule", "limit_denied",
     {"content": schedule_body(IG, state="draft", timed=False),
      "headers": {**JSON_TYPE, "Authorization": f"Bearer-API {DRAFTER_TOKEN}"}}),
]  # fmt: skip


def test_forbidden_calls_never_reach_publer(stack: tuple[Proxy, Sandbox, Path]) -> None:
    """Every hostile form (bodies, queries, paths, parser tricks, other content types) on a
    limited route gets the proxy's refusal, and the sandbox received none of them."""
    proxy, upstream, _ = stack
    upstream.clear()
    for method, path, code, kwargs in HOSTILE:
        answer = _send(proxy, method, path, **kwargs)
        assert answer.headers.get("x-publer-proxy-error") == code, (method, path, answer.text)
        assert answer.status_code == 403
        body = answer.json()
        assert body["code"] == code and body["errors"][0] and body["request_id"]
    assert upstream.requests() == []


def _raw_chunked(proxy: Proxy, path: str, chunks: list[bytes]) -> bytes:
    """A chunked POST sent by hand; the whole answer."""
    host, port = proxy.url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_a_chunked_body_is_inspected_and_bounded(stack: tuple[Proxy, Sandbox, Path]) -> None:
    """A chunked body with no length is read whole up to the limit: a forbidden account in
    its last chunk is refused, and one past 256 KiB is refused unread by Publer."""
    proxy, upstream, _ = stack
    upstream.clear()
    forbidden = schedule_body(IG)
    answer = _raw_chunked(
        proxy, "/regional/api/v1/posts/schedule", [forbidden[:20], forbidden[20:]]
    )
    assert b"x-publer-proxy-error: limit_denied" in answer.lower()
    big = [b" " * 65536] * 5 + [GOOD]
    answer = _raw_chunked(proxy, "/regional/api/v1/posts/schedule", big)
    assert b"x-publer-proxy-error: body_uninspectable" in answer.lower()
    assert upstream.requests() == []
    allowed = _raw_chunked(proxy, "/regional/api/v1/posts/schedule", [GOOD[:30], GOOD[30:]])
    assert allowed.startswith(b"HTTP/1.1 200")
    [record] = upstream.requests()
    assert record["body_sha256"] == hashlib.sha256(GOOD).hexdigest()


def _poll(proxy: Proxy, prefix: str, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """The job's answer once it is no longer working."""
    seen: list[dict[str, Any]] = []

    def done() -> bool:
        seen.append(
            _send(proxy, "GET", f"{prefix}/api/v1/job_status/{job_id}", headers=headers).json()
        )
        return bool(seen[-1]["status"] != "working")

    eventually(done, timeout=10)
    return seen[-1]


def test_allowed_calls_pass_with_the_exact_bytes_checked(
    stack: tuple[Proxy, Sandbox, Path],
) -> None:
    """A create naming only allowed accounts passes; Publer got exactly the bytes checked,
    and the audit line names the accounts it acted on."""
    proxy, upstream, audit = stack
    upstream.clear()
    body = b'  {"bulk": {"state": "scheduled", "posts": [{"accounts": [{"id": "%s",\n'
    body += b'"scheduled_at": "2030-01-01T09:00:00Z"}], "text": "caf\xc3\xa9"}]}}  '
    body = body.replace(b"%s", FB.encode())
    answer = _send(
        proxy,
        "POST",
        "/regional/api/v1/posts/schedule",
        content=body,
        headers={"Content-Type": "application/json; charset=UTF-8", "X-Request-Id": "lim-ok-1"},
    )
    assert answer.status_code == 200, answer.text
    [record] = upstream.requests()
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert record["body_bytes"] == len(body)
    job = _poll(proxy, "/regional", answer.json()["job_id"], {})
    assert [p["account_id"] for p in job["payload"]["posts"]] == [FB]

    def audited() -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []
        return [x for x in lines if x["request_id"] == "lim-ok-1"]

    eventually(lambda: bool(audited()), timeout=10)
    assert audited()[0]["accounts"] == [FB]


def test_answers_are_narrowed_to_the_allowed_accounts(
    stack: tuple[Proxy, Sandbox, Path],
) -> None:
    """GET /accounts lists only the route's accounts; GET /posts gets the account filter
    added, so another account's post is never listed."""
    proxy, upstream, _ = stack
    other = _send(
        proxy, "POST", "/open/api/v1/posts/schedule", content=schedule_body(IG), headers=JSON_TYPE
    )
    _poll(proxy, "/open", other.json()["job_id"], {})
    everything = _send(proxy, "GET", "/open/api/v1/accounts").json()
    assert {a["id"] for a in everything} == {FB, IG}
    narrowed = _send(proxy, "GET", "/regional/api/v1/accounts", headers={"Accept-Encoding": "gzip"})
    assert narrowed.status_code == 200
    assert [a["id"] for a in narrowed.json()] == [FB]
    options = _send(proxy, "GET", f"/regional/api/v1/workspaces/{WORKSPACE}/media_options")
    assert [a["id"] for a in options.json()] == [FB]
    upstream.clear()
    listed = _send(proxy, "GET", "/regional/api/v1/posts?state=scheduled")
    assert listed.status_code == 200
    assert {p["account_id"] for p in listed.json()["posts"]} <= {FB}
    [record] = upstream.requests()
    assert record["query"] == f"state=scheduled&account_ids[]={FB}"
    report = _send(proxy, "GET", f"/regional/api/v1/analytics/{FB}/best_times")
    assert report.status_code == 200


def test_a_client_narrows_its_route(stack: tuple[Proxy, Sandbox, Path]) -> None:
    """On one route, the drafting client may only draft for its one account while the
    other client schedules for both of the route's accounts."""
    proxy, _, _ = stack
    drafter = {**JSON_TYPE, "Authorization": f"Bearer-API {DRAFTER_TOKEN}"}
    full = {**JSON_TYPE, "Authorization": f"Bearer-API {FULL_TOKEN}"}
    draft = schedule_body(FB, state="draft", timed=False)
    drafted = _send(proxy, "POST", "/agency/api/v1/posts/schedule", content=draft, headers=drafter)
    assert drafted.status_code == 200, drafted.text
    scheduled = _send(
        proxy, "POST", "/agency/api/v1/posts/schedule", content=schedule_body(FB, IG), headers=full
    )
    assert scheduled.status_code == 200
    job = _poll(proxy, "/agency", scheduled.json()["job_id"], full)
    assert {p["account_id"] for p in job["payload"]["posts"]} == {FB, IG}


def test_check_and_the_status_page_show_the_limits(stack: tuple[Proxy, Sandbox, Path]) -> None:
    """`check` prints each route's limits and each limited client's; /status.json and the
    page list them too."""
    proxy, _, _ = stack
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(proxy.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert f"  limits:     accounts {FB}; post states any;" in checked.stdout
    assert (
        f"  limits of client drafter: accounts {FB}; post states draft; publish now yes;"
        " update yes; delete yes" in checked.stdout
    )
    status = _send(proxy, "GET", "/status.json").json()
    rows = {(row["route"], row["client"]): row["limits"] for row in status["limits"]}
    assert rows[("drafting", None)].endswith("publish now no; update no; delete no")
    assert ("open", None) not in rows
    page = _send(proxy, "GET", "/status").text
    assert 'data-route="drafting"' in page and "post states draft" in page


def test_a_media_upload_passes_as_multipart(stack: tuple[Proxy, Sandbox, Path]) -> None:
    """On a limited route a multipart media upload streams to Publer as before."""
    proxy, upstream, _ = stack
    upstream.clear()
    answer = _send(
        proxy,
        "POST",
        "/regional/api/v1/media",
        files={"file": ("logo.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64, "image/png")},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "logo.png"
    [record] = upstream.requests()
    assert record["method"] == "POST"
