"""The one small interface every key source implements, and what they share.

A source reads one credential's key, synchronously: the credential store calls `read()`
from a worker thread, never on the event loop. Every failure is one exception whose
`kind` says what happened and whose `reason` is a sentence safe to log and to show. The
reason is the proxy's own words only (which source, how it failed: the HTTP status or
error class, what to do): a service's error text can quote a secret the proxy never read,
so it goes in `detail`, masked without knowing the secret, and only to the log:

    SourceError
      kind="unreachable"  the service cannot be reached, times out or answers 429/5xx
      kind="sealed"       Vault is sealed or not initialized
      kind="auth_failed"  no credentials to be found, or the service refused them
      kind="denied"       the identity is valid but may not read the key
      kind="not_found"    no such secret, field, file or variable
      kind="invalid"      the value does not look like an API key, or a file is unsafe
      kind="throttled"    the service asked to wait (`retry_after` seconds, when it said)
      kind="disabled"     the version is disabled
      kind="expired"      the version is past its expiry time
      kind="not_yet_valid" the version's activation time is still ahead

`drop_key` asks the credential store to stop serving the key it holds at once (its
version was disabled or expired), instead of serving it stale.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Literal, Protocol

from proxy.masking.secrets import mask_opaque

ErrorKind = Literal[
    "unreachable",
    "sealed",
    "denied",
    "not_found",
    "invalid",
    "auth_failed",
    "throttled",
    "disabled",
    "expired",
    "not_yet_valid",
]
SourceKind = Literal["vault", "aws_secrets_manager", "azure_key_vault", "file", "env"]

KEY_MIN_LENGTH = 16
KEY_MAX_LENGTH = 512
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
# The longest wait between two reads of a failing source that still serves a held key,
# before jitter (a quarter more at most): eight times the first wait, and at most an hour
# unless that first wait is longer.
READ_BACKOFF_GROWTH = 8.0
READ_BACKOFF_CEILING_SECONDS = 3600.0


class SourceError(Exception):
    """Reading a key failed; `reason` is safe to log and show, `kind` is what happened,
    `detail` the service's own error text (masked by `mask_opaque`), for the log only.
    `version` names the version of the secret that was refused (kind "invalid"), when the
    source tells versions apart: an AWS VersionId, a KV v2 version, a file's change.
    `retry_after` (seconds) is the source's own wait after throttling; `drop_key` asks the
    store to stop serving the key it holds (the version it came from was withdrawn)."""

    def __init__(
        self,
        reason: str,
        *,
        kind: ErrorKind,
        detail: str | None = None,
        version: int | str | None = None,
        retry_after: float | None = None,
        drop_key: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: ErrorKind = kind
        self.detail = mask_opaque(detail) if detail else None
        self.version = version
        self.retry_after = retry_after
        self.drop_key = drop_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, reason={self.reason!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        again = partial(
            type(self),
            kind=self.kind,
            detail=self.detail,
            version=self.version,
            retry_after=self.retry_after,
            drop_key=self.drop_key,
        )
        return (again, (self.reason,))


@dataclass(frozen=True)
class SecretRead:
    """One key as a source returned it: the value, its version in the source's own terms
    (a KV v2 version number, an AWS VersionId, a count of file contents seen; None when
    the source has no versions), when that version was written, when known, and when it
    stops being valid, when the source says (Key Vault's `exp`)."""

    value: str = field(repr=False)
    version: int | str | None
    created_time: datetime | None
    not_after: datetime | None = None


class KeySource(Protocol):
    """A place one credential's key is read from."""

    kind: SourceKind
    where: str  # for logs and `check`: a path, a secret id, a variable; never a secret
    poll_seconds: float | None  # how often `changed()` is worth asking; None: never
    calls_per_read: int  # calls one failing read may make to the service, retries included

    def read(self) -> SecretRead:
        """Read and check the key, or raise SourceError. Blocking: run it in a thread."""
        ...

    def changed(self) -> bool:
        """Cheap check between reads: True when the key may have changed since."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


def key_problem(value: str) -> str | None:
    """Why a trimmed value cannot be a Publer API key, or None when it can.

    Publer's documentation says only that a key is shown once and sent as
    `Authorization: Bearer-API <key>`; it gives no alphabet or length. So the bound is
    what an HTTP field value carries safely and what any generated key fits: visible
    ASCII (RFC 9110's VCHAR, no space or control), `KEY_MIN_LENGTH` to `KEY_MAX_LENGTH`
    characters. Anything else (a document pasted into the secret, a 60 kB value, a
    placeholder like `changeme`) is refused, and the key held before stays in use.
    """
    if not value:
        return "it is empty"
    if any(ch.isspace() for ch in value):
        return "it contains whitespace"
    if not all(0x21 <= ord(ch) <= 0x7E for ch in value):
        return "it contains characters that are not printable ASCII"
    if len(value) < KEY_MIN_LENGTH:
        return f"it is {len(value)} characters long; an API key has at least {KEY_MIN_LENGTH}"
    if len(value) > KEY_MAX_LENGTH:
        return f"it is {len(value)} characters long; an API key has at most {KEY_MAX_LENGTH}"
    return None


def read_backoff_seconds(
    failures: int,
    refresh_seconds: float,
    calls_per_read: int,
    *,
    usable_for: float | None,
) -> float:
    """Seconds before the next read of a source after `failures` failed reads in a row.

    The first wait is `refresh_seconds` times the calls one read may make (the SDK's own
    retries count), so a failing source is never asked more often than a healthy one.
    While a held key is still usable (`usable_for` seconds more), the wait doubles with
    each failure up to `READ_BACKOFF_GROWTH` times the first wait (at most
    `READ_BACKOFF_CEILING_SECONDS`, unless the first wait is longer), but not past the
    moment the key stops being usable, so one more read comes before requests are
    refused. Without a usable key (`usable_for` None: every request is refused) the wait
    starts at 1 s times the calls and doubles up to the first wait, so a source that
    comes back heals the proxy within one refresh. Jitter adds up to a quarter, never
    less, so replicas spread out.
    """
    calls = max(calls_per_read, 1)
    steady = refresh_seconds * calls
    doubled = 2.0 ** min(max(failures - 1, 0), 64)
    if usable_for is None:
        base = min(steady, BACKOFF_FIRST_SECONDS * calls * doubled)
        return base * random.uniform(1.0, 1.25)
    ceiling = max(steady, min(READ_BACKOFF_CEILING_SECONDS, steady * READ_BACKOFF_GROWTH))
    wait = min(ceiling, steady * doubled) * random.uniform(1.0, 1.25)
    return max(steady, min(wait, usable_for))


def backoff_seconds(attempt: int) -> float:
    """Delay before retry number `attempt` (1, 2, ...): exponential from 1 s, capped at
    5 min, with full jitter so that replicas do not retry in step."""
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2.0 ** max(attempt - 1, 0))
    return random.uniform(BACKOFF_FIRST_SECONDS, max(BACKOFF_FIRST_SECONDS, ceiling))
