"""Deterministic fleet simulation: prove no two leaders under hostile schedules (SPEC §13).

A whole fleet runs in simulated time: N nodes, each with the real `lease.LeaseMachine`, paced
the way `runtime.Runtime` paces it, against a Control API that decides with the real
`control_api.rules` (`decide_acquire`, `decide_release`). Nothing sleeps and nothing opens a
socket; one `random.Random(seed)` drives everything, so a seed replays exactly.

Layout: `model.py` (config, faults, machines, results), `world.py` (the event heap, nodes
and network of one run), `server.py` (the Control API's lease row and its two clocks),
`runner.py` (seeds, worker processes, shrinking, the summary and the command line),
`__main__.py` (`python -m conductord.sim`).

Model (real time = the Control API server's monotonic decision clock, in seconds):
- Events sit in a heap keyed by (time, original time, sequence number): the tie-break is
  deterministic and an event deferred by a pause keeps its place among the others.
- Node clocks: local monotonic time = rate × real time + offset, rate within ±`drift`.
  Local timers fire at their local deadline plus a jitter in [0, `timer_jitter_ms`], never
  early. A pause (stop-the-world) defers every event of that node to its end while its clock
  keeps running, so the node resumes with a stale view; a crash drops its pending events and
  restarts it later with the same node id and a fresh machine.
- Lease loop as in `runtime.py`: the start sequence runs one cycle, then every wait comes
  from `conductord.pacing`, the functions the runtime itself calls (start to start ±10 %,
  the park right after the start sequence, re-park after a full long-poll, the prompt renew
  after a late grant). A standby asks to long-poll as the runtime does (§12); with
  `long_poll` the server parks it and grants at release or at the expiry instant, without it
  the server ignores `wait_ms` and answers at once. A request without an answer fails with
  `lease_failed` after the request timeout (plus the wait); a deadline timer calls `tick()`
  at `valid_until`. Graceful stop: `begin_stop`, wait up to 0.5 s for the in-flight cycle,
  release the held term, `stopped()`.
- Network: one-way latency (fast: up to `latency_max_ms`; with `slow_prob` a slow message of
  up to twice the request timeout); a request or a reply is lost with `loss_prob` (a lost
  reply after the server applied the request is the interesting case); a "lossy" fault makes
  one node's link bad for a while. A partition cuts one node off the Control API; an outage
  cuts everybody (the server's lease row survives it). Each cut either refuses connections
  (fail fast, chosen with `fast_fail_prob`) or is a black hole (hang to the timeout).
- Server clocks (SPEC §15, `server.py`): a `clock_step` fault steps the server's wall clock
  either way; a `server_restart` is a reboot of its host (down for a while, then the restart
  rule: every unreleased lease is live one full TTL from the restart), its wall clock stepping
  with it half the time. Neither is a disturbance for `no_failover`'s precondition except the
  reboot's downtime, which counts as an outage.
- Scheduler: while a node is leader it runs a pass every `pass_interval_ms` of local time.
  A pass that finds `scheduler_enabled(local_now)` true is checked, then acts a little later
  (`act_delay_max_ms`); any pause may fall between the check and the act, and a "gap pause"
  fault waits for the worst moment: the next check within `gap_window_s` of its node's local
  deadline. The act carries the term to a fenced resource that rejects any term lower than
  the highest it has seen.

Invariants, checked at every check and act (SPEC §13):
- `two_schedulers_in_term`: within one term only one node id ever acts;
- `term_decreased`: acts never go back to a lower term (no stale leader acts);
- `lease_overrun`: a check that passes while the server does not hold that term live for that
  node (the state machine's own promise; stricter than the two above);
- `no_failover`: after the leader crashes, stops or is cut off at t, some node schedules again
  by t + `failover_bound_s()`. Checked only when, from t to that bound, every other node is
  either untouched by any fault (no pause, partition, crash, stop, outage, bad link, lost or
  slow message) or down throughout, the dead leader has no fault but its death, and at least
  one other node is up: a grant whose reply is lost stalls failover beyond any fixed bound.
With `fencing` the act invariants apply to the acts the resource accepted; without it, to every
act performed. Both views are counted on every run.

Limits: heartbeats are not modelled (they never change the lease state); the server's
monotonic clock is the reference, so its own drift shows up as every node drifting the other
way; node wall clocks are not modelled (a node decides on its lease clock only); a request's
timeout is one total deadline (requests' per-read timeout can let an answer come later, which
is safe because validity counts from the send time); a scheduler pass is modelled only while
the node is leader, which is equivalent because `scheduler_enabled` is false otherwise.
"""

from __future__ import annotations

from conductord.sim.model import (
    FAULT_KINDS,
    MACHINES,
    Fault,
    RunResult,
    SimConfig,
    Violation,
    generate_faults,
    make_machine,
)
from conductord.sim.runner import Summary, main, run_many, run_seed, shrink
from conductord.sim.world import Simulation

__all__ = [
    "FAULT_KINDS",
    "MACHINES",
    "Fault",
    "RunResult",
    "SimConfig",
    "Simulation",
    "Summary",
    "Violation",
    "generate_faults",
    "main",
    "make_machine",
    "run_many",
    "run_seed",
    "shrink",
]
