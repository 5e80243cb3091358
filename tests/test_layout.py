"""The package's shape: the runtime apart from the development tools, no import cycles,
every direct import declared, and packaging metadata that installs without warnings."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "proxy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
DEV = "proxy.dev"


def module_name(path: Path) -> str:
    """`proxy/dev/stack.py` -> `proxy.dev.stack`."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def runtime_modules() -> list[str]:
    """The modules production runs: everything outside proxy.dev."""
    return [name for name in modules() if name != DEV and not name.startswith(DEV + ".")]


def imports(path: Path) -> list[tuple[str, bool]]:
    """Every module a file imports, absolute, with whether the import runs at module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, id(node) in top_level))
    return found


# The package's groups from the bottom up. A module may import from its own group and the
# groups below it, never from one above or beside it. The modules at the top level (the
# command line, the runtime that assembles a config generation, reload, the status page,
# `check --online`) may import every group; no group imports them. proxy.dev is apart.
LAYERS: list[frozenset[str]] = [
    frozenset({"masking"}),  # what is masked: secrets in output, in responses
    frozenset({"config"}),  # the settings model
    frozenset({"rules"}),  # the pure decisions
    frozenset({"keys", "budget"}),  # the held keys and their sources; Publer's budget
    frozenset({"records"}),  # access log, audit, activity, metrics, request ids, logs
    frozenset({"hop"}),  # one generation's services, the forwarder, the upstream client
    frozenset({"edge"}),  # the server, the browser guard, signals
    frozenset({"tunnel"}),  # the forward-proxy listener and its tunnels
]
RANK = {group: rank for rank, layer in enumerate(LAYERS) for group in layer}
# Annotations only (under TYPE_CHECKING, never loaded): the key store is handed the
# process's metrics.
TYPE_ONLY = {("proxy.keys.store", "proxy.records.metrics")}


def group_of(module: str) -> str | None:
    """`proxy.rules.policy` -> `rules`; None for the top level and proxy.dev."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in RANK else None


def type_checking_imports(path: Path) -> set[str]:
    """The modules a file imports only for annotations, under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    found.add(inner.module)
    return found


def test_every_module_belongs_to_a_group_or_the_top() -> None:
    """Each runtime module sits in one of the groups, or is one of the few that assemble
    them at the top level."""
    top = {n for n in runtime_modules() if n != "proxy" and group_of(n) is None}
    assert top == {
        "proxy.__main__",
        "proxy.cli",
        "proxy.describe",
        "proxy.launch",
        "proxy.loading",
        "proxy.online",
        "proxy.reload",
        "proxy.runtime",
        "proxy.status",
    }


def test_imports_point_down_the_layers() -> None:
    """No module imports from a group above its own or beside it, and no group imports
    the top level: the arrows between groups run one way."""
    wrong = []
    for name in runtime_modules():
        source = group_of(name)
        if source is None:
            continue
        annotations = type_checking_imports(modules()[name])
        for imported, _ in imports(modules()[name]):
            if not imported.startswith("proxy.") or imported.startswith(DEV):
                continue
            target = group_of(imported)
            if target == source:
                continue
            if target is None or RANK[target] >= RANK[source]:
                if imported in annotations and (name, imported) in TYPE_ONLY:
                    continue
                wrong.append(f"{name} ({source}) -> {imported} ({target or 'top level'})")
    assert wrong == []


def test_runtime_never_imports_the_development_tools() -> None:
    """Importing every runtime module in a fresh interpreter loads nothing of proxy.dev."""
    names = [name for name in runtime_modules() if name != "proxy.__main__"]  # runs the CLI
    assert "proxy.edge.server" in names and "proxy.runtime" in names
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    assert set(names) <= set(loaded)
    assert not [name for name in loaded if name == DEV or name.startswith(DEV + ".")]
    assert not [name for name in loaded if name == "tests" or name.startswith("tests.")]


def test_only_the_cli_reaches_the_development_tools() -> None:
    """Only the `dev` and `sandbox` commands import proxy.dev, and only when they run."""
    for name in runtime_modules():
        for imported, at_module_level in imports(modules()[name]):
            if imported == DEV or imported.startswith(DEV + "."):
                assert name == "proxy.cli" and not at_module_level, (name, imported)


def test_no_import_cycles() -> None:
    """The package's modules import each other without a cycle, lazy imports included."""
    graph = {
        name: {imported for imported, _ in imports(path) if imported in modules()}
        for name, path in modules().items()
    }
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name] - {name}):
            assert state.get(target) != "open", " -> ".join([*trail, name, target])
            if target not in state:
                visit(target, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def requirement_names(requirements: list[str]) -> set[str]:
    """Normalised distribution names of requirement strings."""
    return {
        re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]).lower()
        for req in requirements
    }


def third_party(paths: list[Path]) -> dict[str, str]:
    """The distributions that the files' imports come from, {distribution: a module}."""
    owners = packages_distributions()
    found: dict[str, str] = {}
    for path in paths:
        for imported, _ in imports(path):
            top = imported.partition(".")[0]
            if top in sys.stdlib_module_names or top == "proxy":
                continue
            assert top in owners, f"{path}: {imported} comes from no installed distribution"
            for distribution in owners[top]:
                found.setdefault(re.sub(r"[-_.]+", "-", distribution).lower(), imported)
    return found


@pytest.mark.parametrize("part", ["runtime", "dev"])
def test_every_direct_import_is_declared(part: str) -> None:
    """Each third-party module the package imports comes from a declared dependency: the
    runtime from `dependencies`, proxy.dev from those and the `devstack` extra."""
    declared = requirement_names(PYPROJECT["project"]["dependencies"])
    # The AWS and Azure key sources import their SDKs only when a credential uses them.
    for extra in ("aws", "azure"):
        declared |= requirement_names(PYPROJECT["project"]["optional-dependencies"][extra])
    names = runtime_modules()
    if part == "dev":
        declared |= requirement_names(PYPROJECT["project"]["optional-dependencies"]["devstack"])
        names = [name for name in modules() if name not in names]
    used = third_party([modules()[name] for name in names])
    assert used
    assert {d: m for d, m in used.items() if d not in declared} == {}


def test_packaging_metadata() -> None:
    """An SPDX license string with a setuptools that reads it; the test extra holds the
    devstack one, so the test install is a superset of what `make run` installs."""
    assert PYPROJECT["project"]["license"] == "MIT"
    [setuptools] = [r for r in PYPROJECT["build-system"]["requires"] if "setuptools" in r]
    assert setuptools == "setuptools>=77"  # the first release with SPDX license expressions
    assert "publer-proxy[devstack]" in PYPROJECT["project"]["optional-dependencies"]["test"]
    [uvicorn] = [r for r in PYPROJECT["project"]["dependencies"] if r.startswith("uvicorn")]
    assert "<" in uvicorn, "uvicorn's private protocol API is subclassed: pin a range"


@pytest.mark.parametrize(("target", "extra"), [("run", "devstack"), ("lint", "test")])
def test_make_installs_only_what_the_target_needs(tmp_path: Path, target: str, extra: str) -> None:
    """From an empty venv, `make run` installs the runtime and the devstack extra only, and
    the test tools' targets the test extra."""
    result = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", target, f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    installs = [
        line for line in result.stdout.splitlines() if "pip install" in line and "-e" in line
    ]
    assert len(installs) == 1, result.stdout
    assert f"-e '.[{extra}]'" in installs[0]


@pytest.mark.parametrize("command", ["dev", "sandbox"])
def test_development_commands_without_the_development_tools(command: str) -> None:
    """Where proxy.dev is not installed (the image), `dev` and `sandbox` exit 1 saying what
    to install, without a traceback."""
    code = (
        "import sys\n"
        "sys.modules['proxy.dev'] = None  # as if the package were absent\n"
        "from proxy.cli import main\n"
        f"sys.exit(main([{command!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert f"{command}: the development tools (the proxy.dev package) are not installed" in (
        result.stderr
    )
    assert "pip install -e '.[devstack]'" in result.stderr
