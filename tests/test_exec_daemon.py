"""`conductord start --exec` and the plug-ins end to end (SPEC §14): real daemons, real children.

Every test runs a small fleet of `python -m conductord start` subprocesses against the real
reference Control API (SQLite, long-poll on) with short timings: TTL 2 s, renew 250 ms, stop
grace 500 ms (+ 250 ms fits the 1 s step-down margin). The `--exec` command is the flock child of
tests/test_exec_guard.py: it takes an exclusive non-blocking `flock` on one file shared by the
whole fleet, so the kernel itself reports two copies at once (an `overlap` record, exit 99), and
notes its term, environment and the lease-clock time (`at`, CLOCK_BOOTTIME: the same clock in
every process of the machine) of each thing that happens to it.

gevent never runs in the pytest process: its SIGCHLD handling would reap other tests' children.
Waits are bounded and end on the awaited log line or process exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from conductord.clock import lease_clock
from tests.support.control_api import ControlApiProcess
from tests.support.daemon import DaemonProcess, clean_env
from tests.test_exec_guard import alive, make_child, wait_gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: pidfd")

REPO = Path(__file__).resolve().parent.parent
TIMING = {
    "--lease-ttl-sec": "2",
    "--lease-renew-interval-ms": "250",
    "--heartbeat-interval-ms": "500",
    "--request-timeout-ms": "1000",
    "--exec-stop-grace-ms": "500",
}
STOP_BUDGET_S = 1.0 + 1.0 + 0.5  # request timeout + 1 s + the stop grace (SPEC §5, §14)


class Fleet:
    """Nodes against one Control API; everything they started is gone after the test."""

    def __init__(self, api: ControlApiProcess, tmp_path: Path) -> None:
        self.api = api
        self.tmp_path = tmp_path
        self.nodes: list[DaemonProcess] = []

    def node(self, name: str, *args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        settings = {"--node-id": name, "--host": f"{name}-host", "--control-api-base": self.api.url}
        argv = [part for pair in {**settings, **TIMING}.items() for part in pair]
        environ = clean_env(BAA_SHARED_TOKEN=self.api.token or "", **(env or {}))
        daemon = DaemonProcess([*argv, *args], env=environ)
        self.nodes.append(daemon)
        return daemon

    def close(self) -> None:
        for daemon in self.nodes:
            if daemon.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    daemon.proc.send_signal(signal.SIGCONT)  # a paused one must see its kill
            daemon.close()


@pytest.fixture
def fleet(control_api: ControlApiProcess, tmp_path: Path, child: Any) -> Iterator[Fleet]:
    # Needs `child`, so that the leftover check runs after every node is gone.
    fleet = Fleet(control_api, tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def child(tmp_path: Path):
    make = make_child(tmp_path)
    yield make
    # A killed daemon's guard kills its group; should anything be left, the test fails here.
    leftovers = [r["pid"] for r in make.records.of("start") if not wait_gone(r["pid"], 3.0)]
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    assert leftovers == [], "an --exec child outlived its test"


def exec_args(child_argv: list[str], *extra: str) -> list[str]:
    return ["--exec", shlex.join(child_argv), *extra]


def started_term(daemon: DaemonProcess) -> int:
    """The term of the node's first `exec.started`, once its command has noted its start
    (the child's `ready <pid>` line comes after its record)."""
    started = daemon.wait_event("exec.started", timeout=15)
    ready = f"ready {started['pid']}"
    daemon.wait_event("exec.output", lambda e: e["line"] == ready, timeout=10)
    return int(started["term"])


def overlaps(make: Any) -> list[dict[str, Any]]:
    return make.records.of("overlap")


def names(daemon: DaemonProcess) -> list[str]:
    return [event["event"] for event in daemon.events]


# -- leadership, handover, faults -------------------------------------------------------------


def test_only_the_leader_runs_the_command_and_sigterm_hands_it_over(
    fleet: Fleet, child: Any, free_port: int
) -> None:
    local = f"http://127.0.0.1:{free_port}"
    a = fleet.node("a", *exec_args(child(), "--local-api", local))
    term_a = started_term(a)
    leader = a.transition_to("leader")
    assert leader["term"] == term_a
    # The start-time leader's command starts only after conductor.started.
    assert names(a).index("conductor.started") < names(a).index("exec.started")
    b = fleet.node("b", *exec_args(child()))
    assert b.wait_event("conductor.started", timeout=15)["snapshot"]["daemon"]["lease_state"] == (
        "standby"
    )

    [first] = child.records.of("start")
    assert first["pid"] == a.named("exec.started")[0]["pid"]
    assert first["term"] == str(term_a)
    env = first["env"]
    assert (env["CONDUCTORD_NODE_ID"], env["CONDUCTORD_HOST"]) == ("a", "a-host")
    assert "BAA_SHARED_TOKEN" not in env and fleet.api.token not in json.dumps(env)
    assert first["pgid"] == first["pid"]  # a process group of its own

    status = requests.get(f"{local}/v1/status", timeout=5).json()
    assert status["exec"] == {
        "command": sys.executable,  # argv[0] only
        "running": True,
        "pid": first["pid"],
        "term": term_a,
        "runs": 1,
        "last_exit_code": None,
    }
    metrics = requests.get(f"{local}/metrics", timeout=5).text
    assert "conductord_exec_running 1.0" in metrics
    assert "conductord_exec_starts_total 1.0" in metrics
    assert 'conductord_exec_exits_total{reason="stopping"} 0.0' in metrics

    began = time.monotonic()
    a.send(signal.SIGTERM)
    assert a.wait_exit(timeout=10) == 0
    assert time.monotonic() - began < STOP_BUDGET_S + 1.0
    term_b = started_term(b)
    assert term_b > term_a

    exited = a.wait_event("exec.exited")
    assert (exited["pid"], exited["term"], exited["reason"]) == (first["pid"], term_a, "stopping")
    assert exited["signal"] == "SIGTERM"
    order = names(a)
    assert order.index("conductor.stopping") < order.index("exec.exited")
    assert order.index("exec.exited") < order.index("lease.released")  # the group first
    assert a.named("lease.released")[0]["released"] is True

    second = child.records.of("start")[1]
    assert second["term"] == str(term_b) and second["env"]["CONDUCTORD_NODE_ID"] == "b"
    [sigterm] = child.records.of("sigterm")
    handover = second["at"] - sigterm["at"]
    assert 0 < handover < 1.0, handover  # long-poll: one round trip after the release
    assert overlaps(child) == []
    assert [e["term"] for e in b.named("exec.started")] == [term_b]


def test_kill_9_of_the_leader_daemon_takes_its_command_along(fleet: Fleet, child: Any) -> None:
    a = fleet.node("a", *exec_args(child()))
    started_term(a)
    b = fleet.node("b", *exec_args(child()))
    b.wait_event("conductor.started", timeout=15)
    pid = a.named("exec.started")[0]["pid"]
    a.proc.kill()  # the daemon only: its guard sees the control pipe close
    assert wait_gone(pid, 1.0), "the command outlived its daemon by more than a second"
    gone_at = lease_clock()

    started_term(b)
    second = child.records.of("start")[1]
    assert second["env"]["CONDUCTORD_NODE_ID"] == "b" and second["at"] > gone_at
    assert overlaps(child) == []


def test_a_paused_leader_loses_its_command_before_the_lease_ends_and_never_restarts_it(
    fleet: Fleet, child: Any
) -> None:
    a = fleet.node("a", *exec_args(child()))
    term_a = started_term(a)
    b = fleet.node("b", *exec_args(child()))
    b.wait_event("conductor.started", timeout=15)
    pid = a.named("exec.started")[0]["pid"]

    paused_at = lease_clock()
    a.send(signal.SIGSTOP)
    try:
        # The guard's deadline: SIGKILL 250 ms before the server may grant the lease again,
        # at most one TTL after the paused daemon's last renewal was sent.
        assert wait_gone(pid, 2.5), "the paused daemon's command outlived the lease"
        gone_at = lease_clock()
        assert gone_at - paused_at < 2.0
        term_b = started_term(b)
        assert term_b > term_a
        second = child.records.of("start")[1]
        assert second["env"]["CONDUCTORD_NODE_ID"] == "b" and second["at"] > gone_at
    finally:
        a.send(signal.SIGCONT)

    # Awake again: a learns its lease is gone and never starts its command beside b's.
    mark = len(a.events)
    a.wait_event("lease.transition", lambda e: e["from_state"] == "leader", after=0)
    a.wait_event(
        "lease.transition",
        lambda e: e["to_state"] == "standby" and e["reason"] == "held_by_other",
        after=mark,
    )
    exited = a.wait_event("exec.exited")
    assert exited["pid"] == pid and exited["reason"] == "deadline"
    assert len(a.named("exec.started")) == 1
    assert alive(second["pid"])  # b's copy runs on, alone
    assert overlaps(child) == []


def test_a_leader_restarted_at_once_after_kill_9_waits_for_its_old_group(
    fleet: Fleet, child: Any, tmp_path: Path
) -> None:
    # With a state dir the restarted daemon keeps its instance id and the server renews the
    # same term at once: its command must not start while the old guard still stops the old
    # one (here a job that takes 1.5 s to finish after SIGTERM, inside the 1.7 s grace).
    # TTL 4 s, renew 2 s: a 2 s step-down margin, room for that grace (+ 250 ms).
    args = [
        *exec_args(child(term_delay=1.5)),
        "--state-dir", str(tmp_path / "state"),
        "--lease-ttl-sec", "4",
        "--lease-renew-interval-ms", "2000",
        "--exec-stop-grace-ms", "1700",
    ]  # fmt: skip
    first = fleet.node("a", *args)
    term = started_term(first)
    first.proc.kill()
    again = fleet.node("a", *args)
    started = again.wait_event("exec.started", timeout=15)
    assert started["term"] == term  # the same term: fencing cannot tell the copies apart
    # The new copy's first record: `start`, or `overlap` when the old one still held the flock.
    end = time.monotonic() + 10
    while not (mine := [r for r in child.records.all() if r["pid"] == started["pid"]]):
        assert time.monotonic() < end, "the new copy wrote no record"
        time.sleep(0.02)
    assert [r["event"] for r in mine] == ["start"], "two copies of the command at once"
    old, new = child.records.of("start")
    (finished,) = child.records.of("term_exit")
    assert finished["pid"] == old["pid"]
    assert new["at"] > finished["at"], "the new copy started before the old one was gone"
    [waiting] = again.named("exec.waiting")
    assert waiting["term"] == term
    assert waiting["lock"] == str(tmp_path / "state" / "exec.lock")
    assert overlaps(child) == []


# -- runs ---------------------------------------------------------------------------------------


def test_periodic_runs_happen_on_the_leader_only_and_an_overrun_is_skipped(
    fleet: Fleet, child: Any
) -> None:
    job = child(exit_after=0.45)  # longer than the period: every other slot is skipped
    a = fleet.node("a", *exec_args(job, "--exec-every-ms", "300"))
    term_a = started_term(a)
    b = fleet.node("b", *exec_args(job, "--exec-every-ms", "300"))
    b.wait_event("conductor.started", timeout=15)
    skipped = a.wait_event("exec.skipped", timeout=10)
    assert skipped["term"] == term_a and skipped["running_pid"] is not None
    a.wait_event("exec.started", lambda e: e["run"] == 3, timeout=10)
    exits = a.named("exec.exited")
    assert exits and all(e["reason"] == "exited" and e["exit_code"] == 0 for e in exits)
    assert {r["term"] for r in child.records.of("start")} == {str(term_a)}
    assert {r["env"]["CONDUCTORD_NODE_ID"] for r in child.records.of("start")} == {"a"}
    assert b.named("exec.started") == []
    assert overlaps(child) == []


def test_a_crash_looping_command_is_restarted_with_a_doubling_backoff(
    fleet: Fleet, child: Any
) -> None:
    a = fleet.node("a", *exec_args(child(exit_after=0, code=3)))
    a.wait_event("exec.started", lambda e: e["run"] == 3, timeout=15)
    starts, exits = a.named("exec.started"), a.named("exec.exited")
    assert [e["exit_code"] for e in exits[:2]] == [3, 3]
    assert {e["reason"] for e in exits[:2]} == {"exited"}
    gaps = [starts[i + 1]["_seen_at"] - exits[i]["_seen_at"] for i in range(2)]
    assert 0.9 <= gaps[0] < 1.8 and 1.9 <= gaps[1] < 2.8, gaps  # 1 s, then 2 s


# -- plug-ins -----------------------------------------------------------------------------------

JOBS = '''
"""A scheduler plug-in and hooks for tests/test_exec_daemon.py: every call is a log line."""
import gevent

from conductord import logs

passes = 0


def run(ctx):
    global passes
    passes += 1
    log = logs.get_logger()
    log.info("jobs.pass", n=passes, node=ctx.controller_id, host=ctx.host, term=ctx.term,
             still_leader=ctx.still_leader())
    if passes == 2:
        raise RuntimeError("planned failure")
    if passes == 3:
        gevent.sleep(0.3)  # longer than the interval: the next pass waits for this one
    log.info("jobs.done", n=passes)


def load_runs():
    return "7 runs from the hook"


def reconcile_runs():
    logs.get_logger().info("jobs.reconcile")


def on_lease_state_change(snapshot):
    logs.get_logger().info("jobs.state", state=snapshot["daemon"]["lease_state"])
'''


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "jobs.py").write_text(JOBS)
    return {"PYTHONPATH": str(plugins)}


PLUGIN_ARGS = ("--scheduler", "jobs:run", "--scheduler-interval-ms", "200", "--hooks", "jobs")


def test_the_scheduler_plug_in_runs_on_the_leader_only_and_survives_its_own_failure(
    fleet: Fleet, plugin_env: dict[str, str]
) -> None:
    a = fleet.node("a", *PLUGIN_ARGS, env=plugin_env)
    term_a = a.transition_to("leader", timeout=15)["term"]
    failed = a.wait_event("scheduler.failed", timeout=10)
    assert failed["error"] == "RuntimeError: planned failure" and failed["term"] == term_a
    assert "exception" not in failed and "exc_info" not in failed  # no traceback
    a.wait_event("scheduler.overran", timeout=10)
    a.wait_event("jobs.pass", lambda e: e["n"] == 5, timeout=10)
    b = fleet.node("b", *PLUGIN_ARGS, env=plugin_env)
    b.wait_event("conductor.started", timeout=15)
    a.wait_event("jobs.pass", lambda e: e["n"] == 7, timeout=10)  # b has seen passes go by

    passes = a.named("jobs.pass")
    assert all(p["term"] == term_a and p["still_leader"] and p["node"] == "a" for p in passes)
    assert passes[0]["host"] == "a-host"
    # Never two passes at once: each pass starts after the previous one finished.
    order = [e["event"] for e in a.events if e["event"] in ("jobs.pass", "jobs.done")]
    pass_, done = "jobs.pass", "jobs.done"
    assert order[:6] == [pass_, done, pass_, pass_, done, pass_]  # pass 2 raised
    assert b.named("jobs.pass") == []

    a.send(signal.SIGTERM)
    assert a.wait_exit(timeout=10) == 0
    term_b = b.transition_to("leader", timeout=10)["term"]
    b.wait_event("jobs.pass", timeout=10)
    assert {(p["term"], p["still_leader"]) for p in b.named("jobs.pass")} == {(term_b, True)}
    assert term_b > term_a

    # The hooks: reconcile in the start sequence, every state change with the snapshot.
    assert len(a.named("jobs.reconcile")) == 1
    assert [e["state"] for e in a.named("jobs.state")] == ["leader", "standby"]
    assert names(a).index("jobs.reconcile") < names(a).index("conductor.started")


# -- one-shot runs ------------------------------------------------------------------------------


def one_shot(fleet: Fleet, command: list[str], args: list[str], env: dict[str, str]):
    settings = {"--node-id": "d", "--control-api-base": fleet.api.url, **TIMING}
    argv = [part for pair in settings.items() for part in pair]
    environ = clean_env(BAA_SHARED_TOKEN=fleet.api.token or "", **env)
    return subprocess.run(
        [*command, *argv, *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_run_once_and_diagnose_never_start_the_command_and_diagnose_shows_the_settings(
    fleet: Fleet, child: Any, plugin_env: dict[str, str]
) -> None:
    job = [*child(), "--password=hunter2"]  # arguments may hold secrets: never shown
    args = [*exec_args(job, "--exec-every-ms", "60000"), *PLUGIN_ARGS]
    done = one_shot(
        fleet, [sys.executable, "-m", "conductord", "start", "--run-once"], args, plugin_env
    )
    assert done.returncode == 0, done.stderr
    snapshot = json.loads(done.stdout)
    assert snapshot["daemon"]["lease_state"] == "leader"
    assert snapshot["exec"]["command"] is None  # no supervisor in a one-shot run

    done = one_shot(fleet, [sys.executable, "scripts/run_once.py", "--json"], args, plugin_env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["work"] == {
        "exec": {
            "command": sys.executable,
            "resolves_to": sys.executable,
            "every_ms": 60000,
            "stop_grace_ms": 500,
        },
        "scheduler": "jobs:run",
        "scheduler_interval_ms": 200,
        "hooks": "jobs",
    }
    load_runs = next(step for step in report["steps"] if step["key"] == "load-runs")
    assert load_runs["detail"] == "7 runs from the hook"

    missing = ["no-such-program-x7", "--token=abc"]
    done = one_shot(fleet, [sys.executable, "scripts/run_once.py"], exec_args(missing), {})
    assert done.returncode == 0, done.stderr
    assert "exec:               no-such-program-x7 (NOT FOUND on PATH)" in done.stdout
    assert "not an executable found on PATH" in done.stdout
    for output in (done.stdout, done.stderr):
        assert "hunter2" not in output and "--token=abc" not in output
    assert child.records.all() == []  # nothing ever started


# -- crash safety -------------------------------------------------------------------------------

PLANTED_SUPERVISOR_BUG = '''\
"""Planted by tests/test_exec_daemon.py: the exec supervisor fails right after a start."""
import os

if "CONDUCTORD_TERM" not in os.environ:  # the daemon, not its --exec child
    from conductord import exec as _exec

    _started = _exec.ExecSupervisor._on_started

    def _on_started(self, guard, pid):
        _started(self, guard, pid)
        raise RuntimeError("planted supervisor bug")

    _exec.ExecSupervisor._on_started = _on_started
'''


def test_a_failing_supervisor_crashes_the_daemon_with_the_group_gone(
    fleet: Fleet, child: Any, tmp_path: Path
) -> None:
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(PLANTED_SUPERVISOR_BUG)
    a = fleet.node("a", *exec_args(child()), env={"PYTHONPATH": str(plant)})
    crashed = a.wait_event("conductor.crashed", timeout=15)
    assert "planted supervisor bug" in crashed["error"]
    assert a.wait_exit(timeout=15) == 1
    [started] = child.records.of("start")
    assert wait_gone(started["pid"], 0.5), "the command outlived the crashed daemon"
    # Released, if at all, only once the group was seen gone.
    order = names(a)
    if "lease.released" in order:
        assert order.index("exec.exited") < order.index("lease.released")


def test_config_errors_exit_2_in_one_line_before_anything_starts(fleet: Fleet, child: Any) -> None:
    for args, names_in_line in (
        # 800 ms + 250 ms does not fit the 1 s step-down margin of TTL 2 s, renew 250 ms.
        ([*exec_args(child()), "--exec-stop-grace-ms", "800"], ["--exec-stop-grace-ms", "--exec"]),
        (["--scheduler", "no_such_module_x7:run"], ["--scheduler", "BAA_CONDUCTOR_SCHEDULER"]),
        (["--hooks", "no_such_module_x7"], ["--hooks", "BAA_CONDUCTOR_HOOKS"]),
    ):
        done = one_shot(fleet, [sys.executable, "-m", "conductord", "start"], args, {})
        assert done.returncode == 2 and done.stdout == "", done
        [line] = done.stderr.splitlines()
        assert line.startswith("conductord: error: ") and all(n in line for n in names_in_line)
        assert "Traceback" not in done.stderr
    assert child.records.all() == []
