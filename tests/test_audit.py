"""The audit log: its hash chain (pure), then the proxy writing it and `audit verify`
reading it back, over real processes and a real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from proxy.audit import response_ids
from proxy.auditchain import GENESIS, Head, line_hash, seal, verify
from proxy.policy import hash_token
from tests.bao import Bao, free_port
from tests.servers import Process, Sandbox, proxy_config, start_proxy, start_redis
from tests.test_budget import metric
from tests.waiting import eventually

TOKEN = "audit-client-token-0123456789"


def chain(count: int) -> list[bytes]:
    """`count` sealed audit lines, each with a newline, as the proxy writes them."""
    lines: list[bytes] = []
    prev = GENESIS
    for seq in range(1, count + 1):
        line = seal({"method": "DELETE", "path": f"/api/v1/posts/{seq}", "status": 200}, seq, prev)
        prev = line_hash(line)
        lines.append(line + b"\n")
    return lines


def head_of(lines: list[bytes]) -> Head:
    """The head a writer of `lines` would have published."""
    return Head(len(lines), line_hash(lines[-1].rstrip(b"\n")))


def check(lines: list[bytes], head: Head | None = None) -> tuple[int | None, str | None]:
    """Where verify found the first problem, and what it said."""
    report = verify(lambda: lines, head)
    return report.line_number, report.problem


def test_an_intact_chain_verifies_with_and_without_its_head() -> None:
    """A chain as written is intact; other streams' lines between its lines are skipped."""
    lines = chain(5)
    assert check(lines) == (None, None)
    assert check(lines, head_of(lines)) == (None, None)
    mixed = [b'{"event":"request","status":200}\n', *lines[:2], b"plain text\n", *lines[2:]]
    assert check(mixed, head_of(lines)) == (None, None)
    report = verify(lambda: lines, Head(3, line_hash(lines[2].rstrip(b"\n"))))
    assert report.problem is None
    assert report.note is not None and "2 audit line(s) after the published head" in report.note


def test_altered_removed_and_reordered_lines_are_reported_where_they_are() -> None:
    """Each tampering is reported at the first line it touched, with what was done."""
    lines = chain(6)
    altered = list(lines)
    altered[2] = altered[2].replace(b'"status":200', b'"status":404')
    assert check(altered) == (3, "altered: its hash is not what the next audit line (line 4) holds")

    removed = lines[:2] + lines[3:]
    number, problem = check(removed)
    assert number == 3
    assert problem is not None and problem.startswith("removed: the audit line(s) with seq 3")

    swapped = [*lines[:2], lines[3], lines[2], *lines[4:]]
    number, problem = check(swapped)
    assert number == 3
    assert problem is not None and problem.startswith("reordered: seq 4 comes before seq 3")

    repeated = [*lines[:3], lines[2], *lines[3:]]
    number, problem = check(repeated)
    assert number == 4
    assert problem is not None and problem.startswith("reordered or repeated")

    number, problem = check(lines[1:])
    assert number == 1
    assert problem is not None and problem.startswith("removed: the audit line(s) with seq 1")

    broken = [*lines[:4], b'{"event":"audit","seq":5,\n', *lines[5:]]
    assert check(broken) == (5, "altered: not a well-formed audit line")

    unmarked = [*lines[:1], lines[1].replace(b'"event":"audit"', b'"event":"other"'), *lines[2:]]
    number, problem = check(unmarked)
    assert number == 3
    assert problem is not None and problem.startswith("removed")


def test_removed_or_altered_last_lines_need_the_head() -> None:
    """Without the head, deleted last lines go unseen; with it they are reported, and so
    is an altered last line."""
    lines = chain(6)
    head = head_of(lines)
    assert check(lines[:4]) == (None, None)
    number, problem = check(lines[:4], head)
    assert number == 4
    assert problem is not None and "the last 2 audit line(s) are gone" in problem
    altered = [*lines[:5], lines[5].replace(b'"status":200', b'"status":201')]
    assert check(altered) == (None, None)
    assert check(altered, head) == (6, "altered: its hash is not the published head's")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"job_id": "6560a1b2c3d4e5f6a7b8c9d0"}', {"job_id": "6560a1b2c3d4e5f6a7b8c9d0"}),
        (b'{"deleted_ids": ["a1", "b2", 3]}', {"post_ids": ["a1", "b2"]}),
        (b'{"id": "p1", "state": "scheduled"}', {"post_ids": ["p1"]}),
        (b'{"posts": [{"id": "p1"}, {"id": "p2"}, "x"]}', {"post_ids": ["p1", "p2"]}),
        (b'{"job_id": "bad id with spaces"}', {}),
        (b'{"id": "' + b"x" * 65 + b'"}', {}),
        (b"[1, 2]", {}),
        (b"not json", {}),
        (b"", {}),
        (None, {}),
    ],
)
def test_response_ids(body: bytes | None, expected: dict[str, Any]) -> None:
    """Only well-formed ids from Publer's small JSON answers reach the audit line."""
    assert response_ids(body) == expected


def test_head_parses_only_its_own_form() -> None:
    """`--head` takes LINES:HASH and nothing else."""
    assert Head.parse(f"12:{'a' * 64}") == Head(12, "a" * 64)
    for bad in ("12", f"x:{'a' * 64}", f"12:{'A' * 64}", f"12:{'a' * 63}"):
        with pytest.raises(ValueError, match="LINES:HASH"):
            Head.parse(bad)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """A real redis-server on a free loopback port."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def _audited_config(
    bao: Bao, sandbox: Sandbox, token_file: Path, audit: dict[str, Any]
) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "workspace_id": "5f8d7a62c9e77e001f36e3a1",
            "scopes": ["posts", "job_status"],
            "clients": [{"name": "scheduler", "token_sha256": hash_token(TOKEN)}],
        },
        {
            "name": "open",
            "credential": "publer",
            "workspace_id": "5f8d7a62c9e77e001f36e3a1",
            "scopes": ["users"],
        },
    ]
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, routes=routes)
    config["audit"] = audit
    return config


def _traffic(url: str) -> dict[str, str]:
    """Mutating calls of every kind, and reads; the request ids of the mutating ones."""
    auth = {"Authorization": f"Bearer-API {TOKEN}"}
    ids: dict[str, str] = {}
    with httpx.Client(base_url=url, headers=auth) as http:
        scheduled = http.post(
            "/team/api/v1/posts/schedule?secret_query=value",
            json={
                "bulk": {
                    "state": "scheduled",
                    "posts": [{"text": "hello", "accounts": [{"id": "6120c1f3a1b2c3d4e5f60001"}]}],
                }
            },
            headers={"X-Request-Id": "req-schedule-0001"},
        )
        assert scheduled.status_code == 200
        ids["schedule"] = scheduled.json()["job_id"]
        job: dict[str, Any] = {"status": "working"}
        while job["status"] == "working":  # Publer's jobs are working, then complete
            job = http.get(f"/team/api/v1/job_status/{ids['schedule']}").json()
        post_id = job["payload"]["posts"][0]["id"]
        ids["post"] = post_id
        assert http.put(f"/team/api/v1/posts/{post_id}", json={"text": "hi"}).status_code == 200
        deleted = http.delete(f"/team/api/v1/posts/{post_id}")
        assert deleted.json() == {"deleted_ids": [post_id]}
        refused = http.delete("/team/api/v1/posts/x", headers={"Authorization": "Bearer-API no"})
        assert refused.status_code == 401
        assert http.post("/api/v1/users/me").status_code == 403  # open route, method denied
        assert http.get("/team/api/v1/posts").status_code == 200  # a read: not audited
    return ids


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_proxy_audits_mutating_calls_and_verify_catches_tampering(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox, redis_server: Process
) -> None:
    """Every mutating call (and no read) gets one line naming client, route, method, path
    without query, statuses, the accounts a create names, Publer's job or post ids and the
    request id; the head is
    published to Redis and the metrics; the chain continues after a restart; verify
    finds an altered line and, from the head in Redis, removed last lines."""
    sink = tmp_path / "audit.jsonl"
    audit = {"sink": str(sink), "redis_url": redis_server.url, "head_key": "test:audit"}
    config = _audited_config(bao, sandbox, token_file, audit)
    proxy = start_proxy(tmp_path / "first", config)
    try:
        ids = _traffic(proxy.url)
        eventually(lambda: metric(proxy, "publer_proxy_audit_lines") == 5)
    finally:
        assert proxy.stop() == 0
    records = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [(r["method"], r["path"], r["client"], r["status"]) for r in records] == [
        ("POST", "/team/api/v1/posts/schedule", "scheduler", 200),
        ("PUT", f"/team/api/v1/posts/{ids['post']}", "scheduler", 200),
        ("DELETE", f"/team/api/v1/posts/{ids['post']}", "scheduler", 200),
        ("DELETE", "/team/api/v1/posts/x", "anonymous", 401),
        ("POST", "/api/v1/users/me", "anonymous", 403),
    ]
    first = records[0]
    assert first["job_id"] == ids["schedule"]
    assert first["request_id"] == "req-schedule-0001"
    assert (first["route"], first["upstream_status"], first["decision"]) == ("team", 200, "allowed")
    assert first["time"].endswith("+00:00")
    assert first["accounts"] == ["6120c1f3a1b2c3d4e5f60001"]  # named by the create body
    assert "accounts" not in records[1]  # an update by post id: its account is not known
    assert records[1]["post_ids"] == [ids["post"]]
    assert records[2]["post_ids"] == [ids["post"]]
    assert (records[3]["decision"], records[3]["upstream_status"]) == (
        "client_unauthenticated",
        None,
    )
    assert "secret_query" not in sink.read_text()
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        published = client.hget("test:audit", "head")
    assert published == str(head_of(sink.read_bytes().splitlines(keepends=True)))

    # A restart appends to the same chain.
    proxy = start_proxy(tmp_path / "second", config)
    try:
        auth = {"Authorization": f"Bearer-API {TOKEN}"}
        httpx.delete(f"{proxy.url}/team/api/v1/posts/gone", headers=auth)
    finally:
        assert proxy.stop() == 0
    config_path = proxy.config_path
    intact = _verify(str(sink), "--config", str(config_path))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "intact: 6 audit lines" in intact.stdout

    lines = sink.read_bytes().splitlines(keepends=True)
    sink.write_bytes(
        b"".join([*lines[:2], lines[2].replace(b'"status":200', b'"status":204'), *lines[3:]])
    )
    altered = _verify(str(sink), "--redis-url", redis_server.url, "--head-key", "test:audit")
    assert altered.returncode == 1
    assert "line 3: altered" in altered.stdout

    sink.write_bytes(b"".join(lines[:4]))
    truncated = _verify(str(sink), "--config", str(config_path))
    assert truncated.returncode == 1
    assert "line 4: removed" in truncated.stdout
    assert "the last 2 audit line(s) are gone" in truncated.stdout
    assert _verify(str(sink)).returncode == 0  # without the head, the chain alone is whole
    given = _verify(str(sink), "--head", str(head_of(lines)))
    assert given.returncode == 1
    assert _verify(str(tmp_path / "missing"), "--head", str(head_of(lines))).returncode == 2


def test_audit_to_stdout_beside_the_log(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """With sink stdout the audit lines share the stream with the log; verify reads the
    captured stream, and the log's audit_head events give the head to check against."""
    config = _audited_config(bao, sandbox, token_file, {"sink": "stdout"})
    proxy = start_proxy(tmp_path, config)
    try:
        _traffic(proxy.url)
        eventually(lambda: metric(proxy, "publer_proxy_audit_lines") == 5)
    finally:
        assert proxy.stop() == 0
    heads = [e["head"] for e in proxy.events() if e.get("event") == "audit_head"]
    assert len(heads) == 5
    result = _verify(str(proxy.log_path), "--head", heads[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact: 5 audit lines" in result.stdout


def test_one_audit_file_has_one_writer(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A second proxy given the same audit file refuses to start, saying why, and the
    first one's chain stays whole."""
    sink = tmp_path / "shared.jsonl"
    config = _audited_config(bao, sandbox, token_file, {"sink": str(sink)})
    first = start_proxy(tmp_path / "first", config)
    try:
        second_config = {**config, "listen": {"host": "127.0.0.1", "port": free_port()}}
        with pytest.raises(RuntimeError) as caught:
            start_proxy(tmp_path / "second", second_config)
        assert "is being written by another proxy process" in str(caught.value)
        assert "Traceback" not in str(caught.value)
        _traffic(first.url)
    finally:
        assert first.stop() == 0
    assert _verify(str(sink)).returncode == 0
