"""Benchmark figures as data: every results file says when, on what and how it was
measured, and the docs show the latest of each kind."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
MACHINE_KEYS = {"nproc", "cpu", "load", "kernel", "python"}


def bench_results() -> ModuleType:
    """bench/results.py, which lives beside the benchmarks rather than in a package."""
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "bench" / "results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake(kind: str, date: str, commit: str, report: str = "| a | b |") -> dict[str, Any]:
    """A results record as a run writes it."""
    return {
        "kind": kind,
        "title": f"{kind} title",
        "date": date,
        "commit": commit,
        "command": f"make bench (python bench/{kind}.py)",
        "machine": {"nproc": "2", "cpu": "X", "load": "1 1 1", "kernel": "6", "python": "3"},
        "report": report + "\n",
        "figures": {},
    }


@pytest.mark.parametrize("path", sorted(RESULTS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_checked_in_results_say_when_where_and_how(path: Path) -> None:
    """Each results file holds its kind, UTC date, commit, machine and command, and is
    named <date>-<commit>-<kind>.json after them."""
    found = json.loads(path.read_text(encoding="utf-8"))
    assert found["kind"] in bench_results().KINDS
    assert found["date"].endswith("Z") and found["date"][:10] == path.name[:10]
    assert path.name == bench_results().file_name(found)
    assert set(found["machine"]) >= MACHINE_KEYS
    assert found["command"] and found["report"].strip() and "figures" in found


def test_history_starts_with_the_published_figures() -> None:
    """The figures the README printed for 2026-11-30 are results files of their own."""
    names = {p.name for p in RESULTS_DIR.glob("*.json")}
    assert {
        "2026-11-30-28186b8-proxy.json",
        "2026-11-30-28186b8-tunnel.json",
        "2026-11-30-5491f1c-scale.json",
    } <= names


def test_latest_of_each_kind_is_chosen_by_date(tmp_path: Path) -> None:
    """The page shows the newest record of each kind by the date inside it, whatever the
    file names sort as, in the order of the kinds."""
    results = bench_results()
    for record in [
        fake("proxy", "2026-11-30T12:29:00Z", "aaaaaaa", "old proxy"),
        fake("proxy", "2026-12-06T09:00:00Z", "bbbbbbb", "new proxy"),
        fake("proxy", "2026-12-06T08:00:00Z", "ccccccc", "earlier same day"),
        fake("tunnel", "2026-11-30T12:29:00Z", "aaaaaaa", "the tunnel"),
    ]:
        (tmp_path / f"{record['commit']}-{record['kind']}.json").write_text(json.dumps(record))
    page = results.latest_markdown(tmp_path)
    assert "new proxy" in page and "the tunnel" in page
    assert "old proxy" not in page and "earlier same day" not in page
    assert page.index("proxy title") < page.index("tunnel title")
    assert "`bbbbbbb`" in page and "`make bench (python bench/proxy.py)`" in page
    assert "2 CPUs (X)" in page and "load average 1 1 1" in page


def test_no_results_says_how_to_make_them(tmp_path: Path) -> None:
    """An empty results folder renders a sentence naming the command, not an empty page."""
    assert "make bench" in bench_results().latest_markdown(tmp_path)


def test_a_record_is_stamped_and_saved_under_its_name(tmp_path: Path) -> None:
    """record() stamps now, the commit, this machine and the command; save() writes it as
    <date>-<commit>-<kind>.json; an unknown kind is refused."""
    results = bench_results()
    record = results.record("idle-rss", "Idle RSS", "| x |", {"a": 1.5}, {"extra": "y"})
    assert set(record["machine"]) >= MACHINE_KEYS and record["machine"]["extra"] == "y"
    assert record["commit"] and record["command"].startswith(("python ", "make "))
    path = results.save(record, tmp_path)
    assert path.name == f"{record['date'][:10]}-{record['commit']}-idle-rss.json"
    assert json.loads(path.read_text(encoding="utf-8"))["figures"] == {"a": 1.5}
    with pytest.raises(ValueError, match="unknown benchmark kind"):
        results.record("speed", "t", "r", {}, {})
