"""The sandbox and the proxy as real processes on loopback, for integration tests.

Each process logs to a file of its own, so a test can read what it printed (the leak
tests read every byte) and a failing test shows where the process stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from proxy.dev.sandbox import SANDBOX_KEYS_ENV
from tests.bao import free_port

START_TIMEOUT_SECONDS = 60.0


def _wait(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    expect: int | None,
    verify: Path | None = None,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            answer = httpx.get(url, timeout=1.0, trust_env=False, verify=_verify(verify))
            if expect is None or answer.status_code == expect:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    # A process that never came up is ended here: no caller holds it to stop it later.
    if process.poll() is None:
        process.kill()
        process.wait()
    raise RuntimeError(f"{url} did not come up; log:\n{log.read_text(errors='replace')[-3000:]}")


def _verify(ca: Path | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca)) if ca else True


@dataclass
class Process:
    """A child process with its log file; `stop` sends SIGTERM and waits."""

    process: subprocess.Popen[bytes]
    log_path: Path
    url: str

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the process; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class Sandbox(Process):
    """The Publer sandbox, with its recording and control endpoints."""

    ca: Path | None = None  # the CA of its certificate, when it serves HTTPS

    def _control(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(base_url=self.url, trust_env=False, verify=_verify(self.ca)) as client:
            answer = client.request(method, f"/__sandbox/{path}", **kwargs)
        answer.raise_for_status()  # a typo in a control call must fail the test
        return answer

    def requests(self) -> list[dict[str, Any]]:
        """Every request the sandbox received (but control calls), in order."""
        found: list[dict[str, Any]] = self._control("GET", "requests").json()["requests"]
        return found

    def clear(self) -> None:
        """Forget the recorded requests."""
        self._control("DELETE", "requests")

    def set_keys(self, *keys: dict[str, Any]) -> None:
        """Replace the keys the sandbox accepts."""
        self._control("PUT", "keys", json={"keys": list(keys)})

    def set_auth_errors(self, mode: str) -> None:
        """Answer 401/403 as Publer's docs say ("docs") or as the live API does ("live")."""
        self._control("PUT", "auth-errors", json={"mode": mode})

    def fault(self, **fault: Any) -> None:
        """Make the next requests fail the way `fault` says."""
        self._control("PUT", "faults", json=fault)


@dataclass(frozen=True)
class Tls:
    """A certificate for 127.0.0.1 and its key (PEM files); `ca` is what trusts it."""

    ca: Path
    cert: Path
    key: Path


def make_tls(workdir: Path) -> Tls:
    """Write a self-signed certificate for IP 127.0.0.1 only; it is its own CA."""
    from tests.k8s_tokenreview import self_signed_loopback_cert

    cert_pem, key_pem = self_signed_loopback_cert()
    workdir.mkdir(parents=True, exist_ok=True)
    tls = Tls(workdir / "cert.pem", workdir / "cert.pem", workdir / "key.pem")
    tls.cert.write_bytes(cert_pem)
    tls.key.write_bytes(key_pem)
    return tls


def start_sandbox(
    workdir: Path,
    *keys: str,
    rate_limit: int = 100000,
    tls: Tls | None = None,
    auth_errors: str = "docs",
) -> Sandbox:
    """`publer-proxy sandbox` on a free port, accepting `keys` (over HTTPS with `tls`),
    answering 401/403 as Publer's docs say or as the live API does (`auth_errors`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / f"sandbox-{port}.log"
    args = [sys.executable, "-m", "proxy", "sandbox", "--port", str(port)]
    args += ["--rate-limit", str(rate_limit)]
    if auth_errors != "docs":
        args += ["--auth-errors", auth_errors]
    if tls is not None:
        args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    # The keys go in the environment: a command line is readable by every user.
    env = {**os.environ, SANDBOX_KEYS_ENV: " ".join(keys)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    scheme = "https" if tls else "http"
    sandbox = Sandbox(process, log_path, f"{scheme}://127.0.0.1:{port}", tls.ca if tls else None)
    _wait(f"{sandbox.url}/__sandbox/health", process, log_path, 200, verify=sandbox.ca)
    return sandbox


@dataclass
class Proxy(Process):
    """publer-proxy serving one config."""

    config_path: Path = field(default=Path())

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines the proxy printed, parsed."""
        found = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def access(self) -> list[dict[str, Any]]:
        """The access events (one per request)."""
        return [e for e in self.events() if e.get("event") == "request"]

    def access_event(self, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The access event of one request; it is written just after the answer."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.access() if e.get("request_id") == request_id]
            if len(found) == 1 or time.monotonic() > deadline:
                assert len(found) == 1, f"{len(found)} access events for {request_id}"
                return found[0]
            time.sleep(0.02)


def proxy_config(
    vault_url: str,
    upstream: str,
    *,
    token_file: Path | None = None,
    credential: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    port: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A proxy config for a test: one credential, one open route unless given."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port or free_port()},
        "upstream": {"url": upstream},
        "vault": {"url": vault_url, "auth": {"method": "token"}},
        "credentials": {"publer": {"path": "publer/api", **(credential or {})}},
        "routes": routes
        or [
            {
                "name": "default",
                "credential": "publer",
                "workspace_id": "5f8d7a62c9e77e001f36e3a1",
                "scopes": ["posts", "media", "accounts", "job_status", "users"],
            }
        ],
        "logging": {"format": "json", "level": "debug"},
        # Tests send more than Publer's 100 per 2 minutes; the budget tests set their own.
        "rate_limit": {"requests": 100000, "per_seconds": 120},
    }
    if token_file is not None:
        config["vault"]["auth"]["token_file"] = str(token_file)
    for key, value in extra.items():
        config[key] = value
    return config


def start_proxy(
    workdir: Path,
    config: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    module: str = "proxy",
    config_path: Path | None = None,
) -> Proxy:
    """`publer-proxy serve` on the config; waits for /readyz 200 (or /healthz). With
    `config_path`, the config is read from there as it is (the caller wrote it).

    `module` is what `python -m` runs (tests.asyncio_proxy: the same on asyncio's loop).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = config["listen"]["port"]
    if config_path is None:
        config_path = workdir / f"proxy-{port}.yaml"
        config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / f"proxy-{port}.log"
    # Neither the developer's Vault nor their AWS or Azure identity reaches a test proxy.
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "AWS_", "AZURE_"))
    }
    child_env["HOME"] = str(workdir)
    child_env.update(env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
        )
    proxy = Proxy(process, log_path, f"http://127.0.0.1:{port}", config_path)
    if wait_ready:
        _wait(f"{proxy.url}/readyz", process, log_path, 200)
    else:
        _wait(f"{proxy.url}/healthz", process, log_path, 200)
    return proxy


def start_redis(workdir: Path, port: int | None = None) -> Process:
    """A real redis-server on a free loopback port (or `port`, to start one again empty
    where another stopped), without persistence; `url` is its redis:// URL."""
    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "redis.log"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = Process(process, log_path, f"redis://127.0.0.1:{port}/0")
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    client = redis.Redis(port=port)
    try:
        while True:
            try:
                client.ping()
                return server
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise
                time.sleep(0.05)
    finally:
        client.close()
