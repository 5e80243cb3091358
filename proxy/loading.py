"""The config as loaded from its file: checked settings, the scope map, and the digest.

One function loads it for `serve`, `check` and every reload, so a reload accepts exactly
what a start would. The digest is the SHA-256 of the file's bytes, as `sha256sum` prints
it, so an operator can tell which version of the file a running proxy serves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from proxy.config.settings import (
    ConfigError,
    Settings,
    config_text,
    read_config_file,
    settings_from_text,
)
from proxy.keys.sources import sdk_problems
from proxy.rules.scopes import ScopeMap, ScopeMapError, load_scope_map, unknown_scope_problems


@dataclass(frozen=True)
class LoadedConfig:
    """A config that passed every check, with where it came from and when it was read."""

    settings: Settings
    scope_map: ScopeMap
    path: Path | None  # None: built in code (tests, the dev stack), never reloaded
    sha256: str
    loaded_at: datetime


def load_config(path: Path) -> LoadedConfig:
    """Read, validate and cross-check a config file; raises ConfigError (one line per
    problem, each naming its key)."""
    data = read_config_file(path)
    settings = settings_from_text(config_text(data, path), path)
    scope_map = checked_scope_map(settings, str(path))
    return LoadedConfig(
        settings, scope_map, path, hashlib.sha256(data).hexdigest(), datetime.now(UTC)
    )


def checked_scope_map(settings: Settings, source: str) -> ScopeMap:
    """The scope map the settings name, with every route's scopes known to it."""
    try:
        scope_map = load_scope_map(settings.scope_map)
    except ScopeMapError as exc:
        raise ConfigError([f"scope_map: {exc}"]) from None
    problems = unknown_scope_problems(
        ((i, r.name, r.scopes) for i, r in enumerate(settings.routes)), scope_map
    )
    problems += sdk_problems(settings.credentials_in_use())
    if problems:
        raise ConfigError([f"{source}: {line}" for line in problems])
    return scope_map


def in_code(settings: Settings, scope_map: ScopeMap) -> LoadedConfig:
    """A config built in code: no file behind it, so no reload; digest of its JSON form."""
    digest = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
    return LoadedConfig(settings, scope_map, None, digest, datetime.now(UTC))
