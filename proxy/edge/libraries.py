"""Two libraries every `serve` uses, imported without parts of theirs it never runs.

- uvicorn imports its command line and its `--reload` supervisors, which load watchfiles
  whenever it is installed. The proxy never runs uvicorn's reloader (uvicorn then picks
  its stat-based one, never started); its own config watch (`reload.watch`) imports
  watchfiles when the config asks for it.
- requests (under hvac, the Vault client) imports a character-set detector,
  charset_normalizer, about 2.5 MiB, used only to guess the text encoding of a response
  without a charset. Vault answers JSON, which requests decodes as UTF-8 without
  guessing; without a detector requests falls back to UTF-8 and says so in a warning.

`serve` calls `import_libraries()` before anything else imports them; what it hides stays
importable afterwards.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

NO_DETECTOR = "Unable to find acceptable character detection dependency"


@contextmanager
def _hidden(*names: str) -> Iterator[None]:
    """Imports of `names` fail inside the block (unless already loaded), and work after."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import fails: not loaded
    try:
        yield
    finally:
        for name in hidden:
            del sys.modules[name]


def import_libraries() -> None:
    """Import uvicorn without watchfiles, and requests without a character-set detector;
    each is left alone when something imported it before."""
    if "uvicorn" not in sys.modules:
        with _hidden("watchfiles"):
            import uvicorn  # noqa: F401
    if "requests" not in sys.modules:
        with _hidden("charset_normalizer", "chardet"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NO_DETECTOR)
            import requests  # noqa: F401
