"""`make bench`, forward-proxy part: what a tunnel adds, and handshakes per second.

A client that hard-codes https://app.publer.com goes through the forward proxy's tunnel
(CONNECT, TLS ended by the proxy, the request forwarded over TLS to the origin); the origin
is nginx over TLS, posing as app.publer.com (dialled through `upstream.connect_to`). With one
connection kept alive, after its handshake, the median latency of GET /api/v1/posts through
the tunnel is compared with the same client against the origin alone (target: at most 2 ms
more). Then new tunnels are opened one after another (CONNECT, TLS handshake, one request)
for handshakes per second.

Results: the report on stdout, and the figures with the date, commit, machine and command
in bench/results/<UTC date>-<commit>-tunnel.json (see bench/results.py).
"""

from __future__ import annotations

import argparse
import http.client
import ssl
import statistics
import sys
import tempfile
import time
from base64 import b64encode
from pathlib import Path
from typing import Any

import results
import yaml
from run import posts_page
from stack import (
    BENCH_DIR,
    CLIENT_TOKEN,
    WORKSPACE,
    _nginx,
    _render,
    _spawn,
    _user_directive,
    free_port,
    pinned,
    vault_with_key,
    wait_status,
)

from proxy.dev.forward import PUBLER_HOST, stand_in_tls
from proxy.policy import hash_token

PATH = "/api/v1/posts?page=0&state=scheduled"
TARGET_ADDED_P50_MS = 2.0


def timed_requests(connection: http.client.HTTPSConnection, count: int) -> list[float]:
    """Milliseconds per GET on one kept-alive connection."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("GET", PATH, headers={"Host": PUBLER_HOST})
        answer = connection.getresponse()
        answer.read()
        times.append((time.perf_counter() - started) * 1000)
        assert answer.status == 200, answer.status
    return times


def tunnel_connection(proxy_port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    """An HTTPS connection to app.publer.com through the forward proxy, as HTTPS_PROXY makes."""
    connection = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=context, timeout=10)
    basic = b64encode(f"bench:{CLIENT_TOKEN}".encode()).decode()
    connection.set_tunnel(PUBLER_HOST, 443, headers={"Proxy-Authorization": f"Basic {basic}"})
    return connection


def main() -> int:
    """Measure, print a short report, write its results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per latency run")
    parser.add_argument("--handshake-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="publer-bench-tunnel-") as tmp:
        work = Path(tmp)
        cert, key = stand_in_tls(work)
        www = work / "www" / "api" / "v1"
        www.mkdir(parents=True)
        (www / "posts").write_bytes(posts_page())
        origin_port = free_port()
        conf = _render(
            BENCH_DIR / "nginx" / "tls-upstream.conf",
            {
                "user": _user_directive(),
                "dir": str(work),
                "www": str(work / "www"),
                "port": str(origin_port),
                "cert": str(cert),
                "key": str(key),
                "reset": str(int(time.time()) + 120),
            },
        )
        origin = _nginx("nginx-tls-origin", conf, work, origin_port, None)
        time.sleep(0.5)
        proxy = None
        try:
            with vault_with_key(work / "vault", "pk_bench_" + "0" * 40) as vault:
                proxy_port, forward_port = free_port(), free_port()
                ca_file = work / "proxy-ca.pem"
                config = {
                    "listen": {"host": "127.0.0.1", "port": proxy_port},
                    "upstream": {
                        "url": f"https://{PUBLER_HOST}",
                        "connect_to": f"127.0.0.1:{origin_port}",
                        "ca_file": str(cert),
                    },
                    "forward_proxy": {
                        "port": forward_port,
                        "ca_certificate_file": str(ca_file),
                    },
                    "vault": {
                        "url": vault.url,
                        "auth": {"method": "token", "token_file": str(vault.token_file)},
                    },
                    "credentials": {"publer": {"path": "publer/api"}},
                    "routes": [
                        {
                            "name": "default",
                            "credential": "publer",
                            "workspace_id": WORKSPACE,
                            "scopes": ["posts"],
                            "clients": [
                                {"name": "bench", "token_sha256": hash_token(CLIENT_TOKEN)}
                            ],
                        }
                    ],
                    "rate_limit": {"requests": 1_000_000_000, "per_seconds": 1},
                    "logging": {"format": "json", "level": "info"},
                }
                config_path = work / "proxy.yaml"
                config_path.write_text(yaml.safe_dump(config))
                command = [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)]
                proxy = _spawn(
                    "publer-proxy",
                    pinned(command, None),
                    work / "proxy.log",
                    f"http://127.0.0.1:{proxy_port}",
                )
                wait_status(proxy, "/readyz")
                report, figures = measure(origin_port, forward_port, cert, ca_file, args)
        finally:
            if proxy is not None:
                proxy.stop()
            origin.stop()
    print(report)
    title, _, body = report.partition("\n")
    record = results.record("tunnel", title.removeprefix("## "), body, figures, {})
    print(f"written to {results.save(record, args.out)}", file=sys.stderr)
    return 0


def measure(
    origin_port: int, forward_port: int, origin_ca: Path, proxy_ca: Path, args: argparse.Namespace
) -> tuple[str, dict[str, Any]]:
    """The report (p50/p99 direct and through the tunnel, the difference, handshakes/s)
    and the same figures as numbers."""
    direct_context = ssl.create_default_context(cafile=str(origin_ca))
    tunnel_context = ssl.create_default_context(cafile=str(proxy_ca))
    direct = http.client.HTTPSConnection("127.0.0.1", origin_port, context=direct_context)
    through = tunnel_connection(forward_port, tunnel_context)
    warm = max(100, args.requests // 10)
    timed_requests(direct, warm)
    timed_requests(through, warm)
    # Interleaved halves, so a noisy neighbour hurts both sides alike.
    direct_ms: list[float] = []
    tunnel_ms: list[float] = []
    for _ in range(2):
        direct_ms += timed_requests(direct, args.requests // 2)
        tunnel_ms += timed_requests(through, args.requests // 2)
    direct.close()
    through.close()

    handshakes = 0
    deadline = time.perf_counter() + args.handshake_seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        connection = tunnel_connection(forward_port, tunnel_context)
        timed_requests(connection, 1)
        connection.close()
        handshakes += 1
    per_second = handshakes / (time.perf_counter() - started)

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q) - 1]

    added = statistics.median(tunnel_ms) - statistics.median(direct_ms)
    verdict = "met" if added <= TARGET_ADDED_P50_MS else "MISSED"
    figures = {
        "paths": {
            "origin alone (nginx, TLS)": {
                "p50 ms": statistics.median(direct_ms),
                "p99 ms": pct(direct_ms, 99),
            },
            "through the tunnel": {
                "p50 ms": statistics.median(tunnel_ms),
                "p99 ms": pct(tunnel_ms, 99),
            },
        },
        "added_p50_ms": added,
        "target_added_p50_ms": TARGET_ADDED_P50_MS,
        "new_tunnels_per_second": per_second,
        "handshake_seconds": args.handshake_seconds,
        "requests": args.requests,
    }
    text = "\n".join(
        [
            "## Forward proxy (CONNECT tunnel), 1 connection kept alive",
            "",
            "| path | p50 ms | p99 ms |",
            "|---|---|---|",
            f"| origin alone (nginx, TLS) | {statistics.median(direct_ms):.3f}"
            f" | {pct(direct_ms, 99):.3f} |",
            f"| through the tunnel | {statistics.median(tunnel_ms):.3f}"
            f" | {pct(tunnel_ms, 99):.3f} |",
            "",
            f"Added p50: {added:.3f} ms (target <= {TARGET_ADDED_P50_MS:g} ms: {verdict});"
            f" {args.requests} requests each, after the handshake.",
            f"New tunnels (CONNECT + TLS handshake + one request), one at a time:"
            f" {per_second:.0f} per second over {args.handshake_seconds:g} s.",
            "",
        ]
    )
    return text, figures


if __name__ == "__main__":
    sys.exit(main())
