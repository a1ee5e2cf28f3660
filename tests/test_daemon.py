"""`conductord start` as a real subprocess against a scripted Control API (SPEC §5–§8).

Intervals are a few hundred ms; every wait has a deadline and returns as soon as the
awaited log line appears.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import statistics
import subprocess
import sys
import time

import pytest

from tests.support.control_api import ControlApiProcess
from tests.support.daemon import DaemonProcess, FakeControlApi, clean_env
from tests.support.scripted_server import Reply, ScriptedServer

REQUIRED_FIELDS = ("timestamp", "level", "event", "node_id", "host", "role")


def node_args(server: ScriptedServer | str, **overrides: str) -> list[str]:
    settings = {
        "--node-id": "mini-main",
        "--host": "mini",
        "--control-api-base": server if isinstance(server, str) else server.url,
        "--heartbeat-interval-ms": "200",
        "--lease-renew-interval-ms": "200",
        "--lease-ttl-sec": "3",
        "--request-timeout-ms": "1000",
        "--shared-token": "t0ken-never-printed",
    }
    settings.update(overrides)
    return [part for pair in settings.items() for part in pair]


@pytest.fixture
def fake():
    with ScriptedServer() as server:
        yield FakeControlApi(server)


def assert_clean_stdout(daemon: DaemonProcess) -> None:
    assert daemon.non_json_lines == []
    assert daemon.events, "the daemon logged nothing"
    for event in daemon.events:
        for field in REQUIRED_FIELDS:
            assert field in event, (field, event)
        assert event["timestamp"].endswith("Z")
    assert "t0ken-never-printed" not in json.dumps(daemon.events)
    assert "t0ken-never-printed" not in daemon.stderr


def stop_and_check(daemon: DaemonProcess, budget: float = 2.0) -> int:
    began = time.monotonic()
    daemon.send(signal.SIGTERM)
    code = daemon.wait_exit(timeout=10)
    assert time.monotonic() - began < budget + 1.5  # request timeout + 1 s, plus start slack
    assert_clean_stdout(daemon)
    return code


def test_node_becomes_leader_logs_transition_with_snapshot_and_releases_on_sigterm(fake):
    with DaemonProcess(node_args(fake.server)) as daemon:
        started = daemon.wait_event("conductor.started")
        assert started["snapshot"]["daemon"]["lease_state"] == "leader"
        transition = daemon.transition_to("leader")
        assert transition["from_state"] == "standby"
        assert transition["reason"] == "acquired"
        assert transition["term"] == 1
        assert transition["leader_id"] == "mini-main"
        snapshot = transition["snapshot"]
        assert snapshot["identity"] == "mini-main@mini(primary)"
        assert snapshot["daemon"]["scheduler_enabled"] is True
        assert snapshot["control_api"]["has_shared_token"] is True

        # the request carried the wire contract
        acquire = next(r for r in fake.server.requests if r.path == "/v1/leader/acquire")
        assert acquire.headers["authorization"] == "Bearer t0ken-never-printed"
        assert acquire.json["controller_id"] == "mini-main" and acquire.json["ttl_sec"] == 3
        assert "wait_ms" not in acquire.json  # the start sequence never long-polls

        assert stop_and_check(daemon) == 0
        names = [e["event"] for e in daemon.events]
        tail = names[names.index("conductor.stopping") :]
        assert tail == [
            "conductor.stopping",
            "lease.transition",
            "lease.released",
            "conductor.stopped",
        ]
        stopping = daemon.named("conductor.stopping")[0]
        assert stopping["snapshot"]["daemon"]["scheduler_enabled"] is False
        last = daemon.named("lease.transition")[-1]
        assert (last["to_state"], last["reason"]) == ("standby", "stopping")
        assert daemon.named("lease.released")[0]["released"] is True
    release = [r for r in fake.server.requests if r.path == "/v1/leader/release"]
    instance = daemon.named("conductor.started")[0]["snapshot"]["runtime"]["instance_id"]
    assert [r.json for r in release] == [
        {"controller_id": "mini-main", "term": 1, "instance_id": instance}
    ]
    assert fake.holder is None


def test_loops_run_at_their_intervals_and_a_healthy_node_is_quiet(fake):
    with DaemonProcess(node_args(fake.server, **{"--heartbeat-interval-ms": "150"})) as daemon:
        daemon.wait_event("conductor.started")
        assert fake.server.wait_for(lambda: fake.server.count("/v1/controllers/heartbeat") >= 9, 10)
        beats = [r.at for r in fake.server.requests if r.path == "/v1/controllers/heartbeat"]
        gaps = [b - a for a, b in itertools.pairwise(beats[1:])]
        assert 0.10 < statistics.median(gaps) < 0.30, gaps
        lines_before = len(daemon.events)
        fake.server.wait_for(lambda: False, 1.0)  # one second of steady state
        assert len(daemon.events) == lines_before  # nothing logged per heartbeat or renewal
        renewals = [r for r in fake.server.requests if r.path == "/v1/leader/acquire"]
        assert len(renewals) >= 5
        assert stop_and_check(daemon) == 0


def test_renew_failures_degrade_at_threshold_and_recover(fake):
    args = node_args(fake.server, **{"--renew-failure-threshold": "3"})
    with DaemonProcess(args) as daemon:
        daemon.transition_to("leader")
        fake.mode = "fail"
        degraded = daemon.transition_to("degraded")
        assert degraded["reason"] == "renew_failure_threshold"
        assert degraded["snapshot"]["daemon"]["consecutive_renew_failures"] == 3
        assert degraded["snapshot"]["daemon"]["scheduler_enabled"] is False
        assert "Control API 500 /v1/leader/acquire: boom: scripted" in degraded["last_error"]
        # the first failure is logged, the repeats are not (no log flood)
        assert len(daemon.named("lease.renew_failed")) == 1
        fake.mode = "garbage"
        count = len(daemon.events)
        fake.server.wait_for(lambda: False, 0.6)
        fake.mode = "grant"
        recovered = daemon.transition_to("leader", after=count)
        assert recovered["from_state"] == "degraded"
        assert daemon.named("lease.renew_recovered")
        assert stop_and_check(daemon) == 0


def test_leader_steps_down_on_time_while_renewals_hang_and_heartbeats_go_on(fake):
    # Threshold far away and a request timeout of 1.5 s: only the time-based rule can act.
    args = node_args(
        fake.server,
        **{
            "--lease-ttl-sec": "2",
            "--renew-failure-threshold": "100",
            "--request-timeout-ms": "1500",
        },
    )
    with DaemonProcess(args) as daemon:
        daemon.transition_to("leader")
        fake.mode = "hang"
        hung_at = time.monotonic()
        last_grant = max(
            r.at for r in fake.server.requests if r.path == "/v1/leader/acquire" and r.at < hung_at
        )
        beats_before = fake.server.count("/v1/controllers/heartbeat")
        stepped = daemon.wait_event(
            "lease.transition", lambda e: e["to_state"] == "degraded", timeout=5
        )
        assert stepped["reason"] == "lease_deadline_passed"
        # before the server could have given the lease to anyone else (TTL after the last grant)
        assert stepped["_seen_at"] < last_grant + 2.0
        assert stepped["snapshot"]["daemon"]["scheduler_enabled"] is False
        # the hanging lease call did not hold up heartbeats
        assert fake.server.wait_for(
            lambda: fake.server.count("/v1/controllers/heartbeat") >= beats_before + 4, 5
        )
        fake.mode = "grant"
        fake.server.release_hangs()
        daemon.transition_to("leader", after=daemon.events.index(stepped))
        assert stop_and_check(daemon) == 0


def test_other_holder_makes_standby_and_ends_leadership_at_once(fake):
    with DaemonProcess(node_args(fake.server)) as daemon:
        daemon.transition_to("leader")
        fake.mode = "other"
        change = daemon.transition_to("standby")
        assert change["reason"] == "held_by_other"
        assert change["leader_id"] == "other-node"
        assert change["snapshot"]["daemon"]["scheduler_enabled"] is False
        wait_requests = [r.json for r in fake.server.requests if r.path == "/v1/leader/acquire"][
            -1:
        ]
        fake.server.wait_for(lambda: False, 0.5)
        standby_requests = [r.json for r in fake.server.requests if r.path == "/v1/leader/acquire"][
            len(wait_requests) :
        ]
        # a standby long-polls with wait_ms = the renew interval (SPEC §12)
        assert any(body.get("wait_ms") == 200 for body in standby_requests)
        assert stop_and_check(daemon) == 0
    # a standby holds nothing, so it releases nothing
    assert fake.server.count("/v1/leader/release") == 0


def test_heartbeat_failures_are_logged_once_and_on_recovery_without_changing_state(fake):
    with DaemonProcess(node_args(fake.server)) as daemon:
        daemon.transition_to("leader")
        fake.heartbeat_mode = "fail"
        daemon.wait_event("heartbeat.failed")
        count = fake.server.count("/v1/controllers/heartbeat")
        fake.server.wait_for(lambda: fake.server.count("/v1/controllers/heartbeat") >= count + 3, 5)
        fake.heartbeat_mode = "ok"
        recovered = daemon.wait_event("heartbeat.recovered")
        assert recovered["failed_attempts"] >= 3
        assert len(daemon.named("heartbeat.failed")) == 1
        assert len(daemon.named("lease.transition")) == 1  # only standby -> leader
        assert stop_and_check(daemon) == 0


def test_control_api_unreachable_at_start_degrades_and_keeps_running():
    with ScriptedServer() as placeholder:
        url = placeholder.url
    # nothing listens on `url` now: connection refused
    with DaemonProcess(node_args(url)) as daemon:
        degraded = daemon.transition_to("degraded")
        assert degraded["reason"] == "register_failed"
        assert "connection failed" in degraded["last_error"]
        started = daemon.wait_event("conductor.started")
        assert started["snapshot"]["loops"] == {"heartbeat": True, "lease": True}
        assert stop_and_check(daemon) == 0


def test_control_api_failing_at_start_then_coming_up_recovers(fake):
    fake.mode = fake.heartbeat_mode = "fail"
    args = node_args(fake.server, **{"--renew-failure-threshold": "1"})
    with DaemonProcess(args) as daemon:
        assert daemon.transition_to("degraded")["reason"] == "register_failed"
        daemon.wait_event("conductor.started")
        fake.mode = fake.heartbeat_mode = "grant"
        recovered = daemon.transition_to("leader")
        assert recovered["from_state"] == "degraded"
        daemon.wait_event("heartbeat.recovered")
        assert stop_and_check(daemon) == 0


def test_second_signal_exits_at_once(fake):
    args = node_args(fake.server, **{"--request-timeout-ms": "2500"})
    fake.server.handler("/v1/leader/release", lambda rec: Reply(hang=True))
    with DaemonProcess(args) as daemon:
        daemon.transition_to("leader")
        daemon.send(signal.SIGTERM)
        daemon.wait_event("conductor.stopping")
        assert fake.server.wait_for(lambda: fake.server.count("/v1/leader/release") == 1, 5)
        began = time.monotonic()
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit(timeout=5)
        assert time.monotonic() - began < 1.0
        assert code == 1
        assert daemon.named("conductor.aborted")
        assert not daemon.named("conductor.stopped")


def test_release_that_hangs_is_bounded_by_the_stop_budget(fake):
    fake.server.handler("/v1/leader/release", lambda rec: Reply(hang=True))
    with DaemonProcess(node_args(fake.server)) as daemon:
        daemon.transition_to("leader")
        began = time.monotonic()
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit(timeout=10)
        elapsed = time.monotonic() - began
        assert code == 0
        assert elapsed < 1.0 + 1.0 + 0.8  # request timeout + 1 s, plus process exit slack
        released = daemon.named("lease.released")[0]
        assert released["released"] is False and "timed out" in released["error"]
        assert daemon.named("conductor.stopped")


@pytest.mark.parametrize("mode,expected", [("grant", 0), ("fail", 3)])
def test_run_once_prints_the_snapshot_and_exits_by_lease_state(fake, mode, expected):
    fake.mode = mode
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "conductord",
            "start",
            "--run-once",
            "--renew-failure-threshold",
            "1",
            *node_args(fake.server),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert result.returncode == expected, result.stderr
    document = json.loads(result.stdout)  # stdout is the document alone
    state = "leader" if mode == "grant" else "degraded"
    assert document["daemon"]["lease_state"] == state
    assert document["runtime"]["started"] is True
    assert document["loops"] == {"heartbeat": False, "lease": False}
    assert document["startup_checklist"][0]["key"] == "register-controller"
    # logs went to stderr, as JSON lines
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines[-1]["event"] == "conductor.stopped"
    assert "t0ken-never-printed" not in result.stdout + result.stderr
    released = fake.server.count("/v1/leader/release")
    assert released == (1 if mode == "grant" else 0)


ONE_SHOTS = {
    "diagnose": [sys.executable, "-m", "conductord", "diagnose", "--json"],
    "run_once.py": [sys.executable, "scripts/run_once.py", "--json"],
    "start --run-once": [sys.executable, "-m", "conductord", "start", "--run-once"],
}


def test_one_shot_runs_release_only_a_term_the_server_said_it_granted(fake):
    # A seed-like server: it ignores instance_id and names no operation. Beside the running
    # leader, a one-shot run with the leader's settings is answered with the leader's own
    # lease; §4's default reads that as "acquire", which proves no grant (SPEC §15).
    fake.omit_operation = True
    with DaemonProcess(node_args(fake.server)) as leader:
        granted = leader.transition_to("leader")
        for name, command in ONE_SHOTS.items():
            done = subprocess.run(
                [*command, *node_args(fake.server)],
                capture_output=True,
                text=True,
                env=clean_env(),
                timeout=30,
            )
            assert done.returncode == 0, (name, done.stderr)
            skipped = [
                json.loads(line)
                for line in done.stderr.splitlines()
                if '"lease.release_skipped"' in line
            ]
            if name == "start --run-once":  # its log lines are on stderr
                assert [e["reason"] for e in skipped] == ["not_granted_to_this_run"]
        assert fake.server.count("/v1/leader/release") == 0, "a one-shot run ended the lease"
        assert fake.holder == "mini-main" and fake.term == granted["term"]
        fake.server.wait_for(lambda: False, 0.5)  # a few renewals more: still the leader
        assert [e["to_state"] for e in leader.named("lease.transition")] == ["leader"]
        assert stop_and_check(leader) == 0  # the daemon itself still releases its own lease
    assert fake.server.count("/v1/leader/release") == 1 and fake.holder is None

    # The cost: without the server's word, a one-shot run leaves even its own fresh grant to
    # expire. With it (the reference server), the run releases what it took.
    once = [sys.executable, "-m", "conductord", "start", "--run-once", *node_args(fake.server)]
    done = subprocess.run(once, capture_output=True, text=True, env=clean_env(), timeout=30)
    assert done.returncode == 0, done.stderr
    assert fake.server.count("/v1/leader/release") == 1 and fake.holder == "mini-main"
    fake.omit_operation = False
    fake.holder = None
    done = subprocess.run(once, capture_output=True, text=True, env=clean_env(), timeout=30)
    assert done.returncode == 0, done.stderr
    assert fake.server.count("/v1/leader/release") == 2 and fake.holder is None


def test_diagnostics_script_reports_each_step(fake):
    result = subprocess.run(
        [sys.executable, "scripts/run_once.py", "--json", *node_args(fake.server)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["key"] for s in report["steps"]] == [
        "register-controller",
        "acquire-lease",
        "load-runs",
        "reconcile-runs",
        "start-heartbeat-loop",
        "start-scheduler",
    ]
    assert report["steps"][0]["outcome"] == "ok"
    assert report["verdict"] == "healthy: leader of term 1"
    human = subprocess.run(
        [sys.executable, "scripts/run_once.py", *node_args(fake.server)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert human.returncode == 0
    assert "1. register-controller" in human.stdout
    assert "verdict: healthy: leader of term" in human.stdout


def test_a_full_waiter_list_never_degrades_a_standby(fake):
    fake.mode = "other"
    answer = fake._acquire

    def no_room_to_park(rec):
        if rec.json.get("wait_ms"):
            return Reply(
                status=429,
                body={
                    "ok": False,
                    "request_id": "r",
                    "error": "too_many_waiters",
                    "message": "too many parked requests",
                },
            )
        return answer(rec)

    fake.server.handler("/v1/leader/acquire", no_room_to_park)
    with DaemonProcess(node_args(fake.server, **{"--renew-failure-threshold": "1"})) as daemon:
        daemon.wait_event("conductor.started")
        refused = lambda: sum(  # noqa: E731
            1 for r in fake.server.requests if r.json and r.json.get("wait_ms")
        )
        assert fake.server.wait_for(lambda: refused() >= 3, 10)
        assert not daemon.named("lease.renew_failed")
        assert not daemon.named("lease.transition")  # standby throughout
        assert stop_and_check(daemon) == 0


def test_a_leader_that_stepped_down_retries_at_its_pace_not_in_a_spin(fake):
    with DaemonProcess(node_args(fake.server, **{"--renew-failure-threshold": "1"})) as daemon:
        daemon.transition_to("leader")
        fake.mode = "fail"
        daemon.transition_to("degraded")
        before = fake.server.count("/v1/leader/acquire")
        fake.server.wait_for(lambda: False, 1.0)
        attempts = fake.server.count("/v1/leader/acquire") - before
        assert 2 <= attempts <= 10, attempts  # renew interval 200 ms: about 5 a second
        assert stop_and_check(daemon) == 0


def test_a_standby_parks_on_the_server_right_after_starting(fake):
    fake.mode = "other"
    args = node_args(fake.server, **{"--lease-renew-interval-ms": "3000", "--lease-ttl-sec": "10"})
    with DaemonProcess(args) as daemon:
        daemon.wait_event("conductor.started")
        assert fake.server.wait_for(lambda: fake.server.count("/v1/leader/acquire") >= 2, 5)
        first, second = [r for r in fake.server.requests if r.path == "/v1/leader/acquire"][:2]
        assert "wait_ms" not in first.json  # the start sequence's acquire never waits
        assert second.json["wait_ms"] == 3000
        assert second.at - first.at < 1.5  # not one renew interval (3 s) later
        assert stop_and_check(daemon) == 0


def test_a_failed_first_acquire_waits_an_interval_before_retrying(fake):
    # One refused acquire at start must not be followed by an instant retry that reaches the
    # failure threshold within milliseconds (a routine Control API restart is not an outage).
    fake.server.script(
        "/v1/leader/acquire",
        Reply(
            status=503, body={"ok": False, "request_id": "r", "error": "busy", "message": "restart"}
        ),
    )
    with DaemonProcess(node_args(fake.server, **{"--lease-renew-interval-ms": "400"})) as daemon:
        daemon.wait_event("conductor.started")
        assert fake.server.wait_for(lambda: fake.server.count("/v1/leader/acquire") >= 2, 5)
        first, second = [r for r in fake.server.requests if r.path == "/v1/leader/acquire"][:2]
        assert second.at - first.at >= 0.3  # the renew interval (400 ms) less its jitter
        daemon.transition_to("leader")
        assert not [e for e in daemon.named("lease.transition") if e["to_state"] == "degraded"]
        assert stop_and_check(daemon) == 0


# -- several Control API URLs (SPEC §17) ---------------------------------------------------------


def test_diagnose_checks_every_url_and_keeps_the_lease_verdict(control_api, tmp_path):
    # Two real Control API processes, each over its own SQLite file, plus a URL nobody serves.
    other = ControlApiProcess(str(tmp_path / "other.sqlite3"), token=control_api.token)
    with other.start(), socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{unused.getsockname()[1]}"
        urls = ",".join([control_api.url, other.url, nobody])
        args = [
            *node_args(control_api.url, **{"--shared-token": control_api.token}),
            *("--control-api-base", urls),
        ]
        command = [sys.executable, "-m", "conductord", "diagnose"]
        done = subprocess.run(
            [*command, "--json", *args], capture_output=True, text=True, env=clean_env(), timeout=30
        )
        human = subprocess.run(
            [*command, *args], capture_output=True, text=True, env=clean_env(), timeout=30
        )
    assert done.returncode == 0, done.stderr  # the lease state's verdict: the checks inform
    report = json.loads(done.stdout)
    assert report["verdict"].startswith("healthy: leader of term")
    section = report["control_api"]
    assert section["base_urls"] == [control_api.url, other.url, nobody]
    by_url = {check["base_url"]: check for check in section["endpoints"]}
    assert by_url[control_api.url]["in_use"] and by_url[control_api.url]["store"] == "sqlite"
    # The start sequence's acquire went to the first URL only; the second store never saw it.
    assert by_url[control_api.url]["term"] >= 1 and by_url[other.url]["term"] is None
    assert by_url[nobody]["error"] == "Control API /healthz: connection failed: Connection refused"
    assert section["shared_store"] is False
    sqlite_warnings = [w for w in report["warnings"] if "answers from a SQLite store" in w]
    assert len(sqlite_warnings) == 2, report["warnings"]
    assert any("1 of 3 Control API URLs failed" in note for note in report["notes"])
    assert human.returncode == 0, human.stderr
    assert "control API URLs:" in human.stdout
    assert f"  1. {control_api.url} (in use)" in human.stdout
    assert "     error: Control API /healthz: connection failed: Connection refused" in human.stdout
    assert "  one shared store: NO (SQLite behind" in human.stdout
    for output in (done.stdout, done.stderr, human.stdout, human.stderr):
        assert control_api.token not in output


def healthz_of(store: str) -> Reply:
    return Reply(body={"ok": True, "request_id": "r", "data": {"status": "ok", "store": store}})


@pytest.mark.parametrize("store,warned", [("sqlite", True), ("postgresql", False)])
def test_a_daemon_given_several_urls_looks_once_for_a_sqlite_store(fake, store, warned):
    second = ScriptedServer().start()
    second.default("/healthz", healthz_of(store))
    fake.server.default("/healthz", healthz_of(store))
    try:
        urls = f"{fake.server.url},{second.url}"
        with DaemonProcess(node_args(fake.server, **{"--control-api-base": urls})) as daemon:
            daemon.wait_event("conductor.started")
            daemon.transition_to("leader")
            assert fake.server.wait_for(lambda: second.count("/healthz") == 1, 5)
            if warned:
                found = daemon.wait_event(
                    "config.warning", lambda e: "SQLite" in e["message"], timeout=5
                )
                assert found["message"].startswith(f"Control API {fake.server.url} answers from")
            else:
                fake.server.wait_for(lambda: False, 0.5)
            assert stop_and_check(daemon) == 0
            stopping = daemon.named("conductor.stopping")[0]["snapshot"]["warnings"]
            sqlite = [e for e in daemon.named("config.warning") if "SQLite" in e["message"]]
            assert len(sqlite) == (2 if warned else 0)  # one per URL, once
            assert len([w for w in stopping if "SQLite" in w]) == len(sqlite)  # and in /v1/status
        assert fake.server.count("/healthz") == second.count("/healthz") == 1
    finally:
        second.stop()


def test_a_daemon_with_one_url_asks_nothing_more(fake):
    with DaemonProcess(node_args(fake.server)) as daemon:
        daemon.transition_to("leader")
        fake.server.wait_for(lambda: False, 0.5)
        assert stop_and_check(daemon) == 0
    assert fake.server.count("/healthz") == 0
