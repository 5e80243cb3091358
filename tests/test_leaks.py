"""No secret ever reaches any output: run everything at debug level and search."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.rules.policy import hash_token
from tests.bao import Bao, free_port, start_bao
from tests.moto import REGION, start_moto
from tests.origins import Origin, Request, Reset, Step, Write
from tests.peers import ECHO_MODES, echo_origin, recording_listener
from tests.servers import Proxy, proxy_config, start_proxy, start_sandbox
from tests.test_devstack import descendants
from tests.waiting import eventually

POLICY = 'path "secret/data/publer/api" { capabilities = ["read"] }'
SOURCES = ("file", "env", "aws")


@pytest.mark.parametrize("proxy_variables", [False, True], ids=["plain", "proxy-variables"])
def test_no_secret_in_any_output_at_debug_level(tmp_path: Path, proxy_variables: bool) -> None:
    """Traffic, refusals, an upstream 401 with a re-read, Vault sealed and killed, token
    renewal and AppRole login, all at debug level: no API key, Vault token, client token
    or secret id appears in stdout, stderr, a log line, the audit log (a file and
    stdout), an error body or check's output; the masked key does appear. A second run
    exports HTTP_PROXY, HTTPS_PROXY and ALL_PROXY (both spellings) naming a recording
    listener: it receives nothing."""
    with recording_listener() as listener:
        _run_everything(tmp_path, listener.environment() if proxy_variables else {})
        assert listener.received() == b""
        assert listener.connections == 0


def _count(proxy: Proxy, event: str) -> int:
    """How many times the proxy logged `event`."""
    return sum(1 for e in proxy.events() if e.get("event") == event)


def _logged(proxy: Proxy, *events: str) -> bool:
    """Whether the proxy logged each of `events` at least once."""
    return all(_count(proxy, event) for event in events)


def _run_everything(tmp_path: Path, env: dict[str, str]) -> None:
    api_key = "pk_leak_" + secrets.token_hex(20)
    rotated_key = "pk_leak_rotated_" + secrets.token_hex(20)
    live_key = "pk_leak_live_" + secrets.token_hex(20)
    client_token = "client-" + secrets.token_hex(16)
    vault = start_bao(tmp_path / "bao")
    sandbox = start_sandbox(tmp_path / "sandbox", api_key)
    root = vault.client()
    vault.write_key("publer/api", api_key)
    root.sys.create_or_update_policy("proxy", POLICY)
    root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle(
        "proxy", token_policies=["proxy"], token_ttl="3s", token_max_ttl="6s"
    )
    role_id = root.auth.approle.read_role_id("proxy")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("proxy")["data"]["secret_id"]
    (tmp_path / "secret-id").write_text(secret_id)
    known = {
        "api key": api_key,
        "rotated key": rotated_key,
        "live key": live_key,
        "client token": client_token,
        "secret id": secret_id,
        "root token": vault.root_token,
    }

    routes: list[dict[str, Any]] = [
        {
            "name": "default",
            "credential": "publer",
            "workspace_id": "5f8d7a62c9e77e001f36e3a1",
            "scopes": ["posts", "users"],
        },
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "workspace_id": "5f8d7a62c9e77e001f36e3a1",
            "scopes": ["posts"],
            "clients": [{"name": "app", "token_sha256": hash_token(client_token)}],
        },
    ]
    approle = proxy_config(
        vault.url,
        sandbox.url,
        routes=routes,
        credential={"refresh_seconds": 1, "max_stale_seconds": 2},
    )
    approle["vault"]["auth"] = {
        "method": "approle",
        "role_id": role_id,
        "secret_id_file": str(tmp_path / "secret-id"),
    }
    by_token = proxy_config(
        vault.url,
        sandbox.url,
        token_file=tmp_path / "token",
        routes=routes,
        credential={"refresh_seconds": 1},
    )
    approle["audit"] = {"sink": str(tmp_path / "audit-approle.jsonl")}
    by_token["audit"] = {"sink": "stdout"}
    outputs: dict[str, str] = {}
    bodies: list[str] = []
    proxies: list[Proxy] = []
    try:
        proxies.append(start_proxy(tmp_path / "approle", approle, env=env))
        # Made just before its proxy starts, which takes seconds on a loaded machine.
        child = root.auth.token.create(policies=["proxy"], ttl="12s", renewable=True)
        known["child token"] = child["auth"]["client_token"]
        (tmp_path / "token").write_text(known["child token"])
        proxies.append(start_proxy(tmp_path / "token-auth", by_token, env=env))
        for proxy in proxies:
            for path, headers in [
                ("/api/v1/posts", {"Authorization": f"Bearer-API {client_token}"}),
                ("/team/api/v1/posts", {"Authorization": f"Bearer-API {client_token}"}),
                ("/team/api/v1/posts", {"Authorization": f"Bearer {client_token}x"}),
                ("/api/v1/analytics/charts", {}),
                ("/api/v1/%2e%2e/admin", {}),
                ("/api/v1/nope", {"Authorization": f"Bearer-API {api_key}"}),
                ("/elsewhere", {}),
                ("/readyz", {}),
                ("/metrics", {}),
                ("/status", {}),
                ("/status.json", {}),
            ]:
                answer = httpx.get(f"{proxy.url}{path}", headers=headers)
                bodies.append(answer.text + str(answer.headers))
        # Publer starts rejecting the key: 401, one re-read, the new key.
        sandbox.set_keys({"key": rotated_key})
        vault.write_key("publer/api", rotated_key)
        for proxy in proxies:
            answer = httpx.post(f"{proxy.url}/api/v1/posts", json={"text": api_key})
            bodies.append(answer.text + str(answer.headers))
            # Mutating calls are audited: a key in the path must not reach the audit sink.
            answer = httpx.delete(f"{proxy.url}/api/v1/posts/{api_key}")
            bodies.append(answer.text + str(answer.headers))
            answer = httpx.put(
                f"{proxy.url}/team/api/v1/posts/p1",
                headers={"Authorization": f"Bearer-API {client_token}"},
                json={"text": "hello"},
            )
            bodies.append(answer.text + str(answer.headers))
        # The live API's way of rejecting a key: 403 "Invalid API key or not active for
        # this account.", read with its message, then the re-read and the next key.
        sandbox.set_auth_errors("live")
        sandbox.set_keys({"key": live_key})
        vault.write_key("publer/api", live_key)
        for proxy in proxies:
            answer = httpx.post(f"{proxy.url}/api/v1/posts", json={"text": rotated_key})
            bodies.append(answer.text + str(answer.headers))
        # And check --online asking Publer about a key it rejects, the live way.
        sandbox.set_keys({"key": api_key})
        config_path = str(proxies[0].config_path)
        check = subprocess.run(
            [sys.executable, "-m", "proxy", "check", "--online", "--config", config_path],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **env},
        )
        outputs["check --online, key rejected"] = check.stdout + check.stderr
        assert "Publer rejects the key" in check.stdout
        sandbox.set_keys({"key": live_key})
        for proxy in proxies:  # a reload reads the config and stages the credentials again
            proxy.process.send_signal(signal.SIGHUP)
        eventually(lambda: all("config_reloaded" in proxy.output() for proxy in proxies))
        # Token renewals and AppRole re-logins happen (their log lines are checked too).
        eventually(
            lambda: (
                _logged(proxies[0], "vault_token_renewed", "vault_token_relogin")
                and _logged(proxies[1], "vault_token_renewed")
            ),
            timeout=60,
        )
        failed_before = [_count(proxy, "key_read_failed") for proxy in proxies]
        vault.seal()
        # Each proxy reads from the sealed Vault and logs why it failed.
        eventually(
            lambda: all(
                _count(proxy, "key_read_failed") > before
                for proxy, before in zip(proxies, failed_before, strict=True)
            ),
            timeout=60,
        )
        vault.stop()
        # The AppRole proxy's key expires (max_stale_seconds 2): 503s with reasons.
        eventually(lambda: httpx.get(f"{proxies[0].url}/api/v1/posts").status_code == 503)
        for proxy in proxies:
            for path in ("/api/v1/posts", "/readyz"):
                answer = httpx.get(f"{proxy.url}{path}")
                bodies.append(answer.text + str(answer.headers))
        check = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "check",
                "--online",
                "--config",
                str(proxies[0].config_path),
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **env},
        )
        outputs["check --online"] = check.stdout + check.stderr
    finally:
        exits = [proxy.stop() for proxy in proxies]
        sandbox.stop()
        vault.stop()
    assert exits == [0] * len(proxies)
    for number, proxy in enumerate(proxies):
        outputs[f"proxy {number}"] = proxy.output()
    outputs["answers"] = "\n".join(bodies)
    outputs["audit file"] = (tmp_path / "audit-approle.jsonl").read_text()
    for where, text in outputs.items():
        for what, value in known.items():
            assert value not in text, f"the {what} appears in {where}"
    everything = "\n".join(outputs.values())
    assert "***" + api_key[-4:] in everything
    assert "***" + rotated_key[-4:] in everything
    assert '"level":"debug"' in outputs["proxy 0"]
    assert "credential_unavailable" in outputs["answers"]
    for audited in (outputs["audit file"], outputs["proxy 1"]):
        assert audited.count('"event":"audit"') >= 3
        assert '"/api/v1/posts/***' + api_key[-4:] in audited


def test_no_secret_in_any_output_for_file_env_and_aws_sources(tmp_path: Path) -> None:
    """A proxy per non-Vault source (a key file, a .env file, AWS Secrets Manager on
    moto), at debug level: traffic, refusals, rotation with Publer revoking the old key
    (401 and re-read), the file removed and AWS down until 503, and `check --online` for
    each: no API key, AWS secret access key or client token appears anywhere."""
    keys = {f"{source} key": f"pk_leak_{source}_" + secrets.token_hex(20) for source in SOURCES}
    rotated = {
        f"rotated {source} key": "pk_leak_new_" + secrets.token_hex(20) for source in SOURCES
    }
    aws_secret = "aws/" + secrets.token_hex(20)
    client_token = "client-" + secrets.token_hex(16)
    known = {**keys, **rotated, "aws secret access key": aws_secret, "client token": client_token}
    sandbox = start_sandbox(tmp_path / "sandbox", *keys.values())
    moto = start_moto(tmp_path / "moto")
    moto.create_secret("publer/api", keys["aws key"])
    key_file = tmp_path / "api_key"
    key_file.write_text(keys["file key"] + "\n")
    key_file.chmod(0o600)
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"PUBLER_API_KEY={keys['env key']}\n")
    stale = {"refresh_seconds": 1, "max_stale_seconds": 2}
    credentials: dict[str, dict[str, Any]] = {
        "file": {"source": "file", "path": str(key_file), **stale},
        "env": {"source": "env", "env_file": str(dotenv)},
        "aws": {
            "source": "aws_secrets_manager",
            "secret_id": "publer/api",
            "region": REGION,
            "endpoint_url": moto.url,
            **stale,
        },
    }
    routes: list[dict[str, Any]] = [
        {"name": "default", "credential": "publer", "scopes": ["posts", "users"]},
        {
            "name": "team",
            "prefix": "/team",
            "credential": "publer",
            "scopes": ["posts"],
            "clients": [{"name": "app", "token_sha256": hash_token(client_token)}],
        },
    ]
    aws_env = {"AWS_ACCESS_KEY_ID": "AKIALEAKTEST00000000", "AWS_SECRET_ACCESS_KEY": aws_secret}
    proxies = {}
    for source in SOURCES:
        config = proxy_config("http://127.0.0.1:9", sandbox.url, routes=routes)
        config["credentials"]["publer"] = credentials[source]
        proxies[source] = start_proxy(tmp_path / source, config, env=aws_env)
    outputs: dict[str, str] = {}
    bodies: list[str] = []
    try:
        for proxy in proxies.values():
            for path, headers in [
                ("/api/v1/posts", {"Authorization": f"Bearer-API {client_token}"}),
                ("/team/api/v1/posts", {"Authorization": f"Bearer-API {client_token}"}),
                ("/team/api/v1/posts", {"Authorization": f"Bearer {client_token}x"}),
                ("/api/v1/analytics/charts", {}),
                ("/api/v1/nope", {"Authorization": f"Bearer-API {keys['file key']}"}),
                ("/readyz", {}),
                ("/metrics", {}),
            ]:
                answer = httpx.get(f"{proxy.url}{path}", headers=headers)
                bodies.append(answer.text + str(answer.headers))
        # Rotation: the file is rewritten and AWS gets a new version; Publer drops the old keys.
        sandbox.set_keys(*({"key": key} for key in [*keys.values(), *rotated.values()]))
        key_file.write_text(rotated["rotated file key"])
        moto.rotate("publer/api", rotated["rotated aws key"])
        sandbox.set_keys(*({"key": key} for key in rotated.values()), {"key": keys["env key"]})
        for proxy in proxies.values():
            answer = httpx.post(f"{proxy.url}/api/v1/posts", json={"text": keys["aws key"]})
            bodies.append(answer.text + str(answer.headers))
        key_file.unlink()
        moto.stop()
        for source in ("file", "aws"):
            url = proxies[source].url
            eventually(lambda url=url: httpx.get(f"{url}/api/v1/posts").status_code == 503)  # type: ignore[misc]
        for proxy in proxies.values():
            for path in ("/api/v1/posts", "/readyz"):
                answer = httpx.get(f"{proxy.url}{path}")
                bodies.append(answer.text + str(answer.headers))
            config_path = str(proxy.config_path)
            check = subprocess.run(
                [sys.executable, "-m", "proxy", "check", "--online", "--config", config_path],
                capture_output=True,
                text=True,
                env={**os.environ, **aws_env, "HOME": str(tmp_path)},
                check=False,
            )
            outputs[f"check --online {proxy.config_path.name}"] = check.stdout + check.stderr
    finally:
        for source, proxy in proxies.items():
            assert proxy.stop() == 0
            outputs[f"proxy {source}"] = proxy.output()
        sandbox.stop()
        moto.stop()
    outputs["answers"] = "\n".join(bodies)
    for where, text in outputs.items():
        for what, value in known.items():
            assert value not in text, f"the {what} appears in {where}"
    everything = "\n".join(outputs.values())
    for value in [*keys.values(), rotated["rotated file key"], rotated["rotated aws key"]]:
        assert "***" + value[-4:] in everything
    for source in SOURCES:  # at debug level, every source's reads are there to read
        assert re.search(r'"event":"key_read"[^\n]*"level":"debug"', outputs[f"proxy {source}"])
    assert "credential_unavailable" in outputs["answers"]


def _ask_every_echo(base: str) -> list[httpx.Response]:
    """Every echo mode of the origin, through the proxy, as GET and as a small POST."""
    answers = []
    with httpx.Client(trust_env=False, timeout=20) as client:
        for mode in ECHO_MODES:
            answers.append(client.get(f"{base}/api/v1/users/me?echo={mode}"))
            answers.append(client.post(f"{base}/api/v1/posts?echo={mode}", json={"text": mode}))
    return answers


def _check_answers(answers: list[httpx.Response], known: dict[str, str]) -> str:
    """Assert no answer header or body holds a secret and none imitates the proxy's
    markers; returns the answers as text, for the search of every output."""
    texts = []
    for answer in answers:
        assert answer.status_code in (200, 401), answer.text
        raw = b"\n".join(name + b": " + value for name, value in answer.headers.raw)
        text = (raw + b"\n" + answer.content).decode("latin-1")
        for what, value in known.items():
            assert value not in text, f"the {what} is in an answer to {answer.request.url}"
        mode = answer.request.url.params["echo"]
        assert "x-publer-proxy-error" not in answer.headers
        assert "x-publer-proxy-anything" not in answer.headers
        if mode == "www-authenticate":
            assert answer.headers["www-authenticate"].startswith("Bearer-API ***")
            assert not answer.headers["x-publer-proxy-hint"].startswith("forged")
        else:
            assert "x-publer-proxy-hint" not in answer.headers
            echoed = {name.lower(): value for name, value in answer.json().items()}
            assert echoed["authorization"].startswith("Bearer-API ***")
        assert answer.headers["x-echo-authorization"].startswith("Bearer-API ***")
        texts.append(text)
    return "\n".join(texts)


def _ready(base: str, process: subprocess.Popen[bytes], log_path: Path) -> bool:
    """True once /readyz answers 200; fails at once if the process died."""
    assert process.poll() is None, log_path.read_text(errors="replace")
    try:
        return httpx.get(f"{base}/readyz", trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _bao_root_token(dev_pid: int) -> str:
    """The root token the dev stack gave its OpenBao child (in that child's environment)."""
    for pid in descendants(dev_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"BAO_DEV_ROOT_TOKEN_ID="):
                return entry.split(b"=", 1)[1].decode()
    raise AssertionError("no OpenBao child with a root token in its environment")


def test_echoing_origin_and_proxy_variables_get_no_secret(tmp_path: Path) -> None:
    """With proxy variables naming a recording listener, `serve`, `dev` (with
    PUBLER_API_KEY) and `check --online` in front of an origin that echoes the key (in a
    401's WWW-Authenticate, in headers, in JSON, gzip and chunked bodies) and imitates the
    proxy's marker headers: the listener receives nothing, no answer header or body holds
    a secret, forged markers are dropped, and no output holds a secret."""
    api_key = "pk_echo_" + secrets.token_hex(20)
    dev_key = "pk_dev_" + secrets.token_hex(20)
    vault = start_bao(tmp_path / "bao")
    vault.write_key("publer/api", api_key)
    (tmp_path / "token").write_text(vault.root_token)
    known = {"api key": api_key, "dev key": dev_key, "root token": vault.root_token}
    outputs: dict[str, str] = {}
    with recording_listener() as listener, echo_origin() as origin:
        env = listener.environment()
        config = proxy_config(vault.url, origin.url, token_file=tmp_path / "token")
        proxy = start_proxy(tmp_path / "serve", config, env=env)
        try:
            outputs["serve answers"] = _check_answers(_ask_every_echo(proxy.url), known)
            command = [sys.executable, "-m", "proxy", "check", "--online"]
            check = subprocess.run(
                [*command, "--config", str(proxy.config_path)],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, **env},
            )
            outputs["check --online"] = check.stdout + check.stderr
            assert check.returncode == 0, outputs["check --online"]
            assert "Publer accepts the key" in check.stdout
        finally:
            assert proxy.stop() == 0
            outputs["serve"] = proxy.output()
            vault.stop()

        port = free_port()
        dev_env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
        dev_env.update(env, PUBLER_API_KEY=dev_key, PUBLER_WORKSPACE_ID="5f8d7a62c9e77e001f36e3a1")
        log_path = tmp_path / "dev.log"
        with log_path.open("wb") as log:
            command = [sys.executable, "-m", "proxy", "dev", "--port", str(port)]
            dev = subprocess.Popen(
                [*command, "--upstream", origin.url],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dev_env,
            )
        try:
            base = f"http://127.0.0.1:{port}"
            eventually(lambda: _ready(base, dev, log_path), timeout=60)
            known["dev root token"] = _bao_root_token(dev.pid)
            outputs["dev answers"] = _check_answers(_ask_every_echo(base), known)
        finally:
            dev.terminate()
            assert dev.wait(30) == 0
            outputs["dev"] = log_path.read_text(errors="replace")
        assert listener.received() == b""
        assert listener.connections == 0
    assert f"Bearer-API {api_key}" in origin.seen  # the origin really got (and echoed) keys
    assert f"Bearer-API {dev_key}" in origin.seen
    for where, text in outputs.items():
        for what, value in known.items():
            assert value not in text, f"the {what} appears in {where}"


def test_no_secret_in_the_dev_stack_output(tmp_path: Path) -> None:
    """`publer-proxy dev` with a key of one's own (PUBLER_API_KEY, to a sandbox that takes
    it): while clients call both routes, nothing it prints holds the key, the OpenBao root
    token or the client token, only the files that hold them and the masked key."""
    api_key = "pk_leak_" + secrets.token_hex(20)
    sandbox = start_sandbox(tmp_path / "sandbox", api_key)
    port = free_port()
    log_path = tmp_path / "dev.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["PUBLER_API_KEY"] = api_key
    args = [sys.executable, "-m", "proxy", "dev", "--port", str(port), "--upstream", sandbox.url]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: "Ctrl-C stops" in log_path.read_text(), timeout=60)
        files = dict(re.findall(r"(\w+)=\$\(cat (\S+)\)", log_path.read_text()))
        client_token = Path(files["CLIENT_TOKEN"]).read_text()
        root_token = Path(files["VAULT_TOKEN"]).read_text()
        bodies, statuses = [], []
        for path, token in [
            ("/api/v1/users/me", None),
            ("/posting/api/v1/posts", client_token),
            ("/posting/api/v1/posts", client_token + "x"),
            ("/posting/api/v1/analytics/charts", client_token),
        ]:
            headers = {"Authorization": f"Bearer-API {token}"} if token else {}
            response = httpx.get(f"{url}{path}", headers=headers, trust_env=False)
            bodies.append(response.text + str(response.headers))
            statuses.append(response.status_code)
        assert statuses == [200, 200, 401, 403], bodies
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        sandbox.stop()
    printed = log_path.read_text() + "\n".join(bodies)
    for what, value in [("key", api_key), ("root token", root_token), ("client", client_token)]:
        assert value not in printed, f"the {what} appears in what dev printed or sent"
    assert "***" + api_key[-4:] in printed


def test_no_secret_through_the_forward_proxy(
    tmp_path: Path, bao: Bao, token_file: Path, api_key: str
) -> None:
    """Tunnels with the token as proxy password and as "API key", refusals of both, at debug
    level: neither the key nor the client token is printed or answered, and no private key
    (the CA's or a leaf's) is written to any file."""
    from tests.tunnel_stack import PUBLER_HOST, start_tunnel_stack

    stack = start_tunnel_stack(tmp_path, bao, token_file, api_key)
    me = f"https://{PUBLER_HOST}/api/v1/users/me"
    answers: list[str] = []
    try:
        for proxy_url, authorization in (
            (stack.forward_url_with_token(), "Bearer-API whatever"),
            (stack.forward_url, f"Bearer-API {stack.client_token}"),
            (stack.forward_url, f"Bearer-API {stack.client_token}x"),
            (f"http://agent:{stack.client_token}x@127.0.0.1:{stack.forward_port}", ""),
        ):
            done = subprocess.run(
                ["curl", "-sS", "-i", "-H", f"Authorization: {authorization}", me],
                env=stack.env(HTTPS_PROXY=proxy_url, CURL_CA_BUNDLE=str(stack.ca_file)),
                capture_output=True,
                timeout=30,
                check=False,
            )
            answers.append((done.stdout + done.stderr).decode("utf-8", "replace"))
    finally:
        stack.proxy.stop()
        stack.sandbox.stop()
    assert " 200 " in answers[0] and " 200 " in answers[1]
    output = stack.proxy.output()
    for text in [output, *answers]:
        assert api_key not in text
    assert stack.client_token not in output
    assert "***" + api_key[-4:] in output
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".pem", ".yaml", ".log", ".key", ""):
            content = path.read_bytes()
            if path.name != "publer-key.pem":  # the stand-in's own certificate key
                assert b"PRIVATE KEY" not in content, path


def _echo_key(request: Request) -> list[Step]:
    """An origin that puts the Authorization it got into responses HTTP does not allow."""
    key = request.headers.get("authorization", "").encode()
    case = request.query.get("case")
    if case == "status":
        return [Write(b"HTTP/1.1 600 " + key + b"\r\nContent-Length: 0\r\n\r\n")]
    if case == "status-line":
        return [Write(b"XTTP/1.1 200 " + key + b"\r\n\r\n")]
    if case == "control":
        return [Write(b"HTTP/1.1 200 OK\r\nX-Echo: " + key + b"\x01\r\nContent-Length: 0\r\n\r\n")]
    if case == "switch":
        return [Write(b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nX-Echo: " + key + b"\r\n\r\n")]
    if case == "field":
        return [Write(b"HTTP/1.1 200 OK\r\nX-Echo: " + key * 400 + b"\r\n\r\n")]
    return [Write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + key[:20]), Reset()]


def test_no_key_in_any_output_when_the_origin_echoes_it_in_broken_responses(
    tmp_path: Path,
) -> None:
    """An origin that echoes the key inside responses the hop refuses (a status of 600, a
    garbage status line, control bytes, a 101, a header field over the limit, a body cut
    by a reset), at debug level: the key is in no log line and in no response."""
    api_key = "pk_leak_" + secrets.token_hex(20)
    vault = start_bao(tmp_path / "bao")
    vault.write_key("publer/api", api_key)
    (tmp_path / "token").write_text(vault.root_token)
    with Origin(_echo_key) as origin:
        config = proxy_config(origin.url, origin.url, token_file=tmp_path / "token")
        config["vault"]["url"] = vault.url
        config["upstream"] = {"url": origin.url, "retries": 1}
        proxy = start_proxy(tmp_path / "proxy", config)
        bodies = []
        try:
            for case in ("status", "status-line", "control", "switch", "field", "cut"):
                try:
                    answer = httpx.get(f"{proxy.url}/api/v1/posts?case={case}", timeout=10)
                    bodies.append(answer.text + str(answer.headers))
                except httpx.HTTPError as exc:
                    bodies.append(repr(exc))
        finally:
            proxy.stop()
            vault.stop()
    assert len(origin.requests) >= 6  # every case reached the origin with the key
    output = proxy.output()
    assert '"level":"debug"' in output
    assert "upstream_unreachable" in "\n".join(bodies)
    for where, text in (("the proxy's output", output), ("a response", "\n".join(bodies))):
        assert api_key not in text, f"the key appears in {where}"
