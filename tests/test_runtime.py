"""The runtime in-process, with a fake client: crash handling, scheduler gate, hooks.

gevent greenlets run here without monkey-patching: the fake client does no I/O, so nothing
blocks the hub. The real client and signals are covered by tests/test_daemon.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gevent
import pytest

from conductord.config import Config
from conductord.runtime import Runtime, SchedulerContext
from conductord.wire import AcquireResult, ControlApiError, LeaseRecord, ReleaseResult


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, **fields)

    def events(self) -> list[str]:
        return [event for _, event, _ in self.lines]


class FakeClient:
    def __init__(self, holder: str = "n1", term: int = 4) -> None:
        self.holder = holder
        self.term = term
        self.heartbeat_error: BaseException | None = None
        self.heartbeats = 0
        self.releases: list[tuple[str, int]] = []
        self.closed = False

    def heartbeat(self, heartbeat: Any) -> None:
        self.heartbeats += 1
        if self.heartbeat_error is not None and self.heartbeats > 1:
            raise self.heartbeat_error

    def acquire_leader_lease(self, **body: Any) -> AcquireResult:
        lease = LeaseRecord("global", self.holder, "h", self.term, 130, 100, None, None)
        return AcquireResult(
            holder_id=self.holder,
            holder_host="h",
            term=self.term,
            lease_expires_at=130,
            renewed_at=100,
            is_leader=self.holder == body["controller_id"],
            operation="acquire",
            lease=lease,
        )

    def release_leader_lease(
        self,
        *,
        controller_id: str,
        term: int,
        instance_id: str | None = None,
        one_shot: bool | None = None,
    ) -> ReleaseResult:
        self.releases.append((controller_id, term))
        return ReleaseResult(released=True, supported=True, lease=None)

    def close(self) -> None:
        self.closed = True


def make_runtime(client: FakeClient, log: RecordingLog) -> Runtime:
    config = Config(
        node_id="n1",
        host="h",
        control_api_bases=("http://127.0.0.1:9",),
        heartbeat_interval_ms=20,
        lease_renew_interval_ms=20,
        lease_ttl_sec=5,
        request_timeout_ms=1000,
    )
    return Runtime(config, client=client, log=log)


def test_a_crashing_loop_stops_the_daemon_loudly_and_the_lease_is_still_released():
    client, log = FakeClient(), RecordingLog()
    runtime = make_runtime(client, log)
    client.heartbeat_error = RuntimeError("bug in a loop")
    runtime.start()
    assert runtime.stop_requested.wait(timeout=5)
    assert isinstance(runtime.crashed, RuntimeError)
    level, _, fields = next(line for line in log.lines if line[1] == "conductor.crashed")
    assert level == "error"
    assert fields["error"] == "RuntimeError: bug in a loop"
    assert fields["snapshot"]["loops"]["heartbeat"] in (True, False)
    runtime.stop()
    assert client.releases == [("n1", 4)]
    assert log.events()[-1] == "conductor.stopped"
    assert client.closed


def test_control_api_errors_do_not_crash_a_loop():
    client, log = FakeClient(), RecordingLog()
    runtime = make_runtime(client, log)
    client.heartbeat_error = ControlApiError("Control API /x: boom", path="/x")
    runtime.start()
    assert not runtime.stop_requested.wait(timeout=0.3)
    assert runtime.crashed is None
    assert runtime.snapshot()["loops"] == {"heartbeat": True, "lease": True}
    assert client.heartbeats > 3
    runtime.stop()


def test_scheduler_pass_runs_only_for_the_leader_with_the_term_as_fencing_token():
    client, log = FakeClient(term=9), RecordingLog()
    runtime = make_runtime(client, log)
    seen: list[SchedulerContext] = []
    runtime.start(loops=False)
    assert runtime.run_scheduler_pass(seen.append) == "scheduled"
    assert seen == [SchedulerContext(controller_id="n1", host="h", term=9)]
    runtime.stop()
    assert runtime.run_scheduler_pass(seen.append) == "skipped_not_leader"
    assert len(seen) == 1


def test_standby_refuses_to_schedule():
    client, log = FakeClient(holder="someone-else"), RecordingLog()
    runtime = make_runtime(client, log)
    runtime.start(loops=False)
    assert runtime.run_scheduler_pass(lambda ctx: pytest.fail("must not run")) == (
        "skipped_not_leader"
    )
    runtime.stop()
    assert client.releases == []  # nothing held, nothing released


def test_state_change_hooks_get_the_snapshot_and_a_failing_hook_is_only_logged():
    client, log = FakeClient(), RecordingLog()
    runtime = make_runtime(client, log)
    states: list[str] = []

    def broken(snapshot: dict[str, Any]) -> None:
        raise ValueError("hook bug")

    runtime.on_lease_state_change(broken)
    runtime.on_lease_state_change(lambda s: states.append(s["daemon"]["lease_state"]))
    runtime.start(loops=False)
    runtime.stop()
    assert states == ["leader", "standby"]
    assert "hook.failed" in log.events()


def test_start_and_stop_are_idempotent():
    client, log = FakeClient(), RecordingLog()
    runtime = make_runtime(client, log)
    first = runtime.start()
    beats = client.heartbeats
    again = runtime.start()
    assert client.heartbeats == beats == 1  # the second start ran no start sequence
    assert first["daemon"]["current_term"] == again["daemon"]["current_term"] == 4
    runtime.stop()
    runtime.stop()
    assert log.events().count("conductor.stopped") == 1
    assert client.releases == [("n1", 4)]


def test_pacing_reparks_at_once_after_a_full_long_poll_and_never_spins():
    runtime = make_runtime(FakeClient(holder="someone-else"), RecordingLog())
    runtime._long_polled = True
    assert runtime._pace("lease", 1.0, elapsed=1.0) == 0.0
    # a server that ignores wait_ms answers at once: wait out the interval (±10 %)
    assert 0.85 <= runtime._pace("lease", 1.0, elapsed=0.05) <= 1.05
    runtime._long_polled = False
    assert 0.4 <= runtime._pace("lease", 1.0, elapsed=0.5) <= 0.6
    assert runtime._pace("lease", 1.0, elapsed=2.0) == 0.0  # overran: start at once
    assert 0.9 <= runtime._pace("heartbeat", 1.0, elapsed=0.0) <= 1.1


def test_a_failing_start_step_is_a_loud_crash_that_still_releases_the_lease():
    from conductord import runtime as runtime_module

    client, log = FakeClient(), RecordingLog()
    config = make_runtime(client, log).config

    def broken_load_runs() -> str:
        raise OSError("runs dir on a dead disk")

    runtime = Runtime(config, client=client, log=log, load_runs=broken_load_runs)
    assert runtime_module._serve(runtime, run_once=False) == 1
    events = log.events()
    assert events.index("conductor.crashed") < events.index("conductor.stopping")
    assert events[-1] == "conductor.stopped"
    assert "conductor.started" not in events
    assert client.releases == [("n1", 4)]  # the lease it took in step 2 was handed back


def test_an_unreadable_runs_dir_is_reported_not_fatal(tmp_path):
    from conductord.runtime import count_runs

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "r1").mkdir()
    assert count_runs(str(runs)) == f"1 entries in {runs}"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert count_runs(str(not_a_dir)).startswith(f"cannot read {not_a_dir}:")
    assert count_runs(str(tmp_path / "missing")) == f"{tmp_path / 'missing'} does not exist"
    assert count_runs(None) == "runs_dir not configured"


# -- leader-only work: the exec supervisor's calls and the scheduler greenlet (SPEC §14) ---------
# A real ExecSupervisor never runs in the pytest process (gevent's SIGCHLD handling would reap
# other tests' children): tests/test_exec_daemon.py runs it in real daemons. Here a recorder
# stands in for it, sharing one timeline with the client.


class TimelineClient(FakeClient):
    def __init__(self, timeline: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.timeline = timeline
        self.acquire_error: ControlApiError | None = None

    def acquire_leader_lease(self, **body: Any) -> AcquireResult:
        if self.acquire_error is not None:
            raise self.acquire_error
        return super().acquire_leader_lease(**body)

    def release_leader_lease(self, **kwargs: Any) -> ReleaseResult:
        self.timeline.append(("release", kwargs["term"]))
        return super().release_leader_lease(**kwargs)


class RecordingSupervisor:
    """What the runtime calls of `exec.ExecSupervisor`, recorded."""

    running = False
    starts_total = 0

    def __init__(self, timeline: list[tuple[Any, ...]], *, gone: bool = True) -> None:
        self.timeline = timeline
        self.gone = gone
        self.exits_total: dict[str, int] = {}

    def lead(self, term: int, valid_until: float, lease_end: float) -> None:
        self.timeline.append(("lead", term, valid_until, lease_end))

    def lose(self, reason: str) -> None:
        self.timeline.append(("lose", reason))

    def stop(self, timeout: float | None = None) -> bool:
        self.timeline.append(("stop",))
        return self.gone

    def snapshot(self) -> dict[str, Any]:
        return {
            "command": "job",
            "running": False,
            "pid": None,
            "term": None,
            "runs": 0,
            "last_exit_code": None,
        }


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Yield to the hub until `predicate()` holds (the loops run at 20 ms here)."""
    gevent.with_timeout(timeout, lambda: _spin(predicate))


def _spin(predicate: Any) -> None:
    while not predicate():
        gevent.sleep(0.005)


def with_supervisor(*, gone: bool = True) -> tuple[Runtime, TimelineClient, Any, list, Any]:
    timeline: list[tuple[Any, ...]] = []
    client, log = TimelineClient(timeline), RecordingLog()
    runtime = make_runtime(client, log)
    sup = RecordingSupervisor(timeline, gone=gone)
    runtime.exec_supervisor = sup  # type: ignore[assignment]
    return runtime, client, log, timeline, sup


def test_exec_is_led_only_once_the_work_began_and_after_every_renewal_then_lost_with_a_reason():
    runtime, client, _, timeline, _ = with_supervisor()
    runtime.start(work=False)
    wait_for(lambda: client.heartbeats > 2)
    assert timeline == []  # the daemon begins the work after conductor.started
    runtime.begin_work()
    assert timeline[0][:2] == ("lead", 4)  # the start-time leader at once
    wait_for(lambda: len(timeline) >= 4)
    leads = [call for call in timeline if call[0] == "lead"]
    margin = runtime.machine.margin_s
    for _, term, valid_until, lease_end in leads:
        assert term == 4 and lease_end == pytest.approx(valid_until + margin)
    assert [call[2] for call in leads] == sorted(call[2] for call in leads)  # moved forward

    client.holder = "someone-else"
    wait_for(lambda: ("lose", "leadership_lost") in timeline)
    mark = len(timeline)
    wait_for(lambda: client.heartbeats > 8)
    assert all(call[0] != "lead" for call in timeline[mark:])  # never while standby
    runtime.stop()
    assert snapshot_exec(runtime)["command"] == "job"


def snapshot_exec(runtime: Runtime) -> dict[str, Any]:
    return runtime.snapshot()["exec"]


def test_the_failure_threshold_ends_exec_as_leadership_lost():
    runtime, client, _, timeline, _ = with_supervisor()
    runtime.start()
    wait_for(lambda: any(call[0] == "lead" for call in timeline))
    client.acquire_error = ControlApiError("Control API /v1/leader/acquire: boom", path="/x")
    wait_for(lambda: runtime.machine.state == "degraded")
    assert ("lose", "leadership_lost") in timeline
    runtime.stop()


def test_stop_tells_exec_first_waits_for_the_group_and_only_then_releases():
    runtime, _, log, timeline, _ = with_supervisor()
    runtime.start()
    wait_for(lambda: any(call[0] == "lead" for call in timeline))
    runtime.stop()
    tail = [call for call in timeline if call[0] != "lead"]
    assert tail == [("lose", "stopping"), ("stop",), ("release", 4)]
    events = log.events()
    assert events.index("conductor.stopping") < events.index("lease.released")
    assert runtime.crashed is None


def test_a_group_not_confirmed_gone_keeps_the_lease_and_fails_the_stop():
    runtime, client, log, timeline, _ = with_supervisor(gone=False)
    runtime.start()
    wait_for(lambda: any(call[0] == "lead" for call in timeline))
    runtime.stop()
    assert client.releases == []  # the lease expires instead; the guard's deadline is earlier
    assert ("error", "exec.stop_failed") in [(level, event) for level, event, _ in log.lines]
    skipped = next(f for _, e, f in log.lines if e == "lease.release_skipped")
    assert skipped["reason"] == "exec_group_not_gone"
    assert runtime.crashed is not None  # exit 1


def test_a_failing_supervisor_call_is_a_crash():
    runtime, _, log, _, sup = with_supervisor()

    def broken(*args: Any) -> None:
        raise RuntimeError("supervisor bug")

    sup.lead = broken  # type: ignore[method-assign]
    runtime.start()
    assert runtime.stop_requested.wait(timeout=5)
    assert isinstance(runtime.crashed, RuntimeError)
    assert "conductor.crashed" in log.events()
    runtime.stop()


def test_the_scheduler_greenlet_runs_one_pass_at_a_time_while_leader_and_survives_a_failure():
    client, log = FakeClient(), RecordingLog()
    config = dataclasses.replace(make_runtime(client, log).config, scheduler_interval_ms=10)
    passes: list[tuple[float, float, int, bool]] = []
    running = [0]

    def work(ctx: SchedulerContext) -> None:
        running[0] += 1
        assert running[0] == 1, "two passes at once"
        began = gevent.get_hub().loop.now()
        try:
            if len(passes) == 1:
                raise ValueError("plug-in bug")
            gevent.sleep(0.015 if len(passes) == 2 else 0)  # pass 3 overruns its 10 ms
        finally:
            passes.append((began, gevent.get_hub().loop.now(), ctx.term, ctx.still_leader()))
            running[0] -= 1

    runtime = Runtime(config, client=client, log=log, scheduler=work)
    runtime.start()
    wait_for(lambda: len(passes) >= 6)
    assert {(term, leader) for _, _, term, leader in passes} == {(4, True)}
    failed = [f for _, e, f in log.lines if e == "scheduler.failed"]
    assert failed == [{"term": 4, "error": "ValueError: plug-in bug"}]  # and never two at once
    assert "scheduler.overran" in log.events()

    client.holder = "someone-else"
    wait_for(lambda: runtime.machine.state == "standby")
    count = len(passes)
    wait_for(lambda: client.heartbeats > 15)
    assert len(passes) <= count + 1  # at most the pass that was already under way
    assert runtime.run_scheduler_pass(lambda ctx: pytest.fail("not leader")) == (
        "skipped_not_leader"
    )
    runtime.stop()
    assert runtime.crashed is None


def test_a_hand_made_context_is_never_leader():
    assert SchedulerContext(controller_id="n1", host="h", term=1).still_leader() is False
