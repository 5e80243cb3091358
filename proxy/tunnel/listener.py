"""The forward proxy's start-up: its CA, its listener beside uvicorn, and what `check` prints.

`ForwardProxy` runs the forward-proxy listener (proxy/tunnel/session.py) beside the app:
started once the app's lifespan has started and stopped before the app's shutdown, so
tunnels share the app's state (routes, keys, budget, metrics) and its graceful SIGTERM.
The CA is made (or read from Vault) and the listener's port bound before anything
listens: a mistake stops the start, and the CA certificate exists before /readyz says
ready.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from typing import Any
from urllib.parse import urlsplit

import structlog
import uvicorn
from cryptography import x509
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.server import ServerState

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


class ForwardProxy:
    """The forward-proxy listener beside the app, started and stopped by the app's lifespan.

    `prepare` binds its port and makes (or reads) the CA before the server starts, so a
    mistake stops the start before anything listens and the CA file exists before /readyz
    says ready. `around` wraps the app: when its lifespan has started (the lifespan state
    holds the live services), the listener starts; when the lifespan is told to shut down,
    the listener stops accepting and its connections finish like uvicorn's own, before the
    app's shutdown closes what they use.
    """

    def __init__(self, settings: Settings, ca: InterceptionCA, sock: socket.socket) -> None:
        self._settings = settings
        self._ca = ca
        self._sock = sock
        self._listener: TunnelListener | None = None
        # The tunnels' connections and request tasks, as uvicorn keeps its own.
        self._state = ServerState()

    @classmethod
    def prepare(cls, settings: Settings, secrets: SecretRegistry) -> ForwardProxy | None:
        """Bind the port and make or read the CA; None (the reason logged) on a mistake."""
        forward = settings.forward_proxy
        assert forward is not None
        try:
            sock = TunnelListener.bind(forward)
        except OSError as exc:
            log.error("forward_proxy_failed", reason=f"{forward.host}:{forward.port}: {exc}")
            return None
        try:
            if forward.ca_vault is None:
                ca = make_ca(settings)
            else:
                session = VaultSession(settings.vault, secrets)
                try:
                    ca = ca_from_vault(settings, session)
                finally:
                    session.close()
        except (OSError, CAError, VaultError) as exc:
            where = (
                "forward_proxy.ca_vault" if forward.ca_vault else str(forward.ca_certificate_file)
            )
            log.error("forward_proxy_failed", reason=f"{where}: {exc}")
            sock.close()
            return None
        return cls(settings, ca, sock)

    def around(self, app: ASGIApp, config: uvicorn.Config) -> ASGIApp:
        """`app`, with the listener run by its lifespan; tunnels are served by `config`'s
        HTTP protocol, as the server's own connections are."""

        async def with_forward_proxy(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "lifespan":
                await app(scope, receive, send)
                return

            async def receive_shutdown_last() -> Message:
                message = await receive()
                if message["type"] == "lifespan.shutdown":
                    await self.close(config.timeout_graceful_shutdown)
                return message

            async def send_started(message: Message) -> None:
                if message["type"] == "lifespan.startup.complete":
                    self.start(config, scope["state"])
                elif message["type"] == "lifespan.startup.failed":
                    self._sock.close()
                await send(message)

            await app(scope, receive_shutdown_last, send_started)

        return with_forward_proxy

    def start(self, config: uvicorn.Config, app_state: dict[str, Any]) -> None:
        """Start accepting tunnels; `app_state` is the app's lifespan state."""
        if not config.loaded:
            config.load()
        state = self._state

        def make_protocol(app: ASGIApp) -> asyncio.Protocol:
            protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state=app_state
            )
            protocol.app = app  # type: ignore[attr-defined]
            return protocol

        forward = self._settings.forward_proxy
        assert forward is not None
        target = upstream_target(self._settings)
        live: LiveServices = app_state[LIVE_KEY]
        services = live.services  # metrics are shared by every config generation
        self._listener = TunnelListener(forward, target, self._ca, make_protocol, self._sock)
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
            target="{}:{}".format(*target),
            ca_certificate_file=str(forward.ca_certificate_file),
            ca_fingerprint_sha256=self._ca.fingerprint,
            ca_not_after=self._ca.not_after.isoformat(),
        )

    async def close(self, grace_seconds: float | None) -> None:
        """Stop accepting; let requests in flight in tunnels finish within `grace_seconds`
        (None: no limit), then cancel the rest, as uvicorn does with its own connections."""
        if self._listener is None:
            self._sock.close()
            return
        await self._listener.close()
        state = self._state
        for connection in list(state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(grace_seconds):
                while state.tasks:  # a shut-down connection closes after its response
                    await asyncio.wait(list(state.tasks))
        except TimeoutError:
            log.warning("forward_proxy_tunnels_cancelled", requests=len(state.tasks))
            for task in state.tasks:
                task.cancel()
