"""The benchmark's results: one table with ratios, the performance targets, the machine."""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata

import results
from load import Transfer, WrkResult

UPSTREAM, NGINX, NAIVE, PUBLER = "upstream", "nginx", "naive", "publer-proxy"
TITLES = {
    UPSTREAM: "upstream alone",
    NGINX: "nginx proxy_pass",
    NAIVE: "naive Starlette+httpx",
    PUBLER: "publer-proxy",
}


@dataclass
class ServerResult:
    """Everything measured on one server."""

    key: str
    title: str
    one: WrkResult
    fifty: WrkResult
    idle_rss_mib: float
    start_rss_mib: float | None = None  # right after start, before any request
    upload: Transfer | None = None
    download: Transfer | None = None
    startup_seconds: list[float] = field(default_factory=list)

    @property
    def startup_median(self) -> float | None:
        """Median seconds from process start to /readyz 200, when measured."""
        if not self.startup_seconds:
            return None
        ordered = sorted(self.startup_seconds)
        return ordered[len(ordered) // 2]


def _version(command: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "?"


def machine() -> dict[str, str]:
    """What the numbers were measured on: results.machine(), the tools and the packages."""
    packages = ("httpx", "aiohttp", "uvicorn", "uvloop", "httptools", "starlette", "structlog")
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return {
        **results.machine(),
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


Getter = Callable[[ServerResult], float | None]


def _row_specs(mib: float) -> list[tuple[str, Getter, str, bool]]:
    """(label, value, format, whether a ratio means something) for each row of the table;
    ratios of RSS growth do not: they divide one near-zero number by another."""

    def up(r: ServerResult) -> Transfer | None:
        return r.upload

    def down(r: ServerResult) -> Transfer | None:
        return r.download

    def growth(pick: Callable[[ServerResult], Transfer | None]) -> Getter:
        return lambda r: t.growth_mib if (t := pick(r)) else None

    def peak(pick: Callable[[ServerResult], Transfer | None]) -> Getter:
        return lambda r: t.rss_peak_mib if (t := pick(r)) else None

    def rate(pick: Callable[[ServerResult], Transfer | None]) -> Getter:
        return lambda r: t.mib_per_s if (t := pick(r)) else None

    return [
        ("req/s, 1 connection", lambda r: r.one.rps, "{:,.0f}", True),
        ("p50 ms, 1 connection", lambda r: r.one.p50_ms, "{:.3f}", True),
        ("p99 ms, 1 connection", lambda r: r.one.p99_ms, "{:.3f}", True),
        ("req/s, 50 connections", lambda r: r.fifty.rps, "{:,.0f}", True),
        ("p50 ms, 50 connections", lambda r: r.fifty.p50_ms, "{:.2f}", True),
        ("p99 ms, 50 connections", lambda r: r.fifty.p99_ms, "{:.2f}", True),
        ("CPU s per 1,000 requests (50 conn.)", lambda r: r.fifty.cpu_per_1k, "{:.3f}", True),
        ("RSS MiB at start, before any request", lambda r: r.start_rss_mib, "{:.1f}", True),
        ("idle RSS MiB, after the load runs", lambda r: r.idle_rss_mib, "{:.1f}", True),
        (f"{mib:g} MiB upload: peak RSS MiB", peak(up), "{:.1f}", True),
        (f"{mib:g} MiB upload: RSS growth MiB", growth(up), "{:.1f}", False),
        (f"{mib:g} MiB upload: MiB/s", rate(up), "{:.0f}", True),
        (f"{mib:g} MiB download: peak RSS MiB", peak(down), "{:.1f}", True),
        (f"{mib:g} MiB download: RSS growth MiB", growth(down), "{:.1f}", False),
        (f"{mib:g} MiB download: MiB/s", rate(down), "{:.0f}", True),
        ("start to /readyz 200, key from Vault, s", lambda r: r.startup_median, "{:.2f}", True),
    ]


def _cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base <= 0 or math.isnan(value) or math.isnan(base):
        return "-"
    return f"{value / base:.2f}x"


def main_table(results: dict[str, ServerResult], mib: float) -> list[str]:
    """The side-by-side table, with publer-proxy's ratios to nginx and to the naive proxy."""
    keys = [k for k in (UPSTREAM, NGINX, NAIVE, PUBLER) if k in results]
    head = ["", *[results[k].title for k in keys]]
    if PUBLER in results:
        head += [f"{PUBLER} ÷ nginx", f"{PUBLER} ÷ naive"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for label, get, fmt, ratios in _row_specs(mib):
        values = {k: get(results[k]) for k in keys}
        if all(v is None for v in values.values()):
            continue
        cells = [label, *[_cell(values[k], fmt) for k in keys]]
        if PUBLER in results:
            cells += [
                _ratio(values[PUBLER], values.get(NGINX)) if ratios else "-",
                _ratio(values[PUBLER], values.get(NAIVE)) if ratios else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [
        f"{results[k].title} {kind} answered HTTP {t.status}"
        for k in keys
        for kind, t in (("upload", results[k].upload), ("download", results[k].download))
        if t is not None and t.status != 200
    ]
    if failed:
        lines += [
            "",
            "Transfers that did not answer 200 (their rows mean nothing): " + "; ".join(failed),
        ]
    errors = {k: results[k].one.errors + results[k].fifty.errors for k in keys}
    if any(errors.values()):
        lines.append("")
        lines.append(
            "Errors or non-2xx answers during the wrk runs: "
            + ", ".join(f"{results[k].title} {n}" for k, n in errors.items() if n)
        )
    return lines


@dataclass(frozen=True)
class Target:
    """One performance target."""

    name: str
    limit: str
    measured: str
    met: bool | None


def targets(results: dict[str, ServerResult]) -> list[Target]:
    """The targets, measured on publer-proxy in this run."""
    p = results.get(PUBLER)
    if p is None:
        return []
    found: list[Target] = []
    naive, upstream = results.get(NAIVE), results.get(UPSTREAM)
    if naive:
        x = p.fifty.rps / naive.fifty.rps
        found.append(
            Target("throughput at 50 connections vs the naive proxy", "≥ 4x", f"{x:.2f}x", x >= 4)
        )
    if upstream:
        added = p.one.p50_ms - upstream.one.p50_ms
        found.append(
            Target(
                "added p50 latency over the upstream alone, 1 connection",
                "≤ 1 ms",
                f"{added:.3f} ms",
                added <= 1,
            )
        )
    spread = p.fifty.p99_ms / p.fifty.p50_ms
    found.append(Target("p99 / p50 at 50 connections", "≤ 5x", f"{spread:.2f}x", spread <= 5))
    transfers = [t for t in (p.upload, p.download) if t is not None]
    if transfers:
        worst = max(t.growth_mib for t in transfers)
        found.append(
            Target(
                f"RSS growth while streaming {transfers[0].mib:g} MiB (worst of up and down)",
                "≤ 20 MiB",
                f"{worst:.1f} MiB",
                worst <= 20,
            )
        )
    found.append(
        Target(
            "idle RSS, after the load runs",
            "≤ 60 MiB",
            f"{p.idle_rss_mib:.1f} MiB",
            p.idle_rss_mib <= 60,
        )
    )
    if p.startup_median is not None:
        s = p.startup_median
        found.append(
            Target(
                "process start to /readyz 200 (key read from Vault)",
                "≤ 1.5 s",
                f"{s:.2f} s",
                s <= 1.5,
            )
        )
    return found


def targets_table(found: Sequence[Target]) -> list[str]:
    """The targets as a table."""
    lines = ["| target | limit | measured | met |", "|---|---|---:|---|"]
    for t in found:
        met = "-" if t.met is None else ("yes" if t.met else "**NO**")
        lines.append(f"| {t.name} | {t.limit} | {t.measured} | {met} |")
    return lines


def variants_table(variants: dict[str, ServerResult], naive: ServerResult | None) -> list[str]:
    """publer-proxy from each checkout, same run, same load."""
    head = (
        "| checkout | req/s @1 | p50 ms @1 | req/s @50 | p50 ms @50 | p99 ms @50"
        " | CPU s/1k req | ÷ naive @50 | idle RSS MiB | upload growth MiB | download growth MiB |"
    )
    lines = [head, "|---|" + "---:|" * 10]
    for name, r in variants.items():
        ratio = f"{r.fifty.rps / naive.fifty.rps:.2f}x" if naive else "-"
        up = f"{r.upload.growth_mib:.1f}" if r.upload else "-"
        down = f"{r.download.growth_mib:.1f}" if r.download else "-"
        lines.append(
            f"| {name} | {r.one.rps:,.0f} | {r.one.p50_ms:.3f} | {r.fifty.rps:,.0f} |"
            f" {r.fifty.p50_ms:.2f} | {r.fifty.p99_ms:.2f} | {r.fifty.cpu_per_1k:.3f} | {ratio} |"
            f" {r.idle_rss_mib:.1f} | {up} | {down} |"
        )
    return lines
