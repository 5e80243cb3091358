"""The fuzz target of tests/fuzz_paths.py kept as tests: its corpus, its oracle, a short run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from proxy.rules.policy import Verdict, decide
from tests.fuzz_paths import (
    CORPUS,
    ROUTES,
    SCOPE_MAP,
    UnsafeVerdict,
    check_allowed,
    check_one,
    inputs,
    parse,
)


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_corpus_input_passes_the_oracle(path: Path) -> None:
    """Every kept input (seed or past finding) is decided safely, as when it was kept."""
    check_one(path.read_bytes())


def test_corpus_reaches_both_sides_of_the_decision() -> None:
    """The corpus holds allowed and bad_path inputs, so every rule of the oracle runs."""
    verdicts = [decide(parse(p.read_bytes()), ROUTES, SCOPE_MAP) for p in CORPUS.iterdir()]
    assert any(v.refusal is None for v in verdicts)
    assert any(v.refusal is not None and v.refusal.code == "bad_path" for v in verdicts)


@pytest.mark.parametrize(
    ("route_name", "data", "tamper"),
    [
        ("default", b"GET /api/v1/posts", {"upstream_target": "/api/v1/../admin"}),
        ("default", b"GET /api/v1/posts", {"scope": "analytics"}),
        ("default", b"GET /api/v1/posts", {"workspace": "ffffffffffffffffffffffff"}),
        ("default", b"GET /api/v1/posts?a=1", {}),
        ("team-a", b"POST /team-a/api/v1/posts", {}),
        ("team.b", b"GET /team.b/api/v1/posts", {}),
    ],
)
def test_oracle_rejects_unsafe_verdicts(
    route_name: str, data: bytes, tamper: dict[str, Any]
) -> None:
    """The oracle is not vacuous: a verdict that forwards something unsafe is a finding."""
    route = next(r for r in ROUTES if r.name == route_name)
    allowed = Verdict(
        None, route, None, "posts", route.settings.allowed_workspaces[0], "/api/v1/posts"
    )
    with pytest.raises(UnsafeVerdict):
        check_allowed(parse(data), replace(allowed, **tamper))


@settings(max_examples=3000, deadline=None)
@given(inputs())
def test_decide_is_safe_for_fuzz_inputs(data: bytes) -> None:
    """A short run of the fuzz target on every test run: no input breaks the oracle."""
    check_one(data)
