"""Keys in AWS Secrets Manager, against moto's standalone server as a process."""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.config.settings import AwsCredentialSettings
from proxy.keys.sources import sdk_problems
from proxy.keys.sources.aws import AwsKeySource
from proxy.keys.sources.base import SourceError
from proxy.masking.secrets import SecretRegistry
from tests.moto import REGION, Moto, restart_moto, start_moto
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy
from tests.waiting import eventually

ANY_AWS_IDENTITY = {"AWS_ACCESS_KEY_ID": "AKIATESTEXAMPLE00000", "AWS_SECRET_ACCESS_KEY": "x" * 40}


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """One moto server for the tests that do not break it."""
    server = start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


def aws_credential(moto: Moto, secret_id: str, **extra: Any) -> dict[str, Any]:
    """The config of a credential in moto's Secrets Manager, refreshed every second."""
    return {
        "source": "aws_secrets_manager",
        "secret_id": secret_id,
        "region": REGION,
        "endpoint_url": moto.url,
        "refresh_seconds": 1,
        **extra,
    }


def aws_proxy(
    workdir: Path,
    moto: Moto,
    sandbox: Sandbox,
    secret_id: str,
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    **extra: Any,
) -> Proxy:
    """A proxy whose one credential is `secret_id` in moto (its Vault settings unused)."""
    config = proxy_config("http://127.0.0.1:9", sandbox.url)
    config["credentials"]["publer"] = aws_credential(moto, secret_id, **extra)
    return start_proxy(workdir, config, env=env or ANY_AWS_IDENTITY, wait_ready=wait_ready)


def _seen_keys(sandbox: Sandbox) -> list[str]:
    return [
        value.removeprefix("Bearer-API ")
        for record in sandbox.requests()
        for name, value in record["headers"]
        if name == "authorization"
    ]


def _readyz(proxy: Proxy) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{proxy.url}/readyz").json()["credentials"]["publer"]
    return body


class Trap:
    """A TCP listener that counts the connections made to it (an environment proxy)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_reads_awscurrent_and_ignores_environment_proxies(
    tmp_path: Path, moto: Moto, sandbox: Sandbox, api_key: str
) -> None:
    """The key of AWSCURRENT is injected, /readyz and the metrics name the source and the
    VersionId, and HTTPS_PROXY/HTTP_PROXY in the environment never see an AWS call."""
    name = f"publer/{secrets.token_hex(4)}"
    moto.create_secret(name, api_key)
    version = moto.client("secretsmanager").get_secret_value(SecretId=name)["VersionId"]
    trap = Trap()
    env = {**ANY_AWS_IDENTITY, "HTTPS_PROXY": trap.url, "HTTP_PROXY": trap.url, "NO_PROXY": ""}
    proxy = aws_proxy(tmp_path, moto, sandbox, name, env=env)
    try:
        sandbox.clear()
        answer = httpx.get(f"{proxy.url}/api/v1/users/me")
        assert answer.status_code == 200, answer.text
        assert _seen_keys(sandbox) == [api_key]
        state = _readyz(proxy)
        assert state["source"] == "aws_secrets_manager"
        assert state["key_version"] == version
        assert state["key"] == "***" + api_key[-4:]
        metrics = httpx.get(f"{proxy.url}/metrics").text
        assert (
            'publer_proxy_key_reads_total{credential="publer",outcome="ok",'
            'source="aws_secrets_manager"}' in metrics
        )
        time.sleep(1.5)  # a background refresh or two
        assert trap.connections == 0
    finally:
        proxy.stop()
        trap.close()


def test_instance_role_credentials_never_cross_an_environment_proxy(
    tmp_path: Path, moto: Moto, sandbox: Sandbox, api_key: str
) -> None:
    """With no keys in the environment, the instance role's credentials come from the
    metadata service (moto's): the key is read, the plain-HTTP metadata calls do not go
    through HTTP_PROXY, and the role's secret key and token appear in no output."""
    name = f"publer/{secrets.token_hex(4)}"
    moto.create_secret(name, api_key)
    trap = Trap()
    env = {
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": moto.url + "/",
        "HTTP_PROXY": trap.url,
        "HTTPS_PROXY": trap.url,
        "NO_PROXY": "",
    }
    proxy = aws_proxy(tmp_path, moto, sandbox, name, env=env)
    try:
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
        assert trap.connections == 0
        role = httpx.get(f"{moto.url}/latest/meta-data/iam/security-credentials/default-role")
        output = proxy.output()
        assert "aws_environment_proxies_ignored" in output
        for secret in (role.json()["SecretAccessKey"], role.json()["Token"], api_key):
            assert secret not in output
    finally:
        proxy.stop()
        trap.close()


def test_rotation_under_load_is_invisible_to_clients(
    tmp_path: Path, moto: Moto, sandbox: Sandbox, api_key: str
) -> None:
    """A new AWSCURRENT version while clients send requests, and Publer revoking the old
    key at the same moment: every client request succeeds, the rotation is logged with
    both masked keys and VersionIds, and the new key is what Publer sees after."""
    name = f"publer/{secrets.token_hex(4)}"
    moto.create_secret(name, api_key)
    old_version = moto.client("secretsmanager").get_secret_value(SecretId=name)["VersionId"]
    proxy = aws_proxy(tmp_path, moto, sandbox, name)
    new_key = "pk_aws_rotated_" + secrets.token_hex(16)
    stop = threading.Event()

    def client() -> list[int]:
        statuses = []
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                statuses.append(http.get(f"{proxy.url}/api/v1/posts").status_code)
        return statuses

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client) for _ in range(6)]
            time.sleep(1.0)
            sandbox.set_keys({"key": api_key}, {"key": new_key})  # the new key is made in Publer
            new_version = moto.rotate(name, new_key)
            sandbox.set_keys({"key": new_key})  # and the old one revoked at once
            time.sleep(2.5)
            stop.set()
            statuses = [status for future in futures for status in future.result()]
        assert len(statuses) > 50
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        sandbox.clear()
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
        assert _seen_keys(sandbox) == [new_key]
        rotated = [e for e in proxy.events() if e.get("event") == "key_rotated"]
        assert len(rotated) == 1, rotated
        assert rotated[0]["source"] == "aws_secrets_manager"
        assert (rotated[0]["old_key"], rotated[0]["key"]) == (
            "***" + api_key[-4:],
            "***" + new_key[-4:],
        )
        assert (rotated[0]["old_version"], rotated[0]["key_version"]) == (
            old_version,
            new_version,
        )
    finally:
        stop.set()
        proxy.stop()
        sandbox.set_keys({"key": api_key})


def test_outage_serves_the_last_key_then_503_then_recovers(
    tmp_path: Path, sandbox: Sandbox, api_key: str
) -> None:
    """Secrets Manager down: the last good key serves (readyz degraded, stale) until
    max_stale_seconds, then 503 credential_unavailable with the reason; back up, the
    proxy reads the key again by itself."""
    server = start_moto(tmp_path / "moto")
    server.create_secret("publer/api", api_key)
    proxy = aws_proxy(tmp_path, server, sandbox, "publer/api", max_stale_seconds=4)
    try:
        server.stop()
        eventually(lambda: _readyz(proxy)["state"] == "stale")
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
        ready = httpx.get(f"{proxy.url}/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert "unreachable" in _readyz(proxy)["reason"]
        eventually(lambda: httpx.get(f"{proxy.url}/api/v1/posts").status_code == 503)
        refused = httpx.get(f"{proxy.url}/api/v1/posts")
        assert refused.json()["code"] == "credential_unavailable"
        assert httpx.get(f"{proxy.url}/readyz").status_code == 503
        server = restart_moto(server)
        server.create_secret("publer/api", api_key)
        eventually(lambda: httpx.get(f"{proxy.url}/readyz").status_code == 200, timeout=20)
        assert _readyz(proxy)["state"] == "fresh"
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
        failed = [e for e in proxy.events() if e.get("event") == "key_read_failed"]
        assert failed and all(e["source"] == "aws_secrets_manager" for e in failed)
    finally:
        proxy.stop()
        server.stop()


class StandIn:
    """An HTTP stand-in in front of moto that counts GetSecretValue calls and, when told,
    answers them as a throttling (400 ThrottlingException) or failing (500) AWS would."""

    def __init__(self, moto: Moto) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.mode = "healthy"
        self.calls: list[tuple[float, str]] = []  # (time.monotonic(), mode)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                mode = stand_in.mode
                if self.headers.get("x-amz-target", "").endswith("GetSecretValue"):
                    stand_in.calls.append((time.monotonic(), mode))
                if mode == "healthy":
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    answer = httpx.post(moto.url, content=body, headers=headers)
                    status, payload = answer.status_code, answer.content
                elif mode == "throttling":
                    status, payload = (
                        400,
                        b'{"__type":"ThrottlingException","message":"Rate exceeded"}',
                    )
                else:
                    status, payload = 500, b'{"__type":"InternalFailure"}'
                self.send_response(status)
                self.send_header("content-type", "application/x-amz-json-1.1")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def count(self, mode: str) -> int:
        """Calls answered in `mode`."""
        return sum(1 for _, m in self.calls if m == mode)

    def times(self, mode: str) -> list[float]:
        """When the calls answered in `mode` came."""
        return [t for t, m in self.calls if m == mode]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.parametrize("failure", ["throttling", "error_500"])
def test_a_failing_source_is_asked_less_often_than_a_healthy_one(
    tmp_path: Path, moto: Moto, sandbox: Sandbox, api_key: str, failure: str
) -> None:
    """With Secrets Manager throttling or answering 500, the proxy waits after each failed
    read (its 3 SDK calls) at least refresh_seconds times 3, doubling: fewer calls a
    second than when healthy; /readyz says when the next read is due."""
    name = f"publer/{secrets.token_hex(4)}"
    moto.create_secret(name, api_key)
    stand_in = StandIn(moto)
    config = proxy_config("http://127.0.0.1:9", sandbox.url)
    config["credentials"]["publer"] = {
        **aws_credential(moto, name, endpoint_url=stand_in.url),
        "max_stale_seconds": 600,
    }
    proxy = start_proxy(tmp_path, config, env=ANY_AWS_IDENTITY)
    try:
        eventually(lambda: stand_in.count("healthy") >= 4)
        healthy = stand_in.times("healthy")
        healthy_rate = (len(healthy) - 1) / (healthy[-1] - healthy[0])
        started = time.monotonic()
        stand_in.mode = failure
        # Three failed reads: each is 3 calls, the SDK's retries included.
        eventually(lambda: stand_in.count(failure) >= 9, timeout=60)
        failed = stand_in.times(failure)
        waits = [failed[3] - failed[2], failed[6] - failed[5]]
        assert waits[0] >= 3.0, waits  # refresh_seconds (1) times the 3 calls of a read
        assert waits[1] >= 2 * 3.0, waits  # doubled
        failing_rate = (len(failed) - 1) / (failed[-1] - started)
        assert failing_rate < healthy_rate, (failing_rate, healthy_rate)
        ready = _readyz(proxy)
        assert ready["state"] == "stale"
        assert 0 < ready["next_read_in_seconds"] <= 4 * 3.0 * 1.25
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
    finally:
        proxy.stop()
        stand_in.close()


def test_a_secret_that_cannot_be_a_key_is_refused_by_its_version_id(
    tmp_path: Path, moto: Moto, sandbox: Sandbox, api_key: str
) -> None:
    """A 60,000-character AWSCURRENT is never injected: the previous key keeps serving,
    and the log and /readyz name the refused VersionId."""
    name = f"publer/{secrets.token_hex(4)}"
    moto.create_secret(name, api_key)
    proxy = aws_proxy(tmp_path, moto, sandbox, name, max_stale_seconds=600)
    try:
        held = _readyz(proxy)["key_version"]
        bad = moto.rotate(name, "k" * 60_000)
        eventually(lambda: _readyz(proxy).get("refused_version") == bad)
        assert _readyz(proxy)["key_version"] == held
        assert bad in _readyz(proxy)["reason"]
        sandbox.clear()
        assert httpx.get(f"{proxy.url}/api/v1/posts").status_code == 200
        assert _seen_keys(sandbox) == [api_key]
        logged = [e for e in proxy.events() if e.get("refused_version") == bad]
        assert logged and logged[0]["key_version"] == held
    finally:
        proxy.stop()


def test_wrong_credentials_give_a_clear_error_without_secrets(
    tmp_path: Path, sandbox: Sandbox, api_key: str
) -> None:
    """A wrong AWS secret access key: 503 and /readyz say AWS refused the credentials,
    `check --online` says it too and exits 2, and neither the key nor either AWS
    secret appears in any output."""
    server = start_moto(tmp_path / "moto", auth=True)
    try:
        arn = server.create_secret("publer/api", api_key)
        identity = server.setup_reader()
        good_proxy = aws_proxy(tmp_path / "good", server, sandbox, arn, env=identity)
        assert httpx.get(f"{good_proxy.url}/api/v1/posts").status_code == 200
        assert good_proxy.stop() == 0
        wrong_secret = "wrong/" + secrets.token_hex(18)
        wrong = {**identity, "AWS_SECRET_ACCESS_KEY": wrong_secret}
        proxy = aws_proxy(tmp_path / "wrong", server, sandbox, arn, env=wrong, wait_ready=False)
        try:
            eventually(lambda: "reason" in _readyz(proxy))
            reason = _readyz(proxy)["reason"]
            assert "AWS refused the credentials" in reason and "SignatureDoesNotMatch" in reason
            answer = httpx.get(f"{proxy.url}/api/v1/posts")
            assert answer.status_code == 503 and "AWS refused" in answer.text
        finally:
            proxy.stop()
        check = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "check",
                "--online",
                "--config",
                str(proxy.config_path),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **wrong, "HOME": str(tmp_path)},
            check=False,
        )
        assert check.returncode == 2
        assert "AWS refused the credentials" in check.stdout
        outputs = [good_proxy.output(), proxy.output(), check.stdout + check.stderr, answer.text]
        for text in outputs:
            for secret in (api_key, wrong_secret, identity["AWS_SECRET_ACCESS_KEY"]):
                assert secret not in text
    finally:
        server.stop()


def test_the_aws_credential_source_is_named_at_start_and_by_check(
    tmp_path: Path, moto: Moto, sandbox: Sandbox, api_key: str
) -> None:
    """The start log and `check --online` name the provider of the SDK's chain whose
    credentials read the key: the environment's keys, or a shared credentials file."""
    name = f"publer/{secrets.token_hex(4)}"
    moto.create_secret(name, api_key)
    proxy = aws_proxy(tmp_path / "env", moto, sandbox, name)
    try:
        eventually(lambda: any(e.get("event") == "aws_credentials_in_use" for e in proxy.events()))
        said = [e for e in proxy.events() if e.get("event") == "aws_credentials_in_use"]
        assert said[0]["credential_source"] == "env"
        assert "AWS_ACCESS_KEY_ID" in said[0]["described"]
    finally:
        proxy.stop()
    shared = tmp_path / "aws-credentials"
    shared.write_text(
        f"[default]\naws_access_key_id = AKIAFILEEXAMPLE00000\naws_secret_access_key = {'f' * 40}\n"
    )
    from_file = {"AWS_SHARED_CREDENTIALS_FILE": str(shared), "AWS_EC2_METADATA_DISABLED": "true"}
    proxy = aws_proxy(tmp_path / "file", moto, sandbox, name, env=from_file)
    try:
        said = [e for e in proxy.events() if e.get("event") == "aws_credentials_in_use"]
        assert said[0]["credential_source"] == "shared-credentials-file"
    finally:
        proxy.stop()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    check = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--online", "--config", str(proxy.config_path)],
        capture_output=True,
        text=True,
        env={**clean, **from_file, "HOME": str(tmp_path)},
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "AWS credentials from shared-credentials-file" in check.stdout
    assert "f" * 40 not in check.stdout + check.stderr


def test_json_secret_field(moto: Moto, api_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON secret gives the named field; without `field` the error says it is JSON
    and lists its keys; a missing field is named, and the value is never in a reason."""
    name = f"publer/json-{secrets.token_hex(4)}"
    moto.create_secret(name, json.dumps({"api_key": api_key, "note": "team a"}))
    for variable, value in ANY_AWS_IDENTITY.items():
        monkeypatch.setenv(variable, value)
    registry = SecretRegistry()

    def source(**extra: Any) -> AwsKeySource:
        return AwsKeySource(
            AwsCredentialSettings.model_validate(aws_credential(moto, name, **extra)), registry
        )

    assert source(field="api_key").read().value == api_key
    with pytest.raises(SourceError) as no_field:
        source().read()
    assert "is a JSON object; set field" in no_field.value.reason
    assert "api_key, note" in no_field.value.reason
    with pytest.raises(SourceError) as missing:
        source(field="key").read()
    assert missing.value.kind == "not_found" and "no field 'key'" in missing.value.reason
    for error in (no_field.value, missing.value):
        assert api_key not in error.reason


def test_missing_sdk_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without boto3 installed, an aws_secrets_manager credential is a config problem that
    names the key and the extra to install, for `check` and `serve` alike."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "boto3" else real(name, *a)
    )
    settings = AwsCredentialSettings(source="aws_secrets_manager", secret_id="publer/api")
    assert sdk_problems({"publer": settings}) == [
        "credentials.publer.source: aws_secrets_manager needs the AWS SDK, which is not"
        " installed: pip install 'publer-proxy[aws]'"
    ]
    config = proxy_config("http://127.0.0.1:9", "http://127.0.0.1:9")
    config["credentials"]["publer"] = {"source": "aws_secrets_manager", "secret_id": "x"}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    from proxy.cli import main

    assert main(["check", "--config", str(path)]) == 1
