"""The servers of the benchmark, as processes on loopback, and what /proc says about them.

Every server is a child process with its own log file under the run's work folder, pinned
to the CPUs it is given, and measured as a process tree (nginx is a master and a worker).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from naive_proxy import NAIVE_KEY_ENV

from proxy.dev.stack import openbao_dev, seed_key
from proxy.rules.policy import hash_token

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORKSPACE = "5f8d7a62c9e77e001f36e3a1"
CLIENT_TOKEN = "bench-scheduler-" + "7d1f0c2a9b3e4f5a"
START_TIMEOUT_SECONDS = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of GET url, or None when nothing answers (stdlib only: cheap to poll)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        answer = connection.getresponse()
        answer.read()
        return answer.status
    except OSError:
        return None
    finally:
        connection.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the processes, from /proc/PID/stat (utime + stime)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident set size of the processes, from /proc/PID/statm."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """The command, run on the given CPU list when there is one."""
    return ["taskset", "-c", cpus, *command] if cpus else command


@dataclass
class Server:
    """A server under test: its base URL, its process and where it logs."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float  # time.monotonic() just before the process was spawned

    def pids(self) -> list[int]:
        """The server's process tree (nginx: master and worker)."""
        return process_tree(self.process.pid)

    def rss(self) -> int:
        """Resident memory of the whole tree, in bytes."""
        return rss_bytes(self.pids())

    def cpu(self) -> float:
        """CPU seconds used so far by the whole tree."""
        return cpu_seconds(self.pids())

    def stop(self) -> None:
        """SIGTERM (SIGQUIT for nginx, its graceful stop), then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT if self.name.startswith("nginx") else 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def _spawn(
    name: str,
    command: list[str],
    log_path: Path,
    url: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Server:
    with log_path.open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd or REPO_DIR
        )
    return Server(name, url, process, log_path, started)


def wait_status(server: Server, path: str, expect: int = 200) -> float:
    """Poll until GET path answers `expect`; seconds since the process was spawned."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        if http_status(server.url + path, timeout=0.5) == expect:
            return time.monotonic() - server.started_at
        time.sleep(0.005)
    server.stop()
    raise RuntimeError(f"{server.name} did not answer {expect} on {path}; log:\n{server.tail()}")


def _render(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    return text


def _nginx(name: str, conf: str, workdir: Path, port: int, cpus: str | None) -> Server:
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(conf)
    command = ["nginx", "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf_path)]
    command += ["-g", "daemon off;"]
    return _spawn(name, pinned(command, cpus), workdir / "stdout.log", f"http://127.0.0.1:{port}")


def _user_directive() -> str:
    # nginx started by root drops its worker to `nobody`, which cannot read our work folder.
    return "user root root;" if os.geteuid() == 0 else ""


def start_upstream(workdir: Path, www: Path, cpus: str | None) -> Server:
    """nginx answering like Publer from the static files under `www`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = _render(
        BENCH_DIR / "nginx" / "upstream.conf",
        {
            "user": _user_directive(),
            "dir": str(workdir),
            "www": str(www),
            "port": str(port),
            "reset": str(int(time.time()) + 120),
        },
    )
    server = _nginx("nginx-upstream", conf, workdir, port, cpus)
    wait_status(server, "/api/v1/posts")
    return server


def start_nginx_proxy(workdir: Path, upstream: str, key: str, cpus: str | None) -> Server:
    """nginx proxy_pass to `upstream` with a fixed Authorization header."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = _render(
        BENCH_DIR / "nginx" / "proxy.conf",
        {
            "user": _user_directive(),
            "dir": str(workdir),
            "port": str(port),
            "upstream": upstream.removeprefix("http://"),
            "key": key,
            "workspace": WORKSPACE,
        },
    )
    server = _nginx("nginx-proxy", conf, workdir, port, cpus)
    wait_status(server, "/api/v1/posts")
    return server


def start_naive(workdir: Path, upstream: str, key: str, cpus: str | None) -> Server:
    """The naive Starlette + httpx proxy of bench/naive_proxy.py under uvicorn."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, str(BENCH_DIR / "naive_proxy.py"), "--port", str(port)]
    command += ["--upstream", upstream, "--workspace", WORKSPACE]
    server = _spawn(
        "naive",
        pinned(command, cpus),
        workdir / "naive.log",
        f"http://127.0.0.1:{port}",
        env={**os.environ, NAIVE_KEY_ENV: key},  # not on its command line
    )
    wait_status(server, "/api/v1/posts")
    return server


@dataclass(frozen=True)
class Vault:
    """The OpenBao dev server of the run, holding the key; and a token file for the proxy."""

    url: str
    token_file: Path


@contextmanager
def vault_with_key(workdir: Path, key: str) -> Iterator[Vault]:
    """An OpenBao dev server (the one `publer-proxy dev` uses) with the key at publer/api."""
    workdir.mkdir(parents=True, exist_ok=True)
    with openbao_dev(workdir) as (url, token):
        seed_key(url, token, key)
        token_file = workdir / "vault-token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        yield Vault(url, token_file)


def publer_config(vault: Vault, upstream: str, port: int) -> dict[str, Any]:
    """A realistic config: Vault token auth, one route with scope checks and a client
    token, JSON logs at info. The rate budget is lifted (Publer's own is 100 requests per
    2 minutes) and kept to a 1 s window so its in-memory log stays small; the body limit
    is raised so that a 200 MiB file plus its multipart framing fits."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream, "max_body_bytes": 256 * 1024 * 1024},
        "vault": {
            "url": vault.url,
            "auth": {"method": "token", "token_file": str(vault.token_file)},
        },
        "credentials": {"publer": {"mount": "secret", "path": "publer/api"}},
        "routes": [
            {
                "name": "default",
                "prefix": "",
                "credential": "publer",
                "workspace_id": WORKSPACE,
                "scopes": ["posts", "media", "accounts", "job_status"],
                "clients": [{"name": "scheduler", "token_sha256": hash_token(CLIENT_TOKEN)}],
            }
        ],
        "rate_limit": {"requests": 1_000_000_000, "per_seconds": 1},
        "logging": {"format": "json", "level": "info"},
    }


def spawn_publer(
    workdir: Path,
    vault: Vault,
    upstream: str,
    cpus: str | None,
    variant: str = "shipped",
    config: Callable[[int], dict[str, Any]] | None = None,
) -> Server:
    """`publer-proxy serve` (through bench/launch.py for another checkout), not waited for;
    `config` makes the config for a port, instead of `publer_config`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config_path = workdir / f"proxy-{port}.yaml"
    made = config(port) if config else publer_config(vault, upstream, port)
    config_path.write_text(yaml.safe_dump(made))
    if variant == "shipped":
        command = [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)]
    else:
        command = [sys.executable, str(BENCH_DIR / "launch.py"), variant]
        command += ["serve", "--config", str(config_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
    env["HOME"] = str(workdir)
    return _spawn(
        f"publer-proxy[{variant}]",
        pinned(command, cpus),
        workdir / f"proxy-{port}.log",
        f"http://127.0.0.1:{port}",
        env=env,
    )


def start_publer(
    workdir: Path, vault: Vault, upstream: str, cpus: str | None, variant: str = "shipped"
) -> Server:
    """publer-proxy, returned once /readyz answers 200 (the key was read from Vault)."""
    server = spawn_publer(workdir, vault, upstream, cpus, variant)
    wait_status(server, "/readyz")
    return server


def random_key() -> str:
    """A Publer-looking API key for the run."""
    return "pk_bench_" + secrets.token_hex(20)
