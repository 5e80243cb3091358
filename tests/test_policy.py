"""The pure security core: path safety, scope lookup, routes, client tokens, workspaces."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.settings import RouteSettings
from proxy.rules.paths import UnsafePath, check_path, check_query
from proxy.rules.policy import (
    RequestHead,
    authenticate,
    build_routes,
    choose_workspace,
    decide,
    hash_token,
    presented_token,
    select_route,
)
from proxy.rules.refusals import Refusal
from proxy.rules.scopes import Match, Miss, load_scope_map

SCOPES = load_scope_map()
WS = "5f8d7a62c9e77e001f36e3a1"
TOKEN = "client-token-for-tests-0001"


def _route(**overrides: Any) -> RouteSettings:
    data: dict[str, Any] = {
        "name": "default",
        "credential": "publer",
        "workspace_id": WS,
        "scopes": ["posts", "media", "accounts", "job_status"],
    }
    data.update(overrides)
    return RouteSettings.model_validate(data)


ROUTES = build_routes(
    [
        _route(),
        _route(name="team-a", prefix="/team-a", scopes=["posts"], read_only=True),
        _route(
            name="team-b",
            prefix="/team-b",
            scopes=["analytics", "posts"],
            workspace_id=None,
            workspace_ids=["aaaaaaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbbbbbb"],
            clients=[{"name": "pipeline", "token_sha256": hash_token(TOKEN)}],
        ),
    ]
)


def _decide(
    method: str,
    target: bytes,
    *,
    authorization: str | None = None,
    workspaces: tuple[str, ...] = (),
) -> Any:
    path, _, query = target.partition(b"?")
    return decide(RequestHead(method, path, query, authorization, workspaces), ROUTES, SCOPES)


HOSTILE_PATHS = [
    b"/api/v1/../admin",
    b"/api/v1/posts/..",
    b"/api/v1/./posts",
    b"/api/v1/%2e%2e/admin",
    b"/api/v1/%2E%2e/admin",
    b"/api/v1/%252e%252e/admin",
    b"/api/v1/posts%2f..%2fadmin",
    b"/api/v1/posts%2Fx",
    b"/api/v1/posts%5cx",
    b"/api/v1/posts\\..\\admin",
    b"//evil.test/api/v1/posts",
    b"/api/v1//posts",
    b"/api/v1/posts/",
    b"/api/v1/posts\x00",
    b"/api/v1/posts\r\nX: y",
    b"/api/v1/posts\x7f",
    b"/api/v1/p\xc3\xa9",
    b"/api/v1/%c0%ae%c0%ae/admin",
    b"/api/v1/posts%00",
    b"/api/v1/posts%",
    b"/api/v1/posts%zz",
    b"/api/v1/posts;x=..",
    b"/api/v1/posts#frag",
    b"/team-a/../team-b/api/v1/posts",
    b"/team-a%2f../team-b/api/v1/posts",
    b"http://evil.test/api/v1/posts",
    b"api/v1/posts",
    b"",
    b"/api/v1/" + b"a" * 2100,
    b"/api/v1/posts<script>",
    b"/api/v1/po sts",
]


@pytest.mark.parametrize("raw", HOSTILE_PATHS)
def test_hostile_paths_are_bad_path(raw: bytes) -> None:
    """Every unsafe raw path is refused with bad_path before routing."""
    verdict = _decide("GET", raw)
    assert verdict.refusal is not None
    assert verdict.refusal.code == "bad_path", verdict.refusal
    assert verdict.route is None


@pytest.mark.parametrize(
    "raw",
    [b"/api/v1/posts", b"/api/v1/job_status/abc123", b"/team-b/api/v1/analytics/x1/best_times"],
)
def test_safe_paths_pass_the_path_check(raw: bytes) -> None:
    """Ordinary Publer paths are returned unchanged by the path check."""
    assert check_path(raw) == raw.decode()


@pytest.mark.parametrize(
    ("query", "ok"),
    [
        (b"", True),
        (b"page=0&state=scheduled&accounts[]=a1&accounts[]=a2", True),
        (b"q=%41%2f+c&x=a%20b", True),
        (b"a=b#frag", False),
        (b'a="b"', False),
        (b"a=<b>", False),
        (b"a=\xff", False),
        (b"a= b", False),
    ],
)
def test_query_check(query: bytes, ok: bool) -> None:
    """Queries pass byte for byte when printable, else bad_path."""
    result = check_query(query)
    assert (result == query.decode("latin-1")) if ok else isinstance(result, UnsafePath)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/posts", ("posts", True)),
        ("HEAD", "/posts", ("posts", True)),
        ("POST", "/posts/schedule", ("posts", True)),
        ("PUT", "/posts/5f8d7a62c9e77e001f36e3a1", ("posts", True)),
        ("GET", "/users/me", ("users", False)),
        ("GET", "/workspaces/abc/media_options", ("workspaces", False)),
        ("GET", "/analytics/acc1/hashtag_insights", ("analytics", True)),
        ("GET", "/competitors/acc1/analytics", ("analytics", True)),
        ("POST", "/media/from-url", ("media", True)),
        ("GET", "/job_status/j-1", ("job_status", True)),
    ],
)
def test_scope_lookup_matches_spec_table(
    method: str, path: str, expected: tuple[str, bool]
) -> None:
    """Method + path resolve to the scope and workspace need of Publer's endpoint table."""
    found = SCOPES.lookup(method, path)
    assert isinstance(found, Match)
    assert (found.endpoint.scope, found.endpoint.needs_workspace) == expected


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/admin", "unknown_endpoint"),
        ("GET", "/posts/x/y", "unknown_endpoint"),
        ("GET", "/job_status/a.b", "unknown_endpoint"),
        ("PATCH", "/posts", "method_denied"),
        ("GET", "/posts/schedule", "method_denied"),
        ("GET", "/posts/5f8d7a62c9e77e001f36e3a1", "method_denied"),
        ("GET", "/posts/abc", "unknown_endpoint"),  # a name, not an id
        ("DELETE", "/users/me", "method_denied"),
    ],
)
def test_scope_lookup_misses(method: str, path: str, code: str) -> None:
    """Unknown paths and undocumented methods are refused (deny by default)."""
    found = SCOPES.lookup(method, path)
    assert isinstance(found, Miss)
    assert found.code == code


def test_literal_segment_wins_over_parameter() -> None:
    """`/posts/schedule` is the schedule endpoint, never the post with id `schedule`."""
    found = SCOPES.lookup("PUT", "/posts/schedule")
    assert isinstance(found, Miss)
    assert found.code == "method_denied"


def test_route_selection_by_prefix() -> None:
    """The longest matching prefix wins, on segment boundaries only."""
    assert select_route(ROUTES, "/team-a/api/v1/posts") == (ROUTES[0], "/posts")
    selected = select_route(ROUTES, "/api/v1/posts")
    assert selected is not None and selected[0].name == "default"
    assert select_route(ROUTES, "/team-ab/api/v1/posts") is None
    assert select_route(ROUTES, "/api/v10/posts") is None
    assert select_route(ROUTES, "/elsewhere") is None


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (f"Bearer-API {TOKEN}", TOKEN),
        (f"Bearer {TOKEN}", TOKEN),
        (f"bearer {TOKEN}", None),
        ("Basic abc", None),
        ("Bearer-API ", None),
        (None, None),
    ],
)
def test_presented_token(header: str | None, token: str | None) -> None:
    """Client tokens come as Bearer-API or Bearer, nothing else."""
    assert presented_token(header) == token


def test_client_authentication() -> None:
    """A route with clients names the client of a valid token and refuses any other."""
    team_b = next(r for r in ROUTES if r.name == "team-b")
    assert authenticate(team_b, f"Bearer-API {TOKEN}") == "pipeline"
    for bad in (None, "Bearer-API wrong", f"Bearer-API {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        refused = authenticate(team_b, bad)
        assert isinstance(refused, Refusal) and refused.code == "client_unauthenticated"
    open_route = next(r for r in ROUTES if r.name == "default")
    assert authenticate(open_route, "Bearer-API anything") is None


def test_workspace_choice() -> None:
    """The route's workspace is sent; a client may only pick one of the route's."""
    default = next(r for r in ROUTES if r.name == "default")
    team_b = next(r for r in ROUTES if r.name == "team-b")
    assert choose_workspace(default, []) == WS
    assert choose_workspace(default, [WS]) == WS
    assert choose_workspace(team_b, []) == "aaaaaaaaaaaaaaaaaaaaaaaa"
    assert choose_workspace(team_b, ["bbbbbbbbbbbbbbbbbbbbbbbb"]) == "bbbbbbbbbbbbbbbbbbbbbbbb"
    for bad in (["other"], [WS, WS], ["aaaaaaaaaaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbbbbbbbbbb"]):
        refused = choose_workspace(default if bad[0] != "other" else team_b, bad)
        assert isinstance(refused, Refusal) and refused.code == "workspace_denied"


@pytest.mark.parametrize(
    ("method", "target", "auth", "code"),
    [
        ("GET", b"/api/v1/analytics/charts", None, "scope_denied"),
        ("GET", b"/api/v1/nope", None, "unknown_endpoint"),
        ("POST", b"/team-a/api/v1/posts", None, "method_denied"),
        ("GET", b"/team-b/api/v1/posts", None, "client_unauthenticated"),
        ("GET", b"/team-b/api/v1/posts", "Bearer-API nope", "client_unauthenticated"),
        ("GET", b"/other/api/v1/posts", None, "no_route"),
        ("GET", b"/api/v1/%2e%2e/x", None, "bad_path"),
    ],
)
def test_decide_refusals(method: str, target: bytes, auth: str | None, code: str) -> None:
    """decide() answers the refusal code for each kind of mistake."""
    verdict = _decide(method, target, authorization=auth)
    assert verdict.refusal is not None and verdict.refusal.code == code


def test_decide_allows_and_keeps_the_target() -> None:
    """An allowed request carries route, client, scope, workspace and the exact target."""
    verdict = _decide(
        "GET",
        b"/team-b/api/v1/analytics/acc1/best_times?from=2026-01-01&accounts[]=a",
        authorization=f"Bearer {TOKEN}",
        workspaces=("bbbbbbbbbbbbbbbbbbbbbbbb",),
    )
    assert verdict.refusal is None
    assert (verdict.route.name, verdict.client, verdict.scope) == (
        "team-b",
        "pipeline",
        "analytics",
    )
    assert verdict.workspace == "bbbbbbbbbbbbbbbbbbbbbbbb"
    assert verdict.upstream_target == (
        "/api/v1/analytics/acc1/best_times?from=2026-01-01&accounts[]=a"
    )


_PATH_BYTES = st.binary(max_size=80) | st.lists(
    st.sampled_from(
        [
            b"/",
            b"api",
            b"v1",
            b"posts",
            b".",
            b"..",
            b"%2e",
            b"%2f",
            b"%25",
            b"team-a",
            b"x",
            b"\\",
            b"%00",
            b"media",
            b"job_status",
            b"abc",
            b"users",
            b"me",
            b";",
            b"%41",
        ]
    ),
    max_size=12,
).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(
    raw=_PATH_BYTES.map(lambda b: b"/" + b),
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
)
def test_accepted_paths_are_safe_and_forwarded_unchanged(raw: bytes, method: str) -> None:
    """Whatever is accepted is under a route's /api/v1, has no dot segment, no encoded
    separator, is allowed by the route's scopes, and is exactly the path forwarded."""
    verdict = _decide(method, raw)
    if verdict.refusal is not None:
        return
    forwarded = verdict.upstream_target
    assert raw.decode("ascii") == verdict.route.settings.prefix + forwarded
    assert forwarded.startswith("/api/v1/")
    segments = forwarded.split("/")[1:]
    assert "" not in segments and "." not in segments and ".." not in segments
    assert not re.search(r"%(2[eEfF]|5[cC]|25)", forwarded)
    assert verdict.scope in verdict.route.settings.scopes
    if verdict.route.settings.read_only:
        assert method in ("GET", "HEAD")


@settings(max_examples=2000, deadline=None)
@given(raw=st.binary(max_size=300))
def test_check_path_never_raises_and_accepts_only_ascii(raw: bytes) -> None:
    """Any byte string gets an answer, and an accepted path is printable ASCII."""
    result = check_path(raw)
    if not isinstance(result, UnsafePath):
        assert all(0x21 <= b < 0x7F for b in raw)
        assert result.encode() == raw


@pytest.mark.parametrize("sent", [("",), ("  ",), ("", "")])
def test_empty_workspace_header_counts_as_absent(sent: tuple[str, ...]) -> None:
    """A client that chose no workspace (an empty header) gets the route's default,
    exactly as if it had sent no header."""
    verdict = _decide("GET", b"/api/v1/posts", workspaces=sent)
    assert verdict.refusal is None
    assert verdict.workspace == WS


@pytest.mark.parametrize("target", [b"/api/v1/users/me", b"/api/v1/workspaces"])
@pytest.mark.parametrize("sent", [(), ("other-workspace",), (WS,), (WS, "x")])
def test_workspace_header_is_dropped_where_publer_takes_none(
    target: bytes, sent: tuple[str, ...]
) -> None:
    """On endpoints that take no workspace the client's header is dropped, never refused,
    and the proxy sends none."""
    [route] = build_routes([_route(scopes=["users", "workspaces"])])
    path, _, query = target.partition(b"?")
    verdict = decide(RequestHead("GET", path, query, None, sent), [route], SCOPES)
    assert verdict.refusal is None
    assert verdict.workspace is None
