"""What Publer's responses mean: which part of a request a 401 or 403 rejects, and how
much of the rate-limit window its `X-RateLimit-*` headers say is left.

Publer's API reference (https://publer.com/docs) rejects a key it does not accept with
401 and a missing or foreign workspace with 403. The live API has been recorded
responding the other way round: 403 "Invalid API key or not active for this account."
for a wrong or revoked key, and 401 "You don't have access on this workspace" for a
wrong or missing workspace. The status
alone cannot tell them apart, so the decision reads the status and Publer's message
together: the message names what was rejected, the status decides only when the message
says nothing. Pure functions, no I/O: the forwarder (re-read the key, `X-Publer-Proxy-Hint`)
and `check --online` call them with what Publer responded.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable

REJECTION_STATUSES = frozenset({401, 403})
# Publer's error bodies are a line or two; more than this is not an error message.
MAX_MESSAGE_BYTES = 64 * 1024

# A reset above this is a UNIX time (after 2001), not a number of seconds.
_EPOCH_2001 = 1_000_000_000

_SCOPE = re.compile(r"\bscopes?\b")
_WORKSPACE = re.compile(r"\bworkspaces?\b")
_KEY = re.compile(r"\b(api[ _-]?key|token|bearer|authori[sz]ation)\b")


class Rejection(enum.Enum):
    """What Publer refused in a 401 or 403."""

    KEY = "key"  # the key itself: wrong, revoked, expired, not active
    WORKSPACE = "workspace"  # the workspace: missing, or not one the key's user can use
    SCOPE = "scope"  # a key that works, without the scope (or plan) the endpoint needs


def error_messages(body: bytes) -> str:
    """Publer's error text: the `errors` list (or `error` string) of a JSON body, joined;
    the body itself when it is not JSON."""
    text = body[:MAX_MESSAGE_BYTES].decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()
    found: list[str] = []
    if isinstance(data, dict):
        for field in ("errors", "error", "message"):
            value = data.get(field)
            if isinstance(value, str):
                found.append(value)
            elif isinstance(value, list):
                found.extend(str(item) for item in value if isinstance(item, str | int | float))
    elif isinstance(data, str):
        found.append(data)
    return " ".join(found) if found else text.strip()


def rejection(status: int, body: bytes) -> Rejection | None:
    """What a Publer response rejects, or None when it is not a 401/403.

    The message decides first, in this order: a scope named ("missing the 'posts'
    scope") is a key that works; a workspace named ("You don't have access on this
    workspace") is the workspace, whatever the status; a key named ("Invalid API key or
    not active for this account.") is the key. A message that names none of them
    falls back on the documented meaning of the status: 401 the key, 403 a scope.
    """
    if status not in REJECTION_STATUSES:
        return None
    text = error_messages(body).lower()
    if _SCOPE.search(text):
        return Rejection.SCOPE
    if _WORKSPACE.search(text):
        return Rejection.WORKSPACE
    if _KEY.search(text):
        return Rejection.KEY
    return Rejection.KEY if status == 401 else Rejection.SCOPE


def rejection_hint(
    found: Rejection,
    *,
    credential: str,
    scope: str | None,
    workspace: str | None,
    needs_workspace: bool,
) -> str:
    """One sentence for `X-Publer-Proxy-Hint`: what Publer rejected and whom to ask."""
    if found is Rejection.KEY:
        return (
            f"key rejected: Publer does not accept the key of credential '{credential}'"
            " (revoked, expired, mistyped or not active); ask the proxy operator to check it"
        )
    if found is Rejection.WORKSPACE:
        if workspace is None and needs_workspace:
            return "missing workspace: the route sets no Publer-Workspace-Id for this endpoint"
        return (
            f"workspace rejected: the key of credential '{credential}' has no access to"
            f" workspace '{workspace}'; ask the proxy operator to check the route's workspace"
        )
    return (
        f"missing scope: the key of credential '{credential}' works but may lack scope"
        f" '{scope}' (or the plan) this endpoint needs; ask the proxy operator"
    )


def rate_limit_window(
    headers: Iterable[tuple[bytes, bytes]], now: float
) -> tuple[int, float] | None:
    """(requests left, seconds until the window resets) from a response's headers.

    Reads `X-RateLimit-Remaining` and `X-RateLimit-Reset` (names lower case, as ASGI and
    aiohttp give them; the last of each counts), per Publer's rate-limit documentation
    (https://publer.com/docs). The reset is documented as the UNIX time the window resets
    and converted with `now` (UNIX seconds); a small value is taken as seconds already.
    None when either header is missing or is not a number.
    """
    remaining = reset = None
    for name, value in headers:
        if name == b"x-ratelimit-remaining":
            remaining = value
        elif name == b"x-ratelimit-reset":
            reset = value
    if remaining is None or reset is None:
        return None
    try:
        left, seconds = int(remaining), float(reset)
    except ValueError:
        return None
    if seconds > _EPOCH_2001:
        seconds -= now
    return left, seconds
