"""Limits hold for clients that hard-code Publer's origin and come through the forward
proxy's tunnel: the public clients' allowed calls work, forbidden ones never reach Publer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bao import Bao
from tests.tunnel_stack import CLIENTS_DIR, PUBLER_HOST, TunnelStack, start_tunnel_stack

FB, IG = "6120c1f3a1b2c3d4e5f60001", "6120c1f3a1b2c3d4e5f60002"
SCHEDULE = f"https://{PUBLER_HOST}/api/v1/posts/schedule"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, api_key: str
) -> Iterator[TunnelStack]:
    """The forward proxy in front of app.publer.com's stand-in, its agents route limited to
    one account."""
    built = start_tunnel_stack(
        tmp_path_factory.mktemp("limits-tunnel"),
        bao,
        token_file,
        api_key,
        agent_limits={"accounts": [FB]},
    )
    yield built
    built.proxy.stop()
    built.sandbox.stop()


def run(args: list[str], env: dict[str, str]) -> str:
    """Run a client to its end; what it printed."""
    done = subprocess.run(args, env=env, capture_output=True, timeout=60, check=False)
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, output
    return output


def curl_post(stack: TunnelStack, *args: str) -> tuple[int, str]:
    """curl through the tunnel with the client token as the proxy password: status, body."""
    env = stack.env(HTTPS_PROXY=stack.forward_url_with_token(), CURL_CA_BUNDLE=str(stack.ca_file))
    output = run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args, SCHEDULE], env)
    body, _, status = output.rpartition("\n")
    return int(status), body


def body_for(account: str) -> str:
    """A documented create body for one account, scheduled with no time."""
    post = {
        "networks": {"facebook": {"type": "status", "text": "hi"}},
        "accounts": [{"id": account}],
    }
    return json.dumps({"bulk": {"state": "scheduled", "posts": [post]}})


def test_the_python_sdk_sees_only_the_allowed_account(stack: TunnelStack) -> None:
    """A stdlib SDK with the origin hard-coded lists the accounts: only the route's one."""
    env = stack.env(
        HTTPS_PROXY=stack.forward_url,
        SSL_CERT_FILE=str(stack.ca_file),
        PUBLER_API_KEY=stack.client_token,
    )
    answer = json.loads(run([sys.executable, str(CLIENTS_DIR / "publer_sdk.py")], env))
    assert answer["status"] == 200
    assert [account["id"] for account in answer["body"]] == [FB]


def test_curl_posts_for_the_allowed_account_only(stack: TunnelStack) -> None:
    """curl's JSON post for the allowed account passes; for another account, or as curl's
    default form body, it is refused and Publer's stand-in receives nothing of it."""
    stack.sandbox.clear()
    json_type = ["-H", "Content-Type: application/json"]
    status, body = curl_post(stack, *json_type, "--data-binary", body_for(IG))
    assert (status, json.loads(body)["code"]) == (403, "limit_denied")
    status, body = curl_post(stack, "--data-binary", body_for(IG))
    assert (status, json.loads(body)["code"]) == (403, "body_uninspectable")
    assert stack.sandbox.requests() == []
    status, body = curl_post(stack, *json_type, "--data-binary", body_for(FB))
    assert status == 200 and json.loads(body)["job_id"]
    [received] = stack.sandbox.requests()
    assert received["path"] == "/api/v1/posts/schedule"
