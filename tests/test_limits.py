"""The limit decision (`proxy/rules/limits.py`): tables of hostile and allowed calls, and
property tests that no body naming a forbidden account is ever allowed."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.settings import ConfigError, LimitSettings, PostLimitSettings, parse_settings
from proxy.rules.limits import (
    INSPECT_LIMIT_BYTES,
    Decision,
    LimitedCall,
    Limits,
    decide,
    effective_limits,
    filter_accounts,
    named_accounts,
)

A, B, X = "6120c1f3a1b2c3d4e5f60001", "6120c1f3a1b2c3d4e5f60002", "6120c1f3a1b2c3d4e5f6dead"
REGIONAL = Limits(accounts=frozenset({A, B}))
DRAFTER = Limits(
    accounts=frozenset({A}),
    publish_now=False,
    states=frozenset({"draft"}),
    delete=False,
    update=False,
)
NO_PUBLISH_NOW = Limits(publish_now=False)
JSON = [(b"content-type", b"application/json")]


def call(
    method: str,
    path: str,
    body: bytes | str | dict[str, Any] | None = None,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> LimitedCall:
    """A call as the forwarder hands it to the decision."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return LimitedCall(method, path, query, JSON if headers is None else headers, body)


def create(*accounts: Any, state: str = "scheduled", **post: Any) -> dict[str, Any]:
    """A create body in Publer's documented shape, one post to `accounts`."""
    entries = [a if isinstance(a, dict) else {"id": a, "scheduled_at": "2030-01-01T09:00Z"}
               for a in accounts]  # fmt: skip
    draft = {"networks": {"facebook": {"type": "status", "text": "hi"}}, "accounts": entries}
    return {"bulk": {"state": state, "posts": [draft | post]}}


def fill(text: str, *ids: str) -> str:
    """`text` with each '@' replaced by the next of `ids`."""
    for account_id in ids:
        text = text.replace("@", account_id, 1)
    return text


CREATE_A = json.dumps(create(A))
DUP_ACCOUNTS = fill(
    '{"bulk":{"state":"scheduled","posts":[{"accounts":[{"id":"@"}],"accounts":[{"id":"@"}]}]}}',
    A,
    X,
)

DENIED: list[tuple[str, Limits, LimitedCall, str]] = [
    ("forbidden account", REGIONAL, call("POST", "/posts/schedule", create(X)), "limit_denied"),
    ("allowed then forbidden", REGIONAL, call("POST", "/posts/schedule", create(A, X)),
     "limit_denied"),
    ("publish-now to a forbidden account", REGIONAL,
     call("POST", "/posts/schedule/publish", create({"id": X})), "limit_denied"),
    ("POST /posts to a forbidden account", REGIONAL, call("POST", "/posts", create(X)),
     "limit_denied"),
    ("duplicate accounts key", REGIONAL, call("POST", "/posts/schedule", DUP_ACCOUNTS),
     "body_uninspectable"),
    ("duplicate id key", REGIONAL, call("POST", "/posts/schedule",
     fill('{"bulk":{"state":"scheduled","posts":[{"accounts":[{"id":"@","id":"@"}]}]}}', A, X)),
     "body_uninspectable"),
    ("duplicate bulk key", REGIONAL, call("POST", "/posts/schedule",
     CREATE_A[:-1] + "," + json.dumps(create(X))[1:]), "body_uninspectable"),
    ("escaped key name duplicates accounts", REGIONAL, call("POST", "/posts/schedule",
     fill('{"bulk":{"state":"scheduled","posts":[{"accounts":[{"id":"@"}],'
          '"\\u0061ccounts":[{"id":"@"}]}]}}', A, X)), "body_uninspectable"),
    ("escaped key name alone", REGIONAL, call("POST", "/posts/schedule",
     fill('{"bulk":{"state":"scheduled","posts":[{"\\u0061ccounts":[{"id":"@"}]}]}}', X)),
     "limit_denied"),
    ("escaped id value", REGIONAL, call("POST", "/posts/schedule",
     fill('{"bulk":{"state":"scheduled","posts":[{"accounts":[{"id":"@\\u0041"}]}]}}', A[:-1])),
     "limit_denied"),
    ("case variant Accounts", REGIONAL, call("POST", "/posts/schedule",
     create(A, Accounts=[{"id": X}])), "limit_denied"),
    ("case variant ID in an entry", REGIONAL, call("POST", "/posts/schedule",
     create({"id": A, "ID": X})), "limit_denied"),
    ("account id as a number", REGIONAL, call("POST", "/posts/schedule",
     create({"id": 123})), "limit_denied"),
    ("account id as a list", REGIONAL, call("POST", "/posts/schedule",
     create({"id": [A, X]})), "limit_denied"),
    ("account_id inside networks", REGIONAL, call("POST", "/posts/schedule",
     create(A, networks={"facebook": {"text": "x", "account_id": X}})), "limit_denied"),
    ("account_ids beside accounts", REGIONAL, call("POST", "/posts/schedule",
     create(A, account_ids=[X])), "limit_denied"),
    ("accounts at the top level", REGIONAL, call("POST", "/posts/schedule",
     {**create(A), "accounts": [{"id": X}]}), "limit_denied"),
    ("accounts in bulk", REGIONAL, call("POST", "/posts/schedule",
     {"bulk": {**create(A)["bulk"], "accounts": [{"id": X}]}}), "limit_denied"),
    ("no bulk wrapper", REGIONAL, call("POST", "/posts/schedule",
     {"state": "scheduled", "posts": create(X)["bulk"]["posts"]}), "limit_denied"),
    ("_method in the JSON", REGIONAL, call("POST", "/posts/schedule",
     create(A, _method="delete")), "limit_denied"),
    ("a scheduled post naming no account", REGIONAL, call("POST", "/posts/schedule",
     create()), "limit_denied"),
    ("unknown state", REGIONAL, call("POST", "/posts/schedule", create(A, state="Scheduled")),
     "limit_denied"),
    ("NaN", REGIONAL, call("POST", "/posts/schedule", CREATE_A[:-1] + ',"n":NaN}'),
     "body_uninspectable"),
    ("Infinity", REGIONAL, call("POST", "/posts/schedule", CREATE_A[:-1] + ',"n":-Infinity}'),
     "body_uninspectable"),
    ("byte-order mark", REGIONAL, call("POST", "/posts/schedule",
     b"\xef\xbb\xbf" + CREATE_A.encode()), "body_uninspectable"),
    ("comment", REGIONAL, call("POST", "/posts/schedule", "/* x */" + CREATE_A),
     "body_uninspectable"),
    ("trailing garbage", REGIONAL, call("POST", "/posts/schedule", CREATE_A + " x"),
     "body_uninspectable"),
    ("a second JSON value", REGIONAL, call("POST", "/posts/schedule",
     CREATE_A + json.dumps(create(X))), "body_uninspectable"),
    ("invalid UTF-8", REGIONAL, call("POST", "/posts/schedule",
     CREATE_A.encode()[:-2] + b'"\xff"}'), "body_uninspectable"),
    ("UTF-16", REGIONAL, call("POST", "/posts/schedule", CREATE_A.encode("utf-16")),
     "body_uninspectable"),
    ("nested too deep", REGIONAL, call("POST", "/posts/schedule", "[" * 100_000),
     "body_uninspectable"),
    ("a form body", REGIONAL, call("POST", "/posts/schedule",
     f"bulk[state]=scheduled&bulk[posts][][accounts][][id]={X}",
     headers=[(b"content-type", b"application/x-www-form-urlencoded")]), "body_uninspectable"),
    ("multipart", REGIONAL, call("POST", "/posts/schedule",
     f'--b\r\nContent-Disposition: form-data; name="bulk[posts][][accounts][][id]"\r\n\r\n{X}'
     "\r\n--b--\r\n", headers=[(b"content-type", b"multipart/form-data; boundary=b")]),
     "body_uninspectable"),
    ("text/plain JSON", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[(b"content-type", b"text/plain")]), "body_uninspectable"),
    ("text/x-json", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[(b"content-type", b"text/x-json")]), "body_uninspectable"),
    ("application/jsonrequest", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[(b"content-type", b"application/jsonrequest")]), "body_uninspectable"),
    ("vnd+json", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[(b"content-type", b"application/vnd.api+json")]), "body_uninspectable"),
    ("charset latin-1", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[(b"content-type", b"application/json; charset=iso-8859-1")]), "body_uninspectable"),
    ("a second parameter", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[(b"content-type", b"application/json; charset=utf-8; x=y")]), "body_uninspectable"),
    ("two Content-Type fields", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[*JSON, (b"content-type", b"application/x-www-form-urlencoded")]),
     "body_uninspectable"),
    ("no Content-Type", REGIONAL, call("POST", "/posts/schedule", CREATE_A, headers=[]),
     "body_uninspectable"),
    ("gzip", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[*JSON, (b"content-encoding", b"gzip")]), "body_uninspectable"),
    ("identity coding named", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[*JSON, (b"Content-Encoding", b"identity")]), "body_uninspectable"),
    ("no body on create", REGIONAL, call("POST", "/posts/schedule"), "body_uninspectable"),
    ("a query on a write", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     query=b"bulk[state]=scheduled"), "limit_denied"),
    ("_method in the query", REGIONAL, call("GET", "/posts", query=b"_method=DELETE"),
     "limit_denied"),
    ("X-HTTP-Method-Override", REGIONAL, call("POST", "/posts/schedule", CREATE_A,
     headers=[*JSON, (b"X-HTTP-Method-Override", b"DELETE")]), "limit_denied"),
    ("X-Method-Override", REGIONAL, call("GET", "/posts",
     headers=[(b"x-method-override", b"DELETE")]), "limit_denied"),
    ("list filter naming a forbidden account", REGIONAL, call("GET", "/posts",
     query=f"account_ids[]={X}".encode()), "limit_denied"),
    ("list filter with encoded brackets", REGIONAL, call("GET", "/posts",
     query=f"account_ids%5B%5D={X}".encode()), "limit_denied"),
    ("list filter after a semicolon", REGIONAL, call("GET", "/posts",
     query=f"account_ids[]={A};account_ids[]={X}".encode()), "limit_denied"),
    ("account_id on a report's query", REGIONAL, call("GET", f"/analytics/{A}/chart_data",
     query=f"account_id={X}".encode()), "limit_denied"),
    ("list filter without brackets", REGIONAL, call("GET", "/posts",
     query=f"account_ids={A}".encode()), "limit_denied"),
    ("list filter as an indexed hash", REGIONAL, call("GET", "/posts",
     query=f"account_ids[0]={A}".encode()), "limit_denied"),
    ("an empty filter value", REGIONAL, call("GET", "/posts", query=b"account_ids[]="),
     "limit_denied"),
    ("account_id on another read", REGIONAL,
     call("GET", "/media", query=f"account_id={X}".encode()), "limit_denied"),
    ("HEAD of the account list", REGIONAL, call("HEAD", "/accounts"), "limit_denied"),
    ("a GET with a body", REGIONAL, call("GET", "/posts", create(X)), "body_uninspectable"),
    ("a forbidden account's report", REGIONAL, call("GET", f"/analytics/{X}/chart_data"),
     "limit_denied"),
    ("the all-accounts report", REGIONAL, call("GET", "/analytics/post_insights"), "limit_denied"),
    ("hashtags over every account", REGIONAL, call("GET", "/analytics/hashtag_insights"),
     "limit_denied"),
    ("members' report", REGIONAL, call("GET", "/analytics/members"), "limit_denied"),
    ("members' report of a forbidden account", REGIONAL, call("GET", "/analytics/members",
     query=f"account_id={X}".encode()), "limit_denied"),
    ("members' report naming two accounts", REGIONAL, call("GET", "/analytics/members",
     query=f"account_id={A}&account_id={B}".encode()), "limit_denied"),
    ("a semicolon in the query", REGIONAL, call("GET", "/posts",
     query=f"account_ids[]={A};x=1".encode()), "limit_denied"),
    ("competitors of every account", REGIONAL, call("GET", "/competitors"), "limit_denied"),
    ("competitor analytics of every account", REGIONAL, call("GET", "/competitors/analytics"),
     "limit_denied"),
    ("a forbidden account's competitors", REGIONAL, call("GET", f"/competitors/{X}"),
     "limit_denied"),
    ("a forbidden account's competitor analytics", REGIONAL,
     call("GET", f"/competitors/{X}/analytics"), "limit_denied"),
    ("update by post id", REGIONAL, call("PUT", "/posts/abc", {"text": "x"}), "limit_denied"),
    ("delete by post id", REGIONAL, call("DELETE", "/posts/abc"), "limit_denied"),
    ("bulk delete", REGIONAL, call("DELETE", "/posts", query=b"post_ids[]=a"), "limit_denied"),
    ("media from a URL naming an account", REGIONAL, call("POST", "/media/from-url",
     {"media": [{"url": "https://x.test/a.png"}], "account_ids": [X]}), "limit_denied"),
    ("publish now on a drafting route", DRAFTER, call("POST", "/posts/schedule/publish",
     create(A, state="draft")), "limit_denied"),
    ("scheduled on a drafting route", DRAFTER, call("POST", "/posts/schedule", create(A)),
     "limit_denied"),
    ("a draft with a time", DRAFTER, call("POST", "/posts/schedule", create(A, state="draft")),
     "limit_denied"),
    ("a draft auto-scheduled", DRAFTER, call("POST", "/posts/schedule",
     create({"id": A}, state="draft", auto=True, range={"start_date": "2030-01-01"})),
     "limit_denied"),
    ("a draft recycled", DRAFTER, call("POST", "/posts/schedule",
     create({"id": A}, state="draft", recycling={"gap": 2})), "limit_denied"),
    ("a per-post state", DRAFTER, call("POST", "/posts/schedule",
     create({"id": A}, state="draft", State="scheduled")), "limit_denied"),
    ("draft_public when only draft is allowed", DRAFTER, call("POST", "/posts/schedule",
     create(state="draft_public")), "limit_denied"),
    ("update on a drafting route", DRAFTER, call("PUT", "/posts/abc", {"text": "x"}),
     "limit_denied"),
    ("delete on a drafting route", DRAFTER, call("DELETE", "/posts/abc"), "limit_denied"),
    ("publish now refused", NO_PUBLISH_NOW, call("POST", "/posts/schedule/publish", create(A)),
     "limit_denied"),
    ("scheduled without a time", NO_PUBLISH_NOW, call("POST", "/posts/schedule",
     create({"id": A})), "limit_denied"),
    ("scheduled with an empty time", NO_PUBLISH_NOW, call("POST", "/posts/schedule",
     create({"id": A, "scheduled_at": ""})), "limit_denied"),
    ("update moving the time", NO_PUBLISH_NOW, call("PUT", "/posts/abc",
     {"post": {"scheduled_at": "2030-01-01T00:00Z"}}), "limit_denied"),
    ("update changing the state", NO_PUBLISH_NOW, call("PUT", "/posts/abc",
     {"state": "scheduled"}), "limit_denied"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "request_", "code"),
    [case[1:] for case in DENIED],
    ids=[case[0] for case in DENIED],
)
def test_hostile_calls_are_refused(limits: Limits, request_: LimitedCall, code: str) -> None:
    """Each hostile call on a limited route is refused with its code and a sentence."""
    decision = decide(request_, limits)
    assert decision.refusal is not None
    assert decision.refusal.code == code
    message = decision.refusal.message
    assert len(message.split()) >= 6 and "Traceback" not in message


ALLOWED: list[tuple[str, Limits, LimitedCall, Decision]] = [
    ("schedule to an allowed account", REGIONAL, call("POST", "/posts/schedule", create(A, B)),
     Decision(None, accounts=(A, B))),
    ("publish now to an allowed account", REGIONAL,
     call("POST", "/posts/schedule/publish", create({"id": A})), Decision(None, accounts=(A,))),
    ("charset utf-8 and spaces", REGIONAL, call("POST", "/posts/schedule", create(A),
     headers=[(b"Content-Type", b"Application/JSON ; Charset=\"UTF-8\"")]),
     Decision(None, accounts=(A,))),
    ("a workspace draft names no account", REGIONAL, call("POST", "/posts/schedule",
     create(state="draft_public")), Decision(None, accounts=())),
    ("list adds the filter", REGIONAL, call("GET", "/posts", query=b"state=scheduled"),
     Decision(None, add_query=f"account_ids[]={A}&account_ids[]={B}")),
    ("list with an allowed filter", REGIONAL, call("GET", "/posts",
     query=f"account_ids[]={A}".encode()), Decision(None)),
    ("an allowed account's report", REGIONAL, call("GET", f"/analytics/{A}/best_times"),
     Decision(None, accounts=(A,))),
    ("an allowed account's competitors", REGIONAL, call("GET", f"/competitors/{B}/analytics"),
     Decision(None, accounts=(B,))),
    ("the account list is narrowed", REGIONAL, call("GET", "/accounts"),
     Decision(None, filter_response=True)),
    ("media options are narrowed", REGIONAL, call("GET", "/workspaces/w1/media_options"),
     Decision(None, filter_response=True)),
    ("members' report of an allowed account", REGIONAL, call("GET", "/analytics/members",
     query=f"from=2030-01-01&to=2030-01-31&account_id={A}".encode()),
     Decision(None, accounts=(A,))),
    ("chart list", REGIONAL, call("GET", "/analytics/charts"), Decision(None)),
    ("job status", REGIONAL, call("GET", "/job_status/j1"), Decision(None)),
    ("a media upload streams", REGIONAL, call("POST", "/media", None,
     headers=[(b"content-type", b"multipart/form-data; boundary=b")]), Decision(None)),
    ("media from a URL", REGIONAL, call("POST", "/media/from-url",
     {"media": [{"url": "https://x.test/a.png"}]}), Decision(None)),
    ("a draft on a drafting route", DRAFTER, call("POST", "/posts/schedule",
     create({"id": A}, state="draft")), Decision(None, accounts=(A,))),
    ("scheduled with a time", NO_PUBLISH_NOW, call("POST", "/posts/schedule", create(X)),
     Decision(None, accounts=(X,))),
    ("auto-scheduled", NO_PUBLISH_NOW, call("POST", "/posts/schedule",
     create({"id": X}, auto=True)), Decision(None, accounts=(X,))),
    ("update of text", NO_PUBLISH_NOW, call("PUT", "/posts/abc", {"text": "fixed"}),
     Decision(None)),
    ("delete where deleting is allowed", NO_PUBLISH_NOW, call("DELETE", "/posts/abc"),
     Decision(None)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "request_", "expected"),
    [case[1:] for case in ALLOWED],
    ids=[case[0] for case in ALLOWED],
)
def test_allowed_calls_pass(limits: Limits, request_: LimitedCall, expected: Decision) -> None:
    """Calls within the limits pass, with the accounts they act on and the filter added."""
    assert decide(request_, limits) == expected


@pytest.mark.parametrize(
    "body",
    [
        '{"bulk":{"state":"scheduled","posts":[{"\\ud800accounts":[]}]}}',
        '{"bulk":{"state":"scheduled","posts":[{"accounts":[{"id":"a","\\udfff":1}]}]}}',
        '{"\\ud800":1,"\\ud800":2}',
    ],
)
def test_refusals_echo_what_was_sent_as_valid_json(body: str) -> None:
    """A refusal naming a key with a lone surrogate still renders as the proxy's envelope."""
    decision = decide(call("POST", "/posts/schedule", body), REGIONAL)
    assert decision.refusal is not None
    assert json.loads(decision.refusal.body("rid"))["code"] == decision.refusal.code


def test_a_client_narrows_its_route_and_never_widens_it() -> None:
    """A client's limits meet its route's: accounts and states intersect, permissions AND."""
    route = LimitSettings(accounts=[A, B], posts=PostLimitSettings(delete=False))
    client = LimitSettings(
        accounts=[B, X], posts=PostLimitSettings(publish_now=False, states=["draft", "scheduled"])
    )
    assert effective_limits(route, client) == Limits(
        accounts=frozenset({B}),
        publish_now=False,
        states=frozenset({"draft", "scheduled"}),
        delete=False,
        update=True,
    )
    assert effective_limits(None, client) == effective_limits(client, None)
    assert effective_limits(None, None) is None
    assert effective_limits(route, LimitSettings()) == effective_limits(route, None)


def test_the_account_list_is_narrowed() -> None:
    """GET /accounts keeps only the allowed accounts; anything else is not narrowable."""
    answer = json.dumps([{"id": A, "name": "a"}, {"id": X, "name": "x"}]).encode()
    assert json.loads(filter_accounts(answer, frozenset({A})) or b"") == [{"id": A, "name": "a"}]
    wrapped = json.dumps({"accounts": [{"id": X}], "total": 1}).encode()
    assert json.loads(filter_accounts(wrapped, frozenset({A})) or b"") == {
        "accounts": [],
        "total": 1,
    }
    for bad in (b"<html>", b'[{"id": 1}]', b'{"id": "x"}', b'[{"id":"a","id":"b"}]'):
        assert filter_accounts(bad, frozenset({A})) is None


def test_the_audit_reads_accounts_on_any_route() -> None:
    """A create body's accounts are named for the audit line even without limits."""
    assert named_accounts("/posts/schedule", json.dumps(create(A, X, A)).encode()) == (A, X)
    assert named_accounts("/posts/schedule", b"not json") is None
    assert named_accounts("/media", json.dumps(create(A)).encode()) is None


def test_inspection_limit_is_256_kib() -> None:
    """The inspection limit is the documented 256 KiB."""
    assert INSPECT_LIMIT_BYTES == 262144


# --- properties -------------------------------------------------------------------------

ALLOWED_IDS = st.sampled_from([A, B])
ACCOUNT_WORDS = st.sampled_from(
    ["accounts", "Accounts", "ACCOUNTS", "account_ids", "account_id", "accountId", "social_account"]
)
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
JSON_ANY = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def create_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A documented create body whose accounts are all allowed."""
    posts = []
    for _ in range(draw(st.integers(1, 3))):
        ids = draw(st.lists(ALLOWED_IDS, min_size=1, max_size=3))
        posts.append(
            {"networks": {"facebook": {"type": "status", "text": draw(st.text(max_size=10))}},
             "accounts": [{"id": i, "scheduled_at": "2030-01-01T09:00Z"} for i in ids]}
        )  # fmt: skip
    return {"bulk": {"state": "scheduled", "posts": posts}}


def _containers(value: Any) -> list[Any]:
    """Every dict and list inside `value`, itself included."""
    found = [value] if isinstance(value, (dict, list)) else []
    children = list(value.values()) if isinstance(value, dict) else value
    for child in children if isinstance(children, list) else []:
        found += _containers(child)
    return found


@settings(max_examples=300, deadline=None)
@given(body=create_bodies(), data=st.data())
def test_a_forbidden_account_anywhere_is_denied(body: dict[str, Any], data: st.DataObject) -> None:
    """Whatever the create body, a forbidden account added where Publer could read an
    account (an entry, or a key naming accounts at any depth) makes the decision deny."""
    how = data.draw(st.sampled_from(["entry", "key"]))
    if how == "entry":
        post = data.draw(st.sampled_from(body["bulk"]["posts"]))
        entries = post["accounts"]
        entries.insert(data.draw(st.integers(0, len(entries))), {"id": X})
    else:
        dicts = [c for c in _containers(body) if isinstance(c, dict)]
        target = data.draw(st.sampled_from(dicts))
        forms = st.sampled_from([X, [X], [{"id": X}], {"id": X}])
        target[data.draw(ACCOUNT_WORDS)] = data.draw(forms)
    path = data.draw(st.sampled_from(["/posts", "/posts/schedule", "/posts/schedule/publish"]))
    decision = decide(call("POST", path, body), REGIONAL)
    assert decision.refusal is not None


def _publer_accounts(value: Any) -> set[str]:
    """Over-approximates what a Rails app could read as an account: every scalar below a
    key that names accounts, anywhere."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if "account" in key.casefold():
                found |= {str(s) for s in _scalars(item)}
            found |= _publer_accounts(item)
    elif isinstance(value, list):
        for item in value:
            found |= _publer_accounts(item)
    return found


def _scalars(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _scalars(item)]
    if isinstance(value, list):
        return [s for item in value for s in _scalars(item)]
    return [value]


@settings(max_examples=300, deadline=None)
@given(body=create_bodies(), extra=JSON_ANY, data=st.data())
def test_an_allowed_body_reaches_only_allowed_accounts(
    body: dict[str, Any], extra: Any, data: st.DataObject
) -> None:
    """For any body (a documented one with arbitrary JSON grafted in), an allowed decision
    means every account a Rails reader could find is an allowed one."""
    dicts = [c for c in _containers(body) if isinstance(c, dict)]
    target = data.draw(st.sampled_from(dicts))
    target[data.draw(st.text(max_size=10) | ACCOUNT_WORDS)] = extra
    decision = decide(call("POST", "/posts/schedule", body), REGIONAL)
    if decision.refusal is None:
        ids = {a["id"] for post in body["bulk"]["posts"] for a in post.get("accounts", [])}
        assert ids <= {A, B}
        assert _publer_accounts(body) <= {A, B, "2030-01-01T09:00Z"}


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_either_parse_strictly_or_are_refused(raw: bytes) -> None:
    """Arbitrary body bytes never crash the decision: it allows or refuses."""
    decision = decide(call("POST", "/posts/schedule", raw), REGIONAL)
    assert decision.refusal is None or decision.refusal.code in (
        "limit_denied",
        "body_uninspectable",
    )
    if decision.refusal is not None:
        assert json.loads(decision.refusal.body("rid"))["errors"]


@settings(max_examples=300, deadline=None)
@given(
    body=create_bodies(),
    extra=JSON_ANY,
    key=st.text(st.characters(exclude_categories=()), max_size=8),
)
def test_any_grafted_key_is_decided_and_rendered(
    body: dict[str, Any], extra: Any, key: str
) -> None:
    """Any key (surrogates included) grafted into a post is decided, and a refusal renders."""
    body["bulk"]["posts"][0][key] = extra
    raw = json.dumps(body).encode()
    decision = decide(call("POST", "/posts/schedule", raw), REGIONAL)
    if decision.refusal is not None:
        assert json.loads(decision.refusal.body("rid"))["code"] == decision.refusal.code


@settings(max_examples=200, deadline=None)
@given(query=st.binary(max_size=80))
def test_any_query_on_a_list_is_filtered_or_refused(query: bytes) -> None:
    """A list call on a limited route is refused, or carries a filter naming only allowed
    accounts (added by the proxy, or the client's own, all checked)."""
    decision = decide(call("GET", "/posts", query=query), REGIONAL)
    if decision.refusal is None:
        pairs = [
            (unquote_plus(name), unquote_plus(value))
            for name, _, value in (p.partition("=") for p in query.decode().split("&"))
        ]
        named = [value for name, value in pairs if "account" in name.casefold()]
        assert all(value in (A, B) for value in named)
        assert named or decision.add_query == f"account_ids[]={A}&account_ids[]={B}"


REPORT_PATHS = st.sampled_from(
    [
        "/analytics/{}/chart_data",
        "/analytics/{}/post_insights",
        "/analytics/{}/best_times",
        "/analytics/{}/hashtag_insights",
        "/analytics/{}/hashtag_performing_posts",
        "/competitors/{}",
        "/competitors/{}/analytics",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    template=REPORT_PATHS,
    account=st.sampled_from([A, B, X, A.upper(), A + "0", ""])
    | st.from_regex(r"[0-9a-f]{24}", fullmatch=True)
    | st.text(max_size=30),
)
def test_a_report_is_allowed_only_for_an_allowed_account(template: str, account: str) -> None:
    """The account segment of a per-account report passes only when it is, byte for byte,
    an allowed account."""
    decision = decide(call("GET", template.format(account)), REGIONAL)
    assert (decision.refusal is None) == (account in (A, B))


def test_limits_config_names_its_mistakes() -> None:
    """A bad account id or an unknown post state is a config error naming the key path."""
    base: dict[str, Any] = {
        "credentials": {"publer": {"path": "publer/api"}},
        "routes": [{"name": "r", "credential": "publer", "scopes": ["posts"]}],
    }
    for limits, where in (
        ({"accounts": ["ok", "not ok\n"]}, "routes.0.limits.accounts"),
        ({"accounts": [123]}, "routes.0.limits.accounts.0"),
        ({"posts": {"states": ["published"]}}, "routes.0.limits.posts.states.0"),
        ({"posts": {"publish_now": "sometimes"}}, "routes.0.limits.posts.publish_now"),
        ({"account": ["x"]}, "routes.0.limits.account"),
    ):
        base["routes"][0]["limits"] = limits
        with pytest.raises(ConfigError) as raised:
            parse_settings(base)
        assert any(p.startswith(where + ":") for p in raised.value.problems), raised.value.problems
