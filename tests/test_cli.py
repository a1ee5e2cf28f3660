"""Tests of the command line (SPEC §3, §7).

In-process tests call `cli.main()` with an explicit env for breadth; a few subprocess tests
run `python -m conductord` with a clean environment for the real exit codes and streams. The
subprocesses start together and are collected together, so the whole file stays quick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conductord import __version__, cli
from conductord.argparsing import ArgumentParser, UsageError, fail
from conductord.config import SETTINGS, ConfigError
from conductord.lease import startup_checklist

BASE = {"BAA_CONTROL_API_BASE": "https://control.example.test"}
TOKEN = "tok-Zq8vK3pW9xLm2"  # distinctive, so a leak is easy to grep for


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str]):
    code = cli.main(argv, env)
    out, err = capsys.readouterr()
    return code, out, err


# --- argparsing -------------------------------------------------------------------------------


def test_argument_parser_raises_one_line_usage_errors() -> None:
    parser = ArgumentParser(prog="x")
    parser.add_argument("--listen")
    parser.add_argument("--json", action="store_true")
    assert parser.parse_args(["--listen", "a:1"]).listen == "a:1"
    cases = {
        ("--listen",): "argument --listen: expected one argument",
        ("--lis", "a"): "unknown option --lis",  # no prefix abbreviation
        ("--secret=abc",): "unknown option --secret",  # the value is not echoed
        ("stray",): 'unexpected argument "stray"',
        ("-h",): "unknown option -h",  # no built-in help
    }
    for argv, message in cases.items():
        with pytest.raises(UsageError) as caught:
            parser.parse_args(list(argv))
        assert str(caught.value) == message


def test_fail_writes_one_prefixed_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert fail("bad\nthing") == 2
    assert fail("worse", 1) == 1
    assert capsys.readouterr() == (
        "",
        "conductord: error: bad thing\nconductord: error: worse\n",
    )


# --- parse_start_argv -------------------------------------------------------------------------


def test_parse_start_argv_seed_case() -> None:
    env = {
        "BAA_NODE_ID": "mini-main",
        "BAA_CONDUCTOR_HOST": "mini",
        "BAA_CONDUCTOR_ROLE": "primary",
        "BAA_CONTROL_API_BASE": "https://control.example.test/",
        "BAA_SHARED_TOKEN": "replace-me",
        "BAA_RUNS_DIR": "/tmp/runs",
    }
    config, namespace = cli.parse_start_argv(["start", "--role", "standby", "--run-once"], env)
    assert namespace.run_once is True and namespace.json is False
    assert (config.role, config.node_id) == ("standby", "mini-main")
    assert config.control_api_base == "https://control.example.test"
    assert config.paths.runs_dir == "/tmp/runs"


def test_parse_start_argv_maps_every_flag() -> None:
    values = {
        "node_id": "n",
        "host": "h",
        "role": "standby",
        "control_api_base": "https://c.test",
        "local_api_base": "http://127.0.0.1:9",
        "shared_token": "t",
        "priority": "7",
        "controller_version": "v",
        "heartbeat_interval_ms": "7",
        "lease_renew_interval_ms": "7",
        "lease_ttl_sec": "7",
        "renew_failure_threshold": "7",
        "request_timeout_ms": "7",
        "runs_dir": "/r",
        "worktrees_dir": "/w",
        "logs_dir": "/l",
        "tmp_dir": "/t",
        "state_dir": "/s",
        "log_level": "error",
        "exec_command": "job --flag 'two words'",
        "exec_every_ms": "7",
        "exec_stop_grace_ms": "7",
        "scheduler": "tests.support.plugin_samples:schedule",
        "scheduler_interval_ms": "7",
        "hooks": "tests.support.plugin_samples",
    }
    argv = ["--json", "--no-preferred"]
    argv += [f"{s.flag}={values[s.name]}" for s in SETTINGS if s.name in values]
    config, namespace = cli.parse_start_argv(argv, {})
    assert namespace.json is True and namespace.run_once is False
    assert config.public_dict() | {"paths": None} == {
        "node_id": "n",
        "host": "h",
        "role": "standby",
        "control_api_base": "https://c.test",
        "control_api_bases": ["https://c.test"],
        "local_api_base": "http://127.0.0.1:9",
        "shared_token": "***",
        "shared_token_file": None,
        "priority": 7,
        "controller_version": "v",
        "preferred": False,
        "heartbeat_interval_ms": 7,
        "lease_renew_interval_ms": 7,
        "lease_ttl_sec": 7,
        "renew_failure_threshold": 7,
        "request_timeout_ms": 7,
        "exec_command": "job",
        "exec_every_ms": 7,
        "exec_stop_grace_ms": 7,
        "scheduler": "tests.support.plugin_samples:schedule",
        "scheduler_interval_ms": 7,
        "hooks": "tests.support.plugin_samples",
        "log_level": "error",
        "has_shared_token": True,
        "uses_placeholder_token": False,
        "paths": None,
    }
    assert config.exec_argv == ("job", "--flag", "two words")
    assert config.paths.as_dict() == {
        "logs_dir": "/l",
        "runs_dir": "/r",
        "state_dir": "/s",
        "tmp_dir": "/t",
        "worktrees_dir": "/w",
    }


def test_parse_start_argv_errors() -> None:
    with pytest.raises(cli.HelpRequested):
        cli.parse_start_argv(["--role", "boss", "--help"], {})  # help needs no configuration
    with pytest.raises(UsageError, match="not allowed with argument"):
        cli.parse_start_argv(["--preferred", "--no-preferred"], BASE)
    with pytest.raises(UsageError, match=r"^unknown option --run$"):
        cli.parse_start_argv(["--run"], BASE)  # no abbreviation of --run-once
    with pytest.raises(UsageError, match="--controller-version"):
        cli.parse_start_argv(["--version", "1.2"], BASE)  # the seed's flag was renamed
    with pytest.raises(ConfigError):
        cli.parse_start_argv([], {})


# --- in-process commands ----------------------------------------------------------------------


def test_config_json_flag_beats_env_and_blank_flag_is_unset(capsys) -> None:
    env = {**BASE, "BAA_CONDUCTOR_ROLE": "standby", "BAA_CONDUCTOR_HOST": "mini"}
    code, out, err = run_main(capsys, ["config", "--json", "--host", "box", "--role", ""], env)
    assert code == 0
    document = json.loads(out)
    assert (document["node_id"], document["role"], document["priority"]) == (
        "box-standby",
        "standby",
        50,
    )
    assert "warning: no shared token" in err


def test_config_text_and_warnings(capsys) -> None:
    code, out, err = run_main(capsys, ["config", "--shared-token", "replace-me"], BASE)
    assert code == 0
    assert "node_id: localhost-main\n" in out and "shared_token: ***\n" in out
    assert "local_api_base: not set\n" in out and "uses_placeholder_token: true\n" in out
    assert err.splitlines() == [
        "warning: the shared token is still the placeholder replace-me;"
        " replace it before production rollout",
        "warning: node id defaults to localhost-main: set --node-id / BAA_NODE_ID (or --host /"
        " BAA_CONDUCTOR_HOST) to a name unique in the fleet; two nodes with one id share one lease",
        "warning: no local API (--local-api / BAA_CONDUCTOR_LOCAL_API); /healthz, /readyz,"
        " /v1/status and /metrics are not served",
    ]


def test_config_errors_are_all_reported_and_stdout_stays_empty(capsys) -> None:
    code, out, err = run_main(capsys, ["config", "--role", "boss", "--priority", "-1"], {})
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "conductord: error: --role / BAA_CONDUCTOR_ROLE must be"
        ' "primary" or "standby" (got "boss")',
        "conductord: error: --control-api-base / BAA_CONTROL_API_BASE is required: the Control"
        " API base URL, e.g. https://control.example.test",
        'conductord: error: --priority / BAA_CONDUCTOR_PRIORITY must be an integer >= 0 (got "-1")',
    ]


def test_help_lists_every_flag_variable_and_default(capsys) -> None:
    for argv in (["help"], ["-h"], ["--help"], ["config", "--help"], ["--role", "boss", "-h"]):
        code, out, err = run_main(capsys, argv, {})
        assert (code, err) == (0, "")
        for setting in SETTINGS:
            assert setting.env in out
            assert all(flag in out for flag in setting.flags)
            assert f"(default: {setting.default_text})" in " ".join(out.split())
        for command in ("start", "config", "checklist", "status", "control-api", "--version"):
            assert f"conductord {command}" in out or f"  {command} " in out


def test_not_implemented_only_when_the_module_itself_is_missing(capsys) -> None:
    with pytest.raises(cli._NotImplementedYet):
        cli._load("conductord.no_such_module", "main", "thing")
    with pytest.raises(cli._NotImplementedYet):
        cli._load("conductord.lease", "no_such_function", "thing")
    # A missing dependency inside an existing module is a real failure, not "not yet".
    with pytest.raises(ModuleNotFoundError):
        cli._load("no_such_package.sub", "main", "thing")


def pieces_of_the_token(text: str) -> list[str]:
    """Every piece of TOKEN of 8 characters that occurs in `text` (SPEC §3)."""
    windows = {TOKEN[i : i + 8] for i in range(len(TOKEN) - 7)}
    return sorted(window for window in windows if window in text)


def test_no_piece_of_the_token_in_any_error_line_or_output(capsys, monkeypatch) -> None:
    env = {**BASE, "BAA_SHARED_TOKEN": TOKEN}
    # A cut token pasted where a command, an argument or a setting goes.
    code, out, err = run_main(capsys, [TOKEN[2:12]], env)
    assert (code, out) == (2, "")
    assert err.startswith('conductord: error: unknown command "***" (commands: ')
    code, out, err = run_main(capsys, ["config", "--shared-token", TOKEN, TOKEN[:-3]], {})
    assert (code, out, err) == (2, "", 'conductord: error: unexpected argument "***"\n')
    code, out, err = run_main(capsys, ["config", "--priority", f"x{TOKEN[5:]}"], env)
    assert (code, out) == (2, "")
    assert err == (
        "conductord: error: --priority / BAA_CONDUCTOR_PRIORITY must be an integer >= 0"
        ' (got "x***")\n'
    )
    code, out, err = run_main(capsys, ["config", "--node-id", f"n-{TOKEN[1:11]}"], env)
    assert code == 0 and "node_id: n-***" in out
    code, out, _ = run_main(capsys, ["config", "--json", "--host", f"h{TOKEN[:9]}"], env)
    assert code == 0 and json.loads(out)["host"] == "h***"

    # The unexpected-error line quotes the exception's text: redacted too, and made printable.
    def broken(_argv):
        raise RuntimeError(f"boom {TOKEN[4:]} \ud800")

    monkeypatch.setattr(cli, "_cmd_checklist", broken)
    code, out, err = run_main(capsys, ["checklist"], env)
    assert (code, out, err) == (
        1,
        "",
        "conductord: error: unexpected RuntimeError: boom *** \ufffd\n",
    )
    for text in (out, err):
        assert pieces_of_the_token(text) == []


# --- subprocesses -----------------------------------------------------------------------------


def spawn_all(
    cases: dict[str, list[str]], env: dict[str, str], cwd: Path
) -> dict[str, tuple[int, str, str]]:
    """Run `python -m conductord ARGS` for every case at once; (code, stdout, stderr) each."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "conductord", *argv],
            env=clean,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        results[name] = (proc.returncode, out, err)
    return results


def test_commands_as_subprocesses(tmp_path: Path) -> None:
    cases = {
        "config": ["config", "--local-api", "http://127.0.0.1:4317", "--node-id", "n1"],
        "config-json": ["config", "--json"],
        "checklist": ["checklist"],
        "checklist-json": ["checklist", "--json"],
        "help": ["help"],
        "version": ["--version"],
        "unknown-command": ["boss"],
        "unknown-option": ["start", "--bogus"],
        "missing-value": ["config", "--role"],
        "config-error": ["config", "--role", "boss"],
    }
    results = spawn_all(cases, BASE, tmp_path)
    for name, (_code, out, err) in results.items():
        assert "Traceback" not in out + err, name

    code, out, err = results["config"]
    assert code == 0 and "control_api_base: https://control.example.test\n" in out
    assert (
        err == "warning: no shared token (--shared-token-file / BAA_SHARED_TOKEN_FILE or"
        " --shared-token / BAA_SHARED_TOKEN); authenticated Control API requests will fail\n"
    )
    code, out, err = results["config-json"]
    assert code == 0 and json.loads(out)["paths"]["runs_dir"] is None
    assert err.count("warning: ") == 3 and "warning: node id defaults to localhost-main" in err
    code, out, err = results["checklist"]
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "1. register-controller: " + startup_checklist()[0]["description"]
    assert len(out.splitlines()) == 6
    code, out, err = results["checklist-json"]
    assert (code, err, json.loads(out)) == (0, "", startup_checklist())
    code, out, err = results["help"]
    assert code == 0 and "BAA_CONDUCTOR_REQUEST_TIMEOUT_MS" in out and err == ""
    assert results["version"] == (0, f"conductord {__version__}\n", "")

    errors = {
        "unknown-command": 'conductord: error: unknown command "boss" (commands: start, config,'
        " checklist, diagnose, help, status, fleet, control-api)\n",
        "unknown-option": "conductord: error: unknown option --bogus\n",
        "missing-value": "conductord: error: argument --role: expected one argument\n",
        "config-error": 'conductord: error: --role / BAA_CONDUCTOR_ROLE must be "primary" or'
        ' "standby" (got "boss")\n',
    }
    for name, expected in errors.items():
        assert results[name] == (2, "", expected), name


def test_token_never_appears_in_any_output(tmp_path: Path) -> None:
    token_path = tmp_path / "token"
    token_path.write_text(TOKEN + "\n")
    token_path.chmod(0o644)  # draws the file warning, which names the path only
    file_flag = ["--shared-token-file", str(token_path)]
    env = {**BASE, "BAA_SHARED_TOKEN": TOKEN}
    cases = {
        "help": ["help"],
        "version": ["--version"],
        "checklist": ["checklist", "--json"],
        "config-flag": ["config", "--shared-token", TOKEN, "--json"],
        "config-file": ["config", *file_flag, "--control-api-base", "http://x"],
        "config-env-error": ["config", "--lease-ttl-sec", "1"],  # token from env, timing error
        "start-error": ["start", "--role", "boss", "--priority", TOKEN],
        "bad-token": ["config", "--shared-token", f"{TOKEN} {TOKEN}"],
        "typo": ["start", f"--shared-tokn={TOKEN}"],
        "stray": ["config", "--shared-token", TOKEN, TOKEN],
        "both": ["config", "--shared-token", TOKEN, *file_flag],
    }
    results = spawn_all(cases, env, tmp_path)
    for name, (_code, out, err) in results.items():
        assert TOKEN not in out + err, name
        assert "Traceback" not in out + err, name
    # The commands did run and say what they had to, so the check above is not vacuous.
    assert json.loads(results["config-flag"][1])["shared_token"] == "***"
    code, _, err = results["config-file"]
    assert code == 0 and "accessible by group or others (mode 0644)" in err
    assert "plain http://" in err
    assert results["config-env-error"][0] == 2
    assert 'got "***"' in results["start-error"][2]
    assert results["bad-token"][0] == 2 and "printable ASCII" in results["bad-token"][2]
    assert results["typo"][2] == "conductord: error: unknown option --shared-tokn\n"
    assert results["stray"] == (2, "", 'conductord: error: unexpected argument "***"\n')
    assert results["both"][0] == 2 and "mutually exclusive" in results["both"][2]


def test_lists_exec_and_timing_errors_as_subprocesses(tmp_path: Path) -> None:
    many = "http://127.0.0.1:1,http://127.0.0.1:2/"
    exec_rule = ["--exec", "job", "--lease-ttl-sec", "2", "--request-timeout-ms", "500"]
    cases = {
        "list-json": ["config", "--json", "--control-api-base", many],
        "list-text": ["config", "--control-api-base", many],
        "duplicate-config": ["config", "--control-api-base", "http://a.test,http://A.test/"],
        "duplicate-start": ["start", "--control-api-base", "http://a.test,http://A.test/"],
        "exec-config": ["config", *exec_rule],
        "exec-start": ["start", *exec_rule],
        "exec-unsplittable": ["start", "--exec", f"job --token '{TOKEN}"],
        "exec-fits": ["config", *exec_rule, "--exec-stop-grace-ms", "750"],
    }
    results = spawn_all(cases, BASE, tmp_path)
    code, out, err = results["list-json"]
    document = json.loads(out)
    assert code == 0, err
    assert document["control_api_base"] == "http://127.0.0.1:1,http://127.0.0.1:2"
    assert document["control_api_bases"] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    code, out, _ = results["list-text"]
    assert "control_api_base: http://127.0.0.1:1,http://127.0.0.1:2\n" in out
    duplicate = (
        "conductord: error: --control-api-base / BAA_CONTROL_API_BASE lists"
        ' "http://A.test" twice (entries 1 and 2); give each Control API URL once\n'
    )
    exec_line = (
        "conductord: error: --exec-stop-grace-ms / BAA_CONDUCTOR_EXEC_STOP_GRACE_MS (1000 ms)"
        " + 250 ms must fit in the step-down margin (1000 ms: one --lease-renew-interval-ms /"
        " BAA_CONDUCTOR_LEASE_RENEW_INTERVAL_MS, at least 1 s, at most half of --lease-ttl-sec"
        " / BAA_CONDUCTOR_LEASE_TTL_SEC) when --exec / BAA_CONDUCTOR_EXEC is set, so that a"
        " child stopped at the local lease deadline is gone before the lease can pass to"
        " another node\n"
    )
    for command in ("config", "start"):
        assert results[f"duplicate-{command}"] == (2, "", duplicate), command
        assert results[f"exec-{command}"] == (2, "", exec_line), command
    code, out, err = results["exec-unsplittable"]
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "cannot be split into a command line" in err and TOKEN not in err
    code, out, err = results["exec-fits"]
    assert code == 0 and "exec_stop_grace_ms: 750\n" in out and "exec_command: job\n" in out
