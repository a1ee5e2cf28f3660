"""The `--exec` guard: a tiny process that owns the leader's command and kills it on time.

Run by the daemon (conductord/exec.py) as
`python -I -S exec_guard.py DEADLINE GRACE STATUS_FD [--lock PATH] -- ARGV...`, with its stdin
the read end of a control pipe, its stdout/stderr the command's own output pipes to the
daemon, and its environment already prepared for the command. Standard library only and no
package imports: it loads conductord/clock.py by file path, so it reads the same sleep-counting
clock as the daemon (CLOCK_BOOTTIME on Linux), and starts in a few tens of milliseconds.

It starts the command at once (argv, no shell; with `--lock` only once it holds the lock, see
below) in a new process group with stdin /dev/null, then waits on three things in one `select`
loop, reading the clock afresh on every pass: the control pipe, the command's exit (SIGCHLD
through `signal.set_wakeup_fd`), and its deadline (on Linux a CLOCK_BOOTTIME timerfd, which
also fires right after a system sleep; elsewhere the wait is capped at 250 ms). Control lines
from the daemon:

    D <deadline>   move the kill deadline (lease_clock seconds)
    R              start the command once more (periodic runs, restarts); ignored while busy
    S <reason>     stop: SIGTERM to the group now, SIGKILL after the grace, then exit
    EOF            the daemon is gone (even `kill -9`): the same as `S eof`

When the deadline passes the guard does what `S deadline` does. SIGTERM, SIGINT or SIGHUP to
the guard itself is `S signal`. Reports on the status pipe (fd STATUS_FD), one line each:

    group <pgid>                                written by the command's own process between
                                                fork and exec: the run's process group exists
                                                (so the daemon can kill it even when the guard
                                                dies or stalls before `started`)
    waiting <holder pid | ->                    the lock is held by another guard; reported
                                                once, the guard retries every 50 ms until it
                                                holds the lock, its deadline passes or `S`
    started <pid>                               a run began; pid is the command's own
    exited <pid> exit|signal <n> <seconds> <cause>
                                                the run's whole group is gone; cause is
                                                `exited` (on its own) or what stopped it
    failed <message>                            a run could not start (exec error)
    gone <cause>                                no process of ours is left; the guard exits

"The group is gone" includes what the command left behind: after the command exits on its
own, its group gets SIGTERM and, after the grace, SIGKILL, and `exited` is reported only once
no process of the group is left. On Linux the guard is a child subreaper
(PR_SET_CHILD_SUBREAPER), so leftovers that lose their parent are reparented to it and reaped
here, and the command gets PR_SET_PDEATHSIG=SIGKILL, so a `kill -9` of the guard itself still
kills the command (not its descendants: the daemon, if alive, kills the group then).

The lock (`--lock PATH`, the daemon passes `state_dir/exec.lock`): an exclusive `flock` taken
before the first run and held until the guard exits, i.e. until no process of its group is
left. A daemon restarted at once after `kill -9` keeps its instance id (state dir) and resumes
its lease in the same term; its new guard starts nothing while the old guard still stops the
old group. The descriptor is close-on-exec and the command is spawned with `close_fds`, so the
command never holds it. After acquiring it the guard writes its pid into the file (reported by
a waiting guard as the holder).

Limits: a process that leaves the group (`setsid`, `setpgid`) is outside the guarantee. A
frozen machine freezes the guard with the child. The guard trusts the deadlines it is given;
it never starts a run at or after its deadline.
"""

import contextlib
import errno
import fcntl
import importlib.util
import os
import select
import signal
import subprocess
import sys

# Without a timerfd the select timeout runs on a clock that may stop during system sleep, so
# the wait is capped; with one, the cap is only a safety net.
POLL_CAP_S = 0.25
TIMERFD_CAP_S = 5.0
# While waiting for a killed group to empty (zombies reaped by someone else, e.g. launchd).
GROUP_POLL_S = 0.02
# While another guard holds the lock.
LOCK_POLL_S = 0.05
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CLOCK_BOOTTIME = 7
TFD_CLOEXEC = 0o2000000
TFD_NONBLOCK = 0o4000
TFD_TIMER_ABSTIME = 1


def load_lease_clock():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "clock.py")
    spec = importlib.util.spec_from_file_location("_conductord_clock", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.lease_clock


class Linux:
    """prctl and a CLOCK_BOOTTIME timerfd through ctypes (Linux only)."""

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)

        class Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

        class Itimerspec(ctypes.Structure):
            _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]

        self.Itimerspec = Itimerspec

    def prctl(self, option, value):
        return self.libc.prctl(option, value, 0, 0, 0) == 0

    def timerfd(self):
        # time_t is a C long on the 64-bit Linux targets; anything else polls instead.
        if self.ctypes.sizeof(self.ctypes.c_long) != 8:
            return None
        fd = self.libc.timerfd_create(CLOCK_BOOTTIME, TFD_CLOEXEC | TFD_NONBLOCK)
        return fd if fd >= 0 else None

    def arm(self, fd, at):
        spec = self.Itimerspec()
        at = max(at, 1e-6)  # an all-zero it_value would disarm the timer
        spec.it_value.tv_sec = int(at)
        spec.it_value.tv_nsec = int((at - int(at)) * 1e9)
        return self.libc.timerfd_settime(fd, TFD_TIMER_ABSTIME, self.ctypes.byref(spec), None) == 0


class Run:
    def __init__(self, popen, started):
        self.popen = popen
        self.pid = popen.pid  # also the process group id
        self.started = started
        self.status = None  # the command's wait status once reaped
        self.seconds = None
        self.cause = None  # why the group is being killed; None while it runs undisturbed
        self.term_at = None  # when the group got SIGTERM
        self.killed = False  # SIGKILL sent


class Guard:
    def __init__(self, argv, deadline, grace, status_fd, clock, linux, lock_path=None):
        self.argv = argv
        self.deadline = deadline
        self.grace = grace
        self.status_fd = status_fd
        self.clock = clock
        self.linux = linux
        self.pid = os.getpid()
        self.run = None
        self.want_run = True  # the first run starts at once
        self.stop_cause = None
        self.ctl_open = True
        self.ctl_buffer = b""
        self.timer_fd = None
        self.timer_at = None
        self.wake_r = None
        self.lock_path = lock_path
        self.lock_fd = None  # open and flock-ed: held until the guard exits
        self.waiting_reported = False

    # -- setup -----------------------------------------------------------------

    def setup(self):
        os.set_blocking(self.status_fd, False)  # a stopped daemon must never block the guard
        os.set_blocking(0, False)
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        # Python-level handlers (not SIG_IGN) are reset to the default by exec in the child.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.on_stop_signal)
        if self.linux is not None:
            self.linux.prctl(PR_SET_CHILD_SUBREAPER, 1)
            self.timer_fd = self.linux.timerfd()

    def on_stop_signal(self, signum, frame):
        if self.stop_cause is None:
            self.stop_cause = "signal"

    def preexec(self):
        # In the child, between fork and exec (its process group already set): tell the
        # daemon the group first, so it can kill the group even if the guard stalls or dies
        # before reporting `started`; then die with the guard (Linux), and make sure the
        # guard did not die before the request was in place.
        with contextlib.suppress(OSError):
            os.write(self.status_fd, f"group {os.getpgid(0)}\n".encode("ascii"))
        if self.linux is not None:
            self.linux.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(1)

    # -- the loop ----------------------------------------------------------------

    def serve(self):
        while True:
            self.reap()
            now = self.clock()
            if self.stop_cause is None and now >= self.deadline:
                self.stop_cause = "deadline"
            run = self.run
            if run is not None:
                self.drive(run, now)
                if run.status is not None and not group_alive(run.pid):
                    self.report_exit(run)
                    self.run = None
            if self.run is None:
                if self.stop_cause is not None:
                    self.report("gone", self.stop_cause)
                    return 0
                # Never at or after the deadline: that set stop_cause above.
                if self.want_run and self.take_lock():
                    self.want_run = False
                    self.start_run()
                    continue
            self.wait(self.timeout(self.clock()))

    def drive(self, run, now):
        """Signal the run's group as its state requires."""
        if run.term_at is None:
            if run.status is not None:
                run.cause = "exited"  # on its own: now clear away what it left behind
            elif self.stop_cause is not None:
                run.cause = self.stop_cause
            else:
                return
            run.term_at = now
            kill_group(run.pid, signal.SIGTERM)
        if not run.killed and now >= self.kill_at(run):
            run.killed = True
            kill_group(run.pid, signal.SIGKILL)

    def kill_at(self, run):
        # The grace never runs past deadline + grace (250 ms before the lease could be granted
        # elsewhere): a guard that wakes late, after a system sleep or a pause, kills at once.
        return min(run.term_at, self.deadline) + self.grace

    def timeout(self, now):
        targets = []
        if self.stop_cause is None:
            targets.append(self.deadline)
        run = self.run
        if run is not None and run.term_at is not None and not run.killed:
            targets.append(self.kill_at(run))
        at = min(targets) if targets else None
        cap = TIMERFD_CAP_S if self.timer_fd is not None else POLL_CAP_S
        if run is not None and (run.status is not None or run.killed):
            cap = GROUP_POLL_S
        elif run is None and self.want_run and self.stop_cause is None:
            cap = LOCK_POLL_S  # only while the lock is taken: otherwise the run starts now
        if at is not None and self.timer_fd is not None and at != self.timer_at:
            if self.linux.arm(self.timer_fd, at):
                self.timer_at = at
            else:
                self.timer_fd = None
                cap = min(cap, POLL_CAP_S)
        if at is None:
            return cap
        return max(0.0, min(at - now, cap))

    def wait(self, timeout):
        fds = [self.wake_r]
        if self.ctl_open:
            fds.append(0)
        if self.timer_fd is not None:
            fds.append(self.timer_fd)
        readable, _, _ = select.select(fds, [], [], timeout)
        for fd in readable:
            if fd == 0:
                self.read_control()
            else:
                drain(fd)

    # -- control lines -----------------------------------------------------------

    def read_control(self):
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.ctl_open = False
            if self.stop_cause is None:
                self.stop_cause = "eof"
            return
        self.ctl_buffer += data
        *lines, self.ctl_buffer = self.ctl_buffer.split(b"\n")
        for line in lines:
            self.command(line.decode("ascii", "replace").split())

    def command(self, words):
        if not words:
            return
        verb, args = words[0], words[1:]
        if verb == "D" and len(args) == 1:
            try:
                deadline = float(args[0])
            except ValueError:
                self.report("error", "bad deadline")
                return
            if self.stop_cause is None:
                self.deadline = deadline
        elif verb == "R" and not args:
            if self.run is None and self.stop_cause is None:
                self.want_run = True
        elif verb == "S":
            if self.stop_cause is None:
                self.stop_cause = token(args[0] if args else "stop")
        else:
            self.report("error", "unknown command " + token(verb))

    # -- runs --------------------------------------------------------------------

    def take_lock(self):
        """True once this guard holds the lock (or runs without one)."""
        if self.lock_path is None or self.lock_fd is not None:
            return True
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self.want_run = False  # the daemon retries with `R`, like a failed exec
            self.report("failed", one_line(f"lock {self.lock_path}: {exc.strerror or exc}"))
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                if not self.waiting_reported:
                    self.waiting_reported = True
                    self.report("waiting", holder)
            else:
                self.want_run = False
                self.report("failed", one_line(f"lock {self.lock_path}: {exc.strerror or exc}"))
            return False
        self.lock_fd = fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.pid}\n".encode("ascii"), 0)
        return True

    def start_run(self):
        try:
            popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                close_fds=True,  # only 0, 1, 2: never the control or status pipe
                process_group=0,
                preexec_fn=self.preexec,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self.report("failed", one_line(f"{self.argv[0]}: {exc.strerror or exc}"))
            return
        self.run = Run(popen, self.clock())
        self.report("started", str(self.run.pid))

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.run
            if run is not None and pid == run.pid and run.status is None:
                run.status = status
                run.seconds = self.clock() - run.started
                run.popen.returncode = os.waitstatus_to_exitcode(status)

    def report_exit(self, run):
        code = os.waitstatus_to_exitcode(run.status)
        kind, value = ("signal", -code) if code < 0 else ("exit", code)
        self.report("exited", f"{run.pid} {kind} {value} {run.seconds:.3f} {run.cause or 'exited'}")

    def report(self, verb, text):
        # The daemon is gone or not reading: nothing depends on it being told.
        with contextlib.suppress(OSError):
            os.write(self.status_fd, f"{verb} {text}\n".encode("ascii", "replace"))


def group_alive(pgid):
    """True while a process of the group can still run (a zombie is dead, not running).

    Shared with the daemon (conductord/exec.py imports it): one definition of "gone".
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not sys.platform.startswith("linux"):
        return True
    # killpg also finds zombies, and their new parent (init, or a container's pid 1 that
    # never reaps) decides when they go: look for a member that is not one.
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def kill_group(pgid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def read_holder(fd):
    """The pid the lock's holder wrote into the file, or `-`."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "-"
    return text if text.isdigit() else "-"


def drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def token(text):
    """A reason as one short word, safe to echo on the status pipe."""
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in text)
    return cleaned[:32] or "stop"


def one_line(text):
    return " ".join(str(text).split())[:512]


USAGE = "usage: exec_guard.py DEADLINE GRACE STATUS_FD [--lock PATH] -- ARGV..."


def parse(argv):
    """(deadline, grace, status_fd, lock_path or None, command argv)."""
    head, lock = argv[:3], None
    rest = argv[3:]
    if rest[:1] == ["--lock"] and len(rest) >= 2:
        lock, rest = rest[1], rest[2:]
    if len(head) < 3 or len(rest) < 2 or rest[0] != "--":
        raise ValueError(USAGE)
    return float(head[0]), float(head[1]), int(head[2]), lock, rest[1:]


def main(argv):
    try:
        deadline, grace, status_fd, lock, command = parse(argv)
    except ValueError as exc:
        sys.stderr.write(f"exec_guard: {exc}\n")
        return 2
    clock = load_lease_clock()
    linux = Linux() if sys.platform.startswith("linux") else None
    guard = Guard(command, deadline, grace, status_fd, clock, linux, lock)
    guard.setup()
    return guard.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
