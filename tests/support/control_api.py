"""Run the reference Control API as a real subprocess for tests.

`ControlApiProcess` is the one place that knows how to launch the server (`COMMAND`), so the
launch line can change (e.g. to `python -m conductord control-api`) without touching tests.
It listens on 127.0.0.1 port 0 the first time and reads the bound port from the
`control_api.listening` log line (no race for a free port); a restart reuses that port.
stdout (JSON log lines) and stderr are collected by reader threads, so pipes never fill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import requests

COMMAND: tuple[str, ...] = (sys.executable, "-m", "conductord", "control-api")

START_TIMEOUT_SEC = 20.0


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process environment without any BAA_ setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAA_")}
    env.update(extra or {})
    return env


def run_control_api(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (for configuration errors that exit at once)."""
    return subprocess.run(
        [*COMMAND, *args],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ControlApiProcess:
    """A reference Control API server subprocess on 127.0.0.1."""

    def __init__(
        self,
        db_path: str,
        *,
        token: str | None = None,
        port: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
    ) -> None:
        self.db_path = str(db_path)
        self.token = token
        self.port = port
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.log_level = log_level
        self.proc: subprocess.Popen[str] | None = None
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._stderr: list[str] = []
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def start(self, timeout: float = START_TIMEOUT_SEC) -> ControlApiProcess:
        env = dict(self.env)
        if self.token:
            env["BAA_SHARED_TOKEN"] = self.token  # not argv: it would show in `ps`
        args = [
            "--listen",
            f"127.0.0.1:{self.port}",
            "--db",
            self.db_path,
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]
        mark = len(self._lines)
        self.returncode = None
        self.proc = subprocess.Popen(
            [*COMMAND, *args],
            env=clean_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        listening = self.wait_for_log("control_api.listening", timeout=timeout, since=mark)
        self.port = int(listening["port"])
        self.wait_healthy(timeout=timeout)
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT_SEC) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"control API not healthy after {timeout} s: {self.stderr}")
            time.sleep(0.05)

    def _signal(self, signum: int, timeout: float) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait(timeout=timeout)
            raise
        for reader in self._readers:
            reader.join(timeout=5)
        return self.returncode

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; returns the exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 15.0) -> int:
        """SIGKILL; returns the exit status (-9)."""
        return self._signal(signal.SIGKILL, timeout)

    def restart(self, timeout: float = START_TIMEOUT_SEC) -> ControlApiProcess:
        """Stop if running (SIGTERM), then start again on the same port and database."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start(timeout=timeout)

    def __enter__(self) -> ControlApiProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    # -- output --------------------------------------------------------------------------

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._lock:
                sink.append(line.rstrip("\n"))
        stream.close()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            for reader in self._readers:
                reader.join(timeout=5)
            raise RuntimeError(
                f"control API exited with {self.proc.returncode}: {self.stderr.strip()}"
            )

    @property
    def stdout_lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self._stderr)

    def logs(self, event: str | None = None, *, since: int = 0) -> list[dict[str, Any]]:
        """Parsed JSON log lines (optionally one event only); non-JSON lines fail loudly."""
        parsed = [json.loads(line) for line in self.stdout_lines[since:] if line.strip()]
        return [entry for entry in parsed if event is None or entry.get("event") == event]

    def wait_for_log(self, event: str, *, timeout: float = 10.0, since: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.logs(event, since=since)
            if found:
                return found[0]
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} log line after {timeout} s: {self.stderr}")
            time.sleep(0.02)
