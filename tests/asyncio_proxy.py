"""`python -m tests.asyncio_proxy serve --config PATH`: the proxy on asyncio's own loop.

Production runs on uvloop; tests that must hold on both loops start the proxy through this
module, which changes nothing but the loop uvicorn is told to use.
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

import proxy.edge.server
from proxy.cli import main

_uvicorn_config = proxy.edge.server.uvicorn_config


def _on_asyncio(settings: Any, app: Any) -> uvicorn.Config:
    config = _uvicorn_config(settings, app)
    config.loop = "asyncio"
    return config


if __name__ == "__main__":
    proxy.edge.server.uvicorn_config = _on_asyncio
    sys.exit(main(sys.argv[1:]))
