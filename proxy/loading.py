"""The config as loaded from its file: checked settings, the scope map, and the digest.

One function loads it for `serve`, `check` and every reload, so a reload accepts exactly
what a start would. The digest is the SHA-256 of the file's bytes, as `sha256sum` prints
it, so an operator can tell which version of the file a running proxy serves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from proxy.config.settings import (
    ConfigError,
    Settings,
    check_settings,
    config_text,
    read_config_file,
    yaml_data,
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
    """Read, validate and cross-check a config file; raises ConfigError with every problem
    of every stage (keys given twice, each key, the checks between keys, the scope map),
    one line each, each naming its key or line."""
    data = read_config_file(path)
    document, duplicates = yaml_data(config_text(data, path), path)
    checked = check_settings(document, source=str(path))
    scope_map, problems = _scope_map_problems(checked.settings, checked.route_indices, str(path))
    problems = duplicates + checked.problems + problems
    if problems or scope_map is None:
        raise ConfigError(problems, checked.settings, checked.valid_keys)
    return LoadedConfig(
        checked.settings, scope_map, path, hashlib.sha256(data).hexdigest(), datetime.now(UTC)
    )


def checked_scope_map(settings: Settings, source: str) -> ScopeMap:
    """The scope map the settings name, with every route's scopes known to it."""
    scope_map, problems = _scope_map_problems(settings, range(len(settings.routes)), source)
    if problems or scope_map is None:
        raise ConfigError(problems)
    return scope_map


def _scope_map_problems(
    settings: Settings, indices: Sequence[int], source: str
) -> tuple[ScopeMap | None, list[str]]:
    problems = [f"{source}: {line}" for line in sdk_problems(settings.credentials_in_use())]
    try:
        scope_map = load_scope_map(settings.scope_map)
    except ScopeMapError as exc:
        return None, [f"scope_map: {exc}", *problems]
    scopes = ((i, r.name, r.scopes) for i, r in zip(indices, settings.routes, strict=True))
    problems = [
        f"{source}: {line}" for line in unknown_scope_problems(scopes, scope_map)
    ] + problems
    return scope_map, problems


def in_code(settings: Settings, scope_map: ScopeMap) -> LoadedConfig:
    """A config built in code: no file behind it, so no reload; digest of its JSON form."""
    digest = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
    return LoadedConfig(settings, scope_map, None, digest, datetime.now(UTC))
