"""The proxy as one ASGI app: its lifespan, its own endpoints, and the forwarder.

Dispatch is on the raw path: `/healthz`, `/readyz`, `/metrics` and the status page
exactly, everything else goes to the forwarder of the config generation in service
(`proxy/reload.py`), which routes by prefix and refuses with `no_route` itself. Starlette
serves the operational endpoints and runs the lifespan that builds every shared part.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.budget.shares import SharePlan
from proxy.budget.stores import make_budget, window_use
from proxy.config.settings import Settings
from proxy.edge import server as edge_server
from proxy.edge.guard import BrowserGuard
from proxy.hop.forwarder import Forwarder
from proxy.hop.services import LIVE_KEY, Services
from proxy.hop.upstream import Upstream
from proxy.keys.outbound import import_requests
from proxy.keys.store import CredentialStore
from proxy.loading import LoadedConfig, in_code
from proxy.masking.secrets import SecretRegistry, masked_url
from proxy.records.activity import Activity
from proxy.records.audit import AuditLog
from proxy.records.metrics import CONTENT_TYPE, Metrics
from proxy.records.request_ids import RequestContext
from proxy.reload import Generation, Live, Reloader
from proxy.rules.policy import build_routes
from proxy.rules.scopes import ScopeMap
from proxy.status import STATUS_HTML_PATH, STATUS_JSON_PATH, status_html, status_json

if TYPE_CHECKING:
    from proxy.keys.sources.vault import VaultSession

log = structlog.get_logger(__name__)
OPS_PATHS = frozenset(
    {b"/healthz", b"/readyz", b"/metrics", STATUS_HTML_PATH.encode(), STATUS_JSON_PATH.encode()}
)


def _services(request: Request) -> Services:
    live: Live = request.state.live
    return live.current.services


async def healthz(_request: Request) -> Response:
    """200 while the process serves."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 when every credential in use holds a usable key; the body never holds a key."""
    store = _services(request).credentials
    ready = store.ready()
    states = store.status()
    degraded = any(entry["state"] == "stale" for entry in states.values())
    status = "ready" if ready and not degraded else "degraded" if ready else "unavailable"
    live: Live = request.state.live
    return JSONResponse(
        {"status": status, "credentials": states, "config": live.describe()},
        status_code=200 if ready else 503,
    )


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    services = _services(request)
    services.credentials.update_metrics()
    await update_share_metrics(services)
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


async def update_share_metrics(services: Services) -> None:
    """Set each client's use of its credential's current window, as /metrics shows it."""
    uses = await window_use(services.budget, services.shares, services.settings.rate_limit)
    # Only the clients of the config now serving: a reload may have removed some.
    services.metrics.share_used.clear()
    services.metrics.share_nominal.clear()
    for window in uses:
        for use in window.shares:
            labels = (window.credential, use.route, use.client)
            services.metrics.share_used.labels(*labels).set(use.used)
            services.metrics.share_nominal.labels(*labels).set(use.share)


def create_app(
    settings: Settings,
    scope_map: ScopeMap,
    secrets: SecretRegistry,
    *,
    vault: VaultSession | None = None,
    upstream: Upstream | None = None,
    loaded: LoadedConfig | None = None,
) -> ASGIApp:
    """The proxy as one ASGI 3 app; its lifespan reads the keys (logging in to Vault when
    one holds them) and opens the upstream connections. `vault` and `upstream` replace
    the real ones in tests.

    With `loaded` (a config read from its file) the file is reloaded on SIGHUP and, when
    configured, when it changes. The audit sink is opened here, before serving:
    AuditSinkError if it cannot be used (a reload keeps the sink the process started with).
    """
    metrics_registry = Metrics()
    audit = AuditLog(settings.audit, secrets, metrics_registry, settings.rate_limit.redis_url)
    audit.open()

    for value in settings.secret_values():
        secrets.add(value)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        registry = metrics_registry
        store = CredentialStore(
            settings.credentials_in_use(),
            registry,
            secrets=secrets,
            vault_settings=settings.vault,
            vault=vault,
        )
        services = Services(
            settings=settings,
            routes=build_routes(settings.routes),
            scope_map=scope_map,
            credentials=store,
            upstream=upstream or Upstream(settings.upstream),
            budget=make_budget(settings.rate_limit),
            metrics=registry,
            secrets=secrets,
            activity=Activity(),
            shares=SharePlan.of(settings.routes),
            audit=audit,
        )
        config = loaded or in_code(settings, scope_map)
        live = Live(Generation(1, config, services, Forwarder(services)))
        reloader = Reloader(live, config.path) if config.path is not None else None
        registry.watch_pool(services.upstream.stats)
        for warning in settings.warnings():
            log.warning("insecure_setting", detail=warning)
        await store.start()
        await audit.start()
        log.info(
            "proxy_started",
            routes=[r.name for r in settings.routes],
            upstream=settings.upstream.url,
            upstream_proxy=masked_url(settings.upstream.proxy),
            vault_proxy=masked_url(settings.vault.proxy),
            credentials=store.status(),
        )
        # Everything made so far (modules, config, the app) lives as long as the process.
        # Frozen, the collector stops walking it: under load a full collection stalled
        # every request for about 25 ms; it now walks only what requests left behind.
        gc.collect()
        gc.freeze()
        if reloader is not None:
            await reloader.start()
        try:
            yield {LIVE_KEY: live}
        finally:
            if reloader is not None:
                await reloader.stop()
            await store.stop()
            store.close()
            await services.upstream.aclose()
            await live.current.services.budget.close()
            await audit.close()
            log.info("proxy_stopped")

    ops = Starlette(
        routes=[
            StarletteRoute("/healthz", healthz, methods=["GET", "HEAD"]),
            StarletteRoute("/readyz", readyz, methods=["GET", "HEAD"]),
            StarletteRoute("/metrics", metrics, methods=["GET", "HEAD"]),
            StarletteRoute(STATUS_HTML_PATH, status_html, methods=["GET", "HEAD"]),
            StarletteRoute(STATUS_JSON_PATH, status_json, methods=["GET", "HEAD"]),
        ],
        lifespan=lifespan,
    )

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("raw_path", b"") not in OPS_PATHS:
            await scope["state"][LIVE_KEY](scope, receive, send)
        else:
            await ops(scope, receive, send)

    return RequestContext(
        BrowserGuard(dispatch, live_key=LIVE_KEY, listener="listen", operator_paths=OPS_PATHS)
    )


def serve(
    settings: Settings,
    app: ASGIApp,
    secrets: SecretRegistry,
    sockets: list[socket.socket] | None = None,
) -> int:
    """Serve `app` (`proxy.edge.server.serve`), with the forward-proxy listener beside it
    when the config has one; the exit status."""
    if settings.forward_proxy is None:
        return edge_server.serve(settings, app, sockets)
    import_requests()  # the listener loads the Vault client (hvac, over requests)
    from proxy.tunnel.listener import ForwardProxy

    forward = ForwardProxy.prepare(settings, secrets)
    if forward is None:
        return 3  # as uvicorn exits when it cannot start
    app = forward.around(app, edge_server.uvicorn_config(settings, app))
    return edge_server.serve(settings, app, sockets)
