"""`make bench`: publer-proxy measured side by side with nginx and a naive proxy.

One run sets up everything on loopback and tears it down again:
  - the upstream: nginx answering like Publer from static files (a page of posts as JSON,
    a 200 MiB file at GET /api/v1/media, uploads read to the end at POST /api/v1/media);
  - nginx proxy_pass with a fixed Authorization header, the cost of one proxy hop;
  - a naive Starlette + httpx proxy (bench/naive_proxy.py);
  - publer-proxy with a realistic config: an OpenBao dev server holding the key, a route
    with scope checks and a client token, JSON logs to a file, metrics on.
Each server is warmed up, then measured with wrk at 1 and 50 connections, for CPU time per
request, idle memory, and memory while 200 MiB stream up and down through it. publer-proxy
is also timed from process start to /readyz 200. Every server runs one process (one nginx
worker, one uvicorn worker); on a machine with 2+ CPUs the server under test gets CPU 0
and wrk, the upstream and this script the others.

Results: one table on stdout, and the figures with the date, commit, machine and command
in bench/results/<UTC date>-<commit>-proxy.json (see bench/results.py), which the docs'
benchmarks page shows. `--variants tree:PATH` adds publer-proxy from another checkout
(see bench/launch.py), interleaved in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hotspots
import report
import results
from load import MIB, WrkResult, download, run_wrk, upload
from report import NAIVE, NGINX, PUBLER, TITLES, UPSTREAM, ServerResult
from stack import (
    BENCH_DIR,
    CLIENT_TOKEN,
    Server,
    Vault,
    spawn_publer,
    start_naive,
    start_nginx_proxy,
    start_publer,
    start_upstream,
    vault_with_key,
    wait_status,
)

POSTS_PATH = "/api/v1/posts?page=0&state=scheduled"
MEDIA_PATH = "/api/v1/media"
DOWNLOAD_PATH = "/api/v1/media?page=0&type=video"
CLIENT_HEADERS = {"Authorization": f"Bearer-API {CLIENT_TOKEN}", "Accept": "application/json"}
IDLE_SETTLE_SECONDS = 1.0


def posts_page() -> bytes:
    """A page of GET /posts as Publer answers it (about 1.4 KB of JSON)."""
    posts: list[dict[str, Any]] = [
        {
            "id": f"6650f1c2a9e7c8001f36e3{i:02x}",
            "text": "New week, new features: scheduling threads is now live. #publer #launch",
            "state": "scheduled",
            "type": "status",
            "account_id": "5f8d7a62c9e77e001f36e3b2",
            "network": "twitter",
            "scheduled_at": f"2025-06-{10 + i:02d}T09:30:00.000+00:00",
            "link": None,
            "media": [],
            "user": {"id": "5f8d7a62c9e77e001f36e3c3", "name": "Scheduler"},
        }
        for i in range(4)
    ]
    return json.dumps({"posts": posts, "total": len(posts)}, separators=(",", ":")).encode()


def make_www(root: Path, stream_bytes: int) -> Path:
    """The upstream's static files."""
    api = root / "api" / "v1"
    api.mkdir(parents=True, exist_ok=True)
    (api / "posts").write_bytes(posts_page())
    block = os.urandom(MIB)
    with (api / "media").open("wb") as media:
        for _ in range(stream_bytes // MIB):
            media.write(block)
        media.write(block[: stream_bytes % MIB])
    return root


class Bench:
    """One benchmark run: its options, its CPUs and its work folder."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.stream_bytes = int(args.stream_mib * MIB)
        cpus = os.cpu_count() or 1
        self.pin = cpus >= 2 and not args.no_pin
        self.server_cpus: str | None = "0" if self.pin else None
        self.load_cpus: str | None = (f"1-{cpus - 1}" if cpus > 2 else "1") if self.pin else None
        if self.pin:
            os.sched_setaffinity(0, set(range(1, cpus)))

    def title(self, key: str) -> str:
        """A server's name in the table: its title, or publer-proxy [variant]."""
        return TITLES.get(key) or f"{PUBLER} [{key}]"

    def log(self, text: str) -> None:
        """Progress on stderr, so stdout holds only the table."""
        print(text, file=sys.stderr, flush=True)

    def wrk(self, server: Server, connections: int, seconds: int) -> WrkResult:
        """One wrk run of GET POSTS_PATH against `server`."""
        return run_wrk(
            server,
            POSTS_PATH,
            connections=connections,
            seconds=seconds,
            headers=CLIENT_HEADERS,
            cpus=self.load_cpus,
        )

    def load_rounds(self, servers: dict[str, Server]) -> dict[str, tuple[WrkResult, WrkResult]]:
        """wrk at 1 and 50 connections on every server, `--repeat` rounds interleaved, so
        that a noisy minute on a shared machine hits every server alike; the best run of
        each server and connection count is kept."""
        a = self.args
        runs: dict[str, dict[int, list[WrkResult]]] = {k: {1: [], 50: []} for k in servers}
        for key, server in servers.items():
            self.log(f"-- {self.title(key)}: warm-up {a.warmup} s")
            self.wrk(server, 50, a.warmup)
        for round_ in range(1, a.repeat + 1):
            for connections in (1, 50):
                for key, server in servers.items():
                    run = self.wrk(server, connections, a.seconds)
                    runs[key][connections].append(run)
                    self.log(
                        f"   round {round_}, {connections} conn., {self.title(key)}:"
                        f" {run.rps:,.0f} req/s, p50 {run.p50_ms:.3f} ms, p99 {run.p99_ms:.3f} ms,"
                        f" {run.cpu_per_1k:.3f} CPU s/1k, errors {run.errors}"
                    )
        return {
            key: (max(found[1], key=lambda r: r.rps), max(found[50], key=lambda r: r.rps))
            for key, found in runs.items()
        }

    def transfers(self, result: ServerResult, server: Server) -> None:
        """The streamed upload and download, with the server's memory meanwhile."""
        if not self.stream_bytes:
            return
        headers = {"Authorization": CLIENT_HEADERS["Authorization"]}
        result.upload = up = upload(server, MEDIA_PATH, self.stream_bytes, headers)
        result.download = down = download(server, DOWNLOAD_PATH, self.stream_bytes, headers)
        self.log(
            f"-- {result.title}: upload {up.status}, peak RSS {up.rss_peak_mib:.1f} MiB"
            f" (+{up.growth_mib:.1f}), {up.mib_per_s:.0f} MiB/s; download {down.status},"
            f" peak RSS {down.rss_peak_mib:.1f} MiB (+{down.growth_mib:.1f}),"
            f" {down.mib_per_s:.0f} MiB/s"
        )

    def measure_all(self, servers: dict[str, Server]) -> dict[str, ServerResult]:
        """Start RSS, the interleaved load rounds, idle RSS after them, the transfers."""
        start_rss = {key: server.rss() / MIB for key, server in servers.items()}
        best = self.load_rounds(servers)
        time.sleep(IDLE_SETTLE_SECONDS)
        measured = {}
        for key, server in servers.items():
            one, fifty = best[key]
            title = self.title(key)
            measured[key] = ServerResult(key, title, one, fifty, server.rss() / MIB, start_rss[key])
        for key, server in servers.items():
            self.transfers(measured[key], server)
        return measured

    def profile(self, server: Server) -> list[str]:
        """py-spy samples of publer-proxy under 50 connections, summed by component."""
        seconds = self.args.profile
        raw = self.workdir / "profile.raw"
        job = threading.Thread(
            target=run_wrk,
            args=(server, POSTS_PATH),
            kwargs={
                "connections": 50,
                "seconds": seconds + 2,
                "headers": CLIENT_HEADERS,
                "cpus": self.load_cpus,
            },
        )
        job.start()
        time.sleep(1)
        try:
            found = hotspots.record(server.process.pid, seconds, raw)
        finally:
            job.join()
        if not found:
            self.log("-- py-spy is not installed: no profile (pip install py-spy)")
            return []
        self.args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw, self.args.out / "profile.raw")
        return hotspots.summarize(raw)

    def startup_times(self, vault: Vault, upstream: str) -> list[float]:
        """Seconds from spawning publer-proxy to its first /readyz 200, several times."""
        times = []
        for _ in range(self.args.startup_runs):
            server = spawn_publer(self.workdir / "startup", vault, upstream, self.server_cpus)
            try:
                times.append(wait_status(server, "/readyz"))
            finally:
                server.stop()
        self.log(f"-- publer-proxy start to /readyz: {', '.join(f'{t:.2f}' for t in times)} s")
        return times

    def run(self) -> Results:
        """Start every server, measure them side by side, stop them."""
        wanted = set(self.args.only.split(",")) if self.args.only else set(TITLES)
        found = Results()
        www = make_www(self.workdir / "www", self.stream_bytes)
        key = "pk_bench_" + os.urandom(20).hex()
        work, cpus = self.workdir, self.server_cpus
        upstream = start_upstream(work / "upstream", www, self.load_cpus)
        servers: dict[str, Server] = {}
        try:
            with vault_with_key(work / "vault", key) as vault:
                startup = self.startup_times(vault, upstream.url) if PUBLER in wanted else []
                if UPSTREAM in wanted:
                    servers[UPSTREAM] = upstream
                if NGINX in wanted:
                    servers[NGINX] = start_nginx_proxy(work / "nginx", upstream.url, key, cpus)
                if NAIVE in wanted:
                    servers[NAIVE] = start_naive(work / "naive", upstream.url, key, cpus)
                if PUBLER in wanted:
                    servers[PUBLER] = start_publer(work / "publer", vault, upstream.url, cpus)
                for variant in filter(None, self.args.variants.split(",")):
                    servers[variant] = start_publer(
                        work / ("publer-" + re.sub(r"[^\w.-]", "_", variant)),
                        vault,
                        upstream.url,
                        cpus,
                        variant,
                    )
                measured = self.measure_all(servers)
                if PUBLER in measured:
                    measured[PUBLER].startup_seconds = startup
                    if self.args.profile:
                        found.profile = self.profile(servers[PUBLER])
                variants = set(filter(None, self.args.variants.split(",")))
                found.servers = {k: v for k, v in measured.items() if k not in variants}
                found.variants = {k: v for k, v in measured.items() if k in variants}
        finally:
            for server in servers.values():
                if server is not upstream:
                    server.stop()
            upstream.stop()
        return found


@dataclass
class Results:
    """What one run measured."""

    servers: dict[str, ServerResult] = field(default_factory=dict)
    variants: dict[str, ServerResult] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)


def placement(bench: Bench) -> str:
    """Where the processes ran."""
    where = (
        f"server under test pinned to CPU {bench.server_cpus}; wrk, the upstream nginx and"
        f" the bench script on CPU {bench.load_cpus}"
        if bench.pin
        else "no CPU pinning"
    )
    return f"{where}; one worker process per server"


def render_body(bench: Bench, found: Results) -> str:
    """The figures in Markdown: the table, the targets, the variants, the profile."""
    a = bench.args
    servers = found.servers
    lines = [
        f"wrk, 1 thread, best of {a.repeat} interleaved run(s) of {a.seconds} s after a"
        f" {a.warmup} s warm-up, GET `{POSTS_PATH}` (a {len(posts_page()):,}-byte JSON page with"
        f" Publer's headers); transfers of {a.stream_mib:g} MiB through POST and GET"
        f" `{MEDIA_PATH}`. Ratios are publer-proxy's value divided by the other's.",
        "",
        *report.main_table(servers, a.stream_mib),
    ]
    targets = report.targets(servers)
    if targets:
        lines += ["", *report.targets_table(targets)]
    if found.variants:
        lines += ["", "publer-proxy from other checkouts (same run, same load):", ""]
        lines += report.variants_table(found.variants, servers.get(NAIVE))
    if found.profile:
        lines += ["", f"Where publer-proxy's time goes (py-spy, {a.profile} s at 50 connections):"]
        lines += ["", *found.profile]
    return "\n".join(lines) + "\n"


def render(bench: Bench, found: Results, machine: dict[str, str]) -> str:
    """The Markdown report for the terminal: the figures, then the machine."""
    m = machine
    return "\n".join(
        [
            "## publer-proxy benchmark",
            "",
            render_body(bench, found),
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python"
            f" {m['python']}, nginx {m['nginx']}, wrk {m['wrk']}; {placement(bench)};"
            f" load average {m['load']} at the end of the run.",
            f"Packages: {m['packages']}. Measured {m['date']}.",
            "",
        ]
    )


def parse_args() -> argparse.Namespace:
    """The command line of bench/run.py."""
    parser = argparse.ArgumentParser(
        description="Benchmark publer-proxy against nginx and a naive proxy."
    )
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds (default 3)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="interleaved rounds of wrk runs; each server's best is kept (default 3)",
    )
    parser.add_argument(
        "--stream-mib", type=float, default=200.0, help="transfer size, 0 to skip (default 200)"
    )
    parser.add_argument(
        "--startup-runs", type=int, default=5, help="publer-proxy start timings (default 5)"
    )
    parser.add_argument(
        "--only", default="", help="comma list of: upstream, nginx, naive, publer-proxy"
    )
    parser.add_argument(
        "--variants",
        default="",
        help="also measure publer-proxy from other checkouts (comma list of tree:PATH);"
        " see bench/launch.py",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="also sample publer-proxy with py-spy for this long at 50 connections",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return parser.parse_args()


def main() -> int:
    """Run the benchmark, print the table, save the results."""
    args = parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: `{tool}` is not installed (Debian package {tool})", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="publer-bench-"))
    bench = Bench(args, workdir)
    try:
        found = bench.run()
    finally:
        if args.keep:
            bench.log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = report.machine()
    text = render(bench, found, machine)
    figures = {
        "options": {k: str(v) for k, v in vars(args).items()},
        "results": {k: asdict(v) for k, v in found.servers.items()},
        "variants": {k: asdict(v) for k, v in found.variants.items()},
        "targets": [asdict(t) for t in report.targets(found.servers)],
        "profile": found.profile,
    }
    extra = {k: machine[k] for k in ("nginx", "wrk", "packages")}
    record = results.record(
        "proxy",
        "publer-proxy beside nginx and a naive proxy",
        render_body(bench, found),
        figures,
        {**extra, "placement": placement(bench)},
    )
    path = results.save(record, args.out)
    print(text)
    bench.log(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
