"""`check --online`: read every key from its source and ask Publer if it works.

Each key is asked about an endpoint its routes allow (a least-privilege key without the
`workspaces` scope is still alive), and Publer's 401 or 403 is read from status and
message together (`proxy.rules.publer`), so whoever runs the check learns whether to rotate
the key, fix a workspace, or add a scope. Publer unreachable, a TLS failure or a 5xx is
a failed check: nothing was verified.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

import httpx

from proxy.config.settings import (
    CredentialSettings,
    LoggingSettings,
    RouteSettings,
    Settings,
    UpstreamSettings,
)
from proxy.keys.outbound import publer_http_client, publer_request
from proxy.keys.sources import make_source
from proxy.keys.sources.base import SecretRead, SourceError
from proxy.keys.store import vault_session_maker
from proxy.masking.secrets import SecretRegistry, mask
from proxy.records.log_setup import configure_logging
from proxy.rules.publer import Rejection, rejection

# What to ask Publer, per scope, cheapest first: (path, whether it takes the workspace).
# Any response but a rejected key or workspace proves the key alive, so a job id that does
# not exist (404) is as good a probe as a listing.
PROBES: tuple[tuple[str, str, bool], ...] = (
    ("users", "/api/v1/users/me", False),
    ("workspaces", "/api/v1/workspaces", False),
    ("accounts", "/api/v1/accounts", True),
    ("analytics", "/api/v1/analytics/charts", True),
    ("locations", "/api/v1/locations?q=a", True),
    ("posts", "/api/v1/posts?page=0", True),
    ("media", "/api/v1/media?page=0", True),
    ("job_status", "/api/v1/job_status/000000000000000000000000", True),
)


@dataclass(frozen=True)
class Probe:
    """Where to ask Publer about a key: a path within a route's scopes, and its workspace."""

    scope: str
    path: str
    workspace: str | None


def choose_probe(routes: Sequence[RouteSettings]) -> Probe:
    """The cheapest endpoint that one of `routes` allows, so that a least-privilege key is
    asked only what it is meant to do."""
    for scope, path, takes_workspace in PROBES:
        for route in routes:
            if scope in route.scopes:
                workspaces = route.allowed_workspaces
                workspace = workspaces[0] if takes_workspace and workspaces else None
                return Probe(scope, path, workspace)
    # Every route has at least one scope of the scope map; an operator's own map may
    # hold scopes this list does not know, and the account's identity works for any key.
    return Probe("users", "/api/v1/users/me", None)


def probe_key(upstream: UpstreamSettings, key: str, probe: Probe) -> tuple[bool, str]:
    """Ask Publer whether `key` works: (True, sentence) when the key is alive, else
    (False, why not, or why Publer could not be asked)."""
    headers = {"Authorization": f"Bearer-API {key}"}
    if probe.workspace is not None:
        headers["Publer-Workspace-Id"] = probe.workspace
    url, route_headers, extensions = publer_request(upstream, probe.path)
    try:
        with publer_http_client(upstream) as client:
            response = client.get(url, headers=headers | route_headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return False, _unreachable(upstream.url, exc)
    return _verdict(response.status_code, response.content, probe)


def _unreachable(url: str, exc: httpx.HTTPError) -> str:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"cannot ask Publer at {url}: TLS certificate verification failed"
            f" ({cause.verify_message}); trust the CA that signed it with upstream.ca_file,"
            " or check that upstream.url names the host the certificate is for"
        )
    if isinstance(cause, ssl.SSLError):
        return f"cannot ask Publer at {url}: the TLS handshake failed ({cause.reason})"
    return (
        f"cannot ask Publer at {url}: {type(exc).__name__}; check upstream.url and that"
        " this machine can reach it"
    )


def _verdict(status: int, body: bytes, probe: Probe) -> tuple[bool, str]:
    asked = f"GET {probe.path.partition('?')[0]}"
    found = rejection(status, body)
    if found is Rejection.KEY:
        return False, (
            f"Publer rejects the key ({status} to {asked}): it was revoked, has expired, was"
            " mistyped or is not active; create a new key in Publer and put it where the"
            " credential's source reads it"
        )
    if found is Rejection.WORKSPACE and probe.workspace is None:
        return False, (
            f"Publer wants a workspace for {asked} ({status}) and the route sets none:"
            " set the route's workspace_id"
        )
    if found is Rejection.WORKSPACE:
        return False, (
            f"Publer accepts the key but not workspace '{probe.workspace}' ({status} to"
            f" {asked}): give the key's user access to it, or fix the route's workspace_id"
        )
    if found is Rejection.SCOPE:
        return True, (
            f"Publer accepts the key; it lacks scope '{probe.scope}' ({status} to {asked}):"
            " give the key the scopes its routes need"
        )
    if status == 429:
        return True, f"Publer accepts the key; its rate limit is spent right now (429 to {asked})"
    if status >= 500:
        return False, f"Publer could not answer ({status} to {asked}); try again later"
    if 300 <= status < 400:
        return False, f"Publer answered a redirect ({status} to {asked}); check upstream.url"
    return True, f"Publer accepts the key ({status} to {asked})"


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
        aws_identity = getattr(source, "credential_source", None)
        if aws_identity is not None:
            from proxy.keys.sources.aws import describe_credential_source

            say(
                f"credential {name}: AWS credentials from {aws_identity}:"
                f" {describe_credential_source(aws_identity)}"
            )
        routes = [route for route in settings.routes if route.credential == name]
        works, sentence = probe_key(settings.upstream, read.value, choose_probe(routes))
        say(f"credential {name}: {sentence}")
        if not works:
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
