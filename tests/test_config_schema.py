"""The config's JSON Schema: made from the settings model, checked in up to date, and
agreeing with the model on every shipped config and on what it refuses."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.config.schema import SCHEMA_PATH, config_schema, main, reference_markdown, schema_text
from proxy.config.settings import ConfigError, parse_settings

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / SCHEMA_PATH
MODELINE = "# yaml-language-server: $schema="


def shipped_files() -> list[Path]:
    """Every proxy config the repository ships as a file of its own."""
    return [
        ROOT / "config" / "proxy.yaml",
        ROOT / "config" / "least-privilege.yaml",
        *sorted((ROOT / "deploy").glob("proxy.*.yaml")),
    ]


def embedded_configs() -> list[tuple[str, str]]:
    """The proxy configs inside the Kubernetes manifests' ConfigMaps: (where, text)."""
    found = []
    for manifest in sorted((ROOT / "deploy").glob("kubernetes*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text(encoding="utf-8")):
            if isinstance(document, dict) and document.get("kind") == "ConfigMap":
                for name, text in document.get("data", {}).items():
                    if name.endswith(".yaml"):
                        found.append((f"{manifest.name}: {name}", text))
    return found


def validator() -> jsonschema.protocols.Validator:
    """A validator of the checked-in schema, itself checked against its dialect."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def problems(data: Any) -> list[str]:
    """What the schema finds wrong with `data`, one line per error with its path."""
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in validator().iter_errors(data)
    ]


def minimal() -> dict[str, Any]:
    """A smallest valid config: one Vault credential, one open route."""
    return {
        "credentials": {"publer": {"path": "publer/api"}},
        "routes": [{"name": "default", "credential": "publer", "scopes": ["posts"]}],
    }


def test_checked_in_schema_is_what_the_model_makes() -> None:
    """config/proxy.schema.json is regenerated from the settings model byte for byte
    (`make schema` rewrites it), so it cannot drift from what the proxy accepts."""
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), "run `make schema`"


def test_check_command_fails_on_a_stale_schema(tmp_path: Path) -> None:
    """`python -m proxy.config.schema --check` exits 1 for a schema that differs, 0 once written."""
    stale = tmp_path / "proxy.schema.json"
    stale.write_text("{}\n", encoding="utf-8")
    assert main(["--check", "--schema", str(stale)]) == 1
    assert main(["--write", "--schema", str(stale)]) == 0
    assert main(["--check", "--schema", str(stale)]) == 0


@pytest.mark.parametrize("path", shipped_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_config_files_validate_and_name_the_schema(path: Path) -> None:
    """Every shipped config file passes the schema and the model, and its first line points
    editors (yaml-language-server) at the schema by a path that exists."""
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith(MODELINE), first
    assert (path.parent / first.removeprefix(MODELINE)).resolve() == SCHEMA_FILE
    data = yaml.safe_load(text)
    assert problems(data) == []
    parse_settings(data, source=str(path))


def test_configs_inside_kubernetes_manifests_validate() -> None:
    """The proxy.yaml each Kubernetes ConfigMap carries passes the schema and the model."""
    embedded = embedded_configs()
    assert embedded, "the Kubernetes manifests carry the proxy's config in a ConfigMap"
    for where, text in embedded:
        data = yaml.safe_load(text)
        assert problems(data) == [], where
        parse_settings(data, source=where)


def test_schema_refuses_an_unknown_key_where_the_model_does() -> None:
    """A misspelt key is an error to the editor as it is to the proxy, at the top, in a
    section, in a route and in a credential."""
    cases: list[tuple[str, list[Any]]] = [
        ("listne", ["listne"]),
        ("listen.prot", ["listen", "prot"]),
        ("routes.0.scope", ["routes", 0, "scope"]),
        ("credentials.publer.pathh", ["credentials", "publer", "pathh"]),
    ]
    for name, where in cases:
        data = minimal()
        node: Any = data
        for part in where[:-1]:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
        node[where[-1]] = 1
        assert problems(data), name
        with pytest.raises(ConfigError):
            parse_settings(data)


def test_schema_refuses_a_wrong_type_where_the_model_does() -> None:
    """A value of the wrong type (a port as a word, scopes as a string, a source that does
    not exist) fails the schema and the model alike."""
    mutations: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("listen.port", lambda d: d.update(listen={"port": "eighty"})),
        ("routes.0.scopes", lambda d: d["routes"][0].update(scopes="posts")),
        ("credentials.publer.source", lambda d: d["credentials"]["publer"].update(source="s3")),
        ("upstream.retries", lambda d: d.update(upstream={"retries": 9})),
    ]
    for name, mutate in mutations:
        data = copy.deepcopy(minimal())
        mutate(data)
        assert problems(data), name
        with pytest.raises(ConfigError):
            parse_settings(data)


def test_schema_accepts_each_credential_source() -> None:
    """A credential of each source, written as the reference says, passes the schema: the
    source picks its keys, and a Vault credential may leave `source` out."""
    data = minimal()
    data["credentials"] = {
        "v": {"path": "publer/api"},
        "a": {"source": "aws_secrets_manager", "secret_id": "publer", "region": "eu-west-1"},
        "f": {"source": "file", "path": "/run/secrets/publer"},
        "e": {"source": "env", "variable": "PUBLER_API_KEY"},
    }
    assert problems(data) == []
    data["credentials"]["f"]["variable"] = "X"
    assert problems(data)


def test_every_key_has_a_description() -> None:
    """Every key in the schema says what it does, so the reference and the editor's hover
    text have something to show."""
    schema = config_schema()
    missing = [
        f"{model}.{key}"
        for model, definition in [("Settings", schema), *schema["$defs"].items()]
        for key, prop in definition.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert missing == []


def test_reference_lists_key_paths_with_defaults() -> None:
    """The generated reference names keys by their full path, with type and default."""
    page = reference_markdown()
    for row in [
        '| `listen.host` | string | `"127.0.0.1"` |',
        "| `listen.port` | integer, 0 to 65535 | `8080` |",
        "| `routes[].scopes` | list of strings | required |",
        "| `routes[].clients[].token_sha256` | string | required |",
        '| `credentials.NAME.source` | `"vault"` | `"vault"` |',
        "| `credentials.NAME.secret_id` |",
        "| `forward_proxy.ca_vault.path` | string | required |",
        "| `vault.url` | string | (see meaning) |",
    ]:
        assert row in page, row
