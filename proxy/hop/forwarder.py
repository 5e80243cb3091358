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
from dataclasses import replace

import structlog
from starlette.types import Message, Receive, Scope, Send

from proxy.budget.shares import limit_requests, refusal_text
from proxy.budget.stores import Queue, retry_after_header
from proxy.hop.downstream import BodyTooLarge, ClientGone, Downstream
from proxy.hop.services import Services
from proxy.hop.upstream import Response
from proxy.keys.store import HeldKey
from proxy.masking.responses import StreamMask, content_coding, screen_response
from proxy.records.access_log import Outcome
from proxy.records.request_ids import REQUEST_ID_KEY
from proxy.rules.headers import (
    downstream_headers,
    header_values,
    request_body_length,
    response_body_length,
    upstream_headers,
)
from proxy.rules.limits import (
    FILTER_LIMIT_BYTES,
    INSPECT_LIMIT_BYTES,
    LimitedCall,
    Limits,
    effective_limits,
    filter_accounts,
    named_accounts,
    streams_body,
)
from proxy.rules.limits import decide as decide_limits
from proxy.rules.paths import ABSOLUTE_FORM_KEY
from proxy.rules.policy import API_ROOT, RequestHead, Verdict, decide
from proxy.rules.publer import (
    MAX_MESSAGE_BYTES,
    REJECTION_STATUSES,
    Rejection,
    rate_limit_window,
    rejection,
    rejection_hint,
)
from proxy.rules.refusals import ProxyError, RateLimitHeaders, Refusal, UpstreamFailed
from proxy.rules.scopes import READ_METHODS

log = structlog.get_logger("proxy.records.access_log")

RequestBody = bytes | AsyncIterator[bytes] | None

# Bodies up to this size are kept in memory so the request can be replayed after Publer
# rejects the key.
REPLAYABLE_BODY_BYTES = 256 * 1024
RETRY_STATUSES = frozenset({502, 503, 504})
NO_BODY_STATUSES = frozenset({204, 304})
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
# Responses up to this size (by Content-Length) are read whole and sent in one piece.
SMALL_RESPONSE_BYTES = 64 * 1024


async def send_refusal(send: Send, refusal: Refusal, request_id: str, head_only: bool) -> None:
    """Respond with the proxy's own Publer-shaped error (`proxy/rules/refusals.py`)."""
    body = refusal.body(request_id)
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": refusal.headers(len(body)),
        }
    )
    await send({"type": "http.response.body", "body": b"" if head_only else body})


def _backoff(attempt: int) -> float:
    return random.uniform(0, 0.1 * 2**attempt)


class Forwarder:
    """The ASGI app that forwards allowed requests to Publer."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._access = services.access_log
        self._queue = Queue()
        self._limits = {
            (route.name, client.name if client else None): effective_limits(
                route.limits, client.limits if client else None
            )
            for route in services.settings.routes
            for client in [None, *(route.clients or ())]
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one request; whatever happens, it leaves one access record."""
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
            # A fault of the proxy's own: uvicorn responds 500 (or cuts the body short).
            outcome.decision = "internal_error"
            if not outcome.head_sent:
                outcome.status = 500
            log.error("forward_failed", error=type(exc).__name__, head_sent=outcome.head_sent)
            raise
        finally:
            self._access.record(scope, outcome, time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, outcome: Outcome) -> None:
        """Route, authenticate, check, inject, forward; `__call__` logs."""
        verdict = outcome.verdict = self._check(scope)
        if verdict.refusal is not None:
            raise ProxyError(verdict.refusal)
        length = self._body_length(scope)
        key = outcome.key = self._key(verdict)
        downstream = Downstream(receive, self.services.settings.upstream.max_body_bytes)
        # Everything awaited inside the block is cancelled when the client leaves.
        async with downstream:
            assert verdict.route is not None
            limits = self._limits.get((verdict.route.name, verdict.client))
            if limits is None:
                await self._spend(verdict)
                body = await self._request_body(downstream, length)
                if isinstance(body, bytes) and scope["method"] == "POST":
                    outcome.accounts = named_accounts(_rest(verdict).partition("?")[0], body)
            else:
                body, length, verdict = await self._limited_body(
                    scope, downstream, length, verdict, limits, outcome
                )
                await self._spend(verdict)
            response = await self._forward(scope, verdict, key, body, length, outcome)
            try:
                last = await self._relay(scope, send, verdict, response, outcome)
            finally:
                await response.aclose()
        if last is not None:
            # After the block: once the response is complete, ASGI reports the client as
            # gone, which must not cancel anything.
            await send(last)

    def _check(self, scope: Scope) -> Verdict:
        """Route, authenticate and check the request (`proxy/rules/policy.py`): the verdict, a
        refusal in it when the request may not go on. Raises ProxyError for an
        absolute-form target, which no route can match."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if scope.get(ABSOLUTE_FORM_KEY):
            raise ProxyError(
                Refusal.of("bad_path", "absolute-form request targets are refused; send a path")
            )
        return decide(
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

    def _key(self, verdict: Verdict) -> HeldKey:
        """The route's key as held now: never waits on Vault. Raises ProxyError
        (`credential_unavailable`) when no usable key is held."""
        assert verdict.route is not None
        return self.services.credentials.current(verdict.route.settings.credential)

    def _body_length(self, scope: Scope) -> int | None:
        """The request body's declared length (-1: chunked, None: no body). Raises
        ProxyError for bad framing or a body over `upstream.max_body_bytes`."""
        try:
            length = request_body_length(scope["headers"])
        except ValueError as exc:
            raise ProxyError(Refusal.of("bad_request", str(exc))) from None
        limit = self.services.settings.upstream.max_body_bytes
        if length is not None and length > limit:
            raise ProxyError(_too_large(limit))
        return length

    async def _limited_body(
        self,
        scope: Scope,
        downstream: Downstream,
        length: int | None,
        verdict: Verdict,
        limits: Limits,
        outcome: Outcome,
    ) -> tuple[RequestBody, int | None, Verdict]:
        """On a limited route: read the body whole (up to the inspection limit), decide
        (`proxy/rules/limits.py`), and return the exact bytes checked, their length and the
        verdict with its target narrowed. Raises ProxyError when the limits refuse."""
        method: str = scope["method"]
        rest, _, query = _rest(verdict).partition("?")
        body: RequestBody = None
        if streams_body(method, rest):
            body = await self._request_body(downstream, length)
        elif length is None or length == 0:
            downstream.no_body()
        elif length > INSPECT_LIMIT_BYTES:
            raise ProxyError(_uninspectable())
        else:
            held = bytearray()
            try:
                async for chunk in downstream.body():
                    held += chunk
                    if len(held) > INSPECT_LIMIT_BYTES:
                        raise ProxyError(_uninspectable())
            except BodyTooLarge:
                raise ProxyError(
                    _too_large(self.services.settings.upstream.max_body_bytes)
                ) from None
            body = bytes(held)
            length = len(body)
        decision = decide_limits(
            LimitedCall(
                method=method,
                path=rest,
                raw_query=query.encode("ascii"),
                headers=scope["headers"],
                body=body if isinstance(body, bytes) and body else None,
            ),
            limits,
        )
        outcome.limits = decision
        outcome.accounts = decision.accounts
        if decision.refusal is not None:
            raise ProxyError(decision.refusal)
        if decision.add_query:
            target = verdict.upstream_target
            joined = target + ("&" if query else "?") + decision.add_query
            verdict = replace(verdict, upstream_target=joined)
        outcome.allowed_accounts = limits.accounts
        return body, length, verdict

    async def _request_body(self, downstream: Downstream, length: int | None) -> RequestBody:
        """None, the whole body when small enough to replay, else the body as it arrives."""
        if length is None or length == 0:
            downstream.no_body()
            return None
        if length > REPLAYABLE_BODY_BYTES or length < 0:
            return downstream.body()
        try:
            return await downstream.read_body()
        except BodyTooLarge:
            raise ProxyError(_too_large(self.services.settings.upstream.max_body_bytes)) from None

    async def _spend(self, verdict: Verdict) -> None:
        """Take one request from the client's share of the budget, waiting in the fair queue
        up to `rate_limit.max_wait_seconds`. Raises ProxyError (`rate_limited`, with
        Retry-After and X-RateLimit-*) when none is left."""
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

    async def _forward(
        self,
        scope: Scope,
        verdict: Verdict,
        key: HeldKey,
        body: RequestBody,
        length: int | None,
        outcome: Outcome,
    ) -> Response:
        """Inject the key and send upstream, retrying idempotent requests on 502, 503, 504
        or a connection that failed, and replaying once after Publer rejected the key."""
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
            client_headers: list[tuple[bytes, bytes]] = scope["headers"]
            if outcome.limits is not None and outcome.limits.filter_response:
                # The answer is read and narrowed: it must come uncompressed.
                client_headers = [h for h in client_headers if h[0].lower() != b"accept-encoding"]
            headers = upstream_headers(
                client_headers,
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
                    await response.aclose()  # the response's connection is released either way
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

    async def _relay(
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
        window = rate_limit_window(headers, time.time())
        if window is not None:
            await self.services.budget.sync(verdict.route.settings.credential, *window)
        # No body goes back for HEAD, 204 or 304, whatever Publer sent.
        head_only = scope["method"] == "HEAD" or response.status_code in NO_BODY_STATUSES
        length = response_body_length(headers)
        chunks = response.aiter_raw()
        body: bytes | None = None
        read: list[bytes] = []
        narrowing = (
            outcome.limits is not None
            and outcome.limits.filter_response
            and outcome.allowed_accounts is not None
            and 200 <= response.status_code < 300
            and not head_only
        )
        if narrowing:
            headers, body = await _narrowed(
                headers, chunks, outcome.allowed_accounts or frozenset()
            )
        elif not head_only and (length is None or length <= SMALL_RESPONSE_BYTES):
            # A small response (by Content-Length, or chunked and ending within the limit)
            # is read whole before the status line goes out: it is screened for secrets,
            # and one that breaks off is still a clean 502.
            body, read = await _read_small(chunks, SMALL_RESPONSE_BYTES)
        headers, body = screen_response(headers, body, self.services.secrets.redact_bytes)
        outcome.response_body = body
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
        plain = content_coding(headers) in (b"", b"identity")
        mask = StreamMask(self.services.secrets) if plain else None
        try:
            async for chunk in _chained(read, chunks):
                if mask is not None:
                    chunk = mask.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamFailed as exc:
            outcome.decision = "upstream_broken"
            log.warning("upstream_body_failed", reason=exc.refusal.message)
            return None  # uvicorn closes the connection: the client sees the cut
        return {"type": "http.response.body", "body": b"" if mask is None else mask.flush()}


class _PeekedResponse:
    """A response whose first bytes were read to decide what it means, then replayed."""

    def __init__(self, response: Response, head: bytes, rest: AsyncIterator[bytes] | None) -> None:
        self.status_code = response.status_code
        self.raw_headers = response.raw_headers
        self._response = response
        self._head = head
        self._rest = rest

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if self._head:
            yield self._head
        if self._rest is not None:
            async for chunk in self._rest:
                yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


async def _read_rejection(response: Response) -> tuple[Response, Rejection | None]:
    """Read the message of a 401/403 (it is short) and say what Publer rejected."""
    chunks = response.aiter_raw()
    head = b""
    rest: AsyncIterator[bytes] | None = chunks
    try:
        while len(head) <= MAX_MESSAGE_BYTES:
            head += await anext(chunks)
    except StopAsyncIteration:
        rest = None
    except BaseException:  # UpstreamFailed when it broke off
        await response.aclose()
        raise
    return _PeekedResponse(response, head, rest), rejection(response.status_code, head)


async def _chained(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


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


async def _narrowed(
    headers: list[tuple[bytes, bytes]], chunks: AsyncIterator[bytes], allowed: frozenset[str]
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """An account list answer narrowed to the route's accounts, with its framing fixed.
    Raises ProxyError (`response_unfilterable`) when it is compressed, too large or not a
    JSON account list: then it is not passed on at all."""
    unfilterable = Refusal.of(
        "response_unfilterable",
        "Publer's account list could not be narrowed to this route's accounts (compressed,"
        f" larger than {FILTER_LIMIT_BYTES} bytes, or not a JSON list), so it is withheld",
    )
    if content_coding(headers) not in (b"", b"identity"):
        raise ProxyError(unfilterable)
    whole, _ = await _read_small(chunks, FILTER_LIMIT_BYTES)
    narrowed = None if whole is None else filter_accounts(whole, allowed)
    if narrowed is None:
        raise ProxyError(unfilterable)
    kept = [(n, v) for n, v in headers if n not in FRAMING_HEADERS]
    return [*kept, (b"content-length", str(len(narrowed)).encode())], narrowed


def _rest(verdict: Verdict) -> str:
    """The target relative to /api/v1, query included."""
    return verdict.upstream_target.removeprefix(API_ROOT)


def _uninspectable() -> Refusal:
    return Refusal.of(
        "body_uninspectable",
        f"on a limited route a request body is read whole before it goes, and this one is"
        f" larger than the inspection limit of {INSPECT_LIMIT_BYTES} bytes; send a smaller body",
    )


def _too_large(limit: int) -> Refusal:
    return Refusal.of(
        "body_too_large", f"the request body is larger than the maximum of {limit} bytes"
    )
