"""An example app behind publer-proxy: it calls the Publer API through the proxy and holds no
Publer key, only its own client token for the proxy (and none at all beside a sidecar on
loopback). The only change an existing Publer client needs is its base URL and that token.

    PROXY_URL          the proxy's origin (default http://127.0.0.1:8080)
    CLIENT_TOKEN_FILE  a file holding this app's client token; unset: send none
    INTERVAL_SECONDS   seconds between calls (default 30); 0: one answer, then exit
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

RETRY_SECONDS = 2.0


def get(url: str, token: str | None) -> tuple[int, str]:
    """GET `url` with the client token, bypassing any HTTP proxy; the status and body."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"PROXY_URL must be an http(s) URL, not {url!r}")
    request = urllib.request.Request(url)  # noqa: S310 (the scheme is checked above)
    if token:
        request.add_header("Authorization", f"Bearer-API {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as answer:
            return int(answer.status), answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as refusal:
        # A refusal by the proxy carries X-Publer-Proxy-Error; Publer's own answers do not.
        code = refusal.headers.get("X-Publer-Proxy-Error")
        body = refusal.read().decode("utf-8", "replace")
        return refusal.code, f"{body} (proxy refusal: {code})" if code else body


def main() -> int:
    """Call the proxy forever, or once with INTERVAL_SECONDS=0 (exit 0 on a 200)."""
    base = os.environ.get("PROXY_URL", "http://127.0.0.1:8080").rstrip("/")
    token_file = os.environ.get("CLIENT_TOKEN_FILE")
    token = Path(token_file).read_text(encoding="utf-8").strip() if token_file else None
    interval = float(os.environ.get("INTERVAL_SECONDS", "30"))
    while True:
        try:
            status, body = get(f"{base}/api/v1/accounts", token)
        except OSError as error:
            # A sidecar starts after the app it joins; wait for it rather than fail.
            print(f"the proxy at {base} does not answer yet ({error})", flush=True)
            time.sleep(RETRY_SECONDS)
            continue
        print(f"GET /api/v1/accounts -> {status} {body[:300]}", flush=True)
        if interval <= 0:
            return 0 if status == 200 else 1
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
