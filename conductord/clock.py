"""The lease clock: monotonic seconds that keep counting while the machine sleeps (SPEC §15).

`time.monotonic()` stops during system sleep on Linux and macOS, so a leader that sleeps past
its lease would wake believing it still holds it. Every lease decision of a node (its local
deadline, the step-down timer, the `--exec` guard's kill deadline) reads `lease_clock()`
instead:

- Linux: `CLOCK_BOOTTIME`, which is `CLOCK_MONOTONIC` plus the time spent suspended;
- macOS: `clock_gettime(CLOCK_MONOTONIC)`, which counts sleep there (unlike `time.monotonic`,
  which is `mach_absolute_time` and does not);
- elsewhere: `time.monotonic()` (documented as the limit).

Timers (gevent's loop, `select` timeouts) run on a clock that may not count sleep, so they can
fire late after a wake: callers must read `lease_clock()` afresh for every decision and never
trust that "the timer fired, so the time has come".

`boot_id()` names the current boot (Linux: `/proc/sys/kernel/random/boot_id`; macOS:
`kern.bootsessionuuid`), so a deadline stored as a `lease_clock()` reading can be trusted again
after a process restart on the same boot, and only then.

Pure standard library and no package imports, so the `--exec` guard (run with `python -I -S`)
can load this very file and read the same clock as the daemon.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

__all__ = ["CLOCK_NAME", "boot_id", "lease_clock"]


def _pick() -> tuple[Callable[[], float], str]:
    if sys.platform.startswith("linux") and hasattr(time, "CLOCK_BOOTTIME"):
        boottime = time.CLOCK_BOOTTIME
        return (lambda: time.clock_gettime(boottime)), "CLOCK_BOOTTIME"
    if sys.platform == "darwin" and hasattr(time, "CLOCK_MONOTONIC"):
        monotonic = time.CLOCK_MONOTONIC
        return (lambda: time.clock_gettime(monotonic)), "CLOCK_MONOTONIC"
    return time.monotonic, "time.monotonic"


lease_clock, CLOCK_NAME = _pick()
lease_clock.__doc__ = "Monotonic seconds that count system sleep where the OS allows it."

_boot_id: str | None = None


def boot_id() -> str | None:
    """An identifier of the current boot, or None when the OS gives none (read once)."""
    global _boot_id
    if _boot_id is None:
        _boot_id = _read_boot_id() or ""
    return _boot_id or None


def _read_boot_id() -> str | None:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
                return handle.read().strip() or None
        except OSError:
            return None
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["/usr/sbin/sysctl", "-n", "kern.bootsessionuuid"],
                capture_output=True,
                text=True,
                timeout=2,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None
    return None
