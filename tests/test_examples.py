"""examples/: the embedding example runs against the real Control API (docs/embedding.md).

Two copies of examples/embedded_scheduler.py, as real processes: only the leader runs scheduler
passes, each with its term; SIGTERM hands over to the other, whose passes carry a higher term.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.support.control_api import ControlApiProcess
from tests.support.daemon import DaemonProcess, clean_env

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "embedded_scheduler.py"
TIMING = {
    "BAA_CONDUCTOR_LEASE_TTL_SEC": "2",
    "BAA_CONDUCTOR_LEASE_RENEW_INTERVAL_MS": "250",
    "BAA_CONDUCTOR_HEARTBEAT_INTERVAL_MS": "500",
    "BAA_CONDUCTOR_REQUEST_TIMEOUT_MS": "1000",
}


def example(api: ControlApiProcess, node: str) -> DaemonProcess:
    env = clean_env(BAA_SHARED_TOKEN=api.token or "", **TIMING)
    args = [api.url, "--node-id", node, "--interval-ms", "200"]
    return DaemonProcess(args, env=env, program=[sys.executable, str(EXAMPLE)])


def test_the_embedded_scheduler_runs_on_the_leader_only_and_hands_over(
    control_api: ControlApiProcess,
) -> None:
    a = example(control_api, "a")
    b = None
    try:
        first = a.wait_event("example.pass", timeout=15)
        a.wait_event("example.pass", lambda e: e["run"] == 2)
        term_a = first["term"]
        assert first["controller_id"] == "a"
        assert [e["state"] for e in a.named("example.state")] == ["leader"]

        b = example(control_api, "b")
        assert b.wait_event("example.started", timeout=15)["lease_state"] == "standby"
        a.send(signal.SIGTERM)
        assert a.wait_exit(timeout=10) == 0
        assert a.named("lease.released")[0]["released"] is True
        assert [e["state"] for e in a.named("example.state")] == ["leader", "standby"]

        taken = b.wait_event("example.pass", timeout=10)
        assert taken["term"] > term_a and taken["controller_id"] == "b"
        assert {e["term"] for e in a.named("example.pass")} == {term_a}
        assert {e["term"] for e in b.named("example.pass")} == {taken["term"]}
        assert a.non_json_lines == [] and b.non_json_lines == []
        b.send(signal.SIGTERM)
        assert b.wait_exit(timeout=10) == 0
    finally:
        a.close()
        if b is not None:
            b.close()


def test_the_example_reports_a_configuration_error_in_one_line(
    control_api: ControlApiProcess,
) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), control_api.url, "--interval-ms", "0"],
        env=clean_env(BAA_SHARED_TOKEN=control_api.token or ""),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("embedded_scheduler: error: --scheduler-interval-ms")
