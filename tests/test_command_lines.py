"""No secret on the command line of any process the project starts.

Every user of a machine can read every command line (/proc/PID/cmdline, `ps`); only the
process's own user can read its environment (/proc/PID/environ). So secrets travel to
child processes in their environment, and each child gets only the ones it needs.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bao import Bao, free_port
from tests.servers import Sandbox, proxy_config, start_proxy, start_redis
from tests.test_devstack import REPO, descendants, wait_ready


def command_line(pid: int) -> str:
    """The process's command line, arguments joined by spaces ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def environment(pid: int) -> str:
    """The process's environment as it started, entries joined by newlines."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode()
    except OSError:
        return ""


def parent_of(pid: int) -> int:
    """The parent process id, from /proc."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def root_token_of(pids: set[int]) -> tuple[int, str]:
    """The OpenBao process among `pids` and its root token, from its environment (or from
    its command line, where the test that calls this must then fail)."""
    for pid in pids:
        entries = environment(pid).splitlines() + command_line(pid).split()
        for entry in entries:
            for prefix in (
                "BAO_DEV_ROOT_TOKEN_ID=",
                "VAULT_DEV_ROOT_TOKEN_ID=",
                "-dev-root-token-id=",
            ):
                if entry.startswith(prefix):
                    return pid, entry.removeprefix(prefix)
    raise AssertionError("no OpenBao process with a root token")


@pytest.mark.parametrize(
    ("command", "real_key"),
    [
        (["make", "--no-print-directory", "run"], True),
        ([sys.executable, "-m", "proxy", "dev"], False),
    ],
    ids=["make-run-with-key", "dev-with-sandbox"],
)
def test_local_stack_puts_no_secret_on_a_command_line(
    tmp_path: Path, command: list[str], real_key: bool
) -> None:
    """`make run` (with PUBLER_API_KEY) and `publer-proxy dev` (with the sandbox): no
    process of the stack has the root token or the key on its command line; OpenBao
    alone holds the root token in its environment, and no child holds the API key."""
    port = free_port()
    key = "pk_cmdline_" + secrets.token_hex(20)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "PUBLER_"))}
    if real_key:
        env.update(PUBLER_API_KEY=key, PUBLER_WORKSPACE_ID="5f8d7a62c9e77e001f36e3a1")
    args = [*command, f"PORT={port}"] if command[0] == "make" else [*command, "--port", str(port)]
    log = tmp_path / "stack.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, log)
        children = descendants(process.pid)
        bao_pid, root_token = root_token_of(children)
        lines = {pid: command_line(pid) for pid in children | {process.pid}}
        assert any("bao server -dev" in line for line in lines.values()), lines
        if not real_key:
            assert any(" sandbox " in line for line in lines.values()), lines
        for pid, line in lines.items():
            assert root_token not in line, f"the root token is on the command line {pid}"
            assert key not in line, f"the API key is on the command line {pid}"
        # The stack is whatever `publer-proxy dev` (OpenBao's parent) started; make and its
        # shell pass the user's PUBLER_API_KEY on to it, as they must.
        stack = descendants(parent_of(bao_pid))
        for pid in stack:
            held = environment(pid)
            assert key not in held, f"a child holds the API key it does not need: {lines[pid]}"
            if pid != bao_pid:
                assert root_token not in held, f"a child holds the root token: {lines[pid]}"
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_test_stack_puts_no_secret_on_a_command_line(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """OpenBao, the sandbox, the proxy and redis-server as the tests start them (and every
    other process below this test run): none has the key or the root token on its command
    line."""
    redis = start_redis(tmp_path / "redis")
    rate_limit = {"requests": 100000, "per_seconds": 120, "redis_url": redis.url}
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, rate_limit=rate_limit)
    proxy = start_proxy(tmp_path / "proxy", config)
    try:
        lines = {pid: command_line(pid) for pid in descendants(os.getpid())}
    finally:
        assert proxy.stop() == 0
        redis.stop()
    for started in ("bao server -dev", " sandbox ", " serve --config ", "redis-server"):
        assert any(started in line for line in lines.values()), (started, lines)
    for pid, line in lines.items():
        assert api_key not in line, f"the API key is on the command line {pid}: {line}"
        assert bao.root_token not in line, f"the root token is on the command line {pid}"
