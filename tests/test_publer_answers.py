"""What Publer's 401 and 403 mean, read from status and message together."""

from __future__ import annotations

import json

import pytest

from proxy.rules.publer import (
    Rejection,
    error_messages,
    rate_limit_window,
    rejection,
    rejection_hint,
)


def _body(*messages: str) -> bytes:
    return json.dumps({"errors": list(messages)}).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # Publer's API reference: a bad key is 401, a workspace or scope problem 403.
        (401, _body("Missing or invalid API key."), Rejection.KEY),
        (401, _body("This API key has been revoked."), Rejection.KEY),
        (403, _body("This endpoint needs the Publer-Workspace-Id header."), Rejection.WORKSPACE),
        (403, _body("This API key has no access to that workspace."), Rejection.WORKSPACE),
        (403, _body("This API key is missing the 'posts' scope."), Rejection.SCOPE),
        # Recorded from the live API: the statuses the other way round.
        (403, _body("Invalid API key or not active for this account."), Rejection.KEY),
        (401, _body("You don't have access on this workspace"), Rejection.WORKSPACE),
        # Other envelopes and no message at all: the status decides, as documented.
        (403, b'{"error": "Invalid API key or not active for this account."}', Rejection.KEY),
        (401, b"Unauthorized", Rejection.KEY),
        (401, b"", Rejection.KEY),
        (403, b"", Rejection.SCOPE),
        (403, _body("Permission denied - requires analytics access"), Rejection.SCOPE),
        (200, _body("Invalid API key"), None),
        (429, b'{"error": "Rate limit exceeded. Retry later."}', None),
    ],
)
def test_rejection_reads_status_and_message(
    status: int, body: bytes, expected: Rejection | None
) -> None:
    """Both the documented and the recorded live answers name the right cause."""
    assert rejection(status, body) is expected


def test_error_messages_joins_publer_envelopes() -> None:
    """`errors` lists, an `error` string, and non-JSON bodies all give their text."""
    assert error_messages(_body("a", "b")) == "a b"
    assert error_messages(b'{"errors": "one"}') == "one"
    assert error_messages(b"<html>nope</html>") == "<html>nope</html>"


@pytest.mark.parametrize(
    ("found", "words"),
    [
        (Rejection.KEY, "key rejected"),
        (Rejection.WORKSPACE, "workspace rejected"),
        (Rejection.SCOPE, "missing scope"),
    ],
)
def test_hint_names_the_cause(found: Rejection, words: str) -> None:
    """The hint header starts with the cause, in words an app team can act on."""
    hint = rejection_hint(
        found, credential="publer", scope="posts", workspace="ws1", needs_workspace=True
    )
    assert hint.startswith(words)
    assert hint.isascii()


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # Documented: the reset is the UNIX time the window resets.
        ([(b"x-ratelimit-remaining", b"7"), (b"x-ratelimit-reset", b"1800000030")], (7, 30.0)),
        # A small reset is already a number of seconds.
        ([(b"x-ratelimit-reset", b"12"), (b"x-ratelimit-remaining", b"0")], (0, 12.0)),
        # Repeated: the last of each counts.
        (
            [
                (b"x-ratelimit-remaining", b"9"),
                (b"x-ratelimit-reset", b"5"),
                (b"x-ratelimit-remaining", b"3"),
            ],
            (3, 5.0),
        ),
        ([(b"x-ratelimit-remaining", b"7")], None),
        ([(b"x-ratelimit-reset", b"30")], None),
        ([(b"x-ratelimit-remaining", b"many"), (b"x-ratelimit-reset", b"30")], None),
        ([(b"x-ratelimit-remaining", b"7"), (b"x-ratelimit-reset", b"soon")], None),
        ([], None),
    ],
)
def test_rate_limit_window(
    headers: list[tuple[bytes, bytes]], expected: tuple[int, float] | None
) -> None:
    """Publer's X-RateLimit-Remaining and -Reset give what is left and when it resets."""
    assert rate_limit_window(headers, NOW) == expected
