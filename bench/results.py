"""Benchmark figures as data: one JSON file per run, and the page of the latest of each kind.

Every benchmark (`bench/run.py`, `bench/tunnel.py`, `bench/scale.py`,
`bench/sources_rss.py`) ends by writing `bench/results/<UTC date>-<commit>-<kind>.json`:

    {
      "kind": "proxy",                      # proxy, tunnel, idle-rss, scale or limits
      "title": "...",                       # the heading of its section in the docs
      "date": "2026-11-30T12:29:00Z",       # UTC, when the run ended
      "commit": "28186b8",                  # short hash; "-dirty" when the tree had changes
      "command": "make bench",              # what to type to measure it again
      "machine": {"nproc": "2", "cpu": "...", "load": "1.55 1.50 2.46",
                  "kernel": "...", "python": "3.11.7", ...},
      "report": "| ... |",                  # the figures as Markdown tables and sentences
      "figures": {...}                      # the same figures as numbers, for comparisons
    }

A second run of the same kind on the same day and commit replaces the first. The docs'
benchmarks page shows the latest file of each kind (by `date`), with its command, commit
and machine (`latest_markdown`). Standard library only: the docs build imports this file.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = RESULTS_DIR.parent.parent
# The order of the kinds on the docs page.
KINDS = ("proxy", "tunnel", "idle-rss", "scale", "limits")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or `?`."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def machine() -> dict[str, str]:
    """What the figures were measured on: CPUs, their model, the load average (1, 5 and 15
    minutes, at the end of the run), the kernel and Python."""
    load = os.getloadavg()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "load": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def commit() -> str:
    """The short hash of the checkout measured, `-dirty` when it had uncommitted changes
    (results files aside), `unknown` outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        short = git("rev-parse", "--short", "HEAD")
        changes = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{short}-dirty" if changes else short


def command_line() -> str:
    """The command that ran this benchmark, as typed from the repository's root: `make
    bench` says which target when it set BENCH_TARGET, else the script and its arguments."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = script.relative_to(REPO).as_posix()
    except ValueError:
        shown = str(script)
    direct = shlex.join(["python", shown, *sys.argv[1:]])
    target = os.environ.get("BENCH_TARGET")
    return f"{target} ({direct})" if target else direct


def record(
    kind: str, title: str, report: str, figures: dict[str, Any], extra_machine: dict[str, str]
) -> dict[str, Any]:
    """One run's results file, stamped with now, this checkout's commit, this machine and
    the command that ran it."""
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}; one of {', '.join(KINDS)}")
    return {
        "kind": kind,
        "title": title,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "command": command_line(),
        "machine": {**machine(), **extra_machine},
        "report": report.strip() + "\n",
        "figures": figures,
    }


def file_name(found: dict[str, Any]) -> str:
    """`<UTC date>-<commit>-<kind>.json` for a results record."""
    return f"{found['date'][:10]}-{found['commit']}-{found['kind']}.json"


def save(found: dict[str, Any], out: Path = RESULTS_DIR) -> Path:
    """Write a results record into `out`; its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name(found)
    path.write_text(json.dumps(found, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def latest(results: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """The latest record of each kind in `results`, by the date it holds."""
    newest: dict[str, dict[str, Any]] = {}
    for path in sorted(results.glob("*.json")):
        found = json.loads(path.read_text(encoding="utf-8"))
        kind = found.get("kind")
        if kind in KINDS and found["date"] > newest.get(kind, {}).get("date", ""):
            newest[kind] = found
    return newest


def _machine_line(m: dict[str, str]) -> str:
    rest = ", ".join(
        f"{k} {v}" for k, v in m.items() if k not in ("nproc", "cpu", "load", "kernel", "python")
    )
    return (
        f"Machine: {m.get('nproc', '?')} CPUs ({m.get('cpu', '?')}), Linux"
        f" {m.get('kernel', '?')}, Python {m.get('python', '?')}, load average"
        f" {m.get('load', '?')} at the end" + (f"; {rest}" if rest else "") + "."
    )


def render(found: dict[str, Any], level: int = 2) -> str:
    """One record as a Markdown section: its title, when, on which commit, with which
    command, its report, then the machine."""
    date = found["date"].replace("T", " ").removesuffix("Z") + " UTC"
    return "\n".join(
        [
            f"{'#' * level} {found['title']}",
            "",
            f"Measured {date} on commit `{found['commit']}` with `{found['command']}`.",
            "",
            found["report"].rstrip(),
            "",
            _machine_line(found["machine"]),
            "",
        ]
    )


def latest_markdown(results: Path = RESULTS_DIR, level: int = 2) -> str:
    """The latest record of each kind, rendered in the order of KINDS."""
    newest = latest(results)
    if not newest:
        return f"No benchmark results in {results.name}/ yet: run `make bench`.\n"
    return "\n".join(render(newest[kind], level) for kind in KINDS if kind in newest)


if __name__ == "__main__":
    sys.stdout.write(latest_markdown())
