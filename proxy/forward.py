"""The one forwarding endpoint: route, authenticate, check, inject, forward, log.

A pure ASGI app, because every decision is made on the raw request (`raw_path`, the raw
header list) and both bodies stream: nothing here reads a whole body into memory, except
small request bodies kept so that a request can be replayed once after Publer rejects
the key.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from prometheus_client import Counter
from starlette.types import Message, Receive, Scope, Send

from proxy.activity import Activity
from proxy.audit import AuditLog
from proxy.credentials import CredentialStore, HeldKey
from proxy.downstream import BodyTooLarge, ClientGone, Downstream
from proxy.errors import STATUS, ProxyError, RateLimitHeaders, Refusal, UpstreamFailed
from proxy.headers import downstream_headers, header_values, upstream_headers
from proxy.metrics import Metrics, method_label
from proxy.paths import ABSOLUTE_FORM_KEY
from proxy.policy import RequestHead, RouteTable, Verdict, decide
from proxy.publer import (
    MAX_MESSAGE_BYTES,
    REJECTION_STATUSES,
    Rejection,
    rejection,
    rejection_hint,
)
from proxy.ratelimit import Budget, Queue, retry_after_header
from proxy.redact import SecretRegistry
from proxy.requestid import REQUEST_ID_KEY
from proxy.scopes import READ_METHODS, ScopeMap
from proxy.screening import screen_answer
from proxy.settings import ANONYMOUS_CLIENT, Settings
from proxy.shares import SharePlan, limit_requests, refusal_text
from proxy.upstream import Response, Upstream

log = structlog.get_logger("proxy.access")

# Bodies up to this size are kept in memory so the request can be replayed after Publer
# rejects the key.
REPLAYABLE_BODY_BYTES = 256 * 1024
RETRY_STATUSES = frozenset({502, 503, 504})
NO_BODY_STATUSES = frozenset({204, 304})
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
EPOCH_2001 = 1_000_000_000  # a reset above this is a timestamp, not a number of seconds
# Responses up to this size (by Content-Length) are read whole and sent in one piece.
SMALL_RESPONSE_BYTES = 64 * 1024


@dataclass
class Outcome:
    """What the access log line says about one request."""

    verdict: Verdict | None = None
    decision: str = "allowed"
    status: int = 0
    upstream_status: int | None = None
    key: HeldKey | None = None
    attempts: int = 0
    rejection: Rejection | None = None
    head_sent: bool = False  # the status line went out: a later failure truncates the body
    answer: bytes | None = None  # Publer's response, when small enough to be read whole


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
    secrets: SecretRegistry  # what answers are screened for before they reach a client
    activity: Activity
    shares: SharePlan
    audit: AuditLog


async def send_refusal(send: Send, refusal: Refusal, request_id: str, head_only: bool) -> None:
    """Answer with the proxy's own Publer-shaped error."""
    body = refusal.body(request_id)
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": refusal.headers(len(body)),
        }
    )
    await send({"type": "http.response.body", "body": b"" if head_only else body})


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | Refusal | None:
    lengths = header_values(headers, b"content-length")
    chunked = header_values(headers, b"transfer-encoding")
    if lengths and chunked:
        return Refusal.of("bad_request", "send Content-Length or Transfer-Encoding, not both")
    if len(set(lengths)) > 1 or (lengths and not lengths[0].strip().isdigit()):
        return Refusal.of("bad_request", "the Content-Length header is malformed or repeated")
    if chunked and [v.strip().lower() for v in chunked] != ["chunked"]:
        return Refusal.of("bad_request", "only Transfer-Encoding: chunked is accepted")
    if lengths:
        return int(lengths[0])
    return -1 if chunked else None


def _backoff(attempt: int) -> float:
    return random.uniform(0, 0.1 * 2**attempt)


class Forwarder:
    """The ASGI app that forwards allowed requests to Publer."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._counters: dict[tuple[str, str, str, str], Counter] = {}  # labelled children
        self._client_counters: dict[tuple[str, str, str], Counter] = {}
        self._queue = Queue()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id: str = scope[REQUEST_ID_KEY]
        outcome = Outcome()
        method: str = scope["method"]
        try:
            await self._handle(scope, receive, send, outcome)
        except ProxyError as exc:
            outcome.decision = exc.refusal.code
            outcome.status = exc.refusal.status
            await send_refusal(send, exc.refusal, request_id, method == "HEAD")
        except ClientGone:
            outcome.decision = "client_disconnected"
            if not outcome.head_sent:
                outcome.status = 499
        except Exception as exc:
            # A fault of the proxy's own: uvicorn answers 500 (or cuts the body short).
            outcome.decision = "internal_error"
            if not outcome.head_sent:
                outcome.status = 500
            log.error("forward_failed", error=type(exc).__name__, head_sent=outcome.head_sent)
            raise
        finally:
            self._record(scope, outcome, time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, outcome: Outcome) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if scope.get(ABSOLUTE_FORM_KEY):
            raise ProxyError(
                Refusal.of("bad_path", "absolute-form request targets are refused; send a path")
            )
        verdict = decide(
            RequestHead(
                method=scope["method"],
                raw_path=scope.get("raw_path") or scope["path"].encode("latin-1"),
                raw_query=scope.get("query_string", b""),
                authorization=next(iter(header_values(headers, b"authorization")), None),
                workspace_headers=header_values(headers, b"publer-workspace-id"),
            ),
            self.services.routes,
            self.services.scope_map,
        )
        outcome.verdict = verdict
        if verdict.refusal is not None:
            raise ProxyError(verdict.refusal)
        assert verdict.route is not None
        length = _content_length(headers)
        if isinstance(length, Refusal):
            raise ProxyError(length)
        limit = self.services.settings.upstream.max_body_bytes
        if length is not None and length > limit:
            raise ProxyError(_too_large(limit))
        credential = verdict.route.settings.credential
        key = self.services.credentials.current(credential)
        outcome.key = key
        downstream = Downstream(receive, limit)
        # Everything awaited inside the block is cancelled when the client leaves.
        async with downstream:
            await self._spend(verdict)
            body: bytes | AsyncIterator[bytes] | None
            if length is None or length == 0:
                body = None
                downstream.no_body()
            elif 0 < length <= REPLAYABLE_BODY_BYTES:
                try:
                    body = await downstream.read_body()
                except BodyTooLarge:
                    raise ProxyError(_too_large(limit)) from None
            else:
                body = downstream.body()
            response = await self._exchange(scope, verdict, key, body, length, outcome)
            try:
                last = await self._stream_back(scope, send, verdict, response, outcome)
            finally:
                await response.aclose()
        if last is not None:
            # After the block: once the response is complete, ASGI reports the client as
            # gone, which must not cancel anything.
            await send(last)

    async def _spend(self, verdict: Verdict) -> None:
        assert verdict.route is not None
        settings = self.services.settings.rate_limit
        share = self.services.shares.share(verdict.route.name, verdict.client)
        grant = await self._queue.spend(self.services.budget, share, settings.max_wait_seconds)
        self.services.metrics.budget_left.labels(share.credential).set(grant.remaining)
        if not grant.allowed:
            limit = grant.limit or "credential"
            retry_after = retry_after_header(grant)
            ceiling = limit_requests(share, limit, settings.requests)
            self.services.metrics.rate_limited.labels(share.route, share.client, limit).inc()
            raise ProxyError(
                Refusal.of(
                    "rate_limited",
                    refusal_text(share, limit, settings.requests, settings.per_seconds),
                    retry_after=retry_after,
                    limit=limit,
                    rate_limit=RateLimitHeaders(
                        limit=ceiling,
                        remaining=0,
                        reset=math.ceil(time.time() + grant.retry_after),
                    ),
                )
            )

    async def _exchange(
        self,
        scope: Scope,
        verdict: Verdict,
        key: HeldKey,
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None,
        outcome: Outcome,
    ) -> Response:
        """Send upstream, retrying idempotent requests, replaying once after a rejected key."""
        assert verdict.route is not None
        method: str = scope["method"]
        credential = verdict.route.settings.credential
        idempotent = method in READ_METHODS and body is None
        replayable = not isinstance(body, AsyncIterator)
        retries = self.services.settings.upstream.retries if idempotent else 0
        reread_done = False
        attempt = 0
        while True:
            attempt += 1
            outcome.attempts = attempt
            headers = upstream_headers(
                scope["headers"],
                host=self.services.upstream.host_header,
                api_key=key.value,
                workspace=verdict.workspace,
                request_id=scope[REQUEST_ID_KEY],
                content_length=length if length is not None and length >= 0 else None,
            )
            sent = time.perf_counter()
            try:
                response = await self.services.upstream.send(
                    method, verdict.upstream_target, headers, body
                )
            except ProxyError as exc:
                # A timeout is not retried: another read_timeout would only double the wait.
                if attempt <= retries and exc.refusal.code == "upstream_unreachable":
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise
            except BodyTooLarge:
                raise ProxyError(
                    _too_large(self.services.settings.upstream.max_body_bytes)
                ) from None
            self.services.metrics.upstream_latency.labels(verdict.route.name).observe(
                time.perf_counter() - sent
            )
            if response.status_code in RETRY_STATUSES and attempt <= retries:
                await response.aclose()
                await asyncio.sleep(_backoff(attempt))
                continue
            outcome.rejection = None
            if response.status_code in REJECTION_STATUSES:
                response, outcome.rejection = await _read_rejection(response)
            if outcome.rejection is Rejection.KEY and replayable and not reread_done:
                reread_done = True
                try:
                    fresh = await self.services.credentials.reread(credential, key)
                except BaseException:
                    await response.aclose()  # the answer's connection goes back either way
                    raise
                if fresh.value != key.value:
                    await response.aclose()
                    key = fresh
                    outcome.key = fresh
                    log.info(
                        "key_reread_after_rejection",
                        credential=credential,
                        key=fresh.masked,
                        key_version=fresh.version,
                    )
                    continue
            return response

    async def _stream_back(
        self,
        scope: Scope,
        send: Send,
        verdict: Verdict,
        response: Response,
        outcome: Outcome,
    ) -> Message | None:
        """Pass Publer's response back as it comes; return the last message to send.

        A failure before the status line went out is a refusal (502/504); after it, the
        client sees a truncated body and the access record says `upstream_broken`.
        """
        assert verdict.route is not None
        outcome.status = outcome.upstream_status = response.status_code
        headers = downstream_headers(response.raw_headers)
        if response.status_code in NO_BODY_STATUSES:
            # A 204 or 304 has no body whatever its framing says (RFC 9110 15.3.5, 15.4.5).
            headers = [(n, v) for n, v in headers if n not in FRAMING_HEADERS]
        await self._resync_budget(verdict.route.settings.credential, headers)
        # No body goes back for HEAD, 204 or 304, whatever Publer sent.
        head_only = scope["method"] == "HEAD" or response.status_code in NO_BODY_STATUSES
        length = _declared_length(headers)
        chunks = response.aiter_raw()
        body: bytes | None = None
        read: list[bytes] = []
        if not head_only and (length is None or length <= SMALL_RESPONSE_BYTES):
            # A small response (by Content-Length, or chunked and ending within the limit)
            # is read whole before the status line goes out: it is screened for secrets,
            # and one that breaks off is still a clean 502.
            body, read = await _read_small(chunks, SMALL_RESPONSE_BYTES)
        headers, body = screen_answer(headers, body, self.services.secrets.redact_bytes)
        outcome.answer = body
        if outcome.rejection is not None:
            hint = rejection_hint(
                outcome.rejection,
                credential=verdict.route.settings.credential,
                scope=verdict.scope,
                workspace=verdict.workspace,
                needs_workspace=verdict.needs_workspace,
            )
            headers.append((b"x-publer-proxy-hint", hint.encode("latin-1", "replace")))
            log.warning(
                "upstream_auth_failed",
                status=response.status_code,
                credential=verdict.route.settings.credential,
                key=outcome.key.masked if outcome.key else None,
                key_version=outcome.key.version if outcome.key else None,
                rejected=outcome.rejection.value,
                hint=hint,
            )
        start = {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": headers,
        }
        outcome.head_sent = True
        await send(start)
        if head_only or body is not None:
            return {"type": "http.response.body", "body": body or b""}
        try:
            for chunk in read:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamFailed as exc:
            outcome.decision = "upstream_broken"
            log.warning("upstream_body_failed", reason=exc.refusal.message)
            return None  # uvicorn closes the connection: the client sees the cut
        return {"type": "http.response.body", "body": b""}

    async def _resync_budget(self, credential: str, headers: list[tuple[bytes, bytes]]) -> None:
        remaining = reset = None
        for name, value in headers:
            if name == b"x-ratelimit-remaining":
                remaining = value
            elif name == b"x-ratelimit-reset":
                reset = value
        if remaining is None or reset is None:
            return
        try:
            left, seconds = int(remaining), float(reset)
        except ValueError:
            return
        if seconds > EPOCH_2001:
            # Publer documents X-RateLimit-Reset as the UNIX time the window resets.
            seconds -= time.time()
        await self.services.budget.sync(credential, left, seconds)

    def _record(self, scope: Scope, outcome: Outcome, duration: float) -> None:
        verdict = outcome.verdict
        route = verdict.route.name if verdict and verdict.route else None
        client = (verdict.client if verdict else None) or ANONYMOUS_CLIENT
        method = method_label(scope["method"])
        raw_path: bytes = scope.get("raw_path") or b""
        log.info(
            "request",
            route=route,
            client=client,
            method=method,
            path=raw_path[:256].decode("latin-1"),
            scope=verdict.scope if verdict else None,
            decision=outcome.decision,
            status=outcome.status,
            upstream_status=outcome.upstream_status,
            duration_ms=round(duration * 1000, 2),
            key=outcome.key.masked if outcome.key else None,
            key_version=outcome.key.version if outcome.key else None,
            attempts=outcome.attempts,
        )
        self.services.audit.record(
            request_id=scope[REQUEST_ID_KEY],
            route=route,
            client=client,
            method=scope["method"],
            path=raw_path[:2048].decode("latin-1"),
            status=outcome.status,
            upstream_status=outcome.upstream_status,
            decision=outcome.decision,
            answer=outcome.answer,
        )
        metrics = self.services.metrics
        labels = (
            route or "none",
            (verdict.scope if verdict else None) or "none",
            method,
            str(outcome.status),
        )
        counter = self._counters.get(labels)
        if counter is None:
            counter = self._counters[labels] = metrics.requests.labels(*labels)
        counter.inc()
        by_client = (labels[0], client, labels[3])
        counter = self._client_counters.get(by_client)
        if counter is None:
            counter = self._client_counters[by_client] = metrics.client_requests.labels(*by_client)
        counter.inc()
        named = verdict.client if verdict else None
        if outcome.decision in STATUS:
            metrics.refusals.labels(outcome.decision).inc()
            self.services.activity.refused(
                outcome.decision, outcome.status, route, named, scope[REQUEST_ID_KEY]
            )


class _ReadAnswer:
    """An answer whose first bytes were read to decide what it means, then replayed."""

    def __init__(self, answer: Response, head: bytes, rest: AsyncIterator[bytes] | None) -> None:
        self.status_code = answer.status_code
        self.raw_headers = answer.raw_headers
        self._answer = answer
        self._head = head
        self._rest = rest

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if self._head:
            yield self._head
        if self._rest is not None:
            async for chunk in self._rest:
                yield chunk

    async def aclose(self) -> None:
        await self._answer.aclose()


async def _read_rejection(answer: Response) -> tuple[Response, Rejection | None]:
    """Read the message of a 401/403 (it is short) and say what Publer rejected."""
    chunks = answer.aiter_raw()
    head = b""
    rest: AsyncIterator[bytes] | None = chunks
    try:
        while len(head) <= MAX_MESSAGE_BYTES:
            head += await anext(chunks)
    except StopAsyncIteration:
        rest = None
    except BaseException:  # UpstreamFailed when it broke off
        await answer.aclose()
        raise
    return _ReadAnswer(answer, head, rest), rejection(answer.status_code, head)


async def _read_small(chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes | None, list[bytes]]:
    """(the whole body, []) when it ends within `limit` bytes, else (None, the chunks read
    so far, the last one past the limit). Raises UpstreamFailed when the response breaks
    off."""
    read: list[bytes] = []
    size = 0
    async for chunk in chunks:
        read.append(chunk)
        size += len(chunk)
        if size > limit:
            return None, read
    return b"".join(read), []


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _too_large(limit: int) -> Refusal:
    return Refusal.of(
        "body_too_large", f"the request body is larger than the maximum of {limit} bytes"
    )
