"""A fuzz target for the pure allow/deny decision, `proxy.rules.policy.decide`.

    python -m tests.fuzz_paths --seconds 60          (what `make fuzz` runs)
    python -m tests.fuzz_paths --engine hypothesis   (without atheris)

One input is a request as text, so that a finding is readable and can be kept as a test:

    GET /team.b/api/v1/analytics/acc1/best_times?from=2026-01-01
    authorization: Bearer-API fuzz-client-token-0001
    publer-workspace-id: bbbbbbbbbbbbbbbbbbbbbbbb

`check_one` is the oracle: `decide` must answer every input without raising, and whatever
it allows must be safe to send with the key, judged by rules written here independently of
the proxy (path safety, routes, clients, scopes, workspaces, Publer's endpoint table).
Atheris (coverage-guided, libFuzzer) is used when it is installed, else hypothesis. Every
file in tests/fuzz_corpus/ seeds the run and is replayed by tests/test_fuzz_corpus.py; a
new finding is kept by copying the crash file that atheris writes (see --artifacts) into
that folder, under a name that says what it found.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

import proxy.rules.paths
import proxy.rules.policy
import proxy.rules.scopes
from proxy.config.settings import RouteSettings
from proxy.rules.policy import RequestHead, RouteTable, Verdict, build_routes, decide, hash_token
from proxy.rules.refusals import STATUS
from proxy.rules.scopes import load_scope_map

CORPUS = Path(__file__).parent / "fuzz_corpus"
CLIENT_TOKEN = "fuzz-client-token-0001"
WS_DEFAULT = "5f8d7a62c9e77e001f36e3a1"
WS_B = ("bbbbbbbbbbbbbbbbbbbbbbbb", "cccccccccccccccccccccccc")

# Prefixes chosen to confuse: one is a prefix of another, one contains a dot, one looks like
# the API root itself, one route has no workspace at all.
ROUTES: RouteTable = build_routes(
    [
        RouteSettings.model_validate(route)
        for route in (
            {
                "name": "default",
                "credential": "publer",
                "workspace_id": WS_DEFAULT,
                "scopes": ["posts", "media", "accounts", "job_status", "users"],
            },
            {
                "name": "team-a",
                "prefix": "/team-a",
                "credential": "publer",
                "workspace_id": "aaaaaaaaaaaaaaaaaaaaaaaa",
                "scopes": ["posts"],
                "read_only": True,
            },
            {
                "name": "team-a-eu",
                "prefix": "/team-a-eu",
                "credential": "publer",
                "workspace_id": "eeeeeeeeeeeeeeeeeeeeeeee",
                "scopes": ["media"],
            },
            {
                "name": "team.b",
                "prefix": "/team.b",
                "credential": "publer",
                "workspace_ids": list(WS_B),
                "scopes": ["posts", "analytics"],
                "clients": [{"name": "pipeline", "token_sha256": hash_token(CLIENT_TOKEN)}],
            },
            {
                "name": "nested",
                "prefix": "/api",
                "credential": "publer",
                "scopes": ["users", "workspaces"],
            },
        )
    ]
)
SCOPE_MAP = load_scope_map()

# Publer's documented endpoints, written out again: an allowed request must be one of
# these, in this scope.
PUBLER_ENDPOINTS: tuple[tuple[str, str, str], ...] = (
    ("GET", "/users/me", "users"),
    ("GET", "/workspaces", "workspaces"),
    ("GET", "/workspaces/{id}/media_options", "workspaces"),
    ("GET", "/accounts", "accounts"),
    ("GET POST DELETE", "/posts", "posts"),
    ("POST", "/posts/schedule", "posts"),
    ("POST", "/posts/schedule/publish", "posts"),
    ("PUT DELETE", "/posts/{id}", "posts"),
    ("GET", "/job_status/{id}", "job_status"),
    ("GET POST", "/media", "media"),
    ("POST", "/media/from-url", "media"),
    ("GET", "/locations", "locations"),
    ("GET", "/analytics/charts", "analytics"),
    ("GET", "/analytics/chart_data", "analytics"),
    ("GET", "/analytics/post_insights", "analytics"),
    ("GET", "/analytics/best_times", "analytics"),
    ("GET", "/analytics/hashtag_insights", "analytics"),
    ("GET", "/analytics/hashtag_performing_posts", "analytics"),
    ("GET", "/analytics/{id}/chart_data", "analytics"),
    ("GET", "/analytics/{id}/post_insights", "analytics"),
    ("GET", "/analytics/{id}/best_times", "analytics"),
    ("GET", "/analytics/{id}/hashtag_insights", "analytics"),
    ("GET", "/analytics/{id}/hashtag_performing_posts", "analytics"),
    ("GET", "/analytics/members", "analytics"),
    ("GET", "/competitors", "analytics"),
    ("GET", "/competitors/analytics", "analytics"),
    ("GET", "/competitors/{id}", "analytics"),
    ("GET", "/competitors/{id}/analytics", "analytics"),
)
# The endpoints that take no Publer-Workspace-Id: a client's header there is dropped.
NO_WORKSPACE = ("/users/me", "/workspaces", "/workspaces/{id}/media_options")
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def spec_takes_workspace(path: str) -> bool:
    """Whether Publer takes a workspace on `path` (below /api/v1)."""
    parts = path.split("/")[1:]
    return not any(
        len(template.split("/")[1:]) == len(parts)
        and all(
            e == p or (e == "{id}" and _ID.fullmatch(p))
            for e, p in zip(template.split("/")[1:], parts, strict=True)
        )
        for template in NO_WORKSPACE
    )


def spec_scope(method: str, path: str) -> str | None:
    """The scope Publer's endpoint table gives `method` on `path` (below /api/v1), else None.

    Of the templates the path fits, the one with the fewest {id} segments is the endpoint:
    `/posts/schedule` is the schedule endpoint, never the post with id `schedule`.
    """
    parts = path.split("/")[1:]
    fits = []
    for methods, template, scope in PUBLER_ENDPOINTS:
        expected = template.split("/")[1:]
        if len(expected) == len(parts) and all(
            e == p or (e == "{id}" and _ID.fullmatch(p))
            for e, p in zip(expected, parts, strict=True)
        ):
            fits.append((template.count("{id}"), methods.split(), scope))
    if not fits:
        return None
    fewest = min(ids for ids, _, _ in fits)
    wanted = "GET" if method == "HEAD" else method
    found = [scope for ids, methods, scope in fits if ids == fewest and wanted in methods]
    return found[0] if found else None


# What may reach Publer: /api/v1 and segments of id characters, nothing that any server
# could decode, normalise or split differently.
_FORWARDABLE_PATH = re.compile(r"/api/v1(/[A-Za-z0-9_-]+)+")
_FORWARDABLE_QUERY = re.compile(r"[!$-;=?-~]*")  # printable ASCII minus " # < >
_AUTH_PREFIX = b"authorization:"
_WORKSPACE_PREFIX = b"publer-workspace-id:"


class UnsafeVerdict(AssertionError):
    """`decide` allowed something that the rules of this module refuse."""


def parse(data: bytes) -> RequestHead:
    """One fuzz input as the request that `decide` sees (header values as latin-1)."""
    first, *lines = data.split(b"\n")
    method, _, target = first.partition(b" ")
    path, _, query = target.partition(b"?")
    authorization: str | None = None
    workspaces: list[str] = []
    for line in lines:
        lower = line.lower()
        if lower.startswith(_AUTH_PREFIX) and authorization is None:
            authorization = line[len(_AUTH_PREFIX) :].strip(b" \t").decode("latin-1")
        elif lower.startswith(_WORKSPACE_PREFIX):
            workspaces.append(line[len(_WORKSPACE_PREFIX) :].strip(b" \t").decode("latin-1"))
    return RequestHead(method.decode("latin-1"), path, query, authorization, tuple(workspaces))


def _expect(condition: bool, what: str, request: RequestHead, verdict: Verdict) -> None:
    if not condition:
        raise UnsafeVerdict(f"{what}\n  request: {request!r}\n  verdict: {verdict!r}")


def check_allowed(request: RequestHead, verdict: Verdict) -> None:
    """Every rule an allowed request must meet before the key is attached to it."""
    route = verdict.route
    _expect(route is not None, "allowed without a route", request, verdict)
    assert route is not None
    target_path, _, target_query = verdict.upstream_target.partition("?")
    raw_path = request.raw_path.decode("latin-1")
    raw_query = request.raw_query.decode("latin-1")
    _expect(
        _FORWARDABLE_PATH.fullmatch(target_path) is not None,
        "forwarded path is not /api/v1 with plain id segments",
        request,
        verdict,
    )
    _expect(
        raw_path == route.settings.prefix + target_path,
        "the checked path is not exactly the forwarded path",
        request,
        verdict,
    )
    _expect(
        target_query == raw_query and _FORWARDABLE_QUERY.fullmatch(raw_query) is not None,
        "the query is changed or holds bytes that a client would re-encode",
        request,
        verdict,
    )
    scope = spec_scope(request.method, target_path.removeprefix("/api/v1"))
    _expect(
        verdict.scope == scope and scope in route.settings.scopes,
        f"scope {verdict.scope!r} is not Publer's documented scope {scope!r} or not the route's",
        request,
        verdict,
    )
    _expect(
        not route.settings.read_only or request.method in ("GET", "HEAD"),
        "a read-only route let a write through",
        request,
        verdict,
    )
    if route.settings.clients:
        token = (request.authorization or "").removeprefix("Bearer-API ").removeprefix("Bearer ")
        _expect(
            verdict.client is not None and token.strip() == CLIENT_TOKEN,
            "a route with clients let an unauthenticated request through",
            request,
            verdict,
        )
    allowed = route.settings.allowed_workspaces
    chosen = [value for value in request.workspace_headers if value.strip()]
    if not spec_takes_workspace(target_path.removeprefix("/api/v1")):
        _expect(
            verdict.workspace is None,
            "a workspace is sent to an endpoint that takes none",
            request,
            verdict,
        )
    elif chosen:
        _expect(
            len(chosen) == 1
            and verdict.workspace == chosen[0].strip()
            and verdict.workspace in allowed,
            "the client chose a workspace that the route does not allow",
            request,
            verdict,
        )
    else:
        _expect(
            verdict.workspace == (allowed[0] if allowed else None),
            "the workspace is not the route's default",
            request,
            verdict,
        )


def check_one(data: bytes) -> None:
    """The oracle: raise if `decide` fails on `data` or allows what it must not."""
    request = parse(data)
    verdict = decide(request, ROUTES, SCOPE_MAP)
    if verdict.refusal is None:
        check_allowed(request, verdict)
        return
    refusal = verdict.refusal
    _expect(
        refusal.code in STATUS and refusal.status == STATUS[refusal.code],
        "a refusal with a code or status that the refusal table does not have",
        request,
        verdict,
    )
    if refusal.code == "bad_path":
        _expect(verdict.route is None, "bad_path decided after routing", request, verdict)


def corpus() -> list[bytes]:
    """The kept inputs: seeds and past findings."""
    return [path.read_bytes() for path in sorted(CORPUS.iterdir()) if path.is_file()]


def _run_atheris(seconds: int, artifacts: Path) -> None:
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    scratch = Path(tempfile.mkdtemp(prefix="fuzz-paths-corpus-"))
    argv = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        "-max_len=4096",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(scratch),  # libFuzzer writes new inputs to the first folder only
        str(CORPUS),
    ]
    print(f"atheris for {seconds}s; new inputs in {scratch}, findings in {artifacts}/")
    for module in (
        proxy.rules.paths,
        proxy.rules.policy,
        proxy.rules.scopes,
    ):  # coverage of the decision only
        for value in vars(module).values():
            if getattr(value, "__module__", None) != module.__name__:
                continue
            members = vars(value).values() if inspect.isclass(value) else [value]
            for function in filter(inspect.isfunction, members):
                atheris.instrument_func(function)
    atheris.Setup(argv, check_one)
    atheris.Fuzz()


def inputs() -> SearchStrategy[bytes]:
    """Hypothesis inputs: the corpus, its mutations, random bytes and hostile fragments."""
    seeds = corpus()
    pieces = st.sampled_from(
        [
            *(seed.split(b"\n", 1)[0] for seed in seeds),
            *(b"/", b"..", b".", b"%2e", b"%2E", b"%2f", b"%5c", b"%25", b"%00", b"%c0%ae"),
            *(b"api", b"v1", b"posts", b"team-a", b"team.b", b"analytics", b"?", b"#", b";"),
            *(b"GET ", b"PUT ", b"\n", b"authorization: Bearer-API ", CLIENT_TOKEN.encode()),
            *(b"publer-workspace-id: ", WS_B[1].encode(), WS_DEFAULT.encode()),
        ]
    )
    return st.one_of(
        st.sampled_from(seeds),
        st.binary(max_size=200),
        st.lists(pieces | st.binary(max_size=4), max_size=24).map(b"".join),
        st.tuples(st.sampled_from(seeds), st.binary(max_size=8), st.integers(0, 200)).map(
            lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
        ),
    )


def _run_hypothesis(seconds: int) -> None:
    batch = 2000

    @settings(
        max_examples=batch,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs())
    def run(data: bytes) -> None:
        check_one(data)

    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        run()
        rounds += 1
    print(f"hypothesis: {rounds * batch} inputs in {seconds}s, no finding")


def main(argv: list[str] | None = None) -> int:
    """Fuzz `decide` for a bounded time; exit non-zero on a finding."""
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_paths", description=__doc__)
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path(tempfile.gettempdir()) / "fuzz-paths-findings",
        help="where atheris writes the inputs that broke the oracle",
    )
    args = parser.parse_args(argv)
    for data in corpus():
        check_one(data)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            print("atheris is not installed: fuzzing with hypothesis")
            engine = "hypothesis"
    if engine == "hypothesis":
        _run_hypothesis(args.seconds)
    else:
        args.artifacts.mkdir(parents=True, exist_ok=True)
        _run_atheris(args.seconds, args.artifacts.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
