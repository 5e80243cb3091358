"""The forward proxy in `publer-proxy dev`: the sandbox as app.publer.com, and lines to paste.

With the sandbox as upstream, the sandbox serves HTTPS with a certificate for
`app.publer.com` made here, and the proxy dials it by that name through
`upstream.connect_to`: a client that hard-codes https://app.publer.com reaches the sandbox
through the forward proxy exactly as it would reach Publer.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PUBLER_HOST = "app.publer.com"
PREFERRED_PORT = 3128


def sandbox_certificate(workdir: Path) -> Path:
    """Where `stand_in_tls` writes the sandbox's certificate."""
    return workdir / "sandbox-cert.pem"


def stand_in_tls(workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for app.publer.com and 127.0.0.1, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PUBLER_HOST)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(PUBLER_HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = sandbox_certificate(workdir), workdir / "sandbox-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _forward_port() -> int:
    for port in (PREFERRED_PORT, 0):
        try:
            with socket.create_server(("127.0.0.1", port)) as sock:
                found: int = sock.getsockname()[1]
                return found
        except OSError:
            continue
    raise OSError("no free port for the forward proxy")


def add_forward_proxy(config: dict[str, object], workdir: Path, sandbox_ca: Path | None) -> str:
    """Turn the forward proxy on in the dev config; the lines for the user to paste.

    `sandbox_ca` is set when the upstream is the sandbox over HTTPS (then it becomes
    app.publer.com, dialled at the sandbox's address).
    """
    upstream = config["upstream"]
    assert isinstance(upstream, dict)
    parts = urlsplit(str(upstream["url"]))
    if sandbox_ca is not None:
        upstream.update(
            url=f"https://{PUBLER_HOST}",
            connect_to=f"127.0.0.1:{parts.port}",
            ca_file=str(sandbox_ca),
        )
    elif parts.scheme != "https":
        return "(forward proxy off: it needs an https:// upstream with a DNS name)"
    port = _forward_port()
    ca_file = workdir / "publer-proxy-ca.pem"
    config["forward_proxy"] = {
        "host": "127.0.0.1",
        "port": port,
        "ca_certificate_file": str(ca_file),
    }
    origin = str(upstream["url"])
    return paste_lines(port, ca_file, origin)


def paste_lines(port: int, ca_file: Path, origin: str) -> str:
    """What a client that hard-codes the origin needs in its environment, per ecosystem.

    NO_PROXY keeps loopback calls direct: with a proxy variable set, Python, Ruby and others
    would send even `http://127.0.0.1:...` (this proxy's own port, OpenBao) to the listener,
    which refuses every host but the origin's; the origin's host must never be in it.
    """
    proxy = f"http://127.0.0.1:{port}"
    return (
        f"Clients that hard-code {origin}: set HTTPS_PROXY and your ecosystem's CA variable.\n\n"
        f"  export HTTPS_PROXY={proxy}\n"
        "  # loopback calls (this proxy, OpenBao) go direct; add the other hosts your app calls\n"
        "  export NO_PROXY=127.0.0.1,localhost,::1\n"
        "  # Python (urllib, httpx, aiohttp), Ruby, Go; requests; Node; curl:\n"
        f"  export SSL_CERT_FILE={ca_file}\n"
        f"  export REQUESTS_CA_BUNDLE={ca_file}\n"
        f"  export NODE_EXTRA_CA_CERTS={ca_file}\n"
        f"  export CURL_CA_BUNDLE={ca_file}\n\n"
        f"  curl -s {origin}/api/v1/users/me\n\n"
        f"Ruby's Net::HTTP reads http_proxy instead (export http_proxy={proxy});"
        " Node's fetch needs NODE_USE_ENV_PROXY=1 (Node 24+) or undici's EnvHttpProxyAgent;"
        " Java needs -Dhttps.proxyHost/-Dhttps.proxyPort and a trust store;"
        " see docs/clients-you-cannot-change.md.\n"
    )
