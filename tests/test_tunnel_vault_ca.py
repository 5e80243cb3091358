"""The interception CA taken from Vault instead of made at start, against a real OpenBao."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.tunnel.ca import fingerprint, generate_ca
from tests.bao import Bao
from tests.servers import proxy_config
from tests.test_tunnel_clients import ACCOUNTS, assert_keyed_call, run_client
from tests.tunnel_stack import AGENT_WORKSPACE, PUBLER_HOST, start_tunnel_stack


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def test_ca_from_vault_serves_tunnels(
    tmp_path: Path, bao: Bao, token_file: Path, api_key: str
) -> None:
    """The CA kept in Vault signs the tunnel's leaf, its certificate (never its key) is
    written for clients, and the start log gives its fingerprint."""
    cert, key = generate_ca(PUBLER_HOST)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    bao.client().secrets.kv.v2.create_or_update_secret(
        path="publer/forward-ca",
        secret={"certificate": cert_pem, "private_key": pem(key)},
        mount_point="secret",
    )
    stack = start_tunnel_stack(
        tmp_path, bao, token_file, api_key, {"ca_vault": {"path": "publer/forward-ca"}}
    )
    try:
        assert stack.ca_file.read_text() == cert_pem
        env = stack.env(
            HTTPS_PROXY=stack.forward_url_with_token(), CURL_CA_BUNDLE=str(stack.ca_file)
        )
        stack.sandbox.clear()
        output = run_client(["curl", "-sS", "--fail-with-body", ACCOUNTS], env)
        assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)
        [started] = [e for e in stack.proxy.events() if e["event"] == "forward_proxy_listening"]
        assert started["ca_fingerprint_sha256"] == fingerprint(cert)
        assert "PRIVATE KEY" not in stack.proxy.output()
    finally:
        stack.proxy.stop()
        stack.sandbox.stop()


def test_vault_ca_without_name_constraint_stops_the_start(
    tmp_path: Path, bao: Bao, token_file: Path
) -> None:
    """A CA in Vault that could vouch for any host is refused: serve exits and says why."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "any-host CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    bao.client().secrets.kv.v2.create_or_update_secret(
        path="publer/unconstrained-ca",
        secret={
            "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "private_key": pem(key),
        },
        mount_point="secret",
    )
    config = proxy_config(
        bao.url,
        f"https://{PUBLER_HOST}",
        token_file=token_file,
        forward_proxy={
            "port": 0,
            "ca_certificate_file": str(tmp_path / "ca.pem"),
            "ca_vault": {"path": "publer/unconstrained-ca"},
        },
    )
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)],
        capture_output=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 3, output
    assert "forward_proxy.ca_vault: the CA has no name constraint" in output
    assert not (tmp_path / "ca.pem").exists()
    assert "PRIVATE KEY" not in output
