"""The configuration file: a typed model, its loading and its error messages.

Every value that names a secret is a reference (a file path, a Vault path), never the
secret itself. Unknown keys are an error, so a typo never silently disables a check.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.config.hosts import parse_host, parse_origin
from proxy.masking.secrets import masked_url, url_secrets

DEFAULT_CONFIG_PATH = Path("config/proxy.yaml")
DEFAULT_UPSTREAM_URL = "https://app.publer.com"
DEFAULT_VAULT_URL = "http://127.0.0.1:8200"
DEFAULT_MAX_BODY_BYTES = 200 * 1024 * 1024
DEFAULT_ROTATE_AFTER_DAYS = 180

_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_WORKSPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# libyaml's parser under PyYAML's safe constructor: the same documents as yaml.safe_load,
# about ten times faster (a config of 1,000 routes: 0.25 s instead of 3.5 s).
SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per mistake."""

    def __init__(
        self,
        problems: list[str],
        partial: Settings | None = None,
        valid_keys: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        # What of the file did validate (top-level keys, defaults where absent), so a
        # reload can also name the keys that would need a restart.
        self.partial = partial
        self.valid_keys = valid_keys


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses, the hosts that only this machine reaches."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_url_parts(value: str, example: str) -> SplitResult:
    """The parts of an http or https URL that names a host, or ValueError with `example`."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be {example}")
    return parts


def check_digest(value: str) -> str:
    """A `sha256:<hex>` token digest, or ValueError saying how to make one."""
    if not _DIGEST_RE.match(value):
        raise ValueError(
            "must be 'sha256:' and 64 lower-case hex digits;"
            " make it with: echo -n TOKEN | publer-proxy hash-token"
        )
    return value


def check_host_names(values: list[str]) -> list[str]:
    """Host names a listener answers to: `name`, `name:port`, an IP address or `[v6]`."""
    for value in values:
        if parse_host(value) is None:
            raise ValueError(
                f"{value!r} is not a host name: write a name or address as clients send it"
                " in Host, optionally with a port (proxy, proxy:8080, 10.0.0.5, [::1]:8080),"
                " with no scheme or path"
            )
    return values


class ListenSettings(_Model):
    host: str = Field(default="127.0.0.1", description="The address the proxy listens on.")
    port: int = Field(default=8080, ge=0, le=65535, description="The port the proxy listens on.")
    unix_socket: Path | None = Field(
        default=None, description="A unix socket to listen on instead of host and port."
    )
    allowed_hosts: list[str] = Field(
        default=[],
        description="Names clients use in `Host` for this listener, besides its own: `localhost`,"
        " `127.0.0.1` and `[::1]` when it listens on loopback or `0.0.0.0`, and its own address"
        " (`proxy`, `proxy:8080`, `10.0.0.5`). `name` matches with no port or the listener's,"
        " `name:port` that port only; any other `Host` is refused with 421 `host_denied`. On a"
        " unix socket, `Host` is checked only when names are listed.",
    )

    _hosts = field_validator("allowed_hosts")(check_host_names)


def proxy_url(value: str | None) -> str | None:
    """Check an operator-named HTTP proxy URL: `http(s)://[user:password@]host[:port]`."""
    if value is None:
        return None
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise ValueError("has a port that is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an HTTP proxy URL such as http://proxy.internal:3128")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            "must be a proxy address only (scheme, optional user:password@, host, port),"
            " such as http://proxy.internal:3128"
        )
    return value


class UpstreamSettings(_Model):
    url: str = Field(
        default=DEFAULT_UPSTREAM_URL,
        description="The only origin keys are ever sent to; must be `https://` unless loopback.",
    )
    # An HTTP proxy named on purpose; environment proxy variables are never used.
    proxy: str | None = Field(
        default=None,
        repr=False,
        description="An HTTP proxy to reach Publer through, `http://[user:password@]host:port`;"
        " the environment's proxy variables are never used (see the security model). The"
        " forwarding hop and `check --online` use it (a CONNECT tunnel to an HTTPS Publer)."
        " Default: none (direct).",
    )
    # Publer's guide: always HTTPS. Plain HTTP to a non-loopback host needs this loud opt-out.
    insecure_allow_plain_http: bool = Field(
        default=False,
        description="Allow `http://` to a non-loopback upstream (warned at every start).",
    )
    ca_file: Path | None = Field(
        default=None,
        description="Trust this CA for the upstream only. Default: the system's CAs.",
    )
    connect_timeout_seconds: PositiveFloat = Field(
        default=10.0, description="Seconds to connect to the upstream, then 502."
    )
    read_timeout_seconds: PositiveFloat = Field(
        default=120.0, description="Seconds to wait for the upstream's answer, then 504."
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        gt=0,
        description="Larger request bodies get 413, while streaming (200 MiB by default).",
    )
    max_connections: int = Field(
        default=100,
        gt=0,
        description="Connections to Publer; a request that finds all busy waits up to"
        " `connect_timeout_seconds`, then gets 503 `upstream_busy`.",
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=5,
        description="GET and HEAD retries on connect errors and on 502, 503 and 504.",
    )
    # Dial this host:port instead of resolving the origin's name; TLS still checks the
    # name (curl's --connect-to): a stand-in of Publer reached by its real name.
    connect_to: str | None = Field(
        default=None,
        description="`host:port` to dial instead of resolving the upstream's name; TLS still"
        " checks the name (a stand-in reached as `app.publer.com`).",
    )

    @field_validator("connect_to")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be host:port, such as 127.0.0.1:8443")
        return value

    @field_validator("url")
    @classmethod
    def _origin_only(cls, value: str) -> str:
        parts = _http_url_parts(value, "an http(s) origin such as https://app.publer.com")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(
                "must be an origin only (scheme, host, port), such as https://app.publer.com;"
                " the /api/v1 path comes from the client's request"
            )
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        return proxy_url(value)

    @model_validator(mode="after")
    def _https_unless_loopback(self) -> UpstreamSettings:
        parts = urlsplit(self.url)
        if (
            parts.scheme == "http"
            and not is_loopback_host(parts.hostname or "")
            and not self.insecure_allow_plain_http
        ):
            raise ValueError(
                f"upstream.url {self.url} is plain HTTP to a non-loopback host, which would send"
                " the API key in clear text; use https://, or set"
                " upstream.insecure_allow_plain_http: true if you really mean it"
            )
        return self


AuthMethod = Literal["token", "approle", "kubernetes", "jwt"]
KUBERNETES_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class VaultAuthSettings(_Model):
    method: AuthMethod = Field(
        default="token", description="How the proxy logs in to Vault or OpenBao."
    )
    token_file: Path | None = Field(
        default=None,
        description="Token method: the file holding the token, used when `$VAULT_TOKEN` is"
        " unset (default `~/.vault-token`); a token or secret id file every user can read is"
        " used with a warning (`secret_file_exposed`): chmod 600, or 640 for a group.",
    )
    role_id: str | None = Field(default=None, description="AppRole: the role id.")
    role_id_file: Path | None = Field(
        default=None, description="AppRole: a file holding the role id, instead of `role_id`."
    )
    secret_id_file: Path | None = Field(
        default=None,
        description="AppRole: a file holding the secret id (never the secret id itself).",
    )
    role: str | None = Field(
        default=None, description="Kubernetes and JWT: the Vault role to log in as."
    )
    jwt_file: Path | None = Field(
        default=None,
        description="JWT: a file holding the JWT (Kubernetes: the service-account token by"
        " default).",
    )
    mount: str | None = Field(
        default=None, description="The auth mount path. Default: the method's name."
    )

    @model_validator(mode="after")
    def _method_fields(self) -> VaultAuthSettings:
        if self.method == "approle":
            if not (self.role_id or self.role_id_file):
                raise ValueError("approle needs role_id or role_id_file")
            if not self.secret_id_file:
                raise ValueError(
                    "approle needs secret_id_file (a file holding the secret id;"
                    " the secret id itself never goes in the config)"
                )
        if self.method in ("kubernetes", "jwt") and not self.role:
            raise ValueError(f"{self.method} needs role (the Vault role to log in as)")
        if self.method == "jwt" and not self.jwt_file:
            raise ValueError("jwt needs jwt_file (a file holding the JWT)")
        return self

    @property
    def effective_mount(self) -> str:
        """The auth mount path, defaulting to the method's own name."""
        return self.mount or self.method


class VaultSettings(_Model):
    url: str = Field(
        default_factory=lambda: os.environ.get("VAULT_ADDR") or DEFAULT_VAULT_URL,
        description="Vault's or OpenBao's URL; plain HTTP beyond loopback is warned."
        f" Default: `$VAULT_ADDR`, else `{DEFAULT_VAULT_URL}`.",
    )
    namespace: str | None = Field(
        default_factory=lambda: os.environ.get("VAULT_NAMESPACE"),
        description="The Vault namespace. Default: `$VAULT_NAMESPACE`.",
    )
    ca_cert: Path | None = Field(
        default_factory=lambda: Path(p) if (p := os.environ.get("VAULT_CACERT")) else None,
        description="Trust this CA for Vault. Default: `$VAULT_CACERT`.",
    )
    skip_verify: bool = Field(
        default_factory=lambda: (
            os.environ.get("VAULT_SKIP_VERIFY", "").lower() in ("1", "true", "yes")
        ),
        description="Do not check Vault's TLS certificate (warned). Default: `$VAULT_SKIP_VERIFY`.",
    )
    timeout_seconds: PositiveFloat = Field(default=5.0, description="Seconds per Vault call.")
    # An HTTP proxy named on purpose; environment proxy variables are never used.
    proxy: str | None = Field(
        default=None,
        repr=False,
        description="An HTTP proxy to reach Vault through, `http://[user:password@]host:port`;"
        " with a plain-HTTP Vault it sees the token, which is warned. Default: none (direct).",
    )
    auth: VaultAuthSettings = Field(
        default=VaultAuthSettings(), description="How the proxy logs in to Vault."
    )

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        return proxy_url(value)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        _http_url_parts(value, "a URL such as http://127.0.0.1:8200")
        return value.rstrip("/")


class KeyLifeSettings(_Model):
    """What every credential shares, whatever its source: how its key is kept current."""

    refresh_seconds: PositiveFloat = Field(
        default=300.0, description="Seconds between background re-reads of the key."
    )
    max_stale_seconds: NonNegativeFloat = Field(
        default=3600.0,
        description="How long the last good key serves while its source fails.",
    )
    rotate_after_days: PositiveFloat = Field(
        default=DEFAULT_ROTATE_AFTER_DAYS,
        description="Warn when the key's version is older than this (Publer's guide: rotate"
        " every 90 to 180 days).",
    )


class CredentialSettings(KeyLifeSettings):
    """A key in Vault or OpenBao KV (the default source)."""

    source: Literal["vault"] = Field(
        default="vault",
        description="Where the key is kept: `vault`, `aws_secrets_manager`, `file` or `env`"
        " (see the key sources page).",
    )
    mount: str = Field(default="secret", description="The KV secrets engine's mount path.")
    path: str = Field(description="The secret's path under the mount.")
    field: str = Field(default="api_key", description="The secret's field holding the key.")
    kv_version: Literal[1, 2] = Field(default=2, description="The KV engine's version.")

    @field_validator("mount", "path")
    @classmethod
    def _vault_path(cls, value: str) -> str:
        value = value.strip("/")
        if not value or ".." in value.split("/"):
            raise ValueError("must be a non-empty Vault path without '..' segments")
        return value


class AwsCredentialSettings(KeyLifeSettings):
    """A key in AWS Secrets Manager, read with the SDK's standard credential chain."""

    source: Literal["aws_secrets_manager"] = Field(description="`aws_secrets_manager`.")
    secret_id: str = Field(min_length=1, max_length=2048, description="The secret's name or ARN.")
    region: str | None = Field(
        default=None,
        description="The AWS region. Default: `$AWS_REGION`, `$AWS_DEFAULT_REGION`, the profile's.",
    )
    field: str | None = Field(
        default=None,
        description="A field of a JSON secret. Default: the whole secret string is the key.",
    )
    profile: str | None = Field(
        default=None,
        description="The AWS profile. Default: `$AWS_PROFILE`, else the SDK chain's default.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="A Secrets Manager-compatible endpoint (tests, a VPC endpoint). Default:"
        " AWS's.",
    )
    proxy: str | None = Field(
        default=None,
        description="An HTTP(S) proxy for AWS calls; the environment's proxies are never used.",
    )
    timeout_seconds: PositiveFloat = Field(default=5.0, description="Seconds per AWS call.")

    @field_validator("endpoint_url", "proxy")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "must be an http(s) URL such as https://secretsmanager.eu-west-1.amazonaws.com"
            )
        return value.rstrip("/")

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is not None and not _REGION_RE.match(value):
            raise ValueError("must be an AWS region name such as eu-west-1")
        return value


AzureIdentityType = Literal[
    "default",
    "environment",
    "client_secret",
    "client_certificate",
    "workload_identity",
    "managed_identity",
    "azure_cli",
]


class AzureIdentitySettings(_Model):
    """The Microsoft Entra identity that reads a Key Vault secret; its secrets are files."""

    type: AzureIdentityType = Field(
        default="default",
        description="The identity: `default` (the SDK's chain: environment, workload identity,"
        " managed identity, Azure CLI; for development), `environment`, `client_secret`,"
        " `client_certificate`, `workload_identity`, `managed_identity` or `azure_cli`."
        " Production names the one identity it runs as.",
    )
    tenant_id: str | None = Field(default=None, description="Default: `AZURE_TENANT_ID`.")
    client_id: str | None = Field(
        default=None,
        description="Default: `AZURE_CLIENT_ID` (a user-assigned managed identity's id).",
    )
    client_secret_file: Path | None = Field(
        default=None, description="The client secret, in a file (`client_secret`)."
    )
    certificate_file: Path | None = Field(
        default=None, description="A PEM with the private key (`client_certificate`)."
    )
    token_file: Path | None = Field(
        default=None,
        description="The federated token (`workload_identity`). Default:"
        " `AZURE_FEDERATED_TOKEN_FILE`.",
    )
    authority: str | None = Field(
        default=None,
        description="The sign-in host. Default: `AZURE_AUTHORITY_HOST`, else the one of"
        " `vault_url`'s cloud.",
    )

    @field_validator("authority")
    @classmethod
    def _https_host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("must be an https:// host such as https://login.microsoftonline.com")
        return f"https://{parts.netloc}"

    @model_validator(mode="after")
    def _type_fields(self) -> AzureIdentitySettings:
        needs = {
            "client_secret": ("tenant_id", "client_id", "client_secret_file"),
            "client_certificate": ("tenant_id", "client_id", "certificate_file"),
        }.get(self.type, ())
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"type {self.type} needs {', '.join(missing)} (a secret goes in a file, never"
                " in the config)"
            )
        return self


class AzureCredentialSettings(KeyLifeSettings):
    """A key in Azure Key Vault, read as one named identity or the SDK's standard chain."""

    source: Literal["azure_key_vault"] = Field(description="`azure_key_vault`.")
    vault_url: str = Field(
        description="`https://NAME.vault.azure.net`, or a sovereign cloud's vault host."
    )
    secret_name: str = Field(pattern=r"^[0-9A-Za-z-]{1,127}$", description="The secret's name.")
    version: str | None = Field(
        default=None,
        pattern=r"^[0-9A-Za-z]{1,64}$",
        description="Pin one version. Default: the latest.",
    )
    credential: AzureIdentitySettings = Field(
        default=AzureIdentitySettings(), description="The identity that reads the secret."
    )
    proxy: str | None = Field(
        default=None,
        repr=False,
        description="An https proxy to the vault and sign-in host; environment proxies are"
        " never used.",
    )
    ca_file: Path | None = Field(
        default=None,
        description="Trust only this CA (a stand-in's). Default: the system's.",
    )
    connect_to: str | dict[str, str] | None = Field(
        default=None,
        description="Where to dial instead of resolving a name, TLS still checking the name"
        " (curl's `--connect-to`): `host:port` for every DNS name this source reaches over"
        " https (the vault, the sign-in host; an IP literal or `localhost` is dialled as"
        " written), or `{name: host:port}` for the names given only.",
    )
    timeout_seconds: PositiveFloat = Field(
        default=5.0, description="Connect and read timeout of each call, in seconds."
    )

    @field_validator("vault_url")
    @classmethod
    def _vault_url(cls, value: str) -> str:
        parts = urlsplit(value)
        host = parts.hostname or ""
        if (
            parts.scheme != "https"
            or not host
            or parts.path not in ("", "/")
            or parts.query
            or parts.username
            or host.replace(".", "").isdigit()
            or ":" in host
        ):
            raise ValueError(
                "must be the vault's https:// URL with its DNS name, such as"
                " https://publer.vault.azure.net (to reach a stand-in, set connect_to)"
            )
        return f"https://{parts.netloc.lower()}"

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        return proxy_url(value)

    @field_validator("connect_to")
    @classmethod
    def _host_port(cls, value: str | dict[str, str] | None) -> str | dict[str, str] | None:
        addresses = value.values() if isinstance(value, dict) else [value] if value else []
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    "must be host:port, such as 127.0.0.1:8443, or a mapping of names to"
                    " host:port, such as {publer.vault.azure.net: 127.0.0.1:8443}"
                )
        if isinstance(value, dict):
            return {name.lower().rstrip("."): address for name, address in value.items()}
        return value

    @model_validator(mode="after")
    def _dial_or_proxy(self) -> AzureCredentialSettings:
        if self.connect_to and self.proxy:
            raise ValueError(
                "connect_to and proxy exclude each other: a proxy dials the vault's name"
                " itself; remove one"
            )
        return self


class FileCredentialSettings(KeyLifeSettings):
    """A key in a file: a Kubernetes Secret volume, a Docker secret, a Vault Agent file."""

    source: Literal["file"] = Field(description="`file`.")
    path: Path = Field(description="The file holding the key.")
    readable_by: Literal["owner", "group", "anyone"] = Field(
        default="owner",
        description="Who besides the file's owner may read it: `owner` (mode 0600 or 0400),"
        " `group` (0640 or 0440, as Kubernetes writes a volume for a pod with fsGroup), or"
        " `anyone` (0644: warned).",
    )
    poll_seconds: PositiveFloat = Field(
        default=1.0, description="How often, in seconds, the file is checked for a change."
    )


class EnvCredentialSettings(KeyLifeSettings):
    """A key in an environment variable (or a .env file): for local development."""

    source: Literal["env"] = Field(description="`env`.")
    variable: str = Field(
        default="PUBLER_API_KEY", description="The environment variable holding the key."
    )
    env_file: Path | None = Field(
        default=None, description="A `.env` file read when the variable is not set."
    )

    @field_validator("variable")
    @classmethod
    def _variable(cls, value: str) -> str:
        if not _ENV_NAME_RE.match(value):
            raise ValueError("must be an environment variable name such as PUBLER_API_KEY")
        return value


_SOURCE_MODELS: dict[str, type[KeyLifeSettings]] = {
    "vault": CredentialSettings,
    "aws_secrets_manager": AwsCredentialSettings,
    "azure_key_vault": AzureCredentialSettings,
    "file": FileCredentialSettings,
    "env": EnvCredentialSettings,
}
SOURCES = tuple(_SOURCE_MODELS)


def source_models() -> dict[str, type[KeyLifeSettings]]:
    """Each credential source's model, by the `source` value that selects it."""
    return dict(_SOURCE_MODELS)


def _source_of(value: Any) -> str:
    if isinstance(value, dict):
        source = value.get("source", "vault")
        return source if isinstance(source, str) else repr(source)
    return getattr(value, "source", "vault")


AnyCredential = Annotated[
    Annotated[CredentialSettings, Tag("vault")]
    | Annotated[AwsCredentialSettings, Tag("aws_secrets_manager")]
    | Annotated[AzureCredentialSettings, Tag("azure_key_vault")]
    | Annotated[FileCredentialSettings, Tag("file")]
    | Annotated[EnvCredentialSettings, Tag("env")],
    Discriminator(
        _source_of,
        custom_error_type="unknown_source",
        custom_error_message=f"source must be one of {', '.join(SOURCES)}",
    ),
]


# The client label of requests that name no configured client (an open route, or a
# refusal before the client token was checked); no configured client may take it.
ANONYMOUS_CLIENT = "anonymous"


class _Share(_Model):
    """A named holder of a share of a credential's budget: a route, or a client in it.

    `weight` is its part of what its peers share (routes of the credential, clients of the
    route), `max_requests` its cap per window.
    """

    name: str = Field(
        description="Its name in logs, metrics and the audit log: letters, digits, `.`, `_` or `-`."
    )
    weight: PositiveFloat = Field(
        default=1.0,
        description="A route's share of its credential's budget, or a client's part of its"
        " route's.",
    )
    max_requests: PositiveInt | None = Field(
        default=None, description="A hard cap of requests per window. Default: none."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                "must be letters, digits, '.', '_' or '-' (it names the route or client in"
                " logs, metrics and the audit log)"
            )
        return value


PostState = Literal["draft", "draft_public", "draft_private", "scheduled"]


class PostLimitSettings(_Model):
    """What a route or client may do with posts, beyond the `posts` scope."""

    publish_now: bool = Field(
        default=True,
        description="May publish at once: `POST /posts/schedule/publish`, or a scheduled post"
        " with no time.",
    )
    states: list[PostState] | None = Field(
        default=None,
        description="The `bulk.state` values it may create (`draft`, `scheduled`, ...)."
        " Default: any.",
    )
    delete: bool = Field(default=True, description="May delete posts.")
    update: bool = Field(default=True, description="May update posts (`PUT /posts/{id}`).")


class LimitSettings(_Model):
    """Limits finer than Publer's scopes (the operators' page, "Limiting what an app can do")."""

    accounts: list[str] | None = Field(
        default=None,
        description="The social account ids it may act on and see. Default: every account of"
        " the workspace.",
    )
    posts: PostLimitSettings = Field(
        default=PostLimitSettings(), description="What it may do with posts."
    )

    @field_validator("accounts")
    @classmethod
    def _account_ids(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            if not _WORKSPACE_RE.fullmatch(item):
                raise ValueError(f"{item!r} is not a Publer account id (letters and digits)")
        return value


class ClientSettings(_Share):
    token_sha256: str = Field(
        description="`sha256:` and the hex digest of the client's token (`publer-proxy"
        " hash-token`); the name may not be `anonymous`. A token belongs to one client: the"
        " same digest twice, in one route or in two (the forward proxy picks the route by the"
        " token), is a config error."
    )
    limits: LimitSettings | None = Field(
        default=None,
        description="Limits finer than scopes for this client; they narrow the route's,"
        " never widen them.",
    )

    @field_validator("name")
    @classmethod
    def _not_anonymous(cls, value: str) -> str:
        if value == ANONYMOUS_CLIENT:
            raise ValueError(
                f"{ANONYMOUS_CLIENT!r} is reserved for requests without a client; pick another name"
            )
        return value

    @field_validator("token_sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        return check_digest(value)


class RouteSettings(_Share):
    prefix: str = Field(default="", description="Clients call `{prefix}/api/v1/...`.")
    credential: str = Field(description="A name under `credentials`.")
    workspace_id: str | None = Field(
        default=None, description="Sent as `Publer-Workspace-Id`. Default: none."
    )
    workspace_ids: list[str] | None = Field(
        default=None,
        description="Instead of `workspace_id`: the workspaces a client may choose, the first"
        " the default.",
    )
    scopes: list[str] = Field(description="The allowed Publer scopes (see the scope map).")
    read_only: bool = Field(default=False, description="Only GET and HEAD pass.")
    clients: list[ClientSettings] | None = Field(
        default=None,
        description="The clients allowed on the route, each with its token's digest."
        " Default: none (open, on loopback only).",
    )
    limits: LimitSettings | None = Field(
        default=None,
        description="Limits finer than scopes: the social accounts the route may act on and"
        ' what it may do with posts (see "Limiting what an app can do").',
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.rstrip("/")
        if not _PREFIX_RE.match(value):
            raise ValueError(
                "must be '' or '/name' segments of letters, digits, '.', '_', '~', '-'"
                " (for example '/team-a')"
            )
        if value in ("/healthz", "/readyz", "/metrics"):
            raise ValueError(f"{value} is the proxy's own endpoint")
        return value

    @field_validator("workspace_id")
    @classmethod
    def _workspace(cls, value: str | None) -> str | None:
        if value is not None and not _WORKSPACE_RE.match(value):
            raise ValueError("must be a Publer workspace id (letters and digits)")
        return value

    @field_validator("workspace_ids")
    @classmethod
    def _workspaces(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("must list at least one workspace id, or be left out")
            for item in value:
                if not _WORKSPACE_RE.match(item):
                    raise ValueError(f"{item!r} is not a Publer workspace id")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one scope (deny by default)")
        return value

    @model_validator(mode="after")
    def _one_workspace_form(self) -> RouteSettings:
        if self.workspace_id is not None and self.workspace_ids is not None:
            raise ValueError("set workspace_id or workspace_ids, not both")
        return self

    @model_validator(mode="after")
    def _distinct_clients(self) -> RouteSettings:
        seen: set[str] = set()
        for client in self.clients or ():
            if client.name in seen:
                raise ValueError(
                    f"client name {client.name!r} is used twice on this route; each client"
                    " needs its own name (it is how logs, metrics and budgets tell them apart)"
                )
            seen.add(client.name)
        return self

    @property
    def allowed_workspaces(self) -> tuple[str, ...]:
        """The workspace ids the route allows, the default first."""
        if self.workspace_ids:
            return tuple(self.workspace_ids)
        return (self.workspace_id,) if self.workspace_id else ()


class VaultCASettings(_Model):
    """A CA kept in Vault (KV): its certificate and private key, both PEM."""

    mount: str = Field(default="secret", description="The KV secrets engine's mount path.")
    path: str = Field(description="The secret's path under the mount.")
    kv_version: Literal[1, 2] = Field(default=2, description="The KV engine's version.")
    certificate_field: str = Field(
        default="certificate", description="The field holding the CA certificate (PEM)."
    )
    private_key_field: str = Field(
        default="private_key",
        description="The field holding the CA's private key (PEM, unencrypted, EC or RSA).",
    )


class ForwardProxySettings(_Model):
    """The CONNECT listener for clients that hard-code Publer's origin (off when absent)."""

    host: str = Field(default="127.0.0.1", description="The address the CONNECT listener uses.")
    port: int = Field(default=3128, ge=0, le=65535, description="The CONNECT listener's port.")
    ca_certificate_file: Path = Field(
        description="Where the CA certificate is written at start, for clients to trust"
        " (`SSL_CERT_FILE`, `NODE_EXTRA_CA_CERTS`, ...)."
    )
    leaf_lifetime_hours: PositiveFloat = Field(
        default=24.0,
        description="Life of the certificate served in tunnels; renewed half-way.",
    )
    ca_vault: VaultCASettings | None = Field(
        default=None,
        description="Take the CA from this Vault secret. Default: a new CA is made in memory"
        " at every start.",
    )
    allowed_hosts: list[str] = Field(
        default=[],
        description="As `listen.allowed_hosts`, for a request to the forward-proxy listener"
        " itself (not a CONNECT, whose target is checked instead): names clients use in `Host`"
        " besides its loopback names and its own address. Any other `Host` is refused with 421"
        " `host_denied`.",
    )

    _hosts = field_validator("allowed_hosts")(check_host_names)


class BrowserSettings(_Model):
    """Web pages that may call the proxy (CORS); none by default."""

    allowed_origins: list[str] = Field(
        default=[],
        description="Origins of browser apps that really call the proxy"
        " (`https://app.example.com`, `http://localhost:5173`): their requests pass and get"
        " CORS headers, and preflights are answered for these only; every other web page is"
        " refused (403 `origin_denied`).",
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        found: list[str] = []
        for value in values:
            origin = parse_origin(value)
            if origin is None:
                raise ValueError(
                    f"{value!r} is not an origin: write scheme, host and port as the browser"
                    " app's address bar shows them (https://app.example.com,"
                    " http://localhost:5173), with no path; '*' and 'null' are never allowed"
                )
            found.append(origin)
        return found


class RateLimitSettings(_Model):
    requests: int = Field(
        default=100, gt=0, description="Requests per window, per credential (Publer's limit)."
    )
    per_seconds: PositiveFloat = Field(default=120.0, description="The window, in seconds.")
    max_wait_seconds: NonNegativeFloat = Field(
        default=0.0, description="Queue for budget this long before a local 429."
    )
    redis_url: str | None = Field(
        default=None, description="One budget for every replica, kept in this Redis."
    )
    replicas: int = Field(
        default=1,
        ge=1,
        description="How many replicas share the budget through Redis: while Redis is"
        " unreachable, or for one window after it came back empty, each replica spends at"
        " most its part (`requests // replicas`, at least 1) on its own count.",
    )


class AuditSettings(_Model):
    sink: str = Field(
        description="`stdout`, `stderr`, or a file to append to (one per proxy process)."
    )
    redis_url: str | None = Field(
        default=None,
        description="Where the audit chain's head (line count and last hash) is published,"
        " out of the writer's reach. Default: `rate_limit.redis_url`.",
    )
    head_key: str | None = Field(
        default=None,
        description="The Redis key of the chain's head. Default: `publer-proxy:audit:HOST:SINK`.",
    )

    @field_validator("sink")
    @classmethod
    def _sink(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be stdout, stderr, or the path of a file to append to")
        return value


class LoggingSettings(_Model):
    format: Literal["json", "console", "auto"] = Field(
        default="auto", description="`auto` is console on a TTY, else JSON."
    )
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The lowest level logged."
    )

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class ReloadSettings(_Model):
    watch: bool = Field(
        default=False,
        description="Also reload when the config file changes (SIGHUP always reloads).",
    )
    settle_seconds: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="A file written in place is applied once it stayed unchanged this long"
        " (seconds); a file renamed into place is applied at once.",
    )


class AdminSettings(_Model):
    token_sha256: str | None = Field(
        default=None,
        description="Lets clients beyond loopback see the status page with this token"
        " (loopback clients always may).",
    )

    @field_validator("token_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        return check_digest(value) if value is not None else None


class Settings(_Model):
    listen: ListenSettings = Field(default=ListenSettings(), description="Where the proxy listens.")
    upstream: UpstreamSettings = Field(
        default=UpstreamSettings(), description="Publer, the one origin keys go to."
    )
    vault: VaultSettings = Field(
        default_factory=VaultSettings,
        description="The Vault or OpenBao server of the `vault` credentials and the CA.",
    )
    credentials: dict[str, AnyCredential] = Field(
        description="The keys, by name, each with where it is kept (its `source`)."
    )
    routes: list[RouteSettings] = Field(
        description="What clients may call: each route maps a prefix to a credential, its"
        " scopes and its clients."
    )
    rate_limit: RateLimitSettings = Field(
        default=RateLimitSettings(), description="Publer's budget, per credential."
    )
    logging: LoggingSettings = Field(default=LoggingSettings(), description="The proxy's logs.")
    audit: AuditSettings | None = Field(
        default=None,
        description="The audit log of every call other than GET and HEAD. Default: none.",
    )
    scope_map: Path | None = Field(
        default=None,
        description="Replace the endpoint allow-list. Default: the packaged `config/scopes.yaml`.",
    )
    forward_proxy: ForwardProxySettings | None = Field(
        default=None,
        description="The CONNECT listener for clients that hard-code Publer's origin (see"
        ' "Clients you cannot change"). Default: off.',
    )
    browser: BrowserSettings = Field(
        default=BrowserSettings(),
        description="Web pages that may call the proxy from a browser (CORS). Default: none;"
        " every request with browser provenance is refused.",
    )
    reload: ReloadSettings = Field(
        default=ReloadSettings(), description="Live changes without a restart."
    )
    admin: AdminSettings = Field(default=AdminSettings(), description="The status page.")

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems = self.cross_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def cross_problems(
        self,
        indices: Sequence[int] | None = None,
        defined: Collection[str] | None = None,
    ) -> list[str]:
        """The problems between keys (names, prefixes, references, tokens, listeners).

        `indices` are the routes' positions in the file and `defined` the credential
        names it has, when some routes or credentials did not validate and are left out.
        """
        problems: list[str] = []
        if not self.routes and indices is None:
            problems.append("routes: at least one route is needed")
        names: set[str] = set()
        prefixes: dict[str, str] = {}
        tokens: dict[str, str] = {}
        known_credentials = set(self.credentials) | set(defined or ())
        for position, route in enumerate(self.routes):
            index = indices[position] if indices is not None else position
            where = f"routes.{index}"
            for number, client in enumerate(route.clients or []):
                at = f"{where}.clients.{number}"
                if client.token_sha256 in tokens:
                    problems.append(
                        f"{at}.token_sha256: client {client.name!r} has the same token as"
                        f" {tokens[client.token_sha256]}; a token names one client (the"
                        " forward proxy picks the route by it), so give each client its own"
                        " token (make one with: openssl rand -hex 32 | publer-proxy hash-token)"
                    )
                else:
                    tokens[client.token_sha256] = f"client {client.name!r} ({at})"
            if route.name in names:
                problems.append(f"{where}.name: route name {route.name!r} is used twice")
            names.add(route.name)
            if route.prefix in prefixes:
                problems.append(
                    f"{where}.prefix: {route.prefix!r} is also the prefix of route"
                    f" {prefixes[route.prefix]!r}; each route needs its own prefix"
                )
            prefixes[route.prefix] = route.name
            if route.credential not in known_credentials:
                known = ", ".join(sorted(self.credentials)) or "none"
                problems.append(
                    f"{where}.credential: {route.credential!r} is not defined under"
                    f" credentials (defined: {known})"
                )
            if not route.clients and not self.listens_on_loopback_only:
                problems.append(
                    f"{where}.clients: route {route.name!r} has no clients (open), but the"
                    f" proxy listens on {self.listen.host}, beyond loopback; add clients"
                    " with token_sha256, or listen on 127.0.0.1 or a unix socket"
                )
        problems += self._forward_proxy_problems()
        return problems

    def _forward_proxy_problems(self) -> list[str]:
        forward = self.forward_proxy
        if forward is None:
            return []
        problems: list[str] = []
        upstream = urlsplit(self.upstream.url)
        host = upstream.hostname or ""
        if upstream.scheme != "https" or host.replace(".", "").isdigit() or ":" in host:
            problems.append(
                f"forward_proxy: upstream.url {self.upstream.url} must be https:// with a DNS"
                " name (such as https://app.publer.com): clients open tunnels to that name;"
                " to reach a stand-in on another address, set upstream.connect_to"
            )
        if (
            forward.port != 0
            and forward.port == self.listen.port
            and self.listen.unix_socket is None
        ):
            problems.append(
                f"forward_proxy.port: {forward.port} is also listen.port; the forward proxy"
                " needs a port of its own (3128 by convention)"
            )
        if not is_loopback_host(forward.host):
            problems += [
                f"forward_proxy.host: route {route.name!r} has no clients (open), but the"
                f" forward proxy listens on {forward.host}, beyond loopback; add clients"
                " with token_sha256, or listen on 127.0.0.1"
                for route in self.routes
                if not route.clients
            ]
        return problems

    @property
    def listens_on_loopback_only(self) -> bool:
        """True when only this machine can reach the proxy (loopback or a unix socket)."""
        return self.listen.unix_socket is not None or is_loopback_host(self.listen.host)

    def warnings(self) -> list[str]:
        """Things that work but should not stay that way, for `check` and the start log."""
        found: list[str] = []
        vault = urlsplit(self.vault.url)
        if vault.scheme == "http" and not is_loopback_host(vault.hostname or ""):
            found.append(
                f"vault.url: {self.vault.url} is plain HTTP to a non-loopback host; the Vault"
                " token and the key cross the network in clear text; use https://"
            )
        if self.upstream.insecure_allow_plain_http and urlsplit(self.upstream.url).scheme == "http":
            found.append(
                f"upstream.url: {self.upstream.url} is plain HTTP (insecure_allow_plain_http);"
                " the API key crosses the network in clear text"
            )
        if self.vault.skip_verify:
            found.append("vault.skip_verify: Vault's TLS certificate is not checked")
        if self.vault.proxy and vault.scheme == "http":
            found.append(
                f"vault.proxy: Vault is plain HTTP ({self.vault.url}), so the proxy"
                f" {masked_url(self.vault.proxy)} sees the Vault token and the key; use https://"
            )
        if self.upstream.proxy and urlsplit(self.upstream.url).scheme == "http":
            found.append(
                f"upstream.proxy: the upstream is plain HTTP ({self.upstream.url}), so the"
                f" proxy {masked_url(self.upstream.proxy)} sees the API key; use https://"
            )
        found += credential_warnings(self.credentials_in_use())
        found.extend(self._unreachable_caps())
        return found

    def _unreachable_caps(self) -> list[str]:
        limit = self.rate_limit.requests
        found: list[str] = []
        for index, route in enumerate(self.routes):
            caps = [(f"routes.{index}.max_requests", route.max_requests)]
            caps += [
                (f"routes.{index}.clients.{n}.max_requests", client.max_requests)
                for n, client in enumerate(route.clients or ())
            ]
            found.extend(
                f"{where}: {cap} is above rate_limit.requests ({limit}), so it never applies"
                for where, cap in caps
                if cap is not None and cap > limit
            )
        return found

    def secret_values(self) -> list[str]:
        """Secrets written in the config itself (a password in a proxy or Redis URL), to
        register for redaction before anything is logged."""
        urls = [
            self.vault.proxy,
            self.upstream.proxy,
            self.rate_limit.redis_url,
            self.audit.redis_url if self.audit else None,
        ]
        urls += [
            c.proxy
            for c in self.credentials.values()
            if isinstance(c, AwsCredentialSettings | AzureCredentialSettings)
        ]
        return [secret for url in urls for secret in url_secrets(url)]

    def credentials_in_use(self) -> dict[str, AnyCredential]:
        """The credentials that at least one route refers to."""
        used = {route.credential for route in self.routes}
        return {name: cred for name, cred in self.credentials.items() if name in used}


def credential_warnings(credentials: dict[str, AnyCredential]) -> list[str]:
    """What is weak about where the keys are kept, one sentence per credential."""
    found: list[str] = []
    for name, cred in credentials.items():
        where = f"credentials.{name}.source"
        if isinstance(cred, EnvCredentialSettings):
            found.append(
                f"{where}: env: the key comes from ${cred.variable}"
                + (f" or {cred.env_file}" if cred.env_file else "")
                + "; fine for local development, but a vault (Vault, OpenBao, AWS Secrets"
                " Manager, Azure Key Vault) or a mounted secret file is the better home: a"
                " variable is"
                " inherited by whatever starts before the proxy, shows in crash reports"
                " and in the /proc/PID/environ of every process that still holds it"
            )
        elif isinstance(cred, FileCredentialSettings) and cred.readable_by == "anyone":
            found.append(
                f"credentials.{name}.readable_by: anyone: a key file readable by every user"
                " of the machine is accepted"
            )
        elif isinstance(cred, AzureCredentialSettings) and cred.credential.type == "default":
            found.append(
                f"credentials.{name}.credential.type: default: the Azure SDK's chain tries the"
                " environment, workload identity, managed identity and the Azure CLI in turn;"
                " fine for development, but in production name the one identity the proxy"
                " runs as (client_secret, client_certificate, workload_identity,"
                " managed_identity)"
            )
        elif isinstance(cred, AwsCredentialSettings) and cred.endpoint_url:
            endpoint = urlsplit(cred.endpoint_url)
            if endpoint.scheme == "http" and not is_loopback_host(endpoint.hostname or ""):
                found.append(
                    f"credentials.{name}.endpoint_url: {cred.endpoint_url} is plain HTTP to a"
                    " non-loopback host; the key crosses the network in clear text"
                )
    return found


_FIXES = {
    "extra_forbidden": "unknown key; remove it, or check its spelling in config/proxy.yaml",
    "missing": "required key is missing; add it",
}


def _credential_hint(loc: tuple[Any, ...], error_type: str) -> str | None:
    """For a key of one credential source written under another: which source it needs."""
    if error_type != "extra_forbidden" or len(loc) != 3 or loc[0] != "credentials":
        return None
    owners = [source for source, model in _SOURCE_MODELS.items() if loc[2] in model.model_fields]
    if not owners:
        return None
    return (
        f"{loc[2]} is a key of source {' or '.join(owners)}, not of this credential's source;"
        " set source:, or remove the key"
    )


def _describe(error: Any) -> list[str]:
    # A credential's location holds the source pydantic chose (credentials.x.file.path).
    loc = tuple(
        part
        for index, part in enumerate(error["loc"])
        if not (index == 2 and error["loc"][0] == "credentials" and part in SOURCES)
    )
    location = ".".join(str(part) for part in loc)
    message = (
        _credential_hint(loc, error["type"])
        or _FIXES.get(error["type"])
        or str(error["msg"]).removeprefix("Value error, ")
    )
    if message.startswith("Input should be"):  # pydantic's own words say what, not how
        message += "; correct the value (the docs' configuration reference lists each key's values)"
    lines = message.split("\n")
    # Cross-checks name their own key paths; the others get the location pydantic found.
    if error["type"] == "value_error" and all(": " in line for line in lines) and not location:
        return lines
    return [
        line
        if location and line.startswith(location + ".")
        else f"{location or '(top level)'}: {line}"
        for line in lines
    ]


@dataclass(frozen=True)
class CheckedSettings:
    """Settings with every problem found in them. When there are problems, `settings`
    holds only what validated (defaults elsewhere) and `route_indices` the file positions
    of the routes it kept, so later checks can still look at those."""

    settings: Settings
    problems: list[str]
    route_indices: list[int]
    valid_keys: frozenset[str] = frozenset(Settings.model_fields)


def parse_settings(data: Any, *, source: str = "config") -> Settings:
    """Validate already-parsed YAML data, or raise ConfigError naming every bad key."""
    checked = check_settings(data, source=source)
    if checked.problems:
        raise ConfigError(checked.problems)
    return checked.settings


def check_settings(data: Any, *, source: str = "config") -> CheckedSettings:
    """Validate already-parsed YAML data, finding every problem: of each key, and then
    between the keys that are valid (a wrong key does not hide a dangling reference)."""
    if not isinstance(data, dict):
        problem = f"{source}: the file must hold a YAML mapping (see config/proxy.yaml)"
        raise ConfigError([problem])
    try:
        settings = Settings.model_validate(data)
        return CheckedSettings(settings, [], list(range(len(settings.routes))))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    problems: list[str] = []
    for error in errors:
        problems.extend(_describe(error))
    partial, indices, defined, valid = _valid_parts(data)
    if any(error["loc"] for error in errors):  # the checks between keys did not run
        if data.get("routes") == []:
            problems.append("routes: at least one route is needed")
        problems += partial.cross_problems(indices, defined)
    return CheckedSettings(partial, list(dict.fromkeys(problems)), indices, valid)


def _valid_parts(
    data: dict[str, Any],
) -> tuple[Settings, list[int], set[str], frozenset[str]]:
    """The settings made of the keys that validate on their own (each route and each
    credential apart), the positions of the routes kept, every credential name, and the
    top-level keys that are wholly valid (or absent: their defaults)."""
    fields: dict[str, Any] = {"routes": [], "credentials": {}}
    invalid: set[str] = set()
    indices: list[int] = []
    defined: set[str] = set()
    for name, info in Settings.model_fields.items():
        if name not in data:
            continue
        value = data[name]
        if name == "routes" and isinstance(value, list):
            for index, item in enumerate(value):
                try:
                    fields["routes"].append(RouteSettings.model_validate(item))
                    indices.append(index)
                except ValidationError:
                    invalid.add(name)
        elif name == "credentials" and isinstance(value, dict):
            defined = {str(key) for key in value}
            adapter: TypeAdapter[Any] = TypeAdapter(AnyCredential)
            for key, item in value.items():
                try:
                    fields["credentials"][key] = adapter.validate_python(item)
                except ValidationError:
                    invalid.add(name)
        elif info.annotation is not None:
            try:
                fields[name] = TypeAdapter(info.annotation).validate_python(value)
            except ValidationError:
                invalid.add(name)
    valid = frozenset(Settings.model_fields) - invalid
    return Settings.model_construct(**fields), indices, defined, valid


def config_path(explicit: str | Path | None) -> Path:
    """The config file: --config, else $PUBLER_PROXY_CONFIG, else config/proxy.yaml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("PUBLER_PROXY_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_settings(path: Path) -> Settings:
    """Read and validate a config file, or raise ConfigError with one line per problem."""
    return settings_from_text(config_text(read_config_file(path), path), path)


def read_config_file(path: Path) -> bytes:
    """The config file's bytes, or ConfigError saying why it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            [f"{path}: no such config file; pass --config PATH or set PUBLER_PROXY_CONFIG"]
        ) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read ({exc.strerror})"]) from None


def config_text(data: bytes, path: Path) -> str:
    """The config file's bytes as text, or ConfigError when they are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: is not UTF-8 text"]) from None


def settings_from_text(text: str, path: Path) -> Settings:
    """Validate a config file's text, or raise ConfigError with one line per problem."""
    data, duplicates = yaml_data(text, path)
    checked = check_settings(data, source=str(path))
    if duplicates or checked.problems:
        raise ConfigError(duplicates + checked.problems)
    return checked.settings


class _Loader(SAFE_LOADER):  # type: ignore[misc,valid-type]
    """The safe loader, noting each key given twice in one mapping (YAML would keep the
    later value and drop the earlier without a word)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.duplicates.append((str(key), seen[key], line))
            else:
                seen[key] = line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def yaml_data(text: str, path: Path) -> tuple[Any, list[str]]:
    """A config file's text parsed as YAML, and one problem per key given twice in one
    mapping; ConfigError naming the line a YAML error is at (nothing after it can be
    checked)."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    finally:
        loader.dispose()
    problems = [
        f"{path}: line {line}: key {key!r} is given twice in one mapping (first at line"
        f" {first}); YAML would keep only the later one, so remove or merge one of them"
        for key, first, line in sorted(loader.duplicates, key=lambda found: found[2])
    ]
    return data, problems
