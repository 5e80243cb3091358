"""Every endpoint form Publer documents, with the decision the shipped scope map makes.

The table is written from Publer's API reference (publer.com/docs) and its published
OpenAPI blocks. An id in a path is an ObjectId, as Publer's are. A row per documented
method and path: a documented call is never refused; a documented path with a method
Publer does not list there is `method_denied`; a path Publer does not document is
`unknown_endpoint`, whatever the method.
"""

from __future__ import annotations

import pytest

from proxy.config.settings import RouteSettings
from proxy.rules.policy import RequestHead, build_routes, decide
from proxy.rules.scopes import Match, Miss, load_scope_map

SCOPES = load_scope_map()
WS = "5f8d7a62c9e77e001f36e3a1"
ACCOUNT = "6120c1f3a1b2c3d4e5f60001"
POST = "6120c1f3a1b2c3d4e5f60abc"
JOB = "b3b6c4a1e9f0d2c3b4a5e6f7"

# (method, path below /api/v1, scope, takes a workspace)
DOCUMENTED = [
    ("GET", "/users/me", "users", False),
    ("GET", "/workspaces", "workspaces", False),
    ("GET", f"/workspaces/{WS}/media_options", "workspaces", False),
    ("GET", "/accounts", "accounts", True),
    ("GET", "/posts", "posts", True),
    ("POST", "/posts", "posts", True),
    ("DELETE", "/posts", "posts", True),
    ("POST", "/posts/schedule", "posts", True),
    ("POST", "/posts/schedule/publish", "posts", True),
    ("PUT", f"/posts/{POST}", "posts", True),
    ("DELETE", f"/posts/{POST}", "posts", True),
    ("GET", f"/job_status/{JOB}", "job_status", True),
    ("GET", "/media", "media", True),
    ("POST", "/media", "media", True),
    ("POST", "/media/from-url", "media", True),
    ("GET", "/locations", "locations", True),
    ("GET", "/analytics/charts", "analytics", True),
    ("GET", "/analytics/members", "analytics", True),
    *[
        ("GET", path, "analytics", True)
        for report in (
            "chart_data",
            "post_insights",
            "best_times",
            "hashtag_insights",
            "hashtag_performing_posts",
        )
        for path in (f"/analytics/{ACCOUNT}/{report}", f"/analytics/{report}")
    ],
    ("GET", "/competitors", "analytics", True),
    ("GET", f"/competitors/{ACCOUNT}", "analytics", True),
    ("GET", "/competitors/analytics", "analytics", True),
    ("GET", f"/competitors/{ACCOUNT}/analytics", "analytics", True),
]

REFUSED = [
    # Documented paths, methods Publer does not list there.
    ("PATCH", "/posts", "method_denied"),
    ("PUT", "/posts", "method_denied"),
    ("GET", f"/posts/{POST}", "method_denied"),
    ("PATCH", f"/posts/{POST}", "method_denied"),
    ("GET", "/posts/schedule", "method_denied"),
    ("DELETE", "/users/me", "method_denied"),
    ("POST", "/workspaces", "method_denied"),
    ("POST", "/analytics/post_insights", "method_denied"),
    ("DELETE", "/competitors/analytics", "method_denied"),
    # Paths Publer does not document: a name where an id would go is not an id.
    ("POST", "/posts/recurring", "unknown_endpoint"),
    ("GET", "/posts/recurring", "unknown_endpoint"),
    ("POST", "/posts/auto-schedule", "unknown_endpoint"),
    ("POST", "/posts/recycle", "unknown_endpoint"),
    ("GET", "/analytics/competitors", "unknown_endpoint"),
    ("GET", "/analytics/charts/reach", "unknown_endpoint"),
    ("GET", "/analytics/competitors/analysis", "unknown_endpoint"),
    ("GET", "/test", "unknown_endpoint"),
    ("GET", f"/competitors/{ACCOUNT}/analytics/x1", "unknown_endpoint"),
]


@pytest.mark.parametrize(("method", "path", "scope", "workspace"), DOCUMENTED)
def test_documented_call_resolves_to_its_scope(
    method: str, path: str, scope: str, workspace: bool
) -> None:
    """Each documented method and path resolves to its scope and workspace need."""
    for each in (method, "HEAD") if method == "GET" else (method,):
        found = SCOPES.lookup(each, path)
        assert isinstance(found, Match), (each, path, found)
        assert (found.endpoint.scope, found.endpoint.needs_workspace) == (scope, workspace)


@pytest.mark.parametrize(("method", "path", "code"), REFUSED)
def test_undocumented_call_is_refused_with_the_right_code(
    method: str, path: str, code: str
) -> None:
    """A documented path with another method is method_denied; an undocumented path is
    unknown_endpoint, even when an {id} template could have swallowed it."""
    found = SCOPES.lookup(method, path)
    assert isinstance(found, Miss), (method, path, found)
    assert found.code == code


def test_literal_segments_win_over_id_templates() -> None:
    """`/competitors/analytics` is the analytics report, not the account `analytics`, and
    `/analytics/post_insights` is the all-accounts report."""
    found = SCOPES.lookup("GET", "/competitors/analytics")
    assert isinstance(found, Match) and found.endpoint.template == "/competitors/analytics"
    found = SCOPES.lookup("GET", "/analytics/post_insights")
    assert isinstance(found, Match) and found.endpoint.template == "/analytics/post_insights"


@pytest.mark.parametrize(("method", "path", "scope", "workspace"), DOCUMENTED)
def test_documented_call_passes_a_route_with_its_scope(
    method: str, path: str, scope: str, workspace: bool
) -> None:
    """Through the whole decision, a route holding the scope forwards the call as sent,
    with the route's workspace exactly where Publer takes one."""
    [route] = build_routes(
        [RouteSettings(name="all", credential="publer", workspace_id=WS, scopes=[scope])]
    )
    query = b"from=2025-01-01&to=2025-02-01"
    request = RequestHead(method, b"/api/v1" + path.encode(), query, None, ())
    verdict = decide(request, [route], SCOPES)
    assert verdict.refusal is None, verdict.refusal
    assert verdict.upstream_target == f"/api/v1{path}?{query.decode()}"
    assert verdict.workspace == (WS if workspace else None)
