"""A key source's own error text never leaves the proxy: only the proxy's sentences do.

A stand-in HTTP server plays Vault and AWS Secrets Manager and answers every read with an
error that quotes a key the proxy never read, so masking by known secrets cannot help.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from proxy.redact import mask_opaque
from tests.servers import Sandbox, proxy_config, start_proxy
from tests.waiting import eventually

NEVER_READ = "pk_live_" + secrets.token_hex(20)
VAULT_TOKEN = "hvs." + secrets.token_hex(14)


class StandIn(BaseHTTPRequestHandler):
    """Vault answers the token lookup, then refuses reads quoting NEVER_READ; AWS refuses
    GetSecretValue quoting it too."""

    def do_GET(self) -> None:
        if self.path.startswith("/v1/auth/token/lookup-self"):
            self._json(200, {"data": {"ttl": 0, "renewable": False}})
        elif self.path.startswith("/v1/"):
            self._json(400, {"errors": [f"invalid value {NEVER_READ} in secret/data/publer"]})
        else:
            self._json(500, {"errors": [f"backend says {NEVER_READ}"]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = {"__type": "ValidationException", "message": f"bad secret {NEVER_READ}"}
        self._json(400, body, "application/x-amz-json-1.1")

    def _json(self, status: int, body: object, kind: str = "application/json") -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[str]:
    """The stand-in server's URL, on a loopback port of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_never_read_key_in_source_errors_goes_nowhere(
    tmp_path: Path, sandbox: Sandbox, stand_in: str
) -> None:
    """Vault's and AWS's error texts quoting a never-read key reach no response, /readyz,
    status page, metric or log line; the proxy still says which source failed and how."""
    token_file = tmp_path / "vault-token"
    token_file.write_text(VAULT_TOKEN)
    token_file.chmod(0o600)
    config = proxy_config(stand_in, sandbox.url, token_file=token_file)
    config["credentials"]["aws"] = {
        "source": "aws_secrets_manager",
        "secret_id": "publer/api",
        "region": "eu-west-1",
        "endpoint_url": stand_in,
    }
    config["routes"].append(
        {**config["routes"][0], "name": "aws", "prefix": "/aws", "credential": "aws"}
    )
    aws_identity = {"AWS_ACCESS_KEY_ID": "AKIATESTEXAMPLE00000", "AWS_SECRET_ACCESS_KEY": "x" * 40}
    proxy = start_proxy(tmp_path / "proxy", config, env=aws_identity, wait_ready=False)
    try:
        eventually(
            lambda: sum('"key_read_failed"' in line for line in proxy.output().splitlines()) >= 2
        )
        answers = [
            httpx.get(f"{proxy.url}{path}", trust_env=False)
            for path in ("/api/v1/posts", "/aws/api/v1/posts", "/readyz", "/metrics")
        ]
        answers += [
            httpx.get(f"{proxy.url}/status", trust_env=False),
            httpx.get(f"{proxy.url}/status.json", trust_env=False),
        ]
    finally:
        proxy.stop()
    assert [a.status_code for a in answers[:3]] == [503, 503, 503]
    assert "Vault refused to read secret/publer/api (HTTP 400, invalid request)" in answers[0].text
    assert "Secrets Manager refused to read" in answers[1].text
    assert "ValidationException" in answers[1].text
    texts = [a.text for a in answers] + [proxy.output()]
    for text in texts:
        assert NEVER_READ not in text
        assert NEVER_READ[8:24] not in text  # no fragment either
    # The log keeps what the service said, its long opaque token masked.
    assert "bad secret [masked]" in proxy.output()
    assert "in secret/data/publer" in proxy.output()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"bad {NEVER_READ}!", "bad [masked]!"),
        ("permission denied", "permission denied"),
        ("no secret at secret/data/publer/api", "no secret at secret/data/publer/api"),
        ("token hvs.CAESIJ2kq2 expired", "token hvs.CAESIJ2kq2 expired"),
        ("token hvs.CAESIJ2kq2xYz1abCD expired", "token [masked] expired"),
        ("a\r\nforged log line", "a forged log line"),
        ("x" * 40, "[masked]"),
        ("A" * 500, "[masked]"),
    ],
)
def test_mask_opaque(text: str, expected: str) -> None:
    """Long opaque tokens in foreign text are masked without knowing any secret; line
    breaks cannot forge a log line."""
    assert mask_opaque(text) == expected
