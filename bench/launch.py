"""`publer-proxy serve` with another upstream transport, for the transport comparison.

Usage: python bench/launch.py VARIANT serve --config PATH

Variants (the shipped code is `shipped`; the others replace `proxy.upstream.make_transport`
before the app is built, so everything else is the code under test):
  shipped          the transport proxy/upstream.py ships
  httpx            httpx.AsyncHTTPTransport (httpcore), sniffio installed
  httpx-nosniffio  the same, with sniffio made unimportable (as on a machine without it:
                   httpcore then retries the import on every request)
  httpx-aiohttp    httpx_aiohttp.AiohttpTransport as published, no adaptation
  aiohttp          aiohttp's pool behind httpx's interface, as shipped before proxy/pool.py
                   (bench/aiohttp_transport.py; reached through httpx.Request like the
                   other variants, so it pays for building one per request)
  tree:PATH        the shipped transport, but the `proxy` package of another checkout at
                   PATH (to measure a change side by side with the current code)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import ssl
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import httpx

VARIANTS = ("shipped", "httpx", "httpx-nosniffio", "httpx-aiohttp", "aiohttp")


class _HideSniffio(importlib.abc.MetaPathFinder):
    """Makes `import sniffio` fail after the same path search a missing module costs."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "sniffio":
            return None
        importlib.machinery.PathFinder.find_spec("sniffio_is_not_installed", path)
        raise ModuleNotFoundError("No module named 'sniffio'", name="sniffio")


def _limits(settings: Any) -> httpx.Limits:
    return httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=30.0,
    )


def _httpx_transport(settings: Any) -> httpx.AsyncBaseTransport:
    return httpx.AsyncHTTPTransport(
        verify=ssl.create_default_context(),
        trust_env=False,
        http1=True,
        http2=False,
        limits=_limits(settings),
        retries=0,
    )


def _httpx_aiohttp_transport(settings: Any) -> httpx.AsyncBaseTransport:
    from httpx_aiohttp import AiohttpTransport

    transport: httpx.AsyncBaseTransport = AiohttpTransport(
        verify=ssl.create_default_context(), trust_env=False, limits=_limits(settings)
    )
    return transport


def main() -> int:
    """Patch the transport for the variant named in argv[1], then run the proxy's CLI."""
    variant, argv = sys.argv[1], sys.argv[2:]
    if variant.startswith("tree:"):
        sys.path.insert(0, variant.removeprefix("tree:"))
        variant = "shipped"
    if variant not in VARIANTS:
        raise SystemExit(f"launch: unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    if variant == "httpx-nosniffio":
        sys.modules.pop("sniffio", None)
        sys.meta_path.insert(0, _HideSniffio())
    import proxy.upstream
    from proxy.cli import main as cli_main

    if variant in ("httpx", "httpx-nosniffio"):
        proxy.upstream.make_transport = _httpx_transport
    elif variant == "httpx-aiohttp":
        proxy.upstream.make_transport = _httpx_aiohttp_transport
    elif variant == "aiohttp":
        from aiohttp_transport import make_transport

        proxy.upstream.make_transport = make_transport
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
