"""Hostile clients against a real proxy process, sandbox and OpenBao.

Every attack goes over a raw socket, so no HTTP client normalises it on the way. Each ends
in one of two ways: a proxy refusal and a sandbox that recorded nothing, or a request
handled safely: the sandbox recorded exactly one request, with the key and the route's
workspace, never a second (smuggled) one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.edge.server import (
    BODY_IDLE_TIMEOUT_SECONDS,
    HEADER_TIMEOUT_SECONDS,
    MAX_HEADER_BYTES,
    SEND_TIMEOUT_SECONDS,
)
from proxy.rules.policy import hash_token
from proxy.rules.refusals import STATUS
from tests.bao import Bao
from tests.conftest import WORKSPACE
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy
from tests.waiting import eventually

MAX_BODY = 1024 * 1024
TEAM_A_WORKSPACE = "aaaaaaaaaaaaaaaaaaaaaaaa"
TEAM_B_WORKSPACES = ["bbbbbbbbbbbbbbbbbbbbbbbb", "cccccccccccccccccccccccc"]
TEAM_B_TOKEN = "team-b-client-token-5c0ffee"
FOREIGN_WORKSPACE = "ffffffffffffffffffffffff"
BAD = ("bad_path", "bad_request")
DENIED = ("workspace_denied",)
CLOSE = b"Host: localhost\r\nConnection: close\r\n"


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, sandbox: Sandbox
) -> Iterator[Proxy]:
    """The open default route, a read-only prefixed route, a route with a client."""
    routes: list[dict[str, Any]] = [
        {
            "name": "default",
            "credential": "publer",
            "workspace_id": WORKSPACE,
            "scopes": ["posts", "media", "accounts", "job_status", "users"],
        },
        {
            "name": "team-a",
            "prefix": "/teamA",
            "credential": "publer",
            "workspace_id": TEAM_A_WORKSPACE,
            "scopes": ["posts"],
            "read_only": True,
        },
        {
            "name": "team-b",
            "prefix": "/teamB",
            "credential": "publer",
            "workspace_ids": TEAM_B_WORKSPACES,
            "scopes": ["posts", "analytics"],
            "clients": [{"name": "pipeline", "token_sha256": hash_token(TEAM_B_TOKEN)}],
        },
    ]
    config = proxy_config(
        bao.url,
        sandbox.url,
        token_file=token_file,
        routes=routes,
        rate_limit={"requests": 100_000, "per_seconds": 1},
    )
    config["upstream"]["max_body_bytes"] = MAX_BODY
    server = start_proxy(tmp_path_factory.mktemp("hostile"), config)
    yield server
    server.stop()


@dataclass
class Upstream:
    """The sandbox's recording and stats, read over one kept-alive connection (a fresh
    client per call costs tens of milliseconds, which adds up over hundreds of attacks)."""

    url: str
    control: httpx.Client

    def requests(self) -> list[dict[str, Any]]:
        """Every /api/v1 request the sandbox received since the last clear, in order."""
        found: list[dict[str, Any]] = self.control.get(f"{self.url}/__sandbox/requests").json()[
            "requests"
        ]
        return found

    def clear(self) -> None:
        """Forget the recorded requests."""
        self.control.delete(f"{self.url}/__sandbox/requests")

    def active(self) -> int:
        """How many requests the sandbox is serving right now."""
        count: int = self.control.get(f"{self.url}/__sandbox/stats").json()["active_requests"]
        return count

    def settled(self) -> None:
        """Wait until the sandbox has no request in flight: every upstream request ended."""
        eventually(lambda: self.active() == 0)


@pytest.fixture(scope="module")
def control() -> Iterator[httpx.Client]:
    """One HTTP client for the sandbox's control endpoints."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        yield client


@pytest.fixture
def upstream(sandbox: Sandbox, control: httpx.Client) -> Upstream:
    """The sandbox with its recording cleared."""
    recorder = Upstream(sandbox.url, control)
    recorder.clear()
    return recorder


# --- raw HTTP ------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """One HTTP response as it came over the socket."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        """Every value of one header."""
        return [value for key, value in self.headers if key == name]

    @property
    def code(self) -> str | None:
        """The proxy's refusal code, None on an response that is not the proxy's refusal."""
        found = self.header("x-publer-proxy-error")
        return found[0] if found else None


def address(url: str) -> tuple[str, int]:
    """(host, port) of an http://host:port URL."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(url: str, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to the proxy."""
    return socket.create_connection(address(url), timeout=timeout)


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (or `timeout` passes in silence)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def send_raw(
    url: str, data: bytes, timeout: float = 5.0, *, to_head: bool = False
) -> list[RawResponse]:
    """Send raw bytes on a fresh connection; every response that came before it closed
    (`to_head`: responses to HEAD, which have no body whatever their headers say)."""
    with connect(url, timeout) as sock:
        sock.sendall(data)
        return parse_responses(read_all(sock, timeout), to_head=to_head)


def one_response(url: str, data: bytes) -> RawResponse:
    """The single final response to raw bytes (interim 1xx responses left out)."""
    responses = [a for a in send_raw(url, data) if a.status >= 200]
    assert len(responses) == 1, responses
    return responses[0]


def read_response(sock: socket.socket, timeout: float = 5.0) -> RawResponse:
    """Read until the first whole response came: an interim 1xx, or a head and its body."""
    sock.settimeout(timeout)
    raw = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {raw[:200]!r}"
        raw += chunk
        head, sep, body = raw.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if sep and (raw.startswith(b"HTTP/1.1 1") or (length and len(body) >= int(length[1]))):
            return parse_responses(head + sep + body[: int(length[1]) if length else 0])[0]


def parse_responses(raw: bytes, *, to_head: bool = False) -> list[RawResponse]:
    """Split what a connection received into responses (Content-Length or chunked bodies)."""
    responses: list[RawResponse] = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"truncated response head: {head[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = [
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines)
        ]
        status = int(status_line.split()[1])
        length = next((int(v) for k, v in headers if k == "content-length"), None)
        body = b""
        if to_head or status < 200:
            pass  # no body, whatever the headers say
        elif length is not None:
            body, raw = raw[:length], raw[length:]
        elif ("transfer-encoding", "chunked") in headers:
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body, raw = body + raw[:size], raw[size + 2 :]
                if size == 0:
                    break
        else:
            body, raw = raw, b""
        responses.append(RawResponse(status, headers, body))
    return responses


def send_until_refused(sock: socket.socket, piece: bytes, limit: int) -> int:
    """Send `piece` again and again; how many bytes went before the peer refused more."""
    sent = 0
    try:
        while sent < limit:
            sock.sendall(piece)
            sent += len(piece)
            time.sleep(0.001)
    except (BrokenPipeError, ConnectionResetError):
        return sent
    raise AssertionError(f"the proxy took {sent} bytes and did not close the connection")


def assert_refused(response: RawResponse, codes: tuple[str, ...]) -> None:
    """A proxy refusal: one of `codes`, its status, Publer's envelope."""
    assert response.code in codes, (response.status, response.code, response.body[:300])
    assert response.status == STATUS[response.code]  # type: ignore[index]
    payload = json.loads(response.body)
    assert payload["code"] == response.code and payload["errors"] and payload["request_id"]


def values(record: dict[str, Any], name: str) -> list[str]:
    """Every value of one header of a request the sandbox recorded."""
    return [value for key, value in record["headers"] if key == name]


def assert_forwarded_once(
    upstream: Upstream, api_key: str, *, path: str, workspace: str = WORKSPACE
) -> dict[str, Any]:
    """Exactly one request reached Publer, carrying the key and the route's workspace."""
    records = upstream.requests()
    assert len(records) == 1, [(r["method"], r["path"]) for r in records]
    [record] = records
    assert record["path"] == path
    assert values(record, "authorization") == [f"Bearer-API {api_key}"]
    assert values(record, "publer-workspace-id") == [workspace]
    return record


# --- item 1: path and URL attacks ----------------------------------------------------------

PATH_ATTACKS: list[tuple[bytes, tuple[str, ...]]] = [
    # dot segments: plain, percent-encoded, double-encoded, mixed case
    (b"/api/v1/../admin", BAD),
    (b"/api/v1/posts/../../admin", BAD),
    (b"/api/v1/./posts", BAD),
    (b"/api/v1/posts/.", BAD),
    (b"/api/v1/%2e%2e/admin", BAD),
    (b"/api/v1/%2E%2E/admin", BAD),
    (b"/api/v1/%2E%2e/admin", BAD),
    (b"/api/v1/.%2e/admin", BAD),
    (b"/api/v1/%2e./admin", BAD),
    (b"/api/v1/%252e%252e/admin", BAD),
    (b"/api/v1/%25252e%25252e/admin", BAD),
    (b"/api/v1/%%32%65%%32%65/admin", BAD),
    (b"/api/v1/..%00/admin", BAD),
    (b"/api/v1/.../admin", ("unknown_endpoint",)),
    # encoded separators and backslashes
    (b"/api/v1/posts%2f..%2f..%2fadmin", BAD),
    (b"/api/v1/posts%2F..", BAD),
    (b"/api/v1/posts%252f..", BAD),
    (b"/api/v1/posts%5c..%5cadmin", BAD),
    (b"/api/v1/posts%5C", BAD),
    (b"/api/v1/posts\\..\\admin", BAD),
    (b"/api/v1\\posts", BAD),
    (b"/api/v1/posts%ef%bc%8f..", BAD),
    # targets that name another host
    (b"//evil.test/api/v1/posts", BAD),
    (b"///evil.test/api/v1/posts", BAD),
    (b"/\\evil.test/api/v1/posts", BAD),
    (b"http://evil.test/api/v1/posts", BAD),
    (b"https://evil.test/api/v1/posts", BAD),
    (b"HTTP://EVIL.TEST/api/v1/posts", BAD),
    (b"http://evil.test:8080/api/v1/posts?page=0", BAD),
    (b"http://user:pw@evil.test/api/v1/posts", BAD),
    (b"http://UPSTREAM/api/v1/posts", BAD),
    (b"http://evil.test", BAD),
    (b"evil.test:443", BAD),
    (b"*", BAD),
    # '@' and '#'
    (b"/api/v1/posts@evil.test", ("unknown_endpoint",)),
    (b"/@evil.test/api/v1/posts", ("no_route",)),
    (b"/api/v1/users/me@evil.test/", BAD),
    (b"/api/v1/posts#frag", BAD),
    (b"/api/v1/posts#/../../admin", BAD),
    (b"/api/v1/posts?page=0#/../admin", BAD),
    (b"/api/v1/posts%23frag", ("unknown_endpoint",)),
    (b"/api/v1/users/me%3fx=1", ("unknown_endpoint",)),
    # overlong UTF-8 and other non-ASCII
    (b"/api/v1/%c0%ae%c0%ae/admin", BAD),
    (b"/api/v1/%c0%af", BAD),
    (b"/api/v1/%e0%80%ae%e0%80%ae/admin", BAD),
    (b"/api/v1/\xc0\xae\xc0\xae/admin", BAD),
    (b"/api/v1/p\xc3\xb6sts", BAD),
    (b"/api/v1/%u002e%u002e/admin", BAD),
    # NUL and control bytes, raw and encoded
    (b"/api/v1/posts%00", BAD),
    (b"/api/v1/posts%00.json", BAD),
    (b"/api/v1/posts\x00", BAD),
    (b"/api/v1/posts\x01", BAD),
    (b"/api/v1/po\x7fsts", BAD),
    (b"/api/v1/posts%0d%0aX-Injected:%201", BAD),
    (b"/api/v1/posts%09", BAD),
    (b"/api/v1/posts\x0bx", BAD),
    # very long paths and queries
    (b"/api/v1/" + b"a" * 3000, BAD),
    (b"/api/v1/" + b"a/" * 1100 + b"posts", BAD),
    (b"/api/v1/posts?" + b"page=0&" * 1300, BAD),
    (b"/api/v1/" + b"a" * (MAX_HEADER_BYTES + 1), BAD),
    # route-prefix confusion
    (b"/teamA/../teamB/api/v1/posts", BAD),
    (b"/teamA%2f..%2fteamB/api/v1/posts", BAD),
    (b"/teamA%2f../teamB/api/v1/posts", BAD),
    (b"/teamA/..%2fteamB/api/v1/posts", BAD),
    (b"/teamA/%2e%2e/teamB/api/v1/posts", BAD),
    (b"/teamA/api/v1/../../../teamB/api/v1/posts", BAD),
    (b"/teamA/api/v1/posts/../../../../api/v1/users/me", BAD),
    (b"/teamA;/api/v1/posts", BAD),
    (b"/teamA//api/v1/posts", BAD),
    (b"/teamAB/api/v1/posts", ("no_route",)),
    (b"/teama/api/v1/posts", ("no_route",)),
    (b"/teamB/api/v1/posts", ("client_unauthenticated",)),
    (b"/teamA/api/v1/analytics/charts", ("scope_denied",)),
    (b"/healthz/../api/v1/analytics/charts", BAD),
    (b"/metrics%2f..%2fapi/v1/posts", BAD),
    # path parameters, stray escapes, near misses
    (b"/api/v1/posts;/../analytics/charts", BAD),
    (b"/api/v1/..;/analytics/charts", BAD),
    (b"/api/v1/posts;jsessionid=1", BAD),
    (b"/api/v1/posts/", BAD),
    (b"/api/v1/posts%", BAD),
    (b"/api/v1/posts%2", BAD),
    (b"/api/v1/posts%zz", BAD),
    (b"/api/v1/%70osts", ("unknown_endpoint",)),
    (b"/API/v1/posts", ("no_route",)),
    (b"/api/v2/posts", ("no_route",)),
    (b"/api/v1", ("unknown_endpoint",)),
    (b"/api/v1/admin", ("unknown_endpoint",)),
    (b"/api/v1/analytics/charts", ("scope_denied",)),
]


@pytest.mark.parametrize(
    ("target", "codes"), PATH_ATTACKS, ids=[repr(t[:48])[2:-1] for t, _ in PATH_ATTACKS]
)
def test_path_attack_is_refused_and_never_forwarded(
    proxy: Proxy, upstream: Upstream, target: bytes, codes: tuple[str, ...]
) -> None:
    """A hostile request target is refused with a proxy refusal code; Publer saw nothing."""
    target = target.replace(b"UPSTREAM", upstream.url.removeprefix("http://").encode())
    response = one_response(proxy.url, b"GET " + target + b" HTTP/1.1\r\n" + CLOSE + b"\r\n")
    assert_refused(response, codes)
    assert upstream.requests() == []


def test_refused_paths_never_reach_the_upstream_in_the_access_log(
    proxy: Proxy, upstream: Upstream
) -> None:
    """Each refusal that reached the app is logged with its code and no upstream status."""
    for target in (b"/api/v1/%2e%2e/admin", b"/teamA/../teamB/api/v1/posts", b"/api/v1/x#y"):
        response = one_response(proxy.url, b"GET " + target + b" HTTP/1.1\r\n" + CLOSE + b"\r\n")
        request_id = response.header("x-request-id")[0]
        event = proxy.access_event(request_id)
        assert (event["decision"], event["upstream_status"]) == ("bad_path", None)
    assert upstream.requests() == []


# --- item 2: request smuggling and header attacks ------------------------------------------

POST = b"POST /api/v1/posts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
SMUGGLED = b"GET /api/v1/users/me HTTP/1.1\r\nHost: localhost\r\n\r\n"
WS_FIELD = b"Publer-Workspace-Id: "
CHUNKED = b"Transfer-Encoding: chunked\r\n"


def post(fields: bytes, body: bytes = b"{}") -> bytes:
    """A raw POST /api/v1/posts with these header lines (each ending in CRLF) and body."""
    return POST + fields + b"\r\n" + body


def get(fields: bytes = b"", target: bytes = b"/api/v1/posts") -> bytes:
    """A raw GET that closes the connection, with these header lines."""
    return b"GET " + target + b" HTTP/1.1\r\n" + CLOSE + fields + b"\r\n"


SMUGGLING: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("cl-and-te", post(b"Content-Length: 4\r\n" + CHUNKED, b"0\r\n\r\n"), BAD),
    ("te-and-cl", post(CHUNKED + b"Content-Length: 4\r\n", b"0\r\n\r\n"), BAD),
    ("cl-te-smuggling", post(b"Content-Length: 50\r\n" + CHUNKED, b"0\r\n\r\n" + SMUGGLED), BAD),
    ("duplicate-cl-differing", post(b"Content-Length: 2\r\nContent-Length: 41\r\n"), BAD),
    ("duplicate-cl-same", post(b"Content-Length: 2\r\nContent-Length: 2\r\n"), BAD),
    ("cl-list", post(b"Content-Length: 2, 2\r\n"), BAD),
    ("cl-plus-sign", post(b"Content-Length: +2\r\n"), BAD),
    ("cl-negative", post(b"Content-Length: -1\r\n"), BAD),
    ("cl-hex", post(b"Content-Length: 0x2\r\n"), BAD),
    ("cl-overflow", post(b"Content-Length: 18446744073709551617\r\n"), BAD),
    ("cl-inner-space", post(b"Content-Length: 1 2\r\n"), BAD),
    ("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"), BAD),
    ("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"), BAD),
    ("te-identity-chunked", post(b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n"), BAD),
    ("te-twice", post(CHUNKED + b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n"), BAD),
    ("te-quoted", post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n"), BAD),
    ("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), BAD),
    ("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n"), BAD),
    ("obs-fold", post(b"X-App: a\r\n b\r\nContent-Length: 2\r\n"), BAD),
    ("obs-fold-hides-te", post(b"Content-Length: 2\r\nX-App: a\r\n " + CHUNKED), BAD),
    ("leading-whitespace", post(b" " + CHUNKED + b"Content-Length: 2\r\n"), BAD),
    ("bare-lf", b"POST /api/v1/posts HTTP/1.1\nHost: proxy\nContent-Length: 2\n\n{}", BAD),
    ("bare-lf-in-header", post(b"X-App: a\n" + CHUNKED + b"Content-Length: 2\r\n"), BAD),
    ("bare-cr-in-header", post(b"X-App: a\r" + CHUNKED + b"Content-Length: 2\r\n"), BAD),
    ("nul-in-value", post(b"X-App: a\x00b\r\nContent-Length: 2\r\n"), BAD),
    ("nul-in-name", post(b"X-App\x00: a\r\nContent-Length: 2\r\n"), BAD),
    ("control-in-value", post(b"X-App: a\x01b\r\nContent-Length: 2\r\n"), BAD),
    ("del-in-value", post(b"X-App: a\x7fb\r\nContent-Length: 2\r\n"), BAD),
    ("space-in-name", post(b"X App: a\r\nContent-Length: 2\r\n"), BAD),
    ("empty-name", post(b": a\r\nContent-Length: 2\r\n"), BAD),
    ("line-without-colon", post(b"X-App\r\nContent-Length: 2\r\n"), BAD),
    ("lowercase-method", b"get /api/v1/posts HTTP/1.1\r\n" + CLOSE + b"\r\n", BAD),
    ("space-in-target", get(target=b"/api/v1/po sts"), BAD),
    ("connect", b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n", BAD),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", BAD),
    ("upgrade-websocket", get(b"Upgrade: websocket\r\nConnection: Upgrade\r\n"), BAD),
    ("upgrade-h2c", get(b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"), BAD),
    (
        "upgrade-with-body",
        post(b"Upgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 2\r\n"),
        BAD,
    ),
    ("oversized-header", get(b"X-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n"), BAD),
    ("too-many-headers", get(b"X-H: v\r\n" * (MAX_HEADER_BYTES // 6)), BAD),
    ("oversized-cookie", get(b"Cookie: " + b"c=1; " * (MAX_HEADER_BYTES // 4) + b"\r\n"), BAD),
    ("workspace-list", get(WS_FIELD + f"{WORKSPACE}, {FOREIGN_WORKSPACE}\r\n".encode()), DENIED),
    ("workspace-twice", get((WS_FIELD + WORKSPACE.encode() + b"\r\n") * 2), DENIED),
    ("workspace-shouted", get(f"PUBLER-WORKSPACE-ID: {FOREIGN_WORKSPACE}\r\n".encode()), DENIED),
    (
        "workspace-of-another-route",
        get(
            f"Authorization: Bearer {TEAM_B_TOKEN}\r\n{WS_FIELD.decode()}{WORKSPACE}\r\n".encode(),
            target=b"/teamB/api/v1/posts",
        ),
        DENIED,
    ),
    (
        "client-token-in-second-authorization",
        get(
            f"Authorization: Basic eDp5\r\nAuthorization: Bearer {TEAM_B_TOKEN}\r\n".encode(),
            target=b"/teamB/api/v1/posts",
        ),
        ("client_unauthenticated",),
    ),
]


@pytest.mark.parametrize(
    ("raw", "codes"), [case[1:] for case in SMUGGLING], ids=[case[0] for case in SMUGGLING]
)
def test_smuggling_or_header_attack_is_refused(
    proxy: Proxy, upstream: Upstream, raw: bytes, codes: tuple[str, ...]
) -> None:
    """Ambiguous framing, malformed or oversized headers and bad workspace headers are
    refused in the proxy's refusal envelope, and nothing at all reaches Publer."""
    responses = [a for a in send_raw(proxy.url, raw) if a.status >= 200]
    assert responses, "no response"
    assert_refused(responses[0], codes)
    for later in responses[1:]:  # a request the client pipelined behind the refused one
        assert later.code is not None, later
    assert upstream.requests() == []


BROKEN_CHUNKS = {
    "size-bare-lf": b"2\n{}\r\n0\r\n\r\n",
    "size-negative": b"-2\r\n{}\r\n0\r\n\r\n",
    "size-overflow": b"1" + b"0" * 20 + b"\r\n{}\r\n0\r\n\r\n",
    "size-0x": b"0x2\r\n{}\r\n0\r\n\r\n",
    "longer-than-size": b"2\r\n{}}}\r\n0\r\n\r\n",
    "late-error": b"2\r\n{}\r\n" * 50 + b"zz\r\n\r\n",
}


@pytest.mark.parametrize("body", BROKEN_CHUNKS.values(), ids=BROKEN_CHUNKS.keys())
def test_broken_chunked_body_is_refused_and_never_completed_upstream(
    proxy: Proxy, upstream: Upstream, api_key: str, body: bytes
) -> None:
    """A chunked body whose framing breaks is a 400; a streamed request that had already
    started upstream is abandoned with the client (never finished, never retried)."""
    logged = len(proxy.access())
    response = one_response(proxy.url, POST + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert_refused(response, BAD)
    upstream.settled()
    records = upstream.requests()
    assert len(records) <= 1
    for record in records:
        assert values(record, "authorization") == [f"Bearer-API {api_key}"]
        assert record["body_bytes"] < len(body)
    # What the app saw of it: a client that left before its body was complete, or nothing.
    assert all(
        (event["decision"], event["upstream_status"]) == ("client_disconnected", None)
        for event in proxy.access()[logged:]
    )


def test_connection_header_cannot_strip_injected_headers(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """Naming Authorization, the workspace, Host or Content-Length in Connection does not
    remove what the proxy sets: Publer gets the key, the workspace and the whole body."""
    response = one_response(
        proxy.url,
        POST + b"Connection: close, Authorization, Publer-Workspace-Id, Host, X-Request-Id,"
        b" Content-Length, Keep-Alive\r\nKeep-Alive: timeout=5\r\nContent-Type: application/json"
        b"\r\nContent-Length: 2\r\n\r\n{}",
    )
    assert response.code is None and response.status < 500
    record = assert_forwarded_once(upstream, api_key, path="/api/v1/posts")
    assert record["body_bytes"] == 2
    assert values(record, "host") == [upstream.url.removeprefix("http://")]
    assert not values(record, "keep-alive") and not values(record, "connection")


def test_client_authorization_never_replaces_the_key(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """Two client Authorization headers, one a Publer key, still reach Publer as the one
    key the proxy holds."""
    response = one_response(
        proxy.url,
        b"GET /api/v1/posts HTTP/1.1\r\n" + CLOSE + b"Authorization: Bearer-API stolen\r\n"
        b"Authorization: Bearer-API other\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
    )
    assert response.status == 200
    record = assert_forwarded_once(upstream, api_key, path="/api/v1/posts")
    assert not values(record, "proxy-authorization")


def test_underscore_spellings_of_protected_headers_are_dropped(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """`Publer_Workspace_Id`, `X_Forwarded_For` and kin never reach Publer, where a
    CGI-style server (Rack, WSGI) would read them as the dashed header."""
    response = one_response(
        proxy.url,
        b"GET /api/v1/posts HTTP/1.1\r\n"
        + CLOSE
        + f"Publer_Workspace_Id: {FOREIGN_WORKSPACE}\r\n".encode()
        + b"X_Forwarded_For: 10.0.0.1\r\nX_Real_IP: 10.0.0.1\r\nProxy_Authorization: x\r\n"
        b"X_Request_Id: forged-request-id\r\nTransfer_Encoding: chunked\r\n"
        b"Content_Length: 5\r\nX-App_Name: kept\r\n\r\n",
    )
    assert response.status == 200
    record = assert_forwarded_once(upstream, api_key, path="/api/v1/posts")
    names = {key for key, _ in record["headers"]}
    assert not {n for n in names if "_" in n} - {"x-app_name"}
    assert values(record, "x-app_name") == ["kept"]


def test_method_and_url_override_headers_are_dropped(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """Headers that make a framework execute another method or path than the one checked
    (Rack::MethodOverride, X-Original-URL) never reach Publer."""
    response = one_response(
        proxy.url,
        POST + b"X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: PUT\r\n"
        b"X-Method-Override: PATCH\r\nX-Original-URL: /api/v1/analytics/charts\r\n"
        b"X-Rewrite-URL: /api/v1/analytics/charts\r\nX-Forwarded-Host: evil.test\r\n"
        b"Forwarded: host=evil.test;proto=http\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    )
    assert response.status < 500 and response.code is None
    record = assert_forwarded_once(upstream, api_key, path="/api/v1/posts")
    assert record["method"] == "POST"
    names = {key for key, _ in record["headers"]}
    assert not names & {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-host",
        "forwarded",
    }
    assert values(record, "host") == [upstream.url.removeprefix("http://")]


def test_trailer_fields_are_never_merged_into_headers(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """Fields sent after a chunked body are dropped: they cannot add a header, replace the
    key or choose a workspace."""
    response = one_response(
        proxy.url,
        POST + b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Smuggled: 1\r\n"
        b"Authorization: Bearer-API stolen\r\n"
        + f"Publer-Workspace-Id: {FOREIGN_WORKSPACE}\r\n\r\n".encode(),
    )
    assert response.status < 500 and response.code is None
    record = assert_forwarded_once(upstream, api_key, path="/api/v1/posts")
    assert record["body_bytes"] == 2
    assert not values(record, "x-smuggled")


def test_trailer_section_is_bounded(proxy: Proxy, upstream: Upstream) -> None:
    """An endless trailer section does not grow the proxy's memory: the connection is
    dropped soon after it passes the header limit, and Publer's request is abandoned."""
    with connect(proxy.url) as sock:
        sock.sendall(post(CHUNKED, b"2\r\n{}\r\n0\r\nX-Trailer: "))
        sent = send_until_refused(sock, b"a" * 8192, limit=256 * MAX_HEADER_BYTES)
    assert sent < 64 * MAX_HEADER_BYTES, sent
    upstream.settled()


def test_body_is_never_parsed_as_a_second_request(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """A body that holds a request line reaches Publer as the body of one request."""
    body = SMUGGLED + b"GET /api/v1/analytics/charts HTTP/1.1\r\nHost: localhost\r\n\r\n"
    response = one_response(
        proxy.url,
        b"GET /api/v1/posts HTTP/1.1\r\n"
        + CLOSE
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    assert response.status == 200
    record = assert_forwarded_once(upstream, api_key, path="/api/v1/posts")
    assert record["body_bytes"] == len(body)


def test_refused_request_body_is_skipped_not_parsed(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """The unread body of a refused request is skipped by its Content-Length on a kept-alive
    connection: the request hidden in it never runs, the next real request does, once."""
    hidden = b"GET /api/v1/users/me HTTP/1.1\r\nHost: localhost\r\n\r\n"
    refused = (
        b"GET /api/v1/analytics/charts HTTP/1.1\r\nHost: localhost\r\n"
        + f"Content-Length: {len(hidden)}\r\n\r\n".encode()
        + hidden
    )
    chunked_refused = (
        b"POST /teamA/api/v1/posts HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(hidden):x}\r\n".encode()
        + hidden
        + b"\r\n0\r\n\r\n"
    )
    follow_up = b"GET /api/v1/accounts HTTP/1.1\r\n" + CLOSE + b"\r\n"
    responses = send_raw(proxy.url, refused + chunked_refused + follow_up)
    assert [(a.status, a.code) for a in responses] == [
        (403, "scope_denied"),
        (403, "method_denied"),
        (200, None),
    ]
    assert_forwarded_once(upstream, api_key, path="/api/v1/accounts")


def test_pipelined_requests_are_each_checked(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """Requests pipelined on one connection are separate requests, each checked: the
    allowed one reaches Publer once, the denied ones never."""
    responses = send_raw(
        proxy.url,
        b"GET /api/v1/posts HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /api/v1/analytics/charts HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /api/v1/%2e%2e/admin HTTP/1.1\r\n" + CLOSE + b"\r\n",
    )
    assert [(a.status, a.code) for a in responses] == [
        (200, None),
        (403, "scope_denied"),
        (400, "bad_path"),
    ]
    assert_forwarded_once(upstream, api_key, path="/api/v1/posts")


ODD_BUT_VALID = {
    "http-1.0-no-host": b"GET /api/v1/posts HTTP/1.0\r\n\r\n",
    "no-host": b"GET /api/v1/posts HTTP/1.1\r\nConnection: close\r\n\r\n",
    "two-hosts": get(b"Host: evil.test\r\n"),
    "obs-text-value": get(b"X-App: caf\xc3\xa9\r\n"),
    "padded-workspace": get(WS_FIELD + b"\t" + WORKSPACE.encode() + b" \r\n"),
    # An empty workspace header is a client that chose none: the route's is sent.
    "empty-workspace": get(WS_FIELD + b"\r\n"),
    "expect-without-body": get(b"Expect: 100-continue\r\n"),
    "hop-by-hop-fields": get(b"TE: trailers\r\nTrailer: Authorization\r\nUpgrade: h2c\r\n"),
    "proxy-connection": get(b"Proxy-Connection: keep-alive\r\nKeep-Alive: timeout=1\r\n"),
    "chunked-get": get(CHUNKED) + b"0\r\n\r\n",
    "extra-spaces": b"GET  /api/v1/posts  HTTP/1.1\r\n" + CLOSE + b"\r\n",
    "no-version": b"GET /api/v1/posts\r\n\r\n",
}


@pytest.mark.parametrize("raw", ODD_BUT_VALID.values(), ids=ODD_BUT_VALID.keys())
def test_odd_but_valid_request_is_forwarded_once_with_the_key(
    proxy: Proxy, upstream: Upstream, api_key: str, raw: bytes
) -> None:
    """Unusual but unambiguous requests are either refused or forwarded exactly once, with
    the key and the route's workspace, and with no hop-by-hop header."""
    response = one_response(proxy.url, raw)
    if response.code is not None:
        assert_refused(response, tuple(STATUS))
        assert upstream.requests() == []
        return
    record = assert_forwarded_once(upstream, api_key, path="/api/v1/posts")
    names = {key for key, _ in record["headers"]}
    assert not names & {"te", "trailer", "upgrade", "proxy-connection", "expect", "connection"}


# --- item 3: resource exhaustion -----------------------------------------------------------


def test_declared_body_over_maximum_is_refused_before_it_is_sent(
    proxy: Proxy, upstream: Upstream
) -> None:
    """A Content-Length over the maximum is a 413 answered from the head alone; with
    `Expect: 100-continue` the client is never invited to send the body."""
    for expect in (b"", b"Expect: 100-continue\r\n"):
        with connect(proxy.url) as sock:
            sock.sendall(
                b"POST /api/v1/media HTTP/1.1\r\nHost: localhost\r\n"
                + expect
                + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
            )
            response = read_response(sock)  # the 413 itself, never a 100 Continue first
        assert_refused(response, ("body_too_large",))
    assert upstream.requests() == []


def test_streamed_body_over_maximum_is_refused_while_streaming(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """A chunked body that grows past the maximum gets its 413 while the client is still
    sending; Publer never gets more than the maximum and its request is abandoned."""
    chunk = b"a" * 65536
    framed = b"10000\r\n" + chunk + b"\r\n"
    with connect(proxy.url) as sock:
        sock.sendall(
            b"POST /api/v1/media HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(MAX_BODY // len(chunk) + 2):
            sock.sendall(framed)
        # The body is not finished (no last chunk) and the response is already there.
        response = read_response(sock)
    assert_refused(response, ("body_too_large",))
    upstream.settled()
    for record in upstream.requests():
        assert values(record, "authorization") == [f"Bearer-API {api_key}"]
        assert record["body_bytes"] <= MAX_BODY


@dataclass
class SlowClient:
    """A connection that sends `pieces` (seconds after the start, bytes), and notes what
    came back and when the proxy closed it."""

    name: str
    pieces: list[tuple[float, bytes]] = field(default_factory=list)
    sock: socket.socket | None = None
    received: bytes = b""
    closed_after: float | None = None
    next_piece: int = 0
    offset: int = 0

    def step(self, now: float) -> None:
        """Send what is due, read what came, note a close."""
        assert self.sock is not None
        try:
            while self.next_piece < len(self.pieces) and self.pieces[self.next_piece][0] <= now:
                data = self.pieces[self.next_piece][1]
                self.offset += self.sock.send(data[self.offset :])
                if self.offset < len(data):
                    break
                self.next_piece, self.offset = self.next_piece + 1, 0
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self.received += chunk
        else:
            self.closed_after = now


def run_clients(url: str, clients: list[SlowClient], limit: float) -> None:
    """Drive every client until the proxy closed them all, or `limit` seconds passed."""
    started = time.monotonic()
    for client in clients:
        client.sock = connect(url)
        client.sock.setblocking(False)
    try:
        while time.monotonic() - started < limit:
            open_clients = [c for c in clients if c.closed_after is None]
            if not open_clients:
                return
            for client in open_clients:
                client.step(time.monotonic() - started)
            time.sleep(0.05)
    finally:
        for client in clients:
            assert client.sock is not None
            client.sock.close()


def test_slow_and_idle_clients_are_closed_while_others_are_served(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """A thousand idle connections, trickled heads (slowloris), stalled bodies and a client
    that stops reading are dropped by the proxy's timeouts while it keeps answering others
    at once; a slow client that never pauses longer than the idle timeout is served."""
    head_timeout, idle_timeout = HEADER_TIMEOUT_SECONDS, BODY_IDLE_TIMEOUT_SECONDS
    trickle = [(0.0, b"GET /api/v1/posts HTTP/1.1\r\n")]
    trickle += [(i + 1.0, b"X-A: b\r\n") for i in range(int(head_timeout) + 8)]
    slow_body = b'{"bulk": {"state": "scheduled", "posts": []}}' + b" " * 255
    gap = idle_timeout * 0.6
    assert 2 + 2 * gap > SEND_TIMEOUT_SECONDS + 1, "the run would end before the deaf one is due"
    clients = [SlowClient(f"idle-{i}") for i in range(1000)]
    clients += [SlowClient(f"slowloris-{i}", trickle) for i in range(5)]
    clients += [
        SlowClient(
            "stalled-small-body",
            [
                (
                    0,
                    b"POST /api/v1/posts/schedule HTTP/1.1\r\nHost: localhost\r\n"
                    b'Content-Length: 100\r\n\r\n{"bulk":',
                )
            ],
        ),
        SlowClient(
            "stalled-streamed-body",
            [
                (
                    0,
                    b"POST /api/v1/media HTTP/1.1\r\nHost: localhost\r\nContent-Length: 600000\r\n"
                    b"Content-Type: multipart/form-data; boundary=x\r\n\r\n" + b"a" * 300_000,
                )
            ],
        ),
        SlowClient(
            "slow-but-steady",
            [
                (0.0, b"POST /api/v1/posts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"),
                (1.0, b"Content-Type: application/json\r\n"),
                (2.0, f"Content-Length: {len(slow_body)}\r\n\r\n".encode() + slow_body[:100]),
                (2.0 + gap, slow_body[100:200]),
                (2.0 + 2 * gap, slow_body[200:]),
            ],
        ),
    ]
    waits: list[float] = []

    def serve_meanwhile() -> None:
        for _ in range(10):
            time.sleep(0.5)  # probes spread over the run of the slow clients
            started = time.monotonic()
            assert httpx.get(f"{proxy.url}/api/v1/accounts", timeout=5).status_code == 200
            waits.append(time.monotonic() - started)

    # A client that asks for a long download and never reads: it holds a pooled connection
    # to Publer until the proxy drops it.
    deaf = socket.socket()
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.connect(address(proxy.url))
    deaf.sendall(b"GET /api/v1/media?sandbox_bytes=50000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    meanwhile = threading.Thread(target=serve_meanwhile)
    meanwhile.start()
    with deaf:
        run_clients(proxy.url, clients, limit=2 * gap + idle_timeout)
        eventually(lambda: upstream.active() == 0, timeout=30)  # the download was cancelled
    meanwhile.join()
    # Answered without waiting for any slow client's timeout (a loaded machine may be slow,
    # but a request queued behind the slow ones would wait for their timeout).
    assert len(waits) == 10 and max(waits) < head_timeout / 2, waits
    for client in clients:
        assert client.closed_after is not None, f"{client.name} is still open"
        if client.name.startswith(("idle", "slowloris")):
            assert head_timeout - 0.5 <= client.closed_after <= head_timeout + 5, client.name
            assert client.received == b"", client.name
    by_name = {c.name: c for c in clients}
    for name in ("stalled-small-body", "stalled-streamed-body"):
        closed_after = by_name[name].closed_after
        assert closed_after is not None and idle_timeout - 0.5 <= closed_after <= idle_timeout + 5
    steady = by_name["slow-but-steady"]
    [response] = parse_responses(steady.received)
    assert response.code is None and response.status < 500, response
    assert steady.closed_after is not None and steady.closed_after > idle_timeout
    upstream.settled()
    records = {r["path"]: r for r in upstream.requests() if r["path"] != "/api/v1/accounts"}
    assert set(records) <= {"/api/v1/posts", "/api/v1/media"}  # a small body is read whole first
    assert records["/api/v1/posts"]["body_bytes"] == len(slow_body)
    if "/api/v1/media" in records:  # a streamed body was on its way: abandoned, never completed
        assert records["/api/v1/media"]["body_bytes"] < 600_000
    for record in records.values():
        assert values(record, "authorization") == [f"Bearer-API {api_key}"]


def connections_to(pid: int, port: int) -> int:
    """How many TCP connections process `pid` holds open to a remote `port`: ESTABLISHED,
    or CLOSE_WAIT (the peer closed, the process never did: a leaked socket)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] in ("01", "08") and remote_port == port and fields[9] in inodes:
                count += 1
    return count


def _abort(sock: socket.socket, reset: bool) -> None:
    if reset:  # RST instead of FIN: the harshest way a client can leave
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _abort_upload(url: str, reset: bool) -> None:
    sock = connect(url)
    sock.sendall(
        b"POST /api/v1/media HTTP/1.1\r\nHost: localhost\r\nContent-Length: 900000\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\n\r\n" + b"a" * 400_000
    )
    # Leave at an arbitrary moment (before the head is read or mid-stream): whichever it
    # is, nothing may be left behind, and nothing below assumes the upload reached Publer.
    time.sleep(0.05)
    _abort(sock, reset)


def _abort_download(url: str, reset: bool) -> None:
    sock = connect(url)
    sock.sendall(b"GET /api/v1/media?sandbox_bytes=50000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    received = 0
    while received < 256 * 1024:
        chunk = sock.recv(65536)
        assert chunk, "the download ended early"
        received += len(chunk)
    _abort(sock, reset)


def test_hundred_aborts_leave_no_upstream_connection_behind(
    proxy: Proxy, upstream: Upstream, api_key: str
) -> None:
    """Clients that leave mid-upload or mid-download cancel the upstream request: after 100
    such aborts Publer has no request in flight, the proxy holds no more connections to it
    than the aborts ran in parallel, nothing was retried, and the next request is served."""
    parallel = 10
    port = address(upstream.url)[1]
    pid = proxy.process.pid
    with ThreadPoolExecutor(parallel) as pool:
        aborts = [
            pool.submit(_abort_upload if i % 2 else _abort_download, proxy.url, i % 4 < 2)
            for i in range(100)
        ]
        for abort in aborts:
            abort.result()
    upstream.settled()
    eventually(lambda: connections_to(pid, port) <= parallel)
    records = upstream.requests()
    assert len(records) <= 100
    assert all(values(r, "authorization") == [f"Bearer-API {api_key}"] for r in records)
    uploads = [r for r in records if r["method"] == "POST"]
    assert all(r["body_bytes"] < 900_000 for r in uploads)
    upstream.clear()
    assert httpx.get(f"{proxy.url}/api/v1/posts", timeout=5).status_code == 200
    assert_forwarded_once(upstream, api_key, path="/api/v1/posts")
