"""Vault login, token upkeep and KV reads.

Synchronous on purpose: hvac blocks, so the credential store calls these methods from a
worker thread (anyio.to_thread.run_sync), never on the event loop. A session is safe to
share between threads: logins are serialised and a 403 triggers at most one re-login.

Every failure is one exception whose `kind` tells a caller what happened and whose `reason`
is a sentence safe to log and to show:

    VaultError
      kind="unreachable"  connection refused, timeout, TLS failure, a 429/5xx response
      kind="sealed"       Vault is sealed or not initialized
      kind="auth_failed"  no token to be found, or Vault refused the token or the login
      kind="denied"       the token is valid but may not read that path
      kind="not_found"    no secret, no such field, or the latest version is deleted
      kind="invalid"      the value does not look like an API key

Secrets (tokens, secret ids, JWTs, keys) go into the SecretRegistry the moment they are
read. No message built here contains one, and hvac's exceptions are never chained onto
ours: their text and JSON come straight from the server.
"""

from __future__ import annotations

import math
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
import structlog
import urllib3

from proxy.config.settings import KUBERNETES_TOKEN_FILE, CredentialSettings, VaultSettings
from proxy.keys.outbound import vault_http_session
from proxy.keys.sources.base import SecretRead, SourceError, SourceKind, key_problem
from proxy.keys.sources.files import permission_problem
from proxy.masking.secrets import SecretRegistry, masked_url

log = structlog.get_logger(__name__)

DEFAULT_TOKEN_FILE = Path("~/.vault-token")
# renew at about 2/3 of the TTL; the jitter keeps replicas from renewing in step.
RENEW_AT_FRACTION = 2 / 3
RENEW_JITTER = 0.1
MIN_MAINTENANCE_SECONDS = 1.0

# Vault's response to a bad, expired or revoked token, or a refused renewal or login.
# OpenBao responds 403 (never 401) to a bad token, 400 to "lease is not renewable".
_REFUSALS = (
    hvac.exceptions.Forbidden,
    hvac.exceptions.Unauthorized,
    hvac.exceptions.InvalidRequest,
    hvac.exceptions.InvalidPath,
)


class VaultError(SourceError):
    """A Vault operation failed; `reason` is safe to log and show, `kind` is what happened."""


@dataclass(frozen=True)
class _TokenState:
    """What is known about the token in use; the token itself lives only in the client."""

    source: str  # "$VAULT_TOKEN", a token file, or "approle login" ...
    ttl: float  # seconds left when learned; 0 means it never expires
    renewable: bool
    full_ttl: float  # what a renewal grants while the max TTL is far; less means it is near
    due: float  # time.monotonic() of the next renewal or re-login; inf for never


def _due(ttl: float) -> float:
    if ttl <= 0:
        return math.inf
    delay = ttl * RENEW_AT_FRACTION * random.uniform(1 - RENEW_JITTER, 1 + RENEW_JITTER)
    return time.monotonic() + max(MIN_MAINTENANCE_SECONDS, delay)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _warn_if_exposed(path: Path, what: str) -> None:
    """Warn when every user may read (or write) a file holding a Vault secret; it is still
    used (Vault Agent and Kubernetes write such files), but every local user has it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    problem = permission_problem(mode, "group")
    if problem is not None:
        log.warning(
            "secret_file_exposed",
            file=str(path),
            reason=f"the {what} file is {problem} (mode {mode & 0o7777:04o}); chmod 600,"
            " or 640 for a group",
        )


class VaultSession:
    """One authenticated hvac client: login, token renewal, KV reads.

    Vault's HTTP API as OpenBao also serves it: the auth methods' login endpoints
    (https://developer.hashicorp.com/vault/api-docs/auth), `auth/token/renew-self` and
    `lookup-self`, and KV v1/v2 reads (.../api-docs/secret/kv). Blocking: call it from a
    worker thread. Every failure is a VaultError whose reason holds no secret.
    """

    def __init__(self, settings: VaultSettings, secrets: SecretRegistry) -> None:
        self._settings = settings
        self._auth = settings.auth
        self._secrets = secrets
        verify: bool | str = True
        if settings.skip_verify:
            verify = False
            # The operator chose this (VAULT_SKIP_VERIFY): say it once, not on every request.
            host = urlsplit(settings.url).hostname or ""
            warnings.filterwarnings(
                "ignore",
                message=f"Unverified HTTPS request is being made to host '{re.escape(host)}'",
                category=urllib3.exceptions.InsecureRequestWarning,
            )
            log.warning("vault_tls_verification_disabled", url=settings.url)
        elif settings.ca_cert is not None:
            verify = str(settings.ca_cert)
        # token="" rather than None: hvac would otherwise take $VAULT_TOKEN or ~/.vault-token
        # behind our back, and the auth method decides where the token comes from.
        self._client: Any = hvac.Client(
            url=settings.url,
            token="",
            verify=verify,
            timeout=settings.timeout_seconds,
            namespace=settings.namespace or None,
            session=vault_http_session(settings.proxy, verify),
        )
        self._lock = threading.RLock()
        self._token: _TokenState | None = None
        self._generation = 0  # bumped by every login, so concurrent 403s re-login only once

    def __repr__(self) -> str:
        return f"VaultSession({self._settings.url}, {self.auth_summary})"

    @property
    def auth_summary(self) -> str:
        """How this session authenticates, for logs: method, mount, role; never a secret."""
        method, mount = self._auth.method, self._auth.effective_mount
        if method == "token":
            if self._token is not None:
                return f"token (from {self._token.source})"
            return f"token ($VAULT_TOKEN, else {self._token_file()})"
        if method == "approle":
            return f"approle (mount {mount})"
        return f"{method} (role {self._auth.role}, mount {mount})"

    def close(self) -> None:
        """Close the HTTP connections to Vault."""
        self._client.adapter.close()

    # -- login -------------------------------------------------------------------------

    def login(self) -> None:
        """Obtain a token with the configured auth method, or raise VaultError."""
        with self._lock:
            self._login_locked()

    def _login_locked(self) -> None:
        if self._auth.method == "token":
            self._use_given_token()
        else:
            self._log_in_with_method()
        self._generation += 1

    def _token_file(self) -> Path:
        return (self._auth.token_file or DEFAULT_TOKEN_FILE).expanduser()

    def _read_file(self, path: Path, what: str, *, secret: bool) -> str:
        path = path.expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VaultError(f"the {what} file {path} does not exist", kind="auth_failed") from None
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise VaultError(
                f"the {what} file {path} cannot be read ({detail})", kind="auth_failed"
            ) from None
        if secret:
            self._secrets.add(text)
            _warn_if_exposed(path, what)
        value = text.strip()
        if secret:
            self._secrets.add(value)
        if not value:
            raise VaultError(f"the {what} file {path} is empty", kind="auth_failed")
        return value

    def _use_given_token(self) -> None:
        env_token = os.environ.get("VAULT_TOKEN", "")
        self._secrets.add(env_token)
        if env_token.strip():
            token, source = env_token.strip(), "$VAULT_TOKEN"
            self._secrets.add(token)
        else:
            path = self._token_file()
            if not path.exists():
                raise VaultError(
                    f"no Vault token: VAULT_TOKEN is not set and {path} does not exist",
                    kind="auth_failed",
                )
            token, source = self._read_file(path, "Vault token", secret=True), str(path)
        previous = self._client.token
        self._client.token = token
        try:
            response = self._call(self._client.auth.token.lookup_self)
        except _REFUSALS:
            self._client.token = previous
            raise VaultError(
                f"Vault refused the token from {source}: it is invalid, expired or revoked",
                kind="auth_failed",
            ) from None
        except VaultError:
            self._client.token = previous
            raise
        data = _mapping(_mapping(response).get("data"))
        ttl = float(data.get("ttl") or 0)
        full_ttl = float(data.get("creation_ttl") or ttl)
        renewable = bool(data.get("renewable"))
        self._token = _TokenState(source, ttl, renewable, full_ttl, _due(ttl))
        log.debug("vault_token_loaded", method="token", ttl=ttl, renewable=renewable)

    def _log_in_with_method(self) -> None:
        auth, method = self._auth, self._auth.method
        mount = auth.effective_mount
        login: Callable[[], Any]
        if method == "approle":
            role_id = auth.role_id
            if role_id is None:
                assert auth.role_id_file is not None  # settings guarantee one of the two
                role_id = self._read_file(auth.role_id_file, "AppRole role id", secret=False)
            assert auth.secret_id_file is not None
            secret_id = self._read_file(auth.secret_id_file, "AppRole secret id", secret=True)

            def login() -> Any:
                return self._client.auth.approle.login(
                    role_id, secret_id, use_token=False, mount_point=mount
                )

        elif method == "kubernetes":
            jwt = self._read_file(
                auth.jwt_file or KUBERNETES_TOKEN_FILE, "service account token", secret=True
            )

            def login() -> Any:
                return self._client.auth.kubernetes.login(
                    auth.role, jwt, use_token=False, mount_point=mount
                )

        else:
            assert auth.jwt_file is not None
            jwt = self._read_file(auth.jwt_file, "JWT", secret=True)

            def login() -> Any:
                return self._client.auth.jwt.jwt_login(auth.role, jwt, use_token=False, path=mount)

        try:
            response = self._call(login)
        except _REFUSALS as exc:
            raise VaultError(
                f"Vault refused the {method} login at auth/{mount} ({_answer(exc)});"
                " check the role and its credentials",
                kind="auth_failed",
                detail=_server_text(exc),
            ) from None
        grant = _mapping(_mapping(response).get("auth"))
        token = grant.get("client_token")
        if not isinstance(token, str) or not token:
            raise VaultError(
                f"Vault answered the {method} login at auth/{mount} without a token",
                kind="auth_failed",
            )
        self._secrets.add(token)
        self._client.token = token
        ttl = float(grant.get("lease_duration") or 0)
        renewable = bool(grant.get("renewable"))
        self._token = _TokenState(f"{method} login", ttl, renewable, ttl, _due(ttl))
        log.debug("vault_logged_in", method=method, mount=mount, ttl=ttl, renewable=renewable)

    # -- token upkeep ------------------------------------------------------------------

    def token_maintenance_due_in(self) -> float:
        """Seconds until maintain_token() should run: about 2/3 of the TTL, +-10%; 0 when
        there is no token yet; math.inf for a token that never expires (a root token)."""
        state = self._token
        if state is None:
            return 0.0
        return max(0.0, state.due - time.monotonic())

    def maintain_token(self) -> float:
        """Renew the token, or log in again when it cannot be renewed or its max TTL is near.

        With the token method "logging in again" re-reads $VAULT_TOKEN or the token file,
        which an agent may have rotated. Returns token_maintenance_due_in(); raises
        VaultError when neither works (retry after backoff_seconds()).
        """
        with self._lock:
            state = self._token
            if state is None:
                why: str | None = "no token yet"
            elif not state.renewable:
                why = "the token is not renewable"
            else:
                why = self._renew(state)
            if why is not None:
                log.debug("vault_token_relogin", method=self._auth.method, why=why)
                self._login_locked()
        return self.token_maintenance_due_in()

    def _renew(self, state: _TokenState) -> str | None:
        """Renew the token; None when renewed in full, else why a new login is needed."""
        try:
            response = self._call(self._client.auth.token.renew_self)
        except _REFUSALS:
            return "Vault refused the renewal"
        grant = _mapping(_mapping(response).get("auth"))
        ttl = float(grant.get("lease_duration") or 0)
        renewable = bool(grant.get("renewable"))
        self._token = replace(state, ttl=ttl, renewable=renewable, due=_due(ttl))
        log.debug("vault_token_renewed", method=self._auth.method, ttl=ttl, renewable=renewable)
        if ttl < state.full_ttl:
            # Vault granted less than a full TTL: the max TTL is near, renewing is over.
            return "the token's max TTL is near"
        return None

    # -- reading keys ------------------------------------------------------------------

    def read_key(self, credential: CredentialSettings) -> SecretRead:
        """Read and check the key of one credential, or raise VaultError.

        A 403 may mean the token expired: log in again once, then retry once.
        """
        with self._lock:
            if self._token is None:
                self._login_locked()
        generation = self._generation
        try:
            return self._read_key_once(credential)
        except hvac.exceptions.Forbidden:
            pass
        with self._lock:
            if self._generation == generation:  # no other thread has logged in since
                log.debug("vault_read_forbidden_relogin", method=self._auth.method)
                self._login_locked()
        try:
            return self._read_key_once(credential)
        except hvac.exceptions.Forbidden:
            raise VaultError(
                f"permission denied reading {credential.mount}/{credential.path}",
                kind="denied",
            ) from None

    def read_fields(
        self, mount: str, path: str, kv_version: int, fields: Sequence[str]
    ) -> dict[str, str]:
        """String fields of one KV secret that is not an API key (the forward proxy's CA).

        Every value is remembered as a secret. Raises VaultError naming what is missing.
        """
        with self._lock:
            if self._token is None:
                self._login_locked()
        where = f"{mount}/{path}"
        kv = self._client.secrets.kv
        try:
            if kv_version == 2:
                answer = self._call(
                    kv.v2.read_secret_version,
                    path=path,
                    mount_point=mount,
                    raise_on_deleted_version=True,
                )
                data = _mapping(_mapping(_mapping(answer).get("data")).get("data"))
            else:
                answer = self._call(kv.v1.read_secret, path=path, mount_point=mount)
                data = _mapping(_mapping(answer).get("data"))
        except hvac.exceptions.Forbidden:
            raise VaultError(f"permission denied reading {where}", kind="denied") from None
        except hvac.exceptions.InvalidPath:
            raise VaultError(f"no secret at {where}", kind="not_found") from None
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Unauthorized) as exc:
            raise VaultError(
                f"Vault refused to read {where} ({_answer(exc)})",
                kind="invalid",
                detail=_server_text(exc),
            ) from None
        found: dict[str, str] = {}
        for name in fields:
            value = data.get(name)
            if isinstance(value, str):
                self._secrets.add(value)
            if not isinstance(value, str) or not value.strip():
                raise VaultError(f"{where} has no text field {name!r}", kind="not_found")
            found[name] = value
        return found

    def _read_key_once(self, credential: CredentialSettings) -> SecretRead:
        where = f"{credential.mount}/{credential.path}"
        kv = self._client.secrets.kv
        try:
            if credential.kv_version == 2:
                response = self._call(
                    kv.v2.read_secret_version,
                    path=credential.path,
                    mount_point=credential.mount,
                    raise_on_deleted_version=True,
                )
            else:
                response = self._call(
                    kv.v1.read_secret, path=credential.path, mount_point=credential.mount
                )
        except hvac.exceptions.InvalidPath as exc:
            raise VaultError(self._missing(where, credential, exc), kind="not_found") from None
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Unauthorized) as exc:
            raise VaultError(
                f"Vault refused to read {where} ({_answer(exc)})",
                kind="invalid",
                detail=_server_text(exc),
            ) from None

        data = _mapping(_mapping(response).get("data"))
        version: int | None = None
        created: datetime | None = None
        if credential.kv_version == 2:
            metadata = _mapping(data.get("metadata"))
            raw_version = metadata.get("version")
            version = raw_version if isinstance(raw_version, int) else None
            created = _parse_time(metadata.get("created_time"))
            data = _mapping(data.get("data"))

        if credential.field not in data:
            # Field names are not secrets, but a key pasted as a name would be: long ones hide.
            names = sorted(str(n) if len(str(n)) <= 32 else "(a long name)" for n in data)
            fields = ", ".join(names[:10]) or "none"
            raise VaultError(
                f"{where} has no field {credential.field!r} (its fields: {fields})",
                kind="not_found",
            )
        raw = data[credential.field]
        self._secrets.add(str(raw))
        where_field = f"the value at {where} field {credential.field}"
        if not isinstance(raw, str):
            raise VaultError(f"{where_field} is not a string", kind="invalid")
        value = raw.strip()
        self._secrets.add(value)
        problem = key_problem(value)
        if problem is not None:
            named = f" (KV version {version})" if version is not None else ""
            raise VaultError(
                f"{where_field}{named} does not look like an API key ({problem})",
                kind="invalid",
                version=version,
            )
        log.debug("vault_key_read", mount=credential.mount, path=credential.path, version=version)
        return SecretRead(value=value, version=version, created_time=created)

    @staticmethod
    def _missing(where: str, credential: CredentialSettings, exc: Exception) -> str:
        body = _mapping(getattr(exc, "json", None))
        metadata = _mapping(_mapping(body.get("data")).get("metadata"))
        version = metadata.get("version")
        if metadata.get("destroyed"):
            return f"the latest version ({version}) of {where} is destroyed"
        if metadata.get("deletion_time"):
            return f"the latest version ({version}) of {where} is deleted"
        return f"no secret at {where} (KV version {credential.kv_version} mount)"

    # -- mapping failures --------------------------------------------------------------

    def _call(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one hvac call. Transport trouble and unavailability become VaultError;
        refusals (403, 404, 400) stay hvac exceptions, for the caller to name."""
        url = self._settings.url
        try:
            return operation(*args, **kwargs)
        except requests.exceptions.SSLError:
            detail = "TLS failed: check vault.ca_cert, VAULT_CACERT or the server certificate"
        except requests.exceptions.ProxyError:
            detail = f"the proxy {masked_url(self._settings.proxy)} (vault.proxy) failed"
        except requests.exceptions.ConnectTimeout:
            detail = f"no connection within {self._settings.timeout_seconds:g}s"
        except requests.exceptions.ConnectionError as exc:
            text = str(exc)
            if "Connection refused" in text:
                detail = "connection refused"
            elif "resolve" in text or "Name or service not known" in text:
                detail = "its host name does not resolve"
            else:
                detail = "the connection failed"
        except requests.exceptions.Timeout:
            detail = f"no response within {self._settings.timeout_seconds:g}s"
        except requests.exceptions.RequestException as exc:
            detail = f"the request failed: {type(exc).__name__}"
        except hvac.exceptions.VaultDown as exc:
            if "sealed" in str(getattr(exc, "errors", "") or "").lower():
                raise VaultError("Vault is sealed", kind="sealed") from None
            raise self._server_error(503, exc) from None
        except hvac.exceptions.VaultNotInitialized:
            raise VaultError("Vault is not initialized", kind="sealed") from None
        except hvac.exceptions.RateLimitExceeded as exc:
            raise self._server_error(429, exc) from None
        except hvac.exceptions.InternalServerError as exc:
            raise self._server_error(500, exc) from None
        except hvac.exceptions.BadGateway as exc:
            raise self._server_error(502, exc) from None
        except hvac.exceptions.UnexpectedError as exc:
            raise self._server_error(None, exc) from None
        raise VaultError(f"Vault at {url} is unreachable ({detail})", kind="unreachable")

    def _server_error(self, status: int | None, exc: Exception) -> VaultError:
        answered = f"answered {status}" if status else "answered with an unexpected error"
        return VaultError(
            f"Vault at {self._settings.url} {answered}; retry later, or check the Vault server",
            kind="unreachable",
            detail=_server_text(exc),
        )


class VaultKeySource:
    """One credential's key in Vault KV, read through the session all Vault keys share."""

    kind: SourceKind = "vault"
    poll_seconds: float | None = None
    calls_per_read = 2  # a 403 is read once more after logging in again

    def __init__(self, session: VaultSession, credential: CredentialSettings) -> None:
        self.session = session
        self._credential = credential
        self.where = f"{credential.mount}/{credential.path}"

    def __repr__(self) -> str:
        return f"VaultKeySource({self.where})"

    def read(self) -> SecretRead:
        """Read the key through the shared session (logging in first if needed)."""
        return self.session.read_key(self._credential)

    def changed(self) -> bool:
        """Never known without a read."""
        return False

    def close(self) -> None:
        """The shared session is closed by whoever made it."""


_ANSWERS: dict[type[Exception], str] = {
    hvac.exceptions.InvalidRequest: "HTTP 400, invalid request",
    hvac.exceptions.Unauthorized: "HTTP 401, unauthorized",
    hvac.exceptions.Forbidden: "HTTP 403, permission denied",
    hvac.exceptions.InvalidPath: "HTTP 404, not found",
}


def _answer(exc: Exception) -> str:
    """How Vault refused, in the proxy's words: the HTTP status and its meaning."""
    return next(
        (text for kind, text in _ANSWERS.items() if isinstance(exc, kind)),
        f"{type(exc).__name__}",
    )


def _server_text(exc: Exception) -> str | None:
    """Vault's own error text, for the log only (SourceError masks it)."""
    errors = getattr(exc, "errors", None)
    if not errors or not isinstance(errors, list):
        return None
    return "; ".join(str(error) for error in errors)
