"""Tests of the ops/ files (SPEC §10): launchd plist, supervisord sections, log shipping.

Static checks: the plist parses with plistlib, the supervisord file with configparser and with
supervisor's own `ServerOptions` (which builds the `ProcessConfig`s supervisord would run), the
Vector config with tomllib; the shipped environments resolve to a valid conductord config
without warnings; the three files agree on where the JSON log lives.

Live check: a real supervisord (from this venv) runs the shipped sections with the
placeholders substituted as `localize()` shows (the same list ops/supervisord/README.md gives
operators), against a reference Control API the test starts on a free loopback port. The
node becomes leader, `supervisorctl stop` ends it with exit 0 and a released lease, and a
`kill -9` makes supervisord restart it into the same lease. supervisord is shut down by a
fixture finalizer whatever happens.

Vector and Fluent Bit are not installable here (apt knows neither), so the shipper config is
checked for structure, and its filter condition is evaluated against the real log lines.
"""

from __future__ import annotations

import configparser
import fnmatch
import getpass
import json
import os
import plistlib
import re
import signal
import subprocess
import sys
import time
import tomllib
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from supervisor.datatypes import RestartUnconditionally, dict_of_key_value_pairs
from supervisor.options import ServerOptions
from supervisor.xmlrpc import SupervisorTransport

from conductord.config import SETTINGS, config_warnings, default_of, resolve_config
from tests.support.control_api import ControlApiProcess, clean_env
from tests.support.wait import wait_until

OPS = Path(__file__).resolve().parent.parent / "ops"
PLIST = OPS / "launchd" / "com.conductord.node.plist"
SUPERVISOR_CONF = OPS / "supervisord" / "conductord.conf"
VECTOR_TOML = OPS / "logship" / "vector.toml"
LOGSHIP_README = OPS / "logship" / "README.md"

BIN_DIR = Path(sys.executable).parent
SUPERVISORD = BIN_DIR / "supervisord"
SUPERVISORCTL = BIN_DIR / "supervisorctl"

# Placeholders of the shipped files.
PLACEHOLDER_BIN = "/usr/local/bin/conductord"
PLACEHOLDER_TOKEN_FILE = "/etc/conductord/token"
PLACEHOLDER_LOG_DIR = "/var/log/conductord"
PLACEHOLDER_LIB_DIR = "/var/lib/conductord"
PLACEHOLDER_LISTEN = "127.0.0.1:8787"

NODE = "conductord"
CONTROL_API = "conductord-control-api"

# Settings an operator must decide on; every shipped environment sets them.
NEEDED_SETTINGS = {
    "BAA_NODE_ID",
    "BAA_CONDUCTOR_HOST",
    "BAA_CONDUCTOR_ROLE",
    "BAA_CONTROL_API_BASE",
    "BAA_SHARED_TOKEN_FILE",
    "BAA_CONDUCTOR_LOCAL_API",
    "BAA_CONDUCTOR_HEARTBEAT_INTERVAL_MS",
    "BAA_CONDUCTOR_LEASE_RENEW_INTERVAL_MS",
    "BAA_CONDUCTOR_LEASE_TTL_SEC",
    "BAA_CONDUCTOR_RENEW_FAILURE_THRESHOLD",
    "BAA_CONDUCTOR_REQUEST_TIMEOUT_MS",
    "BAA_RUNS_DIR",
    "BAA_WORKTREES_DIR",
    "BAA_STATE_DIR",
    "BAA_TMP_DIR",
    "BAA_LOGS_DIR",
    "BAA_LOG_LEVEL",
}
KNOWN_VARIABLES = {setting.env for setting in SETTINGS}

# Short intervals for the live test. The TTL stays long enough that a kill -9 restart
# resumes the lease well within it even on a loaded machine.
REQUEST_TIMEOUT_MS = 1000
LIVE_ENV = {
    "BAA_CONDUCTOR_LOCAL_API": "",  # blank counts as unset: no port to collide on
    "BAA_CONDUCTOR_HEARTBEAT_INTERVAL_MS": "300",
    "BAA_CONDUCTOR_LEASE_RENEW_INTERVAL_MS": "300",
    "BAA_CONDUCTOR_LEASE_TTL_SEC": "20",
    "BAA_CONDUCTOR_REQUEST_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS),
}


def stop_budget_s(request_timeout_ms: str | int, exec_stop_grace_ms: str | int = 0) -> float:
    """SPEC §5: SIGTERM to exit within request timeout + 1 s (+ the exec stop grace, §14)."""
    return int(request_timeout_ms) / 1000 + 1 + int(exec_stop_grace_ms) / 1000


# What the ops files must cover once an operator adds --exec with its default grace.
DEFAULT_EXEC_GRACE_MS = default_of("exec_stop_grace_ms")


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


# -- the shipped files -----------------------------------------------------------------------


def load_plist() -> dict[str, Any]:
    with PLIST.open("rb") as fh:
        return plistlib.load(fh)


def read_ini(text: str) -> configparser.RawConfigParser:
    # supervisord's own reader is RawConfigParser-based: `%(...)s` is its expansion, not ours.
    parser = configparser.RawConfigParser(inline_comment_prefixes=None)
    parser.read_string(text)
    return parser


def shipped_fields() -> list[tuple[str, set[str], str]]:
    """(dotted field, allowed types, source) rows of the README's "Shipped fields" table."""
    text = LOGSHIP_README.read_text()
    section = text.split("## Shipped fields", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        match = re.match(r"\|\s*`([^`]+)`\s*\|([^|]+)\|([^|]+)\|", line)
        if match:
            name, types, source = match.groups()
            rows.append((name, {t.strip() for t in types.split(" or ")}, source.strip()))
    return rows


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def lookup(document: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    value: Any = document
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def vector_filter_event(config: dict[str, Any]) -> tuple[str, str]:
    """(filter transform name, event name) of the one `.event == "..."` filter."""
    filters = [
        (name, t) for name, t in config.get("transforms", {}).items() if t["type"] == "filter"
    ]
    assert len(filters) == 1, filters
    name, transform = filters[0]
    match = re.fullmatch(r'\s*\.event\s*==\s*"([^"]+)"\s*', transform["condition"])
    assert match, f"unexpected filter condition {transform['condition']!r}"
    return name, match.group(1)


# -- static tests ----------------------------------------------------------------------------


def test_plist_parses_and_has_the_launchd_keys():
    plist = load_plist()
    env = plist["EnvironmentVariables"]

    assert plist["Label"] == "com.conductord.node"
    assert plist["ProgramArguments"] == [PLACEHOLDER_BIN, "start"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] is True
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] >= 1
    assert plist["ExitTimeOut"] > stop_budget_s(
        env["BAA_CONDUCTOR_REQUEST_TIMEOUT_MS"], DEFAULT_EXEC_GRACE_MS
    )
    assert set(env) >= NEEDED_SETTINGS, NEEDED_SETTINGS - set(env)
    assert set(env) <= KNOWN_VARIABLES, set(env) - KNOWN_VARIABLES
    assert "BAA_SHARED_TOKEN" not in env  # the token comes from BAA_SHARED_TOKEN_FILE only
    assert all(isinstance(value, str) for value in env.values())
    logs_dir = Path(env["BAA_LOGS_DIR"])
    out, err = Path(plist["StandardOutPath"]), Path(plist["StandardErrorPath"])
    assert out.parent == logs_dir and err.parent == logs_dir and out != err


def test_supervisord_file_parses_with_configparser():
    parser = read_ini(SUPERVISOR_CONF.read_text())
    assert parser.sections() == [f"program:{NODE}", f"program:{CONTROL_API}"]
    node = parser[f"program:{NODE}"]
    assert node["command"] == f"{PLACEHOLDER_BIN} start"
    assert node["stopsignal"] == "TERM"
    assert node["autorestart"] == "true"
    assert node["redirect_stderr"] == "false"  # stderr must not pollute the JSON stream
    for key in ("stdout_logfile_maxbytes", "stdout_logfile_backups", "stderr_logfile"):
        assert node[key]
    assert "BAA_SHARED_TOKEN=" not in node["environment"]


def write_supervisord_conf(root: Path, program_conf: Path) -> Path:
    """A complete supervisord.conf in `root` that [include]s `program_conf`."""
    conf = root / "supervisord.conf"
    conf.write_text(
        f"""\
[unix_http_server]
file={root / "supervisor.sock"}
chmod=0700

[supervisord]
logfile={root / "supervisord.log"}
pidfile={root / "supervisord.pid"}
childlogdir={root}
loglevel=info
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{root / "supervisor.sock"}

[include]
files = {program_conf}
"""
    )
    return conf


def localize(text: str, root: Path, env: dict[str, str]) -> str:
    """Substitute the shipped placeholders for a test run (ops/supervisord/README.md)."""
    if (BIN_DIR / "conductord").exists():
        command = str(BIN_DIR / "conductord")
    else:
        command = f"{sys.executable} -m conductord"
    text = text.replace(PLACEHOLDER_BIN, command)
    text = text.replace(PLACEHOLDER_TOKEN_FILE, str(root / "token"))
    text = text.replace(PLACEHOLDER_LOG_DIR, str(root / "log"))
    text = text.replace(PLACEHOLDER_LIB_DIR, str(root / "lib"))
    text = text.replace(PLACEHOLDER_LISTEN, "127.0.0.1:0")
    text, users = re.subn(r"(?m)^user=conductord$", f"user={getpass.getuser()}", text)
    assert users == 2
    for key, value in env.items():
        text, count = re.subn(rf'\b{key}="[^"]*"', f'{key}="{value}"', text)
        assert count >= 1, f"{key} is not in the shipped environment"
    return text


def localized_conf(root: Path, env: dict[str, str]) -> Path:
    """The shipped file, localized into `root`, [include]d by a supervisord.conf there."""
    for directory in ("log", "lib"):
        (root / directory).mkdir(exist_ok=True)
    program_conf = root / "conductord.conf"
    program_conf.write_text(localize(SUPERVISOR_CONF.read_text(), root, env))
    return write_supervisord_conf(root, program_conf)


@dataclass
class Programs:
    node: Any  # supervisor.options.ProcessConfig
    control_api: Any


def supervisor_programs(conf: Path) -> Programs:
    """The ProcessConfigs supervisord itself builds from `conf`."""
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    configs = {
        process.name: process
        for group in options.process_group_configs
        for process in group.process_configs
    }
    assert set(configs) == {NODE, CONTROL_API}
    return Programs(configs[NODE], configs[CONTROL_API])


def test_supervisor_builds_the_shipped_programs(tmp_path):
    programs = supervisor_programs(localized_conf(tmp_path, {}))
    node = programs.node

    assert node.stopsignal == signal.SIGTERM
    assert node.stopwaitsecs > stop_budget_s(
        node.environment["BAA_CONDUCTOR_REQUEST_TIMEOUT_MS"], DEFAULT_EXEC_GRACE_MS
    )
    assert node.autorestart is RestartUnconditionally
    assert node.startsecs >= 1
    assert node.redirect_stderr is False
    assert node.stdout_logfile == str(tmp_path / "log" / "conductord.log")
    assert node.stdout_logfile_maxbytes > 0 and node.stdout_logfile_backups > 0
    assert node.stderr_logfile == str(tmp_path / "log" / "conductord.err.log")
    assert set(node.environment) >= NEEDED_SETTINGS
    assert set(node.environment) <= KNOWN_VARIABLES
    # `%(host_node_name)s` was expanded by supervisord, not passed through.
    assert "%" not in node.environment["BAA_NODE_ID"]
    assert node.environment["BAA_NODE_ID"].endswith("-main")
    assert node.environment["BAA_LOGS_DIR"] == str(tmp_path / "log")
    # The Control API starts first and stops last.
    assert programs.control_api.priority < node.priority
    assert programs.control_api.stopsignal == signal.SIGTERM


@pytest.mark.parametrize("source", ["launchd", "supervisord"])
def test_shipped_environment_is_a_valid_config_without_warnings(tmp_path, source):
    token = tmp_path / "token"
    token.write_text("a-real-token-0123456789\n")
    token.chmod(0o600)
    if source == "launchd":
        env = dict(load_plist()["EnvironmentVariables"])
    else:
        # Placeholders only: the URL, intervals and the rest are checked as shipped.
        env = dict(supervisor_programs(localized_conf(tmp_path, {})).node.environment)
    env["BAA_SHARED_TOKEN_FILE"] = str(token)

    config = resolve_config({}, env)

    assert config.has_shared_token
    assert config_warnings(config) == []


def exec_examples(source: str) -> list[dict[str, str]]:
    """The commented `--exec` examples of a shipped file, one dict per example: each
    BAA_CONDUCTOR_EXEC starts one; the settings after it (every-ms, grace) belong to it."""
    if source == "launchd":
        text = PLIST.read_text()
        pairs = re.findall(r"<key>(BAA_CONDUCTOR_EXEC\w*)</key>\s*<string>([^<]*)</string>", text)
        assert load_plist()["EnvironmentVariables"].keys().isdisjoint(k for k, _ in pairs)
    else:
        lines = re.findall(r'(?m)^;\s+(BAA_CONDUCTOR_EXEC\w*=".*)$', SUPERVISOR_CONF.read_text())
        pairs = [pair for line in lines for pair in dict_of_key_value_pairs(line).items()]
    examples: list[dict[str, str]] = []
    for key, value in pairs:
        if key == "BAA_CONDUCTOR_EXEC":
            examples.append({})
        examples[-1][key] = value
    return examples


@pytest.mark.parametrize("source", ["launchd", "supervisord"])
def test_the_commented_exec_examples_are_valid_with_the_shipped_timing(tmp_path, source):
    token = tmp_path / "token"
    token.write_text("a-real-token-0123456789\n")
    token.chmod(0o600)
    if source == "launchd":
        env = dict(load_plist()["EnvironmentVariables"])
    else:
        env = dict(supervisor_programs(localized_conf(tmp_path, {})).node.environment)
    env["BAA_SHARED_TOKEN_FILE"] = str(token)
    examples = exec_examples(source)
    assert len(examples) == 2  # a singleton worker and a periodic job
    configs = [resolve_config({}, {**env, **example}) for example in examples]
    worker, periodic = configs
    assert worker.exec_argv == ("/usr/local/bin/queue-worker", "billing")
    assert worker.exec_every_ms is None
    assert periodic.exec_argv == ("/usr/local/bin/nightly-report", "hourly")
    assert periodic.exec_every_ms == 60000
    assert periodic.exec_stop_grace_ms == DEFAULT_EXEC_GRACE_MS
    for config in configs:
        assert config_warnings(config) == []


def test_the_shipper_tails_the_file_supervisord_and_launchd_write():
    program = read_ini(SUPERVISOR_CONF.read_text())[f"program:{NODE}"]
    plist = load_plist()
    sources = tomllib.loads(VECTOR_TOML.read_text())["sources"]
    assert [s["type"] for s in sources.values()] == ["file"]
    source = next(iter(sources.values()))

    def tailed(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) for p in source["include"]) and not any(
            fnmatch.fnmatch(path, p) for p in source.get("exclude", [])
        )

    for log in (program["stdout_logfile"], plist["StandardOutPath"]):
        assert tailed(log) and tailed(log + ".1"), log  # rotated copies too
        assert not tailed(log + ".1.gz")
    for log in (program["stderr_logfile"], plist["StandardErrorPath"]):
        assert not tailed(log), log


def test_vector_config_forwards_lease_transitions():
    config = tomllib.loads(VECTOR_TOML.read_text())
    components = {**config["sources"], **config["transforms"], **config["sinks"]}
    for name, component in {**config["transforms"], **config["sinks"]}.items():
        for upstream in component["inputs"]:
            assert upstream in components and upstream not in config["sinks"], (name, upstream)

    filter_name, event = vector_filter_event(config)
    assert event == "lease.transition"
    assert [s["inputs"] for s in config["sinks"].values()] == [[filter_name]]
    parse = config["transforms"][config["transforms"][filter_name]["inputs"][0]]
    assert parse["type"] == "remap" and "parse_json" in parse["source"]
    # Every `shipper` field of the documented schema is set by the remap program.
    for name, _types, source in shipped_fields():
        if source == "shipper":
            assert re.search(rf"^\.{re.escape(name)} = ", parse["source"], re.M), name


def test_shipped_field_list_is_well_formed():
    rows = shipped_fields()
    names = [name for name, _types, _source in rows]
    assert len(names) == len(set(names))
    common = ["timestamp", "level", "event", "node_id", "host", "role"]
    transition = ["from_state", "to_state", "reason", "term", "leader_id", "last_error"]
    assert set(common + transition + ["snapshot"]) <= set(names)
    for name, types, source in rows:
        assert types <= set(_JSON_TYPES), (name, types)
        assert source in {"daemon", "shipper"}, (name, source)


# -- a real supervisord --------------------------------------------------------------------


class Supervisord:
    """A supervisord process of our own, driven by XML-RPC and supervisorctl."""

    def __init__(self, root: Path, conf: Path) -> None:
        self.root = root
        self.conf = conf
        self.log = root / "supervisord.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.child_pids: set[int] = set()
        self._stderr: Any = None
        # One keep-alive connection to supervisord's socket, closed at shutdown.
        self._transport = SupervisorTransport(None, None, f"unix://{root / 'supervisor.sock'}")

    def start(self) -> None:
        self._stderr = (self.root / "supervisord.stderr").open("wb")
        self.proc = subprocess.Popen(
            [str(SUPERVISORD), "-n", "-c", str(self.conf)],
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        wait_until(self._answers, 30, "supervisord to answer on its socket")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisord exited with {self.proc.returncode}: {self.logs}")
        try:
            return self.rpc().supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            self._transport.close()  # not listening yet: the next try connects afresh
            return False

    def rpc(self) -> Any:
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=self._transport)

    def info(self, name: str) -> dict[str, Any]:
        info = self.rpc().supervisor.getProcessInfo(name)
        if info["pid"]:
            self.child_pids.add(info["pid"])
        return info

    def wait_state(self, name: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_until(
            lambda: (info := self.info(name))["statename"] == state and info,
            timeout,
            lambda: f"{name} to be {state} (now {self.info(name)['statename']}): {self.logs}",
        )

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SUPERVISORCTL), "-c", str(self.conf), *args],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @property
    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def shutdown(self) -> None:
        """SIGTERM supervisord (it stops its programs); if it hangs, SIGKILL it and them."""
        self._transport.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                for pid in self.child_pids:
                    if self._ours(pid):
                        os.kill(pid, signal.SIGKILL)
        self._stderr.close()

    def _ours(self, pid: int) -> bool:
        """Whether `pid` still is a program of this supervisord (pids get reused)."""
        marker = f"BAA_SHARED_TOKEN_FILE={self.root / 'token'}".encode()
        try:
            return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False


@dataclass
class Stack:
    root: Path
    control_api: ControlApiProcess
    supervisord: Supervisord
    node: Any  # the ProcessConfig of [program:conductord], as supervisord built it
    node_id: str
    log_file: Path
    stderr_file: Path

    def log_lines(self) -> list[str]:
        text = self.log_file.read_text() if self.log_file.exists() else ""
        return [line for line in text.splitlines() if line.strip()]

    def events(self, name: str | None = None, *, since: int = 0) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.log_lines()[since:]]
        return [e for e in parsed if name is None or e.get("event") == name]

    def wait_event(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
        *,
        since: int = 0,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        return wait_until(
            lambda: next((e for e in self.events(name, since=since) if predicate(e)), None),
            timeout,
            lambda: f"{name} in {self.log_file}: {self.log_lines()[since:]}",
        )

    def leader(self) -> dict[str, Any]:
        response = requests.get(
            f"{self.control_api.url}/v1/leader", headers=self.control_api.headers, timeout=5
        )
        response.raise_for_status()
        return response.json()["data"]

    def node_leads(self) -> dict[str, Any] | None:
        data = self.leader()
        lease = data["lease"]
        return data if data["is_live"] and lease and lease["holder_id"] == self.node_id else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("ops")
    token = f"ops-{os.urandom(8).hex()}"
    token_file = root / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)

    # The test's own Control API: the shipped [program:conductord] points at it.
    control_api = ControlApiProcess(str(root / "control.sqlite3"), token=token)
    supervisord: Supervisord | None = None
    try:
        control_api.start()
        conf = localized_conf(root, {**LIVE_ENV, "BAA_CONTROL_API_BASE": control_api.url})
        node = supervisor_programs(conf).node
        supervisord = Supervisord(root, conf)
        supervisord.start()
        yield Stack(
            root=root,
            control_api=control_api,
            supervisord=supervisord,
            node=node,
            node_id=node.environment["BAA_NODE_ID"],
            log_file=Path(node.stdout_logfile),
            stderr_file=Path(node.stderr_logfile),
        )
    finally:
        if supervisord is not None:
            supervisord.shutdown()
        if control_api.proc is not None and control_api.proc.poll() is None:
            control_api.kill()


@pytest.mark.e2e
def test_supervisord_runs_stops_and_restarts_the_node(stack: Stack):
    sv = stack.supervisord

    # Started by supervisord, the node becomes leader.
    sv.wait_state(NODE, "RUNNING")
    first = wait_until(stack.node_leads, 20, "the node to lead")
    stack.wait_event("lease.transition", lambda e: e["to_state"] == "leader")

    # `supervisorctl stop`: SIGTERM, exit 0 within the stop budget, lease released.
    mark, log_mark = len(stack.log_lines()), len(sv.logs)
    began = time.monotonic()
    stopped = sv.ctl("stop", NODE)
    elapsed = time.monotonic() - began
    assert stopped.returncode == 0 and f"{NODE}: stopped" in stopped.stdout, stopped
    assert elapsed < stack.node.stopwaitsecs
    info = sv.info(NODE)
    assert info["statename"] == "STOPPED" and info["exitstatus"] == 0
    assert f"stopped: {NODE} (exit status 0)" in sv.logs[log_mark:]
    assert "SIGKILL" not in sv.logs[log_mark:]
    wait_until(lambda: not stack.leader()["is_live"], 3, "the lease to be released")
    assert stack.leader()["lease"]["term"] == first["lease"]["term"]
    stop = stack.events(since=mark)
    names = [e["event"] for e in stop]
    assert names[-1] == "conductor.stopped", names
    assert {"conductor.stopping", "lease.released"} <= set(names), names
    (released,) = [e for e in stop if e["event"] == "lease.released"]
    assert released["released"] is True
    (stepped_down,) = [e for e in stop if e["event"] == "lease.transition"]
    assert (stepped_down["to_state"], stepped_down["reason"]) == ("standby", "stopping")
    stopping_at, stopped_at = (
        seconds(e["timestamp"]) for e in stop if e["event"].startswith("conductor.stop")
    )
    assert stopped_at - stopping_at <= stop_budget_s(REQUEST_TIMEOUT_MS)

    # Started again, it takes a new term.
    assert f"{NODE}: started" in sv.ctl("start", NODE).stdout
    second = wait_until(stack.node_leads, 20, "the node to lead again")
    term = second["lease"]["term"]
    assert term > first["lease"]["term"]

    # kill -9: supervisord restarts it, and it resumes its unexpired lease (same id, term).
    pid = sv.info(NODE)["pid"]
    mark, log_mark = len(stack.log_lines()), len(sv.logs)
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: (info := sv.info(NODE))["pid"] not in (0, pid) and info["statename"] == "RUNNING",
        30,
        "supervisord to restart the node",
    )
    assert f"exited: {NODE} (terminated by SIGKILL; not expected)" in sv.logs[log_mark:]
    resumed = stack.wait_event("lease.transition", lambda e: e["to_state"] == "leader", since=mark)
    assert resumed["term"] == term and resumed["leader_id"] == stack.node_id
    assert resumed["snapshot"]["daemon"]["last_lease_operation"] == "renew"
    assert resumed["snapshot"]["runtime"]["pid"] != pid
    lease = wait_until(stack.node_leads, 10, "the node to lead after the restart")["lease"]
    assert lease["term"] == term


@pytest.mark.e2e
def test_every_line_under_supervisord_is_json_with_the_shipped_fields(stack: Stack):
    stack.supervisord.wait_state(NODE, "RUNNING")
    stack.wait_event("lease.transition", lambda e: e["to_state"] == "leader")

    lines = stack.log_lines()
    events = [json.loads(line) for line in lines]  # a non-JSON line fails here
    assert all(isinstance(e, dict) for e in events)
    assert stack.stderr_file.read_text() == ""
    transitions = [e for e in events if e.get("event") == "lease.transition"]
    assert transitions
    daemon_fields = [(n, t) for n, t, source in shipped_fields() if source == "daemon"]
    for event in transitions:
        for name, types in daemon_fields:
            found, value = lookup(event, name)
            assert found, f"{name} missing from {event}"
            assert any(_JSON_TYPES[t](value) for t in types), (name, types, value)
        assert event["snapshot"]["daemon"]["lease_state"] == event["to_state"]
        assert event["node_id"] == stack.node_id
    # The shipper's filter picks exactly these lines.
    _name, wanted = vector_filter_event(tomllib.loads(VECTOR_TOML.read_text()))
    assert [e for e in events if e.get("event") == wanted] == transitions


@pytest.mark.e2e
def test_supervisord_runs_the_example_control_api(stack: Stack):
    info = stack.supervisord.wait_state(CONTROL_API, "RUNNING")
    log = Path(info["stdout_logfile"])
    listening = wait_until(
        lambda: next(
            (
                e
                for e in map(json.loads, log.read_text().splitlines())
                if e.get("event") == "control_api.listening"
            ),
            None,
        ),
        20,
        f"control_api.listening in {log}",
    )
    health = requests.get(f"http://127.0.0.1:{listening['port']}/healthz", timeout=5)
    assert health.status_code == 200
