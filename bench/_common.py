"""Shared helpers of the benchmark scripts in bench/ (not a library: scripts import it by path).

- `Proc`: a subprocess in its own process group whose stdout JSON log lines are collected by a
  reader thread, each stamped with the wall and monotonic time it was read. `kill_group()` in a
  `finally:` is how every benchmark guarantees that nothing outlives it. With `stdin=True` the
  parent can send it lines (`send_line`), e.g. commands to a load-generator worker. It runs in
  the repository root unless `cwd` says otherwise (`python -m` puts its cwd first on sys.path).
- `start_control_api()`: the reference Control API (`python -m conductord control-api`) on
  127.0.0.1, port 0, bound port read from its `control_api.listening` line. The shared token
  goes through the environment, never argv (it would show in `ps`), and is never printed.
- `probe_server_mode()`: "longpoll" if the server holds a contended acquire that carries
  `wait_ms` (SPEC §12), else "polling" (a server that ignores the field answers at once).
- `emit()` prints the one JSON result line on stdout; `progress()` writes to stderr.

Limits: Linux only (/proc); loopback only; the scripts run with the repository's venv python.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import requests

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDUCTORD = (sys.executable, "-m", "conductord")

Event = dict[str, Any]


def fleet_node_argv(
    *,
    node_id: str,
    index: int,
    control_api_base: str,
    local_api: str,
    ttl_sec: int,
    renew_ms: int,
    request_timeout_ms: int,
    runs_dir: str,
    heartbeat_ms: int = 1000,
) -> list[str]:
    """`conductord start` for member `index` of a benchmark fleet (0 is the primary)."""
    return [
        *CONDUCTORD,
        "start",
        "--node-id",
        node_id,
        "--host",
        "127.0.0.1",
        "--role",
        "primary" if index == 0 else "standby",
        "--control-api-base",
        control_api_base,
        "--local-api",
        local_api,
        "--lease-ttl-sec",
        str(ttl_sec),
        "--lease-renew-interval-ms",
        str(renew_ms),
        "--heartbeat-interval-ms",
        str(heartbeat_ms),
        "--request-timeout-ms",
        str(request_timeout_ms),
        "--runs-dir",
        runs_dir,
    ]


def progress(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def emit(result: dict[str, Any]) -> None:
    """The one line a benchmark prints on stdout."""
    sys.stdout.write(json.dumps(result, sort_keys=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def new_token() -> str:
    return f"bench-{secrets.token_hex(12)}"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: no BAA_* from the caller, conductord importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAA_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def free_port() -> int:
    """A loopback port free a moment ago (the daemon's --local-api refuses port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_timestamp(text: str) -> float:
    """ISO 8601 UTC log timestamp -> unix seconds (microsecond precision)."""
    stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Proc:
    """A child process in its own process group, with its JSON stdout collected."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        name: str,
        stdin: bool = False,
        cwd: str = REPO_ROOT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.events: list[Event] = []
        self.non_json: list[str] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self.spawned_wall = time.time()
        self.spawned_mono = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: kill_group() reaches everything
        )
        self.pid = self.proc.pid
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            seen_wall, seen_mono = time.time(), time.monotonic()
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
            except ValueError:
                with self._cond:
                    self.non_json.append(line.rstrip("\n"))
                continue
            event["_seen_wall"] = seen_wall
            event["_seen_mono"] = seen_mono
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self.stderr_lines) < 200:
                self.stderr_lines.append(line.rstrip("\n"))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def snapshot_events(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def wait_for(
        self,
        predicate: Callable[[Event], bool],
        *,
        timeout: float,
        after: int = 0,
    ) -> Event | None:
        """The first event (index >= after) matching `predicate`, or None at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[after:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                finished = self.proc.poll() is not None and not self._threads[0].is_alive()
                if remaining <= 0 or finished:
                    return None
                self._cond.wait(min(remaining, 0.05))

    def send_line(self, text: str) -> None:
        """One line to the child's stdin (a Proc made with `stdin=True`)."""
        assert self.proc.stdin is not None, "Proc made without stdin=True"
        self.proc.stdin.write(text.rstrip("\n") + "\n")
        self.proc.stdin.flush()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL the whole process group; safe to call twice or after exit."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=2)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._threads[0].join(timeout=2)
        return code

    def tail_stderr(self, lines: int = 5) -> str:
        return " | ".join(self.stderr_lines[-lines:])


def is_event(name: str) -> Callable[[Event], bool]:
    return lambda event: event.get("event") == name


class ControlApi:
    """The reference Control API as a subprocess; `.url`, `.token`, `.proc`.

    `extra_args` go on its command line after the others (e.g. `["--no-long-poll"]`); `port`
    0 picks a free one (a restart on the same port passes the one it had); `env` is added to
    the child's environment (e.g. `PGPASSWORD`, which must never be on the command line).
    """

    def __init__(
        self,
        db_path: str,
        *,
        token: str,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        port: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.token = token
        self.db_path = db_path
        self.proc = Proc(
            [
                *CONDUCTORD,
                "control-api",
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                db_path,
                "--log-level",
                log_level,
                *extra_args,
            ],
            env=child_env(BAA_SHARED_TOKEN=token, **(env or {})),
            name="control-api",
        )
        listening = self.proc.wait_for(is_event("control_api.listening"), timeout=30)
        if listening is None:
            self.proc.kill_group()
            raise RuntimeError(f"control API did not start: {self.proc.tail_stderr()}")
        self.port = int(listening["port"])
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}", "content-type": "application/json"}

    def close(self) -> None:
        self.proc.kill_group()


def probe_server_mode(api: ControlApi, *, wait_ms: int = 1000) -> str:
    """ "longpoll" if a contended acquire with `wait_ms` is held by the server, else "polling".

    Two probe identities: A takes the lease (TTL 60 s), B asks with `wait_ms`; A then releases
    so the benchmark's nodes start from a free lease. A long-polling server answers B only when
    A releases or `wait_ms` passes, so B's answer takes about `wait_ms`.
    """
    now = int(time.time())
    with requests.Session() as session:

        def post(path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
            reply = session.post(api.url + path, json=body, headers=api.headers, timeout=timeout)
            reply.raise_for_status()
            return reply.json()["data"]

        held = post(
            "/v1/leader/acquire",
            {"controller_id": "bench-probe-a", "host": "bench", "ttl_sec": 60, "now": now},
        )
        began = time.monotonic()
        post(
            "/v1/leader/acquire",
            {
                "controller_id": "bench-probe-b",
                "host": "bench",
                "ttl_sec": 60,
                "now": now,
                "wait_ms": wait_ms,
            },
            timeout=5.0 + wait_ms / 1000.0,
        )
        took = time.monotonic() - began
        post("/v1/leader/release", {"controller_id": "bench-probe-a", "term": held["term"]})
    return "longpoll" if took >= wait_ms / 2000.0 else "polling"


def machine_info() -> dict[str, Any]:
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": sys.version.split()[0],
        # Other work on the machine skews every figure; the load average tells how much.
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def kill_all(procs: Iterable[Proc | ControlApi | None]) -> None:
    for proc in procs:
        if proc is not None:
            try:
                if isinstance(proc, Proc):
                    proc.kill_group()
                else:
                    proc.close()
            except Exception as exc:  # cleanup must reach every process
                progress(f"cleanup of {getattr(proc, 'name', proc)!r} failed: {exc}")


def thread_cpu_ns(pid: int | str) -> dict[str, int]:
    """CPU time of each live thread of `pid` (by thread id), in ns, from schedstat."""
    times: dict[str, int] = {}
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path, encoding="ascii") as handle:
                times[path.split("/")[-2]] = int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited between glob and open
    return times


def cpu_ns(pid: int | str) -> int:
    """CPU time of every live thread of `pid`, in ns, from schedstat (not 10 ms ticks)."""
    return sum(thread_cpu_ns(pid).values())


def cpu_delta_ns(before: dict[str, int], after: dict[str, int]) -> int:
    """CPU spent between two `thread_cpu_ns` samples, per thread, never negative.

    Summing live threads and subtracting goes negative when a thread exits in between (gevent's
    resolver pool retires idle threads); a thread that exited is left out, one that started
    counts from zero.
    """
    return sum(max(ns - before.get(tid, 0), 0) for tid, ns in after.items())
