"""Where publer-proxy's time goes: py-spy samples under load, summed by component.

Each sample is charged to the innermost frame that belongs to a known component, so a
standard-library call (asyncio, re, json) counts for the code that made it. Samples of
threads that only wait (the Vault worker thread) are left out.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from pathlib import Path

# (component, path fragments); the first component whose fragment is in a frame wins.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("uvicorn + httptools: the client-side HTTP server", ("uvicorn/", "httptools/")),
    (
        "upstream hop: aiohttp's client and proxy/hop/upstream.py",
        (
            "proxy/hop/upstream.py",
            "aiohttp/",
            "yarl/",
            "multidict/",
        ),
    ),
    (
        "access log: structlog, orjson, redaction",
        ("structlog/", "proxy/records/log_setup.py", "proxy/masking/secrets.py"),
    ),
    ("metrics: prometheus_client", ("prometheus_client/", "proxy/records/metrics.py")),
    (
        "policy: route, client token, scope map, path checks",
        ("proxy/rules/policy.py", "proxy/rules/paths.py", "proxy/rules/scopes.py"),
    ),
    ("header filtering", ("proxy/rules/headers.py",)),
    ("rate budget", ("proxy/budget/stores.py",)),
    ("credentials", ("proxy/keys/store.py", "proxy/keys/sources/vault.py")),
    ("request id middleware", ("proxy/records/request_ids.py",)),
    (
        "forwarder: orchestration, relay, disconnect watch",
        ("proxy/hop/forwarder.py", "proxy/hop/downstream.py", "proxy/runtime.py"),
    ),
    ("server glue (proxy/edge/server.py)", ("proxy/edge/server.py",)),
    ("starlette", ("starlette/",)),
]
IDLE_THREAD_MARKERS = ("WorkerThread.run", "Thread._bootstrap")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def record(pid: int, seconds: int, out: Path, rate: int = 250) -> bool:
    """Sample `pid` with py-spy for `seconds` into `out` (collapsed stacks); False when
    py-spy is not installed."""
    spy = shutil.which("py-spy")
    if spy is None:
        return False
    command = [spy, "record", "--pid", str(pid), "--duration", str(seconds)]
    command += ["--rate", str(rate), "--format", "raw", "--output", str(out)]
    subprocess.run(command, capture_output=True, check=True)
    return True


def _component(frames: list[str]) -> str:
    for frame in reversed(frames):
        found = _FRAME.match(frame)
        path = found.group("file") if found else frame
        for name, fragments in COMPONENTS:
            if any(fragment in path for fragment in fragments):
                return name
    return "event loop (uvloop, C) and interpreter"


def summarize(raw: Path, top: int = 15) -> list[str]:
    """A Markdown summary: share of samples by component, then the hottest functions."""
    by_component: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if any(marker in frame for frame in frames for marker in IDLE_THREAD_MARKERS):
            continue
        count = int(count_text)
        total += count
        by_component[_component(frames)] += count
        leaf = _FRAME.match(frames[-1])
        by_function[f"{leaf.group('func')} ({leaf.group('file')})" if leaf else frames[-1]] += count
    if not total:
        return ["(no samples)"]
    lines = ["| component | share of busy samples |", "|---|---:|"]
    for name, count in by_component.most_common():
        lines.append(f"| {name} | {count / total:.1%} |")
    lines += ["", f"Hottest functions (self time, {total} samples):", ""]
    lines += ["| function | self |", "|---|---:|"]
    for name, count in by_function.most_common(top):
        lines.append(f"| `{name}` | {count / total:.1%} |")
    return lines
