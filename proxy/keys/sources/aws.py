"""A key in AWS Secrets Manager, read with AWS's own SDK (boto3 and botocore).

Imported only when a credential uses this source: the SDK is an optional extra
(`pip install 'publer-proxy[aws]'`) and takes tens of MiB once loaded. Its calls block,
so the credential store runs `read()` in a worker thread.

Credentials come from the SDK's standard chain: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the shared files, web identity
(AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, as EKS sets them), SSO, and the container
or instance role. Each read asks for the AWSCURRENT stage and reports its VersionId, so
a rotation (Secrets Manager moving AWSCURRENT to a new version) is a new version here.

The SDK is configured in this one place; each setting that differs from its default:
- `proxies`: botocore sends every call through HTTP(S)_PROXY from the environment when no
  proxy is configured, Authorization header and the secret's answer included; an empty
  mapping turns that off, `proxy:` on the credential names one on purpose. It is the
  session's default client config, so the STS calls of web identity and assumed roles
  obey it too. The instance-metadata credential fetcher takes no client config: it reads
  the environment's proxies itself and would send the role's temporary credentials
  through them, so the proxy variables are removed from the process environment before
  the SDK starts (nothing else in the proxy honours them either).
- `retries`: standard mode, 3 calls a read at most (`total_max_attempts` counts the
  first call; `max_attempts` would not): the credential store has its own backoff, which
  counts these calls (`calls_per_read`), and the SDK's legacy mode would hold a worker
  thread through 5 attempts.
- `connect_timeout`/`read_timeout`: the credential's `timeout_seconds`, not 60 s.
Its loggers are kept above DEBUG (proxy/records/log_setup.py): at DEBUG botocore logs request and
response bodies, the secret's value included.
"""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import UTC, datetime
from typing import Any

import boto3.session
import botocore.config
import botocore.exceptions
import botocore.session
import structlog

from proxy.config.settings import AwsCredentialSettings
from proxy.keys.sources.base import ErrorKind, SecretRead, SourceError, SourceKind, key_problem
from proxy.masking.secrets import SecretRegistry

log = structlog.get_logger(__name__)

CURRENT_STAGE = "AWSCURRENT"
CALLS_PER_READ = 3
_PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "ALL_PROXY",
    "https_proxy",
    "http_proxy",
    "all_proxy",
)
_XML_ERROR = re.compile(
    r"<Code>(?P<code>[A-Za-z.]+)</Code>\s*<Message>(?P<message>[^<]*)</Message>"
)
_ERROR_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9.]{0,63}$")
_REFUSED_IDENTITY = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "ExpiredToken",
    }
)
_UNAVAILABLE = frozenset(
    {"ThrottlingException", "InternalServiceError", "InternalFailure", "ServiceUnavailable"}
)
# botocore's name for each provider of its credential chain (Credentials.method), and
# what an operator knows it as.
CREDENTIAL_SOURCES = {
    "env": "environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
    "shared-credentials-file": "profile in the shared credentials file (~/.aws/credentials)",
    "config-file": "profile in the config file (~/.aws/config)",
    "custom-process": "credential_process of the profile",
    "assume-role": "role assumed by the profile (role_arn)",
    "assume-role-with-web-identity": "web identity (AWS_WEB_IDENTITY_TOKEN_FILE and"
    " AWS_ROLE_ARN, as EKS sets them)",
    "sso": "IAM Identity Center (SSO) profile",
    "login": "console login session of the profile",
    "container-role": "container role (ECS task role or EKS Pod Identity)",
    "iam-role": "instance role (EC2 instance metadata)",
    "ec2-credentials-file": "EC2 credentials file (/etc/boto.cfg)",
    "boto-config": "boto2 config file",
    "explicit": "keys given to the SDK directly",
}
_NO_CREDENTIALS = (
    "no AWS credentials found: the SDK looked for AWS_ACCESS_KEY_ID and"
    " AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, web identity (AWS_WEB_IDENTITY_TOKEN_FILE"
    " with AWS_ROLE_ARN, as EKS sets them) and a container or instance role; provide one"
)


def drop_environment_proxies() -> list[str]:
    """Remove the proxy variables from the process environment; the names removed."""
    return [name for name in _PROXY_VARIABLES if os.environ.pop(name, None) is not None]


def sdk_config(settings: AwsCredentialSettings) -> botocore.config.Config:
    """The botocore settings every AWS call of this credential runs with."""
    proxy = settings.proxy
    return botocore.config.Config(
        proxies={"http": proxy, "https": proxy} if proxy else {},
        retries={"mode": "standard", "total_max_attempts": CALLS_PER_READ},
        connect_timeout=settings.timeout_seconds,
        read_timeout=settings.timeout_seconds,
    )


class AwsKeySource:
    """Reads one credential's key from Secrets Manager (GetSecretValue, AWSCURRENT)."""

    kind: SourceKind = "aws_secrets_manager"
    poll_seconds: float | None = None
    calls_per_read = CALLS_PER_READ

    def __init__(self, settings: AwsCredentialSettings, secrets: SecretRegistry) -> None:
        self._settings = settings
        self._secrets = secrets
        region = f" in {settings.region}" if settings.region else ""
        field = f" field {settings.field}" if settings.field else ""
        self.where = f"secret {settings.secret_id}{field}{region}"
        self._lock = threading.Lock()
        self._session: Any = None
        self._client: Any = None
        self.credential_source: str | None = None  # botocore's method, once known

    def __repr__(self) -> str:
        return f"AwsKeySource({self.where})"

    def _connect(self) -> Any:
        """The Secrets Manager client, made on first use (in a worker thread)."""
        with self._lock:
            if self._client is None:
                dropped = drop_environment_proxies()
                if dropped:
                    log.warning("aws_environment_proxies_ignored", variables=dropped)
                core = botocore.session.get_session()
                core.set_default_client_config(sdk_config(self._settings))
                session = boto3.session.Session(
                    botocore_session=core,
                    profile_name=self._settings.profile,
                    region_name=self._settings.region,
                )
                self._client = session.client(
                    "secretsmanager", endpoint_url=self._settings.endpoint_url
                )
                self._session = session
            return self._client

    def _remember_credentials(self) -> None:
        """Put the AWS secret key and session token in use into the registry, and say
        once which provider of the SDK's chain gave them."""
        credentials = self._session.get_credentials() if self._session else None
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            self._secrets.add(frozen.secret_key)
            self._secrets.add(frozen.token)
            method = str(getattr(credentials, "method", None) or "unknown")
            if method != self.credential_source:
                self.credential_source = method
                log.info(
                    "aws_credentials_in_use",
                    where=self.where,
                    credential_source=method,
                    described=describe_credential_source(method),
                    profile=self._settings.profile or os.environ.get("AWS_PROFILE"),
                )

    def read(self) -> SecretRead:
        """GetSecretValue of AWSCURRENT, checked; raises SourceError."""
        settings = self._settings
        try:
            client = self._connect()
            self._remember_credentials()
            answer = client.get_secret_value(
                SecretId=settings.secret_id, VersionStage=CURRENT_STAGE
            )
        except botocore.exceptions.ClientError as exc:
            raise self._refused(exc) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._failed(exc) from None
        version = answer.get("VersionId")
        try:
            value = self._value(answer)
        except SourceError as exc:
            raise SourceError(
                exc.reason,
                kind=exc.kind,
                version=version if isinstance(version, str) else None,
            ) from None
        created = answer.get("CreatedDate")
        if isinstance(created, datetime) and created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return SecretRead(
            value=value,
            version=version if isinstance(version, str) else None,
            created_time=created if isinstance(created, datetime) else None,
        )

    def _value(self, answer: dict[str, Any]) -> str:
        """The checked key of a GetSecretValue answer, or SourceError."""
        version = answer.get("VersionId")
        text = answer.get("SecretString")
        if text is None and answer.get("SecretBinary") is not None:
            try:
                text = bytes(answer["SecretBinary"]).decode("utf-8")
            except UnicodeDecodeError:
                raise SourceError(
                    f"the {CURRENT_STAGE} value of {self.where} is binary, not UTF-8 text",
                    kind="invalid",
                ) from None
        if not isinstance(text, str):
            raise SourceError(f"{self.where} has no value", kind="not_found")
        self._secrets.add(text)
        raw = self._field(text)
        self._secrets.add(raw)
        value = raw.strip()
        self._secrets.add(value)
        problem = key_problem(value)
        if problem is not None:
            raise SourceError(
                f"{self.where} version {version} does not hold an API key ({problem})",
                kind="invalid",
            )
        return value

    def _field(self, text: str) -> str:
        """The configured field of a JSON secret, or the whole secret string."""
        name = self._settings.field
        parsed: Any = None
        if name is not None or text.lstrip().startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
        if name is None:
            if isinstance(parsed, dict):
                raise SourceError(
                    f"{self.where} is a JSON object; set field to the key that holds the"
                    f" API key (its keys: {_names(parsed)})",
                    kind="invalid",
                )
            return text
        if not isinstance(parsed, dict):
            raise SourceError(
                f"{self.where} is not a JSON object, so it has no field {name!r}; remove"
                " field to use the whole secret string",
                kind="invalid",
            )
        if name not in parsed:
            raise SourceError(
                f"{self.where} has no field {name!r} (its keys: {_names(parsed)})",
                kind="not_found",
            )
        raw = parsed[name]
        self._secrets.add(str(raw))
        if not isinstance(raw, str):
            raise SourceError(f"field {name!r} of {self.where} is not a string", kind="invalid")
        return raw

    def _refused(self, exc: botocore.exceptions.ClientError) -> SourceError:
        error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        code, message = str(error.get("Code", "")), str(error.get("Message", ""))
        if (not code or code.isdigit()) and (found := _XML_ERROR.search(message)):
            # An error in the query protocol's XML (as some endpoints answer a refused
            # signature) is not parsed by the JSON protocol's reader: read it here.
            code, message = found.group("code"), found.group("message")
        # The error code is shown only when it has the shape of one: an endpoint can put
        # anything there, and only the proxy's own sentences leave it.
        code = code if _ERROR_CODE.match(code) else ""
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        status = status if isinstance(status, int) else None
        answer = code or (f"HTTP {status}" if status else "an unrecognised error")
        kind: ErrorKind
        if code in _REFUSED_IDENTITY:
            reason = f"AWS refused the credentials in use ({code}); check the identity"
            return SourceError(
                reason + " the proxy runs with (AWS_PROFILE, the keys, the role)",
                kind="auth_failed",
                detail=message,
            )
        if code == "AccessDeniedException":
            reason = f"AWS denied secretsmanager:GetSecretValue on {self.where}"
            kind = "denied"
        elif code == "DecryptionFailure":
            reason = f"KMS could not decrypt {self.where} for this identity"
            kind = "denied"
        elif code == "ResourceNotFoundException":
            reason = f"no {self.where} (or no {CURRENT_STAGE} version of it)"
            kind = "not_found"
        elif code in _UNAVAILABLE or (status is not None and status >= 500):
            reason = f"Secrets Manager answered {answer}; retry later"
            kind = "unreachable"
        else:
            reason = f"Secrets Manager refused to read {self.where} ({answer})"
            kind = "invalid"
        return SourceError(reason, kind=kind, detail=message)

    def _failed(self, exc: botocore.exceptions.BotoCoreError) -> SourceError:
        where = self._settings.endpoint_url or "Secrets Manager"
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return SourceError(_NO_CREDENTIALS, kind="auth_failed")
        if isinstance(exc, botocore.exceptions.PartialCredentialsError):
            return SourceError(
                "incomplete AWS credentials (an access key without its secret, or the"
                " reverse); check the environment or profile the proxy runs with",
                kind="auth_failed",
            )
        if isinstance(exc, botocore.exceptions.ProfileNotFound):
            return SourceError(
                f"the AWS profile {self._settings.profile!r} does not exist in ~/.aws",
                kind="auth_failed",
            )
        if isinstance(exc, botocore.exceptions.NoRegionError):
            return SourceError(
                "no AWS region: set region on the credential, or AWS_REGION", kind="invalid"
            )
        if isinstance(exc, botocore.exceptions.SSLError):
            return SourceError(f"{where} is unreachable (TLS failed)", kind="unreachable")
        if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
            detail = f"no connection within {self._settings.timeout_seconds:g}s"
        elif isinstance(exc, botocore.exceptions.ReadTimeoutError):
            detail = f"no answer within {self._settings.timeout_seconds:g}s"
        elif isinstance(exc, botocore.exceptions.ProxyConnectionError):
            detail = "the configured proxy cannot be reached"
        elif isinstance(exc, botocore.exceptions.EndpointConnectionError):
            detail = "the connection failed"
        elif isinstance(exc, botocore.exceptions.HTTPClientError):
            detail = "the connection broke"
        elif isinstance(exc, botocore.exceptions.CredentialRetrievalError):
            return SourceError(
                f"the AWS credentials could not be obtained ({type(exc).__name__})",
                kind="auth_failed",
            )
        else:
            detail = f"the request failed: {type(exc).__name__}"
        return SourceError(f"{where} is unreachable ({detail})", kind="unreachable")

    def changed(self) -> bool:
        """Never known without a call: the refresh reads the AWSCURRENT version."""
        return False

    def close(self) -> None:
        """Close the client's connections."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def describe_credential_source(method: str) -> str:
    """What botocore's credential `method` is, in an operator's words."""
    return CREDENTIAL_SOURCES.get(method, f"the SDK's {method!r} provider")


def _names(data: dict[Any, Any]) -> str:
    # Key names are not secrets, but a key pasted as a name would be: long ones hide.
    names = sorted(str(n) if len(str(n)) <= 32 else "(a long name)" for n in data)
    return ", ".join(names[:10]) or "none"
