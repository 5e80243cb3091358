"""Real clients that hard-code https://app.publer.com, unchanged, through the forward proxy.

Each client runs as its own process with only environment variables set (HTTPS_PROXY and
the CA bundle variable of its ecosystem). For each: the stand-in of Publer received the
key, the client never saw it, and the route was the one its token selects.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bao import Bao
from tests.tunnel_stack import (
    AGENT_WORKSPACE,
    CLIENTS_DIR,
    OPEN_WORKSPACE,
    PUBLER_HOST,
    TunnelStack,
    start_tunnel_stack,
)

# An endpoint that takes a workspace: the workspace Publer gets tells which route served it.
ACCOUNTS = f"https://{PUBLER_HOST}/api/v1/accounts"
NODE_MODULES = CLIENTS_DIR / "node_modules"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, api_key: str
) -> Iterator[TunnelStack]:
    """The proxy with its forward-proxy listener, in front of app.publer.com's stand-in."""
    built = start_tunnel_stack(tmp_path_factory.mktemp("tunnel"), bao, token_file, api_key)
    yield built
    built.proxy.stop()
    built.sandbox.stop()


def run_client(args: list[str], env: dict[str, str]) -> str:
    """Run a client to its end; everything it printed (stdout and stderr)."""
    done = subprocess.run(args, env=env, capture_output=True, timeout=60, check=False)
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, output
    return output


def last_request(stack: TunnelStack) -> dict[str, Any]:
    """The last request the stand-in of Publer received."""
    received = stack.sandbox.requests()
    assert received, "the stand-in received nothing"
    return received[-1]


def header(request: dict[str, Any], name: str) -> list[str]:
    """Every value of one header of a recorded request."""
    return [value for key, value in request["headers"] if key.lower() == name]


def assert_keyed_call(stack: TunnelStack, api_key: str, output: str, workspace: str) -> None:
    """The stand-in got the key and the route's workspace; the client saw no key."""
    request = last_request(stack)
    assert request["path"] == "/api/v1/accounts"
    assert header(request, "authorization") == [f"Bearer-API {api_key}"]
    assert header(request, "publer-workspace-id") == [workspace]
    assert header(request, "host") == [PUBLER_HOST]
    assert api_key not in output
    assert "Sandbox Page" in output


def test_curl_with_proxy_authorization(stack: TunnelStack, api_key: str) -> None:
    """curl with HTTPS_PROXY carrying the client token and CURL_CA_BUNDLE reaches Publer keyed."""
    stack.sandbox.clear()
    env = stack.env(HTTPS_PROXY=stack.forward_url_with_token(), CURL_CA_BUNDLE=str(stack.ca_file))
    output = run_client(["curl", "-sS", "--fail-with-body", ACCOUNTS], env)
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)


def test_python_requests_with_token_as_api_key(stack: TunnelStack, api_key: str) -> None:
    """requests, keyed with the client token as its "API key", honours the environment."""
    stack.sandbox.clear()
    code = (
        "import os, requests\n"
        "headers = {'Authorization': 'Bearer-API ' + os.environ['KEY']}\n"
        f"r = requests.get({ACCOUNTS!r}, headers=headers)\n"
        "print(r.status_code, r.text)\n"
        "assert r.status_code == 200\n"
    )
    env = stack.env(
        HTTPS_PROXY=stack.forward_url,
        REQUESTS_CA_BUNDLE=str(stack.ca_file),
        KEY=stack.client_token,
    )
    output = run_client([sys.executable, "-c", code], env)
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)


def test_httpx_with_ssl_cert_file(stack: TunnelStack, api_key: str) -> None:
    """httpx honours HTTPS_PROXY (with the token) and SSL_CERT_FILE."""
    stack.sandbox.clear()
    code = (
        "import httpx\n"
        f"r = httpx.get({ACCOUNTS!r}, headers={{'Authorization': 'Bearer-API not-the-key'}})\n"
        "print(r.status_code, r.text)\n"
        "assert r.status_code == 200\n"
    )
    env = stack.env(HTTPS_PROXY=stack.forward_url_with_token(), SSL_CERT_FILE=str(stack.ca_file))
    output = run_client([sys.executable, "-c", code], env)
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)
    # The client's own Authorization went nowhere: the tunnel's token stood for it.
    assert "not-the-key" not in json.dumps(stack.sandbox.requests())


def test_python_sdk_with_hard_coded_origin(stack: TunnelStack, api_key: str) -> None:
    """A stdlib SDK with the origin hard-coded, given the client token as its key."""
    stack.sandbox.clear()
    env = stack.env(
        HTTPS_PROXY=stack.forward_url,
        SSL_CERT_FILE=str(stack.ca_file),
        PUBLER_API_KEY=stack.client_token,
    )
    output = run_client([sys.executable, str(CLIENTS_DIR / "publer_sdk.py")], env)
    assert json.loads(output)["status"] == 200
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)


def test_open_route_without_any_token(stack: TunnelStack, api_key: str) -> None:
    """A client with no token at all is served by the open route (loopback only)."""
    stack.sandbox.clear()
    env = stack.env(HTTPS_PROXY=stack.forward_url, CURL_CA_BUNDLE=str(stack.ca_file))
    output = run_client(["curl", "-sS", "--fail-with-body", ACCOUNTS], env)
    assert_keyed_call(stack, api_key, output, OPEN_WORKSPACE)


def node_env(stack: TunnelStack, **extra: str) -> dict[str, str]:
    """Node with fetch honouring HTTPS_PROXY, and the CA: Node's own switch from Node 24,
    else undici's EnvHttpProxyAgent loaded before the app."""
    version = subprocess.run([node(), "--version"], capture_output=True, check=True, timeout=30)
    major = int(version.stdout.decode().lstrip("v").split(".")[0])
    if major >= 24:
        switch = {"NODE_USE_ENV_PROXY": "1"}
    else:
        if not (NODE_MODULES / "undici").is_dir():
            pytest.fail("undici is not in tests/clients: run `make test` (it installs it)")
        switch = {"NODE_OPTIONS": f"--import={(CLIENTS_DIR / 'env-proxy.mjs').as_uri()}"}
    return stack.env(
        HTTPS_PROXY=stack.forward_url,
        NODE_EXTRA_CA_CERTS=str(stack.ca_file),
        **switch,
        **extra,
    )


def node() -> str:
    """The node binary."""
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not installed; the forward-proxy tests run Node clients")
    return found


def test_node_fetch(stack: TunnelStack, api_key: str) -> None:
    """Node's fetch honouring the environment reaches Publer keyed, with the token inside."""
    stack.sandbox.clear()
    headers = json.dumps({"Authorization": f"Bearer-API {stack.client_token}"})
    script = str(CLIENTS_DIR / "node_fetch.mjs")
    output = run_client([node(), script, ACCOUNTS, headers], node_env(stack))
    assert json.loads(output)["status"] == 200
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)


def test_node_sdk_with_hard_coded_origin(stack: TunnelStack, api_key: str) -> None:
    """A Node SDK with the origin hard-coded, given the client token as its key."""
    stack.sandbox.clear()
    env = node_env(stack, PUBLER_API_KEY=stack.client_token)
    output = run_client([node(), str(CLIENTS_DIR / "publer_sdk.mjs")], env)
    assert json.loads(output)["status"] == 200
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)


def test_tunnel_requests_are_logged_and_counted(stack: TunnelStack) -> None:
    """A tunnelled request gets the reverse proxy's access event and metrics, marked as such."""
    stack.sandbox.clear()
    env = stack.env(HTTPS_PROXY=stack.forward_url_with_token(), CURL_CA_BUNDLE=str(stack.ca_file))
    output = run_client(["curl", "-sS", "-D", "-", "-o", "/dev/null", ACCOUNTS], env)
    request_id = next(
        line.split(":", 1)[1].strip()
        for line in output.splitlines()
        if line.lower().startswith("x-request-id:")
    )
    event = stack.proxy.access_event(request_id)
    assert event["via"] == "tunnel"
    assert event["route"] == "agents"
    assert event["client"] == "agent"
    assert event["decision"] == "allowed"
    assert event["path"] == "/agents/api/v1/accounts"
    metrics = run_client(["curl", "-sS", f"{stack.proxy.url}/metrics"], stack.env())
    assert 'publer_proxy_tunnels_total{outcome="opened"}' in metrics
    assert 'route="agents",scope="accounts",status="200"' in metrics


def test_check_reports_the_running_ca(stack: TunnelStack) -> None:
    """`check` prints the fingerprint and expiry of the CA the running proxy made."""
    started = next(e for e in stack.proxy.events() if e.get("event") == "forward_proxy_listening")
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(stack.proxy.config_path)],
        capture_output=True,
        timeout=60,
        check=False,
        env=stack.env(),
    )
    output = done.stdout.decode()
    assert done.returncode == 0, output + done.stderr.decode()
    assert f"CA sha256:  {started['ca_fingerprint_sha256']}" in output
    assert f"CA expires: {started['ca_not_after'][:10]}" in output
    assert "app.publer.com only (critical name constraint" in output


def test_sigterm_with_a_tunnel_open(
    tmp_path: Path, bao: Bao, token_file: Path, api_key: str
) -> None:
    """SIGTERM with an idle tunnel open: the proxy exits 0 and the forward port is closed."""
    import socket
    import ssl

    own = start_tunnel_stack(tmp_path, bao, token_file, api_key)
    try:
        sock = socket.create_connection(("127.0.0.1", own.forward_port), timeout=10)
        sock.sendall(f"CONNECT {PUBLER_HOST}:443 HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
        context = ssl.create_default_context(cafile=str(own.ca_file))
        tls = context.wrap_socket(sock, server_hostname=PUBLER_HOST)
        tls.sendall(f"GET /api/v1/accounts HTTP/1.1\r\nHost: {PUBLER_HOST}\r\n\r\n".encode())
        assert tls.recv(100).startswith(b"HTTP/1.1 200 ")
        assert own.proxy.stop() == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", own.forward_port), timeout=2).close()
        tls.close()
    finally:
        own.proxy.stop()
        own.sandbox.stop()


def test_sigterm_lets_a_tunnelled_request_finish(
    tmp_path: Path, bao: Bao, token_file: Path, api_key: str
) -> None:
    """SIGTERM while a request inside a tunnel waits for Publer: the forward port closes at
    once, the request still gets its 200, then the proxy exits 0."""
    import re
    import socket
    import ssl

    import httpx

    from tests.waiting import eventually

    own = start_tunnel_stack(tmp_path, bao, token_file, api_key)
    try:
        own.sandbox.fault(delay_seconds=3, count=1)
        sock = socket.create_connection(("127.0.0.1", own.forward_port), timeout=30)
        sock.sendall(f"CONNECT {PUBLER_HOST}:443 HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
        context = ssl.create_default_context(cafile=str(own.ca_file))
        tls = context.wrap_socket(sock, server_hostname=PUBLER_HOST)
        tls.sendall(f"GET /api/v1/accounts HTTP/1.1\r\nHost: {PUBLER_HOST}\r\n\r\n".encode())
        series = re.compile(r'^publer_proxy_upstream_connections\{state="in_use"\} 1(\.0)?$', re.M)
        with httpx.Client(base_url=own.proxy.url, trust_env=False, timeout=10) as client:
            eventually(lambda: series.search(client.get("/metrics").text) is not None)
        own.proxy.process.send_signal(signal.SIGTERM)
        eventually(lambda: _refused(own.forward_port))
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert own.proxy.process.wait(30) == 0
        tls.close()
    finally:
        own.proxy.stop()
        own.sandbox.stop()


def _refused(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_client_added_by_reload_opens_tunnels(
    tmp_path: Path, bao: Bao, token_file: Path, api_key: str
) -> None:
    """A client token added to a route by a live reload (SIGHUP) is accepted on CONNECT at
    once, and its requests go to that route."""
    import secrets
    import signal

    import yaml

    from proxy.rules.policy import hash_token
    from tests.waiting import eventually

    own = start_tunnel_stack(tmp_path, bao, token_file, api_key)
    try:
        new_token = "ct_" + secrets.token_hex(16)
        with_new = f"http://late:{new_token}@127.0.0.1:{own.forward_port}"
        env = own.env(HTTPS_PROXY=with_new, CURL_CA_BUNDLE=str(own.ca_file))
        before = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", ACCOUNTS],
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert before.returncode != 0  # curl: the proxy refused the CONNECT (407)
        config = yaml.safe_load(own.proxy.config_path.read_text())
        config["routes"][0]["clients"].append(
            {"name": "late", "token_sha256": hash_token(new_token)}
        )
        own.proxy.config_path.write_text(yaml.safe_dump(config))
        own.proxy.process.send_signal(signal.SIGHUP)
        eventually(
            lambda: any(e.get("event") == "config_reloaded" for e in own.proxy.events()),
            timeout=15,
        )
        own.sandbox.clear()
        output = run_client(["curl", "-sS", "--fail-with-body", ACCOUNTS], env)
        assert_keyed_call(own, api_key, output, AGENT_WORKSPACE)
    finally:
        own.proxy.stop()
        own.sandbox.stop()
