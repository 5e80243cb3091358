"""Idle memory of the proxy per key source: `python bench/sources_rss.py [--runs N]`.

Starts the sandbox once, then for each source (OpenBao, a file, the environment, AWS
Secrets Manager on moto) a proxy holding its key, and reads its resident set size from
/proc once it is ready and idle. Shows what each source's client library costs (hvac,
boto3) and that a source nobody configured costs nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import hvac
import yaml

from proxy.dev.sandbox import DEFAULT_SANDBOX_KEY
from proxy.dev.sources import DEV_AWS_IDENTITY, DEV_REGION, DEV_SECRET_ID, moto_process
from proxy.dev.stack import free_port, openbao_dev, sandbox_process, wait_http

SETTLE_SECONDS = 2.0


def rss_mib(pid: int) -> float:
    """The process's resident set size, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextmanager
def proxy(
    workdir: Path, upstream: str, credential: dict[str, Any], env: dict[str, str]
) -> Iterator[int]:
    """`publer-proxy serve` with one credential, once ready: its pid."""
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream},
        "credentials": {"publer": credential},
        "routes": [{"name": "d", "credential": "publer", "scopes": ["posts"]}],
        "logging": {"format": "json", "level": "warning"},
    }
    path = workdir / f"proxy-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "AWS_"))}
    with (workdir / f"proxy-{port}.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**child_env, **env},
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        yield process.pid
    finally:
        process.terminate()
        process.wait(15)


def main() -> int:
    """Print the idle RSS of a proxy per key source, median of --runs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    key = DEFAULT_SANDBOX_KEY
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        upstream = stack.enter_context(sandbox_process(workdir, key))
        vault_url, token = stack.enter_context(openbao_dev(workdir))
        client = hvac.Client(url=vault_url, token=token)
        client.secrets.kv.v2.create_or_update_secret(path="publer/api", secret={"api_key": key})
        token_file = workdir / "vault-token"
        token_file.write_text(token)
        moto_url = stack.enter_context(moto_process(workdir))
        import boto3

        aws = boto3.client(
            "secretsmanager",
            endpoint_url=moto_url,
            region_name=DEV_REGION,
            aws_access_key_id=DEV_AWS_IDENTITY["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DEV_AWS_IDENTITY["AWS_SECRET_ACCESS_KEY"],
        )
        aws.create_secret(Name=DEV_SECRET_ID, SecretString=key)
        key_file = workdir / "api_key"
        key_file.write_text(key)
        key_file.chmod(0o600)
        cases: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
            "vault": ({"path": "publer/api"}, {"VAULT_ADDR": vault_url, "VAULT_TOKEN": token}),
            "file": ({"source": "file", "path": str(key_file)}, {}),
            "env": ({"source": "env"}, {"PUBLER_API_KEY": key}),
            "aws_secrets_manager": (
                {
                    "source": "aws_secrets_manager",
                    "secret_id": DEV_SECRET_ID,
                    "region": DEV_REGION,
                    "endpoint_url": moto_url,
                },
                DEV_AWS_IDENTITY,
            ),
        }
        print(f"{'source':<22} idle RSS MiB (median of {args.runs}, each run)")
        for name, (credential, env) in cases.items():
            samples = []
            for _ in range(args.runs):
                with proxy(workdir, upstream, credential, env) as pid:
                    time.sleep(SETTLE_SECONDS)
                    samples.append(rss_mib(pid))
            runs = ", ".join(f"{s:.1f}" for s in samples)
            print(f"{name:<22} {statistics.median(samples):6.1f}   ({runs})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
