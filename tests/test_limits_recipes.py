"""The recipes of "Limiting what an app can do" (the operators' page): each config snippet
validates, `check` describes it, and it allows and refuses what the page says it does."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from proxy.config.settings import RouteSettings, Settings, parse_settings
from proxy.describe import describe_routes
from proxy.rules.limits import LimitedCall, Limits, decide, effective_limits
from proxy.rules.policy import RequestHead, build_routes
from proxy.rules.policy import decide as decide_policy
from proxy.rules.scopes import load_scope_map
from tests.docs_pages import section

RECIPE = re.compile(r"^<!-- limits-recipe: ([\w-]+) -->\n```yaml\n(.*?)^```\n", re.M | re.S)
BRAND, REGION_2, OTHER = (
    "66db83154e299efa19a2d8eb",
    "66db83154e299efa19a2d8ec",
    "66db83154e299efa19a2d8ff",
)
JSON = [(b"content-type", b"application/json")]


def recipes() -> dict[str, Settings]:
    """Each recipe of the page, completed with a credential, validated."""
    found: dict[str, Settings] = {}
    for name, text in RECIPE.findall(section("operators.md", "Limiting what an app can do")):
        data: dict[str, Any] = yaml.safe_load(text)
        data["credentials"] = {"publer": {"path": "publer/api"}}
        found[name] = parse_settings(data)
    return found


RECIPES = recipes()


def create(account: str, state: str, timed: bool = True) -> LimitedCall:
    """A documented create call for one account."""
    entry = {"id": account, **({"scheduled_at": "2030-01-01T09:00:00Z"} if timed else {})}
    body = {"bulk": {"state": state, "posts": [{"accounts": [entry]}]}}
    return LimitedCall("POST", "/posts/schedule", b"", JSON, json.dumps(body).encode())


def limits_of(route: RouteSettings, client: str | None = None) -> Limits:
    """The effective limits of a route, or of one of its clients."""
    settings = next((c.limits for c in route.clients or () if c.name == client), None)
    found = effective_limits(route.limits, settings)
    assert found is not None
    return found


def allowed(call: LimitedCall, limits: Limits) -> bool:
    return decide(call, limits).refusal is None


def test_the_readme_has_the_three_recipes() -> None:
    """The drafting agent, the regional team and the analytics app are all there, and
    `check` prints a limits line for each route."""
    assert set(RECIPES) == {"drafting-agent", "regional-team", "analytics-app"}
    for settings in RECIPES.values():
        lines = describe_routes(settings, load_scope_map())
        assert any(line.startswith("  limits:     accounts ") for line in lines)


def test_the_drafting_agent_only_drafts_for_its_page() -> None:
    """Drafts for the brand's page pass; scheduling, publishing, other accounts, updates and
    deletes are refused."""
    limits = limits_of(RECIPES["drafting-agent"].routes[0])
    assert allowed(create(BRAND, "draft", timed=False), limits)
    assert not allowed(create(BRAND, "scheduled"), limits)
    assert not allowed(create(OTHER, "draft", timed=False), limits)
    publish = create(BRAND, "draft", timed=False)
    assert not allowed(
        LimitedCall("POST", "/posts/schedule/publish", b"", JSON, publish.body), limits
    )
    assert not allowed(LimitedCall("DELETE", "/posts/abc", b"", [], None), limits)
    assert not allowed(LimitedCall("PUT", "/posts/abc", b"", JSON, b'{"text":"x"}'), limits)


def test_the_regional_team_schedules_for_its_accounts_and_its_bot_drafts() -> None:
    """The scheduler schedules with a time for the region's accounts, never publishes at
    once nor deletes; the bot's own limits narrow it to drafts."""
    route = RECIPES["regional-team"].routes[0]
    scheduler, bot = limits_of(route, "emea-scheduler"), limits_of(route, "emea-bot")
    assert allowed(create(REGION_2, "scheduled"), scheduler)
    assert not allowed(create(REGION_2, "scheduled", timed=False), scheduler)
    assert not allowed(create(OTHER, "scheduled"), scheduler)
    assert not allowed(LimitedCall("DELETE", "/posts/abc", b"", [], None), scheduler)
    assert not allowed(create(BRAND, "scheduled"), bot)
    assert allowed(create(BRAND, "draft", timed=False), bot)
    assert not allowed(create(BRAND, "draft"), bot)  # a draft on it carries no time


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", f"/analytics/{BRAND}/chart_data", None),
        ("GET", f"/competitors/{REGION_2}/analytics", None),
        ("GET", f"/analytics/{OTHER}/best_times", "limit_denied"),
        ("GET", "/analytics/post_insights", "limit_denied"),
        ("POST", "/posts/schedule", "scope_denied"),
    ],
)
def test_the_analytics_app_reads_two_accounts_reports(
    method: str, path: str, expected: str | None
) -> None:
    """The analytics app reads the reports of its two accounts; another account's, the
    all-accounts reports and any write are refused."""
    route = RECIPES["analytics-app"].routes[0]
    verdict = decide_policy(
        RequestHead(method, f"{route.prefix}/api/v1{path}".encode(), b"", None, []),
        build_routes([route]),
        load_scope_map(),
    )
    refusal = (
        verdict.refusal
        or decide(LimitedCall(method, path, b"", [], None), limits_of(route)).refusal
    )
    assert (refusal.code if refusal else None) == expected
