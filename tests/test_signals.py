"""SIGHUP and SIGTERM at any moment of `serve`'s life, from its first instruction on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.servers import Sandbox, proxy_config

SIGHUP_BIT = 1 << (signal.SIGHUP - 1)
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)
# Shared objects that the command line's imports load (the config model, YAML, the loop):
# none of them is needed to put the signal handlers in place.
HEAVY = ("_pydantic_core", "_yaml", "uvloop")


def _caught(pid: int) -> int:
    """The process's mask of caught signals (SigCgt), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(
        next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16
    )


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _serve(
    tmp_path: Path, sandbox: Sandbox, api_key: str
) -> tuple[subprocess.Popen[bytes], str, Path]:
    key_file = tmp_path / "api_key"
    key_file.write_text(api_key)
    key_file.chmod(0o600)
    config = proxy_config("http://127.0.0.1:9", sandbox.url)
    config["credentials"]["publer"] = {"source": "file", "path": str(key_file)}
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = tmp_path / "proxy.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "AWS_"))}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, "HOME": str(tmp_path)},
            # A terminal's session: whatever the test runner ignores, SIGHUP starts default.
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
        )
    return process, f"http://127.0.0.1:{config['listen']['port']}", log


def _wait_caught(process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while _caught(process.pid) & (SIGHUP_BIT | SIGTERM_BIT) != SIGHUP_BIT | SIGTERM_BIT:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the handlers never came"
        time.sleep(0.001)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_handlers_are_in_place_before_the_heavy_imports(
    tmp_path: Path, sandbox: Sandbox, api_key: str
) -> None:
    """By the time the config model, YAML or the event loop is loaded, SIGHUP and SIGTERM
    are already caught: no signal meets its default action while the proxy starts."""
    process, _url, log = _serve(tmp_path, sandbox, api_key)
    try:
        deadline = time.monotonic() + 60
        while not any(name in _maps(process.pid) for name in HEAVY):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the proxy never loaded its imports"
        caught = _caught(process.pid)
        assert caught & SIGHUP_BIT and caught & SIGTERM_BIT, f"SigCgt {caught:x}"
    finally:
        process.terminate()
        assert process.wait(30) == 0, log.read_text()


def test_hangups_all_through_start_up_are_reloads(
    tmp_path: Path, sandbox: Sandbox, api_key: str
) -> None:
    """SIGHUP sent again and again from the moment the handlers are in place until the
    proxy is ready never ends it; the proxy serves, reloads after starting, and SIGTERM
    still ends it with status 0."""
    process, url, log = _serve(tmp_path, sandbox, api_key)
    try:
        _wait_caught(process, log)
        sent = 0
        while not _ready(url):
            assert process.poll() is None, log.read_text()
            for _ in range(20):
                process.send_signal(signal.SIGHUP)
                sent += 1
                time.sleep(0.002)
        assert sent > 0
        assert httpx.get(f"{url}/api/v1/users/me").status_code == 200
        deadline = time.monotonic() + 30
        while '"trigger":"SIGHUP"' not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        process.terminate()
        assert process.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_terminate_during_start_up_exits_zero(
    tmp_path: Path, sandbox: Sandbox, api_key: str
) -> None:
    """SIGTERM at the first moment the handlers are in place (while the proxy is still
    importing and reading its config) ends it at once with status 0, not by the signal."""
    process, _url, log = _serve(tmp_path, sandbox, api_key)
    _wait_caught(process, log)
    process.terminate()
    assert process.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
