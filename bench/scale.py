"""`make bench-scale`: publer-proxy with 1,000 routes, 100 credentials and 1,000 clients,
side by side with the same proxy on the one-route config of `make bench`.

Both run against the same upstream (nginx answering like Publer) and the same OpenBao dev
server, which holds 100 keys. In the large config every route has its own prefix and one
of the 1,000 clients; the measured route (in the middle of the table) has all 1,000, and
the load authenticates as the last of them. Measured, as `make bench` does:
  - start to ready: process spawn to the first /readyz 200 (every key read from Vault),
    several times, interleaved;
  - idle RSS after the load runs;
  - wrk at 1 and 50 connections, `--repeat` interleaved rounds, best of each kept.
Targets: start to ready at most 2 s, idle RSS at most 20 MiB above the one-route config,
p50 at 1 connection within 10 % of the one-route figure.

Results: a table on stdout, and the figures with the date, commit, machine and command in
bench/results/<UTC date>-<commit>-scale.json (see bench/results.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hvac
import report
import results
from load import MIB, WrkResult, run_wrk
from run import POSTS_PATH, make_www
from stack import (
    BENCH_DIR,
    CLIENT_TOKEN,
    WORKSPACE,
    Server,
    Vault,
    publer_config,
    spawn_publer,
    start_upstream,
    vault_with_key,
    wait_status,
)

from proxy.policy import hash_token

ROUTES, CREDENTIALS, CLIENTS = 1000, 100, 1000
MEASURED_ROUTE = ROUTES // 2
ONE, LARGE = "one route", f"{ROUTES:,} routes"
START_LIMIT_SECONDS = 2.0
RSS_LIMIT_MIB = 20.0
P50_LIMIT_RATIO = 1.10


def client_token(number: int) -> str:
    """The token of client `number` in the large config."""
    return f"bench-app-{number:04d}-7d1f0c2a9b3e4f5a"


def large_config(vault: Vault, upstream: str, port: int) -> dict[str, Any]:
    """The one-route config grown to ROUTES routes, CREDENTIALS credentials and CLIENTS
    clients; the measured route has them all."""
    config = publer_config(vault, upstream, port)
    clients = [
        {"name": f"app-{n:04d}", "token_sha256": hash_token(client_token(n))}
        for n in range(CLIENTS)
    ]
    config["credentials"] = {
        f"publer-{c:03d}": {"mount": "secret", "path": f"publer/api-{c:03d}"}
        for c in range(CREDENTIALS)
    }
    config["routes"] = [
        {
            "name": f"team-{r:04d}",
            "prefix": f"/team-{r:04d}",
            "credential": f"publer-{r % CREDENTIALS:03d}",
            "workspace_id": WORKSPACE,
            "scopes": ["posts", "media", "accounts", "job_status"],
            # Copies: the file holds no YAML anchors, as an operator's would not.
            "clients": [dict(c) for c in clients] if r == MEASURED_ROUTE else [dict(clients[r])],
        }
        for r in range(ROUTES)
    ]
    return config


def seed_keys(vault: Vault, key: str) -> None:
    """Write the key at each credential's path of the large config."""
    client = hvac.Client(url=vault.url, token=vault.token_file.read_text().strip())
    for c in range(CREDENTIALS):
        client.secrets.kv.v2.create_or_update_secret(
            path=f"publer/api-{c:03d}", secret={"api_key": key}, mount_point="secret"
        )
    client.adapter.close()


@dataclass
class Measured:
    """One config's figures."""

    title: str
    startup_seconds: list[float] = field(default_factory=list)
    one: WrkResult | None = None
    fifty: WrkResult | None = None
    start_rss_mib: float = 0.0
    idle_rss_mib: float = 0.0
    errors: int = 0  # wrk's errors over every run: connect, read, write, timeouts, non-2xx

    @property
    def startup_median(self) -> float:
        """Median start-to-ready seconds."""
        ordered = sorted(self.startup_seconds)
        return ordered[len(ordered) // 2]


class ScaleBench:
    """One run: both configs, the same upstream, Vault and CPUs."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        cpus = os.cpu_count() or 1
        self.pin = cpus >= 2 and not args.no_pin
        self.server_cpus: str | None = "0" if self.pin else None
        self.load_cpus: str | None = (f"1-{cpus - 1}" if cpus > 2 else "1") if self.pin else None
        if self.pin:
            os.sched_setaffinity(0, set(range(1, cpus)))

    def log(self, text: str) -> None:
        """Progress on stderr."""
        print(text, file=sys.stderr, flush=True)

    def spawn(self, title: str, vault: Vault, upstream: str, folder: str) -> Server:
        """publer-proxy on the config `title` names, not yet waited for."""

        def config(port: int) -> dict[str, Any]:
            if title == ONE:
                return publer_config(vault, upstream, port)
            return large_config(vault, upstream, port)

        return spawn_publer(self.workdir / folder, vault, upstream, self.server_cpus, config=config)

    def wrk(self, title: str, server: Server, connections: int, seconds: int) -> WrkResult:
        """GET a page of posts through the route and client the config's load uses."""
        if title == ONE:
            path, token = POSTS_PATH, CLIENT_TOKEN
        else:
            path, token = f"/team-{MEASURED_ROUTE:04d}{POSTS_PATH}", client_token(CLIENTS - 1)
        headers = {"Authorization": f"Bearer-API {token}", "Accept": "application/json"}
        return run_wrk(
            server,
            path,
            connections=connections,
            seconds=seconds,
            headers=headers,
            cpus=self.load_cpus,
        )

    def run(self) -> dict[str, Measured]:
        """Start-up timings, then both proxies under the same interleaved load."""
        a = self.args
        found = {title: Measured(title) for title in (ONE, LARGE)}
        www = make_www(self.workdir / "www", 0)
        key = "pk_bench_" + os.urandom(20).hex()
        upstream = start_upstream(self.workdir / "upstream", www, self.load_cpus)
        servers: dict[str, Server] = {}
        try:
            with vault_with_key(self.workdir / "vault", key) as vault:
                seed_keys(vault, key)
                for run in range(a.startup_runs):
                    for title in found:
                        server = self.spawn(title, vault, upstream.url, f"startup-{run}")
                        try:
                            found[title].startup_seconds.append(wait_status(server, "/readyz"))
                        finally:
                            server.stop()
                for title, measured in found.items():
                    times = ", ".join(f"{t:.2f}" for t in measured.startup_seconds)
                    self.log(f"-- {title}: start to /readyz {times} s")
                for title in found:
                    servers[title] = self.spawn(title, vault, upstream.url, title.replace(" ", "-"))
                    wait_status(servers[title], "/readyz")
                    found[title].start_rss_mib = servers[title].rss() / MIB
                self.load(servers, found)
                time.sleep(1.0)
                for title, server in servers.items():
                    found[title].idle_rss_mib = server.rss() / MIB
        finally:
            for server in servers.values():
                server.stop()
            upstream.stop()
        return found

    def load(self, servers: dict[str, Server], found: dict[str, Measured]) -> None:
        """Warm-up, then `--repeat` rounds at 1 and 50 connections; the best of each."""
        a = self.args
        runs: dict[str, dict[int, list[WrkResult]]] = {t: {1: [], 50: []} for t in servers}
        for title, server in servers.items():
            self.wrk(title, server, 50, a.warmup)
        for round_ in range(1, a.repeat + 1):
            for connections in (1, 50):
                for title, server in servers.items():
                    run = self.wrk(title, server, connections, a.seconds)
                    runs[title][connections].append(run)
                    found[title].errors += run.errors
                    self.log(
                        f"   round {round_}, {connections} conn., {title}: {run.rps:,.0f} req/s,"
                        f" p50 {run.p50_ms:.3f} ms, p99 {run.p99_ms:.3f} ms, errors {run.errors}"
                    )
        for title, by_count in runs.items():
            found[title].one = min(by_count[1], key=lambda r: r.p50_ms)
            found[title].fifty = max(by_count[50], key=lambda r: r.rps)


TITLE = f"publer-proxy at scale: {ROUTES:,} routes, {CREDENTIALS} credentials, {CLIENTS:,} clients"


def render_body(args: argparse.Namespace, found: dict[str, Measured]) -> str:
    """The figures in Markdown: both configs, then the targets."""
    one, large = found[ONE], found[LARGE]
    assert one.one and one.fifty and large.one and large.fifty
    lines = [
        f"wrk, 1 thread, {args.repeat} interleaved round(s) of {args.seconds} s after a"
        f" {args.warmup} s warm-up, GET a page of posts; at 1 connection the round with the"
        " lowest p50 is kept, at 50 the one with the most requests. Start to ready: median"
        f" of {args.startup_runs} interleaved starts.",
        "",
        "| config | start to ready s | idle RSS MiB | p50 ms @1 | req/s @1 | req/s @50 |"
        " p99 ms @50 | CPU s/1k req | wrk errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in (one, large):
        assert m.one and m.fifty
        lines.append(
            f"| {m.title} | {m.startup_median:.2f} | {m.idle_rss_mib:.1f} |"
            f" {m.one.p50_ms:.3f} | {m.one.rps:,.0f} | {m.fifty.rps:,.0f} |"
            f" {m.fifty.p99_ms:.2f} | {m.fifty.cpu_per_1k:.3f} | {m.errors} |"
        )
    rss = large.idle_rss_mib - one.idle_rss_mib
    p50 = large.one.p50_ms / one.one.p50_ms
    start = large.startup_median
    lines += [
        "",
        "| target | limit | measured | met |",
        "|---|---|---:|---|",
        f"| start to ready, large config | ≤ {START_LIMIT_SECONDS:g} s | {start:.2f} s |"
        f" {'yes' if start <= START_LIMIT_SECONDS else 'no'} |",
        f"| (start to ready over the one-route config) | - | {start - one.startup_median:+.2f} s"
        " | - |",
        f"| idle RSS over the one-route config | ≤ {RSS_LIMIT_MIB:g} MiB | {rss:.1f} MiB |"
        f" {'yes' if rss <= RSS_LIMIT_MIB else 'no'} |",
        f"| p50 at 1 connection ÷ one-route p50 | ≤ {P50_LIMIT_RATIO:.2f} | {p50:.3f} |"
        f" {'yes' if p50 <= P50_LIMIT_RATIO else 'no'} |",
    ]
    return "\n".join(lines) + "\n"


def render(args: argparse.Namespace, found: dict[str, Measured], machine: dict[str, str]) -> str:
    """The Markdown report for the terminal: the title, the figures, the machine."""
    return "\n".join(
        [
            f"## {TITLE}",
            "",
            render_body(args, found),
            f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), Linux {machine['kernel']},"
            f" Python {machine['python']}; load average {machine['load']} at the end."
            f" Measured {machine['date']}.",
            "",
        ]
    )


def parse_args() -> argparse.Namespace:
    """The command line of bench/scale.py."""
    parser = argparse.ArgumentParser(description="publer-proxy with a large config.")
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--startup-runs", type=int, default=5, help="start timings (default 5)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return parser.parse_args()


def main() -> int:
    """Run both configs, print the table, save the results."""
    args = parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: `{tool}` is not installed (Debian package {tool})", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="publer-bench-scale-"))
    bench = ScaleBench(args, workdir)
    try:
        found = bench.run()
    finally:
        if args.keep:
            bench.log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = render(args, found, report.machine())
    figures = {
        "options": {k: str(v) for k, v in vars(args).items()},
        "configs": {k: asdict(v) for k, v in found.items()},
    }
    record = results.record("scale", TITLE, render_body(args, found), figures, {})
    print(text)
    print(f"written to {results.save(record, args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
