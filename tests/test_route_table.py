"""Route and client lookup at scale: by dict, with the answers of a linear scan."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.config.settings import RouteSettings
from proxy.rules.policy import API_ROOT, Route, authenticate, build_routes, hash_token

SEGMENTS = st.sampled_from(["a", "b", "team", "api", "v1", "v10", "x.y", "api-v1"])


def _settings(name: str, prefix: str, clients: int = 0) -> RouteSettings:
    return RouteSettings.model_validate(
        {
            "name": name,
            "prefix": prefix,
            "credential": "publer",
            "scopes": ["posts"],
            "clients": [
                {"name": f"c{n}", "token_sha256": hash_token(f"token-{name}-{n}")}
                for n in range(clients)
            ]
            or None,
        }
    )


def _linear(routes: list[Route], path: str) -> tuple[str, str] | None:
    """The rule as a linear scan: the longest `{prefix}/api/v1` that is a segment-prefix."""
    best: Route | None = None
    for route in routes:
        root = route.api_root
        fits = path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/")
        if fits and (best is None or len(root) > len(best.api_root)):
            best = route
    return None if best is None else (best.name, path[len(best.api_root) :])


@given(
    prefixes=st.sets(st.lists(SEGMENTS, max_size=3).map(lambda s: "".join("/" + x for x in s))),
    path=st.lists(SEGMENTS, max_size=7).map(lambda s: "".join("/" + x for x in s)),
)
def test_table_agrees_with_a_linear_scan(prefixes: set[str], path: str) -> None:
    """For any set of prefixes (some containing `api/v1` themselves) and any path, the
    dict lookup picks the route and rest that the longest-prefix scan picks."""
    table = build_routes([_settings(f"r{i}", p) for i, p in enumerate(sorted(prefixes))])
    found = table.select(path)
    assert (None if found is None else (found[0].name, found[1])) == _linear(list(table), path)


def test_a_thousand_routes_each_found_by_its_prefix() -> None:
    """Each of 1,000 routes is found for its own paths, none for a prefix of a prefix."""
    table = build_routes([_settings(f"r{i}", f"/team-{i:04d}") for i in range(1000)])
    for i in range(1000):
        found = table.select(f"/team-{i:04d}{API_ROOT}/posts")
        assert found is not None and found[0].name == f"r{i}" and found[1] == "/posts"
    assert table.select(f"/team-00{API_ROOT}/posts") is None
    assert table.select(f"/team-0001/x{API_ROOT}/posts") is None


def test_every_one_of_a_thousand_clients_is_told_apart() -> None:
    """On a route with 1,000 clients each token names its own client, and a token of
    another route, a near miss or none is refused."""
    route = next(iter(build_routes([_settings("big", "/big", clients=1000)])))
    for n in (0, 1, 499, 998, 999):
        assert authenticate(route, f"Bearer-API token-big-{n}") == f"c{n}"
    for header in (
        "Bearer-API token-other-1",
        "Bearer-API token-big-1000",
        "Bearer token-big-",
        None,
    ):
        refusal = authenticate(route, header)
        assert not isinstance(refusal, str) and refusal is not None
        assert refusal.code == "client_unauthenticated"
