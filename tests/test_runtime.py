"""The runtime in-process, with a fake client: crash handling, scheduler gate, hooks.

gevent greenlets run here without monkey-patching: the fake client does no I/O, so nothing
blocks the hub. The real client and signals are covered by tests/test_daemon.py.
"""

from __future__ import annotations

from typing import Any

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
        self, *, controller_id: str, term: int, instance_id: str | None = None
    ) -> ReleaseResult:
        self.releases.append((controller_id, term))
        return ReleaseResult(released=True, supported=True, lease=None)

    def close(self) -> None:
        self.closed = True


def make_runtime(client: FakeClient, log: RecordingLog) -> Runtime:
    config = Config(
        node_id="n1",
        host="h",
        control_api_base="http://127.0.0.1:9",
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
