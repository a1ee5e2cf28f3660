"""ops/logship/rsyslog.conf under a real rsyslogd (SPEC §16 "log shipping, proven").

The shipped file is installed the way Debian runs it: as an /etc/rsyslog.d/ snippet that a
main config includes after setting the work directory. Only the tailed file's path and the
collector's address are substituted (`localize`). The main config is the test's own, all in
tmp_path: work directory, pid file, a default-ruleset file standing in for /var/log/syslog,
and `processInternalMessages` so this rsyslogd's own messages stay in that file instead of
going to the system log. No system rsyslog is touched. The collector is a TCP listener in
the test on 127.0.0.1.

The log is written the way supervisord writes it, with supervisor's own code: the node's
stdout pipe is read in 128 KiB chunks (`ServerOptions.readfd`) and handed to a logger from
`supervisor.loggers.handle_file` (a `RotatingFileHandler`, as for `stdout_logfile` with
`stdout_logfile_maxbytes`). One test drives a node through leader, degraded (its Control API
is killed) and back, a stop with release, a restart as standby, a takeover and a last stop,
while the file rotates several times; another ships lines longer than rsyslog's default
8 KiB message size. Both then write lines that are not transitions, not JSON or cut short,
and a sentinel transition: once the collector has it, rsyslogd has read everything before
it. The shipped records must equal the node's lease.transition lines, in order, every field
(the nested snapshot too) intact, and nothing else.

A line must reach supervisord in one write, or a rotation can cut it across two files;
`test_every_log_line_is_one_write` shows where the daemon does not (an expected failure,
until conductord/logs.py writes line and newline at once).

Without rsyslogd the tests fail when `CI` is set and skip elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from supervisor import loggers

from tests.support.control_api import ControlApiProcess
from tests.support.daemon import DaemonProcess, clean_env
from tests.support.wait import wait_until

RSYSLOG_CONF = Path(__file__).resolve().parent.parent / "ops" / "logship" / "rsyslog.conf"

# Placeholders of the shipped file.
PLACEHOLDER_LOG = "/var/log/conductord/conductord.log"
PLACEHOLDER_TARGET = 'target="logs.example.internal" port="5170"'

# supervisord's stdout reads (supervisor.options.ServerOptions.readfd).
READ_CHUNK = 2 << 16
# stdout_logfile_maxbytes for the rotation test: a few rotations per run, each file holding
# several lines. supervisord rotates after a write, so a line that comes in two reads can be
# cut across two files. The lines there are written in one write() each (see node_env) and
# stay below 4 KiB, a pipe's atomic write (PIPE_BUF), so every read holds whole lines.
ROTATING_MAXBYTES = 5 * 1024
LOG_BACKUPS = 10
DEFAULT_MAX_MESSAGE = 8 * 1024  # rsyslog's default maxMessageSize
WAIT_S = 30.0

SENTINEL = {"event": "lease.transition", "node_id": "rsyslog-test-sentinel", "to_state": "-"}
NOT_SHIPPED = [
    b"not json at all\n",
    b'{"event":"conductor.crashed","note":"lease.transition"}\n',
    b'["lease.transition"]\n',
    b'{"event":"lease.transition","term":\n',  # cut short
    b'{"event":"lease.transition"} trailing\n',
]


def rsyslogd() -> str:
    path = shutil.which("rsyslogd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        message = "rsyslogd is not installed (sudo apt-get install rsyslog)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so this is a failure, not a skip")
        pytest.skip(message)
    return path


def node_env(token: str) -> dict[str, str]:
    """The node's environment, token in the variable (each line is one write whatever
    PYTHONUNBUFFERED says: see test_every_log_line_is_one_write)."""
    return clean_env(BAA_SHARED_TOKEN=token)


def long_path_args(root: Path) -> list[str]:
    """Directory flags whose paths make every snapshot line longer than 8 KiB."""
    deep = root.joinpath(*(["p" * 200] * 10))
    deep.mkdir(parents=True, exist_ok=True)
    flags = ("--runs-dir", "--worktrees-dir", "--logs-dir", "--tmp-dir")
    return [arg for flag in flags for arg in (flag, str(deep))]


def localize(text: str, log_file: Path, port: int) -> str:
    """The shipped snippet with only the tailed file and the collector substituted."""
    assert text.count(PLACEHOLDER_LOG) >= 1 and text.count(PLACEHOLDER_TARGET) == 1
    text = text.replace(PLACEHOLDER_LOG, str(log_file))
    return text.replace(PLACEHOLDER_TARGET, f'target="127.0.0.1" port="{port}"')


def main_conf(root: Path, snippet_dir: Path) -> Path:
    """A stand-in for Debian's /etc/rsyslog.conf, without its system inputs."""
    (root / "spool").mkdir()
    conf = root / "rsyslog.conf"
    conf.write_text(
        'global(processInternalMessages="on")\n'
        f"$WorkDirectory {root / 'spool'}\n"
        f"$IncludeConfig {snippet_dir}/*.conf\n"
        f"*.* {root / 'syslog'}\n"
    )
    return conf


class Collector:
    """A TCP listener on 127.0.0.1 collecting newline-delimited records."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.data = bytearray()
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(0.2)
                while not self._stop.is_set():
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    with self._lock:
                        self.data += chunk

    def records(self) -> list[bytes]:
        with self._lock:
            complete = bytes(self.data).rsplit(b"\n", 1)[0] if b"\n" in self.data else b""
        return [line for line in complete.split(b"\n") if line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class SupervisordLog:
    """One program run's stdout -> the log file, written by supervisor's own logger."""

    def __init__(self, log_file: Path, copy: bytearray, maxbytes: int) -> None:
        self.logger = loggers.getLogger()
        # As supervisor's dispatcher sets up `stdout_logfile` (dispatchers.py, _init_normallog).
        loggers.handle_file(
            self.logger,
            filename=str(log_file),
            fmt="%(message)s",
            rotating=bool(maxbytes),
            maxbytes=maxbytes,
            backups=LOG_BACKUPS,
        )
        self.copy = copy

    def write(self, data: bytes) -> None:
        self.copy += data
        self.logger.info(data)

    def pump(self, fd: int) -> None:
        while data := os.read(fd, READ_CHUNK):
            self.write(data)
        os.close(fd)
        self.logger.close()


class Node:
    """`conductord start` with stdout going to the supervisord-style log."""

    def __init__(self, args: list[str], env: dict[str, str], log: SupervisordLog, root: Path):
        self.log = log
        self.mark = len(log.copy)
        self.stderr = (root / "conductord.err.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "conductord", "start", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        assert self.proc.stdout is not None
        self.reader = threading.Thread(
            target=log.pump, args=(os.dup(self.proc.stdout.fileno()),), daemon=True
        )
        self.proc.stdout.close()
        self.reader.start()

    def events(self) -> list[dict[str, Any]]:
        text = bytes(self.log.copy[self.mark :]).decode()
        complete = text[: text.rfind("\n") + 1]  # a chunk may end inside a line
        return [json.loads(line) for line in complete.splitlines()]

    def wait(self, event: str, to_state: str | None = None) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            if self.proc.poll() is not None and not self.reader.is_alive():
                raise AssertionError(f"node exited with {self.proc.returncode}")
            return next(
                (
                    e
                    for e in self.events()
                    if e["event"] == event and to_state in (None, e.get("to_state"))
                ),
                None,
            )

        return wait_until(
            found, what=lambda: f"{event} {to_state or ''} in {self.events()}", timeout=WAIT_S
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=WAIT_S) == 0
        self.reader.join(timeout=WAIT_S)
        self.stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        self.stderr.close()


class Rsyslogd:
    def __init__(self, root: Path, conf: Path) -> None:
        self.root = root
        self.output = (root / "rsyslogd.out").open("wb")
        self.proc = subprocess.Popen(
            [rsyslogd(), "-n", "-f", str(conf), "-i", str(root / "rsyslogd.pid")],
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )

    def diagnostics(self) -> str:
        syslog = self.root / "syslog"
        return (
            f"rsyslogd output: {(self.root / 'rsyslogd.out').read_text()!r}; "
            f"its own log: {syslog.read_text() if syslog.exists() else ''!r}"
        )

    def started(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"rsyslogd exited with {self.proc.returncode}")
        syslog = self.root / "syslog"
        return syslog.exists() and "] start" in syslog.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.output.close()
        return self.proc.returncode


class Shipping:
    """A Control API, the collector and rsyslogd running the shipped file, in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log_file = root / "log" / "conductord.log"
        self.log_file.parent.mkdir()
        self.token = f"rsyslog-{os.urandom(8).hex()}"
        self.env = node_env(self.token)
        self.written = bytearray()  # every byte that went into the log, in order
        self.started: list[Node | DaemonProcess] = []
        self.collector = Collector()
        self.api = ControlApiProcess(str(root / "control.sqlite3"), token=self.token)
        self.syslog: Rsyslogd | None = None

    def start(self) -> None:
        self.api.start()
        snippets = self.root / "rsyslog.d"
        snippets.mkdir()
        (snippets / "60-conductord.conf").write_text(
            localize(RSYSLOG_CONF.read_text(), self.log_file, self.collector.port)
        )
        self.syslog = Rsyslogd(self.root, main_conf(self.root, snippets))
        wait_until(self.syslog.started, what=self.syslog.diagnostics, timeout=WAIT_S)

    def args(self, node_id: str) -> list[str]:
        return [
            "--node-id",
            node_id,
            "--host",
            f"host-{node_id}",
            "--control-api-base",
            self.api.url,
            "--heartbeat-interval-ms",
            "300",
            "--lease-renew-interval-ms",
            "300",
            "--lease-ttl-sec",
            "5",
            "--request-timeout-ms",
            "1000",
        ]

    def node(self, args: list[str], maxbytes: int) -> Node:
        """A program run under "supervisord": a new logger on the same file each time."""
        node = Node(
            args, self.env, SupervisordLog(self.log_file, self.written, maxbytes), self.root
        )
        self.started.append(node)
        return node

    def other_machine(self, node_id: str) -> DaemonProcess:
        """A node whose log is not shipped by this machine's rsyslog."""
        other = DaemonProcess(self.args(node_id), env=self.env)
        self.started.append(other)
        return other

    def finish(self) -> list[dict[str, Any]]:
        """Write what must not be shipped and the sentinel; stop rsyslogd; the records."""
        assert self.syslog is not None
        tail = SupervisordLog(self.log_file, self.written, 0)
        for line in NOT_SHIPPED:
            tail.write(line)
        tail.write(json.dumps(SENTINEL).encode() + b"\n")
        tail.logger.close()
        wait_until(
            lambda: any(json.loads(r) == SENTINEL for r in self.collector.records()),
            what=lambda: (
                f"the sentinel at the collector ({self.collector.records()}); "
                + self.syslog.diagnostics()
            ),
            timeout=WAIT_S,
        )
        assert self.syslog.stop() == 0, self.syslog.diagnostics()
        return [json.loads(record) for record in self.collector.records()]

    def node_lines(self) -> list[str]:
        lines = bytes(self.written).decode().splitlines()
        return lines[: -len(NOT_SHIPPED) - 1]

    def transitions(self) -> list[dict[str, Any]]:
        events = [json.loads(line) for line in self.node_lines()]
        return [event for event in events if event["event"] == "lease.transition"]

    def close(self) -> None:
        for process in self.started:
            if isinstance(process, Node):
                process.kill()
            else:
                process.close()
        if self.syslog is not None:
            self.syslog.stop()
        if self.api.proc is not None and self.api.proc.poll() is None:
            self.api.kill()
        self.collector.close()


@pytest.fixture
def shipping(tmp_path) -> Iterator[Shipping]:
    rsyslogd()  # fail or skip before starting anything
    setup = Shipping(tmp_path)
    try:
        setup.start()
        yield setup
    finally:
        setup.close()


def test_the_shipped_file_passes_rsyslogs_config_check(tmp_path):
    snippets = tmp_path / "rsyslog.d"
    snippets.mkdir()
    (snippets / "60-conductord.conf").write_text(
        localize(RSYSLOG_CONF.read_text(), tmp_path / "conductord.log", 5170)
    )
    result = subprocess.run(
        [rsyslogd(), "-N1", "-f", str(main_conf(tmp_path, snippets))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in (result.stdout + result.stderr).lower()


@pytest.mark.e2e
def test_rsyslog_ships_exactly_the_lease_transitions_across_rotations(shipping: Shipping):
    args = shipping.args("ship-a")

    # Run 1: leader; the Control API dies (degraded) and comes back (leader again).
    node = shipping.node(args, ROTATING_MAXBYTES)
    node.wait("lease.transition", "leader")
    node.wait("conductor.started")
    shipping.api.kill()
    node.wait("lease.transition", "degraded")
    shipping.api.start()
    wait_until(
        lambda: (
            [e["to_state"] for e in node.events() if e["event"] == "lease.transition"][-1]
            == "leader"
        ),
        what=lambda: f"the node to lead again: {node.events()}",
        timeout=WAIT_S,
    )

    # Another machine's node waits as standby; this one stops and releases the lease.
    other = shipping.other_machine("ship-b")
    other.wait_event("conductor.started", timeout=WAIT_S)
    node.stop()
    other.transition_to("leader", timeout=WAIT_S)

    # Run 2 (supervisord restarts the program): standby, leader once the other node stops,
    # and a last stop.
    node = shipping.node(args, ROTATING_MAXBYTES)
    node.wait("conductor.started")
    other.send(signal.SIGTERM)
    assert other.wait_exit(timeout=WAIT_S) == 0
    node.wait("lease.transition", "leader")
    node.stop()

    shipped = shipping.finish()
    transitions = shipping.transitions()
    assert max(len(line) for line in shipping.node_lines()) < 4096  # see ROTATING_MAXBYTES
    # Each record is its log line once parsed: no key added, dropped or changed, in order.
    assert shipped == [*transitions, SENTINEL]
    assert [(e["from_state"], e["to_state"]) for e in transitions] == [
        ("standby", "leader"),
        ("leader", "degraded"),
        ("degraded", "leader"),
        ("leader", "standby"),
        ("standby", "leader"),
        ("leader", "standby"),
    ]
    assert transitions[1]["level"] == "warning" and transitions[1]["last_error"]
    assert [e["reason"] for e in transitions].count("stopping") == 2
    assert all(e["snapshot"]["daemon"]["lease_state"] == e["to_state"] for e in transitions)
    # The file rotated several times; no line went to the default rules (/var/log/syslog).
    assert shipping.log_file.with_name("conductord.log.3").exists()
    assert "lease.transition" not in (shipping.root / "syslog").read_text()


@pytest.mark.e2e
def test_rsyslog_ships_transition_lines_above_its_default_message_size(shipping: Shipping):
    # Long paths make every snapshot line longer than rsyslog's default 8 KiB limit, which
    # would cut the line and so drop it. No rotation here: see ROTATING_MAXBYTES.
    node = shipping.node([*shipping.args("ship-long"), *long_path_args(shipping.root)], 0)
    node.wait("lease.transition", "leader")
    node.wait("conductor.started")
    node.stop()

    shipped = shipping.finish()
    transitions = shipping.transitions()
    assert shipped == [*transitions, SENTINEL]
    assert [(e["from_state"], e["to_state"]) for e in transitions] == [
        ("standby", "leader"),
        ("leader", "standby"),
    ]
    long_lines = [line for line in shipping.node_lines() if '"event":"lease.transition"' in line]
    assert len(long_lines) == 2
    assert min(len(line) for line in long_lines) > DEFAULT_MAX_MESSAGE


@pytest.mark.parametrize("case", ["PYTHONUNBUFFERED=1", "a line over 8 KiB"])
def test_every_log_line_is_one_write(tmp_path, control_api, case):
    """supervisord rotates after a write: a line that arrives in two writes can be cut across
    two files, and no tailing shipper then gets it whole. Each write() on a SOCK_SEQPACKET
    socket is one packet, so the packets show how the daemon wrote its stdout."""
    env = node_env(control_api.token)
    args = ["--node-id", "one-write", "--control-api-base", control_api.url]
    if case == "PYTHONUNBUFFERED=1":
        env["PYTHONUNBUFFERED"] = "1"
    else:
        args += long_path_args(tmp_path)
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with reader:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conductord", "start", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=writer.fileno(),
            stderr=subprocess.DEVNULL,
        )
        writer.close()
        try:
            packets: list[bytes] = []
            reader.settimeout(WAIT_S)
            while b'"event":"conductor.started"' not in b"".join(packets):
                packets.append(reader.recv(1 << 20))
                assert packets[-1], "stdout closed before conductor.started"
            proc.send_signal(signal.SIGTERM)
            while packet := reader.recv(1 << 20):
                packets.append(packet)
            assert proc.wait(timeout=WAIT_S) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert len(packets) >= 4
    torn = [p[:60] for p in packets if not p.endswith(b"\n") or p.count(b"\n") != 1]
    assert torn == []
