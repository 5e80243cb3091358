"""Limits finer than Publer's scopes: which social accounts a call may act on, and what it
may do with posts. Pure: the request's method, path, query, a few header fields and the
body's bytes in, a `Decision` out; no I/O.

Publer's API reads its parameters the way a Rails app does: the body merged with the query
string (the query wins) and the path; form bodies, multipart and JSON synonyms become the
same parameters; `_method` in a form turns a POST into another method. So on a limited
route the proxy reads exactly one shape, strictly, and refuses every other:

- a body is JSON (`Content-Type: application/json`, charset UTF-8 at most), not
  compressed, at most `INSPECT_LIMIT_BYTES`, one parse with no duplicate key at any depth,
  no NaN or Infinity, no byte-order mark, no comment, nothing after the value; the bytes
  checked are the bytes forwarded;
- accounts are read only where Publer's docs put them: `bulk.posts[].accounts[].id` of
  the create calls, `account_ids[]` of `GET /posts`, the `{account_id}` path segment of
  the analytics and competitor reports. A key naming an account anywhere else (any case,
  any spelling that contains "account") is refused, as is a query on a write and any
  method override;
- a call whose accounts cannot be known (an update or delete by post id, a report over
  all accounts) is refused on a route limited to some accounts;
- header names are read as Rack reads them (`Content_Type` is a content type too), and a
  scheduled_at that must hold a post back is an ISO 8601 time: Rails reads a time it
  cannot parse as none;
- the one body not read, a media upload, must be uncompressed multipart/form-data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from proxy.config.settings import LimitSettings
from proxy.rules.headers import field_name
from proxy.rules.refusals import Refusal

# The largest request body read whole to be inspected; larger ones are refused.
INSPECT_LIMIT_BYTES = 256 * 1024
# The largest account list (GET /accounts) read whole to be narrowed.
FILTER_LIMIT_BYTES = 1024 * 1024

DRAFT_STATES = frozenset({"draft", "draft_public", "draft_private"})
POST_STATES = DRAFT_STATES | {"scheduled"}
# Drafts that belong to no social account (Publer's "workspace" and "private" drafts).
ACCOUNTLESS_STATES = frozenset({"draft_public", "draft_private"})
# Fields that set when a post goes out, besides publish-now's own path.
SCHEDULING_KEYS = frozenset(
    {"scheduled_at", "auto", "range", "share_next", "recycling", "recurring"}
)
METHOD_OVERRIDE_HEADERS = frozenset(
    {b"x-http-method-override", b"x-http-method", b"x-method-override"}
)
ACCOUNT_ENTRY_KEYS = frozenset({"id", "scheduled_at"})
CREATE_PATHS = frozenset({"/posts", "/posts/schedule", "/posts/schedule/publish"})
PUBLISH_NOW_PATH = "/posts/schedule/publish"
MEMBERS_PATH = "/analytics/members"
# The reports that take an account id as an optional path segment (none: all accounts).
ACCOUNT_REPORTS = frozenset(
    {"chart_data", "post_insights", "best_times", "hashtag_insights", "hashtag_performing_posts"}
)
_ACCOUNT_REPORT_RE = re.compile(r"/analytics/([^/]+)/([a-z_]+)")
_COMPETITOR_RE = re.compile(r"/competitors/([^/]+)(/analytics)?")
_POST_ID_RE = re.compile(r"/posts/([^/]+)")
_ACCOUNT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_BOM = b"\xef\xbb\xbf"
# An ISO 8601 date and time, as Publer's docs write scheduled_at; ASCII digits only.
_TIMESTAMP_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})?"
)


@dataclass(frozen=True)
class Limits:
    """The effective limits of one route and client: the accounts it may act on (None: all)
    and what it may do with posts (`states` None: any state)."""

    accounts: frozenset[str] | None = None
    publish_now: bool = True
    states: frozenset[str] | None = None
    delete: bool = True
    update: bool = True

    @property
    def schedules_limited(self) -> bool:
        """True when some way of sending a post out (now, or at a time) is not allowed."""
        return not self.publish_now or (self.states is not None and "scheduled" not in self.states)

    def describe(self) -> str:
        """One line for `check` and the status page."""
        accounts = "all" if self.accounts is None else ", ".join(sorted(self.accounts)) or "none"
        states = "any" if self.states is None else ", ".join(sorted(self.states)) or "none"
        yes_no = {True: "yes", False: "no"}
        return (
            f"accounts {accounts}; post states {states}; publish now {yes_no[self.publish_now]};"
            f" update {yes_no[self.update]}; delete {yes_no[self.delete]}"
        )


def effective_limits(route: LimitSettings | None, client: LimitSettings | None) -> Limits | None:
    """The route's limits narrowed by the client's (never widened); None: no limits at all.

    Accounts and states are the intersection of both lists; each permission holds only
    when both allow it.
    """
    found = [_from_settings(s) for s in (route, client) if s is not None]
    if not found:
        return None
    result = found[0]
    for other in found[1:]:
        result = Limits(
            accounts=_meet(result.accounts, other.accounts),
            publish_now=result.publish_now and other.publish_now,
            states=_meet(result.states, other.states),
            delete=result.delete and other.delete,
            update=result.update and other.update,
        )
    return result


def _meet(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    return a if b is None else a & b


def _from_settings(settings: LimitSettings) -> Limits:
    posts = settings.posts
    return Limits(
        accounts=None if settings.accounts is None else frozenset(settings.accounts),
        publish_now=posts.publish_now,
        states=None if posts.states is None else frozenset(posts.states),
        delete=posts.delete,
        update=posts.update,
    )


@dataclass(frozen=True)
class LimitedCall:
    """What the limit decision reads of one request (its path already checked safe)."""

    method: str
    path: str  # relative to /api/v1, such as /posts/schedule
    raw_query: bytes  # without '?'
    headers: Sequence[tuple[bytes, bytes]]  # raw (name, value) pairs, as received
    body: bytes | None  # the whole body, or None when there is none


@dataclass(frozen=True)
class Decision:
    """A refusal, or how to forward: the accounts the call acts on (for the audit line;
    None: not known), a query to append (the account filter of `GET /posts`), and whether
    the answer is an account list to narrow."""

    refusal: Refusal | None
    accounts: tuple[str, ...] | None = None
    add_query: str = ""
    filter_response: bool = False


def streams_body(method: str, path: str) -> bool:
    """True for the one call whose body is not inspected: a media upload (multipart, up to
    200 MB), which creates a file in the media library and names no account."""
    return method == "POST" and path == "/media"


def _deny(message: str) -> Decision:
    return Decision(Refusal.of("limit_denied", _printable(message)))


def _unreadable(message: str) -> Decision:
    return Decision(Refusal.of("body_uninspectable", _printable(message)))


def _printable(message: str) -> str:
    """The message with what the client sent made safe to echo: JSON keys may hold lone
    surrogates (`\\ud800`), which no UTF-8 encoder accepts."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def decide(call: LimitedCall, limits: Limits) -> Decision:
    """Whether a call may go on a route with `limits`, and how it is forwarded."""
    for name, _ in call.headers:
        if field_name(name) in METHOD_OVERRIDE_HEADERS:
            return _deny(
                f"the {name.decode('latin-1')} header is refused on a limited route: send the"
                " method itself"
            )
    if b";" in call.raw_query:
        return _deny(
            "a ';' in the query string is refused on a limited route: query parsers disagree"
            " about whether it separates parameters; use '&'"
        )
    query = _query_pairs(call.raw_query)
    if isinstance(query, Decision):
        return query
    if any(key.lower() == "_method" for key, _ in query):
        return _deny("a _method parameter is refused on a limited route: send the method itself")
    path, method = call.path, call.method
    writes = method in ("POST", "PUT", "PATCH") and not streams_body(method, path)
    if writes and call.raw_query:
        return _deny(
            f"a query string on {method} {path} is refused on a limited route: Publer would"
            " merge it into the body's parameters; put everything in the JSON body"
        )
    refused = _query_accounts(query, path, method, limits)
    if refused is not None:
        return refused
    if streams_body(method, path) and not _is_upload(call.headers):
        return _unreadable(
            f"{method} {path} takes a multipart/form-data upload on a limited route, sent"
            " uncompressed: its body is not read, so no other type (forms, JSON) may carry"
            " parameters past the proxy"
        )
    body: Any = None
    if call.body is not None and not streams_body(method, path):
        if method in ("GET", "HEAD", "DELETE"):
            return _unreadable(
                f"a body on {method} {path} is refused on a limited route: Publer would read"
                " parameters from it; send none"
            )
        body = parse_json_body(call.headers, call.body)
        if isinstance(body, Decision):
            return body
    if method == "POST" and path in CREATE_PATHS:
        return _create(path, body, call.body is not None, limits)
    # Rails routes PATCH to the same update as PUT.
    if method in ("PUT", "PATCH") and _POST_ID_RE.fullmatch(path):
        return _update(body, call.body is not None, limits)
    if method == "DELETE" and (path == "/posts" or _POST_ID_RE.fullmatch(path)):
        return _delete(limits)
    if body is not None:
        # Another JSON write (media from a URL): it names no account, or it is refused.
        found = _account_keys(body, "body")
        if found:
            return _deny(f"{found} names an account in a form the proxy does not read")
    if method in ("GET", "HEAD"):
        return _read(method, path, query, limits)
    return Decision(None)


# --- reads -----------------------------------------------------------------------------


def _read(method: str, path: str, query: list[tuple[str, str]], limits: Limits) -> Decision:
    allowed = limits.accounts
    if allowed is None:
        return Decision(None)
    if path == "/accounts" or re.fullmatch(r"/workspaces/[^/]+/media_options", path):
        if method == "HEAD":
            # Its Content-Length would be the whole list's.
            return _deny(f"HEAD {path} cannot be narrowed to this route's accounts; use GET")
        return Decision(None, filter_response=True)
    if path == "/posts":
        if any(key == "account_ids[]" for key, _ in query):
            return Decision(None)
        if not allowed:
            return _deny("this route may see no account, so it has no posts to list")
        return Decision(None, add_query="&".join(f"account_ids[]={a}" for a in sorted(allowed)))
    if path == MEMBERS_PATH:
        named = [value for key, value in query if key == "account_id"]
        if len(named) == 1:
            return Decision(None, accounts=(named[0],))
    all_accounts = (
        path in (MEMBERS_PATH, "/competitors", "/competitors/analytics")
        or path.removeprefix("/analytics/") in ACCOUNT_REPORTS
    )
    if all_accounts:
        return _deny(
            f"{path} covers every account of the workspace; this route is limited to some"
            " accounts: call the report of one account, /analytics/{account_id}/... or"
            " /competitors/{account_id}"
        )
    report = _ACCOUNT_REPORT_RE.fullmatch(path) or _COMPETITOR_RE.fullmatch(path)
    if report is not None:
        account = report.group(1)
        if account not in allowed:
            return _deny(f"account {account!r} is not one this route may act on")
        return Decision(None, accounts=(account,))
    if path.startswith(("/analytics/", "/competitors")) and path != "/analytics/charts":
        return _deny(f"{path} is not a report form the proxy reads an account from")
    return Decision(None)


def _query_pairs(raw: bytes) -> list[tuple[str, str]] | Decision:
    """The query's (name, value) pairs, decoded as Rack decodes them."""
    pairs: list[tuple[str, str]] = []
    try:
        text = raw.decode("ascii")
        for part in text.split("&"):
            if not part:
                continue
            name, _, value = part.partition("=")
            pairs.append(
                (unquote_plus(name, errors="strict"), unquote_plus(value, errors="strict"))
            )
    except UnicodeError:
        return _deny("the query string is not UTF-8 once decoded; the proxy cannot read it")
    return pairs


def _query_accounts(
    query: list[tuple[str, str]], path: str, method: str, limits: Limits
) -> Decision | None:
    """A refusal when the query names an account other than as `GET /posts` filters."""
    if limits.accounts is None:
        return None
    for key, value in query:
        if "account" not in key.casefold():
            continue
        documented = (key, path) in (("account_ids[]", "/posts"), ("account_id", MEMBERS_PATH))
        if not documented or method not in ("GET", "HEAD"):
            return _deny(
                f"the query parameter {key!r} names an account in a form the proxy does not"
                " read; only GET /posts takes account_ids[] and GET /analytics/members"
                " account_id"
            )
        if value not in limits.accounts:
            return _deny(f"account {value!r} is not one this route may act on")
    return None


# --- writes ----------------------------------------------------------------------------


def parse_json_body(headers: Sequence[tuple[bytes, bytes]], body: bytes) -> Any:
    """The body as JSON, parsed once and strictly, or a Decision refusing it."""
    # Names compared as Rack reads them: `Content_Type` reaches Publer as a content type too.
    encodings = [v for n, v in headers if field_name(n) == b"content-encoding"]
    if encodings:
        return _unreadable(
            "a compressed request body (Content-Encoding) is refused on a limited route: the"
            " proxy reads bodies before they go; send it uncompressed"
        )
    types = [v for n, v in headers if field_name(n) == b"content-type"]
    if len(types) != 1 or not _is_plain_json(types[0]):
        return _unreadable(
            "on a limited route a request body must be JSON sent as"
            " Content-Type: application/json (charset utf-8 at most): other types (forms,"
            " multipart, text, JSON synonyms) are refused because Publer would read"
            " parameters from them that the proxy does not"
        )
    if body.startswith(_BOM):
        return _unreadable("the JSON body starts with a byte-order mark; send plain UTF-8")
    try:
        return json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as exc:
        return _unreadable(
            f"the JSON body has the key {exc.args[0]!r} twice in one object; parsers disagree"
            " about which one wins, so the proxy refuses it"
        )
    except (ValueError, RecursionError):
        return _unreadable(
            "the body is not one strict JSON value (comments, NaN, Infinity, trailing data and"
            " invalid UTF-8 are refused); send plain JSON"
        )


def _is_upload(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True for one multipart/form-data Content-Type and no Content-Encoding."""
    types = [v for n, v in headers if field_name(n) == b"content-type"]
    if any(field_name(n) == b"content-encoding" for n, _ in headers) or len(types) != 1:
        return False
    media_type = types[0].decode("latin-1").split(";")[0]
    return media_type.strip(" \t").lower() == "multipart/form-data"


def _is_plain_json(value: bytes) -> bool:
    media_type, *params = value.decode("latin-1").split(";")
    if media_type.strip().lower() != "application/json":
        return False
    for param in params:
        name, _, val = param.strip().partition("=")
        if name.strip().lower() != "charset" or val.strip().strip('"').lower() != "utf-8":
            return False
    return True


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _walk(value: Any) -> Iterator[tuple[str, tuple[str | int, ...]]]:
    """Every object key below `value` with the path of the object holding it; iterative,
    so neither depth nor size costs more than one visit of each value."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, item in node.items():
                yield key, path
                if isinstance(item, (dict, list)):
                    stack.append((item, (*path, key)))
        elif isinstance(node, list):
            for index, item in enumerate(node):
                if isinstance(item, (dict, list)):
                    stack.append((item, (*path, index)))


def _at(where: str, path: tuple[str | int, ...], key: str) -> str:
    """`where` followed by `path` and `key`, as `bulk.posts[0].networks.x`."""
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*path, key)]
    return where + "".join(parts)


def _first_key(value: Any, where: str, names: Callable[[str], bool]) -> str | None:
    """Where the first key below `value` whose case-folded name `names` accepts is."""
    for key, path in _walk(value):
        if names(key.casefold()):
            return _at(where, path, key)
    return None


def _names_account(folded: str) -> bool:
    return "account" in folded or folded == "_method"


def _account_keys(value: Any, where: str) -> str | None:
    """Where the first key below `value` that names an account or overrides the method is."""
    return _first_key(value, where, _names_account)


def _create(path: str, body: Any, has_body: bool, limits: Limits) -> Decision:
    if not has_body:
        return _unreadable(f'POST {path} needs its JSON body ({{"bulk": ...}})')
    if not isinstance(body, dict) or set(body) != {"bulk"}:
        return _deny(
            'a create call\'s body is {"bulk": {"state": ..., "posts": [...]}} and nothing'
            " else on a limited route"
        )
    bulk = body["bulk"]
    if not isinstance(bulk, dict) or set(bulk) - {"state", "posts"}:
        return _deny('bulk holds "state" and "posts" only on a limited route')
    state = bulk.get("state")
    if state not in POST_STATES:
        return _deny(f"bulk.state must be one of {', '.join(sorted(POST_STATES))}")
    if limits.states is not None and state not in limits.states:
        return _deny(f"posts in state {state!r} are not allowed on this route")
    publish = path == PUBLISH_NOW_PATH
    if publish and limits.schedules_limited:
        return _deny("publishing at once (/posts/schedule/publish) is not allowed on this route")
    posts = bulk.get("posts")
    if not isinstance(posts, list) or not posts:
        return _deny("bulk.posts must be a non-empty list of posts")
    named: list[str] = []
    for index, post in enumerate(posts):
        where = f"bulk.posts[{index}]"
        refused = _check_post(post, where, state, publish, limits, named)
        if refused is not None:
            return refused
    return Decision(None, accounts=tuple(dict.fromkeys(named)))


def _check_post(
    post: Any, where: str, state: str, publish: bool, limits: Limits, named: list[str]
) -> Decision | None:
    if not isinstance(post, dict):
        return _deny(f"{where} must be an object")
    restates = limits.states is not None or not limits.publish_now
    untimed = state in DRAFT_STATES and limits.schedules_limited
    # One walk of the post for every key rule (a 256 KiB body has thousands of keys).
    for key, path in _walk(post):
        folded = key.casefold()
        in_accounts = path[:1] == ("accounts",) or (not path and key == "accounts")
        if not in_accounts and _names_account(folded):
            at = _at(where, path, key)
            return _deny(f"{at} names an account in a form the proxy does not read")
        if restates and folded == "state":
            at = _at(where, path, key)
            return _deny(f"{at}: a post's state is bulk.state alone on this route")
        if untimed and folded in SCHEDULING_KEYS:
            return _deny(f"{_at(where, path, key)}: a draft on this route carries no schedule")
    accounts = post.get("accounts")
    if accounts is None or accounts == []:
        if state in ACCOUNTLESS_STATES:
            return None
        if limits.accounts is not None:
            return _deny(f"{where} names no account; name the accounts in {where}.accounts")
        return None
    if not isinstance(accounts, list):
        return _deny(f'{where}.accounts must be a list of {{"id": ...}} objects')
    for index, account in enumerate(accounts):
        at = f"{where}.accounts[{index}]"
        if not isinstance(account, dict) or "id" not in account:
            return _deny(f'{at} must be an object with the account\'s "id"')
        extra = account.keys() - ACCOUNT_ENTRY_KEYS
        if extra:
            return _deny(f"{at}.{min(extra)} is not a field the proxy reads in an account entry")
        account_id = account["id"]
        if not isinstance(account_id, str) or not _ACCOUNT_ID_RE.fullmatch(account_id):
            return _deny(f"{at}.id must be an account id written as a JSON string")
        if limits.accounts is not None and account_id not in limits.accounts:
            return _deny(f"account {account_id!r} is not one this route may act on")
        if not isinstance(account.get("scheduled_at", ""), str | None):
            # Keys nested in it would be read by no rule above.
            return _deny(f"{at}.scheduled_at must be a time written as a JSON string")
        held_back = not limits.publish_now and state == "scheduled" and not publish
        timed = post.get("auto") is True or _is_time(account.get("scheduled_at"))
        if held_back and not timed:
            return _deny(
                f"{at} has no scheduled_at written as an ISO 8601 time"
                " (2030-01-01T09:00:00Z): a scheduled post without one may go out at once,"
                " which this route may not do"
            )
        named.append(account_id)
    return None


def _is_time(value: Any) -> bool:
    """True for an ISO 8601 date and time written as a JSON string: Rails reads a time it
    cannot parse as none, and a scheduled post without a time goes out at once."""
    if not isinstance(value, str) or not _TIMESTAMP_RE.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:  # a month 13, a 25th hour
        return False
    return True


def _update(body: Any, has_body: bool, limits: Limits) -> Decision:
    if not limits.update:
        return _deny("updating posts is not allowed on this route")
    if limits.accounts is not None:
        return _deny(
            "an update by post id is refused on a route limited to some accounts: the proxy"
            " cannot tell which account the post belongs to"
        )
    if has_body:
        found = _account_keys(body, "body")
        if found:
            return _deny(f"{found} names an account in a form the proxy does not read")
        if limits.schedules_limited:
            timed = _first_key(body, "body", (SCHEDULING_KEYS | {"state"}).__contains__)
            if timed:
                return _deny(f"{timed}: this route may not change when a post goes out")
    return Decision(None)


def _delete(limits: Limits) -> Decision:
    if not limits.delete:
        return _deny("deleting posts is not allowed on this route")
    if limits.accounts is not None:
        return _deny(
            "a delete by post id is refused on a route limited to some accounts: the proxy"
            " cannot tell which account the post belongs to"
        )
    return Decision(None)


# --- answers and the audit ---------------------------------------------------------------


def filter_accounts(body: bytes, allowed: frozenset[str]) -> bytes | None:
    """An account list (`[{"id": ...}, ...]`, or an object holding it under "accounts"
    beside scalar fields such as a total) narrowed to `allowed`; None when the body is not
    such a list."""
    parsed = parse_json_body([(b"content-type", b"application/json")], body)
    if isinstance(parsed, Decision):
        return None
    if isinstance(parsed, dict) and any(
        isinstance(value, (dict, list)) for key, value in parsed.items() if key != "accounts"
    ):
        return None  # another list beside it could hold other accounts, unfiltered
    items = parsed.get("accounts") if isinstance(parsed, dict) else parsed
    if not isinstance(items, list) or not all(
        isinstance(item, dict) and isinstance(item.get("id"), str) for item in items
    ):
        return None
    kept = [item for item in items if item["id"] in allowed]
    narrowed = {**parsed, "accounts": kept} if isinstance(parsed, dict) else kept
    return json.dumps(narrowed, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def named_accounts(path: str, body: bytes) -> tuple[str, ...] | None:
    """The accounts a create call's JSON body names, for the audit line of a route without
    limits; None when the body is not the documented shape."""
    if path not in CREATE_PATHS:
        return None
    parsed = parse_json_body([(b"content-type", b"application/json")], body)
    bulk = parsed.get("bulk") if isinstance(parsed, dict) else None
    posts = bulk.get("posts") if isinstance(bulk, dict) else None
    if not isinstance(posts, list):
        return None
    found = [
        str(account["id"])
        for post in posts
        if isinstance(post, dict) and isinstance(post.get("accounts"), list)
        for account in post["accounts"]
        if isinstance(account, dict) and "id" in account
    ]
    return tuple(dict.fromkeys(found))
