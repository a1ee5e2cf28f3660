"""The deterministic fleet simulation (SPEC §13): the real machine holds, broken ones are caught.

Runs are shortened (5 simulated minutes, a pass every 100 ms) so that a few hundred seeds take
seconds; the full 10,000-seed run is `python -m conductord.sim` (see docs/simulation.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conductord.sim import (
    FAULT_KINDS,
    Fault,
    SimConfig,
    Summary,
    generate_faults,
    run_many,
    run_seed,
    shrink,
)

FAST = SimConfig(duration_s=300.0, pass_interval_ms=100.0)
ROOT = Path(__file__).resolve().parent.parent


def first_violation(config: SimConfig, seeds: range, kind: str | None = None) -> tuple[int, str]:
    """The first seed that breaks an invariant (of `kind`, if given) and the kind broken."""
    for seed in seeds:
        result = run_seed(seed, config, stop_at_first_violation=kind is None)
        kinds = [v.kind for v in result.violations if kind is None or v.kind == kind]
        if kinds:
            return seed, kinds[0]
    pytest.fail(f"no violation in {len(seeds)} seeds")


def test_a_seed_replays_exactly() -> None:
    a = run_seed(7, FAST, trace=True)
    b = run_seed(7, FAST, trace=True)
    assert a.trace == b.trace and a.trace
    assert (a.events, a.passes_checked, a.failovers) == (b.events, b.passes_checked, b.failovers)
    c = run_seed(8, FAST)
    assert (c.events, c.faults) != (a.events, a.faults)


def test_fault_schedule_is_hostile_and_seeded() -> None:
    import random

    faults = generate_faults(SimConfig(duration_s=3600.0), random.Random(1))
    assert faults == generate_faults(SimConfig(duration_s=3600.0), random.Random(1))
    kinds = {f.kind for f in faults}
    assert set(FAULT_KINDS) == kinds
    assert max(f.duration for f in faults if f.kind == "pause") > 1.0
    steps = [f.step_s for f in faults if f.kind == "clock_step"]
    assert min(steps) < -FAST.lease_ttl_sec and max(steps) > FAST.lease_ttl_sec  # both ways
    assert any(f.step_s for f in faults if f.kind == "server_restart")


def test_real_machine_keeps_every_invariant_under_hostile_schedules() -> None:
    summary, failing = run_many(range(150), FAST)
    doc = summary.as_dict()
    assert failing == [], doc
    assert doc["violations"] == 0
    # without fencing too: gap pauses stay within the documented limit (4 s < 5 s margin)
    assert doc["unfenced_violations"] == 0
    # the run did explore: many checked passes, real failovers within the bound
    assert doc["passes_checked"] > 50_000
    assert doc["liveness_windows_checked"] >= 10
    assert doc["worst_failover_s"] <= FAST.failover_bound_s()
    # ... under server wall-clock steps and reboots too (SPEC §15)
    assert doc["faults_injected"]["clock_step"] >= 50
    assert doc["faults_injected"]["server_restart"] >= 25


def test_long_polling_fleet_keeps_every_invariant() -> None:
    summary, failing = run_many(range(60), dataclasses.replace(FAST, long_poll=True))
    assert failing == [] and summary.violations == 0
    assert summary.liveness_windows_checked >= 3


def sends(result, node_id: str) -> list[tuple[float, bool]]:
    """(time, long-poll) of every acquire `node_id` sent, from a run's trace."""
    out = []
    for line in result.trace or []:
        at, who, text = float(line[:12]), line[13:20].strip(), line[21:]
        if who == node_id and text.startswith("acquire sent"):
            out.append((at, "(long-poll)" in text))
    return out


QUIET = SimConfig(nodes=2, duration_s=200.0, loss_prob=0.0, slow_prob=0.0)


def test_a_simulated_standby_paces_like_the_runtime() -> None:
    """The simulator paces with `conductord.pacing`, as the runtime does: a standby parks
    right after its start sequence and re-parks at once when the server held it for the wait
    (test_daemon.py shows the same of the real process)."""
    result = run_seed(1, dataclasses.replace(QUIET, long_poll=True), faults=[], trace=True)
    # the node that started first leads throughout, the other is the standby
    leader, other = sorted(("node-0", "node-1"), key=lambda n: sends(result, n)[0][0])
    standby = sends(result, other)
    (start, polled), (park, parked) = standby[:2]
    assert not polled and parked  # the start sequence's acquire never waits; the next one does
    assert park - start < 0.05  # not one renew interval later
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(standby[1:])]
    assert len(gaps) >= 8 and all(5.0 <= g <= 5.05 for g in gaps), gaps  # held 5 s, re-parked
    # a leader renews start to start every interval ±10 % and never long-polls
    renewals = sends(result, leader)[1:]
    assert not any(polled for _, polled in renewals)
    assert all(4.49 <= b - a <= 5.51 for (a, _), (b, _) in itertools.pairwise(renewals))


def test_against_a_server_that_ignores_wait_ms_the_standby_keeps_its_interval() -> None:
    result = run_seed(1, QUIET, faults=[], trace=True)
    # the node that started second is the standby
    standby = max((sends(result, n) for n in ("node-0", "node-1")), key=lambda s: s[0][0])
    assert standby[1][0] - standby[0][0] < 0.05  # parked after start: answered at once
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(standby[1:])]
    assert gaps and all(4.49 <= g <= 5.51 for g in gaps), gaps  # never a spin


def step(at: float, seconds: float) -> Fault:
    return Fault(at=at, kind="clock_step", node=None, duration=0.0, step_s=seconds)


def test_a_forward_step_of_the_server_clock_never_shortens_a_live_lease() -> None:
    """SPEC §15: +60 s on the server's wall clock (TTL 30 s). The real server decides expiry
    on its monotonic clock; a server that decides on its wall clock expires the leader's
    lease at once while the leader still leads."""
    faults = [step(60.0, 60.0)]
    real = run_seed(1, QUIET, faults=faults)
    assert real.violations == [] and real.faults_injected == {"clock_step": 1}
    broken = run_seed(1, dataclasses.replace(QUIET, server="wall-clock"), faults=faults)
    assert [v.kind for v in broken.violations] == ["lease_overrun"]
    assert 60.0 <= broken.violations[0].at < 60.2


def test_a_backward_step_of_the_server_clock_never_delays_failover() -> None:
    # node-0 leads (it started first); it crashes right after a -120 s step, before renewing
    faults = [step(60.0, -120.0), Fault(at=60.001, kind="crash", node=0, duration=300.0)]
    real = run_seed(1, QUIET, faults=faults)
    assert real.violations == [] and len(real.failovers) == 1
    assert real.failovers[0] <= QUIET.failover_bound_s()
    broken = run_seed(1, dataclasses.replace(QUIET, server="wall-clock"), faults=faults)
    assert [v.kind for v in broken.violations] == ["no_failover"]  # the dead lease lives on


def test_a_rebooted_server_gives_every_unreleased_lease_one_ttl_from_its_restart() -> None:
    reboot = Fault(at=60.0, kind="server_restart", node=None, duration=5.0, step_s=100.0)
    real = run_seed(1, QUIET, faults=[reboot], trace=True)
    assert real.violations == []
    restarted = [line for line in real.trace or [] if "restarted on a new boot" in line]
    assert restarted and restarted[0].endswith("term 1 of node-0, expiring 95.000000")
    broken = run_seed(1, dataclasses.replace(QUIET, server="wall-clock"), faults=[reboot])
    assert [v.kind for v in broken.violations] == ["lease_overrun"]


def test_a_server_that_decides_expiry_on_its_wall_clock_is_caught_and_shrinks() -> None:
    broken = dataclasses.replace(FAST, server="wall-clock")
    seed, kind = first_violation(broken, range(40))
    assert kind == "lease_overrun"
    result = shrink(seed, broken)
    assert len(result.faults) <= 2
    assert any(f.step_s > 0 for f in result.faults)  # a forward step did it
    assert run_seed(seed, FAST, faults=result.faults).violations == []  # the real server holds


def test_zero_margin_is_caught_and_shrinks_to_a_short_trace() -> None:
    broken = dataclasses.replace(FAST, machine="margin0", fencing=False)
    seed, _ = first_violation(broken, range(300))
    result = shrink(seed, broken)
    assert result.violations
    assert len(result.faults) <= 3
    assert result.trace is not None
    assert any("VIOLATION" in line for line in result.trace[-3:])
    # the shrunk schedule reproduces on its own
    again = run_seed(seed, broken, faults=result.faults, stop_at_first_violation=True)
    assert again.violations[0] == result.violations[0]


def test_zero_margin_breaks_a_spec_invariant_without_fencing() -> None:
    broken = dataclasses.replace(FAST, machine="margin0", fencing=False)
    first_violation(broken, range(300), "term_decreased")


def test_ignoring_a_foreign_holder_is_caught_even_with_fencing() -> None:
    broken = dataclasses.replace(FAST, machine="ignore-foreign", fencing=True)
    seed, _ = first_violation(broken, range(300))
    kinds = {v.kind for v in run_seed(seed, broken).violations}
    assert "two_schedulers_in_term" in kinds


def test_fencing_absorbs_a_pause_between_check_and_act() -> None:
    # A pause longer than the margin between the check and the act lets a stale leader act
    # after its successor: fatal unfenced, rejected by the fence.
    long_gap = dataclasses.replace(FAST, gap_pause_max_s=15.0)
    seed, _ = first_violation(
        dataclasses.replace(long_gap, fencing=False), range(300), "term_decreased"
    )
    fenced = run_seed(seed, long_gap)
    assert fenced.violations == []
    assert fenced.acts_rejected > 0 and fenced.unfenced_violations > 0


def test_drift_beyond_the_margin_is_caught() -> None:
    # margin / TTL = 5 / 30: a node clock more than ~17 % slow outlives its lease.
    _, kind = first_violation(dataclasses.replace(FAST, drift=0.25), range(300))
    assert kind == "lease_overrun"


@dataclasses.dataclass(frozen=True)
class TightBound(SimConfig):
    def failover_bound_s(self) -> float:
        return self.lease_ttl_sec / 2.0


def test_liveness_check_fires_when_failover_is_late() -> None:
    tight = TightBound(duration_s=300.0, pass_interval_ms=100.0)
    first_violation(tight, range(100), "no_failover")


def test_summary_counts_kinds_once_per_seed() -> None:
    broken = dataclasses.replace(FAST, machine="ignore-foreign")
    summary = Summary()
    seed, _ = first_violation(broken, range(300))
    result = run_seed(seed, broken)
    summary.add(result)
    assert result.violation_events >= len(result.violations)
    assert summary.violations == len({v.kind for v in result.violations})


def test_faults_can_be_given_explicitly() -> None:
    fault = Fault(at=50.0, kind="crash", node=0, duration=1.0)
    result = run_seed(3, FAST, faults=[fault], trace=True)
    assert result.faults == (fault,)
    assert any("FAULT crash node-0" in line for line in result.trace or [])


def test_cli_prints_one_json_line() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "conductord.sim",
            "--seeds",
            "4",
            "--nodes",
            "3",
            "--duration-s",
            "120",
            "--jobs",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["seeds"] == 4 and doc["violations"] == 0
    assert doc["config"]["nodes"] == 3 and doc["config"]["effective_margin_s"] == 5.0
    assert {"sim_hours", "passes_checked", "worst_failover_s", "wall_s"} <= doc.keys()


def test_cli_reports_a_shrunk_violation() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "conductord.sim",
            "--seeds",
            "5",
            "--duration-s",
            "300",
            "--machine",
            "ignore-foreign",
            "--jobs",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    report = doc["first_violation"]
    assert report["kind"] in ("lease_overrun", "two_schedulers_in_term")
    assert report["faults"] and "VIOLATION" in report["trace"][-1]


def run_cli(*args: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "conductord.sim", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    doc.pop("wall_s")
    return proc.returncode, doc


def test_cli_same_seeds_same_result_in_any_number_of_workers() -> None:
    args = ("--seeds", "5", "--duration-s", "300", "--server", "wall-clock")
    code, doc = run_cli(*args, "--jobs", "2")
    assert code == 1 and doc["violating_seeds"] == [4]  # a shrunk report is part of it
    assert doc["config"]["server"] == "wall-clock" and doc["faults_injected"]["clock_step"] > 0
    assert run_cli(*args, "--jobs", "2") == (code, doc)
    assert run_cli(*args, "--jobs", "1") == (code, doc)
