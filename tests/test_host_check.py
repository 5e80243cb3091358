"""The Host check and browser refusals on the real listeners, over raw sockets: what
reaches the proxy's listener, its operational endpoints, the forward-proxy listener and a
unix socket, and what the access log and metrics say."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.rules.refusals import STATUS
from tests.bao import Bao
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy
from tests.tunnel_stack import start_tunnel_stack
from tests.waiting import eventually


def exchange(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw request head (no body) and read the whole answer (connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, sandbox: Sandbox
) -> Iterator[Proxy]:
    """A proxy on loopback with one open route and one listed browser origin."""
    config = proxy_config(bao.url, sandbox.url, token_file=token_file)
    config["browser"] = {"allowed_origins": ["http://localhost:5173"]}
    server = start_proxy(tmp_path_factory.mktemp("host"), config)
    yield server
    server.stop()


def _port(proxy: Proxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


@pytest.mark.parametrize(
    "path", ["/api/v1/users/me", "/status.json", "/status", "/readyz", "/metrics", "/healthz"]
)
@pytest.mark.parametrize(
    "host", ["attacker.test:{port}", "127.0.0.1:{other}", "localhost:{port}.evil.test"]
)
def test_foreign_host_refused_everywhere(
    proxy: Proxy, sandbox: Sandbox, path: str, host: str
) -> None:
    """Every endpoint refuses a Host that does not name the listener, with 421 host_denied
    in the refusal envelope, and nothing reaches the upstream."""
    port = _port(proxy)
    sandbox.clear()
    named = host.format(port=port, other=port + 1).encode()
    status, headers, body = exchange(
        port,
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + named + b"\r\nConnection: close\r\n\r\n",
    )
    assert status == 421
    assert headers["x-publer-proxy-error"] == "host_denied"
    refusal = json.loads(body)
    assert refusal["code"] == "host_denied" and "listen.allowed_hosts" in refusal["errors"][0]
    assert proxy.access_event(headers["x-request-id"])["decision"] == "host_denied"
    assert sandbox.requests() == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET /api/v1/users/me HTTP/1.1\r\nHost: LOCALHOST.:{port}\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/users/me HTTP/1.1\r\nHost: [::1]:{port}\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/users/me HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/users/me HTTP/1.0\r\n\r\n",
    ],
)
def test_own_names_pass(proxy: Proxy, head: bytes) -> None:
    """Case, a trailing dot, IPv6 brackets, no port, and HTTP/1.0 without Host all pass."""
    status, _headers, _body = exchange(
        _port(proxy), head.replace(b"{port}", str(_port(proxy)).encode())
    )
    assert status == 200


def test_missing_or_double_host_refused(proxy: Proxy) -> None:
    """HTTP/1.1 without Host, or with two, is refused before routing."""
    port = _port(proxy)
    for head in (
        b"GET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nHost: attacker.test\r\n"
        b"Connection: close\r\n\r\n",
    ):
        status, headers, _body = exchange(port, head)
        assert (status, headers["x-publer-proxy-error"]) == (421, "host_denied")


def test_absolute_form_names_no_other_site(proxy: Proxy, sandbox: Sandbox) -> None:
    """An absolute-form request line naming another site is refused even with a good Host."""
    sandbox.clear()
    status, headers, _body = exchange(
        _port(proxy),
        b"GET http://attacker.test/api/v1/users/me HTTP/1.1\r\nHost: localhost\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert status == 400 and headers["x-publer-proxy-error"] == "bad_path"
    assert sandbox.requests() == []


def test_browser_refusal_and_cors(proxy: Proxy, sandbox: Sandbox) -> None:
    """A page of another site gets 403 origin_denied and no CORS header; the listed origin
    gets its preflight answered and Access-Control-Allow-Origin for itself only; metrics
    count the refusals by code."""
    sandbox.clear()
    other = httpx.post(
        f"{proxy.url}/api/v1/posts/schedule",
        headers={"Origin": "http://attacker.test", "Content-Type": "text/plain"},
        content=b"{}",
    )
    assert other.status_code == 403 and other.json()["code"] == "origin_denied"
    assert not [h for h in other.headers if h.lower().startswith("access-control-")]
    fetch_site = httpx.get(f"{proxy.url}/status.json", headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch_site.status_code == 403
    assert sandbox.requests() == []
    listed = {"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site"}
    preflight = httpx.options(
        f"{proxy.url}/api/v1/users/me",
        headers={
            **listed,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert preflight.headers["access-control-allow-headers"] == "authorization"
    assert sandbox.requests() == []
    answer = httpx.get(f"{proxy.url}/api/v1/users/me", headers=listed)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "access-control-allow-credentials" not in answer.headers
    plain = httpx.get(f"{proxy.url}/api/v1/users/me")
    assert not [h for h in plain.headers if h.lower().startswith("access-control-")]
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'publer_proxy_refusals_total{code="origin_denied"}' in metrics


def test_forward_proxy_listener_checks_host(
    tmp_path: Path, bao: Bao, token_file: Path, api_key: str
) -> None:
    """The forward-proxy listener refuses a request addressed to itself under a foreign
    name with host_denied; CONNECT to the upstream still opens a tunnel."""
    stack = start_tunnel_stack(tmp_path, bao, token_file, api_key)
    try:
        head = f"GET /api/v1/users/me HTTP/1.1\r\nHost: attacker.test:{stack.forward_port}\r\n\r\n"
        status, headers, _body = exchange(stack.forward_port, head.encode())
        assert (status, headers["x-publer-proxy-error"]) == (421, "host_denied")
        own = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{stack.forward_port}\r\n\r\n"
        status, headers, _body = exchange(stack.forward_port, own.encode())
        assert headers["x-publer-proxy-error"] == "tunnel_refused"
        with socket.create_connection(("127.0.0.1", stack.forward_port), timeout=10) as sock:
            sock.sendall(b"CONNECT app.publer.com:443 HTTP/1.1\r\nHost: app.publer.com:443\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        assert stack.sandbox.requests() == []
    finally:
        stack.proxy.stop()
        stack.sandbox.stop()


def test_unix_socket_takes_any_host(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """On a unix socket (no browser can open one) Host is not checked unless names are
    listed; the browser refusal still applies."""
    path = tmp_path / "proxy.sock"
    config = proxy_config(bao.url, sandbox.url, token_file=token_file)
    config["listen"] = {"unix_socket": str(path)}
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        eventually(lambda: path.exists() or process.poll() is not None)
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://publer-proxy.sock") as client:
            eventually(lambda: client.get("/readyz").status_code == 200)
            assert client.get("/api/v1/users/me").status_code == 200
            refused = client.get("/api/v1/users/me", headers={"Origin": "http://attacker.test"})
            assert refused.json()["code"] == "origin_denied"
    finally:
        process.terminate()
        assert process.wait(20) == 0


def test_a_refusal_before_routing_is_recorded_like_any_request(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A POST refused for its Host, or as a web page's, gets what every request gets from
    the one access record: its log line, its audit line, the per-client counter and an
    entry among the status page's recent refusals."""
    audit = tmp_path / "audit.log"
    config = proxy_config(bao.url, sandbox.url, token_file=token_file)
    config["audit"] = {"sink": str(audit)}
    proxy = start_proxy(tmp_path / "proxy", config)
    try:
        port = _port(proxy)
        heads = {
            "host_denied": b"Host: attacker.test:%d\r\n" % port,
            "origin_denied": b"Host: 127.0.0.1:%d\r\nOrigin: http://attacker.test\r\n" % port,
        }
        ids = {}
        statuses = {"host_denied": STATUS["host_denied"], "origin_denied": STATUS["origin_denied"]}
        for code, fields in heads.items():
            status, headers, _ = exchange(
                port,
                b"POST /api/v1/posts/schedule HTTP/1.1\r\n"
                + fields
                + b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            )
            assert (status, headers["x-publer-proxy-error"]) == (statuses[code], code)
            ids[code] = headers["x-request-id"]
            assert proxy.access_event(ids[code])["decision"] == code
        eventually(lambda: len(audit.read_text().splitlines()) >= 2)
        audited = [json.loads(line) for line in audit.read_text().splitlines()]
        assert {(line["request_id"], line["decision"]) for line in audited} >= {
            (request_id, code) for code, request_id in ids.items()
        }
        metrics = httpx.get(f"{proxy.url}/metrics").text
        for code, answered in (("host_denied", "421"), ("origin_denied", "403")):
            assert f'publer_proxy_refusals_total{{code="{code}"}} 1.0' in metrics
            labels = ('client="anonymous"', 'route="none"', f'status="{answered}"')
            assert [
                line
                for line in metrics.splitlines()
                if line.startswith("publer_proxy_client_requests_total{")
                and all(label in line for label in labels)
                and line.endswith(" 1.0")
            ]
        recent = httpx.get(f"{proxy.url}/status.json").json()
        assert set(ids.values()) <= {r["request_id"] for r in recent["refusals"]["recent"]}
        assert all("/posts/schedule" not in str(r) for r in sandbox.requests())
    finally:
        proxy.stop()
