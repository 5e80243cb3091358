"""A key in Azure Key Vault, read with Microsoft's own SDK (azure-keyvault-secrets and
azure-identity).

Imported only when a credential uses this source: the SDK is an optional extra
(`pip install 'publer-proxy[azure]'`). Its calls block, so the credential store runs
`read()` in a worker thread.

Each read is GET {vault}/secrets/{name}[/{version}]: the latest version unless the
credential pins one, so a new latest version is a rotation here. Key Vault answers an
expired or not-yet-valid version with 200 (its `exp` and `nbf` are informational; only a
disabled version is refused, 403 SecretDisabled), so the version's attributes are
checked here, and a version that is disabled, expired or not yet valid is never used.
A disabled latest version is not replaced by an older one: the read fails. A deleted
(soft-deleted) secret answers 404 like a missing one; the proxy never recovers or purges.

Authentication is Key Vault's challenge: the first request goes without a token, the
401's `WWW-Authenticate` names the tenant and the resource, and the SDK asks the identity
for a token for that resource; the SDK checks that the resource's host is a parent of the
vault's (`verify_challenge_resource`, left on), so a sovereign cloud's vault
(vault.azure.cn, vault.usgovcloudapi.net) works from its URL alone. The SDK's
BearerTokenCredentialPolicy keeps the token and asks for a new one five minutes before
it expires; every token it gets is registered as a secret for redaction.

The SDK is configured in this one place; each setting that differs from its default:
- the transport is a `requests.Session` of our own with `trust_env = False`: azure-core
  would otherwise read HTTP(S)_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE and ~/.netrc, for the
  vault client and for every identity's own token requests. The same session serves the
  identity, so a named `proxy` carries the token requests too; it is set for https only,
  so the managed-identity endpoint (plain http on a link-local or loopback address) is
  never reached through a proxy.
- `ca_file` replaces the system's trust store (a stand-in's CA); `connect_to` dials
  another address for https names while TLS still checks the name (curl's --connect-to).
- `disable_instance_discovery` when the sign-in host is not one of Microsoft's: MSAL
  would otherwise ask login.microsoftonline.com about a private authority (Azure Stack,
  a stand-in) that it cannot know.
- `retry_status=0`: a 429 or 5xx comes straight back to the credential store, which
  backs off and honours Retry-After within the stale window; the SDK would otherwise sleep
  in the worker thread for as long as Retry-After says. One retry on a failed connection.
- `connection_timeout`/`read_timeout`: the credential's `timeout_seconds`, not 300 s.
- no `logging_enable` anywhere, and the `azure` and `msal` loggers are kept at WARNING
  (proxy/logs.py): the SDK's network trace logs whole answers (the secret) and the
  Authorization header at DEBUG, and its HttpLoggingPolicy logs every URL at INFO.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import structlog
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.keyvault.secrets import SecretClient
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from proxy.config.settings import AzureCredentialSettings, AzureIdentitySettings
from proxy.keys.sources.base import SecretRead, SourceError, SourceKind, key_problem
from proxy.masking.secrets import SecretRegistry

log = structlog.get_logger(__name__)

# The sign-in host of each cloud, by the suffix of its vaults' host names.
CLOUD_AUTHORITIES = (
    ("vault.azure.cn", "https://login.chinacloudapi.cn"),
    ("vault.usgovcloudapi.net", "https://login.microsoftonline.us"),
    ("vault.azure.net", "https://login.microsoftonline.com"),
)
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
# Microsoft's own sign-in hosts, which MSAL's instance discovery knows.
MICROSOFT_SIGN_IN_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.us",
        "login.usgovcloudapi.net",
    }
)
# Environment values that are secrets the SDK reads by itself: redacted wherever they land.
SECRET_VARIABLES = (
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "IDENTITY_HEADER",
    "MSI_SECRET",
)
_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_.]{0,63}$")
_OAUTH_CODE = re.compile(
    r"\b(invalid_client|unauthorized_client|invalid_grant|invalid_scope|invalid_request"
    r"|invalid_resource|temporarily_unavailable|interaction_required)\b"
)
_AADSTS = re.compile(r"\bAADSTS\d{4,8}\b")
_TLS_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "SSLError", "CertificateError", "match")
# Entra ID's codes that say what to fix, in the proxy's words.
_AADSTS_MEANING = {
    "AADSTS7000215": "the client secret is wrong",
    "AADSTS7000222": "the client secret has expired",
    "AADSTS700016": "no application with this client_id in the tenant",
    "AADSTS90002": "no such tenant",
    "AADSTS700024": "the client assertion is not valid",
    "AADSTS700027": "the certificate is not one the application has",
    "AADSTS70021": "no federated credential matches the workload identity's token",
}
_IDENTITY_NAMES = {
    "EnvironmentCredential": "environment",
    "ClientSecretCredential": "client_secret",
    "CertificateCredential": "client_certificate",
    "WorkloadIdentityCredential": "workload_identity",
    "ManagedIdentityCredential": "managed_identity",
    "AzureCliCredential": "azure_cli",
}

for _sdk in ("azure", "msal"):
    logging.getLogger(_sdk).setLevel(max(logging.getLogger(_sdk).level, logging.WARNING))


def cloud_authority(vault_url: str) -> str:
    """The sign-in host of the cloud a vault belongs to (by its host name's suffix)."""
    host = (urlsplit(vault_url).hostname or "").lower()
    for suffix, authority in CLOUD_AUTHORITIES:
        if host == suffix or host.endswith("." + suffix):
            return authority
    return DEFAULT_AUTHORITY


Dial = Callable[[str], "tuple[str, int] | None"]


def dial_rule(connect_to: str | dict[str, str] | None) -> Dial:
    """Where to dial an https name instead of resolving it, or None to resolve it:
    "host:port" for every DNS name but localhost, {name: "host:port"} for those names."""

    def address(value: str) -> tuple[str, int]:
        host, _, port = value.rpartition(":")
        return host.strip("[]"), int(port)

    if connect_to is None:
        return lambda _name: None
    if isinstance(connect_to, dict):
        table = {name: address(value) for name, value in connect_to.items()}
        return lambda name: table.get(name.lower().rstrip("."))
    everywhere = address(connect_to)

    def dial(name: str) -> tuple[str, int] | None:
        literal = name.replace(".", "").isdigit() or ":" in name
        return None if literal or name.lower() == "localhost" else everywhere

    return dial


class DialAdapter(HTTPAdapter):
    """requests' adapter that dials where `dial` says for an https name while TLS checks
    the certificate against the name in the URL, and Host names it too."""

    def __init__(self, dial: Dial, **kwargs: Any) -> None:
        self._dial = dial
        super().__init__(**kwargs)

    def build_connection_pool_key_attributes(  # type: ignore[override]
        self, request: requests.PreparedRequest, verify: bool | str, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The pool of the dialled address, keyed and checked by the URL's name."""
        found = super().build_connection_pool_key_attributes(request, verify, cert)
        host_params: dict[str, Any] = dict(found[0])
        pool_kwargs: dict[str, Any] = dict(found[1])
        name = host_params["host"]
        target = self._dial(name) if host_params["scheme"] == "https" else None
        if target is not None:
            # urllib3's pool: SNI and the certificate check use the name, not the address.
            pool_kwargs.update(server_hostname=name, assert_hostname=name)
            host_params.update(host=target[0], port=target[1])
        return host_params, pool_kwargs

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        """Send, with Host naming the URL's authority when the address is dialled."""
        url = urlsplit(request.url or "")
        if url.scheme == "https" and self._dial(url.hostname or "") is not None:
            request.headers["Host"] = url.netloc
        return super().send(request, *args, **kwargs)


def make_session(settings: AzureCredentialSettings) -> requests.Session:
    """The one HTTP session of a credential's vault and identity calls."""
    session = requests.Session()
    session.trust_env = False  # no HTTP(S)_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, ~/.netrc
    # A named proxy carries https only: the managed-identity endpoint is plain http.
    session.proxies = {"https": settings.proxy} if settings.proxy else {}
    dial = dial_rule(settings.connect_to)
    no_retries = Retry(total=False, redirect=False, raise_on_status=False)
    session.mount("https://", DialAdapter(dial, max_retries=no_retries))
    session.mount("http://", HTTPAdapter(max_retries=no_retries))
    return session


def pipeline_options(
    settings: AzureCredentialSettings, session: requests.Session
) -> dict[str, Any]:
    """The azure-core settings of every pipeline of this credential (vault and identity)."""
    transport = RequestsTransport(
        session=session,
        session_owner=False,
        use_env_settings=False,
        connection_timeout=settings.timeout_seconds,
        read_timeout=settings.timeout_seconds,
        connection_verify=str(settings.ca_file) if settings.ca_file else True,
    )
    return {
        "transport": transport,
        "retry_total": 1,
        "retry_connect": 1,
        "retry_read": 1,
        "retry_status": 0,
        "retry_backoff_factor": 0.5,
        "retry_backoff_max": 2,
        "logging_enable": False,
    }


class RecordingIdentity:
    """Wraps an azure-identity credential: registers every access token it gives as a
    secret, and remembers which identity gave it and the last failure."""

    def __init__(self, inner: Any, label: str, secrets: SecretRegistry) -> None:
        self.inner = inner
        self.label = label
        self.used: str | None = None
        self.failure: BaseException | None = None
        self._secrets = secrets

    def _got(self, token: Any) -> Any:
        self._secrets.add(token.token)
        self.failure = None
        self.used = self._which()
        return token

    def _which(self) -> str:
        if self.label != "default":
            return self.label
        found = getattr(self.inner, "_successful_credential", None)
        name = _IDENTITY_NAMES.get(type(found).__name__) if found is not None else None
        inner = getattr(found, "_credential", None)  # what the environment configured
        if name == "environment" and inner is not None:
            name = f"environment {_IDENTITY_NAMES.get(type(inner).__name__, 'identity')}"
        return f"default chain: {name}" if name else "default chain"

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        """azure-core's TokenCredential."""
        try:
            return self._got(self.inner.get_token(*scopes, **kwargs))
        except BaseException as exc:
            self.failure = exc
            raise

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        """azure-core's SupportsTokenInfo, which the Key Vault client prefers."""
        try:
            return self._got(self.inner.get_token_info(*scopes, options=options))
        except BaseException as exc:
            self.failure = exc
            raise

    def close(self) -> None:
        """Close the identity's own pipeline."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def make_identity(
    settings: AzureCredentialSettings, options: dict[str, Any], secrets: SecretRegistry
) -> RecordingIdentity:
    """The identity named under `credential` (or the SDK's standard chain)."""
    import azure.identity as identity

    chosen: AzureIdentitySettings = settings.credential
    authority = (
        chosen.authority
        or os.environ.get("AZURE_AUTHORITY_HOST")
        or cloud_authority(settings.vault_url)
    )
    signed_in = {**options, "authority": authority}
    if (urlsplit(authority).hostname or "").lower() not in MICROSOFT_SIGN_IN_HOSTS:
        signed_in["disable_instance_discovery"] = True
    kind = chosen.type
    inner: Any
    if kind == "client_secret":
        assert chosen.tenant_id and chosen.client_id and chosen.client_secret_file
        secret = _secret_file(chosen.client_secret_file, "credential.client_secret_file")
        secrets.add(secret)
        inner = identity.ClientSecretCredential(
            chosen.tenant_id, chosen.client_id, secret, **signed_in
        )
    elif kind == "client_certificate":
        assert chosen.tenant_id and chosen.client_id and chosen.certificate_file
        inner = identity.CertificateCredential(
            chosen.tenant_id, chosen.client_id, str(chosen.certificate_file), **signed_in
        )
    elif kind == "workload_identity":
        token_file = chosen.token_file or os.environ.get("AZURE_FEDERATED_TOKEN_FILE")
        inner = identity.WorkloadIdentityCredential(
            tenant_id=chosen.tenant_id,
            client_id=chosen.client_id,
            token_file_path=str(token_file) if token_file else None,
            **signed_in,
        )
    elif kind == "managed_identity":
        inner = identity.ManagedIdentityCredential(client_id=chosen.client_id, **options)
    elif kind == "azure_cli":
        inner = identity.AzureCliCredential(
            tenant_id=chosen.tenant_id or "",
            process_timeout=int(max(settings.timeout_seconds, 10)),
        )
    elif kind == "environment":
        inner = identity.EnvironmentCredential(**signed_in)
    else:
        # The development tools that need a person (VS Code, PowerShell, azd, a browser,
        # a broker) are left out: a server has none of them.
        inner = identity.DefaultAzureCredential(
            exclude_visual_studio_code_credential=True,
            exclude_powershell_credential=True,
            exclude_developer_cli_credential=True,
            exclude_shared_token_cache_credential=True,
            exclude_interactive_browser_credential=True,
            exclude_broker_credential=True,
            managed_identity_client_id=chosen.client_id,
            workload_identity_tenant_id=chosen.tenant_id,
            **signed_in,
        )
    return RecordingIdentity(inner, kind, secrets)


def _secret_file(path: Path, key: str) -> str:
    try:
        value = path.read_text("utf-8").strip()
    except OSError as exc:
        raise SourceError(
            f"{key} {path} cannot be read ({exc.strerror}); check the path and that the"
            " proxy's user may read it",
            kind="auth_failed",
        ) from None
    if not value:
        raise SourceError(f"{key} {path} is empty", kind="auth_failed")
    return value


class AzureKeySource:
    """Reads one credential's key from Key Vault (the latest version, or a pinned one)."""

    kind: SourceKind = "azure_key_vault"
    poll_seconds: float | None = None
    # The challenge, a token request and the read, each retried once on a failed
    # connection: what one read can cost the vault and the identity endpoint together.
    calls_per_read = 4

    def __init__(self, settings: AzureCredentialSettings, secrets: SecretRegistry) -> None:
        self._settings = settings
        self._secrets = secrets
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._client: Any = None
        self._identity: RecordingIdentity | None = None
        self._session: requests.Session | None = None
        self._last_version: str | None = None
        self._announced: str | None = None
        version = f" version {settings.version}" if settings.version else ""
        self._secret = f"secret {settings.secret_name}{version} in {settings.vault_url}"
        self.where = f"{self._secret} as {settings.credential.type}"

    def __repr__(self) -> str:
        return f"AzureKeySource({self.where})"

    def _connect(self) -> Any:
        """The Key Vault client, made on first use (in a worker thread)."""
        with self._lock:
            if self._client is None:
                for name in SECRET_VARIABLES:
                    self._secrets.add(os.environ.get(name, ""))
                session = make_session(self._settings)
                options = pipeline_options(self._settings, session)
                identity = make_identity(self._settings, options, self._secrets)
                self._client = SecretClient(
                    self._settings.vault_url,
                    identity,
                    verify_challenge_resource=True,
                    **options,
                )
                self._session, self._identity = session, identity
            return self._client

    def read(self) -> SecretRead:
        """GET the secret's version, checked; raises SourceError. One read at a time: a
        background refresh and a re-read after Publer refused the key may overlap."""
        with self._reading:
            return self._read()

    def _read(self) -> SecretRead:
        settings = self._settings
        client = self._connect()
        identity = self._identity
        assert identity is not None
        self._remember_token_file()
        identity.failure = None
        try:
            secret = client.get_secret(settings.secret_name, settings.version)
        except (ClientAuthenticationError, ServiceRequestError, ServiceResponseError) as exc:
            if identity.failure is not None:
                raise self._identity_failed(identity.failure) from None
            if isinstance(exc, HttpResponseError):
                refused = self._refused(exc)
                if exc.status_code == 401:
                    self.close()  # as below: a refused token is never presented again
                raise refused from None
            raise self._unreachable(exc) from None
        except HttpResponseError as exc:
            refused = self._refused(exc)
            if exc.status_code == 401:
                # Key Vault refused a token the identity still holds as valid (revoked,
                # another tenant): start afresh so that it is never presented again.
                self.close()
            raise refused from None
        except ValueError:
            # The challenge named a resource that is not a parent of the vault's host.
            raise SourceError(
                f"the vault {settings.vault_url} asked for a token for another service; the"
                " SDK refused to send one: check vault_url",
                kind="invalid",
            ) from None
        self._announce(identity)
        props = secret.properties
        version = props.version
        self._secrets.add(secret.value or "")
        here = f"version {version} of {self._secret}"
        now = datetime.now(UTC)
        if props.enabled is False:
            raise SourceError(f"{here} is disabled", kind="disabled", drop_key=True)
        same = version == self._last_version
        if props.expires_on is not None and props.expires_on <= now:
            raise SourceError(
                f"{here} expired at {props.expires_on.isoformat()} (its exp attribute); put a"
                " new version in Key Vault",
                kind="expired",
                drop_key=same,
            )
        if props.not_before is not None and props.not_before > now:
            raise SourceError(
                f"{here} is not valid before {props.not_before.isoformat()} (its nbf attribute)",
                kind="not_yet_valid",
                drop_key=same,
            )
        value = (secret.value or "").strip()
        self._secrets.add(value)
        problem = key_problem(value)
        if problem is not None:
            raise SourceError(f"{here} does not hold an API key ({problem})", kind="invalid")
        self._last_version = version
        return SecretRead(
            value=value,
            version=version,
            created_time=props.created_on,
            not_after=props.expires_on,
        )

    def _remember_token_file(self) -> None:
        """Register the workload identity's federated token (Kubernetes rewrites the file
        as it renews it), which the SDK reads and sends by itself."""
        chosen = self._settings.credential
        if chosen.type not in ("workload_identity", "default"):
            return
        path = chosen.token_file or os.environ.get("AZURE_FEDERATED_TOKEN_FILE")
        if path:
            # A missing file is the SDK's to report, in its own failure.
            with contextlib.suppress(OSError):
                self._secrets.add(Path(path).read_text("utf-8").strip())

    def _announce(self, identity: RecordingIdentity) -> None:
        """Say once (and in `where`) which identity got the token."""
        used = identity.used or identity.label
        self.where = f"{self._secret} as {used}"
        if used != self._announced:
            self._announced = used
            log.info("azure_identity", vault=self._settings.vault_url, identity=used)

    def _identity_failed(self, exc: BaseException) -> SourceError:
        from azure.identity import CredentialUnavailableError

        chosen = self._settings.credential
        if isinstance(exc, SourceError):
            return exc
        text = str(getattr(exc, "message", "") or exc)
        # The chain reports "nothing to try" as a failure too; a refusal says so.
        nothing_found = chosen.type == "default" and "Authentication failed" not in text
        if isinstance(exc, CredentialUnavailableError) or nothing_found:
            if chosen.type == "default":
                return SourceError(
                    "no Azure identity found: the SDK's chain tried the environment"
                    " (AZURE_TENANT_ID, AZURE_CLIENT_ID with AZURE_CLIENT_SECRET or a"
                    " certificate), workload identity, managed identity and the Azure CLI;"
                    " provide one, or name it under credential.type",
                    kind="auth_failed",
                )
            return SourceError(
                f"the {chosen.type} identity is not available here; check the environment"
                " it needs, or name another under credential.type",
                kind="auth_failed",
            )
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            return SourceError(
                f"the Microsoft Entra sign-in endpoint is unreachable for the {chosen.type}"
                f" identity ({_network_detail(exc, self._settings.timeout_seconds)})",
                kind="unreachable",
            )
        if any(mark in text for mark in (*_TLS_FAILURES, "onnection", "timed out")):
            return SourceError(
                f"the Microsoft Entra sign-in endpoint is unreachable for the {chosen.type}"
                f" identity ({_network_detail(exc, self._settings.timeout_seconds)})",
                kind="unreachable",
            )
        codes = [m.group(0) for m in (_OAUTH_CODE.search(text), _AADSTS.search(text)) if m]
        meaning = next((_AADSTS_MEANING[c] for c in codes if c in _AADSTS_MEANING), None)
        said = f" ({', '.join(codes)}{': ' + meaning if meaning else ''})" if codes else ""
        return SourceError(
            f"Microsoft Entra ID refused to give the {chosen.type} identity a token for Key"
            f" Vault{said}; check its tenant_id, client_id and secret or certificate",
            kind="auth_failed",
        )

    def _unreachable(self, exc: BaseException) -> SourceError:
        detail = _network_detail(exc, self._settings.timeout_seconds)
        return SourceError(
            f"Key Vault {self._settings.vault_url} is unreachable ({detail})", kind="unreachable"
        )

    def _refused(self, exc: HttpResponseError) -> SourceError:
        status = exc.status_code or 0
        code, inner = _error_codes(exc)
        codes = "/".join(c for c in (code, inner) if c)
        said = f" ({codes})" if codes else ""
        status_and_codes = f"{status} {codes}".strip()
        if status == 429:
            retry_after = _retry_after(exc)
            wait = f"; it asked to wait {retry_after:g} s" if retry_after is not None else ""
            return SourceError(
                f"Key Vault {self._settings.vault_url} is throttling this identity (429){wait}",
                kind="throttled",
                retry_after=retry_after,
            )
        if status == 401:
            return SourceError(
                f"Key Vault {self._settings.vault_url} did not accept the access token of the"
                f" {self.where.rpartition(' as ')[2]} identity{said}; check the identity's"
                " tenant",
                kind="auth_failed",
            )
        if status == 403 and "SecretDisabled" in (code, inner):
            return SourceError(
                f"the {'pinned' if self._settings.version else 'latest'} version of"
                f" {self._secret} is disabled; enable it or put a new version in Key Vault",
                kind="disabled",
                drop_key=True,
            )
        if status == 403:
            return SourceError(
                f"Key Vault denied reading {self._secret}{said}; give the proxy's identity"
                " the Key Vault Secrets User role on the secret (or an access policy with"
                " get)",
                kind="denied",
            )
        if status == 404:
            return SourceError(
                f"no {self._secret} (missing, or deleted: a deleted secret must be recovered"
                f" in Key Vault; the proxy never recovers or purges one){said}",
                kind="not_found",
                drop_key=self._settings.version is not None,
            )
        if status >= 500:
            return SourceError(
                f"Key Vault {self._settings.vault_url} failed to answer ({status_and_codes})",
                kind="unreachable",
            )
        return SourceError(
            f"Key Vault refused to read {self._secret} ({status_and_codes})", kind="invalid"
        )

    def changed(self) -> bool:
        """Never known without a call: the refresh reads the latest version."""
        return False

    def close(self) -> None:
        """Close the client, the identity and their connections."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._identity is not None:
                self._identity.close()
                self._identity = None
            if self._session is not None:
                self._session.close()
                self._session = None


def _error_codes(exc: HttpResponseError) -> tuple[str | None, str | None]:
    """Key Vault's `error.code` and `error.innererror.code`, when they look like codes
    (a message is never repeated: it is the service's text, not the proxy's)."""
    try:
        body = json.loads(exc.response.text()) if exc.response is not None else None
    except (ValueError, TypeError):
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    inner = error.get("innererror")
    found = [error.get("code"), inner.get("code") if isinstance(inner, dict) else None]
    code, inner_code = (c if isinstance(c, str) and _CODE.match(c) else None for c in found)
    return code, inner_code


def _retry_after(exc: HttpResponseError) -> float | None:
    """Retry-After in seconds (RFC 9110: delay-seconds or an HTTP-date), or None."""
    response: Any = exc.response
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _network_detail(exc: BaseException, timeout: float) -> str:
    text = f"{type(exc).__name__} {exc}"
    if any(mark in text for mark in _TLS_FAILURES):
        return "TLS failed: the certificate is not trusted or not for this name"
    if "Timeout" in text or "timed out" in text:
        return f"no answer within {timeout:g}s"
    if "ProxyError" in text:
        return "the configured proxy cannot be reached or refused"
    return "the connection failed"
