"""What a typical home-made proxy looks like: the comparison point of the benchmark.

Starlette and a default `httpx.AsyncClient`, the whole request body read with
`await request.body()`, the whole answer read before it is sent back, a fixed
Authorization header. Run under uvicorn with the flags publer-proxy uses (uvloop,
httptools, one worker, no access log).
"""

from __future__ import annotations

import argparse
import os

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}


def create_app(upstream: str, key: str, workspace: str) -> Starlette:
    """The naive proxy: every path is forwarded to `upstream` with the key."""
    client = httpx.AsyncClient()

    async def forward(request: Request) -> Response:
        headers = {
            name: value
            for name, value in request.headers.items()
            if name not in HOP_BY_HOP and name not in ("host", "authorization", "content-length")
        }
        headers["authorization"] = f"Bearer-API {key}"
        headers["publer-workspace-id"] = workspace
        url = upstream + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        answer = await client.request(
            request.method, url, headers=headers, content=await request.body()
        )
        passed = {
            name: value
            for name, value in answer.headers.items()
            if name not in HOP_BY_HOP and name not in ("content-length", "content-encoding")
        }
        return Response(answer.content, status_code=answer.status_code, headers=passed)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


# The key comes in the environment: a command line is readable by every user of the machine.
NAIVE_KEY_ENV = "PUBLER_API_KEY"


def main() -> None:
    """Serve the naive proxy on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--workspace", required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, os.environ[NAIVE_KEY_ENV], args.workspace),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=None,
        access_log=False,
        server_header=False,
        date_header=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
