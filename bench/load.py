"""Load for the servers under test: wrk for small requests, streamed 200 MiB transfers.

wrk reports through bench/wrk_report.lua (one JSON line, latencies in microseconds). The
transfers are plain http.client calls from this process, while a thread samples the
server's resident memory every few milliseconds.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from stack import BENCH_DIR, Server, pinned

MIB = 1024 * 1024
CHUNK = 256 * 1024
RSS_SAMPLE_SECONDS = 0.005


@dataclass(frozen=True)
class WrkResult:
    """One wrk run against one server."""

    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # connect, read, write, timeouts and non-2xx/3xx answers
    cpu_seconds: float  # the server's CPU time during the run
    cpu_per_1k: float  # CPU seconds per 1,000 requests


def run_wrk(
    server: Server,
    path: str,
    *,
    connections: int,
    seconds: float,
    headers: dict[str, str],
    cpus: str | None,
    threads: int = 1,
) -> WrkResult:
    """wrk -c connections for `seconds` against server.url + path."""
    command = ["wrk", "--latency", "-t", str(threads), "-c", str(connections)]
    command += ["-d", f"{max(1, round(seconds))}s", "--timeout", "10s"]
    command += ["-s", str(BENCH_DIR / "wrk_report.lua")]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(server.url + path)
    cpu_before = server.cpu()
    done = subprocess.run(pinned(command, cpus), capture_output=True, text=True, check=False)
    cpu_used = server.cpu() - cpu_before
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed on {server.name}:\n{done.stdout}\n{done.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    requests = int(data["requests"])
    duration = data["duration_us"] / 1e6
    errors = sum(
        int(data[k])
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return WrkResult(
        connections=connections,
        requests=requests,
        seconds=duration,
        rps=requests / duration,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors=errors,
        cpu_seconds=cpu_used,
        cpu_per_1k=cpu_used / requests * 1000 if requests else float("nan"),
    )


@dataclass(frozen=True)
class Transfer:
    """One streamed transfer through a server, with the server's memory meanwhile."""

    status: int
    mib: float
    seconds: float
    rss_before_mib: float
    rss_peak_mib: float

    @property
    def growth_mib(self) -> float:
        """How far the server's RSS rose above where it was before the transfer."""
        return self.rss_peak_mib - self.rss_before_mib

    @property
    def mib_per_s(self) -> float:
        """Transfer rate."""
        return self.mib / self.seconds if self.seconds else float("nan")


class _PeakRss:
    """Samples a server's RSS in a thread until stopped; keeps the highest value."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pids = server.pids()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from stack import rss_bytes

        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pids))
            time.sleep(RSS_SAMPLE_SECONDS)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss())


def _measured(server: Server, mib: float, transfer: Callable[[], int]) -> Transfer:
    before = server.rss()
    with _PeakRss(server) as peak:
        started = time.perf_counter()
        status = transfer()
        seconds = time.perf_counter() - started
    return Transfer(status, mib, seconds, before / MIB, peak.peak / MIB)


def _connection(server: Server, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(server.url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def _filler(size: int) -> Iterator[bytes]:
    block = bytes(range(256)) * (CHUNK // 256)
    left = size
    while left > 0:
        piece = block[: min(CHUNK, left)]
        left -= len(piece)
        yield piece


def upload(server: Server, path: str, size: int, headers: dict[str, str]) -> Transfer:
    """POST a multipart/form-data body holding a `size`-byte file, streamed."""
    boundary = "----publer-proxy-bench-7d1f0c2a9b"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="bench.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def send() -> int:
        connection = _connection(server, timeout=120)
        try:
            connection.putrequest("POST", path, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
            connection.putheader("Content-Length", str(len(head) + size + len(tail)))
            connection.endheaders()
            connection.send(head)
            for piece in _filler(size):
                connection.send(piece)
            connection.send(tail)
            answer = connection.getresponse()
            answer.read()
            return answer.status
        finally:
            connection.close()

    return _measured(server, size / MIB, send)


def download(server: Server, path: str, size: int, headers: dict[str, str]) -> Transfer:
    """GET a large answer and read it to the end, checking its length."""

    def fetch() -> int:
        connection = _connection(server, timeout=120)
        try:
            connection.request("GET", path, headers=headers)
            answer = connection.getresponse()
            buffer = bytearray(MIB)
            view = memoryview(buffer)
            received = 0
            while read := answer.readinto(view):
                received += read
            if received != size:
                raise RuntimeError(f"{server.name}: {received} bytes received, {size} expected")
            return answer.status
        finally:
            connection.close()

    return _measured(server, size / MIB, fetch)
