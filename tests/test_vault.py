"""proxy.keys.sources.vault against a real OpenBao dev server."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs
from structlog.typing import EventDict

from proxy.config.settings import CredentialSettings, VaultAuthSettings, VaultSettings
from proxy.keys.sources import vault
from proxy.keys.sources.base import SecretRead, backoff_seconds, key_problem
from proxy.keys.sources.vault import VaultError, VaultSession
from proxy.masking.secrets import SecretRegistry
from tests.bao import Bao, free_port, restart_bao, start_bao
from tests.k8s_tokenreview import ServiceAccount, TokenReviewServer, service_account_jwt

KEY_PATH = "publer/api"
READ_POLICY = "publer-read"
READ_POLICY_HCL = """
path "secret/data/publer/api" {
  capabilities = ["read"]
}
"""
OTHER_POLICY = "other-read"
OTHER_POLICY_HCL = """
path "secret/data/elsewhere" {
  capabilities = ["read"]
}
"""
APPROLE_MOUNT = "approle-short"
APPROLE_ROLE = "publer-proxy"
JWT_ISSUER = "https://ci.example.test"
JWT_AUDIENCE = "publer-proxy"
K8S_ACCOUNT = ServiceAccount(namespace="apps", name="publer-proxy")
# What an OpenBao service token looks like; nothing in any output may match it.
TOKEN_SHAPE = re.compile(r"\b[sb]\.[A-Za-z0-9]{24}\b|\bhv[sb]\.[A-Za-z0-9_-]{20,}")

Sessions = Callable[..., VaultSession]


def new_key() -> str:
    return f"pk_{secrets.token_hex(20)}"


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """One OpenBao dev server for the module, with the key and two policies in it."""
    server = start_bao(tmp_path_factory.mktemp("bao"))
    try:
        client = server.client()
        client.sys.create_or_update_policy(READ_POLICY, READ_POLICY_HCL)
        client.sys.create_or_update_policy(OTHER_POLICY, OTHER_POLICY_HCL)
        server.write_key(KEY_PATH, new_key())
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_ambient_vault(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's VAULT_* variables or ~/.vault-token."""
    for name in (
        "VAULT_TOKEN",
        "VAULT_ADDR",
        "VAULT_NAMESPACE",
        "VAULT_CACERT",
        "VAULT_SKIP_VERIFY",
    ):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


@pytest.fixture
def registry() -> SecretRegistry:
    """The secret registry the test's sessions share."""
    return SecretRegistry()


@pytest.fixture
def sessions(registry: SecretRegistry) -> Iterator[Sessions]:
    """Makes VaultSessions (url, then VaultAuthSettings fields) and closes them after."""
    made: list[VaultSession] = []

    def make(
        url: str,
        *,
        ca_cert: Path | None = None,
        skip_verify: bool = False,
        timeout_seconds: float = 3,
        **auth: Any,
    ) -> VaultSession:
        settings = VaultSettings(
            url=url,
            ca_cert=ca_cert,
            skip_verify=skip_verify,
            timeout_seconds=timeout_seconds,
            auth=VaultAuthSettings(**auth),
        )
        session = VaultSession(settings, registry)
        made.append(session)
        return session

    yield make
    for session in made:
        session.close()


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EventDict]]:
    """Every event proxy.keys.sources.vault logs during the test, debug included, whatever the
    process-wide structlog level (another test may have configured and cached it)."""
    logger = structlog.wrap_logger(
        None,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    monkeypatch.setattr(vault, "log", logger)
    with capture_logs() as captured:
        yield captured


def credential(**overrides: Any) -> CredentialSettings:
    return CredentialSettings(**{"path": KEY_PATH, **overrides})


def child_token(bao: Bao, *policies: str, ttl: str = "1h", renewable: bool = True) -> str:
    answer = bao.client().auth.token.create(
        policies=list(policies or [READ_POLICY]), ttl=ttl, renewable=renewable
    )
    return str(answer["auth"]["client_token"])


def fails(kind: str, operation: Callable[[], object]) -> VaultError:
    with pytest.raises(VaultError) as caught:
        operation()
    assert caught.value.kind == kind, caught.value.reason
    return caught.value


def enable_auth(bao: Bao, method: str, path: str) -> None:
    client = bao.client()
    if f"{path}/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method(method, path=path)


def approle_files(bao: Bao, directory: Path) -> tuple[str, Path]:
    """An AppRole (token_ttl 3 s, token_max_ttl 6 s, read on the key only): its role id
    and a file holding a fresh secret id."""
    enable_auth(bao, "approle", APPROLE_MOUNT)
    approle = bao.client().auth.approle
    approle.create_or_update_approle(
        APPROLE_ROLE,
        token_policies=[READ_POLICY],
        token_ttl="3s",
        token_max_ttl="6s",
        mount_point=APPROLE_MOUNT,
    )
    role_id = approle.read_role_id(APPROLE_ROLE, mount_point=APPROLE_MOUNT)["data"]["role_id"]
    secret_id = approle.generate_secret_id(APPROLE_ROLE, mount_point=APPROLE_MOUNT)
    secret_id_file = directory / "secret-id"
    secret_id_file.write_text(secret_id["data"]["secret_id"] + "\n")
    return str(role_id), secret_id_file


def jwt_setup(bao: Bao, directory: Path) -> Path:
    """JWT auth trusting a fresh RSA key, a role bound to its subject; returns a file
    holding a JWT signed with that key."""
    enable_auth(bao, "jwt", "jwt")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    client = bao.client()
    client.auth.jwt.configure(
        jwt_validation_pubkeys=[public_pem], bound_issuer=JWT_ISSUER, path="jwt"
    )
    client.auth.jwt.create_role(
        "publer-proxy",
        user_claim="sub",
        allowed_redirect_uris=[],
        role_type="jwt",
        bound_audiences=[JWT_AUDIENCE],
        bound_subject="publer-proxy@ci",
        token_policies=[READ_POLICY],
        token_ttl="60s",
        path="jwt",
    )
    now = datetime.now(UTC)
    token = jwt.encode(
        {
            "iss": JWT_ISSUER,
            "aud": JWT_AUDIENCE,
            "sub": "publer-proxy@ci",
            "iat": now,
            "nbf": now,
            "exp": now + timedelta(minutes=5),
        },
        key,
        algorithm="RS256",
    )
    jwt_file = directory / "jwt"
    jwt_file.write_text(token)
    return jwt_file


def kubernetes_setup(bao: Bao, server: TokenReviewServer, directory: Path) -> Path:
    """Kubernetes auth pointed at `server`, a role bound to K8S_ACCOUNT; returns the
    account's token file."""
    enable_auth(bao, "kubernetes", "kubernetes")
    client = bao.client()
    client.write_data(
        "auth/kubernetes/config",
        data={
            "kubernetes_host": server.url,
            "kubernetes_ca_cert": server.ca_pem,
            "token_reviewer_jwt": "reviewer-" + secrets.token_hex(8),
            "disable_local_ca_jwt": True,
        },
    )
    client.auth.kubernetes.create_role(
        "publer-proxy",
        bound_service_account_names=[K8S_ACCOUNT.name],
        bound_service_account_namespaces=[K8S_ACCOUNT.namespace],
        policies=[READ_POLICY],
        ttl="60s",
    )
    token = service_account_jwt(K8S_ACCOUNT)
    server.accounts[token] = K8S_ACCOUNT
    jwt_file = directory / "sa-token"
    jwt_file.write_text(token)
    return jwt_file


# -- token auth ---------------------------------------------------------------------


def test_token_from_environment(
    bao: Bao, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$VAULT_TOKEN logs in; its 1 h TTL puts maintenance at 2/3 of it, +-10%."""
    monkeypatch.setenv("VAULT_TOKEN", child_token(bao))
    session = sessions(bao.url)
    session.login()
    assert session.read_key(credential()).value
    assert session.auth_summary == "token (from $VAULT_TOKEN)"
    assert 3600 * 2 / 3 * 0.9 - 5 <= session.token_maintenance_due_in() <= 3600 * 2 / 3 * 1.1


def test_token_from_token_file(bao: Bao, sessions: Sessions, tmp_path: Path) -> None:
    """auth.token_file is read (trimmed) when $VAULT_TOKEN is not set."""
    token_file = tmp_path / "token"
    token_file.write_text(child_token(bao) + "\n")
    session = sessions(bao.url, token_file=token_file)
    assert session.read_key(credential()).value
    assert session.auth_summary == f"token (from {token_file})"


def test_token_file_others_can_read_is_warned(
    bao: Bao, sessions: Sessions, tmp_path: Path, events: list[EventDict]
) -> None:
    """A token file every user can read is used, with a warning naming it and the fix."""
    token = child_token(bao)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o640)  # group-readable: how Vault Agent's file sink writes it
    sessions(bao.url, token_file=token_file).login()
    assert not [e for e in events if e["event"] == "secret_file_exposed"]
    token_file.chmod(0o644)
    sessions(bao.url, token_file=token_file).login()
    [warning] = [e for e in events if e["event"] == "secret_file_exposed"]
    assert warning["file"] == str(token_file)
    assert "readable by every user" in warning["reason"] and "chmod 600" in warning["reason"]
    assert token not in repr(events)


def test_token_from_home_vault_token(bao: Bao, sessions: Sessions) -> None:
    """Without $VAULT_TOKEN and token_file, ~/.vault-token is the token."""
    (Path.home() / ".vault-token").write_text(child_token(bao))
    session = sessions(bao.url)
    session.login()
    assert session.auth_summary.endswith(".vault-token)")


def test_no_token_anywhere(bao: Bao, sessions: Sessions) -> None:
    """With no token to be found the login fails with a sentence that says where it looked."""
    error = fails("auth_failed", sessions(bao.url).login)
    assert "VAULT_TOKEN is not set" in error.reason
    assert str(Path.home() / ".vault-token") in error.reason


def test_bad_token(sessions: Sessions, bao: Bao, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token Vault does not know fails the login as auth_failed (OpenBao answers 403)."""
    monkeypatch.setenv("VAULT_TOKEN", "s." + secrets.token_hex(12))
    error = fails("auth_failed", sessions(bao.url).login)
    assert error.reason == (
        "Vault refused the token from $VAULT_TOKEN: it is invalid, expired or revoked"
    )


def test_login_methods_ignore_ambient_token(
    bao: Bao, sessions: Sessions, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An AppRole session never falls back on $VAULT_TOKEN or ~/.vault-token."""
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    (Path.home() / ".vault-token").write_text(bao.root_token)
    role_id, secret_id_file = approle_files(bao, tmp_path)
    secret_id_file.write_text("not-the-secret-id")
    session = sessions(
        bao.url,
        method="approle",
        role_id=role_id,
        secret_id_file=secret_id_file,
        mount=APPROLE_MOUNT,
    )
    error = fails("auth_failed", lambda: session.read_key(credential()))
    assert error.reason == (
        f"Vault refused the approle login at auth/{APPROLE_MOUNT} (HTTP 400, invalid request);"
        " check the role and its credentials"
    )
    assert error.detail == "invalid role or secret ID"  # Vault's words: for the log only


def test_root_token_is_never_due(
    bao: Bao, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root token (no TTL, not renewable) is used as it is: maintenance is never due."""
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    session = sessions(bao.url)
    session.login()
    assert session.token_maintenance_due_in() == math.inf
    assert session.maintain_token() == math.inf


def test_renewable_token_is_renewed(
    bao: Bao, sessions: Sessions, monkeypatch: pytest.MonkeyPatch, events: list[EventDict]
) -> None:
    """maintain_token renews a renewable token, and the renewed token keeps reading."""
    monkeypatch.setenv("VAULT_TOKEN", child_token(bao, ttl="1h"))
    session = sessions(bao.url)
    session.login()
    assert session.maintain_token() > 2000
    assert [e["event"] for e in events if e["event"].startswith("vault_token_re")] == [
        "vault_token_renewed"
    ]
    assert session.read_key(credential()).value


def test_rotated_token_file_is_reread(
    bao: Bao, sessions: Sessions, tmp_path: Path, events: list[EventDict]
) -> None:
    """A token that cannot be renewed is replaced by re-reading the token file, where an
    agent may have put a new one."""
    token_file = tmp_path / "token"
    first = child_token(bao, renewable=False)
    token_file.write_text(first)
    session = sessions(bao.url, token_file=token_file)
    session.login()
    token_file.write_text(child_token(bao))
    bao.client().auth.token.revoke(first)
    session.maintain_token()
    assert session.read_key(credential()).value
    assert {
        "event": "vault_token_relogin",
        "method": "token",
        "why": "the token is not renewable",
        "log_level": "debug",
    } in events


# -- KV reads -----------------------------------------------------------------------


@pytest.fixture
def root_session(bao: Bao, sessions: Sessions, monkeypatch: pytest.MonkeyPatch) -> VaultSession:
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    session = sessions(bao.url)
    session.login()
    return session


def test_kv2_read_and_rotation(bao: Bao, root_session: VaultSession) -> None:
    """A KV v2 read gives the key, its version and creation time; a new version is seen on
    the next read (rotation without restart)."""
    key = new_key()
    version = bao.write_key("rotating", key)
    first = root_session.read_key(credential(path="rotating"))
    assert (first.value, first.version) == (key, version)
    assert first.created_time is not None
    assert first.created_time.tzinfo is not None
    assert abs(datetime.now(UTC) - first.created_time) < timedelta(minutes=1)
    assert key not in repr(first)

    rotated = new_key()
    bao.write_key("rotating", rotated)
    second = root_session.read_key(credential(path="rotating"))
    assert (second.value, second.version) == (rotated, version + 1)
    assert second.created_time is not None
    assert second.created_time >= first.created_time


def test_kv1_read(bao: Bao, root_session: VaultSession) -> None:
    """A KV v1 mount is read with kv_version 1; there is no version or creation time."""
    client = bao.client()
    client.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    key = new_key()
    client.secrets.kv.v1.create_or_update_secret(
        path=KEY_PATH, secret={"token": key}, mount_point="kv1"
    )
    read = root_session.read_key(credential(mount="kv1", kv_version=1, field="token"))
    assert read == SecretRead(value=key, version=None, created_time=None)


def test_missing_secret(root_session: VaultSession) -> None:
    """No secret at the path is not_found, naming the path."""
    error = fails("not_found", lambda: root_session.read_key(credential(path="no/such")))
    assert error.reason == "no secret at secret/no/such (KV version 2 mount)"


def test_deleted_latest_version(bao: Bao, root_session: VaultSession) -> None:
    """A deleted latest KV v2 version is not_found and says so."""
    version = bao.write_key("deleted", new_key())
    bao.client().secrets.kv.v2.delete_latest_version_of_secret("deleted", mount_point="secret")
    error = fails("not_found", lambda: root_session.read_key(credential(path="deleted")))
    assert error.reason == f"the latest version ({version}) of secret/deleted is deleted"


def test_missing_field(bao: Bao, root_session: VaultSession) -> None:
    """A secret without the configured field is not_found, listing the fields it has."""
    bao.write_key("other-field", new_key(), field="key")
    error = fails("not_found", lambda: root_session.read_key(credential(path="other-field")))
    assert error.reason == "secret/other-field has no field 'api_key' (its fields: key)"


def test_surrounding_whitespace_is_trimmed(bao: Bao, root_session: VaultSession) -> None:
    """Whitespace around the key (a pasted newline) is trimmed."""
    key = new_key()
    bao.write_key("padded", f"  {key}\n")
    assert root_session.read_key(credential(path="padded")).value == key


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("two words", "it contains whitespace"),
        ("tab\there", "it contains whitespace"),
        ("", "it is empty"),
        (" \n ", "it is empty"),
        ("bell\x07key", "it contains characters that are not printable ASCII"),
        ("clé-publer", "it contains characters that are not printable ASCII"),
    ],
)
def test_value_that_is_not_a_key(
    bao: Bao, root_session: VaultSession, value: str, problem: str
) -> None:
    """A value that does not look like an API key is invalid, the reason hides it and
    names the refused KV version."""
    bao.write_key("bad-value", value)
    version = bao.client().secrets.kv.v2.read_secret_version(
        path="bad-value", mount_point="secret", raise_on_deleted_version=True
    )["data"]["metadata"]["version"]
    error = fails("invalid", lambda: root_session.read_key(credential(path="bad-value")))
    assert error.version == version
    assert error.reason == (
        f"the value at secret/bad-value field api_key (KV version {version}) does not look"
        f" like an API key ({problem})"
    )


def test_value_that_is_not_a_string(bao: Bao, root_session: VaultSession) -> None:
    """A number or object where the key should be is invalid."""
    bao.client().secrets.kv.v2.create_or_update_secret(
        path="number", secret={"api_key": 12345678}, mount_point="secret"
    )
    error = fails("invalid", lambda: root_session.read_key(credential(path="number")))
    assert error.reason == "the value at secret/number field api_key is not a string"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("pk_0123456789abcdef", None),
        ("a!#$%&'()*+,-./:;<=>?@[]^_`{|}~", None),
        ("", "it is empty"),
        ("a b", "it contains whitespace"),
        ("a\u00a0b", "it contains whitespace"),
        ("a\x7fb", "it contains characters that are not printable ASCII"),
        ("ключ", "it contains characters that are not printable ASCII"),
        ("k" * 16, None),
        ("k" * 512, None),
        ("changeme", "it is 8 characters long; an API key has at least 16"),
        ("k" * 15, "it is 15 characters long; an API key has at least 16"),
        ("k" * 513, "it is 513 characters long; an API key has at most 512"),
        ("k" * 60_000, "it is 60000 characters long; an API key has at most 512"),
        ("pk_" + "a" * 20 + "\x00", "it contains characters that are not printable ASCII"),
        ("pk_" + "a" * 20 + "\r\nX-Evil: 1", "it contains whitespace"),
    ],
)
def test_key_problem(value: str, problem: str | None) -> None:
    """key_problem accepts 16 to 512 printable ASCII characters without spaces and names
    what else is wrong."""
    assert key_problem(value) == problem


def test_policy_denial(bao: Bao, sessions: Sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid token whose policy does not cover the path is denied (after one re-login)."""
    monkeypatch.setenv("VAULT_TOKEN", child_token(bao, OTHER_POLICY))
    session = sessions(bao.url)
    error = fails("denied", lambda: session.read_key(credential()))
    assert error.reason == f"permission denied reading secret/{KEY_PATH}"


# -- Vault unavailable ----------------------------------------------------------------


def test_unreachable(sessions: Sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listening is unreachable, for the login and for a read."""
    monkeypatch.setenv("VAULT_TOKEN", "s." + secrets.token_hex(12))
    url = f"http://127.0.0.1:{free_port()}"
    session = sessions(url)
    error = fails("unreachable", session.login)
    assert error.reason == f"Vault at {url} is unreachable (connection refused)"
    fails("unreachable", lambda: session.read_key(credential()))


def test_sealed_then_unsealed_then_restarted(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Sealed is `sealed`, a stopped server `unreachable`; after unseal, and after a
    restart (reseeded), the same session reads again."""
    server = start_bao(tmp_path / "bao")
    try:
        key = new_key()
        server.write_key(KEY_PATH, key)
        monkeypatch.setenv("VAULT_TOKEN", server.root_token)
        session = sessions(server.url)
        session.login()

        server.seal()
        error = fails("sealed", lambda: session.read_key(credential()))
        assert error.reason == "Vault is sealed"
        fails("sealed", session.login)
        server.unseal()
        assert session.read_key(credential()).value == key

        server.stop()
        fails("unreachable", lambda: session.read_key(credential()))
        server = restart_bao(server)
        server.write_key(KEY_PATH, key)
        assert session.read_key(credential()).value == key
    finally:
        server.stop()


def test_tls_ca_cert_and_skip_verify(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """HTTPS Vault: verified with ca_cert, refused without it, accepted with skip_verify."""
    server = start_bao(tmp_path / "bao", tls=True)
    try:
        key = new_key()
        server.write_key(KEY_PATH, key)
        monkeypatch.setenv("VAULT_TOKEN", server.root_token)
        assert sessions(server.url, ca_cert=server.ca_cert).read_key(credential()).value == key
        assert sessions(server.url, skip_verify=True).read_key(credential()).value == key
        error = fails("unreachable", sessions(server.url).login)
        assert "TLS failed" in error.reason
    finally:
        server.stop()


@contextmanager
def stub_vault(status: int, body: bytes, *, delay: float = 0) -> Iterator[str]:
    """An HTTP server that gives every request the same answer (after `delay` seconds)."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize(
    ("status", "errors", "kind", "says"),
    [
        (503, ["Vault is sealed"], "sealed", "Vault is sealed"),
        (501, ["Vault is not initialized"], "sealed", "Vault is not initialized"),
        (503, ["standby node unreachable"], "unreachable", "answered 503; retry later"),
        (500, ["internal error"], "unreachable", "answered 500; retry later"),
        (502, [], "unreachable", "answered 502; retry later"),
        (429, ["rate limit quota exceeded"], "unreachable", "answered 429; retry later"),
    ],
)
def test_server_errors(
    sessions: Sessions,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    errors: list[str],
    kind: str,
    says: str,
) -> None:
    """Vault's 5xx and 429 answers map to sealed or unreachable in the proxy's words;
    Vault's own text is kept apart, for the log only."""
    monkeypatch.setenv("VAULT_TOKEN", "s." + secrets.token_hex(12))
    with stub_vault(status, json.dumps({"errors": errors}).encode()) as url:
        error = fails(kind, sessions(url).login)
    assert says in error.reason
    if kind == "unreachable":
        assert not any(text in error.reason for text in errors)
        assert error.detail == ("; ".join(errors) or None)


def test_no_answer_in_time(sessions: Sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Vault that accepts but does not answer within timeout_seconds is unreachable."""
    monkeypatch.setenv("VAULT_TOKEN", "s." + secrets.token_hex(12))
    with stub_vault(200, b"{}", delay=1.5) as url:
        error = fails("unreachable", sessions(url, timeout_seconds=0.5).login)
    assert error.reason == f"Vault at {url} is unreachable (no response within 0.5s)"


# -- login methods ------------------------------------------------------------------


def test_approle_renews_then_logs_in_again(
    bao: Bao, sessions: Sessions, tmp_path: Path, events: list[EventDict]
) -> None:
    """AppRole token (TTL 3 s, max 6 s): maintenance renews it, logs in again when the max
    TTL is near, and reads keep working throughout."""
    role_id, secret_id_file = approle_files(bao, tmp_path)
    session = sessions(
        bao.url,
        method="approle",
        role_id=role_id,
        secret_id_file=secret_id_file,
        mount=APPROLE_MOUNT,
    )
    before_login = time.monotonic()
    session.login()
    assert session.auth_summary == f"approle (mount {APPROLE_MOUNT})"
    due_in = session.token_maintenance_due_in()
    # Due 1.5-2.3 s after the login answered, which was at most this long ago:
    assert due_in + (time.monotonic() - before_login) >= 1.5 and due_in <= 2.3

    def relogged_in() -> bool:
        return any(
            e["event"] == "vault_token_relogin" and e["why"] == "the token's max TTL is near"
            for e in events
        )

    # Past the max TTL: until the re-login it forces, and a few reads after it.
    deadline = time.monotonic() + 60
    reads = 0
    reads_after = 0
    while reads_after < 3 or reads < 10:
        assert time.monotonic() < deadline, "no re-login within 60 s"
        time.sleep(min(session.token_maintenance_due_in(), 0.5))  # reads paced to the TTL
        if session.token_maintenance_due_in() == 0:
            session.maintain_token()
        assert session.read_key(credential()).value
        reads += 1
        reads_after += relogged_in()
    outcomes = [e["event"] for e in events if e["event"].startswith("vault_token_re")]
    assert "vault_token_renewed" in outcomes
    relogins = [e for e in events if e["event"] == "vault_token_relogin"]
    assert any(e["why"] == "the token's max TTL is near" for e in relogins)
    assert outcomes.index("vault_token_renewed") < outcomes.index("vault_token_relogin")
    assert not [e for e in events if e["event"] == "vault_read_forbidden_relogin"]


def test_forbidden_read_logs_in_again(
    bao: Bao, sessions: Sessions, tmp_path: Path, events: list[EventDict]
) -> None:
    """A read refused because the token was revoked logs in once more and succeeds."""
    role_id, secret_id_file = approle_files(bao, tmp_path)
    session = sessions(
        bao.url,
        method="approle",
        role_id=role_id,
        secret_id_file=secret_id_file,
        mount=APPROLE_MOUNT,
    )
    session.login()
    bao.client().sys.revoke_prefix(f"auth/{APPROLE_MOUNT}/login")
    assert session.read_key(credential()).value
    assert [e["event"] for e in events].count("vault_read_forbidden_relogin") == 1


def test_approle_missing_secret_id_file(bao: Bao, sessions: Sessions, tmp_path: Path) -> None:
    """A missing secret_id_file fails the login, naming the file."""
    missing = tmp_path / "nope"
    session = sessions(
        bao.url, method="approle", role_id="x", secret_id_file=missing, mount=APPROLE_MOUNT
    )
    error = fails("auth_failed", session.login)
    assert error.reason == f"the AppRole secret id file {missing} does not exist"


def test_jwt_login(bao: Bao, sessions: Sessions, tmp_path: Path) -> None:
    """JWT auth: a JWT signed with a key Vault trusts logs in with the role and reads."""
    jwt_file = jwt_setup(bao, tmp_path)
    session = sessions(bao.url, method="jwt", role="publer-proxy", jwt_file=jwt_file)
    assert session.read_key(credential()).value
    assert session.auth_summary == "jwt (role publer-proxy, mount jwt)"
    assert 35 <= session.token_maintenance_due_in() <= 45


def test_jwt_with_wrong_key(bao: Bao, sessions: Sessions, tmp_path: Path) -> None:
    """A JWT signed with another key is refused as auth_failed."""
    jwt_setup(bao, tmp_path)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = tmp_path / "forged"
    forged.write_text(
        jwt.encode(
            {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "publer-proxy@ci"},
            other,
            algorithm="RS256",
        )
    )
    session = sessions(bao.url, method="jwt", role="publer-proxy", jwt_file=forged)
    error = fails("auth_failed", session.login)
    assert error.reason.startswith("Vault refused the jwt login at auth/jwt")


def test_kubernetes_login(bao: Bao, sessions: Sessions, tmp_path: Path) -> None:
    """Kubernetes auth: Vault checks the service-account token with a TokenReview and the
    bound account logs in and reads; an unknown token is refused."""
    with TokenReviewServer({}) as server:
        jwt_file = kubernetes_setup(bao, server, tmp_path)
        session = sessions(bao.url, method="kubernetes", role="publer-proxy", jwt_file=jwt_file)
        assert session.read_key(credential()).value
        assert session.auth_summary == "kubernetes (role publer-proxy, mount kubernetes)"
        assert server.reviews[-1][1] is True
        assert server.reviews[-1][0].startswith("Bearer reviewer-")

        stranger = tmp_path / "stranger"
        stranger.write_text(service_account_jwt(K8S_ACCOUNT))
        refused = sessions(bao.url, method="kubernetes", role="publer-proxy", jwt_file=stranger)
        fails("auth_failed", refused.login)


# -- small pure parts ---------------------------------------------------------------


def test_backoff_seconds() -> None:
    """Backoff starts at 1 s, doubles, is capped at 5 min and is jittered."""
    assert backoff_seconds(1) == 1.0
    assert all(1.0 <= backoff_seconds(2) <= 2.0 for _ in range(100))
    late = [backoff_seconds(30) for _ in range(200)]
    assert all(1.0 <= delay <= 300.0 for delay in late)
    assert max(late) > 150
    assert min(late) < 150


@given(
    failures=st.integers(1, 200),
    refresh=st.floats(0.1, 86_400),
    calls=st.integers(1, 10),
    usable_for=st.none() | st.floats(0, 200_000),
)
def test_read_backoff_never_asks_more_often_than_healthy(
    failures: int, refresh: float, calls: int, usable_for: float | None
) -> None:
    """While a key is held, a failing source waits at least refresh_seconds per call a
    read makes and at most the ceiling plus a quarter; without one, at most one refresh
    per call plus a quarter, so it heals within a refresh."""
    from proxy.keys.sources.base import READ_BACKOFF_CEILING_SECONDS, read_backoff_seconds

    wait = read_backoff_seconds(failures, refresh, calls, usable_for=usable_for)
    steady = refresh * calls
    if usable_for is None:
        assert min(steady, calls) <= wait <= steady * 1.25 + 1e-9
    else:
        ceiling = max(steady, min(READ_BACKOFF_CEILING_SECONDS, 8 * steady))
        assert steady <= wait <= ceiling * 1.25 + 1e-9


def test_read_backoff_doubles_from_the_first_wait() -> None:
    """With a key held, waits after 1, 2, 3 failures start at 1, 2, 4 first waits."""
    from proxy.keys.sources.base import read_backoff_seconds

    for failures, low in ((1, 900.0), (2, 1800.0), (3, 3600.0), (9, 3600.0)):
        wait = read_backoff_seconds(failures, 300, 3, usable_for=1e9)
        assert low <= wait <= low * 1.25


def test_error_and_read_reprs() -> None:
    """VaultError shows kind and reason; SecretRead never shows its value."""
    error = VaultError("Vault is sealed", kind="sealed")
    assert (str(error), error.kind) == ("Vault is sealed", "sealed")
    assert repr(error) == "VaultError(kind='sealed', reason='Vault is sealed')"
    copied = copy.copy(error)  # copy and pickle rebuild it through __reduce__
    assert (copied.reason, copied.kind) == (error.reason, error.kind)
    read = SecretRead(value="pk_supersecretvalue", version=3, created_time=None)
    assert "supersecret" not in repr(read)


# -- no secret in any output ---------------------------------------------------------


def test_no_secret_in_any_output(
    bao: Bao,
    sessions: Sessions,
    registry: SecretRegistry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    events: list[EventDict],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Logins, renewals, reads and every failure above leave no token, secret id, JWT or
    key in logs, printed output, exception texts, tracebacks or reprs."""
    caplog.set_level(logging.DEBUG)
    key = new_key()
    bao.write_key(KEY_PATH, key)
    spaced_halves = (secrets.token_hex(8), secrets.token_hex(8))
    bao.write_key("spaced", " ".join(spaced_halves))
    token = child_token(bao)
    bad_token = "s." + secrets.token_hex(12)
    role_id, secret_id_file = approle_files(bao, tmp_path)
    secret_id = secret_id_file.read_text().strip()
    jwt_file = jwt_setup(bao, tmp_path)
    texts: list[str] = []

    def attempt(operation: Callable[[], object]) -> None:
        try:
            texts.append(repr(operation()))
        except VaultError as exc:
            texts.extend([str(exc), repr(exc), "".join(traceback.format_exception(exc))])

    with TokenReviewServer({}) as server:
        sa_file = kubernetes_setup(bao, server, tmp_path)
        made = [
            sessions(bao.url, token_file=tmp_path / "none"),
            sessions(
                bao.url,
                method="approle",
                role_id=role_id,
                secret_id_file=secret_id_file,
                mount=APPROLE_MOUNT,
            ),
            sessions(bao.url, method="jwt", role="publer-proxy", jwt_file=jwt_file),
            sessions(bao.url, method="kubernetes", role="publer-proxy", jwt_file=sa_file),
            sessions(f"http://127.0.0.1:{free_port()}"),
        ]
        for env_token in (token, bad_token, bao.root_token):
            monkeypatch.setenv("VAULT_TOKEN", env_token)
            for session in made:
                attempt(session.login)
                attempt(partial(session.read_key, credential()))
                attempt(partial(session.read_key, credential(path="spaced")))
                attempt(partial(session.read_key, credential(field="nope")))
                attempt(session.maintain_token)
                texts.extend([repr(session), session.auth_summary])
        secret_id_file.write_text("wrong-" + secret_id)
        attempt(made[1].login)

    captured = capsys.readouterr()
    output = "\n".join([*texts, *map(repr, events), caplog.text, captured.out, captured.err])
    assert any(e["event"] == "vault_token_renewed" for e in events)  # the run did renew
    known = [
        key,
        *spaced_halves,
        token,
        bad_token,
        bao.root_token,
        secret_id,
        jwt_file.read_text(),
        sa_file.read_text(),
    ]
    for secret in known:
        assert secret not in output
    assert not TOKEN_SHAPE.findall(output)
    assert key in registry
    assert secret_id in registry
    assert token in registry
