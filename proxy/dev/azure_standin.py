"""A stand-in for Azure Key Vault and Microsoft Entra ID, for tests and `dev --source azure`.

Written from Microsoft's published REST reference, not from the proxy's code:

- Key Vault, over TLS, for any `*.vault.azure.net` (and the China and US Government
  clouds' vault hosts): `GET /secrets/{name}[/{version}]?api-version=7.x` answers the
  secret bundle `{"value", "id", "attributes": {"enabled", "nbf", "exp", "created",
  "updated", "recoveryLevel"}}`. Errors are `{"error": {"code", "message"[,
  "innererror": {"code"}]}}`: 401 with a `WWW-Authenticate: Bearer authorization=...,
  resource=...` challenge for a request without a valid token (the first request of a
  client carries none), 403 `Forbidden`/`SecretDisabled` for a disabled version, 403
  `Forbidden`/`ForbiddenByRbac` for an identity that may not read, 404 `SecretNotFound`
  for a missing or deleted secret or version, 429 `Throttled` with Retry-After. Like the
  real service it answers an expired or not-yet-valid version with 200.
- Microsoft Entra ID, over TLS, for `login.microsoftonline.com` (and the sovereign sign-in
  hosts): the tenant's OpenID configuration, and `POST /{tenant}/oauth2/v2.0/token` with
  the client-credentials grant (a client secret; a client assertion: a JWT signed by a
  registered certificate, or a workload identity's federated token); a wrong secret is
  401 `invalid_client`.
- The managed-identity endpoints, plain HTTP: IMDS's `GET /metadata/identity/oauth2/token`
  with `Metadata: true` (400 without it), and App Service's `GET /msi/token` with the
  `X-IDENTITY-HEADER` secret (IDENTITY_ENDPOINT and IDENTITY_HEADER).

The TLS names are answered on one loopback port (the proxy dials it with `connect_to`),
with a certificate for those names from a CA written next to it (`ca.pem`). The plain
port serves IMDS and, under /control/, what a test changes: secrets and their versions,
faults, clients and what the stand-in saw. It never prints a secret or a token.

    python -m proxy.dev.azure_standin --workdir DIR [--tls-port N] [--port N]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TENANT = "6f1e2d3c-0000-4000-8000-00000000a2b1"
CLOUDS = (  # (vault suffix, resource the challenge names, sign-in host)
    ("vault.azure.net", "https://vault.azure.net", "login.microsoftonline.com"),
    ("vault.azure.cn", "https://vault.azure.cn", "login.chinacloudapi.cn"),
    ("vault.usgovcloudapi.net", "https://vault.usgovcloudapi.net", "login.microsoftonline.us"),
)
TLS_NAMES = [f"*.{suffix}" for suffix, _, _ in CLOUDS] + [login for _, _, login in CLOUDS]
# A sign-in host named by its address (an `authority` such as https://localhost:PORT)
# answers as the public cloud's.
LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass
class Version:
    """One version of a secret, with Key Vault's attributes (epoch seconds)."""

    id: str
    value: str
    enabled: bool = True
    exp: int | None = None
    nbf: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    updated: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Token:
    """An access token the stand-in issued."""

    identity: str
    resource: str
    expires: float


@dataclass
class State:
    """Everything the stand-in holds; every access under `lock`."""

    tenant: str = TENANT
    secrets: dict[str, list[Version]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    clients: dict[str, str] = field(default_factory=dict)  # client id -> secret
    federated: dict[str, str] = field(default_factory=dict)  # client id -> assertion
    certificates: dict[str, str] = field(default_factory=dict)  # client id -> cert PEM
    readers: list[str] | None = None  # identities allowed to read; None: every one
    tokens: dict[str, Token] = field(default_factory=dict)  # issued by this process
    # Signs tokens, as Entra ID signs its JWTs: a token outlives a restart of the vault.
    signing_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    token_seconds: int = 3600
    identity_header: str = ""  # App Service's X-IDENTITY-HEADER, when set
    challenge_resource: str | None = None  # a resource the 401 names instead of the vault's
    imds_garbled: bool = False  # IMDS answers a token with an expiry that is not a number
    throttle: int = 0
    retry_after: int = 1
    fail: int = 0
    fail_status: int = 503
    seen: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cloud(host: str) -> tuple[str, str, str] | None:
    for cloud in CLOUDS:
        if host.endswith("." + cloud[0]) or host == cloud[2]:
            return cloud
    if host in LOCAL_NAMES:
        return (CLOUDS[0][0], CLOUDS[0][1], host)
    return None


class Handler(BaseHTTPRequestHandler):
    """One request to the stand-in, on either port."""

    protocol_version = "HTTP/1.1"
    server_version = "azure-standin"
    state: State
    tls: bool

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request lines would be noise in a test's output."""

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _host(self) -> str:
        return (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()

    def do_GET(self) -> None:
        """Key Vault reads, OpenID configuration, IMDS tokens, control reads."""
        path = urlsplit(self.path).path
        if not self.tls:
            if path == "/metadata/identity/oauth2/token":
                return self._imds()
            if path == "/msi/token":
                return self._app_service()
            return self._control("GET", path)
        cloud = _cloud(self._host())
        if cloud is not None and self._host() == cloud[2]:
            return self._openid(path, cloud)
        if cloud is not None and path.startswith("/secrets/"):
            return self._get_secret(path, cloud)
        with self.state.lock:
            self.state.seen.append({"kind": "unknown", "method": "GET", "path": path})
        return self._send(404, {"error": {"code": "NotFound", "message": "no such path"}})

    def do_POST(self) -> None:
        """Tokens (client credentials) and control writes."""
        path = urlsplit(self.path).path
        if not self.tls:
            return self._control("POST", path)
        cloud = _cloud(self._host())
        if cloud is not None and self._host() == cloud[2] and path.endswith("/oauth2/v2.0/token"):
            return self._client_token(path)
        with self.state.lock:
            self.state.seen.append({"kind": "unknown", "method": "POST", "path": path})
        return self._send(404, {"error": {"code": "NotFound", "message": "no such path"}})

    def do_PUT(self) -> None:
        """Control writes."""
        self._control("PUT", urlsplit(self.path).path)

    def do_PATCH(self) -> None:
        """Control writes."""
        self._control("PATCH", urlsplit(self.path).path)

    def do_DELETE(self) -> None:
        """Control writes."""
        self._control("DELETE", urlsplit(self.path).path)

    # Microsoft Entra ID

    def _openid(self, path: str, cloud: tuple[str, str, str]) -> None:
        tenant = path.strip("/").split("/")[0]
        if path == "/common/discovery/instance":  # MSAL's check of an authority
            host = cloud[2]
            with self.state.lock:
                self.state.seen.append({"kind": "discovery", "host": host, "at": time.time()})
            return self._send(
                200,
                {
                    "tenant_discovery_endpoint": (
                        f"https://{host}/{self.state.tenant}/v2.0/.well-known/openid-configuration"
                    ),
                    "api-version": "1.1",
                    "metadata": [
                        {"preferred_network": host, "preferred_cache": host, "aliases": [host]}
                    ],
                },
            )
        if not path.endswith("/v2.0/.well-known/openid-configuration"):
            with self.state.lock:
                self.state.seen.append({"kind": "unknown", "method": "GET", "path": path})
            return self._send(404, {"error": "not_found"})
        origin = f"https://{self.headers.get('Host') or cloud[2]}"
        base = f"{origin}/{tenant}"
        self._send(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{origin}/{tenant}/v2.0",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "tenant_region_scope": "EU",
            },
        )

    def _client_token(self, path: str) -> None:
        tenant = path.strip("/").split("/")[0]
        form = {k: v[0] for k, v in parse_qs(self._body().decode()).items()}
        state = self.state
        client = form.get("client_id", "")
        with state.lock:
            state.seen.append(
                {
                    "kind": "token",
                    "host": self._host(),
                    "grant": form.get("grant_type"),
                    "client": client,
                    "at": time.time(),
                }
            )
            if tenant != state.tenant:
                return self._oauth_error(400, "invalid_request", 90002, "Tenant not found.")
            if form.get("grant_type") != "client_credentials":
                return self._oauth_error(400, "unsupported_grant_type", 70003, "Unsupported.")
            if "client_assertion" in form and client in state.certificates:
                endpoint = f"https://{self.headers.get('Host')}{path}"
                if not _signed_by(
                    form["client_assertion"], state.certificates[client], client, endpoint
                ):
                    return self._oauth_error(
                        401,
                        "invalid_client",
                        700027,
                        "Client assertion failed signature validation.",
                    )
            elif "client_assertion" in form:
                good = state.federated.get(client)
                if good is None or not secrets.compare_digest(good, form["client_assertion"]):
                    return self._oauth_error(401, "invalid_client", 700024, "Bad assertion.")
            else:
                good = state.clients.get(client)
                if good is None or not secrets.compare_digest(good, form.get("client_secret", "")):
                    return self._oauth_error(
                        401, "invalid_client", 7000215, "Invalid client secret provided."
                    )
            scope = form.get("scope", "").split(" ")[0]
            token = self._issue(f"client:{client}", scope.removesuffix("/.default"))
            seconds = state.token_seconds
        self._send(
            200,
            {
                "token_type": "Bearer",
                "expires_in": seconds,
                "ext_expires_in": seconds,
                "access_token": token,
            },
        )

    def _oauth_error(self, status: int, error: str, code: int, text: str) -> None:
        self._send(
            status,
            {
                "error": error,
                "error_description": f"AADSTS{code}: {text} (stand-in)",
                "error_codes": [code],
            },
        )

    def _issue(self, identity: str, resource: str) -> str:
        """A new signed token (caller holds the lock)."""
        audience, expires = resource.rstrip("/"), time.time() + self.state.token_seconds
        claims = {"sub": identity, "aud": audience, "exp": expires, "jti": secrets.token_hex(8)}
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        mac = hmac.new(self.state.signing_key, body.encode(), hashlib.sha256).hexdigest()
        token = f"standin.{body}.{mac}"
        self.state.tokens[token] = Token(identity, audience, expires)
        return token

    def _verify(self, token: str) -> Token | None:
        """The claims of a token this stand-in (or an earlier run in its folder) signed."""
        _, _, rest = token.partition(".")
        body, _, mac = rest.partition(".")
        good = hmac.new(self.state.signing_key, body.encode(), hashlib.sha256).hexdigest()
        if not body or not hmac.compare_digest(good, mac):
            return None
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return Token(claims["sub"], claims["aud"], claims["exp"])

    def _imds(self) -> None:
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        state = self.state
        with state.lock:
            state.seen.append(
                {"kind": "imds", "metadata": self.headers.get("Metadata"), "at": time.time()}
            )
            if self.headers.get("Metadata", "").lower() != "true":
                return self._send(
                    400,
                    {
                        "error": "invalid_request",
                        "error_description": "Required metadata header not specified",
                    },
                )
            resource = query.get("resource", "")
            if not resource:
                return self._send(
                    400, {"error": "invalid_request", "error_description": "resource missing"}
                )
            who = query.get("client_id") or "system"
            token = self._issue(f"mi:{who}", resource)
            seconds = state.token_seconds
        now = int(time.time())
        garbled = state.imds_garbled
        self._send(
            200,
            {
                "access_token": token,
                "client_id": who,
                "expires_in": "soon" if garbled else str(seconds),
                "expires_on": "soon" if garbled else str(now + seconds),
                "ext_expires_in": str(seconds),
                "not_before": str(now),
                "resource": resource,
                "token_type": "Bearer",
            },
        )

    def _app_service(self) -> None:
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        state = self.state
        header = self.headers.get("X-IDENTITY-HEADER", "")
        with state.lock:
            state.seen.append({"kind": "app_service", "at": time.time()})
            if not state.identity_header or not hmac.compare_digest(header, state.identity_header):
                return self._send(401, {"error": "unauthorized"})
            resource = query.get("resource", "")
            token = self._issue("mi:app-service", resource)
            seconds = state.token_seconds
        self._send(
            200,
            {
                "access_token": token,
                "expires_on": str(int(time.time()) + seconds),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": "app-service",
            },
        )

    # Key Vault

    def _challenge(self, cloud: tuple[str, str, str], message: str) -> None:
        header = (
            f'Bearer authorization="https://{cloud[2]}/{self.state.tenant}",'
            f' resource="{self.state.challenge_resource or cloud[1]}"'
        )
        self._send(
            401,
            {"error": {"code": "Unauthorized", "message": message}},
            {"WWW-Authenticate": header},
        )

    def _get_secret(self, path: str, cloud: tuple[str, str, str]) -> None:
        state = self.state
        parts = path.strip("/").split("/")
        query = parse_qs(urlsplit(self.path).query)
        auth = self.headers.get("Authorization", "")
        with state.lock:
            record: dict[str, Any] = {
                "kind": "vault",
                "host": self._host(),
                "path": path,
                "bearer": auth.startswith("Bearer "),
                "at": time.time(),
            }
            state.seen.append(record)
            if not query.get("api-version"):
                return self._error(400, "BadParameter", "api-version is required")
            token = self._verify(auth.removeprefix("Bearer ")) if auth else None
            if token is None:
                return self._challenge(cloud, "Request is missing a valid Bearer token.")
            if token.expires < time.time():
                record["expired_token"] = True
                return self._challenge(cloud, "The access token has expired.")
            if token.resource != cloud[1]:
                return self._challenge(cloud, "The access token is for another audience.")
            record["identity"] = token.identity
            if state.fail < 0:  # down until told otherwise
                return self._error(state.fail_status, "ServiceUnavailable", "Try again later.")
            if state.fail > 0:
                state.fail -= 1
                return self._error(state.fail_status, "ServiceUnavailable", "Try again later.")
            if state.throttle > 0:
                state.throttle -= 1
                return self._error(
                    429,
                    "Throttled",
                    "Request was not processed because too many requests were received.",
                    headers={"Retry-After": str(state.retry_after)},
                )
            if state.readers is not None and token.identity not in state.readers:
                return self._error(
                    403, "Forbidden", "Caller is not authorized.", inner="ForbiddenByRbac"
                )
            name = parts[1] if len(parts) > 1 else ""
            versions = state.secrets.get(name)
            if versions is None or name in state.deleted or len(parts) > 3:
                return self._error(404, "SecretNotFound", f"Secret {name} not found.")
            if len(parts) == 3 and parts[2]:
                chosen = [v for v in versions if v.id == parts[2]]
                if not chosen:
                    return self._error(404, "SecretNotFound", f"Secret {name} not found.")
                version = chosen[0]
            else:
                version = versions[-1]
            if not version.enabled:
                return self._error(
                    403,
                    "Forbidden",
                    "Operation get is not allowed on a disabled secret.",
                    inner="SecretDisabled",
                )
            attributes: dict[str, Any] = {
                "enabled": True,
                "created": version.created,
                "updated": version.updated,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            }
            if version.exp is not None:
                attributes["exp"] = version.exp
            if version.nbf is not None:
                attributes["nbf"] = version.nbf
            host = self.headers.get("Host", "")
            bundle = {
                "value": version.value,
                "id": f"https://{host}/secrets/{name}/{version.id}",
                "attributes": attributes,
                "tags": {},
            }
        self._send(200, bundle)

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        inner: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        error: dict[str, Any] = {"code": code, "message": message}
        if inner:
            error["innererror"] = {"code": inner}
        self._send(status, {"error": error}, headers)

    # Control

    def _control(self, method: str, path: str) -> None:
        state = self.state
        body = json.loads(self._body() or b"null")
        parts = path.strip("/").split("/")
        if parts[0] != "control":
            return self._send(404, {"error": "not_found"})
        what = parts[1] if len(parts) > 1 else ""
        with state.lock:
            if what == "health":
                return self._send(200, {"status": "ok"})
            if what == "seen" and method == "GET":
                return self._send(200, {"seen": state.seen})
            if what == "tokens" and method == "GET":  # for leak tests: what must never show
                return self._send(200, {"tokens": list(state.tokens)})
            if what == "seen" and method == "DELETE":
                state.seen.clear()
                return self._send(200, {})
            if what == "secrets" and method == "POST" and len(parts) == 3:
                version = Version(
                    secrets.token_hex(16),
                    body["value"],
                    enabled=body.get("enabled", True),
                    exp=body.get("exp"),
                    nbf=body.get("nbf"),
                )
                state.secrets.setdefault(parts[2], []).append(version)
                state.deleted.discard(parts[2])
                return self._send(200, {"version": version.id})
            if what == "secrets" and method == "PATCH" and len(parts) == 4:
                for found in state.secrets.get(parts[2], []):
                    if found.id == parts[3]:
                        for key in ("enabled", "exp", "nbf"):
                            if key in body:
                                setattr(found, key, body[key])
                        found.updated = int(time.time())
                        return self._send(200, {})
                return self._send(404, {"error": "no such version"})
            if what == "secrets" and method == "DELETE" and len(parts) == 3:
                state.deleted.add(parts[2])
                return self._send(200, {})
            if what == "clients" and method == "PUT":
                state.clients.update(body)
                return self._send(200, {})
            if what == "certificates" and method == "PUT":
                state.certificates.update(body)
                return self._send(200, {})
            if what == "federated" and method == "PUT":
                state.federated.update(body)
                return self._send(200, {})
            if what == "readers" and method == "PUT":
                state.readers = body
                return self._send(200, {})
            if what == "imds-garbled" and method == "PUT":
                state.imds_garbled = bool(body)
                return self._send(200, {})
            if what == "challenge-resource" and method == "PUT":
                state.challenge_resource = body
                return self._send(200, {})
            if what == "identity-header" and method == "PUT":
                state.identity_header = str(body)
                return self._send(200, {})
            if what == "revoke-tokens" and method == "PUT":  # every token issued so far
                state.signing_key = secrets.token_bytes(32)
                return self._send(200, {})
            if what == "token-seconds" and method == "PUT":
                state.token_seconds = int(body)
                return self._send(200, {})
            if what == "throttle" and method == "PUT":
                state.throttle, state.retry_after = int(body["count"]), int(body["retry_after"])
                return self._send(200, {})
            if what == "fail" and method == "PUT":
                state.fail, state.fail_status = int(body["count"]), int(body.get("status", 503))
                return self._send(200, {})
        self._send(404, {"error": "no such control"})


def _signed_by(assertion: str, cert_pem: str, client: str, endpoint: str) -> bool:
    """Whether a client assertion (a JWT, RS256 or PS256) is signed by the certificate's
    key, for this client (iss and sub), for this token endpoint (aud), and not expired."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    def decode(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    try:
        head, body, signature = assertion.split(".")
        header, claims = json.loads(decode(head)), json.loads(decode(body))
        key = x509.load_pem_x509_certificate(cert_pem.encode()).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        signed, sig = f"{head}.{body}".encode(), decode(signature)
        if header.get("alg") == "PS256":
            pss = padding.PSS(padding.MGF1(hashes.SHA256()), hashes.SHA256.digest_size)
            key.verify(sig, signed, pss, hashes.SHA256())
        elif header.get("alg") == "RS256":
            key.verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (ValueError, AssertionError, InvalidSignature):
        return False
    return bool(
        claims.get("iss") == claims.get("sub") == client
        and claims.get("aud") == endpoint
        and float(claims.get("exp", 0)) > time.time()
    )


def write_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA (`ca.pem`) and a server certificate for the stand-in's names signed by it
    (`cert.pem`, `key.pem`), made once per folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_path, cert_path, key_path = workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem"
    if ca_path.exists() and cert_path.exists() and key_path.exists():
        return ca_path, cert_path, key_path
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Azure stand-in test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vault.azure.net")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name) for name in (*TLS_NAMES, "localhost")]
                + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    workdir.mkdir(parents=True, exist_ok=True)
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.touch(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def serve(workdir: Path, tls_port: int, port: int, state: State | None = None) -> None:
    """Serve the TLS names on `tls_port` and IMDS and control on `port` (both loopback)
    until interrupted; prints one `ready` line with both ports."""
    import ssl

    state = state or State()
    _, cert, key = write_certificates(workdir)
    signing_key = workdir / "token-signing-key"
    if not signing_key.exists():
        signing_key.touch(0o600)
        signing_key.write_bytes(secrets.token_bytes(32))
    state.signing_key = signing_key.read_bytes()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tls_handler = type("TlsHandler", (Handler,), {"state": state, "tls": True})
    plain_handler = type("PlainHandler", (Handler,), {"state": state, "tls": False})
    secure = ThreadingHTTPServer(("127.0.0.1", tls_port), tls_handler)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    plain = ThreadingHTTPServer(("127.0.0.1", port), plain_handler)
    secure.daemon_threads = plain.daemon_threads = True
    threading.Thread(target=secure.serve_forever, daemon=True).start()
    print(
        json.dumps(
            {"ready": True, "tls_port": secure.server_address[1], "port": plain.server_address[1]}
        ),
        flush=True,
    )
    try:
        plain.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        secure.shutdown()
        plain.server_close()
        secure.server_close()


DEV_CLIENT_ID = "publer-proxy-dev"
START_TIMEOUT_SECONDS = 20.0


@dataclass
class StandIn:
    """A running stand-in process, its ports and its control calls."""

    process: Any  # subprocess.Popen[bytes]
    workdir: Path
    tls_port: int
    port: int
    log_path: Path

    @property
    def ca(self) -> Path:
        """The CA that signed the stand-in's TLS certificate."""
        return self.workdir / "ca.pem"

    @property
    def connect_to(self) -> str:
        """The address the proxy dials for the stand-in's TLS names."""
        return f"127.0.0.1:{self.tls_port}"

    @property
    def imds(self) -> str:
        """The managed-identity endpoint's origin (AZURE_POD_IDENTITY_AUTHORITY_HOST)."""
        return f"http://127.0.0.1:{self.port}"

    def control(self, method: str, path: str, body: Any = None) -> Any:
        """One control call; its JSON answer. Raises on an error status."""
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/control/{path}", data=data, method=method
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as answer:
            return json.loads(answer.read() or b"null")

    def put_secret(self, name: str, value: str, **attributes: Any) -> str:
        """A new version of `name` (it becomes the latest); its version id."""
        found: str = self.control("POST", f"secrets/{name}", {"value": value, **attributes})[
            "version"
        ]
        return found

    def set_attributes(self, name: str, version: str, **attributes: Any) -> None:
        """Change a version's enabled, exp or nbf."""
        self.control("PATCH", f"secrets/{name}/{version}", attributes)

    def delete_secret(self, name: str) -> None:
        """Soft-delete `name`: reads answer 404 until it is set again."""
        self.control("DELETE", f"secrets/{name}")

    def add_client(self, client_id: str, secret: str) -> None:
        """An application that may sign in with the client-credentials grant."""
        self.control("PUT", "clients", {client_id: secret})

    def seen(self) -> list[dict[str, Any]]:
        """What the stand-in received, in order (never a secret or a token)."""
        found: list[dict[str, Any]] = self.control("GET", "seen")["seen"]
        return found

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except Exception:
                self.process.kill()
                self.process.wait()


def start_standin(workdir: Path, *, tls_port: int = 0, port: int = 0) -> StandIn:
    """The stand-in as a child process on loopback (free ports unless given), once it
    answers; its certificates are written into `workdir` (kept across restarts)."""
    import subprocess
    import urllib.request

    from proxy.dev.stack import free_port

    workdir.mkdir(parents=True, exist_ok=True)
    write_certificates(workdir)
    tls_port, port = tls_port or free_port(), port or free_port()
    log_path = workdir / f"azure-standin-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.dev.azure_standin",
                "--workdir",
                str(workdir),
                "--tls-port",
                str(tls_port),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    standin = StandIn(process, workdir, tls_port, port, log_path)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with opener.open(f"http://127.0.0.1:{port}/control/health", timeout=1):
                return standin
        except OSError:
            time.sleep(0.05)
    standin.stop()
    raise RuntimeError(f"the Azure stand-in did not start: {log_path.read_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    """The command line: see the module docstring."""
    import signal

    parser = argparse.ArgumentParser(prog="python -m proxy.dev.azure_standin")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve(args.workdir, args.tls_port, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
