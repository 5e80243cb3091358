"""The forward proxy's start-up: its CA, its listener beside uvicorn, and what `check` prints.

`TunnellingServer` is uvicorn's server with the forward-proxy listener (proxy/tunnel/session.py)
started after the app's lifespan and stopped before the app's shutdown, so tunnels share
the app's state (routes, keys, budget, metrics) and its graceful SIGTERM. The CA is made
(or read from Vault) and the listener's port bound before anything listens: a mistake
stops the start, and the CA certificate exists before /readyz says ready.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import sys
from urllib.parse import urlsplit

import structlog
import uvicorn
from cryptography import x509
from prometheus_client import Counter
from starlette.types import ASGIApp

from proxy.config.settings import Settings
from proxy.hop.services import LIVE_KEY, LiveServices
from proxy.keys.sources.vault import VaultError, VaultSession
from proxy.masking.secrets import SecretRegistry
from proxy.tunnel.ca import CAError, InterceptionCA, constraint_problem, fingerprint, normalize_host
from proxy.tunnel.session import TunnelListener

log = structlog.get_logger("proxy.tunnel.session")
LIMITS = "critical name constraint, no names below it, no IP addresses"


def upstream_target(settings: Settings) -> tuple[str, int]:
    """The host and port tunnels may be opened to: the upstream's."""
    parts = urlsplit(settings.upstream.url)
    return normalize_host(parts.hostname or ""), parts.port or 443


def describe_forward_proxy(settings: Settings) -> list[str]:
    """The forward proxy as `check` prints it, with the CA certificate the running proxy wrote."""
    forward = settings.forward_proxy
    if forward is None:
        return ["forward proxy: off (no forward_proxy section)"]
    host, port = upstream_target(settings)
    path = forward.ca_certificate_file
    lines = [
        "forward proxy",
        f"  listen:     {forward.host}:{forward.port}  (CONNECT {host}:{port} only;"
        " absolute form for its origin from loopback clients)",
        "  CA key:     "
        + (
            f"read from Vault {forward.ca_vault.mount}/{forward.ca_vault.path} at start,"
            " held in memory only"
            if forward.ca_vault
            else "generated at start, held in memory only, never written"
        ),
        f"  CA file:    {path}",
        f"  leaves:     {forward.leaf_lifetime_hours:g} h, renewed at half-life",
    ]
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return [*lines, "  CA:         no certificate yet (serve writes it at start)"]
    except (OSError, ValueError) as exc:
        return [*lines, f"  CA:         {path} cannot be read as a PEM certificate ({exc})"]
    problem = constraint_problem(cert, host)
    return [
        *lines,
        f"  CA sha256:  {fingerprint(cert)}",
        f"  CA expires: {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
        f"  CA limits:  {problem or f'{host} only ({LIMITS})'}",
    ]


def make_ca(settings: Settings) -> InterceptionCA:
    """The interception CA for this run, its certificate written for clients to trust."""
    forward = settings.forward_proxy
    assert forward is not None
    host, _ = upstream_target(settings)
    ca = InterceptionCA.generate(
        host, leaf_lifetime=dt.timedelta(hours=forward.leaf_lifetime_hours)
    )
    ca.write_certificate(forward.ca_certificate_file)
    return ca


def ca_from_vault(settings: Settings, session: VaultSession) -> InterceptionCA:
    """The CA kept in Vault (`forward_proxy.ca_vault`), its certificate written for clients.

    Raises VaultError or CAError (a CA not limited to the upstream's host is refused).
    """
    forward = settings.forward_proxy
    assert forward is not None and forward.ca_vault is not None
    source = forward.ca_vault
    fields = session.read_fields(
        source.mount,
        source.path,
        source.kv_version,
        [source.certificate_field, source.private_key_field],
    )
    ca = InterceptionCA.from_pem(
        fields[source.certificate_field].encode(),
        fields[source.private_key_field].encode(),
        upstream_target(settings)[0],
        leaf_lifetime=dt.timedelta(hours=forward.leaf_lifetime_hours),
    )
    ca.write_certificate(forward.ca_certificate_file)
    return ca


class TunnellingServer(uvicorn.Server):
    """uvicorn's server, plus the forward-proxy listener sharing its app and its shutdown."""

    def __init__(self, config: uvicorn.Config, settings: Settings, secrets: SecretRegistry) -> None:
        super().__init__(config)
        self._settings = settings
        self._secrets = secrets
        self._listener: TunnelListener | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Bind and make (or read) the CA first: a mistake stops the start before anything
        listens, and the CA file exists before /readyz says ready."""
        forward = self._settings.forward_proxy
        assert forward is not None
        try:
            sock = TunnelListener.bind(forward)
        except OSError as exc:
            log.error("forward_proxy_failed", reason=f"{forward.host}:{forward.port}: {exc}")
            sys.exit(3)  # uvicorn's own start-up failure status
        try:
            if forward.ca_vault is None:
                ca = make_ca(self._settings)
            else:
                session = VaultSession(self._settings.vault, self._secrets)
                try:
                    ca = await asyncio.to_thread(ca_from_vault, self._settings, session)
                finally:
                    session.close()
        except (OSError, CAError, VaultError) as exc:
            where = (
                "forward_proxy.ca_vault" if forward.ca_vault else str(forward.ca_certificate_file)
            )
            log.error("forward_proxy_failed", reason=f"{where}: {exc}")
            sock.close()
            sys.exit(3)
        config = self.config

        def make_protocol(app: ASGIApp) -> asyncio.Protocol:
            protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )
            protocol.app = app  # type: ignore[attr-defined]
            return protocol

        await super().startup(sockets)
        if self.should_exit:
            sock.close()
            return
        live: LiveServices = self.lifespan.state[LIVE_KEY]
        services = live.services  # metrics are shared by every config generation
        self._listener = TunnelListener(
            forward, upstream_target(self._settings), ca, make_protocol, sock
        )
        tunnels = Counter(
            "publer_proxy_tunnels",
            "CONNECT tunnels, by outcome: opened, or the refusal or failure.",
            ["outcome"],
            registry=services.metrics.registry,
        )
        self._listener.start(lambda: live.services.routes, tunnels, services.metrics.refusals)
        host, port = self._listener.address
        log.info(
            "forward_proxy_listening",
            address=f"{host}:{port}",
            target="{}:{}".format(*upstream_target(self._settings)),
            ca_certificate_file=str(forward.ca_certificate_file),
            ca_fingerprint_sha256=ca.fingerprint,
            ca_not_after=ca.not_after.isoformat(),
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop the listener first; tunnels already serving finish like any connection."""
        if self._listener is not None:
            await self._listener.close()
        await super().shutdown(sockets)
