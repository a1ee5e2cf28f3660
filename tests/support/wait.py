"""Waiting for a condition with a deadline, for tests that cannot wait on an event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "the condition",
    *,
    interval: float = 0.05,
) -> Any:
    """Poll `predicate` until it returns something truthy, and return that.

    After `timeout` seconds an AssertionError names `what` (a text, or a callable giving one,
    so the message can show the state at the time of failure).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {detail}")
        time.sleep(interval)
