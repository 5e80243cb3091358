"""The config's JSON Schema and its reference page, both made from the settings model.

Neither is written by hand, so neither can drift from what `serve` and `check` accept:
the schema (JSON Schema 2020-12, from pydantic's `model_json_schema`) is checked in as
`config/proxy.schema.json` for editors (yaml-language-server), and the reference
(Markdown: one table per section, one row per key path such as `listen.host`,
`routes[].scopes` or `credentials.NAME.path`) is made when the docs site is built.

    python -m proxy.config.schema --write   # rewrite config/proxy.schema.json
    python -m proxy.config.schema --check   # exit 1 when the checked-in schema is stale
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from proxy.config.settings import KeyLifeSettings, Settings, source_models

SCHEMA_PATH = Path("config/proxy.schema.json")
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_TITLE = "publer-proxy configuration (proxy.yaml)"


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a config file: every key, its type, default and description;
    unknown keys are refused (`additionalProperties: false`), as the proxy refuses them."""
    schema = Settings.model_json_schema(mode="validation")
    return {"$schema": SCHEMA_DIALECT, **schema, "title": SCHEMA_TITLE}


def schema_text() -> str:
    """The schema as the checked-in file holds it: sorted keys, two-space indent, newline."""
    return json.dumps(config_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class Key:
    """One row of the reference: a key path, its type, its default and what it does."""

    path: str
    type: str
    default: str
    description: str


def _type_name(annotation: Any) -> str:
    """A reader's name for a field's type: `string`, `list of strings`, `` `a` | `b` ``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(names)
    if origin is Literal:
        return " or ".join(f"`{json.dumps(value)}`" for value in args)
    if origin is list:
        inner = _type_name(args[0])
        return f"list of {inner}s" if " " not in inner else f"list of ({inner})"
    if origin is dict:
        return f"mapping of names to {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: FieldInfo) -> str:
    """The field's numeric bounds, such as `> 0` or `0 to 65535`."""
    found: dict[str, Any] = {}
    for item in field.metadata:
        for name in ("gt", "ge", "lt", "le", "min_length", "max_length"):
            value = getattr(item, name, None)
            if value is not None:
                found[name] = value
    if "ge" in found and "le" in found:
        return f"{found['ge']} to {found['le']}"
    parts = [
        f"{symbol} {found[name]}"
        for name, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
        if name in found
    ]
    if "min_length" in found or "max_length" in found:
        parts.append(f"{found.get('min_length', 0)} to {found.get('max_length', '…')} characters")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    """The default as a reader writes it in YAML; `required`, or `(see meaning)` for one
    the environment decides."""
    factory = field.default_factory
    if isinstance(factory, type) and issubclass(factory, BaseModel):
        return "(its keys' defaults)"
    if factory is not None:
        return "(see meaning)"
    if field.is_required():
        return "required"
    if field.default is None:
        return "none"
    if isinstance(field.default, BaseModel):
        return "(its keys' defaults)"
    value = field.default
    if isinstance(value, Path):
        value = str(value)
    return f"`{json.dumps(value)}`"


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds (itself, optional, or a list of it) and the path suffix
    its keys take (`.` or `[].`)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) == 1:
            return _model_of(inner[0])
    if origin is list and args:
        model, _ = _model_of(args[0])
        return (model, "[].") if model is not None else (None, "")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "."
    return None, ""


def model_keys(
    model: type[BaseModel], prefix: str = "", skip: frozenset[str] = frozenset()
) -> Iterator[Key]:
    """Every key of `model` but those in `skip`, depth first, with its path under `prefix`."""
    for name, field in model.model_fields.items():
        if name not in skip:
            yield from field_keys(prefix + name, field)


def field_keys(path: str, field: FieldInfo) -> Iterator[Key]:
    """The key at `path`, then the keys of the section it holds, if any."""
    nested, joint = _model_of(field.annotation)
    type_name = _type_name(field.annotation)
    if nested is not None:
        type_name = "list of sections" if joint == "[]." else "section"
    bounds = _bounds(field)
    yield Key(
        path + ("[]" if joint == "[]." else ""),
        type_name + (f", {bounds}" if bounds else ""),
        _default(field),
        field.description or "",
    )
    if nested is not None:
        yield from model_keys(nested, path + joint)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(keys: list[Key]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [
        f"| `{k.path}` | {_cell(k.type)} | {_cell(k.default)} | {_cell(k.description)} |"
        for k in keys
    ]
    return lines


def reference_markdown() -> str:
    """The configuration reference page: a section per top-level key, a table per section,
    the credentials' keys shared by every source first, then each source's own."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Made from the settings model when the site is built; edit the descriptions",
        "     in the settings module, not this page. -->",
        "",
        "`config/proxy.yaml` is a commented example of every key. Unknown keys are an"
        " error; every mistake is reported with its key path and the fix, before anything"
        " starts. Values that name secrets are references (files, Vault paths), never the"
        " secrets. `config/proxy.schema.json` is the same model as a JSON Schema, for"
        " editors: the shipped configs start with"
        " `# yaml-language-server: $schema=./proxy.schema.json`.",
    ]
    shared = frozenset(KeyLifeSettings.model_fields)
    for name, field in Settings.model_fields.items():
        lines += ["", f"## `{name}`", "", field.description or "", ""]
        if name == "credentials":
            lines += _credentials_tables(shared)
            continue
        keys = list(field_keys(name, field))
        # A section's own row would repeat the paragraph above its table.
        lines += _table(keys[1:] if "section" in keys[0].type else keys)
    return "\n".join(lines) + "\n"


def _credentials_tables(shared: frozenset[str]) -> list[str]:
    """The keys every credential has, then one table per source of its own keys."""
    prefix = "credentials.NAME."
    lines = [
        "Every credential, whatever its `source`:",
        "",
        *_table(list(model_keys(KeyLifeSettings, prefix))),
    ]
    for source, model in source_models().items():
        lines += [
            "",
            f"### `source: {source}`",
            "",
            (model.__doc__ or "").strip().splitlines()[0],
            "",
            *_table(list(model_keys(model, prefix, skip=shared))),
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Write or check the checked-in schema, or print the reference page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"rewrite {SCHEMA_PATH}")
    action.add_argument("--check", action="store_true", help=f"exit 1 when {SCHEMA_PATH} is stale")
    action.add_argument("--reference", action="store_true", help="print the reference page")
    parser.add_argument("--schema", type=Path, default=SCHEMA_PATH, help="the schema file")
    args = parser.parse_args(argv)
    if args.reference:
        sys.stdout.write(reference_markdown())
        return 0
    text = schema_text()
    if args.write:
        args.schema.write_text(text, encoding="utf-8")
        return 0
    current = args.schema.read_text(encoding="utf-8") if args.schema.exists() else ""
    if current != text:
        print(
            f"{args.schema} is not what the settings model makes; run `make schema`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
