"""Running the app under uvicorn: httptools and uvloop, one worker, graceful SIGTERM (O1).

httptools, not h11: it answers 400 to a request with both Content-Length and
Transfer-Encoding, to bare LF line ends and to control bytes in header values, the
ingredients of request smuggling (see NOTES). Its URL parser keeps only the path of an
absolute-form target, so the protocol below marks those requests for the forwarder to
refuse: a request line naming another host is a probe, never a Publer call.
"""

from __future__ import annotations

import signal
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.forward import ABSOLUTE_FORM_KEY
from proxy.settings import Settings

GRACEFUL_SHUTDOWN_SECONDS = 30
MAX_HEADER_BYTES = 32 * 1024


class StrictHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, telling the app when the target was absolute-form."""

    def on_headers_complete(self) -> None:
        self.scope[ABSOLUTE_FORM_KEY] = not self.url.startswith(b"/")  # type: ignore[literal-required]
        super().on_headers_complete()


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    """The uvicorn settings the proxy runs with."""
    listen = settings.listen
    return uvicorn.Config(
        app,
        host=listen.host,
        port=listen.port,
        uds=str(listen.unix_socket) if listen.unix_socket else None,
        http=StrictHttpToolsProtocol,
        loop="uvloop",
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        log_config=None,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


def serve(settings: Settings, app: Any) -> int:
    """Serve until SIGINT/SIGTERM, finishing requests in flight; the exit status.

    uvicorn re-raises the signal it caught once it has shut down, which would make a
    graceful SIGTERM exit with -15; the no-op handler it restores turns that into 0 (O1).
    """
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    server = uvicorn.Server(uvicorn_config(settings, app))
    server.run()
    return 0 if server.started else 1
