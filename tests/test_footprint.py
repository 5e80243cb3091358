"""What a running `serve` imports: only what its config uses. Each heavy library of a
feature (the forward proxy's certificate machinery, the Redis client, the file watcher,
the AWS SDK) is absent from a proxy with one Vault credential and present once that
feature is configured; what only other commands use (httpx for `check --online`) and
requests' character-set detector are never loaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bao import Bao, free_port
from tests.servers import Process, Sandbox, proxy_config, start_proxy, start_redis

# Each feature, and the modules that only it may load.
FEATURE_MODULES = {
    "forward proxy": ("cryptography.x509", "proxy.tunnel.listener", "proxy.tunnel.ca"),
    "redis budget": ("redis",),
    "reload.watch": ("watchfiles",),
    "aws credential": ("boto3", "botocore"),
}
# Never loaded by `serve`: what only other commands use (`check --online` probes Publer
# with httpx; `dev` and `sandbox` run the development tools), and requests' character-set
# detector (Vault answers JSON, decoded as UTF-8 without guessing).
NEVER = ("httpx", "proxy.online", "proxy.dev", "charset_normalizer", "chardet")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """A redis-server for the Redis budget."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def loaded_modules(workdir: Path, config: dict[str, Any], env: dict[str, str]) -> set[str]:
    """The modules of a `serve` on `config` once it answered /healthz, read as it exits."""
    listing = workdir / "modules.txt"
    proxy = start_proxy(
        workdir,
        config,
        env={"MODULES_FILE": str(listing), **env},
        wait_ready=False,
        module="tests.listing_proxy",
    )
    assert proxy.stop() == 0, proxy.output()
    return set(listing.read_text().split())


def feature_config(
    feature: str, workdir: Path, bao: Bao, sandbox: Sandbox, token_file: Path, redis_url: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """One Vault credential, and `feature` configured when it is one: (config, env)."""
    config = proxy_config(bao.url, sandbox.url, token_file=token_file)
    env: dict[str, str] = {}
    if feature == "forward proxy":
        # Clients tunnel to Publer's own name; nothing is dialled before a request.
        port = sandbox.url.rsplit(":", 1)[1]
        config["upstream"] = {"url": "https://app.publer.com", "connect_to": f"127.0.0.1:{port}"}
        config["forward_proxy"] = {
            "host": "127.0.0.1",
            "port": free_port(),
            "ca_certificate_file": str(workdir / "forward-ca.pem"),
        }
    elif feature == "redis budget":
        config["rate_limit"]["redis_url"] = redis_url
    elif feature == "reload.watch":
        config["reload"] = {"watch": True}
    elif feature == "aws credential":
        # A Secrets Manager nobody answers on: the source is made (and its SDK loaded)
        # whether or not its first read succeeds.
        config["credentials"]["aws"] = {
            "source": "aws_secrets_manager",
            "secret_id": "publer/api",
            "region": "us-east-1",
            "endpoint_url": f"http://127.0.0.1:{free_port()}",
        }
        config["routes"].append(
            {"name": "aws", "prefix": "/aws", "credential": "aws", "scopes": ["posts"]}
        )
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    return config, env


@pytest.mark.parametrize("feature", ["one Vault credential", *FEATURE_MODULES])
def test_serve_loads_only_what_its_config_uses(
    tmp_path: Path,
    bao: Bao,
    sandbox: Sandbox,
    token_file: Path,
    redis_server: Process,
    feature: str,
) -> None:
    """With one Vault credential `serve` loads hvac and none of the heavy libraries of the
    other features; with one feature more, that feature's libraries and no other's; never
    what only other commands use, nor requests' character-set detector."""
    config, env = feature_config(feature, tmp_path, bao, sandbox, token_file, redis_server.url)
    loaded = loaded_modules(tmp_path, config, env)

    def present(name: str) -> bool:
        return any(module == name or module.startswith(name + ".") for module in loaded)

    assert present("hvac") and present("proxy.runtime")  # a serve that read its Vault key
    for other, names in FEATURE_MODULES.items():
        expected = other == feature
        assert {name: present(name) for name in names} == dict.fromkeys(names, expected), other
    assert [name for name in NEVER if present(name)] == []


def test_serve_without_a_vault_credential_loads_no_vault_client(
    tmp_path: Path, bao: Bao, sandbox: Sandbox, api_key: str
) -> None:
    """With its key in a file, `serve` loads neither hvac nor requests: the Vault client
    comes with a Vault credential."""
    key_file = tmp_path / "api_key"
    key_file.write_text(api_key)
    key_file.chmod(0o600)
    config = proxy_config(bao.url, sandbox.url)
    config["credentials"]["publer"] = {"source": "file", "path": str(key_file)}
    loaded = loaded_modules(tmp_path, config, {})
    assert "proxy.keys.sources.files" in loaded and "proxy.runtime" in loaded
    assert [
        name for name in ("hvac", "requests", "proxy.keys.sources.vault") if name in loaded
    ] == []
