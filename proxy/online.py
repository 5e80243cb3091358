"""`check --online`: read every key from its source and ask Publer if it works.

Publer's key guide says what a 401 or 403 means; this turns the answer into those words,
so whoever runs the check learns whether to rotate the key or fix its scopes.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TextIO

import httpx

from proxy.credentials import vault_session_maker
from proxy.logs import configure_logging
from proxy.outbound import publer_http_client
from proxy.redact import SecretRegistry, mask
from proxy.settings import CredentialSettings, LoggingSettings, Settings, UpstreamSettings
from proxy.sources import make_source
from proxy.sources.base import SecretRead, SourceError

PROBE_PATH = "/api/v1/workspaces"


def probe_key(upstream: UpstreamSettings, key: str) -> tuple[bool | None, str]:
    """Ask Publer whether `key` works: (True/False, sentence), or (None, why unknown)."""
    try:
        with publer_http_client(upstream) as client:
            response = client.get(
                upstream.url + PROBE_PATH, headers={"Authorization": f"Bearer-API {key}"}
            )
    except httpx.HTTPError as exc:
        return None, f"could not ask Publer at {upstream.url} ({type(exc).__name__})"
    status = response.status_code
    if status == 200:
        return True, "Publer accepts the key"
    if status == 401:
        return False, (
            "Publer rejects the key (401): it was revoked, has expired, or was mistyped;"
            " create a new key in Publer and put it where the credential's source reads it"
        )
    if status == 403:
        return False, (
            "Publer refuses the key (403): it lacks a scope (workspaces) or access to the"
            " workspace; give the key the scopes its routes need"
        )
    if status == 429:
        return None, "Publer's rate limit is spent right now (429); try again in two minutes"
    return None, f"Publer answered {status}"


def check_online(settings: Settings, out: TextIO | None = None) -> bool:
    """Print, per credential, its source, the masked key, its version and age, and
    Publer's verdict."""
    stream = out or sys.stdout
    secrets = SecretRegistry()
    for value in settings.secret_values():
        secrets.add(value)
    configure_logging(LoggingSettings(format="console", level="warning"), secrets, sys.stderr)

    def say(line: str) -> None:
        print(secrets.redact(line), file=stream)

    credentials = settings.credentials_in_use()
    make_vault, made_vault = vault_session_maker(settings.vault, secrets)
    if any(isinstance(cred, CredentialSettings) for cred in credentials.values()):
        session = make_vault()
        try:
            session.login()
        except SourceError as exc:
            say(f"vault: cannot log in ({settings.vault.auth.method}): {exc.reason}")
            return False
        say(f"vault: logged in at {settings.vault.url} ({session.auth_summary})")
    ok = True
    for name, credential in credentials.items():
        source = make_source(credential, secrets, make_vault)
        try:
            read = source.read()
        except SourceError as exc:
            say(
                f"credential {name}: cannot be read from {source.kind} {source.where}: {exc.reason}"
            )
            ok = False
            continue
        finally:
            source.close()
        say(
            f"credential {name}: key {mask(read.value)} from {source.kind} {source.where}"
            + _version_and_age(read, source.kind, credential.rotate_after_days)
        )
        works, sentence = probe_key(settings.upstream, read.value)
        say(f"credential {name}: {sentence}")
        if works is False:
            ok = False
    session_made = made_vault()
    if session_made is not None:
        session_made.close()
    return ok


def _version_and_age(read: SecretRead, kind: str, rotate_after_days: float) -> str:
    if kind == "vault":
        line = f", KV version {read.version}" if read.version is not None else ", KV v1"
    else:
        line = f", version {read.version}" if read.version is not None else ", unversioned"
    if read.created_time is not None:
        days = (datetime.now(UTC) - read.created_time).total_seconds() / 86400
        line += f", written {days:.1f} days ago"
        if days > rotate_after_days:
            line += f" (older than rotate_after_days={rotate_after_days:g}: rotate it)"
    return line
