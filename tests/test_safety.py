"""Never two schedulers, outside the model (SPEC §15): each fault with real processes.

Every test runs real nodes (`python -m conductord start`) against the real reference Control
API, polls every node's `/v1/status` every few milliseconds (tests/support/poller.py) and
asserts that no two nodes ever had the scheduler enabled at once, besides what each fault
must (not) do to leadership:

1. diagnostics (`diagnose`, `scripts/run_once.py`, `start --run-once`) run with the leader's
   own configuration beside a running leader and standby;
2. one node id used by two processes (a copied config), and one state dir used twice;
3. a wall-clock step of the Control API host (libfaketime, wall clock only), and a Control
   API restart together with a clock step;
4. sleep, and the deadline timer that fires a hair early: the real `Runtime` driven by an
   injected lease clock, in-process (a VM cannot be suspended from a test).

Timings are short (TTL 2 s, renew 250 ms). Without libfaketime, the clock-step tests fail under
CI (`.ci/run` installs Debian's `faketime`) and skip elsewhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import gevent
import pytest
import requests

from conductord import clock as lease_clocks
from conductord.config import Config
from conductord.control_api.rules import LeaseRow, decide_acquire
from conductord.lease import LeaseState
from conductord.runtime import DEADLINE_POLL_S, Runtime
from conductord.wire import AcquireResult, LeaseRecord, ReleaseResult
from tests.support.control_api import ControlApiProcess
from tests.support.daemon import DaemonProcess, clean_env
from tests.support.poller import StatusPoller

TTL = 2.0
RENEW = 0.25
SLACK = 1.5
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"

pytestmark = pytest.mark.e2e


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_args(api: ControlApiProcess, node_id: str, role: str, status_port: int | None, *extra):
    args = [
        *("--node-id", node_id, "--role", role, "--host", "127.0.0.1"),
        *("--control-api-base", api.url, "--shared-token", api.token),
        *("--heartbeat-interval-ms", "500"),
        *("--lease-renew-interval-ms", str(int(RENEW * 1000))),
        *("--lease-ttl-sec", str(int(TTL))),
        *("--request-timeout-ms", "1000"),
        *extra,
    ]
    if status_port is not None:
        args += ["--local-api", f"http://127.0.0.1:{status_port}"]
    return args


class Fleet:
    """Nodes with status endpoints, and a poller over them."""

    def __init__(self, api: ControlApiProcess, stack: ExitStack) -> None:
        self.api = api
        self.stack = stack
        self.nodes: dict[str, DaemonProcess] = {}
        self.urls: dict[str, str] = {}

    def start(self, name: str, node_id: str, role: str, *extra: str) -> DaemonProcess:
        port = _port()
        node = DaemonProcess(node_args(self.api, node_id, role, port, *extra))
        self.stack.enter_context(node)
        self.nodes[name] = node
        self.urls[name] = f"http://127.0.0.1:{port}"
        return node

    def poller(self) -> StatusPoller:
        return self.stack.enter_context(StatusPoller(self.urls))


def lease_of(api: ControlApiProcess) -> dict[str, Any]:
    answer = requests.get(f"{api.url}/v1/leader", headers=api.headers, timeout=5)
    answer.raise_for_status()
    return answer.json()["data"]


def left_leader(node: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in node.named("lease.transition") if e["from_state"] == "leader"]


def became_leader(node: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in node.named("lease.transition") if e["to_state"] == "leader"]


@pytest.fixture
def stack():
    with ExitStack() as stack:
        yield stack


# -- 1. diagnostics beside the leader ---------------------------------------------------------


ONE_SHOTS = {
    "diagnose": [sys.executable, "-m", "conductord", "diagnose", "--json"],
    "run_once.py": [sys.executable, "scripts/run_once.py", "--json"],
    "start --run-once": [sys.executable, "-m", "conductord", "start", "--run-once"],
}


def test_diagnostics_with_the_leaders_config_never_end_its_lease(control_api, stack, tmp_path):
    fleet = Fleet(control_api, stack)
    leader = fleet.start("leader", "mini-main", "primary", "--state-dir", str(tmp_path / "s1"))
    granted = leader.transition_to("leader")
    standby = fleet.start("standby", "mini-standby", "standby")
    standby.wait_event("conductor.started")
    poller = fleet.poller()
    poller.wait_samples("standby", 20)
    # The operator runs each diagnostic with the leader's own settings (its state dir too).
    args = node_args(control_api, "mini-main", "primary", None, "--state-dir", str(tmp_path / "s1"))
    for name, command in ONE_SHOTS.items():
        done = subprocess.run(
            [*command, *args], env=clean_env(), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, (name, done.stderr)
        assert "Traceback" not in done.stderr
    # Long enough for a released lease to be taken and the old leader to find out.
    seen = poller.count("standby")
    poller.wait_samples("standby", seen + int(2 * TTL / 0.01))
    time.sleep(TTL)
    poller.stop()
    assert poller.overlaps() == []
    assert left_leader(leader) == [], "the leader lost its lease to a diagnostic"
    assert became_leader(standby) == []
    assert lease_of(control_api)["lease"]["term"] == granted["term"]
    assert not any(s.enabled for s in poller.of("standby"))
    # Refused as another instance of the leader's id, but a diagnostic is no duplicate id:
    # nothing pages, nothing is recorded (it would fire ConductordDuplicateNodeId).
    controllers = requests.get(
        f"{control_api.url}/v1/controllers", headers=control_api.headers, timeout=5
    ).json()["data"]["controllers"]
    assert not any(c["duplicate"] for c in controllers), controllers
    (row,) = [c for c in controllers if c["controller_id"] == "mini-main"]
    assert row["status"] == "leader" and len(row["instances"]) == 1
    history = requests.get(
        f"{control_api.url}/v1/leader/history", headers=control_api.headers, timeout=5
    ).json()["data"]["entries"]
    assert [e["reason"] for e in history] == ["granted"]
    metrics = requests.get(f"{control_api.url}/metrics", timeout=5).text
    assert "conductord_control_api_instance_conflicts_total 0.0" in metrics
    assert control_api.logs("lease.instance_conflict") == []


def test_a_one_shot_run_reports_the_identity_conflict_and_stays_standby(control_api, stack):
    fleet = Fleet(control_api, stack)
    fleet.start("leader", "mini-main", "primary").transition_to("leader")
    done = subprocess.run(
        [*ONE_SHOTS["diagnose"], *node_args(control_api, "mini-main", "primary", None)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    report = __import__("json").loads(done.stdout)
    daemon = report["snapshot"]["daemon"]
    assert (daemon["lease_state"], daemon["current_leader_id"]) == ("standby", "mini-main")
    assert "another instance" in daemon["last_error"]


# -- 2. one node id, two processes ------------------------------------------------------------


def test_one_node_id_in_two_processes_never_has_two_leaders(control_api, stack, tmp_path):
    fleet = Fleet(control_api, stack)
    first = fleet.start("first", "mini-main", "primary", "--state-dir", str(tmp_path / "a"))
    first.transition_to("leader")
    # A copied config on a second machine: same node id, its own state dir.
    second = fleet.start("second", "mini-main", "primary", "--state-dir", str(tmp_path / "b"))
    started = second.wait_event("conductor.started")
    assert started["snapshot"]["daemon"]["lease_state"] == "standby"
    conflict = second.wait_event("lease.identity_conflict")
    assert (
        conflict["holder_instance_id"]
        == first.named("conductor.started")[0]["snapshot"]["runtime"]["instance_id"]
    )
    poller = fleet.poller()
    poller.wait_samples("second", int(3 * TTL / 0.01))
    controllers = requests.get(
        f"{control_api.url}/v1/controllers", headers=control_api.headers, timeout=5
    ).json()["data"]["controllers"]
    (row,) = [c for c in controllers if c["controller_id"] == "mini-main"]
    assert row["duplicate"] is True and len(row["instances"]) == 2
    conflicts = control_api.logs("lease.instance_conflict")
    assert 1 <= len(conflicts) <= 2  # at most once a minute per instance (acquire, release)
    assert left_leader(first) == [] and became_leader(second) == []
    # The holder stops and releases: now the other process may lead.
    first.send(signal.SIGTERM)
    assert first.wait_exit() == 0
    took = second.transition_to("leader", timeout=5)
    assert took["reason"] == "acquired"
    poller.stop()
    assert poller.overlaps() == []


def test_a_second_process_on_the_same_state_dir_exits_2_at_once(control_api, stack, tmp_path):
    fleet = Fleet(control_api, stack)
    state = ("--state-dir", str(tmp_path / "state"))
    fleet.start("first", "mini-main", "primary", *state).transition_to("leader")
    began = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "conductord",
            "start",
            *node_args(control_api, "mini-main", "primary", None, *state),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert time.monotonic() - began < 5
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "another conductord process" in lines[0], done.stderr
    assert control_api.token not in done.stderr


# -- 3. the Control API's clock steps ------------------------------------------------------------


def _faketime_env(offset_file: str) -> dict[str, str]:
    if not os.path.exists(LIBFAKETIME):
        message = f"libfaketime not found at {LIBFAKETIME}: apt-get install faketime"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: this is a failure, not a skip)")
        pytest.skip(message)
    with open(offset_file, "w") as handle:
        handle.write("+0\n")
    return {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": offset_file,
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # the wall clock steps, monotonic clocks do not
    }


def _step(offset_file: str, offset: str) -> None:
    with open(offset_file, "w") as handle:
        handle.write(offset + "\n")


@pytest.fixture
def stepped_api(tmp_path):
    offset_file = str(tmp_path / "faketime-offset")
    api = ControlApiProcess(
        str(tmp_path / "control.sqlite3"),
        token="test-clock-step-token",
        env=_faketime_env(offset_file),
    )
    with api.start():
        yield api, offset_file


def _wall_of(api: ControlApiProcess) -> float:
    return lease_of(api)["server_time"]


@pytest.mark.parametrize("sign", ["+", "-"])
def test_a_control_api_clock_step_never_shortens_or_lengthens_a_live_lease(
    stepped_api, stack, sign
):
    api, offset_file = stepped_api
    fleet = Fleet(api, stack)
    leader = fleet.start("leader", "mini-main", "primary")
    granted = leader.transition_to("leader")
    standby = fleet.start("standby", "mini-standby", "standby")
    standby.wait_event("conductor.started")
    poller = fleet.poller()
    before = _wall_of(api)
    _step(offset_file, f"{sign}60s")
    assert abs(abs(_wall_of(api) - before) - 60) < 5  # the server's wall clock stepped
    poller.wait_samples("standby", poller.count("standby") + int(2 * TTL / 0.01))
    assert left_leader(leader) == [] and became_leader(standby) == []
    # Not even the holder's own lease lapsed: still the same term (no re-acquire).
    assert lease_of(api)["lease"]["term"] == granted["term"]
    # Kill the leader and step once more at once, before any renewal is stamped on the new
    # clock: the standby takes over within one TTL (plus the renew interval and slack),
    # neither at once (+) nor a minute late (-).
    leader.send(signal.SIGKILL)
    killed_at = time.monotonic()
    _step(offset_file, f"{sign}120s")
    leader.wait_exit()
    took = standby.transition_to("leader", timeout=TTL + RENEW + SLACK + 3)
    assert TTL - RENEW - 0.1 < took["_seen_at"] - killed_at < TTL + RENEW + SLACK
    poller.stop()
    assert poller.overlaps() == []


def test_a_restarted_control_api_with_a_stepped_clock_keeps_the_lease_live(stepped_api, stack):
    api, offset_file = stepped_api
    fleet = Fleet(api, stack)
    leader = fleet.start("leader", "mini-main", "primary")
    leader.transition_to("leader")
    standby = fleet.start("standby", "mini-standby", "standby")
    standby.wait_event("conductor.started")
    poller = fleet.poller()
    # The server host restarts its Control API and NTP steps its clock an hour ahead; the
    # leader dies at the same moment, so nothing renews its lease any more.
    api.kill()
    killed_at = time.monotonic()
    leader.send(signal.SIGKILL)
    leader.wait_exit()
    _step(offset_file, "+3600s")
    api.restart()
    took = standby.transition_to("leader", timeout=TTL + RENEW + SLACK + 10)
    # The dead leader's lease stayed live on the server's monotonic clock: no grant before it
    # ran out (its last renewal was at most one renew interval before the kill).
    assert took["_seen_at"] - killed_at > TTL - RENEW - 0.1
    poller.stop()
    assert poller.overlaps() == []


# -- 4. sleep and the deadline timer, with an injected lease clock --------------------------------


class _Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _RulesClient:
    """The Control API's real rules behind a client interface, on a shared server clock."""

    def __init__(self, server_clock: _Clock) -> None:
        self.server_clock = server_clock
        self.row: LeaseRow | None = None

    def heartbeat(self, *args: Any, **kwargs: Any) -> None:
        return None

    def acquire_leader_lease(self, *, controller_id: str, host: str, ttl_sec: int, **kw: Any):
        decision = decide_acquire(
            self.row,
            controller_id=controller_id,
            host=host,
            ttl_sec=ttl_sec,
            preferred=False,
            metadata_json=None,
            now=self.server_clock(),
            instance_id=kw.get("instance_id"),
        )
        self.row = decision.row
        row = decision.row
        record = LeaseRecord(
            "global",
            row.holder_id,
            host,
            row.term,
            row.lease_expires_at,
            row.renewed_at,
            None,
            None,
            row.holder_instance_id,
        )
        return AcquireResult(
            row.holder_id,
            host,
            row.term,
            row.lease_expires_at,
            row.renewed_at,
            decision.is_leader,
            decision.operation,
            record,
            row.holder_instance_id,
            decision.conflict,
        )

    def release_leader_lease(self, **kwargs: Any) -> ReleaseResult:
        return ReleaseResult(False, True, None)

    def close(self) -> None:
        pass


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _log(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    debug = info = warning = error = _log


def _runtime(client: _RulesClient, lease_clock: _Clock, node_id: str = "mini-main") -> Runtime:
    config = Config(
        node_id=node_id,
        control_api_bases=("http://127.0.0.1:9",),
        lease_ttl_sec=int(TTL),
        lease_renew_interval_ms=int(RENEW * 1000),
        request_timeout_ms=1000,
    )
    return Runtime(config, client=client, log=_Log(), clock=lease_clock)


def test_the_node_judges_its_lease_on_a_clock_that_counts_sleep():
    if sys.platform.startswith("linux"):
        assert lease_clocks.CLOCK_NAME == "CLOCK_BOOTTIME"
    config = Config(node_id="n", control_api_bases=("http://127.0.0.1:9",))
    runtime = Runtime(config, client=_RulesClient(_Clock()), log=_Log())
    assert runtime.clock is lease_clocks.lease_clock


def test_a_leader_that_sleeps_past_its_lease_wakes_as_no_leader():
    server, lease_clock = _Clock(), _Clock()
    client = _RulesClient(server)
    sleeper = _runtime(client, lease_clock)
    sleeper.start(loops=False)
    assert sleeper.machine.state is LeaseState.LEADER
    assert sleeper.run_scheduler_pass(lambda ctx: None) == "scheduled"
    # System sleep for a minute: the lease clock (CLOCK_BOOTTIME) and the server's clock move
    # on, gevent's timers do not; meanwhile another node takes the expired lease.
    lease_clock.now += 60
    server.now += 60
    other = decide_acquire(
        client.row,
        controller_id="mini-standby",
        host="h",
        ttl_sec=2,
        preferred=False,
        metadata_json=None,
        now=server(),
    )
    assert other.is_leader
    # At wake, before any timer or loop has run: no scheduling, and the state says so.
    assert sleeper.run_scheduler_pass(lambda ctx: None) == "skipped_not_leader"
    assert sleeper.snapshot()["daemon"]["lease_state"] == "degraded"
    transitions = [f for e, f in sleeper.log.events if e == "lease.transition"]
    assert transitions[-1]["reason"] == "lease_deadline_passed"
    sleeper.stop()


def test_the_deadline_watcher_steps_down_even_when_its_timer_fires_early():
    lease_clock = _Clock()
    runtime = _runtime(_RulesClient(_Clock()), lease_clock)
    runtime.start(loops=False)
    valid_until = runtime.machine.valid_until
    assert runtime.machine.state is LeaseState.LEADER and valid_until is not None
    armed_for = valid_until - lease_clock.now  # real seconds until the first wake-up
    # When that wake-up comes, the clock reads a hair before the deadline (gevent arms its
    # timers from the loop's cached time, so they may fire early).
    lease_clock.now = valid_until - 1e-4
    gevent.sleep(armed_for + 0.2)
    assert runtime.machine.state is LeaseState.LEADER
    lease_clock.now = valid_until + 1e-4  # and then the deadline really passes
    deadline = time.monotonic() + DEADLINE_POLL_S + 0.5
    while runtime.machine.state is LeaseState.LEADER and time.monotonic() < deadline:
        gevent.sleep(0.01)  # nobody reads the snapshot here: only the watcher can step down
    assert runtime.machine.state is LeaseState.DEGRADED
    runtime.stop()
