"""The process's own HTTP clients besides the forwarding hop: to Vault (hvac over requests)
and, for `check --online`, to Publer (httpx). Configured here and nowhere else.

None of them reads the environment. A proxy variable exported for a developer's shell or
a CI runner (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY, in either case) would otherwise
receive the Vault token on every Vault call, the KV response holding the key, and the key
itself: requests honours those variables even for loopback addresses. The only proxy used
is one the operator names in the config (`vault.proxy`, `upstream.proxy`).

requests is imported without its character-set detector (charset_normalizer, about
2.5 MiB), which only guesses the text encoding of a response without a charset: Vault
answers JSON, which requests decodes as UTF-8 without guessing, and without a detector
requests falls back to UTF-8. `import_requests()` runs before anything of the process
imports requests (the Vault source, through hvac).
"""

from __future__ import annotations

import ssl
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from proxy.config.settings import UpstreamSettings

if TYPE_CHECKING:
    import httpx
    import requests

NO_DETECTOR_WARNING = "Unable to find acceptable character detection dependency"


@contextmanager
def unimportable(*names: str) -> Iterator[None]:
    """Imports of `names` fail inside the block (unless already loaded), and work after."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import fails: not loaded
    try:
        yield
    finally:
        for name in hidden:
            del sys.modules[name]


def import_requests() -> None:
    """Import requests without a character-set detector, unless something imported it
    before (see the module docstring)."""
    if "requests" in sys.modules:
        return
    with unimportable("charset_normalizer", "chardet"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_DETECTOR_WARNING)
        import requests  # noqa: F401


def vault_http_session(proxy: str | None, verify: bool | str = True) -> requests.Session:
    """The requests session every hvac client of the process is given.

    `proxy` is `vault.proxy` (None: connect directly); `verify` is what requests takes
    (True, False, or a CA bundle path). hvac prefers a given session's `verify` over its
    own argument, so it is set here.
    """
    import_requests()
    import requests

    session = requests.Session()
    # requests would otherwise read HTTP(S)_PROXY, ALL_PROXY and NO_PROXY (sending the
    # token and the key to that proxy), ~/.netrc (adding its Authorization to Vault calls)
    # and REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (trusting another CA than the config names).
    session.trust_env = False
    session.verify = verify
    if proxy:
        session.proxies = {"http": proxy, "https": proxy}
    return session


def publer_http_client(upstream: UpstreamSettings) -> httpx.Client:
    """A one-off httpx client to the upstream origin, as `check --online` probes it."""
    # Only `check --online` talks to Publer this way: `serve` never loads httpx.
    import httpx

    # Python's default client context: certificates and host names verified.
    context = ssl.create_default_context(cafile=str(upstream.ca_file) if upstream.ca_file else None)
    return httpx.Client(
        verify=context,
        # httpx would otherwise read the proxy variables, SSL_CERT_FILE and ~/.netrc.
        trust_env=False,
        proxy=upstream.proxy,
        # A redirect would carry the key to whatever host Location names.
        follow_redirects=False,
        timeout=upstream.connect_timeout_seconds,
    )


def publer_request(
    upstream: UpstreamSettings, path: str
) -> tuple[str, dict[str, str], dict[str, str]]:
    """Where a `check --online` request for `path` goes: (URL, extra headers, httpx request
    extensions). With `upstream.connect_to` the URL names that address and the origin's
    name goes in Host and in TLS (SNI, and the certificate is checked against it), as the
    forwarding hop dials it; otherwise the origin itself."""
    if upstream.connect_to is None:
        return upstream.url + path, {}, {}
    origin = urlsplit(upstream.url)
    scheme, host = origin.scheme, origin.hostname or ""
    headers = {"Host": origin.netloc}
    return f"{scheme}://{upstream.connect_to}{path}", headers, {"sni_hostname": host}
