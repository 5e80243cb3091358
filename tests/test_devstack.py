"""`make run` and `publer-proxy dev`: up, working, and gone without a trace."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.bao import free_port

REPO = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until /readyz answers 200, or fail with the stack's output."""
    deadline = time.monotonic() + 90  # the first `make run` may still install the venv
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the stack did not become ready:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize(
    ("command", "sig"),
    [
        (["make", "--no-print-directory", "run"], signal.SIGINT),
        ([sys.executable, "-m", "proxy", "dev"], signal.SIGTERM),
    ],
)
def test_local_stack_works_then_leaves_nothing(
    tmp_path: Path, command: list[str], sig: signal.Signals
) -> None:
    """The stack forwards a keyless request with the key from OpenBao to the sandbox,
    prints a curl line, and on Ctrl-C (or SIGTERM) stops everything it started."""
    port = free_port()
    log = tmp_path / "stack.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PUBLER_API_KEY", "PUBLER_WORKSPACE_ID") and not k.startswith("VAULT_")
    }
    env["PORT"] = str(port)
    args = [*command, f"PORT={port}"] if command[0] == "make" else [*command, "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        answer = httpx.get(f"{url}/api/v1/users/me")
        assert answer.status_code == 200, answer.text
        assert "x-publer-proxy-error" not in answer.headers
        started = descendants(process.pid)
        assert len(started) >= 2  # OpenBao and the sandbox (and the proxy, under make)
        deadline = time.monotonic() + 10
        while f"curl -s {url}/api/v1/users/me" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # The lines printed for clients that hard-code Publer's origin work as pasted.
        exports = dict(re.findall(r"export (\w+)=(\S+)", log.read_text()))
        through_tunnel = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "https://app.publer.com/api/v1/users/me"],
            env={"PATH": os.environ["PATH"], **exports},
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert through_tunnel.returncode == 0, through_tunnel.stderr
        assert b"Sandbox User" in through_tunnel.stdout
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)  # what Ctrl-C in a terminal does
        else:
            process.send_signal(sig)
        process.wait(30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if alive(pid)], log.read_text()[-2000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("source", ["file", "env", "aws"])
def test_dev_with_another_key_source(tmp_path: Path, source: str) -> None:
    """`dev --source file|env|aws` serves with the key kept there and no OpenBao, says
    how to rotate it, and leaves nothing running after SIGTERM."""
    port = free_port()
    log = tmp_path / "stack.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUBLER_", "VAULT_", "AWS_"))}
    command = [sys.executable, "-m", "proxy", "dev", "--port", str(port), "--source", source]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        assert httpx.get(f"{url}/api/v1/users/me").status_code == 200
        assert (
            httpx.get(f"{url}/readyz").json()["credentials"]["publer"]["source"]
            == {
                "file": "file",
                "env": "env",
                "aws": "aws_secrets_manager",
            }[source]
        )
        started = descendants(process.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in started]
        assert not any(b"bao" in c for c in commands), commands
        deadline = time.monotonic() + 10
        while "Rotate the key:" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if alive(pid)], log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class _Answers200(BaseHTTPRequestHandler):
    """Another server on the port: it answers 200 to everything, /readyz included."""

    def do_GET(self) -> None:
        body = b'{"status": "ready"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.mark.parametrize(
    "command",
    [["make", "--no-print-directory", "run"], [sys.executable, "-m", "proxy", "dev"]],
    ids=["make run", "publer-proxy dev"],
)
def test_taken_port_is_refused_before_anything_starts(command: list[str]) -> None:
    """With another server answering on the port, the stack exits 1 naming the port and the
    way out, prints nothing that looks like success, and starts no OpenBao or sandbox."""
    occupant = ThreadingHTTPServer(("127.0.0.1", 0), _Answers200)
    port = occupant.server_address[1]
    threading.Thread(target=occupant.serve_forever, daemon=True).start()
    args = [*command, f"PORT={port}"] if command[0] == "make" else [*command, "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "PUBLER_API_KEY"}
    try:
        result = subprocess.run(
            args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        occupant.shutdown()
        occupant.server_close()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"cannot listen on 127.0.0.1:{port}" in output
    assert f"--port {port + 1}" in output
    for success in ("is ready", "curl ", "OpenBao", "route default"):
        assert success not in output, output
    if command[0] != "make":
        assert result.returncode == 1
        assert result.stdout == ""


def _start_stack(
    tmp_path: Path, command: list[str], *, hangup: signal.Handlers = signal.SIG_DFL
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`command` (which runs `dev`) in a session of its own, as a terminal would; ready.

    SIGHUP starts with `hangup` (a terminal's default, whatever the test runner ignores;
    SIG_IGN is what `nohup` gives)."""
    port = free_port()
    log = tmp_path / "stack.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PUBLER_API_KEY", "PUBLER_WORKSPACE_ID") and not k.startswith("VAULT_")
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup),
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, log)
    return process, url, log


def _program(pid: int) -> bytes:
    """The program a process runs (its argv[0]), empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""


def _wait_gone(pids: set[int], log: Path) -> None:
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)], log.read_text()[-2000:]


def test_closed_terminal_stops_the_whole_stack(tmp_path: Path) -> None:
    """A hangup of the terminal's process group (make and the sandbox die of it) stops
    the proxy and OpenBao too: nothing keeps the port or answers 502 afterwards."""
    shell = [
        "bash",
        "-c",
        f'"{sys.executable}" -m proxy dev "$@"; echo "dev exited $?"',
        "shell",
    ]
    process, url, log = _start_stack(tmp_path, shell)
    try:
        started = descendants(process.pid)
        os.killpg(process.pid, signal.SIGHUP)
        _wait_gone(started, log)
        assert "stopping the stack" in log.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_hangup_of_dev_alone_stops_the_whole_stack(tmp_path: Path) -> None:
    """A SIGHUP that reaches only `dev` (its terminal closed, its parent a supervisor that
    lives on) stops everything it started, with status 0: a hangup is not a reload here."""
    process, url, log = _start_stack(tmp_path, [sys.executable, "-m", "proxy", "dev"])
    try:
        started = descendants(process.pid)
        process.send_signal(signal.SIGHUP)
        assert process.wait(60) == 0, log.read_text()[-3000:]
        _wait_gone(started, log)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
        assert "config_reloaded" not in log.read_text()
        assert "its terminal hung up (SIGHUP); stopping the stack" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_nohup_keeps_the_stack_through_a_hangup(tmp_path: Path) -> None:
    """Started with SIGHUP ignored (`nohup make run &`), `dev` and what it started keep
    ignoring it, as nohup asks; SIGTERM still stops everything with status 0."""
    process, url, log = _start_stack(
        tmp_path, [sys.executable, "-m", "proxy", "dev"], hangup=signal.SIG_IGN
    )
    try:
        started = descendants(process.pid)
        # OpenBao catches SIGHUP (it reloads its config); the Python processes ignore it.
        pythons = {pid for pid in started if _program(pid) == _program(process.pid)}
        assert len(pythons) == 1  # the sandbox
        for pid in {process.pid, *pythons}:
            status = Path(f"/proc/{pid}/status").read_text()
            mask = next(s for s in status.splitlines() if s.startswith("SigIgn:")).split()[1]
            assert int(mask, 16) & (1 << (signal.SIGHUP - 1)), f"{pid} would die of a hangup"
        os.killpg(process.pid, signal.SIGHUP)
        assert httpx.get(f"{url}/api/v1/users/me").status_code == 200
        assert all(alive(pid) for pid in started)
        process.terminate()
        assert process.wait(60) == 0, log.read_text()[-3000:]
        _wait_gone(started, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_terminate_while_openbao_starts_stops_it_too(tmp_path: Path) -> None:
    """SIGTERM while `dev` is still starting (OpenBao up, the proxy not yet) ends `dev`
    with status 0 and stops the OpenBao it had started: nothing is left running."""
    port = free_port()
    log = tmp_path / "stack.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PUBLER_API_KEY",)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "dev", "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        bao: set[int] = set()
        while not bao:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            bao = {pid for pid in descendants(process.pid) if _program(pid).endswith(b"/bao")}
            time.sleep(0.01)
        process.terminate()
        assert process.wait(60) == 0, log.read_text()
        _wait_gone(bao, log)
        assert "Traceback" not in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_dead_sandbox_stops_the_stack_and_says_so(tmp_path: Path) -> None:
    """When a process of the stack ends (here the sandbox), dev names it and stops the
    rest, rather than answering 502 for ever."""
    process, _url, log = _start_stack(tmp_path, [sys.executable, "-m", "proxy", "dev"])
    try:
        started = descendants(process.pid)
        sandboxes = [
            pid for pid in started if b"sandbox" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(sandboxes) == 1
        os.kill(sandboxes[0], signal.SIGKILL)
        assert process.wait(30) == 0
        _wait_gone(started, log)
        assert "the Publer sandbox exited" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_dev_config_reloads_and_readyz_shows_its_digest(tmp_path: Path) -> None:
    """/readyz shows the sha256 of the config file dev printed, and an edit of that file
    is applied without a restart."""
    process, url, log = _start_stack(tmp_path, [sys.executable, "-m", "proxy", "dev"])
    try:
        deadline = time.monotonic() + 10
        while "PUBLER_PROXY_CONFIG=" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        config = Path(
            dict(re.findall(r"export (\w+)=(\S+)", log.read_text()))["PUBLER_PROXY_CONFIG"]
        )
        digest = hashlib.sha256(config.read_bytes()).hexdigest()
        assert httpx.get(f"{url}/readyz").json()["config"]["sha256"] == digest
        assert httpx.get(f"{url}/api/v1/users/me").status_code == 200
        data = yaml.safe_load(config.read_text())
        default = next(route for route in data["routes"] if route["name"] == "default")
        default["scopes"] = [scope for scope in default["scopes"] if scope != "users"]
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        edited = hashlib.sha256(config.read_bytes()).hexdigest()
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/readyz").json()["config"]["sha256"] != edited:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        refused = httpx.get(f"{url}/api/v1/users/me")
        assert refused.status_code == 403
        assert refused.json()["code"] == "scope_denied"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
