"""The access record of one request: the log line, the counters, the audit line.

The forwarder fills an `Outcome` as the request goes (the policy's verdict, the key used,
the status sent) and hands it to `AccessLog.record` once, whatever happened: allowed,
refused, broken off, or failed inside the proxy. Every request gets exactly one `request`
log line (key masked), one increment of `publer_proxy_requests` and of
`publer_proxy_client_requests`, and, for a mutating call, one audit line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from prometheus_client import Counter
from starlette.types import Scope

from proxy.config.settings import ANONYMOUS_CLIENT
from proxy.keys.store import HeldKey
from proxy.records.activity import Activity
from proxy.records.audit import AuditLog
from proxy.records.metrics import Metrics, method_label
from proxy.records.request_ids import REQUEST_ID_KEY
from proxy.rules.limits import Decision
from proxy.rules.policy import Verdict
from proxy.rules.publer import Rejection
from proxy.rules.refusals import STATUS

log = structlog.get_logger("proxy.records.access_log")

# The path as logged is cut to this many bytes; the audit line keeps more of it.
LOGGED_PATH_BYTES = 256
AUDITED_PATH_BYTES = 2048


@dataclass
class Outcome:
    """What the access record says about one request, filled in as the request goes."""

    verdict: Verdict | None = None
    decision: str = "allowed"  # "allowed", a refusal code, or how the request broke off
    status: int = 0  # the status the client got (499: it left before any)
    upstream_status: int | None = None
    key: HeldKey | None = None
    attempts: int = 0  # requests sent to Publer, retries and the replay included
    rejection: Rejection | None = None
    head_sent: bool = False  # the status line went out: a later failure truncates the body
    response_body: bytes | None = None  # Publer's response body, when small enough to hold
    # What a refusal before routing adds to the log line (the Host, Origin or target it
    # refused), already cut to a loggable length.
    logged: dict[str, str | None] | None = None
    limits: Decision | None = None  # the limit decision, on a route with limits
    allowed_accounts: frozenset[str] | None = None  # the accounts a limited route may see
    accounts: tuple[str, ...] | None = None  # the accounts the call acts on, when known


class AccessLog:
    """Writes the access record of each request; one per config generation."""

    def __init__(self, metrics: Metrics, audit: AuditLog, activity: Activity) -> None:
        self._metrics = metrics
        self._audit = audit
        self._activity = activity
        # Labelled children, kept: `labels()` costs a lock and a dict lookup per call.
        self._requests: dict[tuple[str, str, str, str], Counter] = {}
        self._client_requests: dict[tuple[str, str, str], Counter] = {}

    def record(self, scope: Scope, outcome: Outcome, duration: float) -> None:
        """Log, count and audit one request that took `duration` seconds."""
        verdict = outcome.verdict
        route = verdict.route.name if verdict and verdict.route else None
        named = verdict.client if verdict else None
        client = named or ANONYMOUS_CLIENT
        request_scope = verdict.scope if verdict else None
        method = method_label(scope["method"])
        raw_path: bytes = scope.get("raw_path") or b""
        request_id: str = scope[REQUEST_ID_KEY]
        extra = dict(outcome.logged or {})
        # A refusal may log the target in its own spelling (an absolute-form URL without
        # its userinfo, which would be a password).
        path = extra.pop("path", None)
        logged_path = path or raw_path[:LOGGED_PATH_BYTES].decode("latin-1")
        audited_path = path or raw_path[:AUDITED_PATH_BYTES].decode("latin-1")
        log.info(
            "request",
            route=route,
            client=client,
            method=method,
            path=logged_path,
            scope=request_scope,
            decision=outcome.decision,
            status=outcome.status,
            upstream_status=outcome.upstream_status,
            duration_ms=round(duration * 1000, 2),
            key=outcome.key.masked if outcome.key else None,
            key_version=outcome.key.version if outcome.key else None,
            attempts=outcome.attempts,
            **extra,
        )
        self._audit.record(
            request_id=request_id,
            route=route,
            client=client,
            method=scope["method"],
            path=audited_path,
            status=outcome.status,
            upstream_status=outcome.upstream_status,
            decision=outcome.decision,
            response_body=outcome.response_body,
            accounts=outcome.accounts,
        )
        self._count(route or "none", request_scope or "none", method, client, outcome.status)
        if outcome.decision in STATUS:
            self._metrics.refusals.labels(outcome.decision).inc()
            self._activity.refused(outcome.decision, outcome.status, route, named, request_id)

    def refused(
        self, scope: Scope, refusal_code: str, status: int, logged: Mapping[str, str | None]
    ) -> None:
        """Record a request refused before any route was chosen (a foreign Host, a web
        page's request, a misdirected request in a tunnel): the same line, counters and
        audit line as any other request."""
        self.record(scope, Outcome(decision=refusal_code, status=status, logged=dict(logged)), 0.0)

    def _count(self, route: str, scope: str, method: str, client: str, status: int) -> None:
        labels = (route, scope, method, str(status))
        counter = self._requests.get(labels)
        if counter is None:
            counter = self._requests[labels] = self._metrics.requests.labels(*labels)
        counter.inc()
        by_client = (route, client, labels[3])
        counter = self._client_requests.get(by_client)
        if counter is None:
            counter = self._client_requests[by_client] = self._metrics.client_requests.labels(
                *by_client
            )
        counter.inc()
