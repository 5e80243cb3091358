"""The status page over a real proxy, read by a real headless Chromium, and its admin gate."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from proxy.policy import hash_token
from proxy.settings import parse_settings
from proxy.status import CSP, FILL_COLOUR, TRACK_COLOUR, admin_refusal
from tests.bao import Bao
from tests.conftest import WORKSPACE
from tests.png import read_png
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy

TOKEN_A = "status-a-" + secrets.token_hex(16)
TOKEN_B = "status-b-" + secrets.token_hex(16)
ADMIN_TOKEN = "admin-" + secrets.token_hex(16)
BUDGET = 50
SPENT_A, SPENT_B = 30, 5
WINDOW = (1000, 760)
FRESH_GREEN = (0x15, 0x80, 0x3D)  # the `.fresh` badge: drawn only if the style block ran


def _hex(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, sandbox: Sandbox
) -> Iterator[Proxy]:
    """A proxy with two clients on one route, after traffic: app-a spent 30 of a budget
    of 50, app-b 5, and a few requests were refused."""
    routes: list[dict[str, Any]] = [
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "workspace_id": WORKSPACE,
            "scopes": ["posts", "users"],
            "clients": [
                {"name": "app-a", "token_sha256": hash_token(TOKEN_A)},
                {"name": "app-b", "token_sha256": hash_token(TOKEN_B)},
            ],
        }
    ]
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, routes=routes)
    config["rate_limit"] = {"requests": BUDGET, "per_seconds": 600}
    config["admin"] = {"token_sha256": hash_token(ADMIN_TOKEN)}
    server = start_proxy(tmp_path_factory.mktemp("status"), config)
    with httpx.Client(base_url=server.url, trust_env=False) as client:
        for token, count in ((TOKEN_A, SPENT_A), (TOKEN_B, SPENT_B)):
            for _ in range(count):
                answer = client.get(
                    "/team/api/v1/users/me", headers={"Authorization": f"Bearer-API {token}"}
                )
                assert answer.status_code == 200
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
    of the budget, refusals by code, the config digest; never the key."""
    answer = httpx.get(f"{proxy.url}/status.json", trust_env=False)
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    assert api_key not in answer.text
    data = answer.json()
    credential = data["credentials"]["publer"]
    assert credential["state"] == "fresh"
    assert credential["key"] == "***" + api_key[-4:]
    assert credential["key_age_days"] >= 0
    assert credential["budget"]["used"] == SPENT_A + SPENT_B
    assert credential["budget"]["requests"] == BUDGET
    shares = {s["client"]: s for s in data["clients"]["shares"]}
    assert shares["app-a"]["used"] == SPENT_A
    assert shares["app-b"]["used"] == SPENT_B
    assert shares["app-a"]["fraction"] == SPENT_A / BUDGET
    assert data["clients"]["share_source"] == "credential"
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
    assert f'data-client="app-a" data-used="{SPENT_A}" data-share="{BUDGET}"' in html
    assert f'data-client="app-b" data-used="{SPENT_B}" data-share="{BUDGET}"' in html
    for code in ("client_unauthenticated", "no_route", "scope_denied"):
        assert f'data-code="{code}"' in html
    assert html.count('<rect class="fill"') == 2

    shot = tmp_path / "status.png"
    done = _chromium(tmp_path, f"{proxy.url}/status", f"--screenshot={shot}")
    assert done.returncode == 0, done.stderr[-2000:]
    image = read_png(shot.read_bytes())
    assert (image.width, image.height) == WINDOW
    colours = Counter(image.pixels)
    assert len(colours) > 20, "the screenshot is blank"
    fill, track = colours[_hex(FILL_COLOUR)], colours[_hex(TRACK_COLOUR)]
    # Two bars of 240 x 14 pixels: 30/50 and 5/50 of them filled.
    filled = round(240 * SPENT_A / BUDGET) + round(240 * SPENT_B / BUDGET)
    assert abs(fill - filled * 14) <= 2 * 14, (fill, filled * 14)
    assert abs(track - (2 * 240 - filled) * 14) <= 2 * 14, track
    assert colours[FRESH_GREEN] > 50, "the style block did not apply"


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
