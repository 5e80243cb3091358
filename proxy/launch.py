"""The `publer-proxy` console script: signals first, then everything else.

The signal handlers go in before the command line module and its imports load (the
config model, the server), so that no SIGHUP or SIGTERM finds a default action that would
end the process without cleaning up (see `proxy/edge/signals.py`).
"""

from __future__ import annotations

from proxy.edge import signals


def main() -> int:
    """Entry point of `publer-proxy` and `python -m proxy`; the exit status."""
    signals.install()
    try:
        from proxy.cli import main as cli_main

        return cli_main()
    except signals.Stopping:  # SIGTERM before a server ran: everything started has stopped
        return 0
