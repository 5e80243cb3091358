"""The proxy's one promise as a property, over the real proxy and sandbox.

For any generated request: either the proxy refused it and Publer recorded nothing, or
Publer recorded exactly one request, under /api/v1, allowed by the route's scopes (Publer's
endpoint table, written out in tests/fuzz_paths.py), with the path that was checked, the route's
workspace (or the client's allowed choice) and the key. Requests built only of valid parts
must moreover be decided as the policy rules say, so the property is never met by a
proxy that refuses everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.policy import hash_token
from tests.bao import Bao
from tests.conftest import WORKSPACE
from tests.fuzz_paths import PUBLER_ENDPOINTS, spec_scope, spec_takes_workspace
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy
from tests.test_hostile import Upstream, send_raw, values

TEAM_A_WORKSPACE = "aaaaaaaaaaaaaaaaaaaaaaaa"
TEAM_B_WORKSPACES = ("bbbbbbbbbbbbbbbbbbbbbbbb", "cccccccccccccccccccccccc")
TEAM_B_TOKEN = "invariant-client-token-1"
FOREIGN_WORKSPACE = "ffffffffffffffffffffffff"


@dataclass(frozen=True)
class RouteModel:
    """What the test knows of a configured route."""

    prefix: str
    scopes: frozenset[str]
    workspaces: tuple[str, ...]
    read_only: bool = False
    needs_token: bool = False


ROUTES = {
    "": RouteModel(
        "", frozenset({"posts", "media", "accounts", "job_status", "users"}), (WORKSPACE,)
    ),
    "/teamA": RouteModel("/teamA", frozenset({"posts"}), (TEAM_A_WORKSPACE,), read_only=True),
    "/teamB": RouteModel(
        "/teamB", frozenset({"posts", "analytics"}), TEAM_B_WORKSPACES, needs_token=True
    ),
}


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, sandbox: Sandbox
) -> Iterator[Proxy]:
    """The proxy with the three routes of ROUTES."""
    routes: list[dict[str, Any]] = [
        {
            "name": f"route{index}",
            "prefix": model.prefix,
            "credential": "publer",
            "scopes": sorted(model.scopes),
            "read_only": model.read_only,
            "workspace_ids": list(model.workspaces),
            **(
                {"clients": [{"name": "app", "token_sha256": hash_token(TEAM_B_TOKEN)}]}
                if model.needs_token
                else {}
            ),
        }
        for index, model in enumerate(ROUTES.values())
    ]
    config = proxy_config(
        bao.url,
        sandbox.url,
        token_file=token_file,
        routes=routes,
        rate_limit={"requests": 100_000, "per_seconds": 1},
    )
    server = start_proxy(tmp_path_factory.mktemp("invariant"), config)
    yield server
    server.stop()


@dataclass(frozen=True)
class Generated:
    """One generated request, and whether it was built of valid parts only."""

    method: str
    prefix: bytes
    root: bytes
    segments: tuple[bytes, ...]
    query: bytes
    authorization: str | None
    workspaces: tuple[str, ...]
    extra: bytes
    clean: bool

    @property
    def path(self) -> bytes:
        """The raw path: prefix, API root, segments."""
        return self.prefix + self.root + b"".join(b"/" + s for s in self.segments)

    def raw(self) -> bytes:
        """The request as bytes on the wire."""
        head = f"{self.method} ".encode() + self.path + self.query + b" HTTP/1.1\r\n"
        head += b"Host: localhost\r\nConnection: close\r\n" + self.extra
        if self.authorization is not None:
            head += f"Authorization: {self.authorization}\r\n".encode()
        for workspace in self.workspaces:
            head += f"Publer-Workspace-Id: {workspace}\r\n".encode()
        if self.method in ("POST", "PUT", "PATCH"):
            return head + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        return head + b"\r\n"


IDS = [b"5f8d7a62c9e77e001f36e3a1", b"acc-1", b"job_2"]
HOSTILE_SEGMENTS = [
    b"", b".", b"..", b"%2e%2e", b"%2E.", b"%2f", b"posts%2f..", b"%5c", b"\\", b"%00", b"%252e",
    b"a@b", b"posts;x", b"p%6fsts", b"~", b"posts#/../x", b"%c0%ae", b"%ff", b"me%3f", b"a b",
]  # fmt: skip
HOSTILE_SUFFIXES = [b";x", b"%2f..", b"/", b"#", b"%00", b"@evil.test", b"\\..", b"%20", b"."]
CLEAN_QUERIES = [b"", b"?page=0", b"?accounts[]=a1&accounts[]=a2", b"?q=%41%2f+b&empty="]
HOSTILE_QUERIES = [b"?#", b"?a=b#c", b"?a=%0d%0aX:y", b"??x", b"?a=<b>", b'?a="b"', b"?a=\xff"]
EXTRA_HEADERS = [
    b"Publer_Workspace_Id: " + FOREIGN_WORKSPACE.encode() + b"\r\n",
    b"Connection: close, Authorization, Publer-Workspace-Id\r\n",
    b"X-HTTP-Method-Override: DELETE\r\n",
    b"X-Original-URL: /api/v1/analytics/charts\r\n",
    b"X-Forwarded-Host: evil.test\r\n",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def mostly(draw: st.DrawFn, likely: list[Any], anything: list[Any]) -> Any:
    """One of `likely` three times in four, else one of `anything`."""
    roll: int = draw(st.integers(0, 3))
    return draw(st.sampled_from(likely if likely and roll else anything))


@st.composite
def endpoint(draw: st.DrawFn, scopes: frozenset[str]) -> tuple[str, list[bytes]]:
    """A method and the segments of a documented Publer endpoint: mostly one of `scopes`, with a
    method it accepts."""
    in_scope = [e for e in PUBLER_ENDPOINTS if e[2] in scopes]
    methods, template, _ = mostly(draw, in_scope, list(PUBLER_ENDPOINTS))
    accepted = methods.split() + (["HEAD"] if "GET" in methods else [])
    method: str = mostly(draw, accepted, METHODS)
    segments = [
        draw(st.sampled_from(IDS)) if part == "{id}" else part.encode()
        for part in template.split("/")[1:]
    ]
    return method, segments


@st.composite
def hostile(draw: st.DrawFn, segments: list[bytes]) -> list[bytes]:
    """The segments with one or two hostile changes."""
    segments = list(segments)
    for _ in range(draw(st.integers(1, 2))):
        index = draw(st.integers(0, len(segments)))
        change = draw(st.sampled_from(["insert", "replace", "suffix", "bytes"]))
        piece = draw(st.sampled_from(HOSTILE_SEGMENTS))
        if change == "insert" or index == len(segments):
            segments.insert(index, piece)
        elif change == "replace":
            segments[index] = piece
        elif change == "suffix":
            segments[index] += draw(st.sampled_from(HOSTILE_SUFFIXES))
        else:
            segments[index] = draw(st.binary(min_size=1, max_size=4))
    return segments


@st.composite
def requests(draw: st.DrawFn) -> Generated:
    """A request to a documented endpoint from valid parts, or with hostile parts mixed in."""
    clean = draw(st.booleans())
    prefix = draw(st.sampled_from([b"", b"/teamA", b"/teamB"]))
    route = ROUTES[prefix.decode()]
    method, segments = draw(endpoint(route.scopes))
    root = b"/api/v1"
    query = draw(st.sampled_from(CLEAN_QUERIES))
    tokens = [f"Bearer {TEAM_B_TOKEN}", f"Bearer-API {TEAM_B_TOKEN}"]
    authorization = mostly(draw, tokens, [None, "Bearer-API nope"])
    workspaces = [WORKSPACE, TEAM_A_WORKSPACE, *TEAM_B_WORKSPACES]
    asked = [mostly(draw, list(route.workspaces), workspaces)] if draw(st.booleans()) else []
    extra = b""
    if not clean:
        if draw(st.booleans()):
            segments = draw(hostile(segments))
        prefix = mostly(draw, [prefix], [b"/teamC", b"/teama", b"/teamA/..", b"/teamA%2f.."])
        root = mostly(
            draw, [root], [b"/api/v2", b"/API/v1", b"//api/v1", b"/api/v1/.", b"/api/%761"]
        )
        query = mostly(draw, [query], HOSTILE_QUERIES)
        workspaces += [FOREIGN_WORKSPACE, "", f"{WORKSPACE},x"]
        asked += draw(st.lists(st.sampled_from(workspaces), max_size=1))
        extra = draw(st.sampled_from([b"", *EXTRA_HEADERS]))
    return Generated(
        method=method,
        prefix=prefix,
        root=root,
        segments=tuple(segments),
        query=query,
        authorization=authorization,
        workspaces=tuple(asked),
        extra=extra,
        clean=clean,
    )


def route_of(path: str) -> RouteModel | None:
    """The route serving a raw path: its prefix + /api/v1 is a whole-segment prefix."""
    for prefix in sorted(ROUTES, key=len, reverse=True):
        root = prefix + "/api/v1"
        if path == root or path.startswith(root + "/"):
            return ROUTES[prefix]
    return None


def expected_workspace(
    route: RouteModel, asked: tuple[str, ...], takes_workspace: bool
) -> list[str] | None:
    """The workspace headers Publer must get, or None when the proxy must refuse the request.
    An empty header is no choice; where Publer takes no workspace, none is sent."""
    if not takes_workspace:
        return []
    asked = tuple(value for value in asked if value.strip())
    if not asked:
        return [route.workspaces[0]]
    return [asked[0]] if len(asked) == 1 and asked[0] in route.workspaces else None


def allowed_by_the_rules(request: Generated) -> bool:
    """The policy on a request of valid parts: route, client, scope, method, workspace."""
    route = route_of(request.path.decode())
    if route is None:
        return False
    below = request.path.decode().removeprefix(route.prefix + "/api/v1")
    scope = spec_scope(request.method, below)
    return (
        scope in route.scopes
        and (not route.read_only or request.method in ("GET", "HEAD"))
        and (not route.needs_token or request.authorization != "Bearer-API nope")
        and (not route.needs_token or request.authorization is not None)
        and expected_workspace(route, request.workspaces, spec_takes_workspace(below)) is not None
    )


@pytest.fixture(scope="module")
def recorder(sandbox: Sandbox) -> Iterator[Upstream]:
    """The sandbox's recording, read over one kept-alive connection."""
    with httpx.Client(trust_env=False, timeout=10) as control:
        yield Upstream(sandbox.url, control)


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
def test_refused_or_forwarded_once_safely(
    proxy: Proxy, recorder: Upstream, api_key: str, request: Generated
) -> None:
    """Every request is refused with nothing sent, or sent to Publer exactly once, as
    checked, within the route's scopes, with the route's workspace and the key."""
    recorder.clear()
    to_head = request.method == "HEAD"
    responses = [a for a in send_raw(proxy.url, request.raw(), to_head=to_head) if a.status >= 200]
    assert len(responses) == 1, responses
    [response] = responses
    records = recorder.requests()
    if request.clean:
        assert (response.code is None) == allowed_by_the_rules(request), (response, request)
    event(f"{'clean' if request.clean else 'hostile'}: {response.code or 'forwarded'}")
    if response.code is not None:
        assert response.status in (400, 401, 403, 404), response
        assert records == [], records
        return
    assert len(records) == 1, records
    [record] = records
    raw_path, _, raw_query = (request.path + request.query).decode("ascii").partition("?")
    route = route_of(raw_path)
    assert route is not None
    assert raw_path == route.prefix + record["path"]
    assert record["path"].startswith("/api/v1/")
    assert record["query"] == raw_query
    assert record["method"] == request.method
    assert spec_scope(request.method, record["path"].removeprefix("/api/v1")) in route.scopes
    assert not route.read_only or request.method in ("GET", "HEAD")
    assert not route.needs_token or request.authorization in (
        f"Bearer {TEAM_B_TOKEN}",
        f"Bearer-API {TEAM_B_TOKEN}",
    )
    assert values(record, "authorization") == [f"Bearer-API {api_key}"]
    takes = spec_takes_workspace(record["path"].removeprefix("/api/v1"))
    assert values(record, "publer-workspace-id") == expected_workspace(
        route, tuple(w.strip() for w in request.workspaces), takes
    )
    names = {name for name, _ in record["headers"]}
    assert not names & {"publer_workspace_id", "x-http-method-override", "x-original-url"}
