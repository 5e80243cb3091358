"""The configuration file: a typed model, its loading and its error messages.

Every value that names a secret is a reference (a file path, a Vault path), never the
secret itself. Unknown keys are an error, so a typo never silently disables a check.
"""

from __future__ import annotations

import ipaddress
import os
import re
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
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.redact import masked_url, url_secrets

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

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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


class ListenSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    unix_socket: Path | None = None


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
    url: str = DEFAULT_UPSTREAM_URL
    # An HTTP proxy named on purpose; environment proxy variables are never used.
    proxy: str | None = Field(default=None, repr=False)
    # Publer's guide: always HTTPS. Plain HTTP to a non-loopback host needs this loud opt-out.
    insecure_allow_plain_http: bool = False
    ca_file: Path | None = None
    connect_timeout_seconds: PositiveFloat = 10.0
    read_timeout_seconds: PositiveFloat = 120.0
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    max_connections: int = Field(default=100, gt=0)
    retries: int = Field(default=2, ge=0, le=5)
    # Dial this host:port instead of resolving the origin's name; TLS still checks the
    # name (curl's --connect-to): a stand-in of Publer reached by its real name.
    connect_to: str | None = None

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
    method: AuthMethod = "token"
    token_file: Path | None = None
    role_id: str | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    role: str | None = None
    jwt_file: Path | None = None
    mount: str | None = None

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
    url: str = Field(default_factory=lambda: os.environ.get("VAULT_ADDR") or DEFAULT_VAULT_URL)
    namespace: str | None = Field(default_factory=lambda: os.environ.get("VAULT_NAMESPACE"))
    ca_cert: Path | None = Field(
        default_factory=lambda: Path(p) if (p := os.environ.get("VAULT_CACERT")) else None
    )
    skip_verify: bool = Field(
        default_factory=lambda: (
            os.environ.get("VAULT_SKIP_VERIFY", "").lower() in ("1", "true", "yes")
        )
    )
    timeout_seconds: PositiveFloat = 5.0
    # An HTTP proxy named on purpose; environment proxy variables are never used.
    proxy: str | None = Field(default=None, repr=False)
    auth: VaultAuthSettings = VaultAuthSettings()

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

    refresh_seconds: PositiveFloat = 300.0
    max_stale_seconds: NonNegativeFloat = 3600.0
    rotate_after_days: PositiveFloat = DEFAULT_ROTATE_AFTER_DAYS


class CredentialSettings(KeyLifeSettings):
    """A key in Vault or OpenBao KV (the default source)."""

    source: Literal["vault"] = "vault"
    mount: str = "secret"
    path: str
    field: str = "api_key"
    kv_version: Literal[1, 2] = 2

    @field_validator("mount", "path")
    @classmethod
    def _vault_path(cls, value: str) -> str:
        value = value.strip("/")
        if not value or ".." in value.split("/"):
            raise ValueError("must be a non-empty Vault path without '..' segments")
        return value


class AwsCredentialSettings(KeyLifeSettings):
    """A key in AWS Secrets Manager, read with the SDK's standard credential chain."""

    source: Literal["aws_secrets_manager"]
    secret_id: str = Field(min_length=1, max_length=2048)
    region: str | None = None  # default: AWS_REGION, AWS_DEFAULT_REGION, the profile's
    field: str | None = None  # a field of a JSON secret; None: the whole secret string
    profile: str | None = None  # default: AWS_PROFILE, else the chain's default
    endpoint_url: str | None = None  # a Secrets Manager-compatible endpoint (tests, VPC)
    proxy: str | None = None  # an HTTP(S) proxy for AWS calls; environment proxies never
    timeout_seconds: PositiveFloat = 5.0

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

    # default: the SDK's chain (environment, workload identity, managed identity, Azure
    # CLI), for development; production names the one identity it runs as.
    type: AzureIdentityType = "default"
    tenant_id: str | None = None  # default: AZURE_TENANT_ID
    client_id: str | None = None  # default: AZURE_CLIENT_ID (a user-assigned identity's id)
    client_secret_file: Path | None = None
    certificate_file: Path | None = None  # PEM with the private key
    token_file: Path | None = None  # workload identity; default: AZURE_FEDERATED_TOKEN_FILE
    # The sign-in host; default: AZURE_AUTHORITY_HOST, else the one of vault_url's cloud.
    authority: str | None = None

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

    source: Literal["azure_key_vault"]
    vault_url: str  # https://NAME.vault.azure.net (or a sovereign cloud's vault host)
    secret_name: str = Field(pattern=r"^[0-9A-Za-z-]{1,127}$")
    version: str | None = Field(default=None, pattern=r"^[0-9A-Za-z]{1,64}$")  # None: latest
    credential: AzureIdentitySettings = AzureIdentitySettings()
    proxy: str | None = Field(default=None, repr=False)  # environment proxies never
    ca_file: Path | None = None  # trust only this CA (a stand-in's); default: the system's
    # Where to dial instead of resolving a name, TLS still checking the name (curl's
    # --connect-to): "host:port" for every DNS name this source reaches over https (the
    # vault, the sign-in host; an IP literal or localhost is dialled as written), or
    # {name: "host:port"} for the names given only.
    connect_to: str | dict[str, str] | None = None
    timeout_seconds: PositiveFloat = 5.0

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

    source: Literal["file"]
    path: Path
    # Who besides the file's owner may read it: owner (mode 0600/0400), group (0640/0440,
    # as Kubernetes writes a volume for a pod with fsGroup), or anyone (0644: don't).
    readable_by: Literal["owner", "group", "anyone"] = "owner"
    poll_seconds: PositiveFloat = 1.0  # how often the file is checked for a change


class EnvCredentialSettings(KeyLifeSettings):
    """A key in an environment variable (or a .env file): for local development."""

    source: Literal["env"]
    variable: str = "PUBLER_API_KEY"
    env_file: Path | None = None  # a .env file read when the variable is not set

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

    name: str
    weight: PositiveFloat = 1.0
    max_requests: PositiveInt | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                "must be letters, digits, '.', '_' or '-' (it names the route or client in"
                " logs, metrics and the audit log)"
            )
        return value


class ClientSettings(_Share):
    token_sha256: str

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
    prefix: str = ""
    credential: str
    workspace_id: str | None = None
    workspace_ids: list[str] | None = None
    scopes: list[str]
    read_only: bool = False
    clients: list[ClientSettings] | None = None

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

    mount: str = "secret"
    path: str
    kv_version: Literal[1, 2] = 2
    certificate_field: str = "certificate"
    private_key_field: str = "private_key"


class ForwardProxySettings(_Model):
    """The CONNECT listener for clients that hard-code Publer's origin (off when absent)."""

    host: str = "127.0.0.1"
    port: int = Field(default=3128, ge=0, le=65535)
    # Written at start, for clients to trust (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, ...).
    ca_certificate_file: Path
    leaf_lifetime_hours: PositiveFloat = 24.0
    # Absent: a new CA is made in memory at every start.
    ca_vault: VaultCASettings | None = None


class RateLimitSettings(_Model):
    requests: int = Field(default=100, gt=0)
    per_seconds: PositiveFloat = 120.0
    max_wait_seconds: NonNegativeFloat = 0.0
    redis_url: str | None = None


class AuditSettings(_Model):
    # "stdout", "stderr", or a file the proxy appends to (one file per proxy process).
    sink: str
    # Where the chain head (line count and last hash) is published, out of the writer's
    # reach; default: rate_limit.redis_url when set.
    redis_url: str | None = None
    head_key: str | None = None

    @field_validator("sink")
    @classmethod
    def _sink(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be stdout, stderr, or the path of a file to append to")
        return value


class LoggingSettings(_Model):
    format: Literal["json", "console", "auto"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class ReloadSettings(_Model):
    # SIGHUP always reloads; this also reloads when the config file changes.
    watch: bool = False


class AdminSettings(_Model):
    # The status page is served to loopback clients, and to others with this token.
    token_sha256: str | None = None

    @field_validator("token_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        return check_digest(value) if value is not None else None


class Settings(_Model):
    listen: ListenSettings = ListenSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    vault: VaultSettings = Field(default_factory=VaultSettings)
    credentials: dict[str, AnyCredential]
    routes: list[RouteSettings]
    rate_limit: RateLimitSettings = RateLimitSettings()
    logging: LoggingSettings = LoggingSettings()
    audit: AuditSettings | None = None
    scope_map: Path | None = None
    forward_proxy: ForwardProxySettings | None = None
    reload: ReloadSettings = ReloadSettings()
    admin: AdminSettings = AdminSettings()

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems: list[str] = []
        if not self.routes:
            problems.append("routes: at least one route is needed")
        names: set[str] = set()
        prefixes: dict[str, str] = {}
        for index, route in enumerate(self.routes):
            where = f"routes.{index}"
            if route.name in names:
                problems.append(f"{where}.name: route name {route.name!r} is used twice")
            names.add(route.name)
            if route.prefix in prefixes:
                problems.append(
                    f"{where}.prefix: {route.prefix!r} is also the prefix of route"
                    f" {prefixes[route.prefix]!r}; each route needs its own prefix"
                )
            prefixes[route.prefix] = route.name
            if route.credential not in self.credentials:
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
        if problems:
            raise ValueError("\n".join(problems))
        return self

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


def parse_settings(data: Any, *, source: str = "config") -> Settings:
    """Validate already-parsed YAML data, or raise ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the file must hold a YAML mapping (see config/proxy.yaml)"])
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors(include_url=False, include_input=False):
            problems.extend(_describe(error))
        raise ConfigError(problems) from None


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
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return parse_settings(data, source=str(path))
