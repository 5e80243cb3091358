"""The command line, run as the user runs it: a real process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.rules.policy import hash_token
from tests.bao import Bao, free_port
from tests.servers import Sandbox, proxy_config, start_proxy, start_sandbox
from tests.waiting import eventually

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` in a child process, HOME isolated."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=child_env,
        timeout=timeout,
        check=False,
    )


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "proxy.yaml") -> Path:
    """Write a config dict as YAML and return its path."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_prints_effective_routes() -> None:
    """`check` on the shipped example config exits 0 and prints each route's fields."""
    result = run_cli("check", "--config", str(REPO / "config" / "proxy.yaml"))
    assert result.returncode == 0, result.stderr
    for field in ("route default", "prefix:", "workspace:", "scopes:", "methods:", "clients:"):
        assert field in result.stdout


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["listen"].update(prot=1), "listen.prot: unknown key"),
        (lambda c: c["routes"][0].update(credential="nope"), "routes.0.credential"),
        (lambda c: c["routes"][0].update(scopes=["posts", "analytcs"]), "routes.0.scopes"),
        (
            lambda c: c["credentials"]["publer"].update(kv_version=3),
            "credentials.publer.kv_version",
        ),
        (lambda c: c["upstream"].update(url="http://publer.example.com"), "upstream.url"),
        (lambda c: c["listen"].update(host="0.0.0.0"), "routes.0.clients"),
        (
            lambda c: c["routes"][0].update(clients=[{"name": "a", "token_sha256": "abc"}]),
            "routes.0.clients.0.token_sha256",
        ),
        (lambda c: c["vault"]["auth"].update(method="approle"), "vault.auth"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path: Path, mutate: Any, expected: str) -> None:
    """Each config mistake exits 1 with a line naming its key path, never a traceback,
    from both `check` and `serve`."""
    config = proxy_config("http://127.0.0.1:8200", "http://127.0.0.1:9")
    mutate(config)
    path = write_config(tmp_path, config)
    for command in ("check", "serve"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_missing_config_file_says_how_to_fix(tmp_path: Path) -> None:
    """A missing file is named, with the ways to point at one."""
    result = run_cli("check", env={"PUBLER_PROXY_CONFIG": str(tmp_path / "none.yaml")})
    assert result.returncode == 1
    assert "none.yaml" in result.stderr and "--config" in result.stderr


def test_hash_token_matches_the_policy_digest() -> None:
    """`hash-token` prints the digest that `clients` compares against."""
    result = run_cli("hash-token", stdin="my-client-token\n")
    assert result.returncode == 0
    assert result.stdout.strip() == hash_token("my-client-token")
    assert result.stdout.strip().startswith("sha256:")
    assert "my-client-token" not in result.stdout
    assert run_cli("hash-token", stdin="").returncode == 1


@pytest.fixture(scope="module")
def judging_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox knowing a good key, a revoked key and a key without the workspaces scope."""
    server = start_sandbox(
        tmp_path_factory.mktemp("judge"), "pk_good_0123456789", "pk_narrow_0123456789=posts"
    )
    server.set_keys(
        {"key": "pk_good_0123456789"},
        {"key": "pk_revoked_0123456789", "revoked": True},
        {"key": "pk_narrow_0123456789", "scopes": ["posts"]},
    )
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("key", "code", "words"),
    [
        ("pk_good_0123456789", 0, "Publer accepts the key"),
        ("pk_revoked_0123456789", 2, "revoked"),
        ("pk_narrow_0123456789", 0, "lacks scope 'users'"),
    ],
)
def test_check_online_tells_good_revoked_and_underscoped_keys(
    tmp_path: Path,
    bao: Bao,
    token_file: Path,
    judging_sandbox: Sandbox,
    key: str,
    code: int,
    words: str,
) -> None:
    """`check --online` reads the key from Vault, prints it masked with its version and
    age, and turns Publer's answer into the key guide's words."""
    path = f"online/{key.split('_')[1]}"
    version = bao.write_key(path, key)
    config = proxy_config(
        bao.url, judging_sandbox.url, token_file=token_file, credential={"path": path}
    )
    result = run_cli("check", "--online", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == code, result.stdout + result.stderr
    assert words in result.stdout
    assert f"key ***{key[-4:]}" in result.stdout
    assert f"KV version {version}" in result.stdout and "days ago" in result.stdout
    assert key not in result.stdout + result.stderr


def test_check_online_exit_2_when_vault_is_down(tmp_path: Path, token_file: Path) -> None:
    """Vault unreachable: exit 2 with the reason, no traceback."""
    config = proxy_config(
        f"http://127.0.0.1:{free_port()}", "http://127.0.0.1:9", token_file=token_file
    )
    result = run_cli("check", "--online", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    assert "unreachable" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def _in_use_connections(client: httpx.Client) -> float:
    """The proxy's gauge of connections to Publer held by a request."""
    text = client.get("/metrics").text
    series = 'publer_proxy_upstream_connections{state="in_use"}'
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match is not None, series
    return float(match.group(1))


def test_sigterm_lets_a_slow_upload_finish(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """SIGTERM during a slow upload: the upload completes with 200, then exit 0."""
    proxy = start_proxy(tmp_path, proxy_config(bao.url, sandbox.url, token_file=token_file))
    outcome: dict[str, Any] = {}
    signalled = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield b"x" * 64 * 1024
        # The rest is sent only once SIGTERM went out, so the signal lands mid-upload.
        signalled.wait(60)
        for _ in range(19):
            time.sleep(0.1)  # the pacing that makes the upload slow
            yield b"x" * 64 * 1024

    def upload() -> None:
        outcome["status"] = httpx.post(
            f"{proxy.url}/api/v1/media",
            content=slow_body(),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(20 * 64 * 1024),
            },
            timeout=30,
        ).status_code

    thread = threading.Thread(target=upload)
    thread.start()
    # In flight: the proxy holds a connection to the sandbox and streams the body to it.
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as client:
        eventually(lambda: _in_use_connections(client) == 1, timeout=60)
    proxy.process.send_signal(signal.SIGTERM)
    signalled.set()
    thread.join(30)
    assert proxy.process.wait(30) == 0
    assert outcome["status"] < 500 and outcome["status"] != 499
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proxy.url}/healthz")


def test_serve_on_a_unix_socket(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """`listen.unix_socket` serves there (an open route is allowed: only local processes
    reach it), and forwards with the key."""
    socket_path = tmp_path / "proxy.sock"
    config = proxy_config(bao.url, sandbox.url, token_file=token_file)
    config["listen"] = {"unix_socket": str(socket_path), "host": "0.0.0.0"}
    path = write_config(tmp_path, config)
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():  # httpcore leaks a socket per refused uds connect
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://proxy") as client:
            eventually(lambda: client.get("/readyz").status_code == 200)
            assert client.get("/api/v1/posts").status_code == 200
    finally:
        process.terminate()
        assert process.wait(20) == 0


@pytest.mark.parametrize("spec", ["k=nosuch", "k="])
def test_sandbox_bad_key_spec_is_one_line(spec: str) -> None:
    """A malformed `sandbox --key` is one sentence on stderr and exit 1, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "sandbox", "--port", str(free_port()), "--key", spec],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("sandbox: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""


def test_sandbox_on_a_taken_port_announces_nothing() -> None:
    """`sandbox` on a port another process holds says so in one line, exit 1, and never
    prints the line that says where it serves."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "sandbox", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def one_mistake_per_stage(config: dict[str, Any]) -> list[str]:
    """Put one mistake of each stage into `config`; the key paths each must be named by."""
    same = hash_token("shared-token-0123456789abcdef")
    first = len(config["routes"])
    team = {
        "name": "typo",
        "prefix": "/typo",
        "credential": "publer",
        "workspace_id": "5f8d7a62c9e77e001f36e3a1",
        "scopes": ["posts", "analytcs"],  # not a scope of the scope map
        "clients": [
            {"name": "one", "token_sha256": same},
            {"name": "two", "token_sha256": same},  # the same token twice in one route
        ],
    }
    other = {
        "name": "dangling",
        "prefix": "/dangling",
        "credential": "ghost",  # not a defined credential
        "workspace_id": "5f8d7a62c9e77e001f36e3a1",
        "scopes": ["posts"],
        "clients": [{"name": "three", "token_sha256": same}],  # and across routes
    }
    config["routes"] = [*config["routes"], team, other]
    config["listen"]["prot"] = 1  # an unknown key
    config["rate_limit"] = {"requests": -5, "per_seconds": 120}  # a bad value
    return [
        "listen.prot: unknown key",
        "rate_limit.requests: Input should be greater than 0; correct the value",
        f"routes.{first}.clients.1.token_sha256: client 'two' has the same token as client 'one'",
        f"routes.{first + 1}.clients.0.token_sha256: client 'three' has the same token as"
        " client 'one'",
        f"routes.{first + 1}.credential: 'ghost' is not defined under credentials",
        f"routes.{first}.scopes: 'analytcs' (route 'typo') is not a scope of the scope map",
    ]


def test_every_mistake_of_every_stage_in_one_check(tmp_path: Path) -> None:
    """One run of `check` (and of `serve`) names every mistake of every stage (keys, the
    checks between keys, client tokens, the scope map), each with its key path."""
    config = proxy_config("http://127.0.0.1:8200", "http://127.0.0.1:9")
    expected = one_mistake_per_stage(config)
    path = write_config(tmp_path, config)
    for command in ("check", "serve"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        for line in expected:
            assert line in result.stderr, (line, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
