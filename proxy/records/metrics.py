"""The proxy's Prometheus series, on a registry of the app's own (not the global one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.rules.scopes import KNOWN_METHODS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def method_label(method: str) -> str:
    """The method as a label, bounded so a client cannot create series at will."""
    return method if method in KNOWN_METHODS else "OTHER"


@dataclass(frozen=True)
class PoolStats:
    """The upstream pool's connections to Publer right now, read at every scrape: held
    by a request, idle, and requests queued for one."""

    in_use: int
    idle: int
    waiting: int


@dataclass
class Metrics:
    """Every series the proxy exports; one instance per app."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry

        # `labels` is the label names, space-separated.
        def counter(name: str, text: str, labels: str = "") -> Counter:
            return Counter(name, text, labels.split(), registry=r)

        def gauge(name: str, text: str, labels: str = "") -> Gauge:
            return Gauge(name, text, labels.split(), registry=r)

        self.requests = counter(
            "publer_proxy_requests",
            "Responses sent to clients, by route, scope, method and status.",
            "route scope method status",
        )
        self.refusals = counter(
            "publer_proxy_refusals", "Requests the proxy refused, by code.", "code"
        )
        self.upstream_latency = Histogram(
            "publer_proxy_upstream_latency_seconds",
            "Time from sending a request to Publer to its response headers.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.vault_operations = counter(
            "publer_proxy_vault_operations",
            "Vault reads, logins and renewals, by outcome.",
            "operation outcome",
        )
        self.key_reads = counter(
            "publer_proxy_key_reads",
            "Key reads from each credential's source (vault, aws_secrets_manager, file, env),"
            " by outcome (ok, or what failed).",
            "credential source outcome",
        )
        self.key_rotations = counter(
            "publer_proxy_key_rotations",
            "Keys replaced by a new value or version from their source.",
            "credential source",
        )
        self.key_age = gauge(
            "publer_proxy_key_age_seconds",
            "Seconds since the held key's version was written (since it was read, when unknown).",
            "credential",
        )
        self.key_read_age = gauge(
            "publer_proxy_key_last_read_age_seconds",
            "Seconds since the key was last read from its source successfully.",
            "credential",
        )
        self.config_reloads = counter(
            "publer_proxy_config_reloads",
            "Config reloads (SIGHUP or a file change), by result: applied, invalid, refused.",
            "result",
        )
        self.budget_left = gauge(
            "publer_proxy_rate_limit_remaining",
            "Requests left in the credential's current rate-limit window.",
            "credential",
        )

        # Per client: names come from the config (plus `anonymous`), so series are bounded.
        self.client_requests = counter(
            "publer_proxy_client_requests",
            "Responses sent to clients, by route, client and status.",
            "route client status",
        )
        self.rate_limited = counter(
            "publer_proxy_rate_limited",
            "Requests refused for budget, by route, client and the limit that refused them.",
            "route client limit",
        )
        self.share_used = gauge(
            "publer_proxy_share_used",
            "Requests each client spent in its credential's current window.",
            "credential route client",
        )
        self.share_nominal = gauge(
            "publer_proxy_share_requests",
            "Each client's weighted share of its credential's window, all clients active.",
            "credential route client",
        )

        self.audit_lines = gauge(
            "publer_proxy_audit_lines",
            "Lines in the audit log's hash chain: the head's count, for `audit verify`.",
        )
        self.upstream_connections = gauge(
            "publer_proxy_upstream_connections",
            "Connections to Publer: in_use (held by a request) or idle (kept for reuse).",
            "state",
        )
        self.upstream_waiting = gauge(
            "publer_proxy_upstream_waiting_requests",
            "Requests waiting for a connection to Publer (all max_connections in use).",
        )

    def watch_pool(self, stats: Callable[[], PoolStats]) -> None:
        """Read the upstream pool's gauges from `stats` at every scrape."""
        self.upstream_connections.labels("in_use").set_function(lambda: stats().in_use)
        self.upstream_connections.labels("idle").set_function(lambda: stats().idle)
        self.upstream_waiting.set_function(lambda: stats().waiting)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
