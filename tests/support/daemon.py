"""Run `conductord start` as a real subprocess and read its JSON log lines as they come.

`DaemonProcess` starts `python -m conductord start ...` with a clean environment, collects
every stdout line on a reader thread (parsed as JSON; anything else is kept in
`non_json_lines` so tests can assert stdout purity), and offers waits with deadlines instead
of sleeps: `wait_event(...)`, `wait_exit(...)`.

`FakeControlApi` is a scripted, stateful Control API for a `ScriptedServer`: it grants the
lease to whoever asks while in mode "grant", names another holder in "other", answers 500
in "fail", HTML in "garbage", and hangs in "hang", so tests can drive a node through every
transition. Like the seed's server it ignores `instance_id`; with `omit_operation` its acquire
answers carry no `operation` either.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from tests.support.scripted_server import Recorded, Reply, ScriptedServer

Event = dict[str, Any]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: PATH and friends, no BAA_* leaking from the host."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAA_")}
    env.update(extra)
    return env


class DaemonProcess:
    def __init__(
        self,
        args: Iterable[str],
        *,
        env: dict[str, str] | None = None,
        command: str = "start",
        program: list[str] | None = None,
    ) -> None:
        # `program` replaces `python -m conductord COMMAND` (e.g. an embedding example).
        self.argv = [*(program or [sys.executable, "-m", "conductord", command]), *args]
        self.events: list[Event] = []
        self.non_json_lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or clean_env(),
            text=True,
        )
        self._stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._err_reader.start()

    # -- reading ---------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
            except ValueError:
                with self._cond:
                    self.non_json_lines.append(line)
                    self._cond.notify_all()
                continue
            event["_seen_at"] = time.monotonic()
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def named(self, name: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    def wait_event(
        self,
        name: str,
        predicate: Callable[[Event], bool] = lambda e: True,
        *,
        timeout: float = 10.0,
        after: int = 0,
    ) -> Event:
        """The first event `name` (at index >= `after`) matching `predicate`, or AssertionError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[after:]:
                    if event.get("event") == name and predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(remaining, 0.1))
        raise AssertionError(
            f"no {name!r} event within {timeout} s; events: "
            f"{[e.get('event') for e in self.events]}; stderr: {self.stderr[-2000:]}"
        )

    def transition_to(self, state: str, *, timeout: float = 10.0, after: int = 0) -> Event:
        return self.wait_event(
            "lease.transition", lambda e: e["to_state"] == state, timeout=timeout, after=after
        )

    # -- controlling -----------------------------------------------------------

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 10.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self._err_reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self._reader.join(timeout=5)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeControlApi:
    """A stateful fake Control API on a ScriptedServer (see module docstring)."""

    def __init__(self, server: ScriptedServer, *, other_holder: str = "other-node") -> None:
        self.server = server
        self.other_holder = other_holder
        self.mode = "grant"
        self.heartbeat_mode = "ok"
        self.term = 1
        self.holder: str | None = None
        self.omit_operation = False
        self._lock = threading.Lock()
        server.handler("/v1/leader/acquire", self._acquire)
        server.handler("/v1/controllers/heartbeat", self._heartbeat)
        server.handler("/v1/leader/release", self._release)

    def _envelope(self, data: Any) -> dict[str, Any]:
        return {"ok": True, "request_id": "req", "data": data}

    def _failure(self, mode: str) -> Reply | None:
        if mode == "fail":
            return Reply(
                status=500,
                body={"ok": False, "request_id": "r", "error": "boom", "message": "scripted"},
            )
        if mode == "garbage":
            return Reply(
                status=200, body="<html>oops</html>", headers={"content-type": "text/html"}
            )
        if mode == "hang":
            return Reply(hang=True)
        return None

    def _acquire(self, rec: Recorded) -> Reply | dict[str, Any]:
        with self._lock:
            failure = self._failure(self.mode)
            if failure is not None:
                return failure
            now = int(time.time())
            caller = rec.json["controller_id"]
            operation = "acquire"
            if self.mode == "other":
                holder, leader = self.other_holder, False
            else:
                if self.holder != caller:
                    self.term += 1 if self.holder is not None else 0
                else:
                    operation = "renew"
                self.holder = caller
                holder, leader = caller, True
            data = {
                "holder_id": holder,
                "holder_host": "fake",
                "term": self.term,
                "lease_expires_at": now + rec.json["ttl_sec"],
                "renewed_at": now,
                "is_leader": leader,
                "operation": operation,
            }
            if self.omit_operation:
                del data["operation"]
            return self._envelope(data)

    def _heartbeat(self, rec: Recorded) -> Reply | dict[str, Any]:
        failure = self._failure(self.heartbeat_mode)
        return failure if failure is not None else self._envelope({"ok": True})

    def _release(self, rec: Recorded) -> dict[str, Any]:
        with self._lock:
            released = self.holder == rec.json["controller_id"]
            if released:
                self.holder = None
            return self._envelope({"released": released})


def parse_ts(event: Event) -> float:
    """The event's ISO 8601 UTC timestamp as unix seconds."""
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def scheduler_intervals(events: list[Event], *, ended_at: float | None = None) -> list[tuple]:
    """(start, end) wall-clock intervals in which a node's scheduler was enabled, from its logs.

    An interval opens at a `lease.transition` to leader and closes at the next transition
    away, at `conductor.stopping` (the scheduler is switched off first), or at `ended_at`
    (e.g. the moment the test killed the process) when still open.
    """
    intervals: list[tuple[float, float]] = []
    opened: float | None = None
    for event in events:
        name = event.get("event")
        if name == "lease.transition" and event["to_state"] == "leader":
            opened = parse_ts(event) if opened is None else opened
        elif opened is not None and (name == "lease.transition" or name == "conductor.stopping"):
            intervals.append((opened, parse_ts(event)))
            opened = None
    if opened is not None:
        intervals.append((opened, ended_at if ended_at is not None else float("inf")))
    return intervals


def overlap_seconds(*per_node: list[tuple]) -> float:
    """Total time in which two or more nodes had the scheduler enabled at once."""
    marks = sorted(
        (point, delta)
        for intervals in per_node
        for start, end in intervals
        for point, delta in ((start, 1), (end, -1))
    )
    total, active, last = 0.0, 0, None
    for point, delta in marks:
        if active >= 2 and last is not None:
            total += point - last
        active += delta
        last = point
    return total
