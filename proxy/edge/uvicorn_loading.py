"""uvicorn, imported without the file watcher its own reloader would bring.

Importing uvicorn imports its command line (click) and its `--reload` supervisors, which
load watchfiles whenever it is installed. The proxy never runs uvicorn's reloader; its
own config watch (`reload.watch`) imports watchfiles when the config asks for it. So
`serve` imports uvicorn once, first, with watchfiles out of reach: uvicorn then picks its
stat-based reloader (never started), and watchfiles stays importable for the config watch.
"""

from __future__ import annotations

import sys

from proxy.keys.outbound import unimportable


def import_uvicorn() -> None:
    """Import uvicorn, leaving watchfiles unloaded unless something loaded it before."""
    if "uvicorn" not in sys.modules:
        with unimportable("watchfiles"):
            import uvicorn  # noqa: F401
