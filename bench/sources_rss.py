"""Idle memory of the proxy per key source and per configuration (part of `make bench`):
`python bench/sources_rss.py [--runs N]`.

Starts the sandbox, OpenBao, moto (AWS Secrets Manager) and redis-server once, then a proxy
for each case, and reads its resident set size from /proc once it is ready and has been
idle for SETTLE_SECONDS; each figure is the median of `--runs` starts.
  - per key source (OpenBao, a file, the environment, AWS Secrets Manager): what each
    source's client library costs, and that a source nobody configured costs nothing;
  - per configuration, each adding one feature to the one before: one Vault credential,
    + the forward proxy, + a Redis budget, + reload.watch, + the audit log, + a second
    credential in AWS Secrets Manager. What a feature costs when it is configured.

Results: a table on stdout, and the figures with the date, commit, machine and command in
bench/results/<UTC date>-<commit>-idle-rss.json (see bench/results.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
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
import results
import yaml

from proxy.dev.sandbox import DEFAULT_SANDBOX_KEY
from proxy.dev.sources import DEV_AWS_IDENTITY, DEV_REGION, DEV_SECRET_ID, moto_process
from proxy.dev.stack import free_port, openbao_dev, sandbox_process, wait_http

SETTLE_SECONDS = 2.0
BENCH_DIR = Path(__file__).resolve().parent


def rss_mib(pid: int) -> float:
    """The process's resident set size, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A redis-server on a free loopback port, without persistence: its redis:// URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir)]
    with (workdir / "redis.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(15)


def base_config(port: int, upstream: str, credential: dict[str, Any]) -> dict[str, Any]:
    """One credential and one open route on loopback, JSON logs at warning."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream},
        "credentials": {"publer": credential},
        "routes": [{"name": "d", "credential": "publer", "scopes": ["posts"]}],
        "logging": {"format": "json", "level": "warning"},
    }


@contextmanager
def proxy(workdir: Path, config: dict[str, Any], env: dict[str, str]) -> Iterator[int]:
    """`publer-proxy serve` on `config`, once ready: its pid."""
    port = config["listen"]["port"]
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


class Stack:
    """The servers every case shares, and how to reach them."""

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        key = DEFAULT_SANDBOX_KEY
        self.workdir = workdir
        self.upstream = stack.enter_context(sandbox_process(workdir, key))
        self.vault_url, self.token = stack.enter_context(openbao_dev(workdir))
        client = hvac.Client(url=self.vault_url, token=self.token)
        client.secrets.kv.v2.create_or_update_secret(path="publer/api", secret={"api_key": key})
        self.moto_url = stack.enter_context(moto_process(workdir))
        import boto3

        aws = boto3.client(
            "secretsmanager",
            endpoint_url=self.moto_url,
            region_name=DEV_REGION,
            aws_access_key_id=DEV_AWS_IDENTITY["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DEV_AWS_IDENTITY["AWS_SECRET_ACCESS_KEY"],
        )
        aws.create_secret(Name=DEV_SECRET_ID, SecretString=key)
        self.redis_url = stack.enter_context(redis_server(workdir))
        self.key_file = workdir / "api_key"
        self.key_file.write_text(key)
        self.key_file.chmod(0o600)
        self.key = key

    @property
    def vault_env(self) -> dict[str, str]:
        """How a proxy reaches OpenBao."""
        return {"VAULT_ADDR": self.vault_url, "VAULT_TOKEN": self.token}

    @property
    def aws_credential(self) -> dict[str, Any]:
        """A credential kept in the local Secrets Manager."""
        return {
            "source": "aws_secrets_manager",
            "secret_id": DEV_SECRET_ID,
            "region": DEV_REGION,
            "endpoint_url": self.moto_url,
        }

    def source_cases(self) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
        """One credential of each source: (config, environment)."""
        port, up = free_port(), self.upstream
        return {
            "vault": (base_config(port, up, {"path": "publer/api"}), self.vault_env),
            "file": (base_config(port, up, {"source": "file", "path": str(self.key_file)}), {}),
            "env": (base_config(port, up, {"source": "env"}), {"PUBLER_API_KEY": self.key}),
            "aws_secrets_manager": (base_config(port, up, self.aws_credential), DEV_AWS_IDENTITY),
        }

    def config_cases(self) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
        """One Vault credential, then one feature more at each step: (config, environment)."""
        config = base_config(free_port(), self.upstream, {"path": "publer/api"})
        env = dict(self.vault_env)
        cases = {"one Vault credential": (copy.deepcopy(config), dict(env))}
        # Clients tunnel to Publer's real name; the origin is dialled here, never at idle.
        sandbox_port = self.upstream.rsplit(":", 1)[1]
        config["upstream"] = {
            "url": "https://app.publer.com",
            "connect_to": f"127.0.0.1:{sandbox_port}",
        }
        config["forward_proxy"] = {
            "port": free_port(),
            "ca_certificate_file": str(self.workdir / "forward-ca.pem"),
        }
        cases["+ forward proxy"] = (copy.deepcopy(config), dict(env))
        config["rate_limit"] = {"redis_url": self.redis_url}
        cases["+ Redis budget"] = (copy.deepcopy(config), dict(env))
        config["reload"] = {"watch": True}
        cases["+ reload.watch"] = (copy.deepcopy(config), dict(env))
        config["audit"] = {"sink": str(self.workdir / "audit.log")}
        cases["+ audit log"] = (copy.deepcopy(config), dict(env))
        config["credentials"]["aws"] = self.aws_credential
        config["routes"].append(
            {"name": "a", "prefix": "/aws", "credential": "aws", "scopes": ["posts"]}
        )
        cases["+ AWS Secrets Manager credential"] = (config, {**env, **DEV_AWS_IDENTITY})
        return cases


def measure(
    stack: Stack, cases: dict[str, tuple[dict[str, Any], dict[str, str]]], runs: int
) -> dict[str, list[float]]:
    """Idle RSS samples of each case, printed as they come."""
    found: dict[str, list[float]] = {}
    for name, (config, env) in cases.items():
        samples = []
        for _ in range(runs):
            with proxy(stack.workdir, config, env) as pid:
                time.sleep(SETTLE_SECONDS)
                samples.append(rss_mib(pid))
        found[name] = samples
        runs_text = ", ".join(f"{s:.1f}" for s in samples)
        print(f"  {name:<34} {statistics.median(samples):6.1f}   ({runs_text})", flush=True)
    return found


def table(head: str, found: dict[str, list[float]], steps: bool) -> list[str]:
    """A Markdown table of medians (and, for steps, the difference with the step before)."""
    lines = [f"| {head} | idle RSS MiB | " + ("+ MiB | " if steps else "") + "runs |"]
    lines.append("|---|---:|" + ("---:|" if steps else "") + "---|")
    before: float | None = None
    for name, samples in found.items():
        median = statistics.median(samples)
        delta = "-" if before is None else f"{median - before:+.1f}"
        runs_text = ", ".join(f"{s:.1f}" for s in samples)
        lines.append(
            f"| {name} | {median:.1f} | " + (f"{delta} | " if steps else "") + f"{runs_text} |"
        )
        before = median
    return lines


def main() -> int:
    """Measure idle RSS per key source and per configuration, print it, save it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=3, help="starts per case (default 3)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp, ExitStack() as exits:
        stack = Stack(exits, Path(tmp))
        print(f"idle RSS MiB, median of {args.runs} start(s), each run in brackets")
        print("per key source:")
        sources = measure(stack, stack.source_cases(), args.runs)
        print("per configuration (each step adds to the one before):")
        configs = measure(stack, stack.config_cases(), args.runs)
    report = "\n".join(
        [
            f"`publer-proxy serve` started {args.runs} time(s) per case, ready and idle for"
            f" {SETTLE_SECONDS:g} s; VmRSS from /proc, median of the starts. One open route on"
            " loopback; the keys in OpenBao (dev server), a 0600 file, the environment, and"
            " moto's Secrets Manager.",
            "",
            "Per configuration, each step adding one feature to the step before:",
            "",
            *table("configuration", configs, steps=True),
            "",
            "Per key source, one credential and nothing else:",
            "",
            *table("key source", sources, steps=False),
        ]
    )
    figures = {
        "runs": args.runs,
        "settle_seconds": SETTLE_SECONDS,
        "configurations_mib": configs,
        "sources_mib": sources,
    }
    record = results.record("idle-rss", "Idle RSS per configuration", report, figures, {})
    print(f"written to {results.save(record, args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
