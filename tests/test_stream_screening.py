"""Secrets in response bodies too large to hold whole: masked as they stream through.

An origin that echoes the key it received in a large body (beyond what the proxy reads
whole before answering), the key split across the chunks the origin writes, must not
hand the key to the client; the body keeps its length, so a Content-Length stays true.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.hop.forwarder import SMALL_RESPONSE_BYTES
from proxy.masking.responses import StreamMask
from proxy.masking.secrets import SecretRegistry
from tests.bao import Bao
from tests.origins import Origin, Request, Sleep, Step, Write
from tests.servers import Proxy, proxy_config, start_proxy

PAD = b"x" * (SMALL_RESPONSE_BYTES + 1000)


def _split_echo(request: Request) -> list[Step]:
    """The received Authorization value, cut in two across writes, after a large padding."""
    echoed = request.headers.get("authorization", "").encode()
    half = len(echoed) // 2
    body = [PAD, b"<" + echoed[:half], echoed[half:] + b">", PAD]
    if request.target.endswith("chunked"):
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        parts = [b"%x\r\n%s\r\n" % (len(part), part) for part in body] + [b"0\r\n\r\n"]
    else:
        length = sum(len(part) for part in body)
        coding = b"Content-Encoding: identity\r\n" if request.target.endswith("identity") else b""
        head = b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n" % (coding, length)
        parts = body
    steps: list[Step] = [Write(head)]
    for part in parts:
        steps += [Write(part), Sleep(0.05)]
    return steps


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path) -> Iterator[Proxy]:
    """The proxy in front of the splitting echo origin."""
    with Origin(_split_echo) as origin:
        config = proxy_config(bao.url, origin.url, token_file=token_file)
        started = start_proxy(tmp_path_factory.mktemp("stream-screening"), config)
        yield started
        started.stop()


@pytest.mark.parametrize("framing", ["length", "chunked", "identity"])
def test_key_split_across_chunks_of_a_large_body_is_masked(
    proxy: Proxy, api_key: str, framing: str
) -> None:
    """A large streamed body echoing the key across two chunks reaches the client masked."""
    answer = httpx.get(f"{proxy.url}/api/v1/posts?state={framing}", timeout=30)
    assert answer.status_code == 200
    body = answer.content
    assert api_key.encode() not in body
    assert api_key[:-4].encode() not in body
    assert len(body) == 2 * len(PAD) + len(f"<Bearer-API {api_key}>")
    assert b"<Bearer-API *" in body and body.count(b"x") >= 2 * len(PAD)
    assert api_key[-4:].encode() + b">" in body  # masked as everywhere: its last 4 shown


def _feed(mask: StreamMask, chunks: list[bytes]) -> bytes:
    return b"".join(mask.feed(chunk) for chunk in chunks) + mask.flush()


def test_stream_mask_masks_a_secret_at_every_split() -> None:
    """Whatever byte the secret is cut at, and in one-byte chunks, it never passes."""
    registry = SecretRegistry()
    secret = "pk_secret_0123456789abcdef"
    registry.add(secret)
    data = b"head " + secret.encode() + b" tail"
    for cut in range(len(data) + 1):
        out = _feed(StreamMask(registry), [data[:cut], data[cut:]])
        assert secret.encode() not in out and len(out) == len(data), cut
        assert out.startswith(b"head ") and out.endswith(b"cdef tail")
    out = _feed(StreamMask(registry), [bytes([b]) for b in data])
    assert secret.encode() not in out and len(out) == len(data)


def test_stream_mask_holds_back_only_a_possible_secret_start() -> None:
    """A chunk that cannot begin a secret passes at once, whole (a stream is not delayed)."""
    registry = SecretRegistry()
    registry.add("pk_secret_0123456789abcdef")
    mask = StreamMask(registry)
    assert mask.feed(b"data: event one\n\n") == b"data: event one\n\n"
    assert mask.feed(b"data: pk_sec") == b"data: "
    assert mask.feed(b"ond\n\n") == b"pk_second\n\n"
    assert mask.flush() == b""
