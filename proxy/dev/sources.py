"""`publer-proxy dev --source file|env|aws|azure`: the local stack with the key elsewhere.

The same sandbox (or Publer, with PUBLER_API_KEY) and proxy as `make run`, with no Vault:
the key sits in a file with mode 0600 (as a Kubernetes or Docker secret would), in the
environment, in a local AWS Secrets Manager (moto's server, from the test or
devstack extras), or in a local Key Vault (proxy/dev/azure_standin.py, reached by its real
name https://publer.vault.azure.net through connect_to, signing in as an application
with a client secret). It prints how to rotate the key, to watch the proxy pick it up.
"""

from __future__ import annotations

import os
import secrets as secrets_module
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from proxy.dev.sandbox import DEFAULT_SANDBOX_KEY
from proxy.dev.stack import (
    DevFiles,
    _stop,
    claim_port,
    dev_config,
    free_port,
    wait_http,
    write_secret,
)

DEV_AWS_IDENTITY = {"AWS_ACCESS_KEY_ID": "AKIADEVSTACK00000000", "AWS_SECRET_ACCESS_KEY": "dev"}
DEV_REGION = "eu-west-1"
DEV_SECRET_ID = "publer/api"


@contextmanager
def moto_process(workdir: Path) -> Iterator[str]:
    """moto's Secrets Manager server as a child process: its URL."""
    if subprocess.run(
        [sys.executable, "-c", "import moto.server, boto3"], capture_output=True, check=False
    ).returncode:
        raise SystemExit(
            "dev --source aws: the local AWS stand-in is not installed;"
            " run pip install 'publer-proxy[devstack,aws]' (make run does it for you)"
        )
    port = free_port()
    log_file = (workdir / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/")
        yield url
    finally:
        _stop(process)
        log_file.close()


@contextmanager
def key_home(source: str, workdir: Path, key: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Put `key` where `source` reads it: (the credential's config, how to rotate it)."""
    if source == "file":
        path = workdir / "publer-api-key"
        path.write_text(key + "\n")
        path.chmod(0o600)
        credential: dict[str, Any] = {"source": "file", "path": str(path)}
        yield credential, f"printf '%s\\n' NEW_KEY > {path}   (picked up within a second)"
    elif source == "azure":
        with azure_home(workdir, key) as found:
            yield found
    elif source == "env":
        os.environ["PUBLER_API_KEY"] = key  # the env source takes it out again at start
        yield {"source": "env"}, "restart with a new PUBLER_API_KEY (it is read once)"
    else:
        import boto3

        os.environ.update(DEV_AWS_IDENTITY)
        with moto_process(workdir) as url:
            client = boto3.client("secretsmanager", endpoint_url=url, region_name=DEV_REGION)
            client.create_secret(Name=DEV_SECRET_ID, SecretString=key)
            client.close()
            credential = {
                "source": "aws_secrets_manager",
                "secret_id": DEV_SECRET_ID,
                "region": DEV_REGION,
                "endpoint_url": url,
                "refresh_seconds": 5,
            }
            yield (
                credential,
                (
                    f"AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x aws --endpoint-url {url}"
                    f" --region {DEV_REGION} secretsmanager put-secret-value"
                    f" --secret-id {DEV_SECRET_ID} --secret-string NEW_KEY"
                ),
            )


@contextmanager
def azure_home(workdir: Path, key: str) -> Iterator[tuple[dict[str, Any], str]]:
    """The key in a local Key Vault stand-in: (the credential's config, how to rotate)."""
    try:
        import azure.identity
        import azure.keyvault.secrets  # noqa: F401
    except ImportError:
        raise SystemExit(
            "dev --source azure: Microsoft's Azure SDK is not installed;"
            " run pip install 'publer-proxy[azure]'"
        ) from None
    from proxy.dev.azure_standin import DEV_CLIENT_ID, TENANT, start_standin

    standin = start_standin(workdir / "azure")
    try:
        client_secret = secrets_module.token_urlsafe(24)
        secret_file = workdir / "azure-client-secret"
        secret_file.touch(0o600)
        secret_file.write_text(client_secret)
        standin.add_client(DEV_CLIENT_ID, client_secret)
        standin.put_secret("publer-api", key)
        credential: dict[str, Any] = {
            "source": "azure_key_vault",
            "vault_url": "https://publer.vault.azure.net",
            "secret_name": "publer-api",
            "connect_to": standin.connect_to,
            "ca_file": str(standin.ca),
            "refresh_seconds": 5,
            "credential": {
                "type": "client_secret",
                "tenant_id": TENANT,
                "client_id": DEV_CLIENT_ID,
                "client_secret_file": str(secret_file),
            },
        }
        rotate = (
            f"curl -s -X POST http://127.0.0.1:{standin.port}/control/secrets/publer-api"
            """ -d '{"value": "NEW_KEY"}'   (a new latest version)"""
        )
        yield credential, rotate
    finally:
        standin.stop()


def _announce_when_ready(port: int, source: str, rotate: str) -> None:
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", timeout=30)
    except TimeoutError:
        return
    print(
        f"\npubler-proxy is ready on {base} with the key from the {source} source.\n"
        f"Try it (no key needed):\n\n  curl -s {base}/api/v1/users/me\n\n"
        f"Rotate the key: {rotate}\nCtrl-C stops everything.\n",
        file=sys.stderr,
        flush=True,
    )


def run_dev_with_source(source: str, port: int = 8080, upstream: str | None = None) -> int:
    """The local stack with the key in a file, the environment, a local AWS or Azure, until
    Ctrl-C or SIGTERM; the exit status. A port another process holds is refused first."""
    listener = claim_port(port)
    if listener is None:
        return 1
    real_key = os.environ.get("PUBLER_API_KEY", "").strip()
    key = real_key or DEFAULT_SANDBOX_KEY
    with listener, tempfile.TemporaryDirectory(prefix="publer-proxy-dev-") as tmp:
        files = DevFiles(Path(tmp))
        return run_dev_source(source, port, upstream, files, real_key, key, listener)


def run_dev_source(
    source: str,
    port: int,
    upstream: str | None,
    files: DevFiles,
    real_key: str,
    key: str,
    listener: socket.socket,
) -> int:
    """The local stack with the key in a file, the environment or a local AWS."""
    from proxy.describe import describe_routes
    from proxy.dev.forward_proxy import sandbox_certificate
    from proxy.dev.sandbox import DEFAULT_WORKSPACE_ID
    from proxy.dev.stack import Children, _upstream, watch_stack
    from proxy.loading import load_config
    from proxy.masking.secrets import SecretRegistry
    from proxy.records.log_setup import configure_logging
    from proxy.runtime import create_app, serve

    workdir = files.folder
    client_token = secrets_module.token_urlsafe(32)
    secrets = SecretRegistry()
    secrets.add(real_key)
    secrets.add(client_token)
    write_secret(files.client_token, client_token)
    workspace = os.environ.get("PUBLER_WORKSPACE_ID", "").strip() or DEFAULT_WORKSPACE_ID
    parent = os.getppid()
    children: Children = []
    with (
        key_home(source, workdir, key) as (credential, rotate),
        _upstream(workdir, real_key, upstream, children) as upstream_url,
    ):
        config = dev_config("", files, upstream_url, workspace, port, client_token)
        del config["vault"]
        config["credentials"] = {"publer": {**credential, "max_stale_seconds": 600}}
        if not real_key and not upstream:  # the sandbox serves HTTPS with its own certificate
            upstream_settings = config["upstream"]
            assert isinstance(upstream_settings, dict)
            upstream_settings["ca_file"] = str(sandbox_certificate(workdir))
        files.config.write_text(yaml.safe_dump(config, sort_keys=False), "utf-8")
        loaded = load_config(files.config)
        settings, scope_map = loaded.settings, loaded.scope_map
        configure_logging(settings.logging, secrets, sys.stderr)
        for line in describe_routes(settings, scope_map):
            print(line, file=sys.stderr)
        threading.Thread(
            target=_announce_when_ready, args=(port, source, rotate), daemon=True
        ).start()
        threading.Thread(target=watch_stack, args=(children, parent, workdir), daemon=True).start()
        app = create_app(settings, scope_map, secrets, loaded=loaded)
        return serve(settings, app, secrets, [listener])
