"""The status page over a real proxy, read by a real headless Chromium, and its admin gate;
across two replicas sharing Redis, and after a reload."""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.requests import Request

from proxy.config.settings import parse_settings
from proxy.rules.policy import hash_token
from proxy.status import CSP, FILL_COLOUR, OVER_COLOUR, TRACK_COLOUR, admin_refusal
from tests.bao import Bao
from tests.conftest import WORKSPACE
from tests.png import read_png
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy, start_redis
from tests.waiting import eventually

TOKEN_A = "status-a-" + secrets.token_hex(16)
TOKEN_B = "status-b-" + secrets.token_hex(16)
TOKEN_C = "status-c-" + secrets.token_hex(16)
ADMIN_TOKEN = "admin-" + secrets.token_hex(16)
BUDGET = 50
# Weights 3:1:1 of 50 make shares of 30, 10 and 10; app-b is capped at 6 a window.
WEIGHTS = {"app-a": 3, "app-b": 1, "app-c": 1}
SHARES = {"app-a": 30, "app-b": 10, "app-c": 10}
CAP_B = 6
# app-a uses 0.8 of its share, app-b 0.4 (2 short of its cap), app-c 1.2: it borrowed 2.
SPENT = {"app-a": 24, "app-b": 4, "app-c": 12}
TOKENS = {"app-a": TOKEN_A, "app-b": TOKEN_B, "app-c": TOKEN_C}
WINDOW = (1200, 800)
FRESH_GREEN = (0x15, 0x80, 0x3D)  # the `.fresh` badge: drawn only if the style block ran


def _hex(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _routes(weights: dict[str, int]) -> list[dict[str, Any]]:
    clients: list[dict[str, Any]] = [
        {"name": name, "token_sha256": hash_token(TOKENS[name]), "weight": weight}
        for name, weight in weights.items()
    ]
    clients[1]["max_requests"] = CAP_B
    return [
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "workspace_id": WORKSPACE,
            "scopes": ["posts", "users"],
            "clients": clients,
        }
    ]


def _config(bao: Bao, sandbox: Sandbox, token_file: Path, **rate: Any) -> dict[str, Any]:
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, routes=_routes(WEIGHTS))
    config["rate_limit"] = {"requests": BUDGET, "per_seconds": 600, **rate}
    config["admin"] = {"token_sha256": hash_token(ADMIN_TOKEN)}
    return config


def _spend(proxy: Proxy) -> None:
    with httpx.Client(base_url=proxy.url, trust_env=False) as client:
        for name, count in SPENT.items():
            for _ in range(count):
                answer = client.get(
                    "/team/api/v1/users/me", headers={"Authorization": f"Bearer-API {TOKENS[name]}"}
                )
                assert answer.status_code == 200, (name, answer.text)


def _shares(proxy: Proxy) -> dict[str, dict[str, Any]]:
    answer = httpx.get(f"{proxy.url}/status.json", trust_env=False)
    assert answer.status_code == 200, answer.text
    return {s["client"]: s for s in answer.json()["clients"]["shares"]}


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, sandbox: Sandbox
) -> Iterator[Proxy]:
    """A proxy with three clients on one route, after traffic: app-a spent 24 of its share
    of 30, app-b 4 of 10 (capped at 6), app-c 12 of 10; and a few requests were refused."""
    server = start_proxy(tmp_path_factory.mktemp("status"), _config(bao, sandbox, token_file))
    _spend(server)
    with httpx.Client(base_url=server.url, trust_env=False) as client:
        refused = [
            client.get("/team/api/v1/posts", headers={"Authorization": "Bearer wrong"}),
            client.get("/team/api/v1/posts"),
            client.get("/nowhere/api/v1/posts"),
            client.get(
                "/team/api/v1/analytics/charts", headers={"Authorization": f"Bearer {TOKEN_B}"}
            ),
        ]
        assert [r.status_code for r in refused] == [401, 401, 404, 403]
    yield server
    server.stop()


def test_status_json_shows_health_shares_and_refusals(proxy: Proxy, api_key: str) -> None:
    """The JSON: the credential's health and masked key with its age, each client's use
    of its own share with its cap and nearest limit, refusals by code, the config digest;
    never the key."""
    answer = httpx.get(f"{proxy.url}/status.json", trust_env=False)
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    assert api_key not in answer.text
    data = answer.json()
    credential = data["credentials"]["publer"]
    assert credential["state"] == "fresh"
    assert credential["key"] == "***" + api_key[-4:]
    assert credential["key_age_days"] >= 0
    assert credential["budget"]["used"] == sum(SPENT.values())
    assert credential["budget"]["requests"] == BUDGET
    shares = {s["client"]: s for s in data["clients"]["shares"]}
    assert {name: (s["used"], s["share"]) for name, s in shares.items()} == {
        name: (SPENT[name], SHARES[name]) for name in SPENT
    }
    assert {name: s["fraction"] for name, s in shares.items()} == {
        "app-a": 0.8,
        "app-b": 0.4,
        "app-c": 1.2,
    }
    assert [shares[n]["cap"] for n in SPENT] == [None, CAP_B, None]
    assert {name: (s["nearest_limit"], s["left"]) for name, s in shares.items()} == {
        "app-a": ("client_share", 6),
        "app-b": ("client_cap", 2),
        "app-c": ("client_share", -2),
    }
    assert data["refusals"]["by_code"] == {
        "client_unauthenticated": 2,
        "no_route": 1,
        "scope_denied": 1,
    }
    assert Counter(r["code"] for r in data["refusals"]["recent"])["client_unauthenticated"] == 2
    assert data["config"]["sha256"] == httpx.get(f"{proxy.url}/readyz").json()["config"]["sha256"]


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary is not None, "chromium is not installed (make test installs it)"
    profile = tmp_path / "profile"
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
        *extra,
        url,
    ]
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_chromium_renders_the_page_under_its_csp(proxy: Proxy, tmp_path: Path) -> None:
    """Headless Chromium loads /status under the strict CSP: the DOM holds a row per
    credential and client and the refusal codes; the screenshot is a non-blank image of
    the window's size with the bar colours and the style block's badge colour in it."""
    page = httpx.get(f"{proxy.url}/status", trust_env=False)
    assert page.headers["content-security-policy"] == CSP
    assert "<script" not in page.text
    assert "src=" not in page.text and "href=" not in page.text and "url(" not in page.text

    dom = _chromium(tmp_path, f"{proxy.url}/status", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-credential="publer" data-state="fresh"' in html
    for name in SPENT:
        assert f'data-client="{name}" data-used="{SPENT[name]}" data-share="{SHARES[name]}"' in html
    assert 'data-client="app-b" data-used="4" data-share="10" data-nearest="client_cap"' in html
    for code in ("client_unauthenticated", "no_route", "scope_denied"):
        assert f'data-code="{code}"' in html
    assert html.count('<rect class="fill"') == len(SPENT)

    shot = tmp_path / "status.png"
    done = _chromium(tmp_path, f"{proxy.url}/status", f"--screenshot={shot}")
    assert done.returncode == 0, done.stderr[-2000:]
    image = read_png(shot.read_bytes())
    assert (image.width, image.height) == WINDOW
    colours = Counter(image.pixels)
    assert len(colours) > 20, "the screenshot is blank"
    fill, over = colours[_hex(FILL_COLOUR)], colours[_hex(OVER_COLOUR)]
    track = colours[_hex(TRACK_COLOUR)]
    # Bars of 240 x 14 pixels: app-a 0.8 and app-b 0.4 of their shares filled in blue,
    # app-c past its share: the whole bar amber.
    filled = round(240 * 0.8) + round(240 * 0.4)
    assert abs(fill - filled * 14) <= 2 * 14, (fill, filled * 14)
    assert abs(over - 240 * 14) <= 2 * 14, (over, 240 * 14)
    assert abs(track - (2 * 240 - filled) * 14) <= 2 * 14, (track, (2 * 240 - filled) * 14)
    assert colours[FRESH_GREEN] > 50, "the style block did not apply"


def _reload(proxy: Proxy, config: dict[str, Any]) -> None:
    before = httpx.get(f"{proxy.url}/readyz", trust_env=False).json()["config"]
    proxy.config_path.write_text(yaml.safe_dump(config))
    proxy.process.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        now = httpx.get(f"{proxy.url}/readyz", trust_env=False).json()["config"]
        return bool(now["generation"] > before["generation"])

    eventually(reloaded, timeout=60, step=0.05)


def test_replicas_show_the_shared_window_and_a_reload_the_new_shares(
    tmp_path: Path, bao: Bao, token_file: Path, sandbox: Sandbox
) -> None:
    """Two replicas sharing one redis-server: what clients spent through one shows on the
    other's page; after a SIGHUP that changes the weights, and one that changes the limit
    (a new budget), /status and /status.json show the new shares of the same window."""
    redis = start_redis(tmp_path / "redis")
    first = second = None
    try:
        first = start_proxy(tmp_path / "a", _config(bao, sandbox, token_file, redis_url=redis.url))
        second = start_proxy(tmp_path / "b", _config(bao, sandbox, token_file, redis_url=redis.url))
        _spend(first)
        seen = _shares(second)
        assert {n: (s["used"], s["share"]) for n, s in seen.items()} == {
            n: (SPENT[n], SHARES[n]) for n in SPENT
        }

        config = yaml.safe_load(second.config_path.read_text())
        config["routes"] = _routes({"app-a": 2, "app-b": 1, "app-c": 2})
        _reload(second, config)
        seen = _shares(second)
        assert {n: (s["used"], s["share"]) for n, s in seen.items()} == {
            "app-a": (24, 20),
            "app-b": (4, 10),
            "app-c": (12, 20),
        }
        assert seen["app-a"]["nearest_limit"] == "client_share" and seen["app-a"]["left"] == -4
        page = httpx.get(f"{second.url}/status", trust_env=False)
        assert page.status_code == 200
        assert 'data-client="app-c" data-used="12" data-share="20"' in page.text

        config["rate_limit"]["requests"] = 2 * BUDGET  # a new budget, the same window
        _reload(second, config)
        seen = _shares(second)
        assert {n: (s["used"], s["share"]) for n, s in seen.items()} == {
            "app-a": (24, 40),
            "app-b": (4, 20),
            "app-c": (12, 40),
        }
        page = httpx.get(f"{second.url}/status", trust_env=False)
        assert 'data-client="app-c" data-used="12" data-share="40"' in page.text
    finally:
        for server in (first, second, redis):
            if server is not None:
                server.stop()


def _request(host: str | None, authorization: str | None = None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/status",
            "headers": headers,
            "client": (host, 50000) if host is not None else None,
        }
    )


@pytest.mark.parametrize(
    ("host", "authorization", "admitted"),
    [
        ("127.0.0.1", None, True),
        ("::1", None, True),
        (None, None, True),  # the unix socket
        ("192.0.2.7", None, False),
        ("192.0.2.7", f"Bearer {ADMIN_TOKEN}", True),
        ("192.0.2.7", f"Bearer-API {ADMIN_TOKEN}", True),
        ("192.0.2.7", f"Bearer {ADMIN_TOKEN}x", False),
        ("192.0.2.7", f"Bearer {TOKEN_A}", False),
        ("10.0.0.1", "Basic YWRtaW46YWRtaW4=", False),
        ("127.0.0.2.example.com", None, False),
    ],
)
def test_admin_gate(host: str | None, authorization: str | None, admitted: bool) -> None:
    """Loopback and the unix socket are admitted; any other client needs the admin token."""
    settings = parse_settings(
        {
            "credentials": {"publer": {"path": "publer/api"}},
            "routes": [{"name": "d", "credential": "publer", "scopes": ["posts"]}],
            "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
        }
    )
    refusal = admin_refusal(_request(host, authorization), settings)
    assert (refusal is None) == admitted
    if refusal is not None:
        assert refusal.code == "client_unauthenticated"
        assert "admin" in refusal.message
