"""MkDocs hooks: the pages made when the site is built, so they cannot drift.

- `configuration.md`, the configuration reference, from the settings model (every key,
  its type, default and description);
- on `benchmarks.md`, the marker `<!-- latest benchmark results -->` becomes the latest
  results file of each kind in `bench/results/`, with its date, commit, machine and command.

The one import of the proxy package is below; the docs build imports nothing else of it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from proxy.schema import reference_markdown

REPO = Path(__file__).resolve().parent.parent
REFERENCE_PAGE = "configuration.md"
RESULTS_MARKER = "<!-- latest benchmark results -->"


def _bench_results() -> ModuleType:
    """bench/results.py, which lives beside the benchmarks rather than in a package."""
    spec = importlib.util.spec_from_file_location("bench_results", REPO / "bench" / "results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    """Add the generated configuration reference to the site's pages."""
    if files.get_file_from_path(REFERENCE_PAGE) is not None:
        raise ValueError(
            f"docs/{REFERENCE_PAGE} exists, but that page is made from the settings model"
            " when the site is built; remove the file and edit the descriptions in the"
            " settings module instead"
        )
    files.append(File.generated(config, REFERENCE_PAGE, content=reference_markdown()))
    return files


def on_page_markdown(markdown: str, page: Page, **_: Any) -> str:
    """Put the latest benchmark results where the benchmarks page asks for them."""
    if RESULTS_MARKER not in markdown:
        return markdown
    latest: str = _bench_results().latest_markdown(level=2)
    return markdown.replace(RESULTS_MARKER, latest)
