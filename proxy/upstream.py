"""The forwarding hop to Publer: one shared connection pool, streaming both ways.

Requests go straight to an httpx transport, not through `httpx.AsyncClient`: the client's
conveniences are each a hazard here (a cookie jar that replays one app's cookies on
another's request, redirect following that could carry the key elsewhere, `trust_env`
letting HTTPS_PROXY reroute keys, URL normalisation). The transport does none of them.
Low-level errors are mapped to the proxy's refusals in one place, `send`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable
from urllib.parse import urlsplit

import httpx

from proxy.errors import Refusal, UpstreamFailed
from proxy.settings import UpstreamSettings


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def make_transport(settings: UpstreamSettings) -> httpx.AsyncBaseTransport:
    """httpx's own transport, with certificate checks and no environment proxies."""
    return httpx.AsyncHTTPTransport(
        verify=_ssl_context(settings),
        trust_env=False,
        http1=True,
        http2=False,
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
            keepalive_expiry=30.0,
        ),
        retries=0,
    )


class Upstream:
    """Sends requests to the one configured origin and returns streaming responses."""

    def __init__(
        self, settings: UpstreamSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        parts = urlsplit(settings.url)
        self.scheme = parts.scheme
        self.hostname = parts.hostname or ""
        self.port = parts.port
        self.host_header = parts.netloc.encode("ascii")
        self._transport = transport or make_transport(settings)
        self._timeout = httpx.Timeout(
            connect=settings.connect_timeout_seconds,
            read=settings.read_timeout_seconds,
            write=settings.read_timeout_seconds,
            pool=settings.connect_timeout_seconds,
        ).as_dict()

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> httpx.Response:
        """Send one request; the response body is not read. Raises UpstreamFailed.

        `target` is the path and query exactly as checked; the origin never comes from
        the request, so no client input can send the key anywhere else (F4).
        """
        url = httpx.URL(
            scheme=self.scheme,
            host=self.hostname,
            port=self.port,
            raw_path=target.encode("ascii"),
        )
        request = httpx.Request(
            method,
            url,
            headers=headers,
            content=body,
            extensions={"timeout": self._timeout},
        )
        try:
            return await self._transport.handle_async_request(request)
        except httpx.TimeoutException:
            raise UpstreamFailed(
                Refusal.of("upstream_timeout", "Publer did not answer in time")
            ) from None
        except (httpx.TransportError, OSError) as exc:
            raise UpstreamFailed(
                Refusal.of(
                    "upstream_unreachable",
                    f"Publer could not be reached ({type(exc).__name__})",
                )
            ) from None

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._transport.aclose()
