"""The Publer sandbox: a stand-in for Publer's REST API for the endpoints Publer documents.

It is a test double of Publer, not of the proxy, so it follows Publer's documented behaviour
(https://publer.com/docs): `Authorization: Bearer-API <key>` or 401, the key's scopes and
`Publer-Workspace-Id` or 403, 100 requests per 2 minutes or 429 with `X-RateLimit-*`, errors
as `{"errors": [...]}` (the 429 body is `{"error": "Rate limit exceeded. Retry later."}`),
multipart uploads of at most 200 MB, and `job_id`s that `/job_status/{job_id}` completes.

Every request under /api/v1 is recorded before any check, its body hashed as it streams, and
its answer carries `X-Sandbox-Request-Index`. Control endpoints, for tests, never recorded:

    GET    /__sandbox/requests   {"requests": [...]} in arrival order
    DELETE /__sandbox/requests   forgets them
    PUT    /__sandbox/keys       {"keys": [{"key", "scopes"?, "workspaces"?, "revoked"?}]}
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

ALL_SCOPES: frozenset[str] = frozenset(
    {"users", "workspaces", "accounts", "posts", "media", "job_status", "locations", "analytics"}
)
DEFAULT_SANDBOX_KEY: str = "sandbox-key-0123456789abcdef"
DEFAULT_WORKSPACE_ID: str = "5f8d7a62c9e77e001f36e3a1"
API_PREFIX = "/api/v1"
MAX_MEDIA_BYTES = 200 * 1000 * 1000
DOWNLOAD_CHUNK_BYTES = 64 * 1024
RATE_LIMITED_BODY = b'{"error":"Rate limit exceeded. Retry later."}'

_JSON_BODY_LIMIT = 1024 * 1024
_PAGE_SIZE = 20
_PART_HEADERS_LIMIT = 64 * 1024
_FILLER = b"a" * DOWNLOAD_CHUNK_BYTES
_DOWNLOAD_HEAD = b'{"media":[],"total":0,"padding":"'
_DOWNLOAD_TAIL = b'"}'
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
    keys: Sequence[SandboxKey], *, rate_limit: int = 100, rate_period_seconds: float = 120.0
) -> Starlette:
    """Build a sandbox accepting `keys`, each key its own account of `rate_limit` requests
    per fixed window of `rate_period_seconds`."""
    if rate_limit < 1 or rate_period_seconds <= 0:
        raise ValueError("the sandbox rate limit needs at least 1 request per positive period")
    state = _State(keys, rate_limit, rate_period_seconds)

    async def api(request: Request) -> Response:
        key = state.authenticate(request.headers.getlist("authorization"))
        if isinstance(key, str):
            return _errors(401, key)
        allowed, limit_headers = state.spend(key.key)
        response = await _answer(state, key, request) if allowed else _rate_limited()
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

    def to_key(self) -> SandboxKey:
        _check_key(self.key)
        _check_scopes(frozenset(self.scopes))
        return SandboxKey(
            self.key, frozenset(self.scopes), frozenset(self.workspaces), self.revoked
        )


class _KeysIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    keys: list[_KeyIn]


class _Fault(BaseModel):
    """What the next `count` /api/v1 requests get instead of (or before) their answer."""

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
            raise ValueError("a fault either answers a 'status' or drops the connection, not both")
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
        self.jobs: dict[str, Any] = {}
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

    def new_job(self, payload: Any) -> JSONResponse:
        job_id = _object_id()
        self.jobs[job_id] = payload
        return JSONResponse({"job_id": job_id}, 202)


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
        exchange = _Exchange(record, self.state.take_fault(), receive, send)
        self.state.active += 1
        try:
            await exchange.run(self.app, scope)
        except (_Dropped, ClientDisconnect):
            return
        finally:
            self.state.active -= 1


class _Exchange:
    def __init__(self, record: _Record, fault: _Fault | None, receive: Receive, send: Send) -> None:
        self.record = record
        self.fault = fault
        self._receive = receive
        self._send = send
        self.body_done = False
        self.client_gone = False

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        if self.fault is not None and self.fault.status is not None:
            status = self.fault.status
            fault_answer = (
                _rate_limited({"Retry-After": "1"})
                if status == 429
                else _errors(status, f"Sandbox fault: answering {status} as asked.")
            )
            await fault_answer(scope, self.receive, self.send)
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
            # Servers stop delivering the request body once the answer has started, and the
            # record must count all of it, so what the handler left unread is read here.
            while not (self.body_done or self.client_gone):
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
        # transport that accepts it gets an exception instead. Either way no answer arrives.
        start = {"type": "http.response.start", "status": 502, "headers": [(b"x-drop", b"\x00")]}
        try:
            await self._send(start)
        except Exception as exc:
            raise _Dropped() from exc
        raise ConnectionResetError("sandbox fault: connection dropped without an answer")


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


async def _answer(state: _State, key: SandboxKey, request: Request) -> Response:
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
        return _errors(403, "This endpoint needs the Publer-Workspace-Id header.")
    wanted = workspace or params.get("workspace_id")
    if wanted and key.workspaces and wanted not in key.workspaces:
        return _errors(403, "This API key has no access to that workspace.")
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
          "picture": None} for n, ws in enumerate(ids, 1)]
    )  # fmt: skip


async def _media_options(state: _State, call: _Call) -> Response:
    return JSONResponse([_account(*account) | {"albums": []} for account in _ACCOUNTS])


async def _accounts(state: _State, call: _Call) -> Response:
    return JSONResponse([_account(*account) for account in _ACCOUNTS])


def _account(account_id: str, name: str, provider: str) -> dict[str, Any]:
    return {"id": account_id, "name": name, "provider": provider, "type": "page", "picture": None}


async def _posts_list(state: _State, call: _Call) -> Response:
    posts = [post for post in state.posts.values() if post["workspace_id"] == call.workspace]
    return JSONResponse({"posts": _page(posts, call.request), "total": len(posts)})


async def _posts_create(state: _State, call: _Call) -> Response:
    bulk = (await _small_json(call.request)).get("bulk")
    bulk = bulk if isinstance(bulk, dict) else {}
    drafts = bulk.get("posts")
    drafts = drafts if isinstance(drafts, list) else [{}]
    publish = call.request.scope["path"].endswith("/publish")
    post_state = "published" if publish else str(bulk.get("state", "scheduled"))
    created = [_store_post(state, call, _object_id(), post_state, draft) for draft in drafts]
    return state.new_job({"failures": {}, "posts": created})


async def _post_update(state: _State, call: _Call) -> Response:
    body = await _small_json(call.request)
    post_state = state.posts.get(call.params["id"], {}).get("state", "scheduled")
    return JSONResponse(_store_post(state, call, call.params["id"], post_state, body))


async def _posts_delete(state: _State, call: _Call) -> Response:
    ids = [call.params["id"]] if "id" in call.params else []
    ids = ids or call.request.query_params.getlist("post_ids[]")
    deleted = [post_id for post_id in ids if state.posts.pop(post_id, None) is not None]
    return JSONResponse({"deleted_ids": deleted})


async def _job_status(state: _State, call: _Call) -> Response:
    if call.params["job_id"] not in state.jobs:
        return _errors(404, "Job not found.")
    return JSONResponse({"status": "complete", "payload": state.jobs[call.params["job_id"]]})


async def _media_list(state: _State, call: _Call) -> Response:
    size = call.request.query_params.get("sandbox_bytes")
    if size is None:
        return JSONResponse({"media": _page(state.media, call.request), "total": len(state.media)})
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
    urls = [str(item.get("url", "")) for item in items if isinstance(item, dict)]
    media = [_media_json(url.rsplit("/", 1)[-1] or "media", "photo", url) for url in urls]
    state.media.extend(media)
    return state.new_job(media)


async def _locations(state: _State, call: _Call) -> Response:
    query = call.request.query_params.get("q", "Sandbox")
    return JSONResponse([{"id": "110000000000001", "name": f"{query} City", "country": "AL"}])


async def _analytics(state: _State, call: _Call) -> Response:
    path = call.request.scope["path"]
    if path.endswith("/charts"):
        return JSONResponse(
            [{"id": "reach", "title": "Reach"}, {"id": "followers", "title": "Followers"}]
        )
    if path.endswith("/members"):
        return JSONResponse(
            {"members": [{"id": "5f8d7a62c9e77e001f36e000", "name": "Sandbox User"}]}
        )
    return JSONResponse({"account_id": call.params["account_id"], "data": [], "total": 0})


def _endpoint(
    methods: str, template: str, scope: str, handler: _Handler, workspace: bool = True
) -> _Endpoint:
    pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
    return _Endpoint(frozenset(methods.split()), re.compile(pattern), scope, workspace, handler)


_ANALYTICS_KINDS = "chart_data|post_insights|best_times|hashtag_insights|hashtag_performing_posts"
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
    _endpoint("GET", "/analytics/charts", "analytics", _analytics),
    _endpoint("GET", "/analytics/members", "analytics", _analytics),
    _endpoint("GET", "/analytics/{account_id}/(" + _ANALYTICS_KINDS + ")", "analytics", _analytics),
    _endpoint("GET", "/competitors/{account_id}", "analytics", _analytics),
    _endpoint("GET", "/competitors/{account_id}/analytics", "analytics", _analytics),
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
    state: _State, call: _Call, post_id: str, post_state: str, draft: Any
) -> dict[str, Any]:
    text = draft.get("text", "") if isinstance(draft, dict) else ""
    post = {"id": post_id, "state": post_state, "text": text, "workspace_id": call.workspace,
            "account_id": _ACCOUNTS[0][0], "scheduled_at": None}  # fmt: skip
    state.posts[post_id] = post
    return post


def _media_json(name: str, kind: str, url: str | None = None) -> dict[str, Any]:
    media_id = _object_id()
    path = url or f"https://cdn.publer.io/uploads/sandbox/{media_id}/{name}"
    return {"id": media_id, "path": path, "thumbnail": path, "type": kind, "name": name,
            "caption": None, "width": None, "height": None, "validity": {}}  # fmt: skip


def _page(items: list[dict[str, Any]], request: Request) -> list[dict[str, Any]]:
    page = request.query_params.get("page", "0")
    start = int(page) * _PAGE_SIZE if page.isdecimal() else 0
    return items[start : start + _PAGE_SIZE]


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
