"""`conductord fleet` (SPEC §16) against real processes: a Control API and real nodes.

Each case runs the command as a subprocess, as an operator would, and checks its exit code,
its table or JSON, and that its errors are one line without a traceback or the token.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conductord.client import MAX_BODY_BYTES
from tests.support.control_api import ControlApiProcess
from tests.support.daemon import DaemonProcess, clean_env
from tests.support.scripted_server import Reply, ScriptedServer

TTL_SEC = "3"


@pytest.fixture
def api(tmp_path) -> Iterator[ControlApiProcess]:
    token = f"fleet-{secrets.token_hex(8)}"
    with ControlApiProcess(str(tmp_path / "control.sqlite3"), token=token).start() as server:
        yield server


@pytest.fixture
def token_file(tmp_path, api) -> str:
    path = tmp_path / "token"
    path.write_text(api.token + "\n")
    path.chmod(0o600)
    return str(path)


def node(api: ControlApiProcess, node_id: str, host: str, role: str = "primary") -> DaemonProcess:
    options = {
        "--node-id": node_id,
        "--host": host,
        "--role": role,
        "--control-api-base": api.url,
        "--heartbeat-interval-ms": "200",
        "--lease-renew-interval-ms": "200",
        "--lease-ttl-sec": TTL_SEC,
        "--request-timeout-ms": "1000",
    }
    argv = [part for option in options.items() for part in option]
    return DaemonProcess(argv, env=clean_env(BAA_SHARED_TOKEN=api.token))


def fleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conductord", "fleet", *args],
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once closed


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *secrets_: str) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("conductord: error: ")
    assert "Traceback" not in result.stderr
    for secret in secrets_:
        assert secret not in result.stderr
    return lines[0]


def test_a_live_fleet_then_no_leader(api, token_file):
    with contextlib.ExitStack() as nodes:
        first = nodes.enter_context(node(api, "mini-1-main", "mini-1"))
        first.transition_to("leader", timeout=20)  # then the standby: it cannot win the race
        second = nodes.enter_context(node(api, "mini-2-standby", "mini-2", "standby"))
        second.wait_event("conductor.started", timeout=20)

        def both_heard():
            result = fleet("--json", "--control-api-base", api.url, "--shared-token", api.token)
            document = json.loads(result.stdout or "{}")
            return len(document.get("controllers", ())) == 2

        wait_for(both_heard)
        table = fleet("--control-api-base", api.url, "--shared-token-file", token_file)
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0].startswith("fleet: leader mini-1-main on mini-1,")
        assert "term 1" in table.stdout.splitlines()[0]
        for expected in ("mini-1-main", "mini-2-standby", "primary", "standby", "granted"):
            assert expected in table.stdout
        assert api.token not in table.stdout + table.stderr

        # The token from the environment, several URLs: a dead one first, the live one used.
        dead = refused_url()
        env = {"BAA_CONTROL_API_BASE": f"{dead},{api.url}", "BAA_SHARED_TOKEN": api.token}
        result = fleet("--json", env=env)
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert document["control_api"] == api.url
        assert document["ok"] is True and document["duplicates"] == []
        leader = document["leader"]
        assert (leader["holder_id"], leader["holder_host"], leader["term"]) == (
            "mini-1-main",
            "mini-1",
            1,
        )
        assert leader["live"] is True and 0 < leader["seconds_left"] <= float(TTL_SEC)
        rows = {row["controller_id"]: row for row in document["controllers"]}
        assert set(rows) == {"mini-1-main", "mini-2-standby"}
        assert (rows["mini-1-main"]["status"], rows["mini-2-standby"]["status"]) == (
            "leader",
            "standby",
        )
        assert rows["mini-2-standby"]["role"] == "standby"
        assert rows["mini-1-main"]["seconds_since_heartbeat"] < 5
        assert rows["mini-1-main"]["instance_id"] and rows["mini-1-main"]["version"]
        assert [(e["reason"], e["term"]) for e in document["history"]] == [("granted", 1)]

        # Both stop: the leader releases on its way out and nobody takes over.
        second.send(signal.SIGTERM)
        assert second.wait_exit(timeout=15) == 0
        first.send(signal.SIGTERM)
        assert first.wait_exit(timeout=15) == 0

    none = fleet("--control-api-base", api.url, "--shared-token-file", token_file)
    assert none.returncode == 3, none.stderr
    assert none.stdout.startswith("fleet: NO LEADER")
    history = json.loads(
        fleet("--json", "--control-api-base", api.url, "--shared-token-file", token_file).stdout
    )["history"]
    assert [(e["reason"], e["term"], e["holder_id"]) for e in history][:2] == [
        ("released", 1, "mini-1-main"),
        ("granted", 1, "mini-1-main"),
    ]


def test_a_fleet_whose_lease_was_never_granted_has_no_leader(api, token_file):
    result = fleet("--control-api-base", api.url, "--shared-token-file", token_file)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("fleet: NO LEADER (the lease was never granted)")
    assert "none has sent a heartbeat" in result.stdout


def test_two_processes_with_one_node_id_are_flagged_and_exit_3(api, token_file):
    with node(api, "twin", "mini-1") as first:
        first.transition_to("leader", timeout=20)
        with node(api, "twin", "mini-2") as second:
            second.wait_event("lease.identity_conflict", timeout=20)

            def flagged():
                result = fleet(
                    "--json", "--control-api-base", api.url, "--shared-token-file", token_file
                )
                return result if json.loads(result.stdout or "{}").get("duplicates") else None

            result = wait_for(flagged)
            assert result.returncode == 3, result.stderr
            document = json.loads(result.stdout)
            assert document["leader"]["holder_id"] == "twin"  # a leader, but a duplicate id
            assert document["duplicates"] == ["twin"]
            (twin,) = document["controllers"]
            assert {i["host"] for i in twin["instances"]} == {"mini-1", "mini-2"}
            assert ("instance_conflict", "twin") in {
                (e["reason"], e["holder_id"]) for e in document["history"]
            }
            table = fleet("--control-api-base", api.url, "--shared-token-file", token_file)
            assert table.returncode == 3
            assert "DUPLICATE node id twin" in table.stdout
            assert "instance_conflict" in table.stdout


def test_unreachable_is_exit_1_in_one_line():
    dead = [refused_url(), refused_url()]
    result = fleet("--control-api-base", ",".join(dead), env={"BAA_SHARED_TOKEN": "tok-secret-1"})
    assert result.returncode == 1
    line = assert_one_line_error(result, "tok-secret-1")
    assert "no Control API answered" in line
    assert all(url in line for url in dead)


def test_a_wrong_token_is_exit_1_in_one_line(api):
    wrong = f"wrong-{secrets.token_hex(8)}"
    result = fleet("--control-api-base", api.url, "--shared-token", wrong)
    assert result.returncode == 1
    line = assert_one_line_error(result, wrong, api.token)
    assert "401" in line and "token" in line
    missing = fleet("--control-api-base", api.url)
    assert missing.returncode == 1
    assert_one_line_error(missing, api.token)


def test_settings_mistakes_are_exit_2(tmp_path):
    result = fleet()
    assert result.returncode == 2
    assert "--control-api-base / BAA_CONTROL_API_BASE is required" in assert_one_line_error(result)
    result = fleet("--control-api-base", "ftp://x", "--shared-token-file", str(tmp_path / "none"))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 2  # both problems, one line each
    assert fleet("--bogus").returncode == 2
    helped = fleet("--help")
    assert helped.returncode == 0 and "exit codes:" in helped.stdout


# A backslash, so that the JSON output escapes it: redacting the printed text alone would miss.
ECHOED = "fleet\\tok-Zq8vK3pW9xLm2-abcdef"


def pieces(text: str) -> list[str]:
    """Every piece of ECHOED of 8 characters in `text`, raw or as JSON writes it (SPEC §3)."""
    windows = {ECHOED[i : i + 8] for i in range(len(ECHOED) - 7)}
    escaped = {json.dumps(w)[1:-1] for w in windows}
    return sorted(w for w in windows | escaped if w in text)


def ok(data) -> Reply:
    return Reply(body={"ok": True, "request_id": "r", "data": data})


def test_a_server_echoing_pieces_of_the_token_gets_none_printed():
    controller = {
        "controller_id": f"n-{ECHOED[:10]}",
        "host": ECHOED[3:15],
        "role": "primary",
        "status": "leader",
        "seconds_since_heartbeat": 1.0,
        "version": ECHOED[:-1],
        "instance_id": ECHOED[2:20],
        "duplicate": True,
        "instances": [{"instance_id": ECHOED[1:], "host": f"h{ECHOED[6:16]}"}],
    }
    lease = {"holder_id": ECHOED[1:12], "holder_host": ECHOED[4:16], "term": 2}
    entry = {
        "at": 1_700_000_000,
        "term": 2,
        "holder_id": ECHOED[5:],
        "holder_host": "h",
        "previous_holder_id": ECHOED[:8],
        "reason": "granted",
    }
    with ScriptedServer() as down, ScriptedServer() as server:
        down.default("/v1/controllers", Reply(503, f"down: {ECHOED[2:14]}"))
        server.default("/v1/controllers", ok({"controllers": [controller]}))
        server.default(
            "/v1/leader",
            ok(
                {
                    "lease": {**lease, "holder_instance_id": ECHOED},
                    "is_live": True,
                    "expires_in_sec": 2.5,
                }
            ),
        )
        server.default("/v1/leader/history", ok({"entries": [entry]}))
        token = ["--shared-token", ECHOED]
        table = fleet("--control-api-base", f"{down.url},{server.url}", *token)
        document = fleet("--json", "--control-api-base", server.url, *token)
        failed = fleet("--control-api-base", down.url, *token)
    assert table.returncode == 3, table.stderr  # a duplicate id
    assert "DUPLICATE node id n-***" in table.stdout
    assert table.stdout.splitlines()[0] == "fleet: leader *** on ***, term 2, 2.5s left"
    assert document.returncode == 3, document.stderr
    shown = json.loads(document.stdout)
    assert (shown["leader"]["holder_id"], shown["controllers"][0]["host"]) == ("***", "***")
    assert failed.returncode == 1
    assert_one_line_error(failed)
    for result in (table, document, failed):
        assert pieces(result.stdout + result.stderr) == [], result.stdout + result.stderr


def test_each_get_has_a_whole_call_deadline_and_a_body_cap():
    # One URL trickles its answer a byte every 50 ms (each read is prompt, the whole would take
    # 10+ s), the other answers more than the client's cap: neither is read whole.
    slow_body = ok({"controllers": [], "padding": "p" * 200})
    big_body = ok({"controllers": [], "padding": "x" * MAX_BODY_BYTES})
    with ScriptedServer() as slow, ScriptedServer() as big:
        slow.default("/v1/controllers", Reply(slow_body.status, slow_body.body, trickle=True))
        big.default("/v1/controllers", big_body)
        began = time.monotonic()
        result = fleet("--control-api-base", f"{slow.url},{big.url}", "--request-timeout-ms", "500")
        elapsed = time.monotonic() - began
        urls = slow.url, big.url
    assert result.returncode == 1
    assert assert_one_line_error(result) == (
        f"conductord: error: no Control API answered: {urls[0]}: Control API /v1/controllers:"
        f" timed out after 500 ms; {urls[1]}: Control API /v1/controllers: response body"
        f" larger than {MAX_BODY_BYTES} bytes"
    )
    assert elapsed < 8
