"""A stand-in for the one Kubernetes API call that Vault's kubernetes auth makes.

Vault verifies a pod's service-account JWT by posting it to the API server's TokenReview
endpoint (POST /apis/authentication.k8s.io/v1/tokenreviews). This server answers that call
over HTTPS on loopback, with a self-signed certificate (`ca_pem`, for Vault's
kubernetes_ca_cert): a token it was given is authenticated as its service account,
anything else is not. Vault also reads the account's claims from the JWT itself, so
`service_account_jwt` makes a signed token with the claims a real cluster puts in one.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class ServiceAccount:
    """A Kubernetes service account: namespace, name and uid."""

    namespace: str
    name: str
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def username(self) -> str:
        """The user name the API server gives the account in a TokenReview."""
        return f"system:serviceaccount:{self.namespace}:{self.name}"


def service_account_jwt(account: ServiceAccount, key: rsa.RSAPrivateKey | None = None) -> str:
    """A signed JWT with the claims of a projected service-account token of `account`."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": account.username,
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "kubernetes.io": {
            "namespace": account.namespace,
            "serviceaccount": {"name": account.name, "uid": account.uid},
        },
    }
    return jwt.encode(claims, key, algorithm="RS256")


def self_signed_loopback_cert() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 signed by its own key: (certificate PEM, key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass
class TokenReviewServer:
    """A loopback HTTP server answering TokenReviews for the tokens in `accounts`.

    `reviews` records each review as (the reviewer's Authorization header, whether the
    token was known), so a test can check what Vault presented.
    """

    accounts: dict[str, ServiceAccount]
    reviews: list[tuple[str, bool]] = field(default_factory=list)
    ca_pem: str = ""
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to configure as Vault's kubernetes_host."""
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"https://{host!s}:{port}"

    def start(self) -> TokenReviewServer:
        """Listen with TLS on a free loopback port and serve from a daemon thread."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path.split("?")[0] != TOKENREVIEW_PATH:
                    self._answer(404, {"kind": "Status", "status": "Failure", "code": 404})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                review = json.loads(self.rfile.read(length) or b"{}")
                token = review.get("spec", {}).get("token", "")
                account = owner.accounts.get(token)
                owner.reviews.append((self.headers.get("Authorization", ""), account is not None))
                status: dict[str, object] = {"authenticated": account is not None}
                if account is not None:
                    status["user"] = {
                        "username": account.username,
                        "uid": account.uid,
                        "groups": [
                            "system:serviceaccounts",
                            f"system:serviceaccounts:{account.namespace}",
                            "system:authenticated",
                        ],
                    }
                    status["audiences"] = review.get("spec", {}).get("audiences") or []
                else:
                    status["error"] = "invalid bearer token"
                self._answer(
                    201,
                    {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "spec": review.get("spec", {}),
                        "status": status,
                    },
                )

            def _answer(self, code: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # the request line would carry nothing useful; keep test output clean

        cert_pem, key_pem = self_signed_loopback_cert()
        self.ca_pem = cert_pem.decode()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as directory:
            cert_file, key_file = Path(directory, "cert.pem"), Path(directory, "key.pem")
            cert_file.write_bytes(cert_pem)
            key_file.write_bytes(key_pem)
            context.load_cert_chain(cert_file, key_file)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> TokenReviewServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
