"""A key in an environment variable, or in a `.env` file for local development.

The variable is read once, when the source is made at start, and removed from the
process environment at once, so that no child process can inherit it. Removing it does
not touch the block of memory the process started with, which the kernel shows as
/proc/PID/environ (to the same user and root): its value is overwritten there too,
through /proc/self/mem, where the kernel allows it. What happened before the proxy
started (the shell, a parent that still holds it, crash reports) is out of its reach,
which is why a vault or a mounted file is the better home.

A `.env` file is parsed by python-dotenv (quotes, `export`, comments and escapes as every
other tool reads them), without interpolation, so a key holding `$` arrives as written,
and without putting anything into the environment. The variable, when set, wins.
"""

from __future__ import annotations

import os
from io import StringIO
from pathlib import Path

import structlog

from proxy.config.settings import EnvCredentialSettings
from proxy.keys.sources.base import SecretRead, SourceError, SourceKind, key_problem
from proxy.masking.secrets import SecretRegistry, mask

log = structlog.get_logger(__name__)

ENV_START_FIELD = 50


def scrub_initial_environment(name: str) -> bool:
    """Overwrite the value of `name` with NUL bytes in the environment block the process
    started with; True when done or when the block does not hold it."""
    prefix = name.encode() + b"="
    try:
        # Fields 50 and 51 of /proc/self/stat (counted from 1) are env_start and env_end.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[ENV_START_FIELD - 3]), int(fields[ENV_START_FIELD - 2])
        with open("/proc/self/mem", "r+b", buffering=0) as memory:
            memory.seek(start)
            block = memory.read(end - start)
            offset = 0
            for entry in block.split(b"\0"):
                if entry.startswith(prefix):
                    memory.seek(start + offset + len(prefix))
                    memory.write(b"\0" * (len(entry) - len(prefix)))
                offset += len(entry) + 1
    except (OSError, ValueError, IndexError):
        return False
    return True


class EnvKeySource:
    """Holds the key taken from the environment (or the .env file) at start."""

    kind: SourceKind = "env"
    poll_seconds: float | None = None
    calls_per_read = 1

    def __init__(self, settings: EnvCredentialSettings, secrets: SecretRegistry) -> None:
        name = settings.variable
        self.where = f"${name}" + (f" or {settings.env_file}" if settings.env_file else "")
        self._value: str | None = None
        self._error: SourceError | None = None
        raw = os.environ.pop(name, None)  # pop also unsets it for child processes
        if raw is not None and not scrub_initial_environment(name):
            log.warning("env_key_visible_in_proc_environ", variable=name)
        origin = f"${name}"
        if raw is None and settings.env_file is not None:
            raw, origin = self._from_file(settings, secrets), f"{name} in {settings.env_file}"
        elif raw is not None and settings.env_file is not None:
            self._warn_if_file_differs(settings, secrets, raw)
        if raw is None:
            if self._error is None:
                self._error = SourceError(self._missing(settings), kind="not_found")
            return
        secrets.add(raw)
        value = raw.strip()
        secrets.add(value)
        problem = key_problem(value)
        if problem is not None:
            self._error = SourceError(
                f"{origin} does not hold an API key ({problem})", kind="invalid"
            )
            return
        self._value = value

    def __repr__(self) -> str:
        return f"EnvKeySource({self.where})"

    def _from_file(self, settings: EnvCredentialSettings, secrets: SecretRegistry) -> str | None:
        from dotenv import dotenv_values

        path = settings.env_file
        assert path is not None
        try:
            text = path.expanduser().read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self._error = SourceError(f"{path} cannot be read ({detail})", kind="denied")
            return None
        values = dotenv_values(stream=StringIO(text), interpolate=False)
        for value in values.values():
            secrets.add(value)  # whatever else the file holds is likely secret too
        return values.get(settings.variable)

    def _warn_if_file_differs(
        self, settings: EnvCredentialSettings, secrets: SecretRegistry, exported: str
    ) -> None:
        """An exported variable hides the .env file's value: say so when they differ, for
        whoever just edited the file and wonders why nothing changed."""
        in_file = self._from_file(settings, secrets)
        self._error = None  # the file is only compared here; the variable is the key
        if in_file is None or in_file.strip() == exported.strip():
            return
        log.warning(
            "env_key_differs_from_env_file",
            used=f"${settings.variable} (exported)",
            key=mask(exported.strip()) or "***",
            ignored=f"{settings.variable} in {settings.env_file}",
            ignored_key=mask(in_file.strip()) or "***",
            fix=f"unset {settings.variable} to use the file, or make the two agree",
        )

    @staticmethod
    def _missing(settings: EnvCredentialSettings) -> str:
        name = settings.variable
        if settings.env_file is None:
            return f"${name} was not set when the proxy started; set it, or name an env_file"
        return (
            f"${name} was not set when the proxy started, and {settings.env_file} does not"
            f" exist or has no {name}="
        )

    def read(self) -> SecretRead:
        """The key as it was at start: the environment is read once."""
        if self._value is None:
            assert self._error is not None
            raise SourceError(self._error.reason, kind=self._error.kind)
        return SecretRead(value=self._value, version=None, created_time=None)

    def changed(self) -> bool:
        """Never: the environment is read once."""
        return False

    def close(self) -> None:
        """Nothing to release."""
