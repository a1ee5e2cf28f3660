"""The README's run command (`scripts/dev.sh run` -> scripts/demo.py) works end to end."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.support.daemon import clean_env


def test_demo_brings_up_a_leader_and_stops_cleanly_on_ctrl_c(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "scripts/demo.py", "--heartbeat-interval-ms", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(CONDUCTORD_DEMO_DIR=str(tmp_path / "demo")),
    )
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if '"to_state":"leader"' in line or time.monotonic() > deadline:
                break
        assert any('"to_state":"leader"' in line for line in seen), seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert '"event":"lease.released"' in out
    assert '"event":"conductor.stopped"' in out
    assert "try: .venv/bin/conductord status --local-api http://127.0.0.1:" in err
