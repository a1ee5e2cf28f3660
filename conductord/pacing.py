"""When the loops start their next cycle: the pacing rules, as pure functions (SPEC §5, §12).

`runtime.Runtime` and the fleet simulator (`conductord.sim`) both call these and nothing else
to decide how long a loop waits, so the simulator proves the pacing the daemon really has,
the way both share `control_api.rules` for the server's lease decisions. Each function takes
what the loop knows (the interval, how long the cycle that just ended took, the lease
machine's state) and the RNG for the jitter, and returns seconds to wait: never negative,
nothing slept, no clock read.

Rules:
- start to start: a cycle starts one interval ±`JITTER` after the previous one started, or at
  once when the previous one took longer (so the interval is a period, not a gap);
- a standby that long-polled and was held for (nearly) the whole wait re-parks at once: it is
  waiting on the server nearly all the time, and an interval's gap would miss a handover;
  against a server that ignores `wait_ms` the answer comes at once and the loop keeps its
  interval;
- right after a grant that arrived too late to use (`LeaseMachine.needs_prompt_renew`), renew
  at once, once;
- right after the start sequence's cycle (which never waits, so `--run-once` stays quick), a
  standby parks at once instead of one interval later;
- a failing Control API gets the normal interval: a failed cycle neither re-parks nor renews
  promptly, whatever it asked for.

Never a spin: every wait of zero follows either a cycle that took most of an interval or
longer, or one of two one-shot events (the first park, a late grant, which itself took longer
than TTL − margin); a fast-failing Control API always gets an interval.
"""

from __future__ import annotations

import random

from conductord.lease import JITTER, LeaseMachine, LeaseState


def jittered(interval_s: float, rng: random.Random) -> float:
    """One interval, spread uniformly over ±`JITTER` so that a fleet does not beat in step."""
    return interval_s * rng.uniform(1 - JITTER, 1 + JITTER)


def loop_wait_s(interval_s: float, elapsed_s: float, rng: random.Random) -> float:
    """Start to start: wait out one jittered interval from the previous cycle's start."""
    return max(0.0, jittered(interval_s, rng) - elapsed_s)


def long_polls(machine: LeaseMachine) -> bool:
    """Whether a loop cycle asks the server to hold it (SPEC §12): only a standby (or degraded
    node) that is not renewing a late grant; a leader never waits."""
    return machine.state is not LeaseState.LEADER and not machine.needs_prompt_renew()


def parks_after_start(machine: LeaseMachine) -> bool:
    """The start sequence's cycle left a healthy standby: park on the server at once."""
    return machine.state is LeaseState.STANDBY and machine.consecutive_renew_failures == 0


def lease_wait_s(
    machine: LeaseMachine,
    *,
    interval_s: float,
    elapsed_s: float,
    long_polled: bool,
    rng: random.Random,
    after_start: bool = False,
) -> float:
    """Seconds the lease loop waits before its next cycle.

    `machine` is read after the cycle that just ended (which took `elapsed_s` and asked the
    server to wait when `long_polled`); `after_start` marks the start sequence's cycle.
    """
    if after_start and parks_after_start(machine):
        return 0.0
    if machine.consecutive_renew_failures == 0:
        if machine.needs_prompt_renew():
            return 0.0
        if long_polled and elapsed_s >= interval_s * (1 - JITTER):
            # The server held the call for the whole wait: re-park at once.
            return 0.0
    return loop_wait_s(interval_s, elapsed_s, rng)
