"""Run the same work in many threads released at one instant: the concurrency tests' race."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_together(worker: Callable[[int], T], count: int, *, timeout: float = 60.0) -> list[T]:
    """Call `worker(i)` for i in 0..count-1 in threads that all start at one barrier.

    Returns the results by index. The first exception of any worker is re-raised, and a
    thread still running after `timeout` fails the test rather than hanging it.
    """
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=timeout)
            results[index] = worker(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a racing thread did not finish"
    if errors:
        raise errors[0]
    return results
