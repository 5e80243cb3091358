"""SIGHUP and SIGTERM from the program's first instruction to its last.

The default action of SIGHUP ends a process, and so does SIGTERM's, without running a
single `finally`. Until the server takes the signals over, these handlers hold them:

- SIGHUP is remembered. `serve` reloads once its reloader starts (a hangup sent while the
  proxy was still starting is a reload asked for, not a reason to die); `dev` is a
  foreground program, so for it a hangup means its terminal is gone and it stops like
  SIGTERM. A SIGHUP ignored when the program started (`nohup`) stays ignored by `dev`.
- SIGTERM before the server runs raises `Stopping`, so every context manager on the way
  out (the dev stack's OpenBao and sandbox among them) stops what it started, and the
  command exits 0. Once a server is registered, SIGTERM asks it to stop gracefully.

`install()` runs before the package imports anything heavy (`proxy/launch.py`,
`proxy/__main__.py`); nothing here imports beyond the standard library.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType

StopCallback = Callable[[int, FrameType | None], None]


class Stopping(BaseException):
    """SIGTERM (or a hangup of `dev`) arrived before the server started."""


class _State:
    installed = False
    hangup_ignored_at_start = False
    hangup_pending = False
    hangup_stops = False
    hangup_notice = b""
    on_stop: StopCallback | None = None
    on_reload: Callable[[], object] | None = None


_state = _State()


def install() -> None:
    """Take SIGHUP and SIGTERM; once per process (later calls change nothing). Call it
    first thing in the program."""
    if _state.installed:
        return
    _state.installed = True
    _state.hangup_ignored_at_start = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    signal.signal(signal.SIGHUP, _on_hangup)
    signal.signal(signal.SIGTERM, _on_terminate)


def hangup_stops(notice: str = "") -> None:
    """From now on a hangup stops the program, as SIGTERM does (what `dev` wants), unless
    SIGHUP was ignored when the program started; `notice` is written to stderr when it
    does. Without `install()`, nothing changes."""
    if not _state.installed:
        return
    _state.hangup_stops = True
    _state.hangup_notice = (notice + "\n").encode() if notice else b""
    if _state.hangup_ignored_at_start:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    elif _state.hangup_pending:
        _state.hangup_pending = False
        _on_hangup(signal.SIGHUP, None)


def hangup_default() -> None:
    """Give SIGHUP back its default action (a program with nothing to reload), unless it
    was ignored at start. Without `install()`, nothing changes."""
    if not _state.installed:
        return
    restored = signal.SIG_IGN if _state.hangup_ignored_at_start else signal.SIG_DFL
    signal.signal(signal.SIGHUP, restored)
    if _state.hangup_pending and not _state.hangup_ignored_at_start:
        signal.raise_signal(signal.SIGHUP)


def hangup_reloads() -> bool:
    """Whether SIGHUP means "reload the config" in this program (`serve`), not "stop"."""
    return not _state.hangup_stops


def register_reload(on_reload: Callable[[], object] | None) -> bool:
    """Where SIGHUP goes from now on (None: remembered again). Called from the signal
    handler, so `on_reload` must only schedule work (`loop.call_soon_threadsafe`).
    Returns whether a SIGHUP arrived while none was registered; the caller applies it
    once."""
    _state.on_reload = on_reload
    pending, _state.hangup_pending = _state.hangup_pending, False
    return pending


def register_server(on_stop: StopCallback | None) -> None:
    """Where SIGTERM goes from now on (a server's graceful stop); None: raise `Stopping`."""
    _state.on_stop = on_stop


def _on_hangup(signum: int, frame: FrameType | None) -> None:
    if _state.hangup_stops:
        if _state.hangup_notice:
            os.write(2, _state.hangup_notice)  # a signal handler writes without buffers
        _on_terminate(signum, frame)
    elif _state.on_reload is not None:
        _state.on_reload()
    else:
        _state.hangup_pending = True


def _on_terminate(signum: int, frame: FrameType | None) -> None:
    if _state.on_stop is not None:
        _state.on_stop(signum, frame)
        return
    raise Stopping
