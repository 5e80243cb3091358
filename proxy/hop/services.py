"""The services of one config generation, and how the listeners reach the one in service.

`Services` is everything a request needs, made from one config (`proxy/runtime.py` builds
it at start and at every reload). The listeners (the reverse proxy's, the forward proxy's
tunnels) find the generation in service in the ASGI lifespan state under `LIVE_KEY`: an
object that is itself the forwarding app and says which services it uses now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from starlette.types import Receive, Scope, Send

from proxy.budget.shares import SharePlan
from proxy.budget.stores import Budget
from proxy.config.settings import Settings
from proxy.hop.upstream import Upstream
from proxy.keys.store import CredentialStore
from proxy.masking.secrets import SecretRegistry
from proxy.records.access_log import AccessLog
from proxy.records.activity import Activity
from proxy.records.audit import AuditLog
from proxy.records.metrics import Metrics
from proxy.rules.policy import RouteTable
from proxy.rules.scopes import ScopeMap

LIVE_KEY = "live"


@dataclass(frozen=True)
class Services:
    """Everything the forwarder needs, made once in the lifespan."""

    settings: Settings
    routes: RouteTable
    scope_map: ScopeMap
    credentials: CredentialStore
    upstream: Upstream
    budget: Budget
    metrics: Metrics
    secrets: SecretRegistry  # what responses are screened for before they reach a client
    activity: Activity
    shares: SharePlan
    audit: AuditLog
    # The one writer of the access record, for the forwarder and every refusal before it.
    access_log: AccessLog = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "access_log", AccessLog(self.metrics, self.audit, self.activity))


class LiveServices(Protocol):
    """The config generation in service, as a listener sees it: the forwarding ASGI app,
    and the services of the generation that serves new requests now."""

    @property
    def services(self) -> Services:
        """The services of the generation in service (a reload may replace them)."""
        ...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one request with the generation in service."""
        ...
