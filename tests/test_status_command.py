"""`conductord status` (SPEC §7, §8): a client of a node's local status endpoint.

The command runs in-process against a `ScriptedServer` on 127.0.0.1 serving snapshots, so
every exit code is reached deterministically; tests/test_status.py runs it as a subprocess
against a real daemon.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from conductord import cli
from conductord.client import MAX_BODY_BYTES
from conductord.commands import status
from conductord.commands.status import summary_line
from tests.support.daemon import clean_env
from tests.support.scripted_server import Reply, ScriptedServer

NODE = "mini-main"


def snapshot(state: str = "leader", **daemon: Any) -> dict[str, Any]:
    return {
        "identity": f"{NODE}@mini(primary)",
        "daemon": {
            "node_id": NODE,
            "lease_state": state,
            "current_leader_id": NODE if state == "leader" else None,
            "current_term": 7,
            "lease_expires_at": time.time() + 3,
            "last_error": None,
            **daemon,
        },
    }


def run_status(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    code = status.main(argv, env or {})
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_line() -> None:
    document = {
        "identity": "mini-main@mini(primary)",
        "daemon": {
            "lease_state": "leader",
            "current_leader_id": "mini-main",
            "current_term": 7,
            "lease_expires_at": 1_000_023,
            "last_error": None,
        },
    }
    assert summary_line(document, now=1_000_000.4) == (
        "mini-main@mini(primary) state=leader leader=mini-main term=7 lease_expires_in=23s"
        " last_error=-"
    )
    document["daemon"].update(
        lease_state="degraded",
        current_leader_id=None,
        current_term=None,
        lease_expires_at=None,
        last_error='Control API /v1/leader/acquire: connection failed: "refused"',
    )
    assert summary_line(document, now=0) == (
        "mini-main@mini(primary) state=degraded leader=- term=- lease_expires_in=-"
        ' last_error="Control API /v1/leader/acquire: connection failed: \\"refused\\""'
    )


def test_status_command_exit_codes_and_output(capsys: pytest.CaptureFixture[str]) -> None:
    with ScriptedServer() as node:
        node.default("/v1/status", Reply(200, snapshot()))
        code, out, err = run_status(capsys, ["--local-api", node.url + "/"])
        assert (code, err) == (0, "")
        assert out.startswith(f"{NODE}@mini(primary) state=leader leader={NODE} term=7 ")
        assert out.count("\n") == 1
        assert node.requests[-1].headers["accept"] == "application/json"

        # The environment variable is the default; --json prints the snapshot.
        code, out, err = run_status(capsys, ["--json"], {"BAA_CONDUCTOR_LOCAL_API": node.url})
        assert (code, err) == (0, "")
        assert json.loads(out)["daemon"]["lease_state"] == "leader"

        degraded = snapshot("degraded", last_error="Control API /v1/leader/acquire: timed out")
        node.default("/v1/status", Reply(200, degraded))
        code, out, err = run_status(capsys, ["--local-api", node.url])
        assert (code, err) == (3, "")
        assert "state=degraded" in out
        assert 'last_error="Control API /v1/leader/acquire: timed out"' in out

        # Something that is not the status endpoint answers: exit 1, one line.
        for reply in (Reply(status=404, body={"error": "not_found"}), Reply(200, {"x": 1})):
            node.default("/v1/status", reply)
            code, out, err = run_status(capsys, ["--local-api", node.url])
            assert (code, out) == (1, "")
            assert err.count("\n") == 1
        assert err == (
            f"conductord: error: {node.url}/v1/status did not answer with a conductord status"
            " snapshot\n"
        )
        node.default("/v1/status", Reply(status=404, body={"error": "not_found"}))
        code, out, err = run_status(capsys, ["--local-api", node.url])
        assert err == (
            f"conductord: error: {node.url}/v1/status answered HTTP 404;"
            " is a conductord status endpoint listening there?\n"
        )


def test_status_command_ignores_proxy_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    with ScriptedServer() as node:
        node.default("/v1/status", Reply(200, snapshot()))
        code, _, err = run_status(capsys, ["--local-api", node.url])
    assert (code, err) == (0, "")


def test_status_command_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        code, out, err = run_status(capsys, ["--local-api", url])
    assert (code, out) == (1, "")
    assert err == f"conductord: error: cannot reach {url}: Connection refused\n"


def test_status_command_times_out_after_two_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    with ScriptedServer() as fake:
        fake.default("/v1/status", Reply(hang=True))
        url = fake.url
        began = time.monotonic()
        code, out, err = run_status(capsys, ["--local-api", fake.url])
        elapsed = time.monotonic() - began
    assert (code, out) == (1, "")
    assert err == f"conductord: error: cannot reach {url}: timed out after 2000 ms\n"
    assert 1.9 < elapsed < 10


def test_status_command_has_a_whole_call_deadline_and_a_body_cap(capsys) -> None:
    # A byte every 50 ms keeps each read within its timeout, the whole answer would take 10+ s:
    # the 2 s bound is on the call (a gevent.Timeout, as `conductord` runs monkey-patched).
    with ScriptedServer() as node:
        node.default("/v1/status", Reply(200, snapshot(), trickle=True))
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "conductord", "status", "--local-api", node.url],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        elapsed = time.monotonic() - began
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == (
            f"conductord: error: cannot reach {node.url}: timed out after 2000 ms\n"
        )
        assert elapsed < 6
        # A body above the client's cap is not read whole: exit 1, one line.
        node.default("/v1/status", Reply(200, {**snapshot(), "padding": "x" * MAX_BODY_BYTES}))
        code, out, err = run_status(capsys, ["--local-api", node.url])
        url = node.url
    assert (code, out) == (1, "")
    assert err == (
        f"conductord: error: {url}/v1/status did not answer with a conductord status"
        f" snapshot (response body larger than {MAX_BODY_BYTES} bytes)\n"
    )


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, "--local-api / BAA_CONDUCTOR_LOCAL_API is not set"),
        ([], {"BAA_CONDUCTOR_LOCAL_API": "  "}, "--local-api / BAA_CONDUCTOR_LOCAL_API is not set"),
        (["--local-api", "ftp://127.0.0.1:1"], {}, "must be an http:// URL"),
        (["--local-api", "http://127.0.0.1:x"], {}, "must be http://HOST:PORT with a valid port"),
        # The same rules as the node's own --local-api: http, loopback, explicit port, no path.
        (["--local-api", "https://example.com"], {}, "must be an http:// URL"),
        ([], {"BAA_CONDUCTOR_LOCAL_API": "http://192.0.2.1:4317"}, "must use a loopback host"),
        (["--local-api", "http://127.0.0.1"], {}, "must name an explicit port"),
        (["--local-api", "http://127.0.0.1:1/elsewhere"], {}, "must not have a path"),
        (["--local-api"], {}, "expected one argument"),
        (["--bogus"], {}, "unknown option --bogus"),
    ],
)
def test_status_command_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], expected: str
) -> None:
    code, out, err = run_status(capsys, argv, env)
    assert (code, out) == (2, "")
    assert err.startswith("conductord: error: ") and expected in err
    assert err.count("\n") == 1


def test_cli_dispatches_status_to_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    # `conductord status` used to accept https:// and any host; it shares the config's rule.
    code = cli.main(["status", "--local-api", "https://example.com"], {})
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (
        "conductord: error: --local-api / BAA_CONDUCTOR_LOCAL_API must be an http:// URL such as"
        ' http://127.0.0.1:4317 (got "https://example.com")\n'
    )
    assert cli._DELEGATED["status"] == ("conductord.commands.status", "main")


def test_status_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_status(capsys, ["--help"])
    assert (code, err) == (0, "")
    assert out.startswith("usage: conductord status [--local-api URL] [--json]")


def test_the_serving_module_no_longer_carries_the_command() -> None:
    import conductord.status as serving

    for name in ("main", "fetch_status", "summary_line", "StatusFetchError"):
        assert not hasattr(serving, name), name
