"""Config checking as a pure function: every problem of every stage in one pass, each
line naming its key path; hostile shapes give sentences, never another exception."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.config.settings import (
    ConfigError,
    Settings,
    check_settings,
    parse_settings,
    settings_from_text,
)
from proxy.rules.policy import hash_token

WORKSPACE = "5f8d7a62c9e77e001f36e3a1"


def _route(name: str, prefix: str, credential: str = "publer", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "prefix": prefix,
        "credential": credential,
        "workspace_id": WORKSPACE,
        "scopes": ["posts"],
        **extra,
    }


def _valid() -> dict[str, Any]:
    return {
        "credentials": {"publer": {"path": "publer/api"}, "other": {"path": "publer/other"}},
        "routes": [_route("a", "/a"), _route("b", "/b", "other")],
    }


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    return caught.value.problems


def test_a_bad_route_does_not_hide_the_others_mistakes() -> None:
    """A route that fails on its own keys is reported, and the references and prefixes of
    the routes that are valid are still checked in the same pass."""
    data = _valid()
    data["routes"] = [
        _route("a", "/a", scopes="posts"),  # a string, not a list
        _route("b", "/b", "ghost"),  # a dangling reference
        _route("c", "/b"),  # the same prefix as b
    ]
    data["rate_limit"] = {"requests": "many"}
    found = _problems(data)
    assert [line.split(":")[0] for line in found] == [
        "routes.0.scopes",
        "rate_limit.requests",
        "routes.1.credential",
        "routes.2.prefix",
    ], found


def test_a_broken_credential_is_not_also_called_undefined() -> None:
    """A route naming a credential whose own keys are wrong gets no second, false problem."""
    data = _valid()
    data["credentials"]["other"] = {"path": "publer/other", "kv_version": 3}
    found = _problems(data)
    assert [line.split(":")[0] for line in found] == ["credentials.other.kv_version"], found


@pytest.mark.parametrize(
    ("clients_a", "clients_b", "named"),
    [
        (
            [{"name": "x", "token_sha256": hash_token("t1")}],
            [{"name": "y", "token_sha256": hash_token("t1")}],
            ["routes.1.clients.0.token_sha256"],
        ),
        (
            [
                {"name": "x", "token_sha256": hash_token("t1")},
                {"name": "y", "token_sha256": hash_token("t1")},
            ],
            None,
            ["routes.0.clients.1.token_sha256"],
        ),
        (
            [{"name": "x", "token_sha256": hash_token("t1")}],
            [{"name": "x", "token_sha256": hash_token("t2")}],
            [],
        ),
    ],
)
def test_one_token_names_one_client(
    clients_a: list[dict[str, str]], clients_b: list[dict[str, str]] | None, named: list[str]
) -> None:
    """The same token digest twice, in one route or across routes, is a config error
    naming the second client and the first; one client name on two routes is fine."""
    data = _valid()
    data["routes"][0]["clients"] = clients_a
    if clients_b is not None:
        data["routes"][1]["clients"] = clients_b
    checked = check_settings(data)
    assert [line.split(":")[0] for line in checked.problems] == named
    for line in checked.problems:
        assert "has the same token as client 'x'" in line and "own token" in line


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70000),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_PATHS = [
    ("routes",),
    ("routes", 0),
    ("routes", 0, "name"),
    ("routes", 0, "credential"),
    ("routes", 0, "clients"),
    ("routes", 1, "prefix"),
    ("credentials",),
    ("credentials", "publer"),
    ("credentials", "other", "path"),
    ("listen",),
    ("listen", "host"),
    ("rate_limit",),
    ("reload", "settle_seconds"),
    ("forward_proxy",),
    ("audit",),
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _JUNK), max_size=4))
def test_damaged_configs_give_key_paths_never_a_crash(damage: list[Any]) -> None:
    """Any value at any key gives either valid settings or ConfigError lines that each
    start with a key path; the problems are empty exactly when the config is valid."""
    data = copy.deepcopy(_valid())
    for path, value in damage:
        holder: Any = data
        for key in path[:-1]:
            if isinstance(holder, dict):
                holder = holder.setdefault(key, {})
            elif isinstance(holder, list) and isinstance(key, int) and key < len(holder):
                holder = holder[key]
            else:
                break
        else:
            if isinstance(holder, dict) or (
                isinstance(holder, list) and isinstance(path[-1], int) and path[-1] < len(holder)
            ):
                holder[path[-1]] = value
    checked = check_settings(data)
    try:
        Settings.model_validate(data)
        valid = True
    except ValidationError:
        valid = False
    assert valid == (not checked.problems), checked.problems
    for line in checked.problems:
        key = line.split(":")[0]
        assert key == "(top level)" or (key and " " not in key), line


def test_a_key_given_twice_is_named_with_the_other_mistakes(tmp_path: Path) -> None:
    """A key written twice in one mapping (YAML would silently keep the later) is a
    problem naming both lines, reported beside the file's other mistakes."""
    text = (
        "credentials:\n"
        "  publer: {path: publer/api}\n"
        "  publer: {path: publer/other}\n"
        "routes:\n"
        "  - {name: a, credential: ghost, scopes: [posts]}\n"
        "rate_limit: {requests: 0}\n"
    )
    with pytest.raises(ConfigError) as caught:
        settings_from_text(text, tmp_path / "proxy.yaml")
    found = caught.value.problems
    assert found[0] == (
        f"{tmp_path / 'proxy.yaml'}: line 3: key 'publer' is given twice in one mapping (first"
        " at line 2); YAML would keep only the later one, so remove or merge one of them"
    )
    assert [line.split(":")[0] for line in found[1:]] == [
        "rate_limit.requests",
        "routes.0.credential",
    ], found
