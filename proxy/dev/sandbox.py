"""The Publer sandbox: a stand-in for Publer's REST API for the endpoints Publer documents.

It is a test double of Publer, not of the proxy, so it follows Publer's documented behaviour
(https://publer.com/docs): `Authorization: Bearer-API <key>`, the key's scopes and
`Publer-Workspace-Id`, 100 requests per 2 minutes per account (all its keys together) or
429 with `X-RateLimit-*`, errors as `{"errors": [...]}` (the 429 body is
`{"error": "Rate limit exceeded. Retry later."}`), multipart uploads of at most 200 MB (a
larger declared Content-Length is answered 413 before the body is read), `job_id`s that
`/job_status/{job_id}` reports `working`, then `complete` (or `failed`), list answers with
`page`, `per_page` and `total_pages`, and each analytics report in its own shape.

Where the live API has been recorded answering differently from the docs, `auth_errors`
chooses: "docs" answers a rejected key 401 and a workspace problem 403; "live" answers a
rejected key 403 "Invalid API key or not active for this account." and a workspace
problem 401 "You don't have access on this workspace". A missing scope is 403 in both.

Every request under /api/v1 is recorded before any check, its body hashed as it streams, and
its answer carries `X-Sandbox-Request-Index`. Control endpoints, for tests, never recorded:

    GET    /__sandbox/requests   {"requests": [...]} in arrival order
    DELETE /__sandbox/requests   forgets them
    PUT    /__sandbox/keys       {"keys": [{"key", "scopes"?, "workspaces"?, "revoked"?,
                                            "account"?}]}
    PUT    /__sandbox/auth-errors {"mode": "docs" | "live"}
    PUT    /__sandbox/faults     {"status": 503 | "drop": true | "delay_seconds": x, "count": n}
    GET    /__sandbox/stats      {"active_requests": n, "total": n}
    GET    /__sandbox/health     {"status": "ok"}

`GET /api/v1/media?sandbox_bytes=N` streams a valid JSON body of exactly N bytes (N >= 35),
generated on the fly, for download tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.rules.scopes import load_scope_map

# Publer's scopes, as the proxy's packaged scope map names them.
ALL_SCOPES: frozenset[str] = load_scope_map().scopes
DEFAULT_SANDBOX_KEY: str = "sandbox-key-0123456789abcdef"
DEFAULT_WORKSPACE_ID: str = "5f8d7a62c9e77e001f36e3a1"
DEFAULT_ACCOUNT: str = "sandbox-user"
AUTH_ERROR_MODES = ("docs", "live")
AUTH_ERRORS_ENV = "PUBLER_SANDBOX_AUTH_ERRORS"
LIVE_KEY_REJECTED = "Invalid API key or not active for this account."
LIVE_WORKSPACE_REJECTED = "You don't have access on this workspace"
API_PREFIX = "/api/v1"
MAX_MEDIA_BYTES = 200 * 1000 * 1000
DOWNLOAD_CHUNK_BYTES = 64 * 1024
RATE_LIMITED_BODY = b'{"error":"Rate limit exceeded. Retry later."}'
# Set in the ASGI scope by a handler that responds without reading the body on purpose.
UNREAD_BODY_KEY = "sandbox.unread_body"

_JSON_BODY_LIMIT = 1024 * 1024
_PAGE_SIZE = 20
_INSIGHTS_PAGE_SIZE = 10
_POST_STATES = frozenset({"draft", "draft_public", "draft_private", "scheduled"})
_ACCOUNTLESS_STATES = frozenset({"draft_public", "draft_private"})
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_PART_HEADERS_LIMIT = 64 * 1024
_FILLER = b"a" * DOWNLOAD_CHUNK_BYTES
_DOWNLOAD_HEAD = b'{"media":[],"total":0,"padding":"'
_DOWNLOAD_TAIL = b'"}'
_SANDBOX_USER = {"id": "5f8d7a62c9e77e001f36e000", "name": "Sandbox User", "picture": None}
_ACCOUNTS = (
    ("6120c1f3a1b2c3d4e5f60001", "Sandbox Page", "facebook"),
    ("6120c1f3a1b2c3d4e5f60002", "sandbox.gram", "instagram"),
)


@dataclass(frozen=True)
class SandboxKey:
    """An API key the sandbox accepts, with the scopes and workspaces it grants."""

    key: str
    scopes: frozenset[str] = ALL_SCOPES
    workspaces: frozenset[str] = frozenset()  # empty: any workspace id is accepted
    revoked: bool = False
    account: str = DEFAULT_ACCOUNT  # the user account whose rate budget the key spends


# Keys for the sandbox, whitespace-separated specs: the way to pass a real or test key
# without putting it on a command line, where every user of the machine can read it.
SANDBOX_KEYS_ENV = "PUBLER_SANDBOX_KEYS"


def parse_key_spec(text: str) -> SandboxKey:
    """'KEY' (all scopes) or 'KEY=scope1,scope2' (only those scopes)."""
    key, has_scopes, scope_text = text.strip().partition("=")
    _check_key(key)
    if not has_scopes:
        return SandboxKey(key)
    scopes = frozenset(part.strip() for part in scope_text.split(",") if part.strip())
    if not scopes:
        raise ValueError("the key spec has '=' but no scope after it; write KEY or KEY=posts,media")
    _check_scopes(scopes)
    return SandboxKey(key, scopes)


def _check_key(key: str) -> None:
    # The key itself never goes into the message: the CLI prints these errors.
    if not key or not key.isprintable() or any(char.isspace() for char in key):
        raise ValueError("a sandbox key must be non-empty printable text without spaces")


def _check_scopes(scopes: frozenset[str]) -> None:
    if unknown := scopes - ALL_SCOPES:
        raise ValueError(
            f"unknown scope {', '.join(sorted(unknown))}; known: {', '.join(sorted(ALL_SCOPES))}"
        )


def create_app(
    keys: Sequence[SandboxKey],
    *,
    rate_limit: int = 100,
    rate_period_seconds: float = 120.0,
    auth_errors: str = "docs",
) -> Starlette:
    """Build a sandbox accepting `keys`; each key's account has `rate_limit` requests per
    fixed window of `rate_period_seconds`. `auth_errors` is "docs" or "live" (see above)."""
    if rate_limit < 1 or rate_period_seconds <= 0:
        raise ValueError("the sandbox rate limit needs at least 1 request per positive period")
    if auth_errors not in AUTH_ERROR_MODES:
        raise ValueError(f"auth_errors must be one of {', '.join(AUTH_ERROR_MODES)}")
    state = _State(keys, rate_limit, rate_period_seconds)
    state.auth_errors = auth_errors

    async def api(request: Request) -> Response:
        key = state.authenticate(request.headers.getlist("authorization"))
        if isinstance(key, str):
            return state.key_rejected(key)
        allowed, limit_headers = state.spend(key.account)
        response = await _respond(state, key, request) if allowed else _rate_limited()
        response.headers.update(limit_headers)
        return response

    async def requests(request: Request) -> Response:
        if request.method == "DELETE":
            state.records.clear()
            return JSONResponse({"requests": []})
        return JSONResponse({"requests": [record.as_json() for record in state.records]})

    async def put_keys(request: Request) -> Response:
        try:
            new_keys = [
                item.to_key() for item in _KeysIn.model_validate_json(await request.body()).keys
            ]
        except ValueError as exc:
            return _errors(400, _problem(exc))
        state.keys = {key.key: key for key in new_keys}
        return JSONResponse({"keys": len(state.keys)})

    async def put_auth_errors(request: Request) -> Response:
        try:
            state.auth_errors = _AuthErrorsIn.model_validate_json(await request.body()).mode
        except ValueError as exc:
            return _errors(400, _problem(exc))
        return JSONResponse({"mode": state.auth_errors})

    async def put_faults(request: Request) -> Response:
        try:
            fault = _Fault.model_validate_json(await request.body())
        except ValueError as exc:
            return _errors(400, _problem(exc))
        state.fault = fault if fault.does_something else None
        return JSONResponse({"fault": fault.model_dump() if fault.does_something else None})

    async def stats(request: Request) -> Response:
        return JSONResponse({"active_requests": state.active, "total": state.total})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/__sandbox/requests", requests, methods=["GET", "DELETE"]),
            Route("/__sandbox/keys", put_keys, methods=["PUT"]),
            Route("/__sandbox/faults", put_faults, methods=["PUT"]),
            Route("/__sandbox/auth-errors", put_auth_errors, methods=["PUT"]),
            Route("/__sandbox/stats", stats, methods=["GET"]),
            Route("/__sandbox/health", health, methods=["GET"]),
            Route(
                API_PREFIX + "{rest:path}",
                api,
                methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            ),
        ],
        middleware=[Middleware(_Recorder, state=state)],
        exception_handlers={HTTPException: _http_error},
    )


# --- state --------------------------------------------------------------------------------


class _Record:
    """One request as it arrived; the body is counted and hashed while it streams."""

    def __init__(self, index: int, scope: Scope) -> None:
        self.index = index
        self.method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        self.path = raw_path.decode("latin-1")
        self.query = bytes(scope.get("query_string", b"")).decode("latin-1")
        self.headers = [
            [name.decode("latin-1"), value.decode("latin-1")] for name, value in scope["headers"]
        ]
        self.body_bytes = 0
        self._sha256 = hashlib.sha256()
        self.timestamp = time.time()

    def feed(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        self._sha256.update(chunk)

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body_bytes": self.body_bytes,
            "body_sha256": self._sha256.hexdigest(),
            "timestamp": self.timestamp,
        }


class _KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    key: str
    scopes: list[str] = Field(default_factory=lambda: sorted(ALL_SCOPES))
    workspaces: list[str] = Field(default_factory=list)
    revoked: bool = False
    account: str = DEFAULT_ACCOUNT

    def to_key(self) -> SandboxKey:
        _check_key(self.key)
        _check_scopes(frozenset(self.scopes))
        return SandboxKey(
            self.key, frozenset(self.scopes), frozenset(self.workspaces), self.revoked, self.account
        )


class _AuthErrorsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    mode: str

    @model_validator(mode="after")
    def _known(self) -> _AuthErrorsIn:
        if self.mode not in AUTH_ERROR_MODES:
            raise ValueError(f"mode must be one of {', '.join(AUTH_ERROR_MODES)}")
        return self


class _KeysIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    keys: list[_KeyIn]


class _Fault(BaseModel):
    """What the next `count` /api/v1 requests get instead of (or before) their response."""

    model_config = ConfigDict(extra="forbid", strict=True)
    status: int | None = Field(default=None, ge=400, le=599)
    drop: bool = False
    delay_seconds: float = Field(default=0.0, ge=0, le=3600)
    count: int = Field(default=1, ge=0)

    @property
    def does_something(self) -> bool:
        return self.count > 0 and (self.status is not None or self.drop or self.delay_seconds > 0)

    @model_validator(mode="after")
    def _one_outcome(self) -> _Fault:
        if self.status is not None and self.drop:
            raise ValueError("a fault either sends a 'status' or drops the connection, not both")
        return self


@dataclass
class _Window:
    ends_at: float
    used: int = 0


class _State:
    def __init__(self, keys: Sequence[SandboxKey], rate_limit: int, period: float) -> None:
        self.keys = {key.key: key for key in keys}
        self.rate_limit = rate_limit
        self.period = period
        self.windows: dict[str, _Window] = {}
        self.records: list[_Record] = []
        self.fault: _Fault | None = None
        self.active = 0
        self.total = 0
        self.auth_errors = "docs"
        self.jobs: dict[str, _Job] = {}
        self.posts: dict[str, dict[str, Any]] = {}
        self.media: list[dict[str, Any]] = []

    def record(self, scope: Scope) -> _Record:
        record = _Record(len(self.records), scope)
        self.records.append(record)
        self.total += 1
        return record

    def take_fault(self) -> _Fault | None:
        fault = self.fault
        if fault is not None:
            fault.count -= 1
            if fault.count <= 0:
                self.fault = None
        return fault

    def authenticate(self, authorization: list[str]) -> SandboxKey | str:
        """The key, or why it is refused."""
        scheme, _, token = (
            authorization[0].partition(" ") if len(authorization) == 1 else ("", "", "")
        )
        key = self.keys.get(token) if scheme == "Bearer-API" else None
        if key is None:
            return "Missing or invalid API key: send 'Authorization: Bearer-API <key>'."
        return "This API key has been revoked." if key.revoked else key

    def spend(self, account: str) -> tuple[bool, dict[str, str]]:
        """Count one request against the account's fixed window; say if it fits."""
        now = time.monotonic()
        window = self.windows.get(account)
        if window is None or now >= window.ends_at:
            window = self.windows[account] = _Window(now + self.period)
        allowed = window.used < self.rate_limit
        if allowed:
            window.used += 1
        left = window.ends_at - now
        headers = {
            "X-RateLimit-Limit": str(self.rate_limit),
            "X-RateLimit-Remaining": str(self.rate_limit - window.used),
            # Publer documents X-RateLimit-Reset as the UNIX time the window resets.
            "X-RateLimit-Reset": str(math.ceil(time.time() + left)),
        }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(left)))
        return allowed, headers

    def key_rejected(self, message: str) -> JSONResponse:
        """A key Publer does not accept: 401 by the docs, 403 as recorded live."""
        if self.auth_errors == "live":
            return _errors(403, LIVE_KEY_REJECTED)
        return _errors(401, message)

    def workspace_rejected(self, message: str) -> JSONResponse:
        """A missing or foreign workspace: 403 by the docs, 401 as recorded live."""
        if self.auth_errors == "live":
            return _errors(401, LIVE_WORKSPACE_REJECTED)
        return _errors(403, message)

    def new_job(self, payload: Any, failure: str | None = None) -> JSONResponse:
        job_id = _object_id()
        self.jobs[job_id] = _Job(payload, failure)
        return JSONResponse({"job_id": job_id})


@dataclass
class _Job:
    """A background job: `working` on its first poll, then `complete` or `failed`."""

    payload: Any
    failure: str | None
    polls: int = 0


# --- recording, faults ---------------------------------------------------------------------


class _Dropped(Exception):
    """The server refused the poisoned response start and will close the connection."""


class _Recorder:
    """Records every request but the control endpoints before anything else runs (so a key
    sent anywhere else would show), then applies the pending fault."""

    def __init__(self, app: ASGIApp, state: _State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/__sandbox/"):
            await self.app(scope, receive, send)
            return
        record = self.state.record(scope)
        request = _RecordedRequest(record, self.state.take_fault(), receive, send)
        self.state.active += 1
        try:
            await request.run(self.app, scope)
        except (_Dropped, ClientDisconnect):
            return
        finally:
            self.state.active -= 1


class _RecordedRequest:
    """One request to the API: its body fed to the record as it is received, the pending
    fault applied, and `X-Sandbox-Request-Index` added to the response head."""

    def __init__(self, record: _Record, fault: _Fault | None, receive: Receive, send: Send) -> None:
        self.record = record
        self.fault = fault
        self._receive = receive
        self._send = send
        self.body_done = False
        self.client_gone = False
        self.scope: Scope = {}

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        self.scope = scope
        if self.fault is not None and self.fault.status is not None:
            status = self.fault.status
            fault_response = (
                _rate_limited({"Retry-After": "1"})
                if status == 429
                else _errors(status, f"Sandbox fault: responding {status} as asked.")
            )
            await fault_response(scope, self.receive, self.send)
        elif self.fault is not None and self.fault.drop:
            await Response(status_code=502)(scope, self.receive, self.send)
        else:
            await app(scope, self.receive, self.send)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.record.feed(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
        elif message["type"] == "http.disconnect":
            self.client_gone = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            # Servers stop delivering the request body once the response has started, and the
            # record must count all of it, so what the handler left unread is read here.
            while not (self.body_done or self.client_gone or self.scope.get(UNREAD_BODY_KEY)):
                await self.receive()
            if self.fault is not None and self.fault.delay_seconds > 0:
                await self._pause(self.fault.delay_seconds)
            if self.fault is not None and self.fault.drop:
                await self._drop()
            index = str(self.record.index).encode()
            headers = [*message.get("headers", []), (b"x-sandbox-request-index", index)]
            message = {**message, "headers": headers}
        if self.client_gone:
            raise ClientDisconnect()
        await self._send(message)

    async def _pause(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            while not self.client_gone:
                await self.receive()

    async def _drop(self) -> NoReturn:
        # ASGI has no way to abort a connection. A header value that servers must refuse
        # (RFC 9110 5.5) makes uvicorn close the socket with nothing written; an in-process
        # transport that accepts it gets an exception instead. Either way no response arrives.
        start = {"type": "http.response.start", "status": 502, "headers": [(b"x-drop", b"\x00")]}
        try:
            await self._send(start)
        except Exception as exc:
            raise _Dropped() from exc
        raise ConnectionResetError("sandbox fault: connection dropped without a response")


# --- the API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    request: Request
    key: SandboxKey
    workspace: str | None
    params: dict[str, str]


_Handler = Callable[[_State, _Call], Awaitable[Response]]


@dataclass(frozen=True)
class _Endpoint:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    scope: str
    needs_workspace: bool
    handler: _Handler


async def _respond(state: _State, key: SandboxKey, request: Request) -> Response:
    found = _route(request.scope["path"][len(API_PREFIX) :], request.method)
    if isinstance(found, set):
        if not found:
            return _errors(404, "Not found.")
        allow = ", ".join(sorted(found | ({"HEAD"} if "GET" in found else set())))
        return _errors(405, f"{request.method} is not supported here.", {"Allow": allow})
    endpoint, params = found
    if endpoint.scope not in key.scopes:
        return _errors(403, f"This API key is missing the '{endpoint.scope}' scope.")
    workspace = request.headers.get("publer-workspace-id") if endpoint.needs_workspace else None
    if endpoint.needs_workspace and not workspace:
        return state.workspace_rejected("This endpoint needs the Publer-Workspace-Id header.")
    wanted = workspace or params.get("workspace_id")
    if wanted and key.workspaces and wanted not in key.workspaces:
        return state.workspace_rejected("This API key has no access to that workspace.")
    return await endpoint.handler(state, _Call(request, key, workspace, params))


def _route(path: str, method: str) -> tuple[_Endpoint, dict[str, str]] | set[str]:
    """The endpoint and its path parameters, or the methods the path allows (none: unknown)."""
    method = "GET" if method == "HEAD" else method
    allowed: set[str] = set()
    for endpoint in _ENDPOINTS:
        match = endpoint.pattern.fullmatch(path)
        if match is not None and method in endpoint.methods:
            return endpoint, match.groupdict()
        if match is not None:
            allowed |= endpoint.methods
    return allowed


async def _users_me(state: _State, call: _Call) -> Response:
    response = JSONResponse(
        {"id": "5f8d7a62c9e77e001f36e000", "name": "Sandbox User", "first_name": "Sandbox",
         "email": "sandbox@publer.invalid", "picture": None, "timezone": "UTC"}
    )  # fmt: skip
    # Two cookies, so proxies can be checked for never joining Set-Cookie values.
    response.set_cookie("_publer_session", "sandbox-session", httponly=True, samesite="lax")
    response.set_cookie("publer_locale", "en")
    return response


async def _workspaces(state: _State, call: _Call) -> Response:
    ids = [DEFAULT_WORKSPACE_ID, *sorted(call.key.workspaces - {DEFAULT_WORKSPACE_ID})]
    return JSONResponse(
        [{"id": ws, "name": f"Sandbox Workspace {n}", "plan": "business", "role": "owner",
          "picture": None, "owner": _SANDBOX_USER, "members": [_SANDBOX_USER]}
         for n, ws in enumerate(ids, 1)]
    )  # fmt: skip


async def _media_options(state: _State, call: _Call) -> Response:
    return JSONResponse([_account(*account) | {"albums": []} for account in _ACCOUNTS])


async def _accounts(state: _State, call: _Call) -> Response:
    return JSONResponse([_account(*account) for account in _ACCOUNTS])


def _account(account_id: str, name: str, provider: str) -> dict[str, Any]:
    return {"id": account_id, "name": name, "provider": provider, "type": "page", "picture": None,
            "social_id": "1" + account_id[-14:]}  # fmt: skip


async def _posts_list(state: _State, call: _Call) -> Response:
    query = call.request.query_params
    states = set(_many(query, "state"))
    accounts = set(_many(query, "account_ids"))
    text = query.get("query", "").lower()
    post_type = query.get("postType")
    since, until = query.get("from"), query.get("to")
    posts = [
        post
        for post in state.posts.values()
        if post["workspace_id"] == call.workspace
        and (not states or "all" in states or post["state"] in states)
        and (not accounts or post["account_id"] in accounts)
        and (not text or text in post["text"].lower())
        and (post_type is None or post["type"] == post_type)
        and (since is None or (post["scheduled_at"] or "") >= since)
        and (until is None or (post["scheduled_at"] or "")[:10] <= until)
    ]
    return JSONResponse(_paged("posts", posts, call.request, _PAGE_SIZE))


async def _posts_create(state: _State, call: _Call) -> Response:
    body = await _small_json(call.request)
    bulk = body.get("bulk")
    # Publer's create calls read one documented shape; anything else is refused before a
    # job starts, so that a client sending another shape learns it here.
    if not isinstance(bulk, dict):
        return _errors(400, 'param is missing or the value is empty: bulk ({"bulk": {...}})')
    drafts = bulk.get("posts")
    if not isinstance(drafts, list) or not drafts:
        return _errors(400, "param is missing or the value is empty: bulk.posts")
    bulk_state = bulk.get("state", "scheduled")
    if bulk_state not in _POST_STATES:
        return _errors(400, f"bulk.state must be one of {', '.join(sorted(_POST_STATES))}")
    publish = call.request.scope["path"].endswith("/publish")
    post_state = "published" if publish else str(bulk_state)
    known = {account[0] for account in _ACCOUNTS}
    created: list[dict[str, Any]] = []
    failures: dict[str, list[str]] = {}
    for draft in drafts:
        targets = _draft_accounts(draft)
        if not targets:
            if bulk_state in _ACCOUNTLESS_STATES:
                created.append(
                    _store_post(state, call, _object_id(), post_state, draft, None, None)
                )
            else:
                failures.setdefault("", []).append(
                    f"A {bulk_state} post needs bulk.posts[].accounts[].id."
                )
            continue
        for account_id, scheduled_at in targets:
            if account_id not in known:
                failures.setdefault(account_id, []).append("This account is not in the workspace.")
                continue
            created.append(
                _store_post(state, call, _object_id(), post_state, draft, account_id, scheduled_at)
            )
    # Publer fails the whole job when no post could be made (every account unknown).
    failure = "No post could be created for the accounts given." if not created else None
    return state.new_job({"failures": failures, "posts": created}, failure)


async def _post_update(state: _State, call: _Call) -> Response:
    old = state.posts.get(call.params["id"])
    if old is None or old["workspace_id"] != call.workspace:
        return _errors(404, "Post not found.")
    body = await _small_json(call.request)
    draft = body.get("post", body)
    # An update changes the fields it gives and keeps the others.
    changes = {
        field: draft[field]
        for field in ("text", "type", "title", "url")
        if isinstance(draft, dict) and isinstance(draft.get(field), str)
    }
    old.update(changes)
    return JSONResponse(old)


async def _posts_delete(state: _State, call: _Call) -> Response:
    # One id in the path, or many as post_ids=A&post_ids=B (Publer's form) or post_ids[]=.
    ids = (
        [call.params["id"]] if "id" in call.params else _many(call.request.query_params, "post_ids")
    )
    deleted = [post_id for post_id in ids if state.posts.pop(post_id, None) is not None]
    return JSONResponse({"deleted_ids": deleted})


async def _job_status(state: _State, call: _Call) -> Response:
    job = state.jobs.get(call.params["job_id"])
    if job is None:
        return _errors(404, "Job not found.")
    job.polls += 1
    plan = {"rate": "business", "locked": False}
    if job.polls == 1:
        return JSONResponse({"status": "working", "plan": plan})
    if job.failure is not None:
        return JSONResponse(
            {"status": "failed", "error": job.failure, "payload": job.payload, "plan": plan}
        )
    return JSONResponse({"status": "complete", "payload": job.payload, "plan": plan})


async def _media_list(state: _State, call: _Call) -> Response:
    query = call.request.query_params
    size = query.get("sandbox_bytes")
    if size is None:
        ids = set(_many(query, "ids"))
        types = set(_many(query, "types"))
        search = query.get("search", "").lower()
        media = [
            item
            for item in state.media
            if (not ids or item["id"] in ids)
            and (not types or item["type"] in types)
            and (not search or search in item["name"].lower())
        ]
        return JSONResponse(_paged("media", media, call.request, _PAGE_SIZE))
    if not re.fullmatch(r"[0-9]{1,12}", size):
        return _errors(400, "sandbox_bytes must be a whole number of bytes.")
    filler = max(0, int(size) - len(_DOWNLOAD_HEAD) - len(_DOWNLOAD_TAIL))
    length = {"content-length": str(filler + len(_DOWNLOAD_HEAD) + len(_DOWNLOAD_TAIL))}
    if call.request.method == "HEAD":
        return Response(headers=length, media_type="application/json")
    return StreamingResponse(_padded_body(filler), headers=length, media_type="application/json")


async def _padded_body(filler: int) -> AsyncIterator[bytes]:
    yield _DOWNLOAD_HEAD
    while filler > 0:
        chunk = _FILLER if filler >= len(_FILLER) else _FILLER[:filler]
        filler -= len(chunk)
        yield chunk
    yield _DOWNLOAD_TAIL


async def _media_upload(state: _State, call: _Call) -> Response:
    declared = call.request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_MEDIA_BYTES:
        # Refused on the declared length, before a byte of the body is read (an
        # `Expect: 100-continue` client never sends it).
        call.request.scope[UNREAD_BODY_KEY] = True
        return _errors(413, "The file is larger than 200 MB, Publer's upload limit.")
    boundary = _multipart_boundary(call.request.headers.get("content-type", ""))
    if boundary is None:
        return _errors(400, "Upload the file as multipart/form-data in the field 'file'.")
    part = _FilePart(boundary)
    async for chunk in call.request.stream():
        part.feed(chunk)
        if part.size > MAX_MEDIA_BYTES:
            return _errors(413, "The file is larger than 200 MB, Publer's upload limit.")
    if not part.found:
        return _errors(400, "The multipart body has no field 'file'.")
    kind = {"image": "photo", "video": "video"}.get(part.content_type.partition("/")[0], "document")
    media = _media_json(part.filename or "upload", kind) | {"size": part.size}
    state.media.append(media)
    return JSONResponse(media)


async def _media_from_url(state: _State, call: _Call) -> Response:
    items = (await _small_json(call.request)).get("media")
    items = items if isinstance(items, list) else []
    media: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    for item in items:
        url = str(item.get("url", "")) if isinstance(item, dict) else ""
        if not re.match(r"https?://[^/\s]+", url):
            failures[url] = "The media could not be downloaded from this URL."
            continue
        name = str(item.get("name") or url.rsplit("/", 1)[-1] or "media")
        media.append(_media_json(name, "photo", url))
    state.media.extend(media)
    # A URL Publer cannot download fails the job (the documented failure of an upload).
    failure = "Some media could not be downloaded." if failures or not items else None
    return state.new_job(media if failure is None else {"failures": failures}, failure)


async def _locations(state: _State, call: _Call) -> Response:
    query = call.request.query_params.get("q", "Sandbox")
    return JSONResponse([{"id": "110000000000001", "name": f"{query} City", "country": "AL"}])


def _needs_dates(call: _Call) -> Response | None:
    query = call.request.query_params
    if query.get("from") and query.get("to"):
        return None
    return _errors(400, "The 'from' and 'to' dates (YYYY-MM-DD) are required.")


async def _charts(state: _State, call: _Call) -> Response:
    return JSONResponse(
        [{"id": chart, "title": chart.title(), "group_id": group, "tooltip": "",
          "type": "vertical", "last_value": False, "show_percentage": False}
         for chart, group in (("followers", "growth"), ("reach", "insights"))]
    )  # fmt: skip


async def _chart_data(state: _State, call: _Call) -> Response:
    charts = _many(call.request.query_params, "chart_ids") or ["followers"]
    return JSONResponse(
        {"current": {chart: {"value": 0} for chart in charts},
         "previous": {chart: {"value": 0} for chart in charts}}
    )  # fmt: skip


async def _post_insights(state: _State, call: _Call) -> Response:
    query = call.request.query_params
    if not (query.get("from") and query.get("to")):
        # Recorded live: without its required dates the report fails inside Publer.
        return _errors(500, "Internal Server Error")
    account = call.params.get("account_id")
    posts = [
        {"id": post["id"], "text": post["text"], "title": "", "scheduled_at": post["scheduled_at"],
         "post_type": post["type"], "account_id": post["account_id"], "details": {"labels": []},
         "analytics": {"reach": 0, "engagement": 0, "engagement_rate": 0.0, "likes": 0}}
        for post in state.posts.values()
        if post["workspace_id"] == call.workspace and account in (None, post["account_id"])
    ]  # fmt: skip
    return JSONResponse(_paged("posts", posts, call.request, _INSIGHTS_PAGE_SIZE))


async def _best_times(state: _State, call: _Call) -> Response:
    # Without from/to, Publer computes best times over a recent default window.
    return JSONResponse({day: [0] * 24 for day in _DAYS})


async def _hashtag_insights(state: _State, call: _Call) -> Response:
    return JSONResponse({"records": [], "total": 0})


async def _hashtag_performing_posts(state: _State, call: _Call) -> Response:
    if not call.request.query_params.get("hashtag"):
        return _errors(400, "The 'hashtag' parameter is required.")
    return JSONResponse([])


async def _members(state: _State, call: _Call) -> Response:
    return _needs_dates(call) or JSONResponse(
        [{"engagements": 0, "posts": len(state.posts), "reach": 0,
          "account_ids": [account[0] for account in _ACCOUNTS],
          "user": {"id": "5f8d7a62c9e77e001f36e000", "name": "Sandbox User", "picture": None}}]
    )  # fmt: skip


async def _competitors(state: _State, call: _Call) -> Response:
    return JSONResponse(
        [{"provider": "instagram", "name": "Rival Studio", "social_id": "17841400000000001",
          "picture": None, "type": "business", "competitor_sync_in_queue": False,
          "username": "rival.studio", "verified": False}]
    )  # fmt: skip


async def _competitors_analytics(state: _State, call: _Call) -> Response:
    return JSONResponse({"insights": [], "total": 0})


def _endpoint(
    methods: str, template: str, scope: str, handler: _Handler, workspace: bool = True
) -> _Endpoint:
    pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
    return _Endpoint(frozenset(methods.split()), re.compile(pattern), scope, workspace, handler)


def _analytics(kind: str, handler: _Handler) -> tuple[_Endpoint, _Endpoint]:
    """A report for one account (`/analytics/{account_id}/kind`) and for all (`/analytics/kind`)."""
    return (
        _endpoint("GET", f"/analytics/{kind}", "analytics", handler),
        _endpoint("GET", f"/analytics/{{account_id}}/{kind}", "analytics", handler),
    )


# Literal paths come before templates: the first match wins.
_ENDPOINTS = (
    _endpoint("GET", "/users/me", "users", _users_me, workspace=False),
    _endpoint("GET", "/workspaces", "workspaces", _workspaces, workspace=False),
    _endpoint(
        "GET",
        "/workspaces/{workspace_id}/media_options",
        "workspaces",
        _media_options,
        workspace=False,
    ),
    _endpoint("GET", "/accounts", "accounts", _accounts),
    _endpoint("GET", "/posts", "posts", _posts_list),
    _endpoint("POST", "/posts", "posts", _posts_create),
    _endpoint("DELETE", "/posts", "posts", _posts_delete),
    _endpoint("POST", "/posts/schedule", "posts", _posts_create),
    _endpoint("POST", "/posts/schedule/publish", "posts", _posts_create),
    _endpoint("PUT", "/posts/{id}", "posts", _post_update),
    _endpoint("DELETE", "/posts/{id}", "posts", _posts_delete),
    _endpoint("GET", "/job_status/{job_id}", "job_status", _job_status),
    _endpoint("GET", "/media", "media", _media_list),
    _endpoint("POST", "/media", "media", _media_upload),
    _endpoint("POST", "/media/from-url", "media", _media_from_url),
    _endpoint("GET", "/locations", "locations", _locations),
    _endpoint("GET", "/analytics/charts", "analytics", _charts),
    _endpoint("GET", "/analytics/members", "analytics", _members),
    *_analytics("chart_data", _chart_data),
    *_analytics("post_insights", _post_insights),
    *_analytics("best_times", _best_times),
    *_analytics("hashtag_insights", _hashtag_insights),
    *_analytics("hashtag_performing_posts", _hashtag_performing_posts),
    _endpoint("GET", "/competitors", "analytics", _competitors),
    _endpoint("GET", "/competitors/analytics", "analytics", _competitors_analytics),
    _endpoint("GET", "/competitors/{account_id}", "analytics", _competitors),
    _endpoint("GET", "/competitors/{account_id}/analytics", "analytics", _competitors_analytics),
)


# --- helpers -------------------------------------------------------------------------------


class _FilePart:
    """Measures the multipart part named "file" as the body streams past, holding a few KiB."""

    _NAME = re.compile(rb';\s*name="file"')

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._pending = b""
        self._phase = "before"  # then "data", then "done"
        self.size = 0
        self.filename = ""
        self.content_type = ""

    @property
    def found(self) -> bool:
        return self._phase != "before"

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        if self._phase == "before":
            name = self._NAME.search(data)
            headers_end = data.find(b"\r\n\r\n", name.end()) if name else -1
            if name is None or headers_end < 0:
                self._pending = data[-_PART_HEADERS_LIMIT:]
                return
            headers = data[data.rfind(b"\r\n--", 0, name.start()) + 2 : headers_end].decode(
                "latin-1"
            )
            filename = re.search(r'filename="([^"]*)"', headers)
            content_type = re.search(r"(?im)^content-type:\s*(\S+)", headers)
            self.filename = filename.group(1) if filename else ""
            self.content_type = content_type.group(1).lower() if content_type else ""
            self._phase, data = "data", data[headers_end + 4 :]
        if self._phase == "data":
            end = data.find(self._delimiter)
            if end >= 0:
                self.size += end
                self._phase, data = "done", b""
            keep = min(len(data), len(self._delimiter) - 1)
            self.size += len(data) - keep
            self._pending = data[len(data) - keep :]


def _multipart_boundary(content_type: str) -> bytes | None:
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        return None
    for parameter in parameters.split(";"):
        name, _, value = parameter.strip().partition("=")
        if name.lower() == "boundary" and value.strip('"'):
            return value.strip('"').encode("latin-1")
    return None


def _store_post(
    state: _State,
    call: _Call,
    post_id: str,
    post_state: str,
    draft: Any,
    account_id: str | None,
    scheduled_at: str | None,
) -> dict[str, Any]:
    text, kind = _draft_text(draft)
    post = {"id": post_id, "state": post_state, "text": text, "type": kind, "url": None,
            "account_id": account_id, "user": _SANDBOX_USER, "scheduled_at": scheduled_at,
            "post_link": None, "has_media": False,
            "network": None if account_id is None else _network_of(account_id),
            "workspace_id": call.workspace}  # fmt: skip
    state.posts[post_id] = post
    return post


def _draft_text(draft: Any) -> tuple[str, str]:
    """The text and type of a post: `networks.<provider>` (Publer's shape) first, else a
    top-level `text`."""
    if not isinstance(draft, dict):
        return "", "status"
    networks = draft.get("networks")
    if isinstance(networks, dict):
        for content in networks.values():
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                return content["text"], str(content.get("type", "status"))
    text = draft.get("text")
    return (text if isinstance(text, str) else ""), str(draft.get("type", "status"))


def _draft_accounts(draft: Any) -> list[tuple[str, str | None]]:
    accounts = draft.get("accounts") if isinstance(draft, dict) else None
    found: list[tuple[str, str | None]] = []
    for account in accounts if isinstance(accounts, list) else []:
        if isinstance(account, dict) and isinstance(account.get("id"), str):
            when = account.get("scheduled_at")
            found.append((account["id"], when if isinstance(when, str) else None))
    return found


def _network_of(account_id: str) -> str:
    return next((provider for aid, _, provider in _ACCOUNTS if aid == account_id), "facebook")


def _many(query: Any, name: str) -> list[str]:
    """A list parameter in any form clients send: `name=a&name=b`, `name[]=a`, `name=a,b`."""
    values = [*query.getlist(name), *query.getlist(name + "[]")]
    return [part for value in values for part in value.split(",") if part]


def _media_json(name: str, kind: str, url: str | None = None) -> dict[str, Any]:
    media_id = _object_id()
    path = url or f"https://cdn.publer.io/uploads/sandbox/{media_id}/{name}"
    return {"id": media_id, "path": path, "thumbnail": path, "type": kind, "name": name,
            "caption": None, "width": None, "height": None, "validity": {}}  # fmt: skip


def _paged(
    name: str, items: list[dict[str, Any]], request: Request, per_page: int
) -> dict[str, Any]:
    """One page (0-based `page`) of `items` with Publer's paging fields."""
    page_text = request.query_params.get("page", "0")
    page = int(page_text) if page_text.isdecimal() else 0
    return {
        name: items[page * per_page : (page + 1) * per_page],
        "total": len(items),
        "page": page,
        "per_page": per_page,
        "total_pages": math.ceil(len(items) / per_page),
    }


async def _small_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; {} when it is not one or is too large to be a post."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _JSON_BODY_LIMIT:
            return {}
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _problem(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}"
            for error in exc.errors()
        )
    return str(exc)


def _object_id() -> str:
    return secrets.token_hex(12)


def _rate_limited(headers: dict[str, str] | None = None) -> Response:
    return Response(RATE_LIMITED_BODY, 429, headers, media_type="application/json")


def _errors(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errors": [message]}, status, headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return _errors(exc.status_code, exc.detail, dict(exc.headers or {}))
    return _errors(500, "Internal error.")
