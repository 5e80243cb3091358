"""`check --online` asks Publer about each key within its routes' scopes, and fails when
nothing could be verified."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config.settings import UpstreamSettings
from proxy.keys.outbound import publer_request
from tests.bao import Bao, free_port
from tests.servers import Sandbox, make_tls, proxy_config, start_sandbox

WS = "5f8d7a62c9e77e001f36e3a1"


def _check(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--online", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


@pytest.fixture(scope="module", params=["docs", "live"])
def publer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sandbox]:
    """A sandbox answering 401/403 as documented, then as the live API does."""
    server = start_sandbox(
        tmp_path_factory.mktemp("online"), "placeholder-key", auth_errors=request.param
    )
    yield server
    server.stop()


def _config(bao: Bao, token_file: Path, upstream: str, key: str, **route: Any) -> dict[str, Any]:
    path = f"online/{secrets.token_hex(4)}"
    bao.write_key(path, key)
    routes = [{"name": "r", "credential": "publer", "workspace_id": WS, **route}]
    return proxy_config(
        bao.url, upstream, token_file=token_file, credential={"path": path}, routes=routes
    )


@pytest.mark.parametrize(
    ("sandbox_key", "scopes", "code", "words"),
    [
        # A least-privilege key: posts only, on a posts-only route. It is asked about
        # /posts, never /workspaces, and passes.
        ({"scopes": ["posts"]}, ["posts"], 0, "Publer accepts the key (200 to GET /api/v1/posts)"),
        # A key whose route wants more than it has is alive: the check says what it lacks.
        ({"scopes": ["posts"]}, ["users", "posts"], 0, "lacks scope 'users'"),
        ({"revoked": True}, ["posts"], 2, "Publer rejects the key"),
        ({"workspaces": ["aaaaaaaaaaaaaaaaaaaaaaaa"]}, ["posts"], 2, f"not workspace '{WS}'"),
    ],
)
def test_probe_stays_within_the_route_and_names_the_cause(
    tmp_path: Path,
    bao: Bao,
    token_file: Path,
    publer: Sandbox,
    sandbox_key: dict[str, Any],
    scopes: list[str],
    code: int,
    words: str,
) -> None:
    """The probe is an endpoint of the route's scopes; a scope refusal means alive; a
    rejected key or workspace fails, named right in the documented and the live answers."""
    key = "pk_online_" + secrets.token_hex(8)
    publer.set_keys({"key": key, **sandbox_key})
    result = _check(tmp_path, _config(bao, token_file, publer.url, key, scopes=scopes))
    assert result.returncode == code, result.stdout + result.stderr
    assert words in result.stdout, result.stdout
    assert key not in result.stdout + result.stderr


def test_publer_unreachable_fails_the_check(tmp_path: Path, bao: Bao, token_file: Path) -> None:
    """Nothing listening where Publer should be: exit 2, saying Publer could not be asked."""
    config = _config(
        bao,
        token_file,
        f"http://127.0.0.1:{free_port()}",
        "pk_" + secrets.token_hex(8),
        scopes=["posts"],
    )
    result = _check(tmp_path, config)
    assert result.returncode == 2, result.stdout
    assert "cannot ask Publer" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_tls_failure_names_the_certificate_problem(
    tmp_path: Path, bao: Bao, token_file: Path
) -> None:
    """An upstream whose certificate the check cannot verify: exit 2, and the message
    says it is the certificate and how to trust it."""
    key = "pk_" + secrets.token_hex(8)
    secure = start_sandbox(tmp_path / "tls-sandbox", key, tls=make_tls(tmp_path / "tls"))
    try:
        result = _check(tmp_path, _config(bao, token_file, secure.url, key, scopes=["posts"]))
    finally:
        secure.stop()
    assert result.returncode == 2, result.stdout
    assert "certificate verification failed" in result.stdout
    assert "upstream.ca_file" in result.stdout


def test_probe_is_chosen_within_the_routes_scopes() -> None:
    """The cheapest endpoint a route allows is asked, with the route's workspace only
    where Publer takes one."""
    from proxy.config.settings import RouteSettings
    from proxy.online import choose_probe

    def route(scopes: list[str], workspace: str | None = WS) -> RouteSettings:
        return RouteSettings(name="r", credential="c", workspace_id=workspace, scopes=scopes)

    assert choose_probe([route(["posts", "users"])]).path == "/api/v1/users/me"
    assert choose_probe([route(["posts", "users"])]).workspace is None
    assert choose_probe([route(["media", "posts"])]).path == "/api/v1/posts?page=0"
    assert choose_probe([route(["media", "posts"])]).workspace == WS
    assert choose_probe([route(["job_status"])]).path.startswith("/api/v1/job_status/")
    assert choose_probe([route(["analytics"], None)]).workspace is None
    assert choose_probe([route(["media"]), route(["workspaces"])]).path == "/api/v1/workspaces"


def test_probe_dials_connect_to_with_the_origin_name() -> None:
    """With upstream.connect_to, the probe dials that address and sends the origin's name as
    Host and as the TLS name it checks; without it, the origin itself."""
    stand_in = UpstreamSettings(url="https://app.publer.com", connect_to="127.0.0.1:8443")
    assert publer_request(stand_in, "/api/v1/users/me") == (
        "https://127.0.0.1:8443/api/v1/users/me",
        {"Host": "app.publer.com"},
        {"sni_hostname": "app.publer.com"},
    )
    direct = UpstreamSettings(url="https://app.publer.com")
    assert publer_request(direct, "/api/v1/users/me") == (
        "https://app.publer.com/api/v1/users/me",
        {},
        {},
    )
