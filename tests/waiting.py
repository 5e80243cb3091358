"""Waiting helpers for tests that watch a process change state."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def eventually(check: Callable[[], bool], timeout: float = 30.0, step: float = 0.1) -> None:
    """Wait until `check()` is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(step)
