#!/usr/bin/env python3
"""`scripts/dev.sh run`: the bundled Control API and one node against it, on loopback.

Starts `conductord control-api` (SQLite database, a generated token and its log file
`control-api.log` under `.conductord-demo/`, or `$CONDUCTORD_DEMO_DIR`) and one
`conductord start` node with its status endpoint on, then streams the node's JSON log lines
to stdout. Extra arguments go to the node (`scripts/dev.sh run --role standby`). Ctrl-C (or
SIGTERM) stops the node first, so it releases its lease, then the Control API.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("CONDUCTORD_DEMO_DIR") or ROOT / ".conductord-demo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token_file() -> Path:
    path = STATE / "token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    return path


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def main(node_args: list[str]) -> int:
    STATE.mkdir(mode=0o700, exist_ok=True)
    conductord = [sys.executable, "-m", "conductord"]
    api_port, status_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAA_")}
    env["BAA_SHARED_TOKEN_FILE"] = str(token_file())

    with open(STATE / "control-api.log", "ab") as api_log:
        api = subprocess.Popen(
            [
                *conductord,
                "control-api",
                "--listen",
                f"127.0.0.1:{api_port}",
                "--db",
                str(STATE / "control.sqlite3"),
            ],
            env=env,
            stdout=api_log,
            stderr=api_log,
            # Own session: a terminal Ctrl-C reaches only this script, which stops the
            # node first (so it can still release its lease) and the Control API last.
            start_new_session=True,
        )
    node: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if not wait_healthy(api_url, api):
            sys.stderr.write(
                f"demo: the Control API did not come up; see {STATE / 'control-api.log'}\n"
            )
            return 1
        status_url = f"http://127.0.0.1:{status_port}"
        sys.stderr.write(
            f"demo: Control API on {api_url} (logs: {STATE / 'control-api.log'})\n"
            f"demo: node status on {status_url}; try: .venv/bin/conductord status"
            f" --local-api {status_url}\n"
            "demo: the node's JSON log lines follow; Ctrl-C stops both\n"
        )
        node = subprocess.Popen(
            [
                *conductord,
                "start",
                "--control-api-base",
                api_url,
                "--local-api",
                status_url,
                *node_args,
            ],
            env=env,
            start_new_session=True,
        )
        while not stopping and node.poll() is None:
            time.sleep(0.2)
        return 0 if stopping else (node.returncode or 0)
    finally:
        for proc in (node, api):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
