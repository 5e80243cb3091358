"""Live config changes over a real proxy process: edited and broken under load, none fails."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.config.settings import parse_settings
from proxy.reload import restart_only_changes
from proxy.rules.policy import hash_token
from tests.bao import Bao
from tests.conftest import WORKSPACE
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy
from tests.test_cli import one_mistake_per_stage
from tests.waiting import eventually

TOKEN_A = "app-a-" + secrets.token_hex(16)
TOKEN_B = "app-b-" + secrets.token_hex(16)
TOKEN_C = "app-c-" + secrets.token_hex(16)


def _route(name: str, prefix: str, credential: str, clients: dict[str, str] | None) -> Any:
    route: dict[str, Any] = {
        "name": name,
        "prefix": prefix,
        "credential": credential,
        "workspace_id": WORKSPACE,
        "scopes": ["posts", "users"],
    }
    if clients:
        route["clients"] = [
            {"name": n, "token_sha256": hash_token(t)} for n, t in sorted(clients.items())
        ]
    return route


def _base_config(bao: Bao, token_file: Path, sandbox: Sandbox) -> dict[str, Any]:
    config = proxy_config(
        bao.url,
        sandbox.url,
        token_file=token_file,
        routes=[
            _route("default", "", "publer", None),
            _route("team", "/team", "publer", {"app-a": TOKEN_A}),
        ],
    )
    config["logging"]["level"] = "info"
    return config


class Load:
    """Client threads calling the routes that every config of the test keeps, until
    stopped; every answer but 200, and every exception, is a failure."""

    CALLS: tuple[tuple[str, dict[str, str]], ...] = (
        ("/api/v1/users/me", {}),
        ("/team/api/v1/posts", {"Authorization": f"Bearer-API {TOKEN_A}"}),
    )

    def __init__(self, proxy: Proxy, threads: int = 4) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, number: int) -> None:
        with httpx.Client(base_url=self.proxy.url, timeout=10, trust_env=False) as client:
            turn = number
            while not self.stop.is_set():
                path, headers = self.CALLS[turn % len(self.CALLS)]
                turn += 1
                try:
                    status = str(client.get(path, headers=headers).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.outcomes[status] += 1
                    if status != "200":
                        self.failures.append(f"{path}: {status}")

    def total(self) -> int:
        """Requests answered so far."""
        with self._lock:
            return sum(self.outcomes.values())


def _config_state(proxy: Proxy) -> dict[str, Any]:
    state: dict[str, Any] = httpx.get(f"{proxy.url}/readyz", timeout=5).json()["config"]
    return state


def _write_and_reload(proxy: Proxy, text: str) -> dict[str, Any]:
    """Write the config file, send SIGHUP, and wait until the reload's outcome shows."""
    before = _config_state(proxy).get("last_reload")
    proxy.config_path.write_text(text)
    proxy.process.send_signal(signal.SIGHUP)
    found: dict[str, Any] = {}

    def reloaded() -> bool:
        found.update(_config_state(proxy))
        return found.get("last_reload") not in (None, before)

    eventually(reloaded, timeout=15, step=0.05)
    return found


def _serving(proxy: Proxy) -> dict[str, Any]:
    """The config the proxy was started with (its port included)."""
    config: dict[str, Any] = yaml.safe_load(proxy.config_path.read_text())
    return config


def _vault_reads(proxy: Proxy) -> float:
    """Successful Vault reads so far, from /metrics."""
    for line in httpx.get(f"{proxy.url}/metrics").text.splitlines():
        if line.startswith('publer_proxy_vault_operations_total{operation="read",outcome="ok"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _rejections(proxy: Proxy) -> list[dict[str, Any]]:
    return [e for e in proxy.events() if e.get("event") == "config_reload_rejected"]


@pytest.fixture
def reloading_proxy(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> Iterator[Proxy]:
    """A proxy serving a config file it was started with, on two routes."""
    proxy = start_proxy(tmp_path, _base_config(bao, token_file, sandbox))
    yield proxy
    proxy.stop()


def test_edits_and_breakage_under_load_fail_no_request(
    reloading_proxy: Proxy, bao: Bao, token_file: Path, sandbox: Sandbox, api_key: str
) -> None:
    """Under a concurrent client loop: a route, a client and a credential are added, a
    scope is removed, the file is broken three ways (bad YAML, a bad key, a restart-only
    key), then the additions are removed again; not one request of the loop fails, each
    change shows in /readyz's digest, and each rejection names its key."""
    proxy = reloading_proxy
    second = f"reload/{secrets.token_hex(4)}"
    bao.write_key(second, api_key)
    base = _serving(proxy)
    start = _config_state(proxy)
    assert start["sha256"] == _digest(proxy.config_path.read_text())
    with Load(proxy) as load:
        eventually(lambda: load.total() > 20)

        # 1. A new route on a new credential, with a new client: read before the swap.
        grown = json.loads(json.dumps(base))
        grown["credentials"]["second"] = {"path": second, "refresh_seconds": 0.5}
        grown["routes"].append(_route("newcomer", "/new", "second", {"app-b": TOKEN_B}))
        grown["routes"][1]["clients"].append({"name": "app-c", "token_sha256": hash_token(TOKEN_C)})
        text = yaml.safe_dump(grown)
        state = _write_and_reload(proxy, text)
        assert state["last_reload"]["result"] == "applied"
        assert state["sha256"] == _digest(text)
        assert state["generation"] == start["generation"] + 1
        # The first request after the swap finds the new key held.
        answer = httpx.get(
            f"{proxy.url}/new/api/v1/users/me", headers={"Authorization": f"Bearer {TOKEN_B}"}
        )
        assert answer.status_code == 200, answer.text
        answer = httpx.get(
            f"{proxy.url}/team/api/v1/posts", headers={"Authorization": f"Bearer {TOKEN_C}"}
        )
        assert answer.status_code == 200, answer.text
        ready = httpx.get(f"{proxy.url}/readyz").json()
        assert ready["credentials"]["second"]["state"] == "fresh"
        reads = _vault_reads(proxy)
        eventually(lambda: _vault_reads(proxy) >= reads + 2)  # "second" is refreshed

        # 2. A scope taken away applies to the next request.
        narrowed = json.loads(json.dumps(grown))
        narrowed["routes"][2]["scopes"] = ["users"]
        text = yaml.safe_dump(narrowed)
        assert _write_and_reload(proxy, text)["sha256"] == _digest(text)
        answer = httpx.get(
            f"{proxy.url}/new/api/v1/posts", headers={"Authorization": f"Bearer {TOKEN_B}"}
        )
        assert answer.status_code == 403
        assert answer.json()["code"] == "scope_denied"
        serving = _digest(text)

        # 3. Broken three ways: each is refused, the running config keeps serving.
        for broken, result, named in [
            ("routes: [\n  - name: x\n   bad indent", "invalid", None),
            (
                yaml.safe_dump({**narrowed, "routes": [{**narrowed["routes"][0], "colour": 1}]}),
                "invalid",
                "routes.0.colour",
            ),
            (
                yaml.safe_dump({**narrowed, "listen": {**narrowed["listen"], "port": 1}}),
                "refused",
                "listen.port",
            ),
        ]:
            state = _write_and_reload(proxy, broken)
            assert state["last_reload"]["result"] == result, broken
            assert state["sha256"] == serving
            if named is not None:
                problems = _rejections(proxy)[-1]["problems"]
                assert any(named in line for line in problems), problems
        assert "listen.port" in " ".join(_rejections(proxy)[-1]["problems"])
        answer = httpx.get(
            f"{proxy.url}/new/api/v1/users/me", headers={"Authorization": f"Bearer {TOKEN_B}"}
        )
        assert answer.status_code == 200

        # 4. Back to the first config: the route and the credential are gone.
        text = yaml.safe_dump(base)
        assert _write_and_reload(proxy, text)["sha256"] == _digest(text)
        answer = httpx.get(
            f"{proxy.url}/new/api/v1/users/me", headers={"Authorization": f"Bearer {TOKEN_B}"}
        )
        assert answer.json()["code"] == "no_route"
        answer = httpx.get(
            f"{proxy.url}/team/api/v1/posts", headers={"Authorization": f"Bearer {TOKEN_C}"}
        )
        assert answer.json()["code"] == "client_unauthenticated"
        assert "second" not in httpx.get(f"{proxy.url}/readyz").json()["credentials"]
        assert 'credential="second"' not in httpx.get(f"{proxy.url}/metrics").text
        reads = _vault_reads(proxy)
        time.sleep(2.0)
        assert _vault_reads(proxy) == reads, "the removed credential is still refreshed"
        eventually(lambda: load.total() > 200, timeout=30)
    assert load.failures == [], load.outcomes
    assert load.total() > 200
    applied = [e for e in proxy.events() if e.get("event") == "config_reloaded"]
    assert len(applied) == 3
    metrics = httpx.get(f"{proxy.url}/metrics").text
    for result, count in (("applied", 3), ("invalid", 2), ("refused", 1)):
        assert f'publer_proxy_config_reloads_total{{result="{result}"}} {count}.0' in metrics
    assert applied[0]["credentials_added"] == ["second"]
    assert applied[-1]["credentials_removed"] == ["second"]
    assert proxy.stop() == 0


def test_request_in_flight_finishes_on_the_config_it_started_with(
    reloading_proxy: Proxy, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A slow upload on a route that a reload removes while it is sent completes (201 or
    202 from Publer), and the next request on that route is no_route."""
    proxy = reloading_proxy
    base = _serving(proxy)
    sent = threading.Event()
    result: dict[str, Any] = {}
    padding = "x" * (512 * 1024)
    body = json.dumps({"bulk": {"state": "scheduled", "posts": [{"text": padding}]}}).encode()

    def chunks() -> Iterator[bytes]:
        step = 64 * 1024
        for offset in range(0, len(body), step):
            yield body[offset : offset + step]
            if offset == 0:
                sent.set()
                time.sleep(1.5)  # the reload happens while the body is still coming

    def upload() -> None:
        try:
            answer = httpx.post(
                f"{proxy.url}/team/api/v1/posts",
                content=chunks(),
                headers={
                    "Authorization": f"Bearer-API {TOKEN_A}",
                    "Content-Type": "application/json",
                    "Content-Length": str(len(body)),
                },
                timeout=30,
            )
            result["status"] = answer.status_code
        except httpx.HTTPError as exc:
            result["status"] = type(exc).__name__

    thread = threading.Thread(target=upload)
    thread.start()
    assert sent.wait(10)
    time.sleep(0.2)
    without_team = {**base, "routes": base["routes"][:1]}
    state = _write_and_reload(proxy, yaml.safe_dump(without_team))
    assert state["last_reload"]["result"] == "applied"
    assert thread.is_alive(), "the upload ended before the reload"
    thread.join(30)
    assert result["status"] in (200, 201, 202), result
    answer = httpx.get(
        f"{proxy.url}/team/api/v1/posts", headers={"Authorization": f"Bearer-API {TOKEN_A}"}
    )
    assert answer.json()["code"] == "no_route"
    applied = [e for e in proxy.events() if e.get("event") == "config_reloaded"]
    assert applied[-1]["in_flight_on_previous"] >= 1


def test_unreadable_new_credential_refuses_the_reload(
    reloading_proxy: Proxy, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A reload adding a credential whose key Vault does not have is refused, naming the
    credential, and the running config keeps serving (`check` prints the digest that
    /readyz shows for the file it serves)."""
    proxy = reloading_proxy
    config = _serving(proxy)
    before = _config_state(proxy)["sha256"]
    check = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(proxy.config_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"is valid (sha256 {before})" in check.stdout
    config["credentials"]["ghost"] = {"path": "does/not/exist"}
    config["routes"].append(_route("ghost", "/ghost", "ghost", None))
    state = _write_and_reload(proxy, yaml.safe_dump(config))
    assert state["last_reload"]["result"] == "refused"
    assert state["sha256"] == before
    problems = _rejections(proxy)[-1]["problems"]
    assert any(line.startswith("credentials.ghost:") for line in problems), problems
    assert httpx.get(f"{proxy.url}/ghost/api/v1/users/me").json()["code"] == "no_route"
    assert httpx.get(f"{proxy.url}/api/v1/users/me").status_code == 200


def test_a_rejected_reload_names_every_mistake_at_once(reloading_proxy: Proxy) -> None:
    """One rejected reload's log event lists every mistake of every stage (keys, checks
    between keys, client tokens, the scope map) and a changed restart-only key, and the
    running config keeps serving."""
    proxy = reloading_proxy
    config = _serving(proxy)
    expected = one_mistake_per_stage(config)
    config["logging"]["level"] = "warning"  # valid, but only a restart applies it
    state = _write_and_reload(proxy, yaml.safe_dump(config))
    assert state["last_reload"]["result"] == "invalid"
    rejections = _rejections(proxy)
    assert len(rejections) == 1
    problems = rejections[0]["problems"]
    for line in [*expected, "logging.level: cannot change while the proxy runs"]:
        assert any(line in problem for problem in problems), (line, problems)
    assert httpx.get(f"{proxy.url}/api/v1/users/me").status_code == 200


def test_watched_file_reloads_without_a_signal(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """With reload.watch, replacing the file (written aside, then renamed over it, as
    editors and Kubernetes do) reloads it; a half-written file changes nothing."""
    config = _base_config(bao, token_file, sandbox)
    config["reload"] = {"watch": True}
    proxy = start_proxy(tmp_path, config)
    try:
        eventually(lambda: "config_watch_started" in proxy.output())
        grown = {**config, "routes": [*config["routes"], _route("w", "/w", "publer", None)]}
        text = yaml.safe_dump(grown)
        aside = proxy.config_path.with_suffix(".tmp")
        aside.write_text(text)
        os.replace(aside, proxy.config_path)
        eventually(lambda: _config_state(proxy)["sha256"] == _digest(text))
        assert httpx.get(f"{proxy.url}/w/api/v1/users/me").status_code == 200
        assert _config_state(proxy)["last_reload"]["trigger"] == "file change"
        proxy.config_path.write_text(text[: len(text) // 2])  # caught half-written
        eventually(lambda: _config_state(proxy)["last_reload"]["result"] == "invalid")
        assert httpx.get(f"{proxy.url}/w/api/v1/users/me").status_code == 200
        assert _config_state(proxy)["sha256"] == _digest(text)
    finally:
        proxy.stop()


def _applied(proxy: Proxy) -> list[str]:
    """The digests of the configs the proxy applied, in order."""
    return [e["sha256"] for e in proxy.events() if e.get("event") == "config_reloaded"]


def _in_halves(config: dict[str, Any], routes: list[Any], cut: int) -> tuple[bytes, bytes]:
    """The config as YAML in two halves: the first is a whole config with only the first
    `cut` routes, the second adds the rest."""
    head = yaml.safe_dump({k: v for k, v in config.items() if k != "routes"})
    first = head + yaml.safe_dump({"routes": routes[:cut]})
    return first.encode(), yaml.safe_dump(routes[cut:]).encode()


def test_an_editors_save_is_applied_once_and_whole(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """With reload.watch, a file written in place in two pieces (the first a valid config
    missing a route) is applied only once complete, by one writer or two: that route never
    answers 404; a save through a swap file and rename, and a direct save, are each
    applied exactly once."""
    config = _base_config(bao, token_file, sandbox)
    config["reload"] = {"watch": True}
    kept = _route("w", "/w", "publer", None)
    config["routes"] = [*config["routes"], kept]
    proxy = start_proxy(tmp_path, config)
    statuses: list[int] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=proxy.url) as http:
            while not done.is_set():
                statuses.append(http.get("/w/api/v1/users/me").status_code)

    poller = threading.Thread(target=poll)
    try:
        eventually(lambda: "config_watch_started" in proxy.output())
        poller.start()
        routes = [*config["routes"], _route("x", "/x", "publer", None)]
        first, rest = _in_halves(config, routes, 2)  # the first half lacks /w
        assert "routes" in yaml.safe_load(first)  # the first half alone is a valid config
        whole = first + rest
        with proxy.config_path.open("r+b") as file:  # an in-place write, in two pieces
            file.truncate(0)
            file.write(first)
            file.flush()
            time.sleep(2.0)  # the writer pauses mid-file: part of the scenario
            file.write(rest)
        eventually(lambda: _applied(proxy) == [hashlib.sha256(whole).hexdigest()])
        assert httpx.get(f"{proxy.url}/x/api/v1/users/me").status_code == 200

        swapped = yaml.safe_dump({**config, "routes": [*routes, _route("y", "/y", "publer", None)]})
        swap = proxy.config_path.with_name(f".{proxy.config_path.name}.swp")
        swap.write_text(swapped)  # vim-style: written aside, then renamed over the file
        os.replace(swap, proxy.config_path)
        eventually(lambda: len(_applied(proxy)) == 2)

        direct = yaml.safe_dump({**config, "routes": [*routes, _route("z", "/z", "publer", None)]})
        proxy.config_path.write_text(direct)  # a direct save: truncate, write, close
        eventually(lambda: len(_applied(proxy)) == 3)
        assert httpx.get(f"{proxy.url}/z/api/v1/users/me").status_code == 200

        # Two writers one after the other (`cat a > f; cat b >> f`), the file closed in
        # between: the settle time alone keeps the first piece from being applied.
        again, more = _in_halves(config, [*routes, _route("v", "/v", "publer", None)], 2)
        proxy.config_path.write_bytes(again)
        time.sleep(1.0)  # the pause between the two writers: part of the scenario
        with proxy.config_path.open("ab") as appending:
            appending.write(more)
        eventually(lambda: len(_applied(proxy)) == 4)
        assert _applied(proxy) == [
            hashlib.sha256(whole).hexdigest(),
            _digest(swapped),
            _digest(direct),
            hashlib.sha256(again + more).hexdigest(),
        ]
        assert httpx.get(f"{proxy.url}/v/api/v1/users/me").status_code == 200
    finally:
        done.set()
        if poller.is_alive():
            poller.join()
        proxy.stop()
    assert statuses and set(statuses) == {200}, Counter(statuses)


_LEASE_BROKEN = """
import fcntl, subprocess, sys, time
from pathlib import Path
from proxy import reload

path = Path(sys.argv[1])
take = fcntl.fcntl

def fcntl_then_a_writer(fd, command, arg=0):
    result = take(fd, command, arg)
    if command == fcntl.F_SETLEASE and arg == fcntl.F_RDLCK:
        # A writer opens the file while the lease is held: the kernel breaks the lease.
        writer = subprocess.Popen([sys.executable, "-c", f"open({str(path)!r}, 'a')"])
        deadline = time.monotonic() + 10
        wchan = Path(f"/proc/{writer.pid}/wchan")
        while wchan.read_text() != "__break_lease" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert wchan.read_text() == "__break_lease"
    return result

reload.fcntl.fcntl = fcntl_then_a_writer
print("writer:", reload._open_for_writing(path), flush=True)
"""


def test_the_writer_probe_survives_a_writer_arriving(tmp_path: Path) -> None:
    """A writer opening the config while the proxy probes it for writers (the kernel then
    signals the probe) does not end the proxy's process."""
    config = tmp_path / "proxy.yaml"
    config.write_text("routes: []\n")
    probe = subprocess.run(
        [sys.executable, "-c", _LEASE_BROKEN, str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert probe.returncode == 0, (probe.returncode, probe.stderr)
    assert probe.stdout == "writer: False\n"


def test_budget_limit_reloads_and_keeps_what_was_spent(reloading_proxy: Proxy) -> None:
    """A lower rate limit applies to the next request and counts what the window already
    spent: after 3 requests, a limit of 5 lets 2 more through, then answers 429."""
    proxy = reloading_proxy
    for _ in range(3):
        assert httpx.get(f"{proxy.url}/api/v1/users/me").status_code == 200
    config = _serving(proxy)
    config["rate_limit"] = {"requests": 5, "per_seconds": 120}
    assert _write_and_reload(proxy, yaml.safe_dump(config))["last_reload"]["result"] == "applied"
    statuses = [httpx.get(f"{proxy.url}/api/v1/users/me").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def _configmap_version(volume: Path, text: str) -> None:
    """Publish `text` as Kubernetes publishes a ConfigMap volume: a new timestamped folder,
    then the `..data` link swapped to it with one rename; `proxy.yaml` is a link through
    `..data` that itself never changes."""
    version = volume / f"..{time.time_ns()}"
    version.mkdir()
    (version / "proxy.yaml").write_text(text)
    staging = volume / "..data_tmp"
    staging.symlink_to(version.name)
    os.replace(staging, volume / "..data")
    link = volume / "proxy.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/proxy.yaml")


def test_watched_configmap_volume_reloads_on_the_link_swap(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """A config mounted the Kubernetes way (proxy.yaml -> ..data/proxy.yaml, ..data
    re-pointed to a new folder on update) is reloaded when the link is swapped, though the
    file the proxy was given is never written."""
    config = _base_config(bao, token_file, sandbox)
    config["reload"] = {"watch": True}
    volume = tmp_path / "volume"
    volume.mkdir()
    _configmap_version(volume, yaml.safe_dump(config))
    proxy = start_proxy(tmp_path, config, config_path=volume / "proxy.yaml")
    try:
        eventually(lambda: "config_watch_started" in proxy.output())
        grown = {**config, "routes": [*config["routes"], _route("k", "/k", "publer", None)]}
        text = yaml.safe_dump(grown)
        _configmap_version(volume, text)
        eventually(lambda: _config_state(proxy)["sha256"] == _digest(text))
        assert httpx.get(f"{proxy.url}/k/api/v1/users/me").status_code == 200
    finally:
        proxy.stop()


def _settings(**changes: Any) -> Any:
    data: dict[str, Any] = {
        "credentials": {"publer": {"path": "publer/api"}},
        "routes": [_route("default", "", "publer", None)],
    }
    data.update(changes)
    return parse_settings(data)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"listen": {"port": 9999}}, ["listen.port"]),
        ({"listen": {"unix_socket": "/run/p.sock"}}, ["listen.unix_socket"]),
        ({"logging": {"format": "console", "level": "debug"}}, ["logging.format", "logging.level"]),
        ({"upstream": {"url": "https://example.com"}}, ["upstream.url"]),
        (
            {"vault": {"url": "https://vault.example.com", "auth": {"method": "token"}}},
            ["vault.url"],
        ),
        ({"rate_limit": {"requests": 5}}, []),
        ({"routes": [_route("other", "/o", "publer", {"x": TOKEN_A})]}, []),
    ],
)
def test_restart_only_keys_are_named(changes: dict[str, Any], named: list[str]) -> None:
    """Each changed key that only a restart applies is named on its own line; routes,
    clients and budgets are not among them."""
    problems = restart_only_changes(_settings(), _settings(**changes))
    assert [line.split(":")[0] for line in problems] == named
    assert all("restart" in line for line in problems)
