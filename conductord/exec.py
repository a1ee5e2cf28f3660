"""Leader-only work (SPEC §14): run the `--exec` command while, and only while, this node leads.

Interface for the runtime (every call from a greenlet of the daemon's hub; only `stop` blocks):

    sup = ExecSupervisor(config.exec_argv, node_id=config.node_id, host=config.host,
                         token=config.shared_token, every_ms=config.exec_every_ms,
                         stop_grace_ms=config.exec_stop_grace_ms, log=log,
                         on_crash=runtime.crash,
                         lock_path=identity.exec_lock_path(config.paths.state_dir))

    sup.lead(term, valid_until, lease_end)
        After every successful lease cycle that leaves this node leader with the scheduler
        enabled, from `conductor.started` on (the start sequence's own acquire waits for it).
        `valid_until` is the machine's local step-down deadline (send time + TTL − margin) and
        `lease_end` is send time + TTL (= `valid_until + machine.margin_s`), both
        `clock.lease_clock()` seconds: the runtime's clock must be `lease_clock`, the one the
        guard reads. Starts the command (a new guard) or moves the guard's kill deadline; a
        new term stops the old group before the new one starts. Ignored after `stop`; a
        `valid_until` already passed counts as `lose("deadline")`. A `lose` or `stop` while
        a guard is being spawned (Popen yields to the hub) stops that guard as soon as it
        exists.
    sup.lose(reason)
        On every transition out of leader, at once: "leadership_lost" (another holder, the
        failure threshold, an identity conflict), "deadline" (the local deadline passed, or a
        grant that arrived late), "stopping" (the daemon stops). Sends the stop to the guard
        and returns; the group gets SIGTERM now and SIGKILL after the stop grace.
    sup.stop(timeout=None) -> bool
        In `Runtime.stop`, after `lose("stopping")` (call that first thing, with
        `begin_stop`, so the SIGTERM goes out as the stop begins) and before the release:
        blocks until the group is gone (True), killing it with `killpg` if the guard stays
        silent. False when that cannot be confirmed in time (a spawn or a guard still under
        way, a group that survived SIGKILL): the runtime then keeps the lease unreleased.
        Default: returns at the latest `stop_timeout_s` (stop grace + 1 s) after
        `lose("stopping")`; an explicit timeout counts from the call. Idempotent; `lead` is
        ignored afterwards.
    sup.snapshot()                      the snapshot's `exec` section (`disabled_snapshot()`
                                        when `--exec` is not set)
    sup.running, sup.starts_total, sup.exits_total[reason]
                                        conductord_exec_running, conductord_exec_starts_total,
                                        conductord_exec_exits_total{reason} (all four reasons
                                        present from the start)

`start --run-once` and `diagnose` never construct one.

`lock_path` (the runtime passes `state_dir/exec.lock` when a state dir is set): the guard
holds an exclusive `flock` on it from before its first run until its whole group is gone, and
a guard starts no run before it holds it (`exec.waiting`, once, while it waits). A daemon
restarted right after `kill -9` with the same state dir keeps its instance id and renews the
same term at once; without the lock its new command could start while the old guard is still
in its SIGTERM grace. Without a state dir a restart is a new instance, which the server keeps
standby until the old lease has expired, after the old guard's SIGKILL.

Design: each leadership term gets one guard process (conductord/exec_guard.py, plain
`python -I -S`, no gevent) that owns the command and holds a kill deadline of
`lease_end − stop_grace − 250 ms`, so its SIGKILL lands before the server could grant the lease
to anyone else. `lead` moves that deadline forward over the guard's control pipe; when the
daemon dies (even `kill -9`) the pipe closes and the guard kills the group at once; when the
daemon is paused or wedged the deadline passes in the guard. The daemon stops the group
itself first, at its own step-down deadline (`valid_until`, checked here too, not only by the
runtime), with the guard as the backup. One guard per term also serves periodic runs and
restarts (`R` on the pipe), so a run costs no interpreter start-up.

The command's stdout and stderr are pipes read by one pump greenlet per guard and logged as
`exec.output`; a status line is handled only after the output pipes are drained, so every line
is attributed to the run that wrote it. docs/exec.md states the guarantee and its limits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import gevent
from gevent import select as gselect
from gevent import subprocess as gsubprocess
from gevent.event import Event

from conductord.clock import lease_clock
from conductord.exec_guard import group_alive, kill_group
from conductord.redact import holds_secret

GUARD_PATH: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exec_guard.py")
# The guard's SIGKILL lands this long before the lease could be granted elsewhere; the timing
# rule (stop grace + 250 ms <= step-down margin) keeps it after the daemon's own step-down.
GUARD_MARGIN_S: Final = 0.25
OUTPUT_LINE_MAX: Final = 4096
EXIT_REASONS: Final = ("exited", "leadership_lost", "stopping", "deadline")
LOSE_REASONS: Final = ("leadership_lost", "stopping", "deadline")
TOKEN_VARIABLES: Final = ("BAA_SHARED_TOKEN", "BAA_SHARED_TOKEN_FILE")
# How long past its grace a stopping guard may stay silent before the daemon kills the group.
FALLBACK_AFTER_S: Final = 0.5
# Timers may fire late after a system sleep: while leading, re-read the clock this often.
DRIVER_CAP_S: Final = 1.0
# Output lines held while a run's pid is not known yet (see `_emit`).
HELD_LINES_MAX: Final = 256
# After a guard vanished without a report: how long to wait for its group to empty.
ORPHAN_WAIT_S: Final = 1.0
# `stop`: after the forced kill (grace + FALLBACK_AFTER_S after the stop began), how long the
# group may take to be confirmed gone before `stop` gives up and returns False.
FORCE_WAIT_S: Final = 0.5
# How often the driver re-kills and re-checks a group that could not be confirmed gone.
ORPHAN_POLL_S: Final = 0.1


def guard_deadline(lease_end: float, stop_grace_s: float) -> float:
    """When the guard sends SIGTERM: its SIGKILL then lands 250 ms before `lease_end`."""
    return lease_end - stop_grace_s - GUARD_MARGIN_S


def child_environment(
    base: Mapping[str, str], *, term: int, node_id: str, host: str, token: str | None
) -> dict[str, str]:
    """The command's environment: the daemon's, without the token, plus CONDUCTORD_*.

    Dropped: BAA_SHARED_TOKEN, BAA_SHARED_TOKEN_FILE, and every variable whose value holds the
    token or a piece of it of 8 characters or more (`redact.holds_secret`, the test the logs
    are redacted by), so a value with a cut or embedded copy of the token never reaches it.
    """
    env = {
        key: value
        for key, value in base.items()
        if key not in TOKEN_VARIABLES and not holds_secret(value, token)
    }
    env["CONDUCTORD_TERM"] = str(term)
    env["CONDUCTORD_NODE_ID"] = node_id
    env["CONDUCTORD_HOST"] = host
    return env


def disabled_snapshot() -> dict[str, Any]:
    """The snapshot's `exec` section when no `--exec` command is configured."""
    return {
        "command": None,
        "running": False,
        "pid": None,
        "term": None,
        "runs": 0,
        "last_exit_code": None,
    }


class Backoff:
    """Restart delays of a service that exits while leading: 1 s doubling to 30 s.

    A run that lasted `reset_after_s` or longer starts the sequence over.
    """

    def __init__(
        self, initial_s: float = 1.0, max_s: float = 30.0, reset_after_s: float = 60.0
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.reset_after_s = reset_after_s
        self._next = initial_s

    def next_delay(self, ran_for_s: float) -> float:
        if ran_for_s >= self.reset_after_s:
            self._next = self.initial_s
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay


class _Lines:
    """Split a byte stream into lines, cutting each at `limit` bytes (the rest is dropped)."""

    def __init__(self, limit: int = OUTPUT_LINE_MAX) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._dropping = False  # inside a line already emitted cut

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        out: list[tuple[bytes, bool]] = []
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._dropping:
                self._dropping = False
            else:
                out.append(self._cut(line))
        if len(self._buffer) > self.limit:
            if not self._dropping:
                out.append((bytes(self._buffer[: self.limit]), True))
                self._dropping = True
            self._buffer.clear()
        return out

    def flush(self) -> list[tuple[bytes, bool]]:
        line, self._buffer = bytes(self._buffer), bytearray()
        dropping, self._dropping = self._dropping, False
        return [] if dropping or not line else [self._cut(line)]

    def _cut(self, line: bytes) -> tuple[bytes, bool]:
        if len(line) > self.limit:
            return line[: self.limit], True
        return line, False


@dataclass(frozen=True)
class _Lead:
    term: int
    valid_until: float
    lease_end: float


class _Guard:
    """The daemon's handle on one guard process: one leadership term, one run at a time."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        term: int,
        deadline: float,
        grace_s: float,
        env: Mapping[str, str],
        lock_path: str | None = None,
    ) -> None:
        self.term = term
        self.pid: int | None = None  # the current run's command (and process group)
        # The current run's process group as soon as it exists (`group`, written by the
        # command's process before its exec): known even when `started` never arrives.
        self.group: int | None = None
        self.last_pid: int | None = None
        self.run_no: int | None = None
        self.run_started: float | None = None
        self.pending = True  # a run was asked for (at spawn, or `R`) and has not reported yet
        self.stopping: str | None = None  # the reason sent with `S`
        self.stop_sent_at: float | None = None
        self.forced = False
        self.gone_cause: str | None = None
        self.pump: gevent.Greenlet | None = None
        self.held: list[tuple[str, tuple[bytes, bool]]] = []  # output before `started`
        self.waiting = False  # reported `waiting`: another guard holds the lock

        ctl_r, self.ctl_w = os.pipe()
        self.status_r, status_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.outputs = {out_r: "stdout", err_r: "stderr"}
        child_ends = (ctl_r, status_w, out_w, err_w)
        try:
            self.proc = gsubprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    GUARD_PATH,
                    repr(deadline),
                    repr(grace_s),
                    str(status_w),
                    *(("--lock", lock_path) if lock_path is not None else ()),
                    "--",
                    *argv,
                ],
                stdin=ctl_r,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(status_w,),
                close_fds=True,  # never another guard's control pipe
                env=dict(env),
            )
        except BaseException:
            for fd in (*child_ends, self.ctl_w, self.status_r, out_r, err_r):
                os.close(fd)
            raise
        for fd in child_ends:
            os.close(fd)
        for fd in (self.ctl_w, self.status_r, out_r, err_r):
            os.set_blocking(fd, False)

    @property
    def busy(self) -> bool:
        return self.pending or self.pid is not None

    def send(self, line: str) -> None:
        # A dead or stuck guard: its own deadline and the fallback kill still apply.
        with contextlib.suppress(OSError):
            os.write(self.ctl_w, line.encode("ascii") + b"\n")

    def extend(self, deadline: float) -> None:
        self.send(f"D {deadline!r}")

    def run_again(self) -> None:
        self.pending = True
        self.send("R")

    def stop(self, reason: str) -> None:
        self.stopping = reason
        self.stop_sent_at = lease_clock()
        self.send(f"S {reason}")

    def close_control(self) -> None:
        if self.ctl_w >= 0:
            os.close(self.ctl_w)
            self.ctl_w = -1


class ExecSupervisor:
    """Runs one command while this node leads; see the module docstring for the interface."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        node_id: str,
        host: str,
        log: Any,
        token: str | None = None,
        every_ms: int | None = None,
        stop_grace_ms: int = 1000,
        environ: Mapping[str, str] | None = None,
        backoff: Backoff | None = None,
        on_crash: Callable[[BaseException], None] | None = None,
        lock_path: str | None = None,
    ) -> None:
        if not argv:
            raise ValueError("the exec command is empty")
        if every_ms is not None and every_ms < 1:
            raise ValueError("every_ms must be >= 1")
        self.argv = tuple(argv)
        self.node_id = node_id
        self.host = host
        self.log = log
        self.every_s = every_ms / 1000.0 if every_ms is not None else None
        self.grace_s = stop_grace_ms / 1000.0
        self._token = token
        self._environ = environ
        self._backoff = backoff or Backoff()
        self._on_crash = on_crash
        self.lock_path = lock_path

        self.starts_total = 0
        self.exits_total: Counter[str] = Counter(dict.fromkeys(EXIT_REASONS, 0))
        self.runs = 0
        self.last_exit_code: int | None = None

        self._lead: _Lead | None = None
        self._guard: _Guard | None = None
        self._next_run_at: float | None = None  # lease_clock; not before (backoff, period)
        self._closed = False
        self._spawning: _Lead | None = None  # a guard is being spawned for this lead
        self._lost: str = "leadership_lost"  # the reason of the last `lose`
        self._stop_began: float | None = None  # lease_clock of `lose("stopping")`
        # Process groups of ended guards that could not be confirmed gone: no new guard
        # starts, and `stop` cannot succeed, while one may still hold a live process.
        self._orphans: set[int] = set()
        self._wake = Event()
        # Set while nothing of ours can run: no guard, no spawn under way, no orphan group.
        self._idle = Event()
        self._idle.set()
        self._driver: gevent.Greenlet | None = None

    # -- the runtime's calls ---------------------------------------------------

    def lead(self, term: int, valid_until: float, lease_end: float) -> None:
        if self._closed:
            return
        if lease_clock() >= valid_until:
            self.lose("deadline")
            return
        guard = self._guard
        if guard is not None and guard.stopping is None:
            if guard.term == term:
                guard.extend(guard_deadline(lease_end, self.grace_s))
            else:
                self._next_run_at = None
                guard.stop("leadership_lost")
        self._lead = _Lead(term, valid_until, lease_end)
        self._ensure_driver()
        self._wake.set()

    def lose(self, reason: str) -> None:
        if reason not in LOSE_REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {LOSE_REASONS}")
        self._lead = None
        self._next_run_at = None
        self._lost = reason
        if reason == "stopping" and self._stop_began is None:
            self._stop_began = lease_clock()
        guard = self._guard
        if guard is not None and guard.stopping is None:
            guard.stop(reason)
        self._wake.set()

    @property
    def stop_timeout_s(self) -> float:
        """The longest `stop()` takes by default, counted from `lose("stopping")`."""
        return self.grace_s + FALLBACK_AFTER_S + FORCE_WAIT_S

    def stop(self, timeout: float | None = None) -> bool:
        self._closed = True
        self.lose("stopping")
        assert self._stop_began is not None
        end = self._stop_began + self.stop_timeout_s if timeout is None else lease_clock() + timeout
        # The driver forces a silent guard at grace + FALLBACK_AFTER_S; this is the backstop
        # (a driver that never ran, or a timeout shorter than that).
        gone = self._idle.wait(max(end - FORCE_WAIT_S - lease_clock(), 0.0))
        if not gone:
            if self._guard is not None:
                self._force(self._guard)
            for pgid in self._orphans:
                kill_group(pgid, signal.SIGKILL)
            gone = self._idle.wait(max(end - lease_clock(), 0.0))
        if self._driver is not None:
            self._driver.kill(block=False)
        # Never True while a spawn, a guard or an unconfirmed group may leave a process alive.
        return bool(gone) and self._guard is None and not self._orphans

    @property
    def running(self) -> bool:
        return self._guard is not None and self._guard.pid is not None

    def snapshot(self) -> dict[str, Any]:
        guard = self._guard
        return {
            "command": self.argv[0],
            "running": self.running,
            "pid": guard.pid if guard is not None else None,
            "term": guard.term if guard is not None else None,
            "runs": self.runs,
            "last_exit_code": self.last_exit_code,
        }

    # -- the driver: starts, runs, the daemon-side deadline, the fallback ------

    def _ensure_driver(self) -> None:
        if self._driver is None or self._driver.dead:
            self._driver = gevent.spawn(self._drive)
            self._driver.link_exception(self._crashed)

    def _drive(self) -> None:
        while not (self._closed and self._idle.is_set()):
            self._wake.clear()
            self._wake.wait(self._step(lease_clock()))

    def _settle(self) -> None:
        """Set `_idle` once nothing of ours can run any more."""
        if self._guard is None and self._spawning is None and not self._orphans:
            self._idle.set()

    def _step(self, now: float) -> float | None:
        """Act on the current state; returns how long to wait before the next step."""
        lead = self._lead
        if lead is not None and now >= lead.valid_until:
            self.lose("deadline")
            lead = None
        guard = self._guard
        unled = guard is not None and (lead is None or lead.term != guard.term)
        if guard is not None and unled and guard.stopping is None:
            # Its lead ended (or a new term began) and the guard was not told: tell it now.
            guard.stop(self._lost if lead is None else "leadership_lost")
        if self._orphans:
            for pgid in list(self._orphans):
                if group_alive(pgid):
                    kill_group(pgid, signal.SIGKILL)
                else:
                    self._orphans.discard(pgid)
                    self.log.info("exec.group_gone", pgid=pgid)
            if self._orphans:
                return ORPHAN_POLL_S  # never a new run while an old group may live
            self._settle()
        if guard is not None and guard.stopping is not None:
            assert guard.stop_sent_at is not None
            due = guard.stop_sent_at + self.grace_s + FALLBACK_AFTER_S
            if now < due:
                return min(due - now, DRIVER_CAP_S)
            self._force(guard)
            return DRIVER_CAP_S
        if lead is None:
            return None
        due = self._next_run_at
        if guard is None:
            if due is None or now >= due:
                self._spawn(lead, now)
        elif due is not None and now >= due:
            if not guard.busy:
                guard.run_again()
            elif self.every_s is not None and not guard.waiting:
                self.log.info(
                    "exec.skipped", term=guard.term, run=guard.run_no, running_pid=guard.pid
                )
            self._next_run_at = self._next_period(due, now)
        waits = [lead.valid_until - now, DRIVER_CAP_S]
        if self._next_run_at is not None:
            waits.append(self._next_run_at - now)
        return max(0.0, min(waits))

    def _next_period(self, due: float, now: float) -> float | None:
        if self.every_s is None:
            return None
        following = due + self.every_s
        return following if following > now else now + self.every_s  # late: never a burst

    def _spawn(self, lead: _Lead, now: float) -> None:
        env = child_environment(
            os.environ if self._environ is None else self._environ,
            term=lead.term,
            node_id=self.node_id,
            host=self.host,
            token=self._token,
        )
        self._next_run_at = None if self.every_s is None else now + self.every_s
        # Popen yields to the hub while it waits for the guard's exec: from here on a `lose`
        # or a `stop` must see that something is starting (`_idle` cleared).
        self._spawning = lead
        self._idle.clear()
        try:
            guard = _Guard(
                self.argv,
                term=lead.term,
                deadline=guard_deadline(lead.lease_end, self.grace_s),
                grace_s=self.grace_s,
                env=env,
                lock_path=self.lock_path,
            )
        except OSError as exc:
            self._spawning = None
            self.log.error("exec.failed", term=lead.term, error=f"cannot start the guard: {exc}")
            self._retry_later(now, 0.0)
            self._settle()
            return
        except BaseException:
            # Killed mid-spawn: `_Guard` closed the control pipe, so a guard that did start
            # reads EOF and stops its group. `_idle` stays clear: nothing confirms it gone.
            self._spawning = None
            raise
        self._spawning = None
        self._guard = guard
        guard.pump = gevent.spawn(self._pump, guard)
        guard.pump.link_exception(self._crashed)
        current = self._lead
        if self._closed:
            guard.stop("stopping")
        elif current is None:
            guard.stop(self._lost)  # lost during the spawn
        elif current.term != lead.term:
            self._next_run_at = None
            guard.stop("leadership_lost")
        elif current is not lead:
            guard.extend(guard_deadline(current.lease_end, self.grace_s))  # renewed meanwhile

    def _retry_later(self, now: float, ran_for_s: float) -> None:
        if self.every_s is None and self._lead is not None:
            self._next_run_at = now + self._backoff.next_delay(ran_for_s)

    def _force(self, guard: _Guard) -> None:
        """The guard stayed silent: kill its group and the guard itself from here."""
        if guard.forced:
            return
        guard.forced = True
        group = guard.group if guard.group is not None else guard.pid
        self.log.warning(
            "exec.guard_unresponsive",
            term=guard.term,
            guard_pid=guard.proc.pid,
            pid=guard.pid,
            pgid=group,
        )
        if group is not None:
            kill_group(group, signal.SIGKILL)
        guard.proc.kill()
        guard.close_control()
        # A run forked just now reports its group before its exec; `_guard_ended` kills it.

    def _crashed(self, greenlet: gevent.Greenlet) -> None:
        exc = greenlet.exception
        self.log.error("exec.crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        if self._on_crash is not None and exc is not None:
            self._on_crash(exc)

    # -- the pump: one greenlet per guard reads its status and output pipes ----

    def _pump(self, guard: _Guard) -> None:
        splitters = {fd: _Lines() for fd in guard.outputs}
        status = _Lines()
        open_outputs = set(guard.outputs)
        try:
            while True:
                readable, _, _ = gselect.select([guard.status_r, *open_outputs], [], [])
                for fd in readable:
                    if fd in open_outputs and not self._read_output(guard, fd, splitters):
                        open_outputs.discard(fd)
                if guard.status_r not in readable:
                    continue
                try:
                    data = os.read(guard.status_r, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    break
                for line, _ in status.feed(data):
                    # Whatever the run wrote is in its pipes before its exit is reported.
                    self._drain(guard, open_outputs, splitters)
                    self._on_status(guard, line.decode("ascii", "replace").split())
        finally:
            self._drain(guard, open_outputs, splitters)
            for fd, splitter in splitters.items():
                self._emit(guard, guard.outputs[fd], splitter.flush())
            self._release_held(guard)
            for fd in (guard.status_r, *guard.outputs):
                os.close(fd)
            self._guard_ended(guard)

    def _read_output(self, guard: _Guard, fd: int, splitters: dict[int, _Lines]) -> bool:
        """Read what is there; False at end of file."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        self._emit(guard, guard.outputs[fd], splitters[fd].feed(data))
        return True

    def _drain(self, guard: _Guard, open_outputs: set[int], splitters: dict[int, _Lines]) -> None:
        for fd in list(open_outputs):
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not data:
                    open_outputs.discard(fd)
                    break
                self._emit(guard, guard.outputs[fd], splitters[fd].feed(data))

    def _emit(self, guard: _Guard, stream: str, lines: list[tuple[bytes, bool]]) -> None:
        if guard.pending and guard.pid is None:
            # A new run can write before its `started` line arrives: hold its lines until
            # its pid is known (bounded: the guard reports right after the exec).
            guard.held.extend((stream, line) for line in lines)
            if len(guard.held) > HELD_LINES_MAX:
                self._release_held(guard)
            return
        pid = guard.pid if guard.pid is not None else guard.last_pid
        for line in lines:
            self._log_output(guard, stream, line, pid)

    def _release_held(self, guard: _Guard) -> None:
        held, guard.held = guard.held, []
        for stream, line in held:
            self._log_output(guard, stream, line, guard.pid)

    def _log_output(
        self, guard: _Guard, stream: str, line: tuple[bytes, bool], pid: int | None
    ) -> None:
        raw, cut = line
        fields: dict[str, Any] = {
            "stream": stream,
            "line": raw.decode("utf-8", "replace").removesuffix("\r"),
            "pid": pid,
            "term": guard.term,
        }
        if cut:
            fields["truncated"] = True
        self.log.info("exec.output", **fields)

    def _on_status(self, guard: _Guard, words: list[str]) -> None:
        if not words:
            return
        verb, args = words[0], words[1:]
        if verb == "group" and len(args) == 1:
            guard.group = int(args[0])
        elif verb == "waiting":
            guard.waiting = True
            self.log.warning(
                "exec.waiting",
                term=guard.term,
                lock=self.lock_path,
                holder_pid=int(args[0]) if args and args[0].isdigit() else None,
                message="the previous guard of this state dir is still stopping its group;"
                " the command starts once it is gone",
            )
        elif verb == "started" and len(args) == 1:
            self._on_started(guard, int(args[0]))
        elif verb == "exited" and len(args) == 5:
            pid, kind, value, seconds, cause = args
            self._on_exited(guard, int(pid), kind, int(value), float(seconds), cause)
        elif verb == "failed":
            guard.pending = False
            guard.group = None  # an exec that failed: that process was waited for
            self._release_held(guard)
            self.log.error("exec.failed", term=guard.term, error=" ".join(args))
            self._retry_later(lease_clock(), 0.0)
            self._wake.set()
        elif verb == "gone":
            guard.gone_cause = args[0] if args else "stopping"
        else:
            self.log.warning("exec.guard_said", term=guard.term, line=" ".join(words)[:200])

    def _on_started(self, guard: _Guard, pid: int) -> None:
        self.runs += 1
        self.starts_total += 1
        guard.pending = False
        guard.waiting = False
        guard.pid = pid
        guard.group = pid
        guard.run_no = self.runs
        guard.run_started = lease_clock()
        self.log.info("exec.started", pid=pid, term=guard.term, run=guard.run_no)
        self._release_held(guard)

    def _on_exited(
        self, guard: _Guard, pid: int, kind: str, value: int, seconds: float, cause: str
    ) -> None:
        reason = cause if cause in EXIT_REASONS else "stopping"  # `signal`, `eof`: told to stop
        if kind == "signal":
            self._record_exit(guard, pid, -value, {"signal": _signal_name(value)}, seconds, reason)
        else:
            self._record_exit(guard, pid, value, {"exit_code": value}, seconds, reason)
        if reason == "exited" and self._still_leading(guard):
            self._retry_later(lease_clock(), seconds)
        self._wake.set()

    def _record_exit(
        self,
        guard: _Guard,
        pid: int,
        code: int | None,
        status: dict[str, Any],
        seconds: float,
        reason: str,
    ) -> None:
        self.exits_total[reason] += 1
        self.last_exit_code = code
        self.log.info(
            "exec.exited",
            pid=pid,
            term=guard.term,
            run=guard.run_no,
            **status,
            seconds=round(seconds, 3),
            reason=reason,
        )
        guard.last_pid = pid
        guard.pid = None
        guard.group = None

    def _still_leading(self, guard: _Guard) -> bool:
        lead = self._lead
        return lead is not None and lead.term == guard.term and guard.stopping is None

    def _guard_ended(self, guard: _Guard) -> None:
        """The status pipe closed: the guard exited (or was killed)."""
        try:
            guard.proc.wait(timeout=ORPHAN_WAIT_S)
        except gsubprocess.TimeoutExpired:
            guard.proc.kill()
            guard.proc.wait(timeout=ORPHAN_WAIT_S)
        guard.close_control()
        if guard.gone_cause is None and not guard.forced:
            self.log.warning(
                "exec.guard_died",
                term=guard.term,
                guard_pid=guard.proc.pid,
                returncode=guard.proc.returncode,
            )
        group = guard.group
        if group is not None:
            # The guard died under a run (Linux already killed the command through
            # PR_SET_PDEATHSIG, not its descendants): kill what is left of the group from
            # here, and say "gone" only once that is confirmed.
            kill_group(group, signal.SIGKILL)
            if not _wait_group_gone(group, ORPHAN_WAIT_S):
                self._orphans.add(group)
                self.log.error(
                    "exec.group_not_gone",
                    term=guard.term,
                    pgid=group,
                    message="a process of the --exec group survived SIGKILL; no new run"
                    " starts, and a stop keeps the lease, until it is gone",
                )
        if guard.pid is not None:
            pid = guard.pid
            began = guard.run_started if guard.run_started is not None else lease_clock()
            seconds = lease_clock() - began
            self._record_exit(
                guard, pid, None, {"signal": "SIGKILL"}, seconds, guard.stopping or "exited"
            )
            if self._still_leading(guard):
                self._retry_later(lease_clock(), seconds)
        elif guard.pending and self._still_leading(guard):
            self._retry_later(lease_clock(), 0.0)  # died before its run began
        if self._guard is guard:
            self._guard = None
            self._settle()
        self._wake.set()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    end = lease_clock() + timeout
    while group_alive(pgid):
        if lease_clock() >= end:
            return False
        gevent.sleep(0.02)
    return True
