"""bench/chaos.py, the nemesis harness of SPEC §15, tested in layers.

- Its checks (bench/chaos_check.py) on hand-made poll records: what is and is not proof of two
  schedulers, stale child writes, time without a leader.
- Its fault-injecting proxy (bench/chaos_proxy.py) against a real HTTP server on loopback.
- Its clock fault: a process started under libfaketime the way the Control API is sees its
  wall clock step and its monotonic clocks stand still.
- The whole harness, end to end, as CI runs it: one short seed against a real fleet with
  `--exec` children (the default) and every fault kind, clock steps included, must find nothing
  by any of the three checks while the children demonstrably ran and wrote.
- Planted bugs, from the test side only, must be found within a short seed and exit 1: a node
  that ignores its lease deadline (a `sitecustomize` on the nodes' PYTHONPATH), found by the
  status polls, whose printed schedule `--replay` turns into the same failure; and an `--exec`
  guard that never kills (a copy of the package first on the nodes' PYTHONPATH: the guard runs
  as `python -I -S`, out of reach of any sitecustomize), found by the children alone. A
  nemesis that cannot find a planted bug proves nothing.

Every run checks that no process of the harness outlives it (each names the run's temporary
directory, under this test's TMPDIR, on its command line).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shlex
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import chaos  # noqa: E402
import chaos_check  # noqa: E402
from chaos_proxy import FaultProxy  # noqa: E402

# Every fault kind once, with --exec children (the default): the kill, the pause, the black
# hole, the resets and the latency aimed at the leader, and a clock step of +14.6 s.
CI_SEED = 169

DEADLINE_IGNORED = '''\
"""Planted by tests/test_chaos.py: this node ignores its local lease deadline."""
from conductord import lease


def scheduler_enabled(self, now):
    return not self.stopping and self.state is lease.LeaseState.LEADER


def tick(self, now):
    return None


lease.LeaseMachine.scheduler_enabled = scheduler_enabled
lease.LeaseMachine.tick = tick
'''

NEVER_KILL = '''

def kill_group(pgid, signum):
    """Planted by tests/test_chaos.py: the guard never signals the command's group."""

'''


# -- the checks ---------------------------------------------------------------------------------


def record(
    key: str, samples: list[tuple[float, bool | None, int | None]]
) -> chaos_check.PollRecord:
    """Samples (sent, enabled or None for a failed poll, term); each answer takes 2 ms."""
    rec = chaos_check.PollRecord(key)
    for sent, enabled, term in samples:
        rec.add(sent, sent + 0.002, enabled is not None, bool(enabled), term)
    rec.finish()
    return rec


def test_a_clean_handover_is_no_proof() -> None:
    old = record("a#1", [(0.00, True, 1), (0.01, True, 1), (0.02, False, 1), (0.03, False, 2)])
    new = record("b#2", [(0.025, False, 1), (0.035, True, 2), (0.045, True, 2)])
    assert chaos_check.proven_overlaps([old, new]) == []


def test_two_yes_answers_in_one_round_are_no_proof() -> None:
    # Both say "enabled" once, at almost the same moment: the round itself takes time, so this
    # could be a handover; without a span of one node around the other's answer, no proof.
    a = record("a#1", [(0.00, True, 1), (0.01, False, 1)])
    b = record("b#2", [(0.001, True, 2), (0.011, True, 2)])
    assert chaos_check.proven_overlaps([a, b]) == []


def test_an_answer_inside_a_same_term_span_is_a_proof_even_across_failed_polls() -> None:
    # a answers enabled with term 1, then cannot be reached (paused), then enabled with term 1
    # again: b's enabled answer in between is a proven overlap.
    a = record("a#1", [(0.00, True, 1), (0.5, None, None), (1.0, None, None), (2.0, True, 1)])
    b = record("b#2", [(1.5, True, 2), (1.6, False, 2)])
    proofs = chaos_check.proven_overlaps([a, b])
    assert [(p.key, p.term, p.other, p.other_term) for p in proofs] == [("a#1", 1, "b#2", 2)]
    [episode] = chaos_check.episodes(proofs)
    assert episode["polls"] == 1 and episode["seconds"] == pytest.approx(0.002)


def test_a_term_change_ends_a_span() -> None:
    a = record("a#1", [(0.00, True, 1), (1.0, True, 3)])
    b = record("b#2", [(0.5, True, 2), (0.6, False, 2)])
    assert chaos_check.proven_overlaps([a, b]) == []


def test_child_log_counts_overlaps_and_lower_terms_after_higher() -> None:
    lines = [
        {"event": "start", "node": "a", "term": 1},
        {"event": "tick", "node": "a", "term": 1},
        {"event": "overlap", "node": "b", "term": 2},
        {"event": "tick", "node": "a", "term": 1},  # stale: term 2 exists already
        {"event": "exit", "node": "a", "term": 1},  # not a write under the lock
        {"event": "start", "node": "b", "term": 2},
        {"event": "tick", "node": "b", "term": 2},
    ]
    text = [json.dumps({**line, "t": 100.0, "pid": 7, "pgid": 7}) for line in lines] + ["junk"]
    found = chaos_check.child_log(text, t0_wall=100.0)
    assert (found.flock_overlaps, found.stale_writes, found.runs) == (1, 1, 2)
    assert found.bad_lines == 1 and found.max_term == 2
    assert [e["finding"] for e in found.evidence] == ["flock_overlap", "stale_write"]


def start_child(tmp_path: Path, node: str, term: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CONDUCTORD_NODE_ID": node, "CONDUCTORD_TERM": str(term)}
    child = [sys.executable, str(BENCH / "chaos_child.py"), "--tick-ms", "10"]
    child += ["--lock", str(tmp_path / "lock"), "--log", str(tmp_path / "log")]
    return subprocess.Popen(child, env=env, start_new_session=True)


def wait_for_line(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"no {text!r} in {path}")


def test_the_flock_child_reports_a_second_singleton_and_its_stale_writes(tmp_path: Path) -> None:
    old = start_child(tmp_path, "a", 1)
    try:
        wait_for_line(tmp_path / "log", '"event":"tick"')
        new = start_child(tmp_path, "b", 2)  # a new leader's child while the old one still runs
        try:
            wait_for_line(tmp_path / "log", '"event":"overlap"')
            time.sleep(0.05)  # the old child writes on: stale writes
            old.terminate()
            assert old.wait(timeout=10) == 0
            wait_for_line(tmp_path / "log", '"node":"b","term":2,')
            time.sleep(0.05)
        finally:
            new.terminate()
            assert new.wait(timeout=10) == 0
    finally:
        old.kill()
        old.wait(timeout=10)
    lines = (tmp_path / "log").read_text().splitlines()
    found = chaos_check.child_log(lines, t0_wall=0.0)
    assert found.flock_overlaps == 1 and found.stale_writes >= 1 and found.runs == 2
    assert found.bad_lines == 0 and found.max_term == 2
    assert [json.loads(line)["event"] for line in lines].count("exit") == 2


def test_exec_mode_hands_the_child_its_command_line_and_a_grace_inside_the_margin(
    tmp_path: Path,
) -> None:
    args = chaos.parse_args(["--children", "exec"])
    assert chaos.exec_grace_ms(args) == 500  # + 250 ms <= the 1 s margin of TTL 2 s, renew 250
    short = chaos.parse_args(
        ["--children", "exec", "--ttl-sec", "1", "--request-timeout-ms", "500"]
    )
    assert chaos.exec_grace_ms(short) == 250  # margin 0.5 s: half the TTL
    lock, log = str(tmp_path / "with space" / "lock"), str(tmp_path / "log")
    command = shlex.split(chaos.exec_command(lock, log))  # as conductord splits --exec
    assert command == [sys.executable, str(BENCH / "chaos_child.py"), "--lock", lock, "--log", log]


def test_leaderless_time_counts_from_the_first_leader() -> None:
    a = record("a#1", [(0.0, False, None), (1.0, True, 1), (2.0, None, None)])
    b = record("b#2", [(0.0, False, None), (3.0, True, 2), (4.0, True, 2)])
    total, longest, stretches = chaos_check.leaderless([a, b], 0.0, 5.0)
    assert stretches == 1
    assert total == pytest.approx(1.0, abs=0.01) and longest == pytest.approx(total)


def test_a_leader_enabled_from_before_the_start_to_the_end_leaves_no_leaderless_time() -> None:
    # The leader was elected before the nemesis began and never changed: no change point after
    # `start` at all, which once counted the whole run as one leaderless stretch.
    a = record("a#1", [(-1.0, True, 1), *((0.5 * i, True, 1) for i in range(1, 10))])
    b = record("b#2", [(-1.0, False, None), *((0.5 * i, False, 1) for i in range(1, 10))])
    assert chaos_check.leaderless([a, b], 0.0, 5.0) == (0.0, 0.0, 0)


def test_leaderless_time_counts_the_first_failover_when_a_leader_held_at_the_start() -> None:
    a = record("a#1", [(-1.0, True, 1), (1.0, True, 1), (2.0, None, None), (3.0, None, None)])
    b = record("b#2", [(-1.0, False, None), (2.5, False, 1), (3.5, True, 2), (4.0, True, 2)])
    total, longest, stretches = chaos_check.leaderless([a, b], 0.0, 5.0)
    assert stretches == 1
    assert total == pytest.approx(1.5, abs=0.01) and longest == pytest.approx(total)


def test_the_nemesis_draw_depends_on_the_seed_alone() -> None:
    def plan(seed: int) -> list[dict[str, Any]]:
        args = chaos.parse_args(
            ["--seed", str(seed), "--faults", "14", "--kinds", "node_kill,api_kill"]
        )
        return [fault.as_dict() for fault in chaos.plan(args)]

    assert plan(5) == plan(5) != plan(6)
    kinds = [f["kind"] for f in plan(5)]
    assert set(kinds[:2]) == {"node_kill", "api_kill"}  # a deck: every kind once per round
    with pytest.raises(SystemExit):
        chaos.parse_args(["--kinds", "node_kill,meteor"])


# -- the proxy ----------------------------------------------------------------------------------


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        body = b"hello"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # a reset by the proxy is the point of some tests
            super().handle()


@pytest.fixture
def upstream() -> Iterator[socketserver.ThreadingTCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    server.hits = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def get(port: int, timeout: float = 2.0) -> tuple[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    began = time.monotonic()
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode(), time.monotonic() - began
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, time.monotonic() - began
    finally:
        conn.close()


def test_proxy_forwards_delays_black_holes_and_resets(upstream) -> None:
    proxy = FaultProxy("t", upstream.server_address[1], seed=1)
    try:
        assert get(proxy.port)[0] == "hello"

        proxy.set_latency(0.2)
        answer, took = get(proxy.port)
        assert answer == "hello" and 0.38 <= took < 1.5  # 0.2 s each way
        proxy.heal()

        proxy.set_blackhole(True)
        hits = upstream.hits
        assert get(proxy.port, timeout=0.4)[0] == "TimeoutError"
        assert upstream.hits == hits  # nothing reached the server
        proxy.heal()
        assert get(proxy.port)[0] == "hello"

        proxy.set_reset(True)
        outcomes = {get(proxy.port)[0] for _ in range(6)}
        assert outcomes <= {"ConnectionResetError", "RemoteDisconnected", "BrokenPipeError"}
        proxy.heal()
        assert get(proxy.port)[0] == "hello"
        assert proxy.resets_total >= 6
    finally:
        proxy.close()


def test_proxy_resets_an_open_keep_alive_connection_and_follows_a_new_upstream(upstream) -> None:
    proxy = FaultProxy("t", 1, seed=2)  # nothing listens on port 1: refused, seen as a reset
    try:
        assert get(proxy.port)[0] in {"ConnectionResetError", "RemoteDisconnected"}
        proxy.set_upstream(upstream.server_address[1])
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=2)
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"hello"
        proxy.set_reset(True)
        time.sleep(0.1)
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
            conn.request("GET", "/")
            conn.getresponse().read()
        conn.close()
    finally:
        proxy.close()


# -- the clock fault ----------------------------------------------------------------------------


def test_faketime_steps_the_wall_clock_alone(tmp_path: Path) -> None:
    lib = chaos.faketime_lib()
    if lib is None:
        message = "libfaketime is not installed (apt-get install faketime)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    probe = chaos.probe_faketime(lib, str(tmp_path), step_s=60.0)
    assert probe["ok"], probe
    assert probe["wall_moved_s"] == pytest.approx(60.0, abs=2.0)
    assert abs(probe["monotonic_moved_s"]) < 2.0 and abs(probe["boottime_moved_s"]) < 2.0


# -- the harness end to end ---------------------------------------------------------------------


def leftover_processes(tmp_path: Path) -> list[int]:
    marker = str(tmp_path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def run_chaos(args: list[str], tmp_path: Path, timeout: float) -> tuple[int, dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAA_")}
    env["TMPDIR"] = str(tmp_path)
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / "chaos.py"), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        for pid in leftover_processes(tmp_path):  # the harness was killed: its fleet was not
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise
    lines = done.stdout.splitlines()
    assert len(lines) == 1, (
        f"stdout must be one JSON line: {done.stdout[:1000]!r} {done.stderr[-2000:]}"
    )
    assert not leftover_processes(tmp_path), "a process of the harness outlived it"
    return done.returncode, json.loads(lines[0]), done.stderr



def require_faketime() -> None:
    if chaos.faketime_lib() is None:
        message = "libfaketime is not installed (apt-get install faketime): no clock steps"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.e2e
def test_a_short_seed_with_every_fault_kind_and_exec_children_finds_nothing(
    tmp_path: Path,
) -> None:
    require_faketime()
    args = ["--seed", str(CI_SEED), "--faults", str(len(chaos.KINDS)), "--nodes", "3"]
    code, result, stderr = run_chaos([*args, "--max-seconds", "90"], tmp_path, timeout=150)
    assert code == 0, (result.get("evidence"), stderr[-3000:])
    assert result["bench"] == "chaos"
    assert (result["seed"], result["nodes"], result["store"], result["ttl_sec"]) == (
        CI_SEED,
        3,
        "sqlite",
        2,
    )
    assert result["children"] == "exec"  # the default, as in the long runs
    assert result["kinds"] == list(chaos.KINDS)
    assert result["faults_by_kind"] == dict.fromkeys(chaos.KINDS, 1), result["faults_by_kind"]
    assert result["faults_injected"] == len(chaos.KINDS)
    assert result["two_scheduler_polls"] == result["overlap_episodes"] == 0
    assert result["flock_overlaps"] == result["stale_writes"] == 0
    assert result["violations"] == 0 and result["pass"] is True
    assert "schedule" not in result
    # The children were measured for real: each leader's command took the fleet's lock and
    # wrote under it, across handovers (the kill and the pause of the leader at least).
    assert result["child_runs"] >= 2, result["child_runs"]
    assert result["checked_children"] is True
    assert result["child_log_lines"] > result["child_runs"]
    # The faults happened, and the fleet was watched throughout.
    assert result["node_restarts"] == 1 and result["incarnations"] == 3 + 1
    assert result["api_starts"] == 2
    assert result["faketime"]["ok"] is True
    assert result["api_clock_offset_s"] > 2 * result["ttl_sec"]  # a step past any live lease
    assert result["proxy"]["resets"] >= 1 and result["proxy"]["connections"] > 5
    assert result["polls"] > 1000 and result["enabled_answers"] > 100
    assert 0 <= result["longest_no_leader_s"] <= result["no_leader_s"]
    # The seed aims its kill and its pause at the leader: both failovers are measured.
    failover = result["failover_s"]
    assert failover["count"] == 2 and 0 < failover["median"] <= failover["max"], failover
    assert result["leader_faults_without_failover"] == 0 and result["unsettled_faults"] == 0
    assert result["machine"]["nproc"] >= 1


@pytest.mark.e2e
def test_a_node_that_ignores_its_deadline_is_found_and_its_schedule_replays(
    tmp_path: Path,
) -> None:
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(DEADLINE_IGNORED)
    common = ["--nodes", "3", "--children", "none", "--node-pythonpath", str(plant)]
    common += ["--request-timeout-ms", "1500"]
    # Seed 29 draws a black hole of 2.7 s on the leader's path. The server lets the lease
    # expire 2 s after the last renewal got through and grants another node. The planted node
    # stays enabled until its renewals fail twice (3.5 s in with 1.5 s timeouts) or the hole
    # lifts and a late renewal meets the new holder: two schedulers for ~0.7 s, caught every
    # time. (With 1 s timeouts the overlap is only 0.2-0.45 s: missed now and then under load.)
    args = ["--seed", "29", "--faults", "1", "--kinds", "net_drop", *common]
    code, result, stderr = run_chaos([*args, "--max-seconds", "60"], tmp_path, timeout=120)
    assert code == 1, stderr[-3000:]
    assert result["violations"] > 0 and result["pass"] is False
    assert result["two_scheduler_polls"] > 0 and result["overlap_episodes"] > 0
    episode = result["evidence"]["overlap_episodes"][0]
    assert episode["node"] != episode["other"] and episode["term"] != episode["other_term"]
    [fault] = result["schedule"]
    assert result["faults_injected"] == 1
    assert (fault["kind"], fault["target"], fault["hit_leader"]) == ("net_drop", "leader", True)
    assert "--seed 29" in result["reproduce"] and "VIOLATIONS" in stderr
    assert json.dumps(fault, separators=(",", ":")) in stderr

    saved = tmp_path / "failing.json"
    saved.write_text(json.dumps(result) + "\n")
    code, replayed, stderr = run_chaos(
        ["--replay", str(saved), "--max-seconds", "60", *common], tmp_path, timeout=120
    )
    assert code == 1, stderr[-3000:]
    assert replayed["replayed"] is True and replayed["two_scheduler_polls"] > 0
    assert replayed["kinds"] == ["net_drop"] and replayed["faults_injected"] == 1
    [again] = replayed["schedule"]
    assert (again["params"], again["pause_s"]) == (fault["params"], fault["pause_s"])
    assert again["hit_leader"] is True


def plant_a_guard_that_never_kills(root: Path) -> Path:
    """A copy of the conductord package whose --exec guard never signals the command's group.

    The guard runs as `python -I -S` (no site, no PYTHONPATH): no sitecustomize reaches it,
    but the daemon starts the guard file next to its own package, so a daemon imported from
    this copy (first on the nodes' PYTHONPATH) runs the planted guard.
    """
    shutil.copytree(
        REPO / "conductord", root / "conductord", ignore=shutil.ignore_patterns("__pycache__")
    )
    guard = root / "conductord" / "exec_guard.py"
    source = guard.read_text()
    main = '\nif __name__ == "__main__":'
    assert source.count(main) == 1 and "\ndef kill_group(pgid, signum):" in source, (
        "exec_guard.py changed shape: update the planted bug"
    )
    guard.write_text(source.replace(main, NEVER_KILL + main))
    return root


@pytest.mark.e2e
def test_a_guard_that_never_kills_is_found_by_the_children_alone(tmp_path: Path) -> None:
    plant = plant_a_guard_that_never_kills(tmp_path / "plant")
    # Seed 1 pauses the leader past the TTL (the guard's deadline passes: no kill; the woken
    # daemon's own fallback kills the group a second later), then kills the new leader with
    # kill -9 (the guard reads EOF: no kill; the command outlives its daemon). Each time the
    # next leader's command finds the lock held: one flock overlap per fault, every time.
    args = ["--seed", "1", "--faults", "2", "--nodes", "3", "--kinds", "node_kill,node_pause"]
    args += ["--node-pythonpath", str(plant), "--max-seconds", "60"]
    code, result, stderr = run_chaos(args, tmp_path, timeout=120)
    assert code == 1, stderr[-3000:]
    assert result["children"] == "exec" and result["pass"] is False
    assert result["flock_overlaps"] == 2, (result["flock_overlaps"], result["evidence"])
    assert result["stale_writes"] > 0  # the orphans write on under a lower term
    # The daemons are correct: the status polls see nothing; only the children do.
    assert result["two_scheduler_polls"] == 0
    findings = {entry["finding"] for entry in result["evidence"]["children"]}
    assert findings == {"flock_overlap", "stale_write"}
    assert [entry["kind"] for entry in result["schedule"]] == ["node_pause", "node_kill"]
    assert all(entry["hit_leader"] for entry in result["schedule"])
