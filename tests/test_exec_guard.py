"""The `--exec` guard alone (conductord/exec_guard.py), driven by this test over its pipes.

Real processes throughout: the commands are small Python children that take an exclusive
non-blocking `flock` on one shared file (the kernel reports any overlap) and note what happens
to them in a record file. Waits are bounded and end on the event itself: a status line, an
output line, or the process's exit (a pidfd on Linux).

The helpers here (`make_child`, `alive`, `wait_gone`) are shared with
tests/test_exec_supervisor.py.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conductord.clock import lease_clock
from conductord.exec import GUARD_PATH

LINUX = sys.platform.startswith("linux")
linux_only = pytest.mark.skipif(not LINUX, reason="Linux: /proc, prctl")

CHILD_SOURCE = r'''
import fcntl, importlib.util, json, os, signal, sys, time

args = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("clock", args["clock"])
clock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(clock)


def note(event, **fields):
    line = json.dumps({"event": event, "pid": os.getpid(), "at": clock.lease_clock(), **fields})
    with open(args["record"], "a") as handle:
        handle.write(line + "\n")


def on_term(signum, frame):
    note("sigterm")
    if args.get("term_delay") is not None:
        time.sleep(args["term_delay"])  # finishing a job, the flock still held
        note("term_exit")
        os._exit(0)
    if not args.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def linger():
    # A leftover of the group: it outlives the command and shrugs off SIGTERM.
    signal.signal(signal.SIGTERM, lambda s, f: None)
    while True:
        signal.pause()


if args.get("lock"):
    fd = os.open(args["lock"], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        note("overlap")
        sys.exit(99)
signal.signal(signal.SIGTERM, on_term)
leftovers = []
if args.get("leftovers"):
    pid = os.fork()
    if pid == 0:
        linger()
    leftovers.append(pid)
    # A double fork: its parent exits at once, so it must be reparented (to the guard).
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        orphan = os.fork()
        if orphan == 0:
            linger()
        os.write(write_end, str(orphan).encode())
        os._exit(0)
    os.waitpid(middle, 0)
    leftovers.append(int(os.read(read_end, 64)))
note(
    "start",
    term=os.environ.get("CONDUCTORD_TERM"),
    env=dict(os.environ),
    ppid=os.getppid(),
    pgid=os.getpgid(0),
    leftovers=leftovers,
)
for text in args.get("say", []):
    print(text, flush=True)
for text in args.get("say_err", []):
    print(text, file=sys.stderr, flush=True)
print("ready", os.getpid(), flush=True)
if "exit_after" in args:
    time.sleep(args["exit_after"])
    note("exit", code=args.get("code", 0))
    sys.exit(args.get("code", 0))
while True:
    signal.pause()
'''


class Records:
    """The record file the children append to, one JSON object a line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def of(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.all() if record["event"] == event]


def make_child(tmp_path: Path):
    """`child(**options)` -> argv of a test command; `.records`, `.lock` for its results."""
    script = tmp_path / "child.py"
    script.write_text(CHILD_SOURCE)
    records = Records(tmp_path / "records.jsonl")
    lock = tmp_path / "singleton.lock"
    clock_path = str(Path(GUARD_PATH).with_name("clock.py"))

    def make(**options: Any) -> list[str]:
        options = {"record": str(records.path), "lock": str(lock), "clock": clock_path, **options}
        return [sys.executable, str(script), json.dumps(options)]

    make.records = records  # type: ignore[attr-defined]
    make.lock = lock  # type: ignore[attr-defined]
    return make


@pytest.fixture
def child(tmp_path: Path):
    return make_child(tmp_path)


def alive(pid: int) -> bool:
    """True while the process runs; a zombie (dead, not yet reaped) is not alive."""
    if hasattr(os, "pidfd_open"):
        return not wait_gone(pid, 0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process (not necessarily our child) to exit; True once it has."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        try:
            return bool(select.select([fd], [], [], max(timeout, 0.0))[0])
        finally:
            os.close(fd)
    end = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)


class GuardProcess:
    """A guard started the way exec.py starts one, with this test holding every pipe end."""

    def __init__(
        self, argv: list[str], *, deadline: float, grace: float, lock: Path | None = None
    ) -> None:
        ctl_r, self.ctl_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.ctl_inode = os.fstat(ctl_r).st_ino
        self.status_inode = os.fstat(status_w).st_ino
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", GUARD_PATH, repr(deadline), repr(grace),
             str(status_w), *(["--lock", str(lock)] if lock else []), "--", *argv],
            stdin=ctl_r,
            stdout=out_w,
            stderr=out_w,
            pass_fds=(status_w,),
        )
        for fd in (ctl_r, status_w, out_w):
            os.close(fd)
        self._buffers = {self.status_r: b"", self.out_r: b""}
        self.output: list[str] = []
        self.groups: list[int] = []  # `group <pgid>` lines, written by each run before its exec

    def send(self, line: str) -> None:
        os.write(self.ctl_w, line.encode() + b"\n")

    def close_control(self) -> None:
        if self.ctl_w >= 0:
            os.close(self.ctl_w)
            self.ctl_w = -1

    def _line(self, fd: int, timeout: float) -> str | None:
        end = time.monotonic() + timeout
        while b"\n" not in self._buffers[fd]:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 65536)
            if not data:
                return None
            self._buffers[fd] += data
        line, self._buffers[fd] = self._buffers[fd].split(b"\n", 1)
        return line.decode()

    def status(self, timeout: float = 5.0) -> list[str] | None:
        """The next status line, except `group` lines (kept in `groups`, in order)."""
        end = time.monotonic() + timeout
        while True:
            line = self._line(self.status_r, max(end - time.monotonic(), 0.0))
            if line is None:
                return None
            words = line.split()
            if words[:1] != ["group"]:
                return words
            self.groups.append(int(words[1]))

    def expect(self, verb: str, timeout: float = 5.0) -> list[str]:
        words = self.status(timeout)
        assert words is not None, f"no {verb!r} line within {timeout} s"
        assert words[0] == verb, words
        return words[1:]

    def wait_output(self, prefix: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while True:
            line = self._line(self.out_r, max(end - time.monotonic(), 0.0))
            assert line is not None, f"no output line {prefix!r} within {timeout} s"
            self.output.append(line)
            if line.startswith(prefix):
                return line

    def started(self) -> int:
        pid = int(self.expect("started")[0])
        self.wait_output(f"ready {pid}")
        return pid

    def close(self) -> None:
        self.close_control()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for fd in (self.status_r, self.out_r):
            os.close(fd)


@pytest.fixture
def guards():
    started: list[GuardProcess] = []

    def start(
        argv: list[str], *, deadline: float, grace: float = 0.5, lock: Path | None = None
    ) -> GuardProcess:
        guard = GuardProcess(argv, deadline=deadline, grace=grace, lock=lock)
        started.append(guard)
        return guard

    yield start
    for guard in started:
        guard.close()


def holder_of(fd: int) -> subprocess.Popen:
    """A stand-in daemon: the only process that holds the control pipe's write end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=(fd,)
    )
    os.close(fd)
    return proc


def test_deadline_sends_sigterm_then_sigkill_after_the_grace(guards, child) -> None:
    deadline = lease_clock() + 1.5
    guard = guards(child(ignore_term=True), deadline=deadline, grace=0.6)
    pid = guard.started()

    assert wait_gone(pid, deadline + 5 - lease_clock())
    gone_at = lease_clock()
    (sigterm,) = child.records.of("sigterm")
    assert sigterm["at"] >= deadline
    assert gone_at >= sigterm["at"] + 0.6 - 0.02, "SIGKILL came before the grace ran out"
    assert gone_at <= deadline + 0.6 + 0.5
    words = guard.expect("exited")
    assert words[:3] == [str(pid), "signal", str(int(signal.SIGKILL))]
    assert words[4] == "deadline"
    assert guard.expect("gone") == ["deadline"]
    assert guard.proc.wait(timeout=5) == 0


def test_extending_the_deadline_keeps_the_command_running(guards, child) -> None:
    guard = guards(child(), deadline=lease_clock() + 0.8, grace=0.3)
    pid = guard.started()
    first_deadline = lease_clock() + 0.8
    until = lease_clock() + 2.0
    last = first_deadline
    while lease_clock() < until:
        last = lease_clock() + 0.8
        guard.send(f"D {last!r}")
        assert guard.status(timeout=0.2) is None  # paces the "renewals"; nothing happens
    assert alive(pid), "killed although every deadline was extended"
    assert lease_clock() > first_deadline + 0.5

    words = guard.expect("exited", timeout=last + 3 - lease_clock())
    assert lease_clock() >= last
    assert words[1:3] == ["signal", str(int(signal.SIGTERM))] and words[4] == "deadline"
    assert [r["at"] >= last for r in child.records.of("sigterm")] == [True]


def test_stop_line_stops_the_group_and_the_guard(guards, child) -> None:
    guard = guards(child(), deadline=lease_clock() + 60, grace=0.5)
    pid = guard.started()
    began = lease_clock()
    guard.send("S leadership_lost")
    words = guard.expect("exited")
    assert words[0] == str(pid) and words[4] == "leadership_lost"
    assert words[1:3] == ["signal", str(int(signal.SIGTERM))]
    assert guard.expect("gone") == ["leadership_lost"]
    assert lease_clock() - began < 1.0
    assert not alive(pid)
    assert guard.proc.wait(timeout=5) == 0


def test_control_eof_kills_the_group_long_before_the_deadline(guards, child) -> None:
    guard = guards(child(ignore_term=True), deadline=lease_clock() + 60, grace=0.5)
    daemon = holder_of(guard.ctl_w)
    guard.ctl_w = -1
    try:
        pid = guard.started()
        began = lease_clock()
        daemon.kill()  # kill -9 of the "daemon": its pipe end closes with it
        assert wait_gone(pid, 5)
        assert lease_clock() - began < 0.5 + 1.0  # SIGTERM now, SIGKILL after the grace
        words = guard.expect("exited")
        assert words[4] == "eof"
        assert guard.expect("gone") == ["eof"]
    finally:
        daemon.kill()
        daemon.wait(timeout=5)


def test_a_stopped_driver_cannot_keep_the_command_past_the_deadline(guards, child) -> None:
    grace = 0.5
    deadline = lease_clock() + 1.5
    lease_end = deadline + grace + 0.25  # what exec.py derives the guard deadline from
    guard = guards(child(ignore_term=True), deadline=deadline, grace=grace)
    daemon = holder_of(guard.ctl_w)
    guard.ctl_w = -1
    try:
        pid = guard.started()
        daemon.send_signal(signal.SIGSTOP)  # paused, holding its pipe end: no EOF, no renewal
        assert wait_gone(pid, lease_end + 5 - lease_clock())
        # The guard's SIGKILL is due at lease_end - 0.25 s; allow the test's own wake-up lag.
        assert lease_clock() < lease_end + 0.25
        assert guard.expect("exited")[4] == "deadline"
    finally:
        daemon.send_signal(signal.SIGCONT)
        daemon.kill()
        daemon.wait(timeout=5)


def test_what_the_command_leaves_behind_is_killed_too(guards, child) -> None:
    grace = 0.6
    guard = guards(child(leftovers=True, exit_after=0.0), deadline=lease_clock() + 60, grace=grace)
    pid = int(guard.expect("started")[0])
    guard.wait_output(f"ready {pid}")
    (start,) = child.records.of("start")
    in_group, orphan = start["leftovers"]
    assert wait_gone(pid, 5)
    exited_at = lease_clock()
    if LINUX:
        # The orphan's parent exited at once: it was reparented to the guard (the subreaper).
        assert _ppid(orphan) == guard.proc.pid
    words = guard.expect("exited", timeout=grace + 5)
    # Reported only once the group is empty: the leftovers shrugged off SIGTERM, so SIGKILL
    # after the grace took them.
    assert lease_clock() - exited_at >= grace - 0.05
    assert words[:3] == [str(pid), "exit", "0"] and words[4] == "exited"
    assert not alive(in_group) and not alive(orphan)
    assert guard.status(timeout=0.2) is None, "the guard waits for R or S, it does not exit"
    guard.send("S stopping")
    assert guard.expect("gone") == ["stopping"]


@linux_only
def test_the_control_pipe_never_leaks_into_the_command(guards, child, tmp_path) -> None:
    exec_lock = tmp_path / "exec.lock"
    guard = guards(child(), deadline=lease_clock() + 60, lock=exec_lock)
    pid = guard.started()
    assert guard.groups == [pid]  # the run's group, reported before its exec
    targets = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in _fds(pid)}
    assert targets[0] == "/dev/null"
    assert f"pipe:[{guard.ctl_inode}]" not in targets.values()
    assert f"pipe:[{guard.status_inode}]" not in targets.values()
    extra = {fd: t for fd, t in targets.items() if fd > 2 and t != str(child.lock)}
    assert extra == {}, extra  # nor the guard's exec lock
    guard_fds = [os.readlink(f"/proc/{guard.proc.pid}/fd/{fd}") for fd in _fds(guard.proc.pid)]
    assert str(exec_lock) in guard_fds
    # The guard itself holds the control pipe's read end only, never a write end.
    for fd in _fds(guard.proc.pid):
        if os.readlink(f"/proc/{guard.proc.pid}/fd/{fd}") == f"pipe:[{guard.ctl_inode}]":
            flags = int(_fdinfo(guard.proc.pid, fd)["flags"], 8)
            assert flags & os.O_ACCMODE == os.O_RDONLY, (fd, oct(flags))


@linux_only
def test_a_killed_guard_takes_the_command_with_it(guards, child) -> None:
    guard = guards(child(ignore_term=True), deadline=lease_clock() + 60)
    pid = guard.started()
    guard.proc.kill()
    assert wait_gone(pid, 3), "PR_SET_PDEATHSIG should have killed the command"


def test_run_again_after_an_exit_and_a_command_that_cannot_start(guards, child, tmp_path):
    guard = guards(child(exit_after=0.0, code=3), deadline=lease_clock() + 60)
    first = guard.started()
    assert guard.expect("exited")[:3] == [str(first), "exit", "3"]
    guard.send("R")
    second = guard.started()
    assert second != first
    assert guard.expect("exited")[:3] == [str(second), "exit", "3"]
    assert child.records.of("overlap") == []
    guard.send("S stopping")
    assert guard.expect("gone") == ["stopping"]

    missing = guards([str(tmp_path / "no-such-command")], deadline=lease_clock() + 60)
    assert "no-such-command" in " ".join(missing.expect("failed"))
    missing.send("S stopping")
    assert missing.expect("gone") == ["stopping"]


def test_a_guard_started_after_its_deadline_starts_nothing(guards, child) -> None:
    guard = guards(child(), deadline=lease_clock() - 0.1)
    assert guard.expect("gone") == ["deadline"]
    assert guard.proc.wait(timeout=5) == 0
    assert child.records.all() == []


def test_sigterm_to_the_guard_stops_the_command_first(guards, child) -> None:
    guard = guards(child(), deadline=lease_clock() + 60)
    pid = guard.started()
    guard.proc.send_signal(signal.SIGTERM)
    words = guard.expect("exited")
    assert words[0] == str(pid) and words[4] == "signal"
    assert guard.expect("gone") == ["signal"]
    assert guard.proc.wait(timeout=5) == 0


def _fds(pid: int) -> list[int]:
    return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))


def _fdinfo(pid: int, fd: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_a_guard_that_wakes_late_skips_the_grace(guards, child) -> None:
    # The guard frozen past deadline + grace (a system sleep, a pause): the SIGKILL that was
    # due 250 ms before the lease end goes out at once on waking, not one grace later.
    grace = 3.0
    deadline = lease_clock() + 0.5
    guard = guards(child(ignore_term=True), deadline=deadline, grace=grace)
    pid = guard.started()
    guard.proc.send_signal(signal.SIGSTOP)
    try:
        assert guard.status(timeout=deadline + grace + 0.3 - lease_clock()) is None
    finally:
        guard.proc.send_signal(signal.SIGCONT)
    woke = lease_clock()
    assert wait_gone(pid, 2 * grace)
    assert lease_clock() - woke < 1.0
    assert guard.expect("exited")[1:3] == ["signal", str(int(signal.SIGKILL))]


def test_a_guard_starts_nothing_while_another_holds_the_lock(guards, child, tmp_path) -> None:
    # A daemon restarted at once after kill -9 (same state dir, same instance, same term):
    # its new guard must wait until the old guard's group is gone. The flock children let the
    # kernel say whether two copies ever ran at once.
    lock = tmp_path / "exec.lock"
    old = guards(child(term_delay=0.6), deadline=lease_clock() + 60, grace=2.0, lock=lock)
    old_pid = old.started()
    new = guards(child(), deadline=lease_clock() + 60, lock=lock)
    assert new.expect("waiting") == [str(old.proc.pid)]  # the holder wrote its pid
    late = guards(child(), deadline=lease_clock() + 0.5, lock=lock)
    words = late.status()
    if words is not None and words[0] == "waiting":  # (a guard slower to start than 0.5 s
        words = late.status()  # finds its deadline passed before it tries the lock)
    assert words == ["gone", "deadline"]  # never a run at or after its deadline
    assert new.status(timeout=0.2) is None  # still waiting, and said so only once

    old.close_control()  # the old daemon is gone: SIGTERM; the command ends its job first
    assert old.expect("exited")[4] == "eof"
    assert old.expect("gone") == ["eof"]
    new_pid = new.started()
    (term_exit,) = child.records.of("term_exit")
    assert term_exit["pid"] == old_pid
    second = next(r for r in child.records.of("start") if r["pid"] == new_pid)
    assert second["at"] > term_exit["at"]
    assert child.records.of("overlap") == []
    assert len(child.records.of("start")) == 2  # the late guard started nothing
