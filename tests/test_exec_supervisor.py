"""The daemon side of `--exec` (conductord/exec.py) in a real, monkey-patched gevent process.

Each test starts a stand-in daemon: a small script that builds an `ExecSupervisor`, prints
every log event as a JSON line on stdout, and obeys commands on stdin (`renew` calls `lead`
every interval the way the runtime does after each renewal; `lose`, `stop`, `snapshot`). The
test plays the runtime and can `kill -9` or SIGSTOP the stand-in like a real daemon. The
commands are the flock-taking children of tests/test_exec_guard.py. gevent never runs inside
the pytest process itself (its SIGCHLD handling would reap other tests' children).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conductord.clock import lease_clock
from conductord.exec import Backoff, child_environment
from tests.test_exec_guard import LINUX, alive, make_child, wait_gone

STAND_IN = r'''
from gevent import monkey

monkey.patch_all()

import json
import sys

import gevent
from gevent.fileobject import FileObjectPosix

from conductord.clock import lease_clock
from conductord.exec import Backoff, ExecSupervisor


class Log:
    def _emit(self, level, event, **fields):
        fields.pop("exc_info", None)
        line = {"event": event, "level": level, "at": lease_clock(), **fields}
        sys.stdout.write(json.dumps(line, default=str) + "\n")
        sys.stdout.flush()

    def debug(self, event, **fields):
        self._emit("debug", event, **fields)

    def info(self, event, **fields):
        self._emit("info", event, **fields)

    def warning(self, event, **fields):
        self._emit("warning", event, **fields)

    def error(self, event, **fields):
        self._emit("error", event, **fields)


log = Log()
cfg = json.loads(sys.argv[1])

# Faults the tests inject into this stand-in (never into the pytest process):
if cfg.get("slow_spawn"):
    # gevent's Popen yields to the hub while it waits for the guard's exec; stretch that
    # window, with the guard process already running, so a test can act inside it.
    import gevent.subprocess

    real_popen = gevent.subprocess.Popen

    def slow_popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        log.info("test.spawning", guard_pid=proc.pid)
        gevent.sleep(cfg["slow_spawn"])
        return proc

    gevent.subprocess.Popen = slow_popen
if cfg.get("drop_status"):
    # Status lines the daemon never gets to read (the guard stalled or died before writing).
    real_on_status = ExecSupervisor._on_status

    def on_status(self, guard, words):
        if not (words and words[0] in cfg["drop_status"]):
            real_on_status(self, guard, words)

    ExecSupervisor._on_status = on_status
if cfg.get("sticky_groups"):
    # A group member that survives SIGKILL (uninterruptible sleep: a hung NFS or FUSE read):
    # the daemon's check never sees the group gone.
    import conductord.exec

    conductord.exec.group_alive = lambda pgid: True

sup = ExecSupervisor(
    cfg["argv"],
    node_id="node-a",
    host="mini",
    log=log,
    token=cfg.get("token"),
    every_ms=cfg.get("every_ms"),
    stop_grace_ms=cfg.get("stop_grace_ms", 500),
    backoff=Backoff(*cfg["backoff"]) if cfg.get("backoff") else None,
    on_crash=lambda exc: log.error("test.crash", error=repr(exc)),
)
renewer = None


def renew(term, interval, ttl, margin):
    while True:
        sent = lease_clock()
        sup.lead(term, sent + ttl - margin, sent + ttl)
        log.info("test.renewed", term=term, valid_until=sent + ttl - margin, lease_end=sent + ttl)
        gevent.sleep(interval)


def halt():
    global renewer
    if renewer is not None:
        renewer.kill()
        renewer = None


for raw in FileObjectPosix(0, "rb", close=False):
    words = raw.decode().split()
    verb, args = words[0], words[1:]
    if verb == "renew":
        halt()
        renewer = gevent.spawn(renew, int(args[0]), *map(float, args[1:]))
    elif verb == "halt":
        halt()
        log.info("test.halted")
    elif verb == "lose":
        halt()
        sup.lose(args[0])
        log.info("test.lost")
    elif verb == "stop":
        halt()
        began = lease_clock()
        gone = sup.stop(None if args[0] == "default" else float(args[0]))
        log.info("test.stopped", gone=gone, seconds=lease_clock() - began)
    elif verb == "snapshot":
        log.info(
            "test.snapshot",
            snapshot=sup.snapshot(),
            running=sup.running,
            starts_total=sup.starts_total,
            exits_total=dict(sup.exits_total),
        )
'''

Event = dict[str, Any]


class StandIn:
    """The stand-in daemon as a subprocess; its JSON events are collected on a thread."""

    def __init__(self, script: Path, cfg: dict[str, Any], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.events: list[Event] = []
        self.non_json: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            with self._cond:
                if event is None:
                    self.non_json.append(raw.decode(errors="replace"))
                else:
                    self.events.append(event)
                self._cond.notify_all()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def named(self, name: str, **match: Any) -> list[Event]:
        with self._cond:
            return [
                e
                for e in self.events
                if e["event"] == name and all(e.get(k) == v for k, v in match.items())
            ]

    def wait_for(
        self,
        name: str,
        timeout: float = 10.0,
        count: int = 1,
        where: Callable[[Event], bool] = lambda e: True,
    ) -> list[Event]:
        """The first `count` events called `name` that satisfy `where`, once they exist."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e["event"] == name and where(e)]
                if len(found) >= count:
                    return found[:count]
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{count} x {name} not seen within {timeout} s; saw "
                        f"{[e['event'] for e in self.events][-30:]}"
                    )
                self._cond.wait(left)

    def started(self, timeout: float = 10.0) -> Event:
        """The next `exec.started` and the command's `ready` output line."""
        seen = len(self.named("exec.started"))
        event = self.wait_for("exec.started", timeout, count=seen + 1)[-1]
        ready = f"ready {event['pid']}"
        self.wait_for("exec.output", timeout, where=lambda e: e["line"] == ready)
        return event

    def stop(self, timeout: float = 5.0) -> Event:
        self.send(f"stop {timeout}")
        return self.wait_for("test.stopped", timeout + 5)[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            try:
                self.send(f"stop {3.0}")
                self.wait_for("test.stopped", 8)
            except (AssertionError, OSError):
                pass
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


@pytest.fixture
def child(tmp_path: Path):
    return make_child(tmp_path)


@pytest.fixture
def token() -> str:
    return f"tok-{secrets.token_hex(8)}"


@pytest.fixture
def stand_in(tmp_path: Path, token: str):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    started: list[StandIn] = []

    def start(argv: list[str], **cfg: Any) -> StandIn:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BAA_")}
        env.update(
            BAA_SHARED_TOKEN=token,
            BAA_SHARED_TOKEN_FILE="/etc/conductord/token",
            DATABASE_URL=f"postgresql://app:{token}@db/app",
            KEEP_ME="yes",
        )
        daemon = StandIn(script, {"argv": argv, "token": token, **cfg}, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def test_the_command_gets_its_term_and_never_the_token(stand_in, child, token) -> None:
    daemon = stand_in(child())
    daemon.send("renew 7 0.25 3 1")
    started = daemon.started()
    assert started["term"] == 7 and started["run"] == 1

    (record,) = child.records.of("start")
    assert started["pid"] == record["pid"], "exec.started must name the command, not the guard"
    assert record["pgid"] == record["pid"], "the command leads its own process group"
    assert record["ppid"] != record["pid"] and record["ppid"] != daemon.proc.pid  # the guard
    env = record["env"]
    assert env["CONDUCTORD_TERM"] == "7"
    assert env["CONDUCTORD_NODE_ID"] == "node-a" and env["CONDUCTORD_HOST"] == "mini"
    assert env["KEEP_ME"] == "yes"
    assert "BAA_SHARED_TOKEN" not in env and "BAA_SHARED_TOKEN_FILE" not in env
    assert "DATABASE_URL" not in env  # its value contains the token
    assert not [k for k, v in env.items() if token in v or token in k]
    if LINUX:  # nor does the guard carry it, in its arguments or its environment
        guard = record["ppid"]
        for name in ("environ", "cmdline"):
            assert token.encode() not in Path(f"/proc/{guard}/{name}").read_bytes()

    stopped = daemon.stop()
    assert stopped["gone"] is True
    assert not alive(record["pid"])
    (exited,) = daemon.named("exec.exited")
    assert exited["reason"] == "stopping" and exited["signal"] == "SIGTERM"
    assert token not in json.dumps(daemon.events)


def test_output_lines_become_exec_output_events(stand_in, child) -> None:
    long = "x" * 5000
    daemon = stand_in(child(say=["hello", long, "bye"], say_err=["oops"]))
    daemon.send("renew 2 0.25 3 1")
    started = daemon.started()
    # stdout and stderr are two pipes: their lines arrive in no fixed order between them.
    for last in ("bye", "oops"):
        daemon.wait_for("exec.output", where=lambda e, last=last: e["line"] == last)
    lines = {(e["stream"], e["line"][:10]): e for e in daemon.named("exec.output")}
    for key in (("stdout", "hello"), ("stdout", "x" * 10), ("stderr", "oops")):
        event = lines[key]
        assert event["pid"] == started["pid"] and event["term"] == 2
    cut = lines[("stdout", "x" * 10)]
    assert len(cut["line"]) == 4096 and cut["truncated"] is True
    assert daemon.non_json == [], "the daemon's stdout must stay JSON only"


def test_a_crash_looping_command_restarts_with_a_doubling_backoff(stand_in, child) -> None:
    daemon = stand_in(child(exit_after=0.0, code=3), backoff=[0.2, 0.8, 60])
    daemon.send("renew 4 0.25 3 1")
    starts = daemon.wait_for("exec.started", timeout=20, count=5)
    exits = daemon.wait_for("exec.exited", timeout=10, count=4)
    gaps = [starts[i + 1]["at"] - exits[i]["at"] for i in range(4)]
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8, 0.8], strict=True):
        assert expected - 0.05 <= gap <= expected + 0.5, gaps
    assert {e["reason"] for e in exits} == {"exited"} and {e["exit_code"] for e in exits} == {3}
    daemon.send("snapshot")
    snap = daemon.wait_for("test.snapshot")[0]
    assert snap["snapshot"]["last_exit_code"] == 3
    assert snap["starts_total"] >= 5 and snap["exits_total"]["exited"] >= 4
    assert child.records.of("overlap") == []


def test_backoff_doubles_to_thirty_seconds_and_resets_after_a_long_run() -> None:
    backoff = Backoff()
    assert [backoff.next_delay(0.1) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.next_delay(59.9) == 30
    assert backoff.next_delay(60.0) == 1
    assert backoff.next_delay(0.0) == 2


def test_periodic_runs_skip_a_due_run_while_one_is_still_going(stand_in, child) -> None:
    daemon = stand_in(child(exit_after=1.0), every_ms=400)
    daemon.send("renew 5 0.25 3 1")
    starts = daemon.wait_for("exec.started", timeout=15, count=2)
    skipped = daemon.named("exec.skipped")
    assert len(skipped) >= 1
    first = starts[0]
    assert skipped[0]["running_pid"] == first["pid"] and skipped[0]["run"] == first["run"]
    assert skipped[0]["term"] == 5
    (first_exit,) = daemon.named("exec.exited", pid=first["pid"])
    assert starts[1]["at"] >= first_exit["at"], "never two runs at once"
    assert starts[1]["at"] - first["at"] == pytest.approx(1.2, abs=0.35)  # the next due slot
    assert child.records.of("overlap") == []


def test_periodic_runs_keep_their_pace(stand_in, child) -> None:
    daemon = stand_in(child(exit_after=0.0), every_ms=300)
    daemon.send("renew 5 0.25 3 1")
    starts = daemon.wait_for("exec.started", timeout=15, count=6)
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(starts)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.3, abs=0.06), gaps
    assert daemon.named("exec.skipped") == []
    assert {e["reason"] for e in daemon.named("exec.exited")} == {"exited"}


def test_stop_returns_only_once_the_whole_group_is_gone(stand_in, child) -> None:
    daemon = stand_in(child(ignore_term=True, leftovers=True), stop_grace_ms=600)
    daemon.send("renew 3 0.25 3 1")
    started = daemon.started()
    (record,) = child.records.of("start")
    group = [started["pid"], *record["leftovers"]]
    stopped = daemon.stop(timeout=5)
    # The stand-in reports only after stop() returned: nothing of the group may be left.
    assert [pid for pid in group if alive(pid)] == []
    assert stopped["gone"] is True
    assert stopped["seconds"] >= 0.6 - 0.02  # everything ignored SIGTERM: SIGKILL after grace
    (exited,) = daemon.named("exec.exited")
    assert exited["signal"] == "SIGKILL" and exited["reason"] == "stopping"
    assert exited["at"] <= daemon.named("test.stopped")[0]["at"]


def test_leadership_lost_stops_the_command_at_once(stand_in, child) -> None:
    daemon = stand_in(child())
    daemon.send("renew 3 0.25 3 1")
    started = daemon.started()
    daemon.send("lose leadership_lost")
    lost = daemon.wait_for("test.lost")[0]
    exited = daemon.wait_for("exec.exited")[0]
    assert exited["pid"] == started["pid"] and exited["reason"] == "leadership_lost"
    assert exited["at"] - lost["at"] < 0.5
    daemon.send("snapshot")
    snap = daemon.wait_for("test.snapshot")[0]
    assert snap["running"] is False and snap["snapshot"]["pid"] is None
    assert snap["exits_total"] == {"exited": 0, "leadership_lost": 1, "stopping": 0, "deadline": 0}


def test_the_daemon_stops_the_command_at_its_own_step_down_deadline(stand_in, child) -> None:
    # No renewal after `halt`: the supervisor itself acts at valid_until, before the guard's
    # later deadline (lease_end - grace - 0.25 s) would.
    daemon = stand_in(child(), stop_grace_ms=500)
    daemon.send("renew 3 0.25 3 1.5")
    daemon.started()
    daemon.send("halt")
    daemon.wait_for("test.halted")
    last = daemon.named("test.renewed")[-1]
    exited = daemon.wait_for("exec.exited", timeout=10)[0]
    assert exited["reason"] == "deadline"
    assert last["valid_until"] <= exited["at"] < last["lease_end"] - 0.5 - 0.25
    (sigterm,) = child.records.of("sigterm")
    assert sigterm["at"] < last["lease_end"] - 0.5 - 0.25  # sent by the daemon, not the guard


def test_a_new_term_starts_only_after_the_old_group_is_gone(stand_in, child) -> None:
    daemon = stand_in(child(ignore_term=True), stop_grace_ms=500)
    daemon.send("renew 3 0.25 3 1")
    old = daemon.started()
    daemon.send("renew 4 0.25 3 1")
    new = daemon.started()
    (old_exit,) = daemon.named("exec.exited", pid=old["pid"])
    assert old_exit["reason"] == "leadership_lost" and old_exit["signal"] == "SIGKILL"
    assert new["term"] == 4 and new["at"] >= old_exit["at"]
    assert [r["term"] for r in child.records.of("start")] == ["3", "4"]
    assert child.records.of("overlap") == []


def test_kill_9_of_the_daemon_kills_the_command_long_before_the_deadline(stand_in, child):
    daemon = stand_in(child())
    daemon.send("renew 3 0.25 30 1")  # the guard's deadline is ~29 s away
    started = daemon.started()
    killed_at = lease_clock()
    daemon.proc.kill()
    assert wait_gone(started["pid"], 5)
    assert lease_clock() - killed_at < 1.5


def test_a_paused_daemon_loses_its_command_before_the_lease_ends(stand_in, child) -> None:
    grace = 0.5
    daemon = stand_in(child(ignore_term=True), stop_grace_ms=int(grace * 1000))
    daemon.send("renew 3 0.25 2 1")
    started = daemon.started()
    daemon.send("halt")
    daemon.wait_for("test.halted")
    daemon.proc.send_signal(signal.SIGSTOP)  # well before valid_until: the guard must act
    stopped_at = lease_clock()
    try:
        assert wait_gone(started["pid"], 10)
        gone_at = lease_clock()
        lease_end = daemon.named("test.renewed")[-1]["lease_end"]
        assert daemon.named("exec.exited") == [], "the daemon was paused and did nothing"
        (sigterm,) = child.records.of("sigterm")
        assert sigterm["at"] > stopped_at
        # The guard's schedule: SIGTERM at lease_end - grace - 0.25 s, SIGKILL 0.25 s before
        # lease_end; the measured end allows for this test's own wake-up lag.
        assert sigterm["at"] + grace <= lease_end - 0.2
        assert gone_at < lease_end + 0.25
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    exited = daemon.wait_for("exec.exited")[0]
    assert exited["pid"] == started["pid"] and exited["reason"] == "deadline"


def test_child_environment_filters_every_trace_of_the_token() -> None:
    base = {
        "PATH": "/bin",
        "BAA_SHARED_TOKEN": "s3cret",
        "BAA_SHARED_TOKEN_FILE": "/run/token",
        "AUTH": "Bearer s3cret",
        "CONDUCTORD_TERM": "1",
    }
    env = child_environment(base, term=9, node_id="n", host="h", token="s3cret")
    assert env == {
        "PATH": "/bin",
        "CONDUCTORD_TERM": "9",
        "CONDUCTORD_NODE_ID": "n",
        "CONDUCTORD_HOST": "h",
    }
    assert "BAA_SHARED_TOKEN_FILE" not in child_environment(
        base, term=1, node_id="n", host="h", token=None
    )
    # A cut or embedded piece of a longer token (8+ characters, what the logs redact) goes
    # too; a shorter overlap is no trace of it.
    token = "0123456789abcdef0123"
    pieces = {
        "CUT": "Bearer 0123456789ab",
        "INSIDE": "x-89abcdef01-y",
        "SHORT": "x0123456y",
        "PATH": "/bin",
    }
    env = child_environment(pieces, term=1, node_id="n", host="h", token=token)
    assert sorted(env) == ["CONDUCTORD_HOST", "CONDUCTORD_NODE_ID", "CONDUCTORD_TERM", "PATH",
                           "SHORT"]


def test_a_stuck_guard_is_overruled_by_the_daemon(stand_in, child) -> None:
    daemon = stand_in(child(), stop_grace_ms=300)
    daemon.send("renew 3 0.25 3 1")
    started = daemon.started()
    (record,) = child.records.of("start")
    guard = record["ppid"]
    os.kill(guard, signal.SIGSTOP)  # the guard can no longer act on `S`
    daemon.send("lose leadership_lost")
    lost = daemon.wait_for("test.lost")[0]
    daemon.wait_for("exec.guard_unresponsive", where=lambda e: e["guard_pid"] == guard)
    exited = daemon.wait_for("exec.exited")[0]
    assert exited["pid"] == started["pid"] and exited["signal"] == "SIGKILL"
    assert exited["reason"] == "leadership_lost"
    assert 0.3 + 0.5 - 0.05 <= exited["at"] - lost["at"] < 0.3 + 0.5 + 0.5
    assert not alive(started["pid"]) and not alive(guard)


def test_a_guard_killed_under_a_running_command_is_replaced(stand_in, child) -> None:
    daemon = stand_in(child(leftovers=True), backoff=[0.2, 0.8, 60])
    daemon.send("renew 3 0.25 3 1")
    first = daemon.started()
    (record,) = child.records.of("start")
    os.kill(record["ppid"], signal.SIGKILL)
    daemon.wait_for("exec.guard_died", where=lambda e: e["guard_pid"] == record["ppid"])
    exited = daemon.wait_for("exec.exited")[0]
    assert exited["pid"] == first["pid"] and exited["reason"] == "exited"
    # The daemon killed what the command left behind in its group.
    assert [pid for pid in [first["pid"], *record["leftovers"]] if alive(pid)] == []
    second = daemon.started()
    assert second["pid"] != first["pid"] and second["term"] == 3
    assert child.records.of("overlap") == []


def wait_records(child: Any, event: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The children's records of `event`, once there is one (polls the record file)."""
    end = time.monotonic() + timeout
    while not (found := child.records.of(event)):
        assert time.monotonic() < end, f"no {event!r} record within {timeout} s"
        time.sleep(0.02)
    return found


@pytest.mark.parametrize("verb", ["lose leadership_lost", "stop 5"])
def test_a_lose_or_a_stop_during_the_guard_spawn_still_stops_that_guard(
    stand_in, child, verb
) -> None:
    # gevent's Popen yields to the hub while it waits for the guard's exec. A lose() then
    # (the deadline watcher, another holder, an identity conflict) or a stop() must still
    # reach the guard being born, not leave it running until its own deadline (~29 s here).
    daemon = stand_in(child(), slow_spawn=0.5)
    daemon.send("renew 3 0.25 30 1")
    guard = daemon.wait_for("test.spawning")[0]["guard_pid"]
    daemon.send(verb)
    if verb.startswith("stop"):
        stopped = daemon.wait_for("test.stopped", timeout=10)[0]
        assert not alive(guard), "stop() returned while the guard it spawned still ran"
        assert stopped["gone"] is True
        reason = "stopping"
    else:
        daemon.wait_for("test.lost")
        assert wait_gone(guard, 3.0), "the guard spawned during lose() was never stopped"
        reason = "leadership_lost"
    assert [r["pid"] for r in child.records.of("start") if alive(r["pid"])] == []
    assert {e["reason"] for e in daemon.named("exec.exited")} <= {reason}


def test_a_group_not_confirmed_gone_blocks_new_runs_and_fails_the_stop(stand_in, child):
    # The guard is killed under its command; the group check never sees the group empty (the
    # stand-in's fault: a member stuck in uninterruptible sleep). Then no run may start beside
    # it, and stop() must say False (the runtime keeps the lease: exec_group_not_gone),
    # within its cap of stop grace + 1 s.
    daemon = stand_in(child(), sticky_groups=True, backoff=[0.2, 0.8, 60], stop_grace_ms=500)
    daemon.send("renew 3 0.25 3 1")
    started = daemon.started()
    (record,) = child.records.of("start")
    os.kill(record["ppid"], signal.SIGKILL)
    daemon.wait_for("exec.guard_died")
    time.sleep(1.0 + 0.2 + 0.3)  # the group wait, the backoff, a margin: a run would be up
    assert len(daemon.named("exec.started")) == 1, "a new run beside an unconfirmed group"
    [not_gone] = daemon.named("exec.group_not_gone")
    assert not_gone["pgid"] == started["pid"]
    daemon.send("stop default")
    stopped = daemon.wait_for("test.stopped")[0]
    assert stopped["gone"] is False
    assert stopped["seconds"] <= 0.5 + 1.0 + 0.3


def test_a_silent_guard_whose_run_never_reported_still_has_its_group_killed(stand_in, child):
    # The daemon never read `started` (the guard stalled right after forking) and the guard
    # is silent: the fallback kill must still find the run's group, leftovers included.
    daemon = stand_in(child(leftovers=True), drop_status=["started"], stop_grace_ms=300)
    daemon.send("renew 3 0.25 3 1")
    (record,) = wait_records(child, "start")
    group, guard = [record["pid"], *record["leftovers"]], record["ppid"]
    try:
        os.kill(guard, signal.SIGSTOP)
        daemon.send("lose leadership_lost")
        unresponsive = daemon.wait_for("exec.guard_unresponsive", timeout=5)[0]
        assert [pid for pid in group if not wait_gone(pid, 1.0)] == []
        assert wait_gone(guard, 1.0)
        assert unresponsive["pid"] is None and unresponsive["pgid"] == record["pid"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record["pid"], signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(guard, signal.SIGCONT)
