"""The docs site: built strictly, offline, with its generated pages, as `make docs` does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 240


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of `config` into `site`, as a separate process."""
    # Material's banner about its end of life is printed on every build; it is no warning
    # about this site, and would otherwise hide the ones that are.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env=env,
        check=False,
    )


def warnings(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of a build's output that are warnings or errors."""
    return [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.startswith(("WARNING", "ERROR")) or "Aborted" in line
    ]


def test_site_builds_strictly_without_a_warning(tmp_path: Path) -> None:
    """The site builds in strict mode with no warning at all, every page of the navigation
    is there, and the configuration reference and benchmark results were made at build."""
    site = tmp_path / "site"
    done = build(ROOT / "mkdocs.yml", site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert warnings(done) == []
    for page in [
        "index.html",
        "app-developers/index.html",
        "clients-you-cannot-change/index.html",
        "operators/index.html",
        "configuration/index.html",
        "key-sources/index.html",
        "security-model/index.html",
        "deployment/index.html",
        "contributing/index.html",
        "benchmarks/index.html",
    ]:
        assert (site / page).is_file(), page
    reference = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    for key in ("listen.host", "routes[].scopes", "credentials.NAME.source", "audit.sink"):
        assert f"<code>{key}</code>" in reference, key
    results = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert results, "bench/results holds the figures the benchmarks page shows"
    newest = max(
        (json.loads(p.read_text(encoding="utf-8")) for p in results), key=lambda r: r["date"]
    )
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert f"<code>{newest['commit']}</code>" in benchmarks
    assert "latest benchmark results" not in benchmarks


def test_site_loads_nothing_from_the_network(tmp_path: Path) -> None:
    """The built pages name no web font or remote script: the site works offline, and
    building it fetched nothing."""
    site = tmp_path / "site"
    assert build(ROOT / "mkdocs.yml", site).returncode == 0
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text, page
        assert "fonts.gstatic.com" not in text, page


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    """Strict mode is in force: a link to a page that does not exist fails the build and
    names the link."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "results.py", copy / "bench" / "results.py")
    shutil.copytree(ROOT / "bench" / "results", copy / "bench" / "results")
    page = copy / "docs" / "operators.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the tuning guide](tuning.md).\n")
    done = build(copy / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert any("tuning.md" in line for line in warnings(done)), done.stdout + done.stderr
