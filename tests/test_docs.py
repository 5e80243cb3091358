"""The docs site: built strictly, offline, with its generated pages, as `make docs` does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from proxy.config.schema import reference_markdown
from tests.docs_pages import pages

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 240
README_MAX_LINES = 200
MODULE_PATH = re.compile(r"\bproxy/[\w/]*\.py\b")
# A relative link of Markdown, `[text](target)`, not to a web address or an anchor.
LOCAL_LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)\s#]+)(?:#[^)\s]*)?\)")


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


def test_every_module_path_named_in_the_docs_exists() -> None:
    """Every `proxy/...py` path the README or a docs page names is a file of the package, so
    a module renamed or moved fails here until the pages say where it went."""
    missing = [
        f"{page.relative_to(ROOT)}: {path}"
        for page in pages()
        for path in sorted(set(MODULE_PATH.findall(page.read_text(encoding="utf-8"))))
        if not (ROOT / path).is_file()
    ]
    assert missing == []


def test_module_paths_are_found_as_written() -> None:
    """The pattern the check above uses finds nested and top-level module paths, and not
    folder names or dotted module names."""
    text = "`proxy/hop/forwarder.py`, (proxy/cli.py), proxy/keys/sources/ and proxy.tunnel.ca"
    assert MODULE_PATH.findall(text) == ["proxy/hop/forwarder.py", "proxy/cli.py"]


def test_readme_is_short_and_its_links_resolve() -> None:
    """The README stays a front page (at most 200 lines) and every relative link in it,
    to the docs pages by their path so that GitHub renders them, names a file that exists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    links = LOCAL_LINK.findall(text)
    assert "docs/index.md" in links and "docs/operators.md" in links
    assert [link for link in links if not (ROOT / link).exists()] == []


# Every key the README's hand-written config table listed before the reference was made
# from the settings model: none may go missing from the generated page.
FORMER_TABLE_KEYS_TEXT = """
listen.host listen.port listen.unix_socket listen.allowed_hosts browser.allowed_origins
upstream.url upstream.insecure_allow_plain_http upstream.ca_file
upstream.connect_timeout_seconds upstream.read_timeout_seconds upstream.max_body_bytes
upstream.max_connections upstream.retries upstream.proxy upstream.connect_to
forward_proxy.host forward_proxy.port forward_proxy.ca_certificate_file
forward_proxy.leaf_lifetime_hours forward_proxy.allowed_hosts forward_proxy.ca_vault.mount
forward_proxy.ca_vault.path forward_proxy.ca_vault.kv_version
forward_proxy.ca_vault.certificate_field forward_proxy.ca_vault.private_key_field
vault.url vault.namespace vault.ca_cert vault.skip_verify vault.timeout_seconds vault.proxy
vault.auth.method vault.auth.token_file vault.auth.role_id vault.auth.role_id_file
vault.auth.secret_id_file vault.auth.role vault.auth.jwt_file vault.auth.mount
credentials.NAME.source credentials.NAME.mount credentials.NAME.path credentials.NAME.field
credentials.NAME.kv_version credentials.NAME.secret_id credentials.NAME.region
credentials.NAME.profile credentials.NAME.endpoint_url credentials.NAME.proxy
credentials.NAME.timeout_seconds credentials.NAME.readable_by credentials.NAME.poll_seconds
credentials.NAME.variable credentials.NAME.env_file credentials.NAME.refresh_seconds
credentials.NAME.max_stale_seconds credentials.NAME.rotate_after_days routes[].name
routes[].prefix routes[].credential routes[].workspace_id routes[].workspace_ids
routes[].scopes routes[].read_only routes[].clients[] routes[].weight
routes[].clients[].weight routes[].max_requests routes[].clients[].max_requests
routes[].limits routes[].clients[].limits rate_limit.requests rate_limit.per_seconds
rate_limit.max_wait_seconds rate_limit.redis_url rate_limit.replicas audit.sink
audit.redis_url audit.head_key logging.format logging.level scope_map reload.watch
reload.settle_seconds admin.token_sha256
"""


def test_reference_keeps_every_key_of_the_former_table() -> None:
    """The generated configuration reference names every key the hand-written table did."""
    reference = reference_markdown()
    assert [key for key in FORMER_TABLE_KEYS_TEXT.split() if f"`{key}`" not in reference] == []
