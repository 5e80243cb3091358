"""`python -m tests.listing_proxy serve --config PATH`: the proxy, which writes, as it
exits, the name of every module it had loaded (one a line) to the file $MODULES_FILE."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path


def _write_modules() -> None:
    Path(os.environ["MODULES_FILE"]).write_text("\n".join(sorted(sys.modules)) + "\n")


if __name__ == "__main__":
    atexit.register(_write_modules)
    from proxy.launch import main  # as `python -m proxy`: the signal handlers first

    sys.exit(main())
