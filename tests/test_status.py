"""The local status endpoint, its metrics and `conductord status` (SPEC §8).

In-process tests run the real `StatusServer` (gevent.pywsgi on 127.0.0.1, port 0) over a small
fake runtime whose lease state comes from the real, pure `LeaseMachine` and a fake clock, so
every status code is reached deterministically. The HTTP client (requests, not monkey-patched
here) runs in gevent's thread pool so that the server's greenlets keep running while the test
waits for the answer.

The subprocess tests run `python -m conductord start --local-api ...` against a
`ScriptedServer` acting as the Control API, and `python -m conductord status` against it.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import pytest
import requests
from gevent.event import Event
from prometheus_client.parser import text_string_to_metric_families

from conductord import __version__
from conductord.config import Config
from conductord.lease import LeaseMachine, LeaseState, Transition
from conductord.status import (
    StatusServer,
    StatusServerError,
    make_app,
    progress_limits,
)
from tests.support.scripted_server import Recorded, Reply, ScriptedServer

NODE = "mini-main"
WALL = 1_700_000_000.0


# ---------------------------------------------------------------------------------------------
# Fakes and helpers


@dataclass(frozen=True)
class Answer:
    holder_id: str
    term: int
    lease_expires_at: float = WALL + 3
    is_leader: bool = True
    operation: str = "acquire"
    instance_conflict: bool = False


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **fields: Any) -> None:
        self.events.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._add("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]


class FakeClient:
    """The client's per-URL call counts (SPEC §17), as `/metrics` reads them."""

    def __init__(self) -> None:
        self.counts = {
            (url, outcome): 0
            for url in ("http://127.0.0.1:9", "http://127.0.0.2:9")
            for outcome in ("ok", "error", "moved")
        }

    def call_counts(self) -> dict[tuple[str, str], int]:
        return dict(self.counts)


class FakeRuntime:
    """What the status endpoint reads of `runtime.Runtime`, with a fake monotonic clock."""

    def __init__(self) -> None:
        self.config = Config(
            node_id=NODE,
            host="mini",
            control_api_bases=("http://127.0.0.1:9",),
            heartbeat_interval_ms=500,
            lease_renew_interval_ms=1000,
            request_timeout_ms=400,
            lease_ttl_sec=3,
        )
        self.now = 100.0
        self.machine = LeaseMachine(
            node_id=NODE, lease_ttl_sec=3, renew_failure_threshold=2, margin_s=1.0
        )
        self.loop_progress: dict[str, float | None] = {"heartbeat": None, "lease": None}
        self.transitions_total: Counter[tuple[str, str]] = Counter()
        self.renew_failures_total = 0
        self.heartbeat_failures_total = 0
        self.last_renew_at: float | None = None
        self.log = RecordingLog()
        self.stop_requested = Event()
        self.broken = False
        self.client = FakeClient()

    def clock(self) -> float:
        return self.now

    def snapshot(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("snapshot exploded")
        return {
            "identity": f"{NODE}@mini(primary)",
            "daemon": {"node_id": NODE, **self.machine.status(self.now)},
            "loops": {"heartbeat": True, "lease": True},
        }

    # -- driving the real machine the way runtime.py does --

    def _record(self, transition: Transition | None) -> None:
        if transition is not None:
            key = (str(transition.from_state), str(transition.to_state))
            self.transitions_total[key] += 1

    def loops_ran(self) -> None:
        self.loop_progress = {"heartbeat": self.now, "lease": self.now}

    def become_leader(self, term: int = 7) -> None:
        self.last_renew_at = WALL
        self._record(
            self.machine.lease_succeeded(Answer(NODE, term), sent_at=self.now, now=self.now)
        )
        self.machine.heartbeat_succeeded(wall_time=WALL)

    def fail_renewals(self, count: int) -> None:
        for _ in range(count):
            self.renew_failures_total += 1
            self._record(
                self.machine.lease_failed("Control API /v1/leader/acquire: timed out", now=self.now)
            )


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking client code in a real thread while this greenlet yields to the hub."""
    return gevent.get_hub().threadpool.apply(fn, args, kwargs)


def http(method: str, url: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", 10)
    return in_thread(requests.request, method, url, **kwargs)


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def server(runtime: FakeRuntime) -> Iterator[StatusServer]:
    srv = StatusServer(runtime, "http://127.0.0.1:0")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# Server lifecycle


def test_start_binds_port_zero_logs_listening_and_stop_closes(runtime: FakeRuntime) -> None:
    srv = StatusServer(runtime, "http://127.0.0.1:0")
    srv.start()
    srv.start()  # idempotent: no second bind, no second log line
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        assert srv.url == f"http://127.0.0.1:{port}" and port > 0
        assert runtime.log.named("status_api.listening") == [{"url": srv.url}]
        assert [level for level, name, _ in runtime.log.events] == ["info"]
        assert http("GET", srv.url + "/v1/status").status_code == 200
    finally:
        srv.stop()
        srv.stop()
    with pytest.raises(requests.ConnectionError):
        http("GET", srv.url + "/v1/status", timeout=2)
    # Requests are not logged at info.
    assert [name for level, name, _ in runtime.log.events if level == "info"] == [
        "status_api.listening"
    ]


def test_port_in_use_raises_one_line_error_naming_the_address(runtime: FakeRuntime) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = StatusServer(runtime, f"http://127.0.0.1:{port}")
        with pytest.raises(StatusServerError) as info:
            srv.start()
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "--local-api / BAA_CONDUCTOR_LOCAL_API" in message
    assert "in use" in message.lower()
    assert "\n" not in message
    assert runtime.log.named("status_api.listening") == []
    srv.stop()  # harmless after a failed start


def test_malformed_base_url_is_rejected(runtime: FakeRuntime) -> None:
    with pytest.raises(StatusServerError):
        StatusServer(runtime, "https://127.0.0.1:4317")
    with pytest.raises(StatusServerError):
        StatusServer(runtime, "http://127.0.0.1")


# ---------------------------------------------------------------------------------------------
# Routes


def test_v1_status_is_the_snapshot_as_compact_json(
    runtime: FakeRuntime, server: StatusServer
) -> None:
    runtime.become_leader()
    response = http("GET", server.url + "/v1/status")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == runtime.snapshot()
    assert response.json()["daemon"]["lease_state"] == "leader"
    assert b": " not in response.content and b", " not in response.content


def test_healthz_follows_loop_progress(runtime: FakeRuntime, server: StatusServer) -> None:
    url = server.url + "/healthz"

    # Loops not started yet.
    response = http("GET", url)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "unhealthy"
    assert "heartbeat loop is not running" in body["reason"]
    assert "lease loop is not running" in body["reason"]

    runtime.become_leader()
    runtime.loops_ran()
    runtime.now += 1.0
    response = http("GET", url)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["lease_state"] == "leader"
    assert body["loops"]["lease"] == {"seconds_since_progress": 1.0, "limit_seconds": 2.5}

    # The lease loop wedges while the heartbeat loop keeps going: 503 naming the lease loop.
    runtime.now += 2.0  # 3 s since the lease loop's last cycle, limit 2.5 s for a leader
    runtime.loop_progress["heartbeat"] = runtime.now
    response = http("GET", url)
    assert response.status_code == 503
    reason = response.json()["reason"]
    assert "lease loop has not finished a cycle for 3.0 s (limit 2.5 s)" in reason
    assert "heartbeat" not in reason

    # Progress resumes: healthy again.
    runtime.loops_ran()
    assert http("GET", url).status_code == 200


def test_healthz_allows_a_standby_its_long_poll(runtime: FakeRuntime, server: StatusServer) -> None:
    runtime.loops_ran()
    runtime.now += 3.0  # past a leader's 2.5 s, within a standby's 2.5 + wait_ms 1.0 s
    runtime.loop_progress["heartbeat"] = runtime.now
    assert http("GET", server.url + "/healthz").status_code == 200
    runtime.now += 0.6
    runtime.loop_progress["heartbeat"] = runtime.now
    response = http("GET", server.url + "/healthz")
    assert response.status_code == 503
    assert "limit 3.5 s" in response.json()["reason"]


def test_healthz_is_503_while_stopping(runtime: FakeRuntime, server: StatusServer) -> None:
    runtime.loops_ran()
    assert http("GET", server.url + "/healthz").status_code == 200
    runtime.stop_requested.set()
    response = http("GET", server.url + "/healthz")
    assert response.status_code == 503
    assert response.json()["reason"] == "the daemon is stopping"


def test_progress_limits() -> None:
    config = Config(
        node_id=NODE,
        control_api_bases=("http://127.0.0.1:9",),
        heartbeat_interval_ms=5000,
        lease_renew_interval_ms=2000,
        request_timeout_ms=3000,
    )
    # interval + 10 % jitter + request timeout + 1 s; a non-leader may long-poll wait_ms more.
    assert progress_limits(config, LeaseState.LEADER) == pytest.approx(
        {"heartbeat": 9.5, "lease": 6.2}
    )
    for state in (LeaseState.STANDBY, LeaseState.DEGRADED):
        assert progress_limits(config, state) == pytest.approx({"heartbeat": 9.5, "lease": 8.2})


def test_readyz_is_503_only_when_degraded(runtime: FakeRuntime, server: StatusServer) -> None:
    url = server.url + "/readyz"
    response = http("GET", url)
    assert (response.status_code, response.json()) == (
        200,
        {"status": "ready", "lease_state": "standby"},
    )
    runtime.become_leader()
    assert http("GET", url).json()["lease_state"] == "leader"
    assert http("GET", url).status_code == 200

    runtime.fail_renewals(2)
    response = http("GET", url)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "status": "degraded",
        "lease_state": "degraded",
        "last_error": "Control API /v1/leader/acquire: timed out",
    }


def test_unknown_path_404_and_wrong_method_405(server: StatusServer) -> None:
    response = http("GET", server.url + "/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "not_found"

    for method in ("POST", "PUT", "DELETE"):
        response = http(method, server.url + "/healthz", data=b"{}")
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
        assert response.json()["error"] == "method_not_allowed"

    response = http("HEAD", server.url + "/v1/status")
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) > 0


def test_a_failing_handler_answers_500_and_logs(runtime: FakeRuntime, server: StatusServer) -> None:
    runtime.broken = True
    response = http("GET", server.url + "/v1/status")
    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    [logged] = runtime.log.named("status_api.error")
    assert logged["path"] == "/v1/status"
    assert "snapshot exploded" in logged["error"]
    runtime.broken = False
    assert http("GET", server.url + "/v1/status").status_code == 200


def test_keep_alive_answers_are_not_delayed_by_nagle(server: StatusServer) -> None:
    # Without TCP_NODELAY, pywsgi's separate header and body sends make each keep-alive answer
    # wait for the client's delayed ACK (~40 ms on Linux).
    def timed() -> list[float]:
        with requests.Session() as session:
            session.get(server.url + "/readyz", timeout=10)
            durations = []
            for _ in range(15):
                began = time.perf_counter()
                session.get(server.url + "/readyz", timeout=10)
                durations.append(time.perf_counter() - began)
            return durations

    assert statistics.median(in_thread(timed)) < 0.025


# ---------------------------------------------------------------------------------------------
# Metrics


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of one scrape."""
    response = http("GET", url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("conductord_"), family.name
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_read_the_runtime_at_scrape_time(
    runtime: FakeRuntime, server: StatusServer
) -> None:
    first = scrape(server.url)
    assert first["conductord_build_info"] == {(("version", __version__),): 1.0}
    assert first["conductord_lease_state"] == {
        (("state", "leader"),): 0.0,
        (("state", "standby"),): 1.0,
        (("state", "degraded"),): 0.0,
    }
    assert first["conductord_is_leader"] == {(): 0.0}
    assert first["conductord_scheduler_enabled"] == {(): 0.0}
    assert first["conductord_lease_renew_failures_total"] == {(): 0.0}
    assert first["conductord_heartbeat_failures_total"] == {(): 0.0}
    assert "conductord_lease_term" not in first  # unknown until the first lease answer
    assert "conductord_last_heartbeat_timestamp_seconds" not in first
    assert "conductord_lease_transitions_total" not in first
    calls = first["conductord_control_api_calls_total"]
    assert len(calls) == 6 and set(calls.values()) == {0.0}

    runtime.client.counts[("http://127.0.0.2:9", "moved")] = 3
    runtime.become_leader(term=7)
    runtime.loops_ran()
    runtime.now += 0.5
    runtime.heartbeat_failures_total = 4
    second = scrape(server.url)
    assert second["conductord_lease_state"][(("state", "leader"),)] == 1.0
    assert second["conductord_lease_state"][(("state", "standby"),)] == 0.0
    assert second["conductord_lease_term"] == {(): 7.0}
    assert second["conductord_is_leader"] == {(): 1.0}
    assert second["conductord_scheduler_enabled"] == {(): 1.0}
    assert second["conductord_last_heartbeat_timestamp_seconds"] == {(): WALL}
    assert second["conductord_last_renew_timestamp_seconds"] == {(): WALL}
    assert second["conductord_lease_expires_timestamp_seconds"] == {(): WALL + 3}
    assert second["conductord_heartbeat_failures_total"] == {(): 4.0}
    assert second["conductord_loop_progress_age_seconds"] == {
        (("loop", "heartbeat"),): 0.5,
        (("loop", "lease"),): 0.5,
    }
    assert second["conductord_lease_transitions_total"] == {
        (("from_state", "standby"), ("to_state", "leader")): 1.0
    }
    moved = (("base_url", "http://127.0.0.2:9"), ("outcome", "moved"))
    assert second["conductord_control_api_calls_total"][moved] == 3.0

    runtime.fail_renewals(2)
    third = scrape(server.url)
    assert third["conductord_lease_state"][(("state", "degraded"),)] == 1.0
    assert third["conductord_is_leader"] == {(): 0.0}
    assert third["conductord_scheduler_enabled"] == {(): 0.0}
    assert third["conductord_lease_renew_failures_total"] == {(): 2.0}
    assert third["conductord_lease_transitions_total"] == {
        (("from_state", "standby"), ("to_state", "leader")): 1.0,
        (("from_state", "leader"), ("to_state", "degraded")): 1.0,
    }


class FakeExec:
    """The counters `ExecSupervisor` exposes (a real one never runs in this process)."""

    def __init__(self) -> None:
        self.running = False
        self.starts_total = 0
        self.exits_total: Counter[str] = Counter(
            dict.fromkeys(("exited", "leadership_lost", "stopping", "deadline"), 0)
        )


def test_exec_metrics_are_zero_without_exec_and_read_the_supervisor_with_it(
    runtime: FakeRuntime, server: StatusServer
) -> None:
    reasons = ("deadline", "exited", "leadership_lost", "stopping")
    without = scrape(server.url)
    assert without["conductord_exec_running"] == {(): 0.0}
    assert without["conductord_exec_starts_total"] == {(): 0.0}
    assert without["conductord_exec_exits_total"] == {(("reason", r),): 0.0 for r in reasons}

    sup = FakeExec()
    runtime.exec_supervisor = sup  # type: ignore[attr-defined]
    sup.running, sup.starts_total = True, 3
    sup.exits_total.update({"exited": 1, "leadership_lost": 1})
    running = scrape(server.url)
    assert running["conductord_exec_running"] == {(): 1.0}
    assert running["conductord_exec_starts_total"] == {(): 3.0}
    assert running["conductord_exec_exits_total"][(("reason", "exited"),)] == 1.0
    assert running["conductord_exec_exits_total"][(("reason", "leadership_lost"),)] == 1.0
    assert running["conductord_exec_exits_total"][(("reason", "deadline"),)] == 0.0


def test_metrics_offer_openmetrics_when_asked(server: StatusServer) -> None:
    response = http(
        "GET", server.url + "/metrics", headers={"accept": "application/openmetrics-text"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_each_app_has_its_own_registry() -> None:
    # Nothing global: two runtimes in one process report their own state.
    a, b = FakeRuntime(), FakeRuntime()
    b.become_leader(term=3)

    def metrics(app: Any) -> str:
        captured: list[str] = []
        body = app(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"},
            lambda status, headers: captured.append(status),
        )
        assert captured == ["200 OK"]
        return b"".join(body).decode()

    assert "conductord_is_leader 0.0" in metrics(make_app(a))
    assert "conductord_is_leader 1.0" in metrics(make_app(b))


# ---------------------------------------------------------------------------------------------
# The daemon as a subprocess


TOKEN = "status-test-token-0123"


def _envelope(data: Any) -> dict[str, Any]:
    return {"ok": True, "request_id": "scripted", "data": data}


class Daemon:
    """`python -m conductord start` with its JSON log lines collected by a reader thread."""

    def __init__(self, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BAA_")}
        env["BAA_SHARED_TOKEN"] = TOKEN
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "conductord", "start", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line)
                self.lines.append(json.loads(line))
                self._cond.notify_all()

    def wait_event(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line["event"] == event:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {event} in {self.lines}")
                self._cond.wait(min(remaining, 0.1))

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def daemon_args(control: ScriptedServer, local_api: str) -> list[str]:
    return [
        "--node-id",
        NODE,
        "--control-api-base",
        control.url,
        "--local-api",
        local_api,
        "--heartbeat-interval-ms",
        "200",
        "--lease-renew-interval-ms",
        "200",
        "--request-timeout-ms",
        "500",
        "--lease-ttl-sec",
        "3",
        "--renew-failure-threshold",
        "2",
    ]


def fake_control_api(control: ScriptedServer, *, lease_ok: bool = True) -> None:
    control.default("/v1/controllers/heartbeat", Reply(200, _envelope({})))
    if not lease_ok:
        control.default(
            "/v1/leader/acquire",
            Reply(503, {"ok": False, "request_id": "r", "error": "down", "message": "down"}),
        )
        return

    def acquire(recorded: Recorded) -> dict[str, Any]:
        return _envelope(
            {
                "holder_id": NODE,
                "term": 4,
                "lease_expires_at": int(time.time()) + 3,
                "is_leader": True,
                "operation": "renew",
            }
        )

    control.handler("/v1/leader/acquire", acquire)


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAA_")}
    return subprocess.run(
        [sys.executable, "-m", "conductord", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.fixture
def control() -> Iterator[ScriptedServer]:
    with ScriptedServer() as fake:
        yield fake


def test_daemon_serves_status_and_cli_reports_healthy_then_unreachable(
    control: ScriptedServer, free_port: int
) -> None:
    fake_control_api(control)
    local = f"http://127.0.0.1:{free_port}"
    daemon = Daemon(daemon_args(control, local))
    try:
        assert daemon.wait_event("status_api.listening")["url"] == local
        daemon.wait_event("conductor.started")
        result = status_cli("--local-api", local)
        assert (result.returncode, result.stderr) == (0, "")
        assert f"state=leader leader={NODE} term=4" in result.stdout
        assert requests.get(local + "/healthz", timeout=5).status_code == 200
        metrics = requests.get(local + "/metrics", timeout=5).text
        assert 'conductord_lease_transitions_total{from_state="standby",to_state="leader"}' in (
            metrics
        )
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr
    assert TOKEN not in "".join(daemon.raw) + stderr
    result = status_cli("--local-api", local)
    assert result.returncode == 1
    assert result.stderr.startswith(f"conductord: error: cannot reach {local}: ")


def test_daemon_degraded_gives_exit_3(control: ScriptedServer, free_port: int) -> None:
    fake_control_api(control, lease_ok=False)
    local = f"http://127.0.0.1:{free_port}"
    daemon = Daemon(daemon_args(control, local))
    try:
        daemon.wait_event("status_api.listening")
        daemon.wait_event("conductor.started")
        deadline = time.monotonic() + 15
        while True:
            result = status_cli("--local-api", local, "--json")
            if result.returncode == 3 or time.monotonic() > deadline:
                break
        assert result.returncode == 3, result
        assert json.loads(result.stdout)["daemon"]["lease_state"] == "degraded"
        assert requests.get(local + "/readyz", timeout=5).status_code == 503
    finally:
        daemon.stop()


def test_hanging_acquire_degrades_readyz_but_the_bounded_loop_stays_healthy(
    control: ScriptedServer, free_port: int
) -> None:
    # The client caps every call at its request timeout, so a Control API that hangs makes
    # each lease cycle fail, not wedge: /readyz turns 503 (degraded) while /healthz stays 200
    # because cycles keep finishing. A loop that truly stops finishing cycles is covered
    # in-process (test_healthz_follows_loop_progress), as nothing outside can cause one.
    fake_control_api(control)
    local = f"http://127.0.0.1:{free_port}"
    daemon = Daemon(daemon_args(control, local))
    try:
        daemon.wait_event("conductor.started")
        assert requests.get(local + "/readyz", timeout=5).status_code == 200
        control.default("/v1/leader/acquire", Reply(hang=True))
        control.handler("/v1/leader/acquire", lambda recorded: Reply(hang=True))
        daemon.wait_event("lease.renew_failed")
        deadline = time.monotonic() + 15
        while requests.get(local + "/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "never degraded"
            time.sleep(0.1)
        for _ in range(5):  # across several timed-out cycles
            health = requests.get(local + "/healthz", timeout=5)
            assert health.status_code == 200, health.text
            time.sleep(0.3)
        failures = requests.get(local + "/metrics", timeout=5).text
        assert "conductord_lease_renew_failures_total 0.0" not in failures
    finally:
        control.release_hangs()
        daemon.stop()


def test_daemon_exits_2_when_the_status_port_is_taken(control: ScriptedServer) -> None:
    fake_control_api(control)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        local = f"http://127.0.0.1:{taken.getsockname()[1]}"
        daemon = Daemon(daemon_args(control, local))
        code = daemon.proc.wait(timeout=20)
        _, stderr = daemon.stop()
    assert code == 2
    assert stderr == (
        f"conductord: error: cannot serve the status endpoint on {local}"
        " (--local-api / BAA_CONDUCTOR_LOCAL_API): Address already in use\n"
    )
    assert not any(line["event"] == "conductor.starting" for line in daemon.lines)
    assert control.count("/v1/controllers/heartbeat") == 0
