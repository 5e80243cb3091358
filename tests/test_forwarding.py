"""The whole request path over real processes: OpenBao -> proxy (uvicorn) -> sandbox."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.policy import hash_token
from tests.bao import Bao, free_port
from tests.conftest import WORKSPACE
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy

CLIENT_TOKEN = "scheduler-token-7d1f0c2a9b"
MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, sandbox: Sandbox
) -> Iterator[Proxy]:
    """A proxy with an open route, a read-only route and a route with a client."""
    routes: list[dict[str, Any]] = [
        {
            "name": "default",
            "credential": "publer",
            "workspace_id": WORKSPACE,
            "scopes": ["posts", "media", "accounts", "job_status", "users"],
        },
        {
            "name": "reader",
            "prefix": "/ro",
            "credential": "publer",
            "workspace_id": WORKSPACE,
            "scopes": ["posts"],
            "read_only": True,
        },
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "workspace_ids": [WORKSPACE, "aaaaaaaaaaaaaaaaaaaaaaaa"],
            "scopes": ["posts"],
            "clients": [{"name": "scheduler", "token_sha256": hash_token(CLIENT_TOKEN)}],
        },
    ]
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, routes=routes)
    config["upstream"]["max_body_bytes"] = MAX_BODY
    server = start_proxy(tmp_path_factory.mktemp("proxy"), config)
    yield server
    server.stop()


@pytest.fixture
def upstream(sandbox: Sandbox) -> Sandbox:
    """The sandbox with its recording cleared."""
    sandbox.clear()
    return sandbox


def _headers(record: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in record["headers"] if key == name]


def raw_request(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the proxy and return all it answers before closing."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_key_and_workspace_are_injected(proxy: Proxy, upstream: Sandbox, api_key: str) -> None:
    """The key reaches Publer as Bearer-API with the route's workspace; the client's own
    Authorization, cookies and forwarding headers never do."""
    answer = httpx.get(
        f"{proxy.url}/api/v1/posts",
        headers={
            "Authorization": "Bearer-API stolen-or-stale-key",
            "Cookie": "session=abc",
            "X-Forwarded-For": "10.0.0.1",
            "Forwarded": "for=10.0.0.1",
            "Via": "1.1 other",
            "X-Real-IP": "10.0.0.1",
            "Proxy-Authorization": "Basic eA==",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "drop me",
            "X-App": "kept",
        },
    )
    assert answer.status_code == 200, answer.text
    [record] = upstream.requests()
    assert _headers(record, "authorization") == [f"Bearer-API {api_key}"]
    assert _headers(record, "publer-workspace-id") == [WORKSPACE]
    names = {key for key, _ in record["headers"]}
    for dropped in (
        "cookie",
        "x-forwarded-for",
        "forwarded",
        "via",
        "x-real-ip",
        "proxy-authorization",
        "x-secret-hop",
        "connection",
    ):
        assert dropped not in names
    assert _headers(record, "x-app") == ["kept"]
    assert _headers(record, "host") == [upstream.url.removeprefix("http://")]
    assert answer.headers["x-request-id"] == _headers(record, "x-request-id")[0]


def test_client_workspace_header_is_replaced_or_refused(proxy: Proxy, upstream: Sandbox) -> None:
    """A client may pick one of the route's workspaces; any other is workspace_denied."""
    picked = httpx.get(
        f"{proxy.url}/team/api/v1/posts",
        headers={
            "Authorization": f"Bearer {CLIENT_TOKEN}",
            "Publer-Workspace-Id": "aaaaaaaaaaaaaaaaaaaaaaaa",
        },
    )
    assert picked.status_code == 200, picked.text
    [record] = upstream.requests()
    assert _headers(record, "publer-workspace-id") == ["aaaaaaaaaaaaaaaaaaaaaaaa"]
    assert _headers(record, "authorization") != [f"Bearer {CLIENT_TOKEN}"]
    upstream.clear()
    refused = httpx.get(
        f"{proxy.url}/api/v1/posts", headers={"Publer-Workspace-Id": "ffffffffffffffffffffffff"}
    )
    assert refused.status_code == 403
    assert refused.json()["code"] == "workspace_denied"
    assert upstream.requests() == []


REFUSALS: list[tuple[str, str, dict[str, str], int, str]] = [
    ("GET", "/api/v1/%2e%2e/admin", {}, 400, "bad_path"),
    ("GET", "/api/v1/analytics/charts", {}, 403, "scope_denied"),
    ("GET", "/api/v1/admin/keys", {}, 403, "unknown_endpoint"),
    ("PATCH", "/api/v1/posts", {}, 403, "method_denied"),
    ("POST", "/ro/api/v1/posts", {}, 403, "method_denied"),
    ("GET", "/team/api/v1/posts", {}, 401, "client_unauthenticated"),
    (
        "GET",
        "/team/api/v1/posts",
        {"Authorization": "Bearer-API wrong"},
        401,
        "client_unauthenticated",
    ),
    (
        "GET",
        "/api/v1/posts",
        {"Publer-Workspace-Id": "bbbbbbbbbbbbbbbbbbbbbbbb"},
        403,
        "workspace_denied",
    ),
    ("GET", "/nothing/here", {}, 404, "no_route"),
    ("GET", "/", {}, 404, "no_route"),
    ("POST", "/api/v1/posts", {"Content-Length": str(MAX_BODY + 1)}, 413, "body_too_large"),
]


@pytest.mark.parametrize(("method", "path", "headers", "status", "code"), REFUSALS)
def test_refusals_never_reach_publer(
    proxy: Proxy,
    upstream: Sandbox,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    """Each proxy refusal comes in Publer's envelope, and Publer saw nothing."""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if "Content-Length" not in headers and method in ("POST", "PATCH"):
        head += "Content-Length: 2\r\n\r\n{}"
    else:
        head += "\r\n"
    answer = raw_request(proxy.url, head.encode())
    status_line, _, rest = answer.partition(b"\r\n")
    assert int(status_line.split()[1]) == status, answer
    headers_blob, _, body = rest.partition(b"\r\n\r\n")
    assert f"x-publer-proxy-error: {code}".encode() in headers_blob.lower()
    payload = httpx.Response(status, content=body).json()
    assert payload["code"] == code and payload["errors"] and payload["request_id"]
    assert upstream.requests() == []


def test_query_string_is_forwarded_byte_for_byte(proxy: Proxy, upstream: Sandbox) -> None:
    """Query strings reach Publer exactly as sent, escapes and array brackets included."""
    query = "page=0&accounts[]=a1&accounts[]=a2&q=%41%2f+b&empty=&flag&x=%7E~"
    answer = raw_request(
        proxy.url,
        f"GET /api/v1/posts?{query} HTTP/1.1\r\nHost: localhost\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer
    [record] = upstream.requests()
    assert record["query"] == query
    assert record["path"] == "/api/v1/posts"


def test_non_ascii_header_value_is_refused_before_the_hop(proxy: Proxy, upstream: Sandbox) -> None:
    """A header value with obs-text (legal in HTTP/1.1, never in Publer's headers) is
    refused with 400 bad_request naming the header, and nothing reaches Publer: the HTTP
    client would re-encode it as UTF-8, so it could not pass byte for byte."""
    answer = raw_request(
        proxy.url,
        b"GET /api/v1/posts HTTP/1.1\r\nHost: localhost\r\nX-Note: caf\xe9 \x80\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"x-publer-proxy-error: bad_request" in answer
    assert b"'x-note'" in answer
    assert upstream.requests() == []


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE"])
def test_methods_and_bodies_are_forwarded(proxy: Proxy, upstream: Sandbox, method: str) -> None:
    """Every method Publer uses passes with its body; the sandbox counted the same bytes."""
    path = {
        "GET": "/posts",
        "HEAD": "/posts",
        "POST": "/posts/schedule",
        "PUT": "/posts/5f8d7a62c9e77e001f36e3a1",
        "DELETE": "/posts",
    }[method]
    body = b'{"bulk": {"state": "scheduled", "posts": []}}' if method in ("POST", "PUT") else None
    answer = httpx.request(
        method,
        f"{proxy.url}/api/v1{path}",
        content=body,
        headers={"Content-Type": "application/json"} if body else {},
    )
    assert answer.status_code < 500
    assert "x-publer-proxy-error" not in answer.headers
    [record] = upstream.requests()
    assert record["method"] == method
    assert record["body_bytes"] == len(body or b"")


def test_set_cookie_values_are_not_joined(proxy: Proxy, upstream: Sandbox) -> None:
    """Repeated response headers keep each value."""
    answer = httpx.get(f"{proxy.url}/api/v1/users/me")
    assert answer.status_code == 200
    assert len(answer.headers.get_list("set-cookie")) == 2


def test_upstream_redirect_is_passed_not_followed(proxy: Proxy, upstream: Sandbox) -> None:
    """A 3xx from Publer goes to the client as is; tested with the sandbox's 404/405."""
    answer = httpx.get(f"{proxy.url}/api/v1/job_status/unknownjob")
    assert answer.status_code == 404
    assert "x-publer-proxy-error" not in answer.headers
    assert answer.json()["errors"]


def test_ops_endpoints(proxy: Proxy) -> None:
    """/healthz, /readyz and /metrics answer, and /readyz never shows a key."""
    assert httpx.get(f"{proxy.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{proxy.url}/readyz")
    assert ready.status_code == 200
    state = ready.json()["credentials"]["publer"]
    assert state["state"] == "fresh" and state["key"].startswith("***")
    assert "publer_proxy_requests_total" in httpx.get(f"{proxy.url}/metrics").text


def test_access_log_has_every_field(proxy: Proxy, upstream: Sandbox, api_key: str) -> None:
    """One access event per request with its documented fields, the key masked."""
    answer = httpx.get(
        f"{proxy.url}/api/v1/accounts?secret_query=1", headers={"X-Request-Id": "trace-abcdef-123"}
    )
    assert answer.headers["x-request-id"] == "trace-abcdef-123"
    event = proxy.access_event("trace-abcdef-123")
    assert event["route"] == "default" and event["scope"] == "accounts"
    assert event["method"] == "GET" and event["path"] == "/api/v1/accounts"
    assert event["decision"] == "allowed" and event["status"] == 200
    assert event["upstream_status"] == 200 and event["duration_ms"] > 0
    assert event["key"] == "***" + api_key[-4:] and event["key_version"] >= 1
    assert "secret_query" not in str(event)


def test_upstream_unreachable_and_timeout(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A closed upstream port is 502 upstream_unreachable; a slow one 504 upstream_timeout."""
    closed = start_proxy(
        tmp_path / "closed",
        proxy_config(bao.url, f"http://127.0.0.1:{free_port()}", token_file=token_file),
    )
    try:
        answer = httpx.post(f"{closed.url}/api/v1/posts", json={})
        assert answer.status_code == 502 and answer.json()["code"] == "upstream_unreachable"
    finally:
        closed.stop()
    config = proxy_config(bao.url, sandbox.url, token_file=token_file)
    config["upstream"]["read_timeout_seconds"] = 0.5
    slow = start_proxy(tmp_path / "slow", config)
    try:
        sandbox.fault(delay_seconds=3, count=1)
        answer = httpx.post(f"{slow.url}/api/v1/posts", json={}, timeout=10)
        assert answer.status_code == 504 and answer.json()["code"] == "upstream_timeout"
    finally:
        slow.stop()
        sandbox.fault(delay_seconds=0, count=0)
