"""Masking and redaction of secrets.

Every secret the process learns (API keys, Vault tokens, AppRole secret ids) is added to
one `SecretRegistry`; the last structlog processor and every error path pass their text
through `redact`, so a secret cannot reach any output even when a bug puts it in a message.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import unquote, urlsplit

MASK = "***"
# Below this length a value is too short to be a secret and redacting it would mangle text.
MIN_SECRET_LENGTH = 6


def mask(value: str | None) -> str | None:
    """`***` plus the last 4 characters, the only form in which a key may be shown."""
    if value is None:
        return None
    return MASK + value[-4:] if len(value) > 8 else MASK


# A run of the characters keys and tokens are made of (base64, hex, URL-safe), long enough
# to be one: a Vault token is 28+, an AWS secret key 40, a Publer key longer still.
_OPAQUE = re.compile(r"[A-Za-z0-9+/=_.~-]{16,}")
OPAQUE_MASK = "[masked]"
MAX_FOREIGN_TEXT = 200


def mask_opaque(text: str) -> str:
    """Foreign text (another service's error message) made fit for the log without knowing
    which secrets it may quote: every long run of token characters that holds a digit, or
    is 32 characters or more, is replaced by `[masked]`; control characters become spaces,
    runs of blanks one space; the result is at most 200 characters."""

    def masked(found: re.Match[str]) -> str:
        run = found.group(0)
        return OPAQUE_MASK if len(run) >= 32 or any(c.isdigit() for c in run) else run

    flat = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(_OPAQUE.sub(masked, flat).split())[:MAX_FOREIGN_TEXT]


def masked_url(url: str | None) -> str | None:
    """The URL with the password of its user info shown as `***`, for logs and messages."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, _ = parts.netloc.rpartition("@")[0].partition(":")
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:{MASK}@{host}").geturl()


def url_secrets(url: str | None) -> list[str]:
    """The password in a URL's user info, as written and percent-decoded, to register."""
    if url is None:
        return []
    password = urlsplit(url).password
    if not password:
        return []
    return [password, unquote(password)]


def _same_length_mask(value: str, encoded: bytes) -> bytes:
    tail = value[-4:].encode("utf-8", "replace") if len(value) > 8 else b""
    return b"*" * (len(encoded) - len(tail)) + tail


class SecretRegistry:
    """The set of secret values the process knows; thread-safe (hvac runs in threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        # UTF-8 forms and their masks, longest first, for bytes on their way to a client.
        self._encoded: tuple[tuple[bytes, bytes], ...] = ()
        self._same_length: tuple[tuple[bytes, bytes], ...] = ()

    def add(self, value: str | None) -> None:
        """Remember a secret so that it is redacted from every output from now on."""
        if not value or len(value) < MIN_SECRET_LENGTH or value in self._values:
            return
        with self._lock:
            values = self._values | {value}
            ordered = sorted(values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
            self._encoded = tuple(
                (v.encode("utf-8", "surrogatepass"), (mask(v) or MASK).encode("utf-8", "replace"))
                for v in ordered
            )
            self._same_length = tuple(
                (encoded, _same_length_mask(v, encoded))
                for v, (encoded, _) in zip(ordered, self._encoded, strict=True)
            )
            self._values = values

    def redact(self, text: str) -> str:
        """The text with every known secret replaced by its masked form."""
        pattern = self._pattern
        if pattern is None:
            return text
        return pattern.sub(lambda m: mask(m.group(0)) or MASK, text)

    def redact_bytes(self, data: bytes) -> bytes:
        """The bytes with every known secret replaced by its masked form.

        `bytes.replace` per secret, not a regular expression: about ten times faster on a
        64 KiB body, and what a response on its way back to a client costs.
        """
        for value, masked in self._encoded:
            if value in data:
                data = data.replace(value, masked)
        return data

    def same_length_masks(self) -> tuple[tuple[bytes, bytes], ...]:
        """Each secret's UTF-8 form, longest first, with a mask of the same length: `*`s,
        then the last 4 characters a mask shows. For a body whose length is already sent."""
        return self._same_length

    def __contains__(self, value: object) -> bool:
        return value in self._values

    def __repr__(self) -> str:
        return f"SecretRegistry({len(self._values)} values)"
