"""An app that cannot be pointed at the proxy: it calls https://app.publer.com itself.

It stands for an SDK, an automation node or an MCP server: the origin is a constant and the
only setting is the key (`PUBLER_API_KEY`, here unset: the proxy injects the real one). It
runs unchanged; only HTTPS_PROXY and SSL_CERT_FILE in its environment send it through the
proxy's forward-proxy listener.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

BASE_URL = "https://app.publer.com/api/v1"


def call(path: str) -> tuple[int, object]:
    """GET one Publer endpoint with the configured key; the status and the JSON answer."""
    key = os.environ.get("PUBLER_API_KEY", "none")
    request = urllib.request.Request(  # noqa: S310 - the origin is the constant above
        BASE_URL + path, headers={"Authorization": f"Bearer-API {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def main() -> None:
    """Call /users/me once a minute, once the proxy's CA certificate exists."""
    ca = os.environ.get("SSL_CERT_FILE", "")
    while ca and not os.path.exists(ca):
        time.sleep(1)  # the proxy writes it when it starts
    while True:
        try:
            print(*call("/users/me"), flush=True)
        except OSError as error:
            print("not reachable yet:", error, flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
