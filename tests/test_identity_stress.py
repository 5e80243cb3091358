"""Identity under stress: no response ever reaches a request it does not belong to.

Many concurrent requests each carry a nonce that the scripted origin echoes in a header
and in the body. The origin picks, from the nonce, a framing (Content-Length, chunked,
close-delimited), delays, resets before or inside the response, bytes after the response
and late bodies of a 204; some clients leave before their response. Whatever happens to a
request, what it receives is its own response, the proxy's refusal, or a cut: never a byte
of another request's response and never the origin's stray bytes. Run on uvloop (as in
production) and on asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.bao import Bao
from tests.origins import Close, Origin, Request, Reset, Sleep, Step, Write
from tests.servers import Proxy, proxy_config, start_proxy

REQUESTS = 400
CONCURRENCY = 40
STRAY = b"STRAY"  # what the origin sends outside any response
NONCE = re.compile(rb"n[0-9a-f]{32}")


def _rng(nonce: str) -> random.Random:
    return random.Random(hashlib.sha256(nonce.encode()).digest())


def _framed(nonce: str, body: bytes, kind: str) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nX-Nonce: {nonce}\r\n"
    if kind == "length":
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    if kind == "chunked":
        chunks = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:7], body[7:]) if p)
        return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"
    return f"{head}\r\n".encode() + body  # close-delimited


def script(request: Request) -> list[Step]:
    """A behaviour chosen from the request's nonce (so a retry repeats it)."""
    nonce = request.query["nonce"]
    if "calm" in request.query:
        return [Write(_framed(nonce, nonce.encode(), "length"))]
    rng = _rng(nonce)
    body = nonce.encode() * rng.choice([1, 3, 2000])  # 2000: 66 kB, streamed back
    steps: list[Step] = []
    if rng.random() < 0.3:
        steps.append(Sleep(rng.uniform(0, 0.03)))
    fault = rng.choices(
        ["none", "reset-before", "reset-inside", "stray-after", "late-204", "close-framed"],
        [60, 6, 6, 12, 8, 8],
    )[0]
    if fault == "reset-before":
        return [*steps, Reset()]
    if fault == "late-204":
        fake = f"HTTP/1.1 200 OK\r\nX-Nonce: {STRAY.decode()}\r\nContent-Length: 5\r\n\r\n"
        late = (fake.encode() + STRAY).ljust(90, b"x")
        head = f"HTTP/1.1 204 No Content\r\nX-Nonce: {nonce}\r\nContent-Length: 90\r\n\r\n"
        return [*steps, Write(head.encode()), Sleep(rng.uniform(0.005, 0.05)), Write(late)]
    kind = "close" if fault == "close-framed" else rng.choice(["length", "chunked"])
    data = _framed(nonce, body, kind)
    if fault == "reset-inside":
        return [*steps, Write(data[: len(data) // 2]), Sleep(0.01), Reset()]
    cut = rng.randrange(len(data))
    steps += [Write(data[:cut]), Sleep(rng.uniform(0, 0.01)), Write(data[cut:])]
    if fault == "stray-after":
        steps += [Sleep(rng.uniform(0, 0.02)), Write(STRAY * 3)]
    if kind == "close":
        steps.append(Close())
    return steps


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    """The scripted origin of this module."""
    with Origin(script) as server:
        yield server


async def _one(client: httpx.AsyncClient, url: str, problems: list[str]) -> None:
    nonce = "n" + uuid.uuid4().hex
    rng = random.Random()
    method = rng.choice(["GET", "POST"])
    target = f"{url}/api/v1/posts?nonce={nonce}"
    content = nonce.encode() if method == "POST" else None
    try:
        if rng.random() < 0.1:
            # A client that leaves: after sending, or after the first bytes of the body.
            async with asyncio.timeout(rng.uniform(0.001, 0.03)):
                async with client.stream(method, target, content=content) as response:
                    async for _ in response.aiter_raw():
                        break
            return
        response = await client.request(method, target, content=content)
    except (httpx.HTTPError, TimeoutError):
        return  # a cut or a refusal of the connection: never someone else's bytes
    seen = set(NONCE.findall(response.content)) | set(
        NONCE.findall(response.headers.get("x-nonce", "").encode())
    )
    if seen - {nonce.encode()} or STRAY in response.content:
        problems.append(f"{method} {nonce}: got {response.status_code} {response.content[:120]!r}")
    if response.status_code in (200, 204) and response.headers.get("x-nonce") != nonce:
        problems.append(f"{method} {nonce}: {response.status_code} without its own nonce")
    if response.status_code == 200 and response.content.replace(nonce.encode(), b""):
        problems.append(f"{method} {nonce}: body {response.content[:120]!r}")


async def _stress(url: str) -> tuple[list[str], int]:
    problems: list[str] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(trust_env=False, timeout=30, limits=limits) as client:

        async def run() -> None:
            async with gate:
                await _one(client, url, problems)

        await asyncio.gather(*(run() for _ in range(REQUESTS)))
        # Afterwards every pooled connection still serves the right responses.
        for _ in range(20):
            nonce = "n" + uuid.uuid4().hex
            ok = await client.get(f"{url}/api/v1/posts?nonce={nonce}&calm=1")
            if ok.headers.get("x-nonce") != nonce:
                problems.append(f"after the storm: {ok.status_code} {ok.content[:80]!r}")
    return problems, REQUESTS


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_every_response_reaches_its_own_request(
    tmp_path: Path, bao: Bao, token_file: Path, origin: Origin, loop: str
) -> None:
    """400 requests, 40 at a time, with random framings, delays, resets, stray bytes, late
    204 bodies and clients leaving: no request receives a byte of another's response."""
    config = proxy_config(bao.url, origin.url, token_file=token_file)
    config["upstream"] = {"url": origin.url, "read_timeout_seconds": 10, "max_connections": 16}
    config["logging"] = {"format": "json", "level": "info"}
    module = "proxy" if loop == "uvloop" else "tests.asyncio_proxy"
    proxy: Proxy = start_proxy(tmp_path, config, module=module)
    try:
        maps = Path(f"/proc/{proxy.process.pid}/maps").read_text()
        assert ("uvloop" in maps) == (loop == "uvloop")  # the loop asked for is the loop run
        before = len(origin.requests)
        problems, sent = asyncio.run(_stress(proxy.url))
        assert problems == [], "\n".join(problems[:20])
        assert len(origin.requests) - before >= sent // 2  # the storm reached the origin
        output = proxy.output()
        for sign in ("Exception in ASGI application", "Fatal error", "forward_failed"):
            assert sign not in output
    finally:
        proxy.stop()
