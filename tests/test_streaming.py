"""Bodies stream both ways: 50 MiB through the proxy without its memory growing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.bao import Bao
from tests.servers import Proxy, Sandbox, proxy_config, start_proxy

BODY_MIB = 50
CHUNK = 256 * 1024


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples a process's RSS in a thread while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        """How much the RSS grew above its level at the start, in MiB."""
        return (self.peak - self.baseline) / 2**20


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, sandbox: Sandbox
) -> Iterator[Proxy]:
    """A proxy at info level (debug logs of every chunk would measure the logger)."""
    config = proxy_config(bao.url, sandbox.url, token_file=token_file)
    config["logging"]["level"] = "info"
    server = start_proxy(tmp_path_factory.mktemp("stream"), config)
    # Warm the pool and the code paths, so the baseline is the steady state.
    for _ in range(20):
        httpx.get(f"{server.url}/api/v1/media?sandbox_bytes=1000000")
    yield server
    server.stop()


def _multipart(total: int, boundary: bytes) -> tuple[Iterator[bytes], int]:
    head = (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="video.mp4"\r\n'
        b"Content-Type: video/mp4\r\n\r\n"
    )
    tail = b"\r\n--" + boundary + b"--\r\n"

    def parts() -> Iterator[bytes]:
        yield head
        sent = 0
        block = bytes(range(256)) * (CHUNK // 256)
        while sent < total:
            piece = block[: min(CHUNK, total - sent)]
            sent += len(piece)
            yield piece
        yield tail

    return parts(), len(head) + total + len(tail)


def test_upload_streams_with_flat_memory(proxy: Proxy, sandbox: Sandbox) -> None:
    """A 50 MiB multipart upload reaches Publer whole; the proxy's RSS stays flat."""
    sandbox.clear()
    total = BODY_MIB * 2**20
    parts, length = _multipart(total, b"publer-proxy-boundary")
    with PeakRss(proxy.process.pid) as rss:
        answer = httpx.post(
            f"{proxy.url}/api/v1/media",
            content=parts,
            headers={
                "Content-Type": "multipart/form-data; boundary=publer-proxy-boundary",
                "Content-Length": str(length),
            },
            timeout=120,
        )
    assert answer.status_code == 200, answer.text
    [record] = sandbox.requests()
    assert record["body_bytes"] == length
    assert rss.growth_mib < 20, f"RSS grew {rss.growth_mib:.1f} MiB for a {BODY_MIB} MiB body"


def test_download_streams_with_flat_memory(proxy: Proxy) -> None:
    """A 50 MiB answer reaches the client whole; the proxy's RSS stays flat."""
    total = BODY_MIB * 2**20
    received = 0
    with (
        PeakRss(proxy.process.pid) as rss,
        httpx.stream(
            "GET", f"{proxy.url}/api/v1/media?sandbox_bytes={total}", timeout=120
        ) as answer,
    ):
        assert answer.status_code == 200
        for chunk in answer.iter_raw():
            received += len(chunk)
    assert received == total
    assert rss.growth_mib < 20, f"RSS grew {rss.growth_mib:.1f} MiB for a {BODY_MIB} MiB body"


def test_content_encoding_passes_untouched(proxy: Proxy, sandbox: Sandbox) -> None:
    """The client's Accept-Encoding is forwarded, and without one the proxy asks for
    identity, so no body is ever decompressed or compressed on the way."""
    sandbox.clear()
    httpx.get(f"{proxy.url}/api/v1/posts", headers={"Accept-Encoding": "gzip"})
    with httpx.Client() as client:
        request = client.build_request("GET", f"{proxy.url}/api/v1/posts")
        del request.headers["accept-encoding"]
        client.send(request)
    first, second = sandbox.requests()
    assert [v for k, v in first["headers"] if k == "accept-encoding"] == ["gzip"]
    assert [v for k, v in second["headers"] if k == "accept-encoding"] == ["identity"]
