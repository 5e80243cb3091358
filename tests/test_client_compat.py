"""Public Publer clients, replayed exactly, through the real proxy to the real sandbox.

Each case is a request as a public client sends it: its method, path, query form
(`types[]=`, `post_ids=A&post_ids=B`), headers (its own `Publer-Workspace-Id`, an empty
one, `Content-Type: application/json` on a GET), and body (JSON, multipart, chunked,
`Expect: 100-continue`), sent by the same kind of program (Python httpx or requests,
Node's fetch, curl). The comment over each case names the repository and file it was
taken from. The expected outcome is Publer's: documented calls pass and reach the
sandbox byte for byte, with the route's workspace exactly where Publer takes one;
undocumented calls get the proxy's refusal and never reach it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from tests.bao import Bao
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy, start_sandbox

ROUTE_WS = "5f8d7a62c9e77e001f36e3a1"
CLIENT_WS = "64b0c0ffee00000000000001"  # the workspace the client was configured with
ACCOUNT = "6120c1f3a1b2c3d4e5f60001"
POST_ID = "6520aa00bb11cc22dd33ee44"
CLIENT_KEY = "the-key-the-app-used-to-hold"  # dropped: the proxy sends the real one
ALL_SCOPES = ["users", "workspaces", "accounts", "posts", "media", "job_status", "locations",
              "analytics"]  # fmt: skip
FROM_TO = "from=2025-01-01&to=2025-02-01"


@dataclass(frozen=True)
class Sent:
    """What a client program got back."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, api_key: str
) -> Iterator[tuple[Proxy, Sandbox]]:
    """The sandbox and, in front of it, the proxy with one open route of every scope."""
    workdir = tmp_path_factory.mktemp("compat")
    sandbox = start_sandbox(workdir / "sandbox", api_key)
    routes = [
        {"name": "all", "credential": "publer", "workspace_id": ROUTE_WS, "scopes": ALL_SCOPES}
    ]
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, routes=routes)
    proxy = start_proxy(workdir / "proxy", config)
    yield proxy, sandbox
    proxy.stop()
    sandbox.stop()


# --- senders -----------------------------------------------------------------------------------


def python_httpx(method: str, url: str, headers: dict[str, str], **body: Any) -> Sent:
    """httpx, as storydivision/publer-python and Spinnable-AI/publer-mcp use it."""
    with httpx.Client(trust_env=False, timeout=30) as client:
        answer = client.request(method, url, headers=headers, **body)
    return Sent(answer.status_code, _json(answer.content), dict(answer.headers))


def curl(method: str, url: str, headers: dict[str, str], *args: str) -> Sent:
    """curl, as Publer's reference shows every call."""
    with tempfile.TemporaryDirectory() as scratch:
        out, head = Path(scratch) / "body", Path(scratch) / "head"
        command = ["curl", "-sS", "--noproxy", "*", "-X", method, "-o", str(out), "-D", str(head)]
        command += ["-w", "%{http_code}", url]
        for name, value in headers.items():
            # curl drops a header given as "Name:"; "Name;" sends it with an empty value.
            command += ["-H", f"{name}: {value}" if value else f"{name};"]
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=60, check=True
        )
        # The last head when curl saw an interim 100 first.
        lines = head.read_bytes().decode("latin-1").split("\r\n\r\n")[-2].split("\r\n")
        answer_headers = {
            k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if k
        }
        return Sent(int(result.stdout[-3:]), _json(out.read_bytes()), answer_headers)


def node_fetch(script: str, **env: str) -> Sent:
    """Node's own fetch (undici), FormData and Blob, as OwenMcGirr/publer-client uses them.
    `script` ends with `const answer = await fetch(...)`; the rest is printed here."""
    program = (
        "(async () => {\n" + script + "\nconst text = await answer.text();\n"
        "const answered = Object.fromEntries(answer.headers.entries());\n"
        "console.log(JSON.stringify({status: answer.status, text, headers: answered}));\n"
        "})().catch((e) => { console.error(e); process.exit(1); });\n"
    )
    result = subprocess.run(
        ["node", "-e", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"], **env},
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    return Sent(printed["status"], _json(printed["text"].encode()), printed["headers"])


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("latin-1")


# --- what reached Publer --------------------------------------------------------------------


def _only_request(sandbox: Sandbox) -> dict[str, Any]:
    [record] = sandbox.requests()
    return record


def _header(record: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in record["headers"] if key == name]


def _refused(sent: Sent, sandbox: Sandbox, code: str) -> None:
    assert sent.status == 403, sent
    assert sent.headers["x-publer-proxy-error"] == code
    assert sent.body["code"] == code and sent.body["errors"]
    assert sandbox.requests() == []


# Python clients -------------------------------------------------------------------------------

# storydivision/publer-python, publer/session.py: one httpx client whose default headers
# carry the key, JSON content type (on GETs too), its user agent, and its configured
# workspace on every call, /users/me and /workspaces included.
PUBLER_PYTHON = {
    "Authorization": f"Bearer-API {CLIENT_KEY}",
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "publer-python/0.1.0",
    "Publer-Workspace-Id": CLIENT_WS,
}

# storydivision/publer-python, publer/resources/analytics.py: reports for all accounts are
# called without the account id; params in its own order.
PUBLER_PYTHON_REPORTS = [
    f"/analytics/post_insights?sort_by=scheduled_at&sort_type=DESC&page=0&{FROM_TO}",
    "/analytics/hashtag_insights?sort_by=posts&sort_type=DESC&page=0&query=launch",
    f"/analytics/best_times?{FROM_TO}&competitors=true",
    f"/analytics/{ACCOUNT}/post_insights?sort_by=engagement&sort_type=DESC&page=0&{FROM_TO}",
    f"/analytics/members?{FROM_TO}",
]


@pytest.mark.parametrize("target", PUBLER_PYTHON_REPORTS)
def test_publer_python_reports_for_all_accounts(stack: tuple[Proxy, Sandbox], target: str) -> None:
    """Analytics reports with and without the account id pass, byte for byte, with the
    route's workspace in place of the client's own."""
    proxy, sandbox = stack
    sandbox.clear()
    headers = {**PUBLER_PYTHON, "Publer-Workspace-Id": ROUTE_WS}
    sent = python_httpx("GET", f"{proxy.url}/api/v1{target}", headers)
    assert sent.status == 200, sent
    record = _only_request(sandbox)
    path, _, query = target.partition("?")
    assert (record["path"], record["query"]) == (f"/api/v1{path}", query)
    assert _header(record, "publer-workspace-id") == [ROUTE_WS]


@pytest.mark.parametrize("target", ["/users/me", "/workspaces"])
def test_publer_python_sends_its_workspace_where_publer_takes_none(
    stack: tuple[Proxy, Sandbox], target: str
) -> None:
    """The client's own workspace on /users/me and /workspaces is dropped, not refused,
    and no workspace reaches Publer there."""
    proxy, sandbox = stack
    sandbox.clear()
    sent = python_httpx("GET", f"{proxy.url}/api/v1{target}", PUBLER_PYTHON)
    assert sent.status == 200, sent
    assert _header(_only_request(sandbox), "publer-workspace-id") == []


@pytest.mark.parametrize(
    "target",
    [
        # publer/resources/analytics.py: chart_data as /analytics/charts/{chart_id}, and
        # competitors under /analytics: neither is a path Publer documents.
        "/analytics/charts/engagement_over_time?from=2025-01-01",
        "/analytics/competitors",
        "/analytics/competitors/analysis?competitor_ids=a,b",
    ],
)
def test_publer_python_undocumented_paths_are_unknown(
    stack: tuple[Proxy, Sandbox], target: str
) -> None:
    """Paths Publer does not document are unknown_endpoint, and never reach Publer."""
    proxy, sandbox = stack
    sandbox.clear()
    headers = {**PUBLER_PYTHON, "Publer-Workspace-Id": ROUTE_WS}
    _refused(
        python_httpx("GET", f"{proxy.url}/api/v1{target}", headers), sandbox, "unknown_endpoint"
    )


# Spinnable-AI/publer-mcp, src/publer_mcp/client/auth.py and client/api.py: fixed headers
# (key, workspace, JSON, its agent) on every call, and some paths of its own invention.
SPINNABLE = {
    "Authorization": f"Bearer-API {CLIENT_KEY}",
    "Publer-Workspace-Id": ROUTE_WS,
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "Spinnable-Publer-MCP/0.1.0",
}


@pytest.mark.parametrize(
    ("method", "target", "code"),
    [
        ("GET", f"/posts/{POST_ID}/analytics", "unknown_endpoint"),
        ("PUT", f"/posts/{POST_ID}/schedule", "unknown_endpoint"),
        ("GET", f"/accounts/{ACCOUNT}/analytics?start_date=2025-01-01", "unknown_endpoint"),
        ("GET", f"/accounts/{ACCOUNT}", "unknown_endpoint"),
        ("GET", f"/media/{POST_ID}", "unknown_endpoint"),
        # GET /posts/{id}: the path is documented (PUT, DELETE), this method is not.
        ("GET", f"/posts/{POST_ID}", "method_denied"),
    ],
)
def test_spinnable_mcp_invented_paths_are_refused(
    stack: tuple[Proxy, Sandbox], method: str, target: str, code: str
) -> None:
    """Each invented call gets the refusal that says why, nothing reaches Publer."""
    proxy, sandbox = stack
    sandbox.clear()
    sent = python_httpx(method, f"{proxy.url}/api/v1{target}", SPINNABLE)
    _refused(sent, sandbox, code)


def test_spinnable_mcp_lists_posts_and_workspaces(stack: tuple[Proxy, Sandbox]) -> None:
    """Its documented calls pass: /posts with its own query, and /workspaces without the
    workspace header (publer_mcp/client.py: include_workspace=False)."""
    proxy, sandbox = stack
    sandbox.clear()
    posts = python_httpx("GET", f"{proxy.url}/api/v1/posts?limit=20&status=scheduled", SPINNABLE)
    assert posts.status == 200 and set(posts.body) >= {"posts", "page", "per_page", "total_pages"}
    bare = {k: v for k, v in SPINNABLE.items() if k != "Publer-Workspace-Id"}
    workspaces = python_httpx("GET", f"{proxy.url}/api/v1/workspaces", bare)
    assert workspaces.status == 200 and workspaces.body[0]["id"]
    first, second = sandbox.requests()
    assert first["query"] == "limit=20&status=scheduled"
    assert _header(first, "publer-workspace-id") == [ROUTE_WS]
    assert _header(second, "publer-workspace-id") == []


def test_chunked_multipart_upload_from_python(stack: tuple[Proxy, Sandbox]) -> None:
    """requests with a generator body sends the multipart upload chunked (no length);
    the file arrives whole. (Publer's reference, api-evangelist/publer
    openapi/_original/publer-openapi.yml: POST /media, multipart field `file`.)"""
    proxy, sandbox = stack
    sandbox.clear()
    payload = os.urandom(3 * 1024 * 1024 + 7)
    boundary = "compatboundary7MA4YWxkTrZu0gW"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    tail = f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="in_library"\r\n\r\ntrue'
    tail += f"\r\n--{boundary}--\r\n"

    def body() -> Iterator[bytes]:
        yield head
        for start in range(0, len(payload), 256 * 1024):
            yield payload[start : start + 256 * 1024]
        yield tail.encode()

    headers = {**SPINNABLE, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    with requests.Session() as session:
        session.trust_env = False
        answer = session.post(f"{proxy.url}/api/v1/media", data=body(), headers=headers)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["size"], answer.json()["type"]) == (len(payload), "video")
    record = _only_request(sandbox)
    assert record["body_bytes"] == len(head) + len(payload) + len(tail)


# Go client, replayed with curl ----------------------------------------------------------------

# kapetan-io/publer.go, v1/client.go: Go's net/http, key and workspace on every call, JSON
# bodies; GetPost, UpdatePost (PATCH) and CreateRecurringPost are its own guesses.
GO_HEADERS = {"Authorization": f"Bearer-API {CLIENT_KEY}", "Publer-Workspace-Id": ROUTE_WS}


@pytest.mark.parametrize(
    ("method", "target", "code"),
    [
        ("GET", f"/posts/{POST_ID}", "method_denied"),
        ("PATCH", f"/posts/{POST_ID}", "method_denied"),
        ("POST", "/posts/recurring", "unknown_endpoint"),
        ("POST", "/posts/auto-schedule", "unknown_endpoint"),
        ("POST", "/posts/recycle", "unknown_endpoint"),
        ("GET", "/test", "unknown_endpoint"),
    ],
)
def test_go_client_guesses_are_refused_with_the_right_code(
    stack: tuple[Proxy, Sandbox], method: str, target: str, code: str
) -> None:
    """A documented path with another method is method_denied; an undocumented path is
    unknown_endpoint, even under /posts/ where an id could go."""
    proxy, sandbox = stack
    sandbox.clear()
    args = ["-H", "Content-Type: application/json", "--data-binary", '{"text":"x"}']
    sent = curl(
        method, f"{proxy.url}/api/v1{target}", GO_HEADERS, *(args if method != "GET" else [])
    )
    _refused(sent, sandbox, code)


def test_go_client_publishes_then_deletes(stack: tuple[Proxy, Sandbox]) -> None:
    """POST /posts/schedule/publish with a JSON bulk body passes; its post is deleted by
    DELETE /posts/{id}; /workspaces?page=2 passes with the workspace dropped."""
    proxy, _ = stack
    bulk = {
        "bulk": {
            "state": "scheduled",
            "posts": [{"networks": {"facebook": {"type": "status", "text": "from Go"}},
                       "accounts": [{"id": ACCOUNT}]}],
        }
    }  # fmt: skip
    args = ["-H", "Content-Type: application/json", "--data-binary", json.dumps(bulk)]
    sent = curl("POST", f"{proxy.url}/api/v1/posts/schedule/publish", GO_HEADERS, *args)
    assert sent.status == 200 and sent.body["job_id"], sent
    job = _poll_until_done(proxy, sent.body["job_id"])
    [post] = job["payload"]["posts"]
    assert post["text"] == "from Go"
    deleted = curl("DELETE", f"{proxy.url}/api/v1/posts/{post['id']}", GO_HEADERS)
    assert deleted.body == {"deleted_ids": [post["id"]]}
    listed = curl("GET", f"{proxy.url}/api/v1/workspaces?page=2", GO_HEADERS)
    assert listed.status == 200


def _poll_until_done(proxy: Proxy, job_id: str) -> dict[str, Any]:
    seen = []
    for _ in range(10):
        sent = curl("GET", f"{proxy.url}/api/v1/job_status/{job_id}", GO_HEADERS)
        seen.append(sent.body["status"])
        if sent.body["status"] in ("complete", "failed"):
            assert seen[0] == "working"
            result: dict[str, Any] = sent.body
            return result
    raise AssertionError(f"job {job_id} never finished: {seen}")


# Node client ------------------------------------------------------------------------------------

# OwenMcGirr/publer-client, src/client.ts: Node's fetch; arrays as `key[]=` repeated; the
# workspace on every call when configured; uploads as FormData with `file`, `in_library`
# and `direct_upload` (fetch sets the multipart boundary itself).
NODE_PRELUDE = """
const base = process.env.BASE;
const headers = {Authorization: `Bearer-API ${process.env.CLIENT_KEY}`,
                 "Publer-Workspace-Id": process.env.CLIENT_WS};
"""


def test_node_client_lists_media_with_bracket_arrays(stack: tuple[Proxy, Sandbox]) -> None:
    """`types[]=photo&types[]=video` passes byte for byte (URLSearchParams encodes the
    brackets as %5B%5D)."""
    proxy, sandbox = stack
    sandbox.clear()
    script = (
        NODE_PRELUDE
        + """
const url = new URL(`${base}/media`);
for (const t of ["photo", "video"]) url.searchParams.append("types[]", t);
url.searchParams.set("page", "0");
const answer = await fetch(url, {method: "GET", headers});
"""
    )
    sent = node_fetch(script, BASE=f"{proxy.url}/api/v1", CLIENT_KEY=CLIENT_KEY, CLIENT_WS=ROUTE_WS)
    assert sent.status == 200, sent
    assert set(sent.body) >= {"media", "total", "page", "per_page", "total_pages"}
    record = _only_request(sandbox)
    assert record["query"] == "types%5B%5D=photo&types%5B%5D=video&page=0"


def test_node_client_uploads_form_data(stack: tuple[Proxy, Sandbox]) -> None:
    """A FormData upload (file, in_library, direct_upload) arrives whole and is answered
    with Publer's media shape."""
    proxy, sandbox = stack
    sandbox.clear()
    script = (
        NODE_PRELUDE
        + """
const form = new FormData();
const bytes = new Uint8Array(1500000).map((_, i) => i % 251);
form.append("file", new Blob([bytes], {type: "image/png"}), "photo.png");
form.append("in_library", "true");
form.append("direct_upload", "false");
const answer = await fetch(`${base}/media`, {method: "POST", headers, body: form});
"""
    )
    sent = node_fetch(script, BASE=f"{proxy.url}/api/v1", CLIENT_KEY=CLIENT_KEY, CLIENT_WS=ROUTE_WS)
    assert sent.status == 200, sent
    assert (sent.body["size"], sent.body["type"], sent.body["name"]) == (
        1500000,
        "photo",
        "photo.png",
    )


def test_node_client_me_with_its_workspace_and_job_polling(stack: tuple[Proxy, Sandbox]) -> None:
    """me() with the client's own workspace passes (dropped); a scheduled post's job is
    polled until `complete`, as the client's getJobStatus loop does."""
    proxy, _ = stack
    script = (
        NODE_PRELUDE
        + """
const me = await fetch(`${base}/users/me`, {headers});
if (me.status !== 200) throw new Error(`me: ${me.status}`);
const post = {bulk: {state: "scheduled", posts: [{
  networks: {linkedin: {type: "status", text: "Hello from Switchify"}},
  accounts: [{id: process.env.ACCOUNT, scheduled_at: "2026-02-01T09:00:00Z"}]}]}};
const scheduled = await fetch(`${base}/posts/schedule`, {method: "POST",
  headers: {...headers, "Publer-Workspace-Id": process.env.ROUTE_WS,
            "Content-Type": "application/json"},
  body: JSON.stringify(post)});
const {job_id} = await scheduled.json();
const seen = [];
let answer;
for (let i = 0; i < 10; i++) {
  answer = await fetch(`${base}/job_status/${job_id}`,
                       {headers: {...headers, "Publer-Workspace-Id": process.env.ROUTE_WS}});
  const status = (await answer.clone().json()).status;
  seen.push(status);
  if (status === "complete" || status === "failed") break;
}
if (seen[0] !== "working") throw new Error(`first poll: ${seen[0]}`);
"""
    )
    sent = node_fetch(
        script,
        BASE=f"{proxy.url}/api/v1",
        CLIENT_KEY=CLIENT_KEY,
        CLIENT_WS=CLIENT_WS,
        ROUTE_WS=ROUTE_WS,
        ACCOUNT=ACCOUNT,
    )
    assert sent.status == 200 and sent.body["status"] == "complete", sent
    assert [p["text"] for p in sent.body["payload"]["posts"]] == ["Hello from Switchify"]


# n8n node, empty workspace ----------------------------------------------------------------------

# david1gp/n8n-nodes-publer, credentials/PublerApi.credentials.ts: the credential's
# "Workspace ID" is optional (default ""), and its authenticate block always sends
# `Publer-Workspace-Id: {{$credentials.workspaceId}}`, so an unset one is an empty header.
N8N = {"Authorization": f"Bearer-API {CLIENT_KEY}", "Publer-Workspace-Id": "",
       "Accept": "application/json"}  # fmt: skip


@pytest.mark.parametrize(
    ("target", "upstream_workspace"),
    [("/accounts", [ROUTE_WS]), ("/workspaces", []), (f"/job_status/{POST_ID}", [ROUTE_WS])],
)
def test_n8n_empty_workspace_header_counts_as_absent(
    stack: tuple[Proxy, Sandbox], target: str, upstream_workspace: list[str]
) -> None:
    """An empty workspace header is no choice: the route's workspace is sent where
    Publer takes one, none elsewhere, and nothing is refused."""
    proxy, sandbox = stack
    sandbox.clear()
    sent = curl("GET", f"{proxy.url}/api/v1{target}", N8N)
    assert sent.status in (200, 404), sent  # an unknown job is Publer's own 404
    assert "x-publer-proxy-error" not in sent.headers
    assert _header(_only_request(sandbox), "publer-workspace-id") == upstream_workspace


# Publer's reference, with curl ------------------------------------------------------------------

# api-evangelist/publer, openapi/_original/publer-openapi.yml (Publer's OpenAPI blocks as
# published on publer.com/docs): the documented forms, sent the way the docs show them.
DOCS = {"Authorization": f"Bearer-API {CLIENT_KEY}", "Publer-Workspace-Id": ROUTE_WS}


@pytest.mark.parametrize(
    ("target", "check"),
    [
        ("/competitors", lambda b: "social_id" in b[0]),
        (
            "/competitors/analytics?page=0&sort_by=followers&sort_type=desc",
            lambda b: "insights" in b,
        ),
        (f"/competitors/{ACCOUNT}", lambda b: isinstance(b, list)),
        (f"/competitors/{ACCOUNT}/analytics?{FROM_TO}", lambda b: "total" in b),
        ("/analytics/chart_data?chart_ids=followers&chart_ids=reach", lambda b: "current" in b),
        (f"/analytics/{ACCOUNT}/chart_data?chart_ids=reach&{FROM_TO}", lambda b: "previous" in b),
        ("/analytics/hashtag_performing_posts?hashtag=%23launch", lambda b: isinstance(b, list)),
        (f"/analytics/{ACCOUNT}/best_times?{FROM_TO}", lambda b: len(b["Sunday"]) == 24),
        ("/analytics/charts?account_type=ig_business", lambda b: isinstance(b, list)),
        (f"/workspaces/{ROUTE_WS}/media_options", lambda b: isinstance(b, list)),
        ("/locations?q=Tirana", lambda b: isinstance(b, list)),
    ],
)
def test_documented_reads_pass(
    stack: tuple[Proxy, Sandbox], target: str, check: Callable[[Any], bool]
) -> None:
    """Every documented read form passes, query byte for byte, answered in its shape."""
    proxy, sandbox = stack
    sandbox.clear()
    sent = curl("GET", f"{proxy.url}/api/v1{target}", DOCS)
    assert sent.status == 200, sent
    assert check(sent.body), sent.body
    assert _only_request(sandbox)["query"] == target.partition("?")[2]


def test_post_insights_without_dates_is_publers_own_500(stack: tuple[Proxy, Sandbox]) -> None:
    """The proxy forwards a post_insights call without from/to; Publer's 500 comes back as
    Publer's (it is not a proxy refusal, and a GET 500 is not retried)."""
    proxy, sandbox = stack
    sandbox.clear()
    sent = curl("GET", f"{proxy.url}/api/v1/analytics/post_insights", DOCS)
    assert sent.status == 500 and "x-publer-proxy-error" not in sent.headers
    assert len(sandbox.requests()) == 1


def test_delete_posts_with_repeated_post_ids(stack: tuple[Proxy, Sandbox]) -> None:
    """DELETE /posts?post_ids=A&post_ids=B, the documented form (style form, explode),
    deletes both."""
    proxy, _ = stack
    drafts = [{"networks": {"facebook": {"type": "status", "text": f"d{n}"}}} for n in range(2)]
    bulk = {"bulk": {"state": "draft_public", "posts": drafts}}
    args = ["-H", "Content-Type: application/json", "--data-binary", json.dumps(bulk)]
    job_id = curl("POST", f"{proxy.url}/api/v1/posts/schedule", DOCS, *args).body["job_id"]
    ids = [post["id"] for post in _poll_until_done(proxy, job_id)["payload"]["posts"]]
    query = "&".join(f"post_ids={post_id}" for post_id in ids)
    sent = curl("DELETE", f"{proxy.url}/api/v1/posts?{query}", DOCS)
    assert sent.status == 200 and sorted(sent.body["deleted_ids"]) == sorted(ids)


@pytest.mark.parametrize(
    "extra",
    [
        # curl's own `-F` upload, told to wait for the interim answer before the body.
        ["-H", "Expect: 100-continue"],
        # the same upload chunked, without a length.
        ["-H", "Transfer-Encoding: chunked"],
    ],
)
def test_curl_media_upload(stack: tuple[Proxy, Sandbox], tmp_path: Path, extra: list[str]) -> None:
    """POST /media as the reference shows it (`-F file=@...`), with `Expect:
    100-continue` or chunked: the proxy answers the interim 100, streams the body, and
    the file arrives whole."""
    proxy, sandbox = stack
    sandbox.clear()
    media = tmp_path / "clip.mp4"
    media.write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    sent = curl(
        "POST",
        f"{proxy.url}/api/v1/media",
        DOCS,
        "-F",
        f"file=@{media};type=video/mp4",
        "-F",
        "in_library=true",
        *extra,
    )
    assert sent.status == 200, sent
    assert (sent.body["size"], sent.body["name"]) == (media.stat().st_size, "clip.mp4")
    assert _header(_only_request(sandbox), "expect") == []  # the proxy answered it


def test_upload_declared_over_the_limit_is_refused_before_the_body(
    stack: tuple[Proxy, Sandbox],
) -> None:
    """A declared Content-Length over the limit is answered 413 from the head: curl with
    `Expect: 100-continue` never sends the body, and nothing reaches Publer."""
    proxy, sandbox = stack
    sandbox.clear()
    sent = curl(
        "POST",
        f"{proxy.url}/api/v1/media",
        {**DOCS, "Content-Type": "multipart/form-data; boundary=x",
         "Content-Length": str(300 * 1024 * 1024), "Expect": "100-continue"},
        "--data-binary", "",
        "--max-time", "10",
    )  # fmt: skip
    assert sent.status == 413 and sent.headers["x-publer-proxy-error"] == "body_too_large"
    assert sandbox.requests() == []
