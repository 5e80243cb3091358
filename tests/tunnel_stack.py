"""A proxy with its forward-proxy listener, in front of a stand-in reached as app.publer.com.

The sandbox serves HTTPS with a certificate for `app.publer.com` (and 127.0.0.1, for its
control calls); the proxy's upstream is `https://app.publer.com`, dialled at the sandbox's
address through `upstream.connect_to`, so the tunnel is tested with the real name.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.rules.policy import hash_token
from tests.bao import Bao, free_port
from tests.servers import Proxy, Sandbox, Tls, proxy_config, start_proxy, start_sandbox

PUBLER_HOST = "app.publer.com"
AGENT_WORKSPACE = "aaaaaaaaaaaaaaaaaaaaaaaa"
OPEN_WORKSPACE = "bbbbbbbbbbbbbbbbbbbbbbbb"
CLIENTS_DIR = Path(__file__).parent / "clients"


def named_tls(workdir: Path, host: str = PUBLER_HOST) -> Tls:
    """A self-signed certificate for `host` and 127.0.0.1 (PEM files); it is its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
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
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    workdir.mkdir(parents=True, exist_ok=True)
    tls = Tls(workdir / "publer-cert.pem", workdir / "publer-cert.pem", workdir / "publer-key.pem")
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls


@dataclass
class TunnelStack:
    """The proxy, its forward-proxy address and CA file, the stand-in and a client token."""

    proxy: Proxy
    sandbox: Sandbox
    forward_port: int
    ca_file: Path
    client_token: str
    home: Path

    @property
    def forward_url(self) -> str:
        """HTTPS_PROXY for a client that sends no Proxy-Authorization."""
        return f"http://127.0.0.1:{self.forward_port}"

    def forward_url_with_token(self) -> str:
        """HTTPS_PROXY carrying the client token as the proxy password."""
        return f"http://agent:{self.client_token}@127.0.0.1:{self.forward_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """A client's whole environment: PATH, HOME and what the docs tell users to set."""
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home), "LANG": "C.UTF-8"}
        env.update(extra)
        return env


def start_tunnel_stack(
    workdir: Path,
    bao: Bao,
    token_file: Path,
    api_key: str,
    forward: dict[str, Any] | None = None,
    agent_limits: dict[str, Any] | None = None,
) -> TunnelStack:
    """The sandbox as app.publer.com, and a proxy with two routes and a forward proxy;
    `agent_limits` are the agents route's `limits`."""
    tls = named_tls(workdir / "publer-tls")
    sandbox = start_sandbox(workdir / "sandbox", api_key, tls=tls)
    client_token = "ct_" + secrets.token_hex(16)
    forward_port = free_port()
    ca_file = workdir / "ca" / "publer-proxy-ca.pem"
    routes: list[dict[str, Any]] = [
        {
            "name": "agents",
            "prefix": "/agents",
            "credential": "publer",
            "workspace_id": AGENT_WORKSPACE,
            "scopes": ["users", "posts", "accounts", "job_status", "media"],
            "clients": [{"name": "agent", "token_sha256": hash_token(client_token)}],
            **({"limits": agent_limits} if agent_limits is not None else {}),
        },
        {
            "name": "open",
            "credential": "publer",
            "workspace_id": OPEN_WORKSPACE,
            "scopes": ["users", "accounts"],
            "read_only": True,
        },
    ]
    config = proxy_config(
        bao.url,
        f"https://{PUBLER_HOST}",
        token_file=token_file,
        routes=routes,
        forward_proxy={
            "host": "127.0.0.1",
            "port": forward_port,
            "ca_certificate_file": str(ca_file),
            **(forward or {}),
        },
    )
    port = sandbox.url.rsplit(":", 1)[1]
    config["upstream"].update(connect_to=f"127.0.0.1:{port}", ca_file=str(tls.ca))
    try:
        proxy = start_proxy(workdir / "proxy", config)
    except BaseException:
        sandbox.stop()
        raise
    home = workdir / "client-home"
    home.mkdir(exist_ok=True)
    return TunnelStack(proxy, sandbox, forward_port, ca_file, client_token, home)
