"""A Publer client written the way public SDKs are: origin hard-coded, key from a setting.

Standard library only (urllib), so it honours HTTPS_PROXY and SSL_CERT_FILE as any Python
program does; the forward-proxy tests run it unchanged with only the environment set.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

BASE_URL = "https://app.publer.com/api/v1"


class Publer:
    """The Publer API with one key."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def request(self, method: str, path: str) -> tuple[int, Any]:
        """One call; the status and the decoded JSON answer."""
        request = urllib.request.Request(  # noqa: S310 - the origin is the constant above
            BASE_URL + path,
            method=method,
            headers={"Authorization": f"Bearer-API {self.api_key}", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def me(self) -> tuple[int, Any]:
        """GET /users/me."""
        return self.request("GET", "/users/me")

    def accounts(self) -> tuple[int, Any]:
        """GET /accounts: the social accounts of the workspace."""
        return self.request("GET", "/accounts")


if __name__ == "__main__":
    status, body = Publer(os.environ["PUBLER_API_KEY"]).accounts()
    print(json.dumps({"status": status, "body": body}))
