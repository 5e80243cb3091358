"""The audit log: its hash chain (pure), then the proxy writing it and `audit verify`
reading it back, over real processes and a real redis-server."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from proxy.records.audit import _torn_line, response_ids
from proxy.records.audit_chain import (
    GENESIS,
    Head,
    Source,
    line_hash,
    link_record,
    seal,
    torn_record,
    verify,
    verify_files,
)
from proxy.rules.policy import hash_token
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


def rotated(sizes: list[int]) -> list[list[bytes]]:
    """One chain written into files of `sizes` request lines, each file after the first
    opening with the link line the proxy writes."""
    files: list[list[bytes]] = []
    seq, prev = 0, GENESIS
    for index, size in enumerate(sizes):
        lines: list[bytes] = []
        records = [{"path": f"/api/v1/posts/{index}-{n}"} for n in range(size)]
        if index:
            records.insert(0, link_record("2026-12-06T00:00:00.000+00:00", Head(seq, prev)))
        for record in records:
            seq += 1
            line = seal(record, seq, prev)
            prev = line_hash(line)
            lines.append(line + b"\n")
        files.append(lines)
    return files


def check_files(
    files: list[list[bytes]], head: Head | None = None
) -> tuple[str, int | None, str | None, str | None]:
    """Where verify found the first problem across `files` (named f0, f1 ...), and what."""
    sources: list[Source] = [(f"f{i}", partial(list, lines)) for i, lines in enumerate(files)]
    report = verify_files(sources, head)
    return report.file, report.line_number, report.problem, report.note


def test_the_chain_runs_across_rotated_files() -> None:
    """Rotated files read in order are one chain; a missing middle file, a file that starts
    a chain of its own, a torn last line and an emptied file are each reported with the
    file and line; the oldest file given may continue earlier ones (a note)."""
    first, second, third = rotated([2, 2, 1])
    head = Head(7, line_hash(third[-1].rstrip(b"\n")))
    assert check_files([first, second, third], head)[2:] == (None, None)

    _, _, problem, note = check_files([second, third], head)
    assert problem is None
    assert note is not None and note.startswith("f0 line 1: the chain begins at seq 3")

    name, number, problem, _ = check_files([first, third], head)
    assert (name, number) == ("f1", 1)
    assert problem == "removed: the audit line(s) with seq 3-5 before it are gone"

    name, number, problem, _ = check_files([first, chain(2)])
    assert (name, number) == ("f1", 1)
    assert problem is not None and problem.startswith("not linked: a new chain starts at seq 1")

    cut = b'{"event":"audit","seq":8,"ti'
    torn = [*third, cut]
    name, number, problem, _ = check_files([first, second, torn])
    assert (name, number) == ("f2", 3)
    assert problem is not None and problem.startswith(
        f"torn: the last line is cut short ({len(cut)} bytes"
    )

    marker = seal(torn_record("t", 3, len(cut)), 8, line_hash(third[-1].rstrip(b"\n"))) + b"\n"
    set_aside = [*third, torn[-1] + b"\n", marker]
    _, _, problem, note = check_files([first, second, set_aside])
    assert problem is None
    assert note == (
        f"f2 line 3: a line cut short by a crash ({len(cut)} bytes) was set aside by the proxy"
        " at its next start"
    )

    name, number, problem, _ = check_files([[]], head)
    assert (name, number) == ("f0", 1)
    assert problem is not None and problem.startswith(
        "removed: there are no audit lines, the published head says 7"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"abc", (1, 3)),
        (b"a\nbc", (2, 2)),
        (b"\n\nq", (3, 1)),
        (b"a\n" * 3 + b"x" * (3 << 20), (4, 3 << 20)),  # longer than the tail read at start
    ],
)
def test_a_torn_last_line_is_found_by_line_and_bytes(
    data: bytes, expected: tuple[int, int]
) -> None:
    """The line number and length of a last line with no line end, however long it is."""
    assert _torn_line(io.BytesIO(data), len(data)) == expected


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


def _delete(proxy: Process, name: str) -> None:
    """One audited call: a DELETE on the team route."""
    auth = {"Authorization": f"Bearer-API {TOKEN}"}
    response = httpx.delete(f"{proxy.url}/team/api/v1/posts/{name}", headers=auth)
    assert response.status_code == 200


def _records(path: Path) -> list[dict[str, Any]]:
    """The whole JSON lines of an audit file (a line cut short is not one)."""
    if not path.exists():
        return []  # not made yet: a renamed file is made anew at the next line
    return [
        json.loads(line)
        for line in path.read_bytes().splitlines(keepends=True)
        if line.endswith(b"}\n")
    ]


def _paths(path: Path) -> list[str]:
    """The `path` of each request the audit file holds, in order."""
    records = _records(path)
    return [r["path"].rsplit("/", 1)[-1] for r in records if "path" in r]


def _chain_marks(path: Path) -> list[str]:
    """The `chain` marks (continued, torn tail set aside) of an audit file, in order."""
    records = _records(path)
    return [r["chain"] for r in records if "chain" in r]


def test_the_chain_lives_through_rotation_restart_and_a_crash(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox, redis_server: Process
) -> None:
    """Rename + SIGHUP reopens the file; copytruncate needs no signal; a restart after
    rotation continues the chain (no head mismatch); a line torn by a crash is set aside
    at start, not fatal; verify reads the rotated files, in any order, as one chain."""
    import os
    import signal

    logs = tmp_path / "logs"
    logs.mkdir()
    sink = logs / "audit.log"
    audit = {"sink": str(sink), "redis_url": redis_server.url, "head_key": "test:rotation"}
    config = _audited_config(bao, sandbox, token_file, audit)
    proxy = start_proxy(tmp_path / "first", config)
    try:
        _delete(proxy, "a1")
        os.kill(proxy.process.pid, signal.SIGHUP)  # a hangup with nothing rotated
        eventually(lambda: any(e.get("event") == "config_reloaded" for e in proxy.events()))
        _delete(proxy, "a2")
        eventually(lambda: _paths(sink) == ["a1", "a2"])
        assert not [e for e in proxy.events() if e.get("event") == "audit_reopen_failed"]
        sink.rename(logs / "audit.log.3")  # rotation by rename, then the reopen signal
        os.kill(proxy.process.pid, signal.SIGHUP)
        eventually(lambda: any(e.get("event") == "audit_reopened" for e in proxy.events()))
        _delete(proxy, "b1")
        eventually(lambda: _paths(sink) == ["b1"])  # written just after the answer
        assert _paths(logs / "audit.log.3") == ["a1", "a2"]
        # copytruncate, with no signal: copy, then empty the file in place.
        (logs / "audit.log.2").write_bytes(sink.read_bytes())
        with sink.open("r+b") as file:
            file.truncate(0)
        _delete(proxy, "c1")
        eventually(lambda: _paths(sink) == ["c1"])
        assert _chain_marks(sink) == ["continued"]
        sink.rename(logs / "audit.log.x")  # renamed with no signal: seen before the next line
        _delete(proxy, "c2")
        eventually(lambda: _paths(sink) == ["c2"])
        assert _paths(logs / "audit.log.x") == ["c1"]
    finally:
        assert proxy.stop() == 0
    # Rotated while stopped: the next start links the new file to the last head.
    sink.rename(logs / "audit.log.1")
    proxy = start_proxy(tmp_path / "second", config)
    try:
        _delete(proxy, "d1")
        eventually(lambda: _paths(sink) == ["d1"])
    finally:
        assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not [e for e in proxy.events() if e.get("event") == "audit_head_mismatch"]
    # The crash came before the last line's head was published: Redis is one line behind.
    link = sink.read_bytes().splitlines()[0]
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        client.hset("test:rotation", "head", f"9:{line_hash(link)}")
    torn_bytes = b'{"event":"audit","seq":11,"time":"2026-12'
    with sink.open("ab") as file:  # the crash cut the last write short
        file.write(torn_bytes)
    torn_line = len(sink.read_bytes().splitlines())
    cut = _verify(*map(str, sorted(logs.glob("audit.log*"))))
    assert cut.returncode == 1, cut.stdout
    assert (
        f"{sink}: line {torn_line}: torn: the last line is cut short ({len(torn_bytes)} bytes"
        in cut.stdout
    )

    proxy = start_proxy(tmp_path / "third", config)
    try:
        _delete(proxy, "e1")
    finally:
        assert proxy.stop() == 0
    torn = [e for e in proxy.events() if e.get("event") == "audit_torn_tail"]
    assert [(e["line"], e["bytes"]) for e in torn] == [(torn_line, len(torn_bytes))]
    assert "Traceback" not in proxy.output()
    assert not [e for e in proxy.events() if e.get("event") == "audit_head_mismatch"]
    assert [e["published"] for e in proxy.events() if e.get("event") == "audit_head_behind"] == [
        f"9:{line_hash(link)}"
    ]
    assert _chain_marks(sink) == ["continued", "torn_tail_set_aside"]

    oldest = logs / "audit.log.3"  # logrotate's compress
    (logs / "audit.log.3.gz").write_bytes(gzip.compress(oldest.read_bytes()))
    oldest.unlink()
    files = sorted(logs.glob("audit.log*"))  # audit.log, audit.log.1 ...: not in order
    whole = _verify(*map(str, files), "--config", str(proxy.config_path))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "intact: 12 audit lines" in whole.stdout
    assert (
        f"note: {sink} line {torn_line}: a line cut short by a crash ({len(torn_bytes)} bytes)"
        in whole.stdout
    )

    alone = _verify(str(sink))
    assert alone.returncode == 0, alone.stdout
    assert "line 1: the chain begins at seq 9, continuing earlier files" in alone.stdout
    gap = _verify(str(logs / "audit.log.3.gz"), str(logs / "audit.log.1"), str(sink))
    assert gap.returncode == 1
    assert f"{logs / 'audit.log.1'}: line 1: removed: the audit line(s) with seq 3-6" in gap.stdout

    sink.write_bytes(b"")
    emptied = _verify(str(sink), "--config", str(proxy.config_path))
    assert emptied.returncode == 1
    assert f"{sink}: line 1: removed: there are no audit lines, the published head says 12" in (
        emptied.stdout
    )
