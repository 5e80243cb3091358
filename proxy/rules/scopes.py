"""The scope map: method + path template -> Publer scope, loaded from YAML.

The map is data so that it can be reviewed and replaced without touching code. Lookup is
pure: given a method and the path below /api/v1, it returns the endpoint, or why none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
READ_METHODS = frozenset({"GET", "HEAD"})
_PARAM_RE = re.compile(r"^\{[a-z_]+\}$")
_LITERAL_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Publer ids are ObjectIds and job ids are hex: one segment of these characters, nothing else.
_PARAM_VALUE_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ScopeMapError(Exception):
    """The scope map file is malformed; the message names the entry and the fix."""


@dataclass(frozen=True)
class Endpoint:
    """One documented Publer endpoint: its template, methods, scope and workspace need."""

    template: str
    segments: tuple[str | None, ...]  # None marks a {param} segment
    methods: frozenset[str]
    scope: str
    needs_workspace: bool


@dataclass(frozen=True)
class Match:
    """The endpoint that a method and path resolve to."""

    endpoint: Endpoint


@dataclass(frozen=True)
class Miss:
    """Why a method and path resolve to no allowed endpoint."""

    code: Literal["unknown_endpoint", "method_denied"]
    allowed_methods: frozenset[str] = frozenset()


class ScopeMap:
    """The allow-list of endpoints, indexed for lookup by path segments."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self.scopes = frozenset(e.scope for e in self.endpoints)
        # A template of literal segments only outranks every template with a {param}, so an
        # exact hit needs no scan (most Publer calls: /posts, /media, /accounts).
        self._literal: dict[str, Endpoint] = {}
        for endpoint in self.endpoints:
            if None not in endpoint.segments:
                literal = "/" + "/".join(s for s in endpoint.segments if s is not None)
                self._literal.setdefault(literal, endpoint)  # the scan keeps the first too

    def lookup(self, method: str, path: str) -> Match | Miss:
        """Resolve `path` (below /api/v1, starting with '/') for `method`.

        Literal segments win over {param} segments, so `/posts/schedule` is never read as
        the post with id `schedule`.
        """
        best: Endpoint | None = self._literal.get(path)
        if best is not None:
            return self._allowed(best, method, names_in_params=False)
        parts = path.split("/")[1:]
        best_rank: tuple[int, ...] = ()
        for endpoint in self.endpoints:
            rank = _match_rank(endpoint.segments, parts)
            if rank is not None and (best is None or rank > best_rank):
                best, best_rank = endpoint, rank
        if best is None:
            return Miss("unknown_endpoint")
        names = any(
            expected is None and not _looks_like_id(actual)
            for expected, actual in zip(best.segments, parts, strict=True)
        )
        return self._allowed(best, method, names_in_params=names)

    @staticmethod
    def _allowed(best: Endpoint, method: str, *, names_in_params: bool) -> Match | Miss:
        allowed = best.methods | ({"HEAD"} if "GET" in best.methods else set())
        if method not in allowed:
            # `POST /posts/recurring` is not the post "recurring" with a method Publer does
            # not document there: it is a path Publer does not document at all.
            if names_in_params:
                return Miss("unknown_endpoint")
            return Miss("method_denied", frozenset(allowed))
        return Match(best)

    def methods_for(self, scopes: Iterable[str]) -> frozenset[str]:
        """Every method that some endpoint of these scopes accepts."""
        wanted = set(scopes)
        methods: set[str] = set()
        for endpoint in self.endpoints:
            if endpoint.scope in wanted:
                methods |= endpoint.methods
                if "GET" in endpoint.methods:
                    methods.add("HEAD")
        return frozenset(methods)


def _looks_like_id(segment: str) -> bool:
    """Publer ids (ObjectIds, numbers, UUIDs, job ids) hold a digit; names such as
    `recurring` or `auto-schedule` do not."""
    return any(char.isdigit() for char in segment)


def _match_rank(template: tuple[str | None, ...], parts: list[str]) -> tuple[int, ...] | None:
    if len(template) != len(parts):
        return None
    rank: list[int] = []
    for expected, actual in zip(template, parts, strict=True):
        if expected is None:
            if not _PARAM_VALUE_RE.match(actual):
                return None
            rank.append(0)
        elif expected == actual:
            rank.append(1)
        else:
            return None
    return tuple(rank)


def _parse_template(template: str, where: str) -> tuple[str | None, ...]:
    if not template.startswith("/") or template.endswith("/"):
        raise ScopeMapError(f"{where}.path: {template!r} must start with '/' and not end with it")
    segments: list[str | None] = []
    for segment in template.split("/")[1:]:
        if _PARAM_RE.match(segment):
            segments.append(None)
        elif _LITERAL_RE.match(segment):
            segments.append(segment)
        else:
            raise ScopeMapError(
                f"{where}.path: segment {segment!r} of {template!r} must be a literal"
                " (letters, digits, '_', '-') or a {name} parameter"
            )
    return tuple(segments)


def parse_scope_map(data: object, source: str) -> ScopeMap:
    """Build a ScopeMap from parsed YAML, or raise ScopeMapError naming the bad entry."""
    if not isinstance(data, dict) or not isinstance(data.get("endpoints"), list):
        raise ScopeMapError(f"{source}: must be a mapping with an 'endpoints' list")
    endpoints: list[Endpoint] = []
    for index, entry in enumerate(data["endpoints"]):
        where = f"{source}: endpoints.{index}"
        if not isinstance(entry, dict) or set(entry) - {"path", "methods", "scope", "workspace"}:
            raise ScopeMapError(f"{where}: must have only path, methods, scope, workspace")
        path, methods, scope = entry.get("path"), entry.get("methods"), entry.get("scope")
        if not isinstance(path, str) or not isinstance(scope, str) or not scope:
            raise ScopeMapError(f"{where}: path and scope must be strings")
        if not isinstance(methods, list) or not methods or not set(methods) <= KNOWN_METHODS:
            raise ScopeMapError(
                f"{where}.methods: must be a non-empty list of {sorted(KNOWN_METHODS)}"
            )
        endpoints.append(
            Endpoint(
                template=path,
                segments=_parse_template(path, where),
                methods=frozenset(methods),
                scope=scope,
                needs_workspace=bool(entry.get("workspace", True)),
            )
        )
    return ScopeMap(endpoints)


def load_scope_map(path: Path | None = None) -> ScopeMap:
    """The operator's scope map at `path`, or the packaged default (proxy/rules/data/scopes.yaml);
    raises ScopeMapError naming the file, the entry and the fix."""
    if path is None:
        text = resources.files("proxy.rules").joinpath("data/scopes.yaml").read_text("utf-8")
        return parse_scope_map(yaml.safe_load(text), "scopes.yaml (packaged)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScopeMapError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ScopeMapError(f"{path}: not valid YAML") from None
    return parse_scope_map(data, str(path))


def unknown_scope_problems(
    routes: Iterable[tuple[int, str, list[str]]], scope_map: ScopeMap
) -> list[str]:
    """One line per route scope that no endpoint of the scope map has."""
    known = ", ".join(sorted(scope_map.scopes))
    return [
        f"routes.{index}.scopes: {scope!r} (route {name!r}) is not a scope of the scope map;"
        f" known scopes: {known}"
        for index, name, scopes in routes
        for scope in scopes
        if scope not in scope_map.scopes
    ]
