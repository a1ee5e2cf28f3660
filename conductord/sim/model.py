"""What a simulated run is made of: its config, its faults, its machines and its result.

Everything here is data or a pure function of the seed's RNG; `world.py` runs it, `runner.py`
runs many seeds and reports (see the package docstring for the model).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

from conductord.lease import JITTER, LeaseMachine, LeaseResponse, default_margin_s

FAULT_KINDS = (
    "crash",
    "stop",
    "partition",
    "outage",
    "pause",
    "gap_pause",
    "lossy",
    "clock_step",
    "server_restart",
)
_FAULT_WEIGHTS = (2, 1, 3, 1, 3, 2, 2, 2, 1)
CUTS = ("partition", "outage", "server_restart")  # refused or a black hole
# The real lease machine, and broken ones the invariants must catch.
MACHINES = ("real", "margin0", "ignore-foreign")


@dataclass(frozen=True)
class SimConfig:
    """One simulated fleet and how hostile its world is. Times in seconds unless named."""

    nodes: int = 5
    duration_s: float = 600.0
    lease_ttl_sec: int = 30
    lease_renew_interval_ms: int = 5000
    request_timeout_ms: int = 5000
    # The count rule only ever steps a leader down earlier than the time rule; switched off
    # (1000) by default so that the time rule and its margin alone must keep the fleet safe.
    renew_failure_threshold: int = 1000
    margin_s: float | None = None  # None: lease.default_margin_s, as the runtime uses
    machine: str = "real"  # "real", or a broken one: "margin0", "ignore-foreign"
    server: str = "real"  # "real", or a broken one: "wall-clock" (sim/server.py)
    long_poll: bool = False  # the server honours wait_ms (nodes always ask, as the runtime)
    fencing: bool = True
    pass_interval_ms: float = 50.0
    act_delay_max_ms: float = 2.0
    drift: float = 0.001
    timer_jitter_ms: float = 5.0
    latency_min_ms: float = 0.2
    latency_mean_ms: float = 2.0
    latency_max_ms: float = 20.0
    slow_prob: float = 0.002
    loss_prob: float = 0.002
    lossy_slow_prob: float = 0.1  # inside a "lossy" fault (a bad link for a while)
    lossy_loss_prob: float = 0.3
    lossy_max_s: float = 60.0
    fast_fail_prob: float = 0.5
    faults_per_hour: float = 90.0
    pause_max_s: float = 45.0
    gap_pause_max_s: float = 4.0
    gap_window_s: float = 0.5  # a gap pause hits a check this close to the local deadline
    down_max_s: float = 60.0
    partition_max_s: float = 60.0
    outage_max_s: float = 40.0
    # Server wall-clock steps: either way, log-uniform from 0.1 s up to this.
    clock_step_max_s: float = 600.0
    restart_down_max_s: float = 20.0  # a server host reboot: down this long at most
    restart_step_prob: float = 0.5  # ... and its wall clock steps with the reboot

    @property
    def effective_margin_s(self) -> float:
        if self.machine == "margin0":
            return 0.0
        if self.margin_s is not None:
            return self.margin_s
        return default_margin_s(self.lease_renew_interval_ms, self.lease_ttl_sec)

    def failover_bound_s(self) -> float:
        """TTL + renew interval (+10 % jitter, slowed by drift) + timer jitter + network.

        Network: three fast one-way delays, a renewal of the dead leader still in flight plus
        the new leader's round trip.
        """
        renew = self.lease_renew_interval_ms / 1000.0 * (1 + JITTER) / (1 - self.drift)
        return (
            self.lease_ttl_sec
            + renew
            + self.timer_jitter_ms / 1000.0
            + 3 * self.latency_max_ms / 1000.0
            + 0.001
        )


@dataclass(frozen=True)
class Fault:
    """One scheduled fault. `node` is None for a server fault and a gap pause (any node)."""

    at: float
    kind: str
    node: int | None
    duration: float
    refused: bool = False  # a cut (CUTS): connections refused at once, else a black hole
    step_s: float = 0.0  # clock_step, server_restart: the server's wall clock moves this much

    def __str__(self) -> str:
        if self.kind in ("clock_step", "server_restart"):
            who = "server"
        else:
            who = "fleet" if self.node is None else f"node-{self.node}"
        text = f"{self.kind} {who} at {self.at:.6f}"
        if self.kind != "clock_step":
            text += f" for {self.duration:.6f}s"
        if self.kind in CUTS:
            text += " (refused)" if self.refused else " (black hole)"
        if self.step_s:
            text += f", wall clock {self.step_s:+.6f}s"
        return text


@dataclass(frozen=True)
class Violation:
    kind: str
    at: float
    detail: str


@dataclass
class RunResult:
    seed: int
    sim_seconds: float = 0.0
    events: int = 0
    passes_checked: int = 0  # scheduler passes that found the scheduler enabled
    acts_performed: int = 0
    acts_accepted: int = 0
    acts_rejected: int = 0  # stale acts the fence refused
    violations: list[Violation] = field(default_factory=list)  # the first of each kind
    violation_events: int = 0  # every time an invariant failed
    unfenced_violations: int = 0  # act invariants on every performed act
    failovers: list[float] = field(default_factory=list)  # seconds, windows that qualified
    liveness_windows_skipped: int = 0
    max_cycles_per_interval: int = 0  # lease cycles started within one renew interval
    faults: tuple[Fault, ...] = ()
    faults_injected: dict[str, int] = field(default_factory=dict)  # by kind, as they fired
    clock_rates: dict[str, float] = field(default_factory=dict)
    trace: list[str] | None = None


class _IgnoresForeignHolder(LeaseMachine):
    """Broken on purpose: a node that held a term takes any answer as its own renewal."""

    def lease_succeeded(self, response: LeaseResponse, *, sent_at: float, now: float) -> Any:
        if self.held_term is not None:
            response = dataclasses.replace(response, holder_id=self.node_id, is_leader=True)  # type: ignore[type-var]
        return super().lease_succeeded(response, sent_at=sent_at, now=now)


def make_machine(config: SimConfig, node_id: str) -> LeaseMachine:
    cls = _IgnoresForeignHolder if config.machine == "ignore-foreign" else LeaseMachine
    if config.machine not in MACHINES:
        raise ValueError(f"unknown machine {config.machine!r}")
    return cls(
        node_id=node_id,
        lease_ttl_sec=config.lease_ttl_sec,
        renew_failure_threshold=config.renew_failure_threshold,
        margin_s=config.effective_margin_s,
    )


def generate_faults(config: SimConfig, rng: random.Random) -> list[Fault]:
    """A hostile schedule: faults arrive as a Poisson process over the run."""
    faults: list[Fault] = []
    rate = config.faults_per_hour / 3600.0
    t = 0.0
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= config.duration_s:
            break
        kind = rng.choices(FAULT_KINDS, _FAULT_WEIGHTS)[0]
        node: int | None = rng.randrange(config.nodes)
        if kind == "crash" or kind == "stop":
            duration = rng.uniform(0.1, config.down_max_s)
        elif kind == "partition":
            duration = rng.uniform(0.1, config.partition_max_s)
        elif kind == "outage":
            node, duration = None, rng.uniform(0.1, config.outage_max_s)
        elif kind == "pause":
            # log-uniform from 1 ms: mostly short hiccups, sometimes longer than the TTL
            duration = math.exp(rng.uniform(math.log(0.001), math.log(config.pause_max_s)))
        elif kind == "lossy":
            duration = rng.uniform(0.1, config.lossy_max_s)
        elif kind == "clock_step":
            node, duration = None, 0.0
        elif kind == "server_restart":
            node, duration = None, rng.uniform(0.1, config.restart_down_max_s)
        else:  # gap_pause: the next check that passes just before its deadline pauses
            node, duration = None, rng.uniform(0.0, config.gap_pause_max_s)
        refused = kind in CUTS and rng.random() < config.fast_fail_prob
        step = 0.0
        if kind == "clock_step" or (
            kind == "server_restart" and rng.random() < config.restart_step_prob
        ):
            step = _clock_step(config, rng)
        faults.append(Fault(round(t, 6), kind, node, round(duration, 6), refused, round(step, 6)))
    return faults


def _clock_step(config: SimConfig, rng: random.Random) -> float:
    """A wall-clock step either way: log-uniform, mostly small, sometimes many TTLs."""
    size = math.exp(rng.uniform(math.log(0.1), math.log(config.clock_step_max_s)))
    return size if rng.random() < 0.5 else -size
