"""The one small interface every key source implements, and what they share.

A source reads one credential's key, synchronously: the credential store calls `read()`
from a worker thread, never on the event loop. Every failure is one exception whose
`kind` says what happened and whose `reason` is a sentence safe to log and to show:

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

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0


class SourceError(Exception):
    """Reading a key failed; `reason` is safe to log and show, `kind` is what happened."""

    def __init__(
        self,
        reason: str,
        *,
        kind: ErrorKind,
        retry_after: float | None = None,
        drop_key: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: ErrorKind = kind
        self.retry_after = retry_after
        self.drop_key = drop_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, reason={self.reason!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        again = partial(
            type(self), kind=self.kind, retry_after=self.retry_after, drop_key=self.drop_key
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
    """Why a trimmed value does not look like an API key, or None when it does."""
    if not value:
        return "it is empty"
    if any(ch.isspace() for ch in value):
        return "it contains whitespace"
    if not all(0x21 <= ord(ch) <= 0x7E for ch in value):
        return "it contains characters that are not printable ASCII"
    return None


def backoff_seconds(attempt: int) -> float:
    """Delay before retry number `attempt` (1, 2, ...): exponential from 1 s, capped at
    5 min, with full jitter so that replicas do not retry in step."""
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2.0 ** max(attempt - 1, 0))
    return random.uniform(BACKOFF_FIRST_SECONDS, max(BACKOFF_FIRST_SECONDS, ceiling))
