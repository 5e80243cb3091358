"""The deployment files agree with each other, with the image and with the config schema.

No Docker engine runs here, so docker-compose.yml, the compose sidecar and the
Kubernetes manifest are read as data: every config they mount is validated as `serve` would
validate it, and every port, path, health check, dependency and mount is followed to what it
names. The compose seeding job is a plain script, so it runs for real against OpenBao, and
the proxy it configures serves a request with the credentials it wrote.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from proxy.browser import check_host, listener_names
from proxy.cli import load_all
from proxy.dev.sandbox import DEFAULT_SANDBOX_KEY
from proxy.policy import hash_token
from proxy.server import GRACEFUL_SHUTDOWN_SECONDS
from proxy.settings import (
    KUBERNETES_TOKEN_FILE,
    CredentialSettings,
    Settings,
    is_loopback_host,
    parse_settings,
)
from tests.bao import Bao, bao_binary, free_port, start_bao
from tests.servers import Sandbox, start_proxy, start_sandbox

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SIDECAR = ROOT / "deploy" / "sidecar.compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes.yaml"
SEED_SCRIPT = ROOT / "deploy" / "vault-seed.sh"
VAULT_DEV_SCRIPT = ROOT / "deploy" / "vault-dev.sh"
IMAGE_CONFIG = ROOT / "deploy" / "proxy.image.yaml"
POLICY = ROOT / "config" / "vault-policy.hcl"
ZERO_DIGEST = "sha256:" + "0" * 64
PROXY_IMAGE = "publer-proxy:local"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PRIVATE", re.IGNORECASE)
HEALTH_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)")


# --- reading the files ------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, its continuation lines joined."""

    keyword: str
    args: str
    stage: int


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, comments dropped, numbered by build stage."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
        pending = ""
    return instructions


def stage_names() -> dict[str, int]:
    """The named stages (`FROM ... AS name`), by name."""
    return {
        i.args.split()[-1]: i.stage
        for i in dockerfile()
        if i.keyword == "FROM" and " AS " in i.args.upper()
    }


def stage(index: int) -> list[Instruction]:
    """The instructions that make stage `index`: those of the stages it is built on, then
    its own."""
    found = [i for i in dockerfile() if i.stage == index]
    parent = found[0].args.split()[0]
    if parent in stage_names():
        return [*stage(stage_names()[parent]), *found[1:]]
    return found


def final_stage() -> list[Instruction]:
    """The instructions that make the image: the last stage, what `docker build .` builds."""
    return stage(dockerfile()[-1].stage)


def dev_stage() -> list[Instruction]:
    """The instructions that make the `dev` target (the sandbox of docker-compose.yml)."""
    return stage(stage_names()["dev"])


def the(keyword: str) -> str:
    """The arguments of the final stage's one `keyword` instruction."""
    [found] = [i.args for i in final_stage() if i.keyword == keyword]
    return found


def exec_form(keyword: str) -> list[str]:
    """An ENTRYPOINT or CMD of the final stage, in its JSON (exec) form."""
    value: list[str] = json.loads(the(keyword))
    return value


def image_healthcheck() -> list[str]:
    """The HEALTHCHECK command of the image, as the CMD array it runs."""
    _options, _, command = the("HEALTHCHECK").partition("CMD ")
    value: list[str] = json.loads(command)
    return value


def image_default_config_path() -> str:
    """The config path in the image's default command."""
    command = exec_form("CMD")
    return command[command.index("--config") + 1]


def exposed_port() -> int:
    """The one port the image EXPOSEs."""
    return int(the("EXPOSE").split("/")[0])


def load_yaml(path: Path) -> Any:
    """A YAML file, parsed."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose(path: Path = COMPOSE) -> dict[str, Any]:
    """A compose file, parsed."""
    data: dict[str, Any] = load_yaml(path)
    return data


def interpolate_default(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default, as with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes as {target in the container: source}."""
    found: dict[str, str] = {}
    for entry in service.get("volumes", []):
        source, target, *_mode = entry.split(":")
        found[target] = source
    return found


def read_only_mounts(service: dict[str, Any]) -> set[str]:
    """The targets of a service's volumes mounted read-only."""
    return {entry.split(":")[1] for entry in service.get("volumes", []) if entry.endswith(":ro")}


def source_of(service: dict[str, Any], path: str) -> tuple[str, str]:
    """The volume or host path that holds `path` in the container, and the path inside it."""
    best = max(
        (t for t in mounts(service) if path.startswith(t.rstrip("/") + "/") or path == t), key=len
    )
    return mounts(service)[best], path[len(best) :].lstrip("/")


def health_url(test: list[str]) -> tuple[int, str]:
    """The loopback port and path a health check command probes."""
    found = HEALTH_URL.search(" ".join(test))
    assert found, f"no http://127.0.0.1:PORT/PATH in health check {test}"
    return int(found.group(1)), found.group(2)


def effective_healthcheck(service: dict[str, Any]) -> list[str] | None:
    """The health check a service runs: its own, else the image's; None when disabled."""
    own = service.get("healthcheck")
    if own is not None:
        return None if own.get("disable") else list(own["test"])
    if service.get("image") == PROXY_IMAGE:
        return ["CMD", *image_healthcheck()]
    return None


def script_defaults(path: Path) -> dict[str, str]:
    """The NAME=${NAME:-default} settings at the top of a shell script."""
    text = path.read_text(encoding="utf-8")
    return dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}$", text, re.MULTILINE))


def settings_file(path: Path) -> Settings:
    """A config file validated as `serve` validates it (schema and scope map)."""
    settings, _scope_map = load_all(str(path))
    return settings


def settings_text(text: str, tmp_path: Path) -> Settings:
    """An embedded config validated as `serve` validates it."""
    path = tmp_path / "embedded.yaml"
    path.write_text(text, encoding="utf-8")
    return settings_file(path)


def check_command(path: Path) -> subprocess.CompletedProcess[str]:
    """`publer-proxy check --config PATH`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def url_port(url: str) -> int:
    """The port of an http URL, with its default."""
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


# --- the Dockerfile and its build context ------------------------------------------------


def test_dockerfile_is_multi_stage_on_debian_slim() -> None:
    """Every stage starts from debian:bookworm-slim; the image keeps only the builder's venv,
    the `dev` target the same venv with proxy/dev added."""
    instructions = dockerfile()
    assert [i.args for i in instructions if i.keyword == "FROM"] == [
        "debian:bookworm-slim AS builder",
        "builder AS dev-builder",
        "debian:bookworm-slim AS base",
        "base AS dev",
        "base",
    ]
    for instructions, builder in ((final_stage(), "builder"), (dev_stage(), "dev-builder")):
        copies = [i.args for i in instructions if "--from" in i.args]
        assert copies == [f"--from={builder} /opt/venv /opt/venv"]


def test_image_leaves_out_the_development_tools() -> None:
    """The builder removes proxy/dev before installing the project, so the image has no
    sandbox and no dev stack; only the `dev` target adds them back."""
    builder = [i for i in dockerfile() if i.stage == stage_names()["builder"]]
    [install] = [i.args for i in builder if "pip install --no-compile --no-deps ." in i.args]
    assert " ".join(install.split()).startswith("rm -r proxy/dev && pip install")
    [dev_copy] = [i.args for i in dockerfile() if i.keyword == "COPY" and "proxy/dev" in i.args]
    assert dev_copy == "proxy/dev ./proxy/dev"
    assert [i.stage for i in dockerfile() if i.args == dev_copy] == [stage_names()["dev-builder"]]
    assert exec_form("ENTRYPOINT") == ["publer-proxy"]
    assert [json.loads(i.args) for i in dev_stage() if i.keyword == "CMD"][-1][0] == "sandbox"


def test_dockerfile_installs_no_extras() -> None:
    """The image gets the project's runtime dependencies only: no test or devstack extras."""
    runs = " ".join(i.args for i in dockerfile() if i.keyword == "RUN")
    assert "pip install" in runs
    assert "[test" not in runs
    assert "devstack" not in runs
    assert "openbao" not in runs


def test_dockerfile_runtime_contract() -> None:
    """Non-root numeric user, the exposed port, the entry point, no bytecode writes."""
    assert the("USER") == "10001:10001"
    assert exec_form("ENTRYPOINT") == ["publer-proxy"]
    assert exec_form("CMD")[0] == "serve"
    env = " ".join(i.args for i in final_stage() if i.keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "--invalidation-mode unchecked-hash" in " ".join(
        i.args for i in dockerfile() if i.keyword == "RUN"
    )
    healthcheck = image_healthcheck()
    assert healthcheck[0] == "python"
    assert health_url(healthcheck) == (exposed_port(), "/healthz")


def test_image_default_config() -> None:
    """The config baked into the image is valid, loopback only, on the exposed port."""
    [copy] = [i.args for i in final_stage() if i.keyword == "COPY" and "proxy.image.yaml" in i.args]
    source, target = copy.split()
    assert ROOT / source == IMAGE_CONFIG
    assert target == image_default_config_path()
    settings = settings_file(IMAGE_CONFIG)
    assert settings.listens_on_loopback_only
    assert settings.listen.port == exposed_port()
    assert check_command(IMAGE_CONFIG).returncode == 0


def test_pip_cert_is_a_build_argument() -> None:
    """The CA bundle for pip is a path given at build time, never a copied file."""
    builder = [i for i in dockerfile() if i.stage == stage_names()["builder"]]
    assert any(i.keyword == "ARG" and i.args.startswith("PIP_CERT") for i in builder)
    assert not any("PIP_CERT" in i.args for i in final_stage())
    assert not any(
        ".crt" in i.args or ".pem" in i.args for i in dockerfile() if i.keyword == "COPY"
    )


def test_dockerignore_allows_only_what_the_dockerfile_copies() -> None:
    """The build context is an allow-list: .venv, .git, keys and caches never enter it."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources: set[str] = set()
    for instruction in dockerfile():
        if instruction.keyword == "COPY" and "--from" not in instruction.args:
            *paths, _target = instruction.args.split()
            sources.update(p.rstrip("/") for p in paths)
    assert allowed == {s for s in sources if not any(s.startswith(o + "/") for o in sources)}
    for source in sources:
        assert (ROOT / source).exists(), source
    # Tracked or committable files: what a clean checkout holds.
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *sorted(sources)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for source in sources:
        assert any(path == source or path.startswith(source + "/") for path in listed), source


# --- docker-compose.yml -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """docker-compose.yml's services."""
    services: dict[str, Any] = compose()["services"]
    return services


def test_compose_services(stack: dict[str, Any]) -> None:
    """Vault, its seeding job, the sandbox from the Dockerfile's dev target, the proxy built
    from the Dockerfile (the image), an app on the proxy's image."""
    assert set(stack) == {"vault", "vault-seed", "sandbox", "proxy", "app"}
    assert stack["proxy"]["build"] == "."
    assert stack["proxy"]["image"] == PROXY_IMAGE
    assert stack["app"]["image"] == PROXY_IMAGE
    assert stack["app"]["pull_policy"] == "never"
    assert stack["sandbox"]["build"] == {"context": ".", "target": "dev"}
    assert stack["sandbox"]["image"] not in (PROXY_IMAGE, None)
    assert stage_names()["dev"] != dockerfile()[-1].stage
    assert stack["vault"]["image"] == stack["vault-seed"]["image"]
    assert stack["vault"]["image"].startswith("openbao/openbao:")


def test_compose_comes_up_in_order(stack: dict[str, Any]) -> None:
    """Each dependency waits on a health check that exists, or on the job's success."""
    expected = {
        "vault-seed": {"vault": "service_healthy"},
        "proxy": {
            "vault": "service_healthy",
            "vault-seed": "service_completed_successfully",
            "sandbox": "service_healthy",
        },
        "app": {"proxy": "service_healthy"},
    }
    for name, service in stack.items():
        found = {dep: spec["condition"] for dep, spec in service.get("depends_on", {}).items()}
        assert found == expected.get(name, {}), name
        for dependency, condition in found.items():
            if condition == "service_healthy":
                assert effective_healthcheck(stack[dependency]), dependency
    assert stack["vault-seed"]["restart"] == "no"


def test_compose_health_checks_probe_the_right_ports(stack: dict[str, Any]) -> None:
    """Every service built from the image probes a port it serves, or has no probe."""
    config = settings_file(ROOT / "deploy" / "proxy.compose.yaml")
    sandbox_port = int(stack["sandbox"]["command"][stack["sandbox"]["command"].index("--port") + 1])
    assert health_url(effective_healthcheck(stack["proxy"]) or []) == (
        config.listen.port,
        "/readyz",
    )
    assert health_url(effective_healthcheck(stack["sandbox"]) or []) == (
        sandbox_port,
        "/__sandbox/health",
    )
    assert effective_healthcheck(stack["app"]) is None
    vault_check = effective_healthcheck(stack["vault"]) or []
    assert vault_check[1:3] == ["bao", "status"]


def test_compose_proxy_config_is_the_seeded_template(stack: dict[str, Any]) -> None:
    """The proxy reads the config that the seed job writes from deploy/proxy.compose.yaml
    into the volume they share, beside the AppRole files the config names."""
    proxy, seed = stack["proxy"], stack["vault-seed"]
    command = proxy["command"]
    config_path = command[command.index("--config") + 1]
    assert command[0] == "serve"
    volume, name_in_volume = source_of(proxy, config_path)
    assert name_in_volume == "proxy.yaml"
    defaults = script_defaults(SEED_SCRIPT)
    assert mounts(seed)[defaults["PROXY_CREDENTIALS_DIR"]] == volume
    template_target = seed["environment"]["PROXY_CONFIG_TEMPLATE"]
    assert ROOT / mounts(seed)[template_target] == ROOT / "deploy" / "proxy.compose.yaml"
    assert os.path.dirname(config_path) in read_only_mounts(proxy)

    settings = settings_file(ROOT / "deploy" / "proxy.compose.yaml")
    auth = settings.vault.auth
    assert auth.method == "approle"
    for path in (auth.role_id_file, auth.secret_id_file):
        assert path is not None
        assert source_of(proxy, str(path)) == (volume, path.name)
    assert {auth.role_id_file.name, auth.secret_id_file.name} <= {"role-id", "secret-id"}  # type: ignore[union-attr]
    assert urlsplit(settings.vault.url).hostname == "vault"
    assert url_port(settings.vault.url) == 8200


def test_compose_proxy_listens_beyond_loopback_only_with_clients(stack: dict[str, Any]) -> None:
    """Other containers reach the proxy, so every route has clients; `check` agrees."""
    template = ROOT / "deploy" / "proxy.compose.yaml"
    settings = settings_file(template)
    assert not settings.listens_on_loopback_only
    assert all(route.clients for route in settings.routes)
    assert ZERO_DIGEST in template.read_text(encoding="utf-8")
    result = check_command(template)
    assert result.returncode == 0, result.stderr
    published = [p.rsplit(":", 1)[-1] for p in stack["proxy"]["ports"]]
    assert published == [str(settings.listen.port)]
    assert [p.split(":")[0] for p in stack["proxy"]["ports"]] == ["127.0.0.1"]
    assert settings.listen.port == exposed_port()


def test_compose_upstream_is_the_sandbox(stack: dict[str, Any]) -> None:
    """The proxy's upstream is the sandbox service on the port it serves."""
    settings = settings_file(ROOT / "deploy" / "proxy.compose.yaml")
    command = stack["sandbox"]["command"]
    assert command[0] == "sandbox"
    assert urlsplit(settings.upstream.url).hostname == "sandbox"
    assert url_port(settings.upstream.url) == int(command[command.index("--port") + 1])
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_compose_app_holds_only_its_client_token(stack: dict[str, Any]) -> None:
    """The app calls the proxy with a client token from the seeded volume, shares no
    network with Vault, and is given no Publer key or Vault credential."""
    app, seed = stack["app"], stack["vault-seed"]
    env = app["environment"]
    proxy_url = urlsplit(env["PROXY_URL"])
    assert proxy_url.hostname == "proxy"
    assert proxy_url.port == settings_file(ROOT / "deploy" / "proxy.compose.yaml").listen.port
    volume, name = source_of(app, env["CLIENT_TOKEN_FILE"])
    assert mounts(seed)[script_defaults(SEED_SCRIPT)["APP_CREDENTIALS_DIR"]] == volume
    assert name == "client-token"
    assert ROOT / mounts(app)[app["entrypoint"][1]] == ROOT / "deploy" / "client_app.py"
    assert set(app["networks"]) & set(stack["vault"]["networks"]) == set()
    assert set(app["networks"]) <= set(stack["proxy"]["networks"])
    for volume_source in mounts(app).values():
        assert volume_source not in ("proxy-credentials", "vault-root")


def test_compose_has_no_secret_in_environment() -> None:
    """No environment value is a secret: variables named like one hold a file path."""
    for path in (COMPOSE, SIDECAR):
        for name, service in compose(path)["services"].items():
            env = service.get("environment", {})
            assert isinstance(env, dict), f"{name}: use the mapping form of environment"
            for key, value in env.items():
                assert key not in ("VAULT_TOKEN", "BAO_TOKEN", "PUBLER_API_KEY"), (name, key)
                if SECRET_NAME.search(key):
                    assert str(value).startswith("/"), (name, key)
                assert not re.fullmatch(r"[A-Za-z0-9_.+/=-]{24,}", str(value)), (name, key)


def test_compose_secrets_come_from_files() -> None:
    """The Publer key reaches the seed job as a compose secret read from a file, by default
    the sandbox's own key; no other service gets it."""
    for path in (COMPOSE, SIDECAR):
        data = compose(path)
        [(name, spec)] = data["secrets"].items()
        assert set(spec) == {"file"}
        default = path.parent / interpolate_default(spec["file"])
        assert default.read_text(encoding="utf-8").strip() == DEFAULT_SANDBOX_KEY
        users = [s for s, service in data["services"].items() if name in service.get("secrets", [])]
        assert users == ["vault-seed"]
        assert script_defaults(SEED_SCRIPT)["PUBLER_API_KEY_FILE"] == f"/run/secrets/{name}"


def test_compose_vault_root_token_stays_with_vault_and_the_job() -> None:
    """Only Vault and the seed job mount the volume holding the dev server's root token."""
    for path in (COMPOSE, SIDECAR):
        services = compose(path)["services"]
        holders = {name for name, s in services.items() if "vault-root" in mounts(s).values()}
        assert holders == {"vault", "vault-seed"}
        assert "/vault-root" in read_only_mounts(services["vault-seed"])
        token_file = script_defaults(SEED_SCRIPT)["ROOT_TOKEN_FILE"]
        assert source_of(services["vault-seed"], token_file) == ("vault-root", "token")


def test_compose_seed_job_mounts_what_its_script_reads() -> None:
    """The job's script, policy and template are mounted where the script looks for them."""
    for path in (COMPOSE, SIDECAR):
        seed = compose(path)["services"]["vault-seed"]
        volumes = mounts(seed)
        assert seed["entrypoint"][0] == "/bin/sh"
        assert (path.parent / volumes[seed["entrypoint"][1]]).resolve() == SEED_SCRIPT
        policy = volumes[script_defaults(SEED_SCRIPT)["POLICY_FILE"]]
        assert (path.parent / policy).resolve() == POLICY
        assert seed["environment"]["BAO_ADDR"] == "http://vault:8200"
        vault = compose(path)["services"]["vault"]
        assert (path.parent / mounts(vault)[vault["entrypoint"][1]]).resolve() == VAULT_DEV_SCRIPT


def test_compose_containers_run_read_only() -> None:
    """Every service from the proxy image runs with a read-only root and no capabilities."""
    for path in (COMPOSE, SIDECAR):
        for name, service in compose(path)["services"].items():
            if service.get("image") == PROXY_IMAGE:
                assert service["read_only"] is True, name
                assert service["cap_drop"] == ["ALL"], name
                assert "no-new-privileges:true" in service["security_opt"], name


def test_proxy_gets_time_to_finish_requests_on_stop(kube: dict[str, dict[str, Any]]) -> None:
    """Compose and Kubernetes wait longer than the proxy's graceful shutdown before
    they kill it."""
    for path in (COMPOSE, SIDECAR):
        grace = compose(path)["services"]["proxy"]["stop_grace_period"]
        assert int(grace.removesuffix("s")) > GRACEFUL_SHUTDOWN_SECONDS, path
    assert kube["Pod"]["spec"]["terminationGracePeriodSeconds"] > GRACEFUL_SHUTDOWN_SECONDS


def test_policy_grants_exactly_the_configured_secret() -> None:
    """config/vault-policy.hcl lets the proxy read the one secret its configs name."""
    paths = re.findall(r'path "([^"]+)"\s*\{\s*capabilities = \["read"\]\s*\}', POLICY.read_text())
    for config in ("proxy.compose.yaml", "proxy.sidecar.yaml", "proxy.image.yaml"):
        settings = settings_file(ROOT / "deploy" / config)
        for credential in settings.credentials.values():
            assert isinstance(credential, CredentialSettings), config
            assert f"{credential.mount}/data/{credential.path}" in paths


def test_scripts_are_posix_shell() -> None:
    """The job scripts parse as POSIX sh (they run under BusyBox in the openbao image)."""
    for script in (SEED_SCRIPT, VAULT_DEV_SCRIPT, ROOT / "scripts" / "container-base.sh"):
        shell = "bash" if script.name == "container-base.sh" else "sh"
        result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert "set -eu" in SEED_SCRIPT.read_text()


# --- the seed job, for real ----------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """What the seed job wrote: the proxy's directory and the app's client token file."""

    proxy_dir: Path
    app_dir: Path
    output: str

    @property
    def config(self) -> dict[str, Any]:
        """The proxy config the job rendered."""
        data: dict[str, Any] = load_yaml(self.proxy_dir / "proxy.yaml")
        return data

    @property
    def client_token(self) -> str:
        """The example app's client token."""
        return (self.app_dir / "client-token").read_text(encoding="utf-8").strip()


def run_seed(
    bao: Bao,
    workdir: Path,
    key: str,
    *,
    template: bool = True,
    root_token_file: Path | None = None,
) -> Seeded:
    """Run deploy/vault-seed.sh as the compose job runs it, with its paths under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    root_token = root_token_file or workdir / "vault-root-token"
    if root_token_file is None:
        root_token.write_text(bao.root_token, encoding="utf-8")
    key_file = workdir / "publer_api_key"
    key_file.write_text(key + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(
        HOME=str(workdir),
        PATH=f"{Path(bao_binary()).parent}{os.pathsep}{env.get('PATH', '')}",
        BAO_ADDR=bao.url,
        ROOT_TOKEN_FILE=str(root_token),
        PUBLER_API_KEY_FILE=str(key_file),
        POLICY_FILE=str(POLICY),
        PROXY_CREDENTIALS_DIR=str(workdir / "proxy-credentials"),
        APP_CREDENTIALS_DIR=str(workdir / "app-credentials"),
        PROXY_CONFIG_TEMPLATE=str(ROOT / "deploy" / "proxy.compose.yaml") if template else "",
    )
    result = subprocess.run(
        ["sh", str(SEED_SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return Seeded(workdir / "proxy-credentials", workdir / "app-credentials", result.stdout)


def loopback_config(seeded: Seeded, bao: Bao, sandbox: Sandbox, port: int) -> dict[str, Any]:
    """The rendered compose config, pointed at loopback servers instead of compose names."""
    config = seeded.config
    config["listen"]["port"] = port
    config["vault"]["url"] = bao.url
    config["upstream"]["url"] = sandbox.url
    config["vault"]["auth"]["role_id_file"] = str(seeded.proxy_dir / "role-id")
    config["vault"]["auth"]["secret_id_file"] = str(seeded.proxy_dir / "secret-id")
    return config


@pytest.fixture(scope="module")
def seed_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """An OpenBao dev server of its own: the job enables auth methods and writes policies."""
    server = start_bao(tmp_path_factory.mktemp("seed-bao"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seed_sandbox(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> Iterator[Sandbox]:
    """The sandbox accepting the session's key."""
    server = start_sandbox(tmp_path_factory.mktemp("seed-sandbox"), api_key)
    yield server
    server.stop()


def test_vault_dev_script_feeds_the_seed_job(tmp_path: Path, api_key: str) -> None:
    """deploy/vault-dev.sh starts OpenBao with a fresh root token that only its 0600 file
    holds; compose's health check command sees the server up; the seed job logs in with
    that file (su-exec, which drops to the openbao user in the image, is a stand-in here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "su-exec").write_text('#!/bin/sh\nshift\nexec "$@"\n', encoding="utf-8")
    (bin_dir / "su-exec").chmod(0o755)
    token_file = tmp_path / "vault-root" / "token"
    token_file.parent.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(
        HOME=str(tmp_path),
        PATH=os.pathsep.join([str(bin_dir), str(Path(bao_binary()).parent), env["PATH"]]),
        ROOT_TOKEN_FILE=str(token_file),
        LISTEN_ADDRESS=f"127.0.0.1:{port}",
    )
    log_path = tmp_path / "vault.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["sh", str(VAULT_DEV_SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    check = [
        arg.replace("http://127.0.0.1:8200", url)
        for arg in compose()["services"]["vault"]["healthcheck"]["test"][1:]
    ]
    bao = Bao(url, "", process, tmp_path, log_path, port)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(check, env=env, capture_output=True).returncode != 0:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        bao.root_token = token_file.read_text(encoding="utf-8")
        assert re.fullmatch(r"[0-9a-f]{64}", bao.root_token)
        run_seed(bao, tmp_path / "seed", api_key, root_token_file=token_file)
        stored = bao.client().secrets.kv.v2.read_secret_version(
            path="publer/api", mount_point="secret", raise_on_deleted_version=True
        )
        assert stored["data"]["data"]["api_key"].strip() == api_key
    finally:
        bao.stop()


def test_seed_job_writes_credentials_and_config(
    seed_bao: Bao, api_key: str, tmp_path: Path
) -> None:
    """The job stores the key, writes 0400 credential files and a config whose client digest
    is the app token's; the key never appears in what it prints."""
    seeded = run_seed(seed_bao, tmp_path, api_key)
    stored = seed_bao.client().secrets.kv.v2.read_secret_version(
        path="publer/api", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["api_key"].strip() == api_key
    for name in ("role-id", "secret-id"):
        mode = (seeded.proxy_dir / name).stat().st_mode
        assert stat.S_IMODE(mode) == 0o400, name
    assert stat.S_IMODE((seeded.app_dir / "client-token").stat().st_mode) == 0o400
    if os.geteuid() == 0:
        assert (seeded.proxy_dir / "secret-id").stat().st_uid == 10001
        assert (seeded.app_dir / "client-token").stat().st_uid == 10001
    settings = parse_settings(seeded.config)
    [route] = settings.routes
    assert route.clients is not None
    assert [c.token_sha256 for c in route.clients] == [hash_token(seeded.client_token)]
    secret_id = (seeded.proxy_dir / "secret-id").read_text().strip()
    for secret in (api_key, seeded.client_token, secret_id, seed_bao.root_token):
        assert secret not in seeded.output


def test_seed_job_runs_again_keeping_the_client_token(
    seed_bao: Bao, api_key: str, tmp_path: Path
) -> None:
    """`docker compose up` restarts the finished job: a second run keeps the issued token."""
    first = run_seed(seed_bao, tmp_path, api_key)
    second = run_seed(seed_bao, tmp_path, api_key)
    assert second.client_token == first.client_token
    assert second.config == first.config


def test_seed_job_refuses_an_empty_key(seed_bao: Bao, tmp_path: Path) -> None:
    """With an empty key file the job fails with a message instead of seeding nothing."""
    with pytest.raises(AssertionError, match="no key in"):
        run_seed(seed_bao, tmp_path, "  ")


def test_seeded_proxy_serves_the_app(
    seed_bao: Bao, seed_sandbox: Sandbox, api_key: str, tmp_path: Path
) -> None:
    """The proxy logs in with the job's AppRole files, serves the app's client token, and
    sends the key from Vault upstream; without the token it refuses."""
    seeded = run_seed(seed_bao, tmp_path / "seed", api_key)
    config = loopback_config(seeded, seed_bao, seed_sandbox, free_port())
    config["listen"]["host"] = "127.0.0.1"
    proxy = start_proxy(tmp_path / "proxy", config)
    try:
        seed_sandbox.clear()
        answer = httpx.get(
            f"{proxy.url}/api/v1/accounts",
            headers={"Authorization": f"Bearer-API {seeded.client_token}"},
            trust_env=False,
        )
        assert answer.status_code == 200, answer.text
        [record] = seed_sandbox.requests()
        assert [v for k, v in record["headers"] if k == "authorization"] == [
            f"Bearer-API {api_key}"
        ]
        refused = httpx.get(f"{proxy.url}/api/v1/accounts", trust_env=False)
        assert refused.status_code == 401
        assert refused.headers["x-publer-proxy-error"] == "client_unauthenticated"
    finally:
        proxy.stop()


def test_client_app_calls_through_the_proxy(
    seed_bao: Bao, seed_sandbox: Sandbox, api_key: str, tmp_path: Path
) -> None:
    """deploy/client_app.py gets a 200 through the proxy with only its client token."""
    seeded = run_seed(seed_bao, tmp_path / "seed", api_key)
    config = loopback_config(seeded, seed_bao, seed_sandbox, free_port())
    config["listen"]["host"] = "127.0.0.1"
    proxy = start_proxy(tmp_path / "proxy", config)
    try:
        env = {k: v for k, v in os.environ.items() if "PUBLER" not in k}
        env.update(
            PROXY_URL=proxy.url,
            CLIENT_TOKEN_FILE=str(seeded.app_dir / "client-token"),
            INTERVAL_SECONDS="0",
        )
        result = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "client_app.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "GET /api/v1/accounts -> 200" in result.stdout
        assert api_key not in result.stdout
    finally:
        proxy.stop()


# --- the compose sidecar ------------------------------------------------------------------


def test_sidecar_shares_the_app_network_and_listens_on_loopback(tmp_path: Path) -> None:
    """The proxy joins the app's network namespace, listens on 127.0.0.1 with the image's
    default command and health check, and the app calls it there with no token."""
    services = compose(SIDECAR)["services"]
    proxy, app = services["proxy"], services["app"]
    assert proxy["network_mode"] == "service:app"
    assert "ports" not in proxy and "networks" not in proxy
    assert (SIDECAR.parent / proxy["build"]["context"]).resolve() == ROOT
    assert "command" not in proxy and "entrypoint" not in proxy
    config_path = image_default_config_path()
    source = mounts(proxy)[config_path]
    assert config_path in read_only_mounts(proxy)
    settings = settings_file(SIDECAR.parent / source)
    assert is_loopback_host(settings.listen.host)
    assert settings.routes[0].clients is None
    assert health_url(effective_healthcheck(proxy) or []) == (settings.listen.port, "/healthz")
    auth = settings.vault.auth
    for path in (auth.role_id_file, auth.secret_id_file):
        assert path is not None
        assert source_of(proxy, str(path)) == ("proxy-credentials", path.name)
    seed = services["vault-seed"]
    assert (
        mounts(seed)[script_defaults(SEED_SCRIPT)["PROXY_CREDENTIALS_DIR"]] == "proxy-credentials"
    )
    assert "PROXY_CONFIG_TEMPLATE" not in seed["environment"]
    url = urlsplit(app["environment"]["PROXY_URL"])
    assert is_loopback_host(url.hostname or "")
    assert url.port == settings.listen.port
    assert "CLIENT_TOKEN_FILE" not in app["environment"]
    assert check_command(SIDECAR.parent / source).returncode == 0


def test_sidecar_comes_up_in_order() -> None:
    """The proxy waits for the app it joins, the seeded credentials and the sandbox."""
    services = compose(SIDECAR)["services"]
    found = {d: s["condition"] for d, s in services["proxy"]["depends_on"].items()}
    assert found == {
        "app": "service_started",
        "vault-seed": "service_completed_successfully",
        "sandbox": "service_healthy",
    }
    assert effective_healthcheck(services["sandbox"])
    assert effective_healthcheck(services["vault"])
    seed_deps = services["vault-seed"]["depends_on"]
    assert seed_deps == {"vault": {"condition": "service_healthy"}}


# --- the Kubernetes pod -------------------------------------------------------------------


@pytest.fixture(scope="module")
def kube() -> dict[str, dict[str, Any]]:
    """deploy/kubernetes.yaml's objects by kind."""
    with KUBERNETES.open(encoding="utf-8") as stream:
        documents: list[dict[str, Any]] = [doc for doc in yaml.safe_load_all(stream) if doc]
    return {doc["kind"]: doc for doc in documents}


def pod_proxy(pod: dict[str, Any]) -> dict[str, Any]:
    """The proxy container: a native sidecar (restartPolicy Always) or a plain container."""
    spec = pod["spec"]
    containers: list[dict[str, Any]] = [*spec.get("initContainers", []), *spec["containers"]]
    [found] = [c for c in containers if c["image"].rsplit("/", 1)[-1].startswith("publer-proxy:")]
    if found in spec.get("initContainers", []):
        assert found["restartPolicy"] == "Always"
    return found


def test_kubernetes_config_validates(kube: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """The ConfigMap's proxy.yaml is valid, uses Kubernetes auth with the default token
    path, and listens on loopback with open routes."""
    assert set(kube) == {"ServiceAccount", "ConfigMap", "Pod"}
    settings = settings_text(kube["ConfigMap"]["data"]["proxy.yaml"], tmp_path)
    assert settings.vault.auth.method == "kubernetes"
    assert settings.vault.auth.role
    assert settings.vault.auth.jwt_file is None
    assert settings.listens_on_loopback_only
    assert settings.vault.url.startswith("https://")


def test_kubernetes_pod_mounts_config_and_token_where_the_proxy_reads(
    kube: dict[str, dict[str, Any]],
) -> None:
    """The config comes from the ConfigMap at the path the args name; only the proxy gets the
    service-account token, at the default path the config relies on."""
    pod, config_map = kube["Pod"], kube["ConfigMap"]
    spec, proxy = pod["spec"], pod_proxy(pod)
    volumes = {v["name"]: v for v in spec["volumes"]}
    by_path = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    config_arg = proxy["args"][proxy["args"].index("--config") + 1]
    directory, key = config_arg.rsplit("/", 1)
    assert (
        volumes[by_path[directory]["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    )
    assert key in config_map["data"]
    token_dir, token_name = str(KUBERNETES_TOKEN_FILE).rsplit("/", 1)
    projected = volumes[by_path[token_dir]["name"]]["projected"]["sources"]
    [source] = [s["serviceAccountToken"] for s in projected if "serviceAccountToken" in s]
    assert source["path"] == token_name
    assert all(m["readOnly"] for m in proxy["volumeMounts"])
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == kube["ServiceAccount"]["metadata"]["name"]
    for container in spec["containers"]:
        if container is not proxy:
            assert not container.get("volumeMounts"), container["name"]


def test_kubernetes_proxy_runs_locked_down(kube: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """Read-only root, non-root as the image's user, no privilege escalation, no capability;
    probes on /healthz and /readyz at the port the config listens on, from inside the pod."""
    pod = kube["Pod"]
    proxy = pod_proxy(pod)
    security = proxy["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == the("USER")
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert proxy["args"][0] == "serve"
    settings = settings_text(kube["ConfigMap"]["data"]["proxy.yaml"], tmp_path)
    probes = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = proxy[kind]
        assert "httpGet" not in probe, "the kubelet's httpGet cannot reach a loopback listener"
        probes[kind] = health_url(probe["exec"]["command"])
    assert probes["livenessProbe"] == (settings.listen.port, "/healthz")
    assert probes["readinessProbe"] == (settings.listen.port, "/readyz")
    for container in pod["spec"]["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["runAsNonRoot"] is True
    app_commands = " ".join(
        shlex.join(c.get("command", []) + c.get("args", [])) for c in pod["spec"]["containers"]
    )
    assert f"http://127.0.0.1:{settings.listen.port}/api/v1/" in app_commands


def test_image_requirements_follow_the_extras_build_argument() -> None:
    """The image installs the core dependencies, plus an extra's only when EXTRAS names
    it (`--build-arg EXTRAS=aws` adds boto3 for AWS Secrets Manager)."""
    [run] = [i.args for i in dockerfile() if "tomllib" in i.args]
    found = re.search(r"python3 -c '([^']+)'", run)
    assert found is not None, run
    listed = {}
    for extras in ("", "aws"):
        result = subprocess.run(
            [sys.executable, "-c", found.group(1)],
            cwd=ROOT,
            env={**os.environ, "EXTRAS": extras},
            capture_output=True,
            text=True,
            check=True,
        )
        listed[extras] = result.stdout.split()
    assert not any(line.startswith("boto3") for line in listed[""])
    assert any(line.startswith("boto3") for line in listed["aws"])
    assert any(line.startswith("hvac") for line in listed[""])
    assert "ARG" in {i.keyword for i in dockerfile() if i.args.startswith("EXTRAS")}


# --- the forward proxy: compose and Kubernetes examples --------------------------------

FORWARD_COMPOSE = ROOT / "deploy" / "forward-proxy.compose.yml"
FORWARD_KUBERNETES = ROOT / "deploy" / "kubernetes-forward-proxy.yaml"
PUBLER_ORIGIN = "https://app.publer.com"


def check_forward_settings(settings: Settings, proxy_env: dict[str, str], ca_variable: str) -> None:
    """The app's HTTPS_PROXY and CA variable name the forward proxy's port and CA file."""
    forward = settings.forward_proxy
    assert forward is not None, "the example must turn the forward proxy on"
    assert settings.upstream.url == PUBLER_ORIGIN
    assert is_loopback_host(forward.host)
    assert is_loopback_host(urlsplit(proxy_env["HTTPS_PROXY"]).hostname or "")
    assert url_port(proxy_env["HTTPS_PROXY"]) == forward.port
    assert proxy_env[ca_variable] == str(forward.ca_certificate_file)
    assert not [name for name in proxy_env if SECRET_NAME.search(name)]


def test_forward_compose_app_reaches_publer_through_the_forward_proxy() -> None:
    """The unchanged app gets HTTPS_PROXY and SSL_CERT_FILE that match the proxy's config,
    reads the CA file from the volume the proxy writes it to, and holds no Vault material."""
    services = compose(FORWARD_COMPOSE)["services"]
    app, proxy = services["app"], services["proxy"]
    assert proxy["network_mode"] == "service:app"
    volume, name = source_of(proxy, image_default_config_path())
    settings = settings_file((FORWARD_COMPOSE.parent / volume).resolve())
    assert name == ""
    check_forward_settings(settings, app["environment"], "SSL_CERT_FILE")
    assert settings.forward_proxy is not None
    ca_dir = str(settings.forward_proxy.ca_certificate_file.parent)
    assert mounts(app)[ca_dir] == mounts(proxy)[ca_dir]
    assert ca_dir in read_only_mounts(app)
    assert ca_dir not in read_only_mounts(proxy)
    assert "proxy-credentials" not in mounts(app).values()
    script = app["entrypoint"][-1]
    assert (FORWARD_COMPOSE.parent / mounts(app)[script]).is_file()
    for service in (app, proxy):
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
    assert int(proxy["stop_grace_period"].removesuffix("s")) > GRACEFUL_SHUTDOWN_SECONDS


def test_forward_image_prepares_the_ca_folder() -> None:
    """The image holds the CA folder owned by its user, so a fresh volume there is writable."""
    assert "install -d -o 10001 -g 10001 -m 0755 /run/publer-proxy-ca" in DOCKERFILE.read_text()
    services = compose(FORWARD_COMPOSE)["services"]
    assert "/run/publer-proxy-ca" in mounts(services["proxy"])


def test_forward_kubernetes_sidecar_agrees_with_its_config(tmp_path: Path) -> None:
    """The pod's app trusts the CA file the proxy writes to a shared in-memory volume, names
    the forward proxy's port, and calls Publer's own URL; the proxy runs locked down."""
    with FORWARD_KUBERNETES.open(encoding="utf-8") as stream:
        objects = {doc["kind"]: doc for doc in yaml.safe_load_all(stream) if doc}
    assert set(objects) == {"ServiceAccount", "ConfigMap", "Pod"}
    settings = settings_text(objects["ConfigMap"]["data"]["proxy.yaml"], tmp_path)
    spec = objects["Pod"]["spec"]
    proxy = pod_proxy(objects["Pod"])
    [app] = spec["containers"]
    env = {item["name"]: item["value"] for item in app["env"]}
    check_forward_settings(settings, env, "CURL_CA_BUNDLE")
    assert settings.forward_proxy is not None
    ca_dir = str(settings.forward_proxy.ca_certificate_file.parent)
    volumes = {v["name"]: v for v in spec["volumes"]}
    proxy_mount = {m["mountPath"]: m for m in proxy["volumeMounts"]}[ca_dir]
    app_mount = {m["mountPath"]: m for m in app["volumeMounts"]}[ca_dir]
    assert proxy_mount["name"] == app_mount["name"]
    assert volumes[app_mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert app_mount["readOnly"] is True and not proxy_mount.get("readOnly")
    assert f"{PUBLER_ORIGIN}/api/v1/" in " ".join(app["args"])
    security = proxy["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == the("USER")
    assert spec["securityContext"]["fsGroup"] == security["runAsGroup"]
    assert health_url(proxy["startupProbe"]["exec"]["command"]) == (
        settings.listen.port,
        "/readyz",
    )
    assert spec["terminationGracePeriodSeconds"] > GRACEFUL_SHUTDOWN_SECONDS


_PROXY_CALL = re.compile(r"http://([A-Za-z0-9.\-\[\]:]+?):(\d+)/")


def _calls_pass_host_check(settings: Settings, text: str, extra: list[str]) -> list[str]:
    """The URLs in `text` (and `extra`) aimed at the proxy's port whose Host the proxy
    would refuse."""
    names = listener_names(settings.listen.host, settings.listen.allowed_hosts)
    port = settings.listen.port
    refused = []
    for url in [*(m.group(0) for m in _PROXY_CALL.finditer(text)), *extra]:
        parts = urlsplit(url)
        if parts.port != port:
            continue
        verdict = check_host(
            [parts.netloc.encode()], names, port, http_version="1.1", key="listen.allowed_hosts"
        )
        if verdict is not None:
            refused.append(url)
    return refused


def test_deploy_files_call_the_proxy_by_names_it_accepts(tmp_path: Path) -> None:
    """Every URL a deploy file uses to reach the proxy (apps' PROXY_URL, health checks,
    probes) names a host the config it serves lists or reaches on loopback, so none is
    refused as a foreign Host."""
    compose_text = COMPOSE.read_text(encoding="utf-8")
    compose_config = settings_file(ROOT / "deploy" / "proxy.compose.yaml")
    assert "proxy" in compose_config.listen.allowed_hosts
    app_url = compose()["services"]["app"]["environment"]["PROXY_URL"] + "/"
    assert _calls_pass_host_check(compose_config, compose_text, [app_url]) == []
    sidecar_text = SIDECAR.read_text(encoding="utf-8")
    sidecar_config = settings_file(ROOT / "deploy" / "proxy.sidecar.yaml")
    assert _calls_pass_host_check(sidecar_config, sidecar_text, []) == []
    for path in (KUBERNETES, FORWARD_KUBERNETES):
        text = path.read_text(encoding="utf-8")
        objects = {doc["kind"]: doc for doc in yaml.safe_load_all(text) if doc}
        settings = settings_text(objects["ConfigMap"]["data"]["proxy.yaml"], tmp_path)
        assert _calls_pass_host_check(settings, text, []) == []
    # The check itself refuses a name no config lists.
    assert _calls_pass_host_check(compose_config, "http://publer-proxy:8080/", []) != []
