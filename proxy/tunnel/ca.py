"""The interception CA of the forward proxy, and the short-lived leaf it issues.

The CA can vouch for one host only: it carries a critical X.509 name constraint
(RFC 5280 section 4.2.1.10) that permits the upstream's DNS name and excludes every IP
address, so a client that checks name constraints (OpenSSL, BoringSSL, Go, NSS: all of
the common ones) rejects any other certificate it might sign, even one signed by
mistake or by someone who took its key. Its private key is made in memory at start and is
never written anywhere; only the certificate is, for clients to trust.

The leaf is issued for the upstream's host alone, lives `leaf_lifetime` and is replaced
once half of that has passed. Built with `cryptography` throughout.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = dt.timedelta(days=365)
LEAF_LIFETIME = dt.timedelta(hours=24)
# Clients whose clock runs a little behind still accept a certificate made just now.
CLOCK_SKEW = dt.timedelta(minutes=5)
_CURVE = ec.SECP256R1()  # P-256: every TLS client has it; a key takes microseconds
CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAError(Exception):
    """A CA that cannot be used as given (wrong name constraint, not a CA, expired...)."""


def normalize_host(host: str) -> str:
    """A DNS name as compared here: lower case, without the trailing root dot."""
    return host.strip().lower().removesuffix(".")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name_constraints(host: str) -> x509.NameConstraints:
    # A permitted DNS name also permits every name below it (RFC 5280 section 4.2.1.10:
    # x.app.publer.com); the leading-dot exclusion takes those out again (OpenSSL, Go, NSS
    # and webpki read a leading dot as "subdomains only").
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(host)],
        excluded_subtrees=[
            x509.DNSName(f".{host}"),
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ],
    )


_UNUSED_KEY_USAGES = (
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "encipher_only",
    "decipher_only",
)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """A KeyUsage extension (RFC 5280 section 4.2.1.3) granting only the usages named."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        **dict.fromkeys(_UNUSED_KEY_USAGES, False),
    )


def generate_ca(
    host: str, lifetime: dt.timedelta = CA_LIFETIME
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new CA certificate limited to `host` and its private key (kept in memory)."""
    host = normalize_host(host)
    key = ec.generate_private_key(_CURVE)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "publer-proxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"publer-proxy interception CA for {host}"),
        ]
    )
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(_name_constraints(host), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def constraint_problem(cert: x509.Certificate, host: str) -> str | None:
    """Why `cert` is not a CA limited to `host` by a critical name constraint, or None."""
    host = normalize_host(host)
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return "the certificate is not a CA (no basic constraints)"
    if not basic.value.ca:
        return "the certificate is not a CA (basic constraints say CA:FALSE)"
    try:
        found = cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return f"the CA has no name constraint; it must permit only {host}"
    if not found.critical:
        return "the CA's name constraint is not marked critical; clients could ignore it"
    permitted = found.value.permitted_subtrees or []
    names = [p.value for p in permitted if isinstance(p, x509.DNSName)]
    if len(permitted) != 1 or [normalize_host(n) for n in names] != [host]:
        return f"the CA's name constraint must permit exactly the DNS name {host}"
    excluded = found.value.excluded_subtrees or []
    networks = {str(e.value) for e in excluded if isinstance(e, x509.IPAddress)}
    if not {"0.0.0.0/0", "::/0"} <= networks:
        return "the CA's name constraint must exclude every IP address (0.0.0.0/0 and ::/0)"
    below = {normalize_host(e.value) for e in excluded if isinstance(e, x509.DNSName)}
    if f".{host}" not in below:
        return f"the CA's name constraint must exclude the names below {host} (.{host})"
    if cert.not_valid_after_utc <= _now():
        return f"the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint, as `openssl x509 -fingerprint -sha256` prints it."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


@dataclass(frozen=True)
class Leaf:
    """A server certificate for the upstream host, with the context that serves it."""

    context: ssl.SSLContext
    not_before: dt.datetime
    not_after: dt.datetime

    def due(self, now: dt.datetime) -> bool:
        """True once half of the leaf's life has passed: time to issue the next one."""
        return now >= self.not_before + (self.not_after - self.not_before) / 2


class InterceptionCA:
    """The CA for one upstream host; issues and renews the leaf the tunnel serves."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: CAKey,
        host: str,
        *,
        leaf_lifetime: dt.timedelta = LEAF_LIFETIME,
    ) -> None:
        self.host = normalize_host(host)
        problem = constraint_problem(cert, self.host)
        if problem is not None:
            raise CAError(problem)
        self.certificate = cert
        self._key = key
        self._leaf_lifetime = leaf_lifetime
        self._leaf: Leaf | None = None

    def __repr__(self) -> str:
        return f"InterceptionCA(host={self.host!r}, fingerprint={self.fingerprint!r})"

    @classmethod
    def generate(cls, host: str, *, leaf_lifetime: dt.timedelta = LEAF_LIFETIME) -> InterceptionCA:
        """A new CA, its key in memory only."""
        cert, key = generate_ca(host)
        return cls(cert, key, host, leaf_lifetime=leaf_lifetime)

    @classmethod
    def from_pem(
        cls,
        cert_pem: bytes,
        key_pem: bytes,
        host: str,
        *,
        leaf_lifetime: dt.timedelta = LEAF_LIFETIME,
    ) -> InterceptionCA:
        """A CA kept elsewhere (Vault), unencrypted PEM; CAError unless it is limited to `host`."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError:
            raise CAError("the CA certificate or key is not valid PEM") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CAError("the CA key must be an EC or RSA private key")
        if cert.public_key() != key.public_key():
            raise CAError("the CA key does not belong to the CA certificate")
        return cls(cert, key, host, leaf_lifetime=leaf_lifetime)

    @property
    def fingerprint(self) -> str:
        """The CA certificate's SHA-256 fingerprint."""
        return fingerprint(self.certificate)

    @property
    def not_after(self) -> dt.datetime:
        """When the CA certificate expires (UTC)."""
        return self.certificate.not_valid_after_utc

    def certificate_pem(self) -> bytes:
        """The CA certificate in PEM, for clients to trust; never the key."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write_certificate(self, path: Path) -> None:
        """Write the CA certificate (readable by everyone: it holds no secret)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(self.certificate_pem())
        partial.chmod(0o644)
        partial.replace(path)  # a client never reads half a certificate

    def issue(self, host: str, now: dt.datetime | None = None) -> tuple[bytes, bytes]:
        """A leaf certificate and key (PEM) for `host`, the CA's own host only."""
        if normalize_host(host) != self.host:
            raise CAError(f"this CA issues certificates for {self.host} only, not {host!r}")
        now = now or _now()
        key = ec.generate_private_key(_CURVE)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.host)]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + self._leaf_lifetime, self.not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(self.host)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                _key_usage(digital_signature=True),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.certificate_pem()
        return chain, key_pem

    def leaf(self, now: dt.datetime | None = None) -> Leaf:
        """The current leaf; a new one once the current one is half-way through its life."""
        now = now or _now()
        if self._leaf is None or self._leaf.due(now):
            chain, key_pem = self.issue(self.host, now)
            context = server_context(chain, key_pem)
            cert = x509.load_pem_x509_certificate(chain)
            self._leaf = Leaf(context, cert.not_valid_before_utc, cert.not_valid_after_utc)
        return self._leaf


def server_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context serving `chain_pem`: TLS 1.2 or later, HTTP/1.1 by ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Only HTTP/1.1 is spoken inside the tunnel; without this a client offering h2 could
    # believe it was accepted.
    context.set_alpn_protocols(["http/1.1"])
    with _memory_files(chain_pem, key_pem) as (chain_path, key_path):
        context.load_cert_chain(chain_path, key_path)
    return context


@contextmanager
def _memory_files(*contents: bytes) -> Iterator[list[str]]:
    """Paths that `ssl` can load, whose bytes never reach a disk (memfd on Linux)."""
    fds: list[int] = []
    try:
        if hasattr(os, "memfd_create"):
            for data in contents:
                fd = os.memfd_create("publer-proxy-leaf", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        else:  # pragma: no cover - other systems: a private folder, removed at once
            with tempfile.TemporaryDirectory() as folder:
                paths = []
                for index, data in enumerate(contents):
                    path = Path(folder) / f"{index}.pem"
                    path.touch(0o600)
                    path.write_bytes(data)
                    paths.append(str(path))
                yield paths
    finally:
        for fd in fds:
            os.close(fd)
