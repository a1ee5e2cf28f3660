"""Chaos harness: a seeded nemesis against a real fleet and the real Control API (SPEC §15).

Rerun (from the repository root; about 3 s per fault):

    .venv/bin/python bench/chaos.py --seed 1 --faults 20 --children none
    .venv/bin/python bench/chaos.py --seed 1 --faults 500 --store postgres      # the long run
    .venv/bin/python bench/chaos.py --seed 7 --faults 12 --kinds clock_step,node_kill
    .venv/bin/python bench/chaos.py --replay failing.json ...                   # same schedule

Set-up: `--nodes` real `python -m conductord start` processes (TTL `--ttl-sec`, renew
`--renew-ms`, request timeout `--request-timeout-ms`), each with its status endpoint on and its
own `--state-dir`, each reaching the reference Control API (`conductord control-api`, SQLite
file or a fresh schema of the test PostgreSQL server) through its own fault-injecting TCP proxy
(bench/chaos_proxy.py). The Control API runs under libfaketime with only the wall clock faked
(`FAKETIME_TIMESTAMP_FILE`, `FAKETIME_NO_CACHE=1`, `FAKETIME_DONT_FAKE_MONOTONIC=1`), so its
clock can be stepped at runtime; a probe process started the same way checks first that
`time.time()` steps while `time.monotonic()` and CLOCK_BOOTTIME do not. With `--children exec`
(the default) every node runs `--exec "python bench/chaos_child.py …"`: a leader-only child that
takes an exclusive flock on one shared file and logs (time, node, term) while it holds it.

Every node's `/v1/status` is polled every `--poll-ms` by its own thread. The nemesis then draws
`--faults` faults one after another, each after a seeded pause, each kind from a seeded deck (every
kind once per round, so a short run covers them all):

    node_kill    kill -9 of a node (the leader, mostly); restarted later, same id and state dir
    node_pause   SIGSTOP of a node (the leader, mostly) past the TTL, then SIGCONT
    api_kill     kill -9 of the Control API; restarted on the same database
    clock_step   the Control API host's wall clock steps forward (cumulative)
    net_latency  latency on the path of the leader, one node or all nodes to the Control API
    net_drop     a black hole on such a path
    net_reset    connection resets on such a path

Checks (bench/chaos_check.py says why each is sound): `two_scheduler_polls` (a node seen enabled
in two polls with one term, and another node's enabled answer wholly inside that span),
`flock_overlaps`, `stale_writes` (a child write with a lower term after a higher one). Any of
them above 0 is a violation: exit 1, and the fault schedule that reproduces it is printed on
stderr and carried in the JSON line (`schedule`; `--replay FILE` runs it again). Also measured:
seconds with no leader, failover times after faults that hit the leader, polls made.

Output: one JSON line on stdout (fields in bench/README.md); progress on stderr. Every process
is killed by process group on the way out, and so is anything still naming the run's directory
on its command line (the `--exec` children and their guards, which live in groups of their own).

Limits: the poll-based check misses overlaps shorter than a poll interval. A clock step reaches
the Control API process only: with `--store postgres` the database clock decides expiry, so the
step exercises only what that process does with its own clock. All processes share one machine
and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import random
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from _common import (
    CONDUCTORD,
    REPO_ROOT,
    Proc,
    child_env,
    emit,
    fleet_node_argv,
    free_port,
    is_event,
    machine_info,
    new_token,
    progress,
)
from chaos_check import (
    EnabledIndex,
    PollRecord,
    child_log,
    episodes,
    leaderless,
    proven_overlaps,
    summary,
)
from chaos_proxy import FaultProxy

from conductord.lease import default_margin_s

KINDS = (
    "node_kill",
    "node_pause",
    "api_kill",
    "clock_step",
    "net_latency",
    "net_drop",
    "net_reset",
)
NET_KINDS = ("net_latency", "net_drop", "net_reset")
FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)
HEARTBEAT_MS = 1000
EXEC_STOP_GRACE_MAX_MS = 500
START_TIMEOUT_S = 20.0
POLL_TIMEOUT_S = 0.5
EVIDENCE_CAP = 10
EXIT_VIOLATION = 1
EXIT_USAGE = 2


def exec_command(lock: str, log: str) -> str:
    """The `--exec` value: the flock child, one lock and one log for the whole fleet."""
    child = [sys.executable, os.path.join(REPO_ROOT, "bench", "chaos_child.py")]
    return shlex.join([*child, "--lock", lock, "--log", log])


def exec_grace_ms(args: argparse.Namespace) -> int:
    """A stop grace that satisfies SPEC §14's rule: grace + 250 ms <= the step-down margin."""
    margin_ms = int(default_margin_s(args.renew_ms, args.ttl_sec) * 1000)
    return min(EXEC_STOP_GRACE_MAX_MS, margin_ms - 250)


class SetupError(Exception):
    """The run could not start (one line for the operator, exit 2)."""


# -- faketime ---------------------------------------------------------------------------------


def faketime_lib() -> str | None:
    found = os.environ.get("CHAOS_FAKETIME_LIB")
    candidates = (found,) if found else FAKETIME_LIBS
    return next((path for path in candidates if path and os.path.exists(path)), None)


def faketime_env(lib: str, stamp_file: str) -> dict[str, str]:
    """Only the wall clock faked, its offset re-read from `stamp_file` on every call."""
    return {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": stamp_file,
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def write_offset(stamp_file: str, offset_s: float) -> None:
    """Atomically: libfaketime re-reads the file by name on every clock call."""
    tmp = stamp_file + ".tmp"
    with open(tmp, "w", encoding="ascii") as handle:
        handle.write(f"{offset_s:+.3f}\n")
    os.replace(tmp, stamp_file)


PROBE = """
import json, sys, time
def read():
    return time.time(), time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME)
before = read()
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
after = read()
print(json.dumps([b - a for a, b in zip(before, after)]))
"""


def probe_faketime(lib: str, workdir: str, step_s: float = 100.0) -> dict[str, Any]:
    """Start a process the way the Control API is started; step its clock; what moved?"""
    stamp = os.path.join(workdir, "faketime-probe")
    write_offset(stamp, 0.0)
    env = child_env(**faketime_env(lib, stamp))
    with subprocess.Popen(
        [sys.executable, "-c", PROBE],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdout.readline()
            write_offset(stamp, step_s)
            out, err = proc.communicate("go\n", timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            return {"ok": False, "error": "probe timed out"}
    try:
        wall, mono, boot = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": (err or out).strip()[-200:]}
    ok = abs(wall - step_s) < 5.0 and abs(mono) < 5.0 and abs(boot) < 5.0
    return {
        "ok": ok,
        "lib": lib,
        "step_s": step_s,
        "wall_moved_s": round(wall, 3),
        "monotonic_moved_s": round(mono, 3),
        "boottime_moved_s": round(boot, 3),
    }


# -- PostgreSQL -------------------------------------------------------------------------------


def postgres_dsn(given: str | None) -> str:
    dsn = given or os.environ.get("CONDUCTORD_TEST_POSTGRES_DSN", "").strip()
    if not dsn:
        path = os.path.join(
            os.environ.get("CONDUCTORD_PG_DIR") or "/tmp/conductord-postgres", "dsn"
        )
        try:
            with open(path, encoding="utf-8") as handle:
                dsn = handle.read().strip()
        except OSError:
            dsn = ""
    if not dsn:
        raise SetupError("--store postgres needs --postgres-dsn or CONDUCTORD_TEST_POSTGRES_DSN")
    return dsn


class PostgresSchema:
    """A fresh schema for one run; `url` (no password: it goes in PGPASSWORD) selects it."""

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise SetupError("--store postgres needs psycopg (pip install -e '.[test]')") from exc
        self._psycopg = psycopg
        self._dsn = dsn
        self.schema = f"chaos_{os.urandom(6).hex()}"
        parts = urlsplit(dsn)
        self.password = parts.password or ""
        netloc = parts.hostname or "127.0.0.1"
        if parts.username:
            netloc = f"{quote(parts.username)}@{netloc}"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        query = parts.query + ("&" if parts.query else "")
        query += "options=" + quote(f"-csearch_path={self.schema}")
        self.url = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
        self._run(f"CREATE SCHEMA {self.schema}")

    def _run(self, statement: str) -> None:
        try:
            with self._psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(statement)
        except self._psycopg.Error as exc:
            raise SetupError(f"PostgreSQL: {type(exc).__name__} (schema {self.schema})") from None

    def drop(self) -> None:
        with contextlib.suppress(SetupError):
            self._run(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


# -- processes --------------------------------------------------------------------------------


class ControlApiRunner:
    """The reference Control API, restartable on the same database, clock under libfaketime."""

    def __init__(self, args: argparse.Namespace, workdir: str, token: str) -> None:
        self.args = args
        self.workdir = workdir
        self.token = token
        self.stamp_file = os.path.join(workdir, "faketime-api")
        self.offset_s = 0.0
        self.lib = faketime_lib()
        self.pg: PostgresSchema | None = None
        self.db = os.path.join(workdir, "control.sqlite3")
        if args.store == "postgres":
            self.pg = PostgresSchema(postgres_dsn(args.postgres_dsn))
            self.db = self.pg.url
        self.procs: list[Proc] = []
        self.proc: Proc | None = None
        self.port = 0
        self.events: Counter[str] = Counter()

    def start(self) -> int:
        extra = {"BAA_SHARED_TOKEN": self.token}
        if self.lib is not None:
            write_offset(self.stamp_file, self.offset_s)
            extra.update(faketime_env(self.lib, self.stamp_file))
        if self.pg is not None and self.pg.password:
            extra["PGPASSWORD"] = self.pg.password
        argv = [*CONDUCTORD, "control-api", "--listen", "127.0.0.1:0", "--db", self.db]
        proc = Proc(argv, env=child_env(**extra), name="control-api")
        self.procs.append(proc)
        listening = proc.wait_for(is_event("control_api.listening"), timeout=START_TIMEOUT_S)
        if listening is None:
            proc.kill_group()
            raise SetupError(f"the Control API did not start: {proc.tail_stderr()}")
        self.proc = proc
        self.port = int(listening["port"])
        return self.port

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill_group()

    def step_clock(self, step_s: float) -> None:
        self.offset_s += step_s
        write_offset(self.stamp_file, self.offset_s)

    def lease_events(self) -> list[dict[str, Any]]:
        """The server's holder changes (grants, takeovers, conflicts) as it logged them."""
        names = ("lease.granted", "lease.takeover", "lease.instance_conflict")
        return [
            event
            for proc in self.procs
            for event in proc.snapshot_events()
            if event.get("event") in names
        ]

    def close(self) -> None:
        for proc in self.procs:
            proc.kill_group()
        if self.pg is not None:
            self.pg.drop()


@dataclass
class Incarnation:
    """One process of one node; a restart is a new incarnation."""

    node: Node
    proc: Proc
    status_port: int
    record: PollRecord
    poller: Poller | None = None
    killed_at: float | None = None

    @property
    def key(self) -> str:
        return self.record.key


def send_signal(inc: Incarnation, signum: int) -> None:
    """To a process we started and have not reaped (Popen checks, so a reused pid is safe)."""
    with contextlib.suppress(ProcessLookupError):
        inc.proc.proc.send_signal(signum)


@dataclass
class Node:
    index: int
    node_id: str
    state_dir: str
    proxy: FaultProxy
    incarnations: list[Incarnation] = field(default_factory=list)
    paused: bool = False

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations else None


def abandon(conn: http.client.HTTPConnection) -> None:
    """Close with RST: a paused node then finds the polls it missed already dead when it wakes,
    instead of answering each of them before the one that is still waiting."""
    if conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class Poller(threading.Thread):
    """Polls one incarnation's `/v1/status` every `interval_s` until stopped or it exits."""

    def __init__(self, inc: Incarnation, interval_s: float) -> None:
        super().__init__(name=f"poll-{inc.key}", daemon=True)
        self.inc = inc
        self.interval_s = interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        record = self.inc.record
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            alive = self.inc.proc.alive
            sent = time.monotonic()
            ok, enabled, term = False, False, None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(
                        "127.0.0.1", self.inc.status_port, timeout=POLL_TIMEOUT_S
                    )
                conn.request("GET", "/v1/status")
                reply = conn.getresponse()
                body = reply.read()
                if reply.status == 200:
                    daemon = json.loads(body)["daemon"]
                    ok, enabled = True, daemon["scheduler_enabled"] is True
                    term = daemon.get("current_term")
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
                pass
            if not ok and conn is not None:
                abandon(conn)
                conn = None
            record.add(sent, time.monotonic(), ok, enabled, term)
            if not alive:
                break  # one failed poll after the exit records it
            next_at += self.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
            elif self.stop_event.wait(delay):
                break
        if conn is not None:
            conn.close()
        record.finish()


class Fleet:
    def __init__(
        self, args: argparse.Namespace, workdir: str, token: str, api: ControlApiRunner
    ) -> None:
        self.args = args
        self.workdir = workdir
        self.token = token
        self.api = api
        self.nodes: list[Node] = []
        self.child_lock = os.path.join(workdir, "children.lock")
        self.child_log = os.path.join(workdir, "children.log")
        self.restarts = 0
        for index in range(args.nodes):
            state_dir = os.path.join(workdir, "state", f"n{index}")
            os.makedirs(state_dir)
            proxy = FaultProxy(f"n{index}", api.port, seed=args.seed * 1000 + index)
            self.nodes.append(Node(index, f"chaos-n{index}", state_dir, proxy))

    def argv(self, node: Node, status_port: int) -> list[str]:
        a = self.args
        argv = fleet_node_argv(
            node_id=node.node_id,
            index=node.index,
            control_api_base=node.proxy.url,
            local_api=f"http://127.0.0.1:{status_port}",
            ttl_sec=a.ttl_sec,
            renew_ms=a.renew_ms,
            request_timeout_ms=a.request_timeout_ms,
            runs_dir=self.workdir,  # also puts the run's directory on every node's command line
            heartbeat_ms=HEARTBEAT_MS,
        )
        argv += ["--state-dir", node.state_dir]
        if a.children == "exec":
            argv += ["--exec", exec_command(self.child_lock, self.child_log)]
            argv += ["--exec-stop-grace-ms", str(exec_grace_ms(a))]
        return argv

    def spawn(self, node: Node) -> Incarnation:
        status_port = free_port()
        env = child_env(BAA_SHARED_TOKEN=self.token)
        if self.args.node_pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([self.args.node_pythonpath, env["PYTHONPATH"]])
        # In its state dir, not the repository: `python -m` puts its cwd first on sys.path, and
        # a package on --node-pythonpath must be able to stand in for conductord.
        proc = Proc(self.argv(node, status_port), env=env, name=node.node_id, cwd=node.state_dir)
        record = PollRecord(f"{node.node_id}#{proc.pid}")
        inc = Incarnation(node, proc, status_port, record)
        node.incarnations.append(inc)
        inc.poller = Poller(inc, self.args.poll_ms / 1000.0)
        inc.poller.start()
        return inc

    @staticmethod
    def started(inc: Incarnation) -> bool:
        return inc.proc.wait_for(is_event("conductor.started"), timeout=START_TIMEOUT_S) is not None

    def wait_started(self, inc: Incarnation) -> None:
        if not self.started(inc):
            code = inc.proc.proc.poll()
            hint = ""
            if code == 2 and self.args.children == "exec":
                hint = " (a conductord without --exec? --children none runs without it)"
            raise SetupError(
                f"{inc.node.node_id} did not start (exit {code}): {inc.proc.tail_stderr(3)}{hint}"
            )

    def incarnations(self) -> list[Incarnation]:
        return [inc for node in self.nodes for inc in node.incarnations]

    def records(self) -> list[PollRecord]:
        return [inc.record for inc in self.incarnations()]

    def leader(self) -> Incarnation | None:
        """The live incarnation whose latest answer was "enabled" (the most recent one wins)."""
        best: Incarnation | None = None
        for node in self.nodes:
            inc = node.current
            if inc is None or not inc.proc.alive or node.paused:
                continue
            record = inc.record
            if record.last_enabled and (
                best is None or (record.last_at or 0) > (best.record.last_at or 0)
            ):
                best = inc
        return best

    def stop_pollers(self) -> None:
        for inc in self.incarnations():
            if inc.poller is not None:
                inc.poller.stop_event.set()
        for inc in self.incarnations():
            if inc.poller is not None:
                inc.poller.join(timeout=POLL_TIMEOUT_S + 2)

    def close(self) -> None:
        for node in self.nodes:
            node.proxy.heal()
            for inc in node.incarnations:
                send_signal(inc, signal.SIGCONT)
                inc.proc.kill_group()
            node.proxy.close()


# -- the nemesis ------------------------------------------------------------------------------


@dataclass
class Fault:
    n: int
    kind: str
    pause_s: float
    target: str  # leader | other | all | api
    pick: float  # which node, when the target leaves a choice
    params: dict[str, float]
    at_s: float | None = None
    end_s: float | None = None
    node: str | None = None  # the node id it hit (None: the Control API or every path)
    hit_leader: bool = False
    leader_key: str | None = None
    at_mono: float | None = None
    failover_s: float | None = None
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        shown = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("at_mono", "leader_key")
        }
        shown["params"] = {k: round(v, 3) for k, v in self.params.items()}
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in shown.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        # The intent, not the node it happened to hit: "leader" is whoever leads at the time.
        names = ("n", "kind", "pause_s", "target", "pick", "params")
        return cls(**{k: data[k] for k in names})


class Deck:
    """Kinds in seeded rounds: every kind once per round, so short runs cover them all."""

    def __init__(self, kinds: tuple[str, ...], rng: random.Random) -> None:
        self.kinds = kinds
        self.rng = rng
        self._left: list[str] = []

    def draw(self) -> str:
        if not self._left:
            self._left = self.rng.sample(self.kinds, len(self.kinds))
        return self._left.pop()


def draw_fault(n: int, kind: str, rng: random.Random, ttl: float) -> Fault:
    """Parameters from the seed alone, never from the fleet's state, so a seed reproduces."""
    pause = rng.uniform(0.3, 1.2)
    pick = rng.random()
    if kind == "node_kill":
        target = "leader" if rng.random() < 0.7 else "other"
        params = {"restart_after_s": rng.uniform(0.1, 1.5 * ttl)}
    elif kind == "node_pause":
        target = "leader" if rng.random() < 0.7 else "other"
        params = {"pause_s": ttl + rng.uniform(0.3, 1.5)}
    elif kind == "api_kill":
        target = "api"
        params = {"restart_after_s": rng.uniform(0.0, 1.5)}
    elif kind == "clock_step":
        target = "api"
        params = {"step_s": rng.uniform(0.5 * ttl, 30.0)}
    else:
        roll = rng.random()
        target = "leader" if roll < 0.5 else "other" if roll < 0.8 else "all"
        duration = rng.uniform(0.3, 2.0 * ttl + 1.0)
        params = {"duration_s": duration}
        if kind == "net_latency":
            params["latency_s"] = rng.uniform(0.05, 0.8)
        elif kind == "net_reset":
            params["duration_s"] = rng.uniform(0.2, 1.5)
    return Fault(n, kind, pause, target, pick, params)


def plan(args: argparse.Namespace) -> list[Fault]:
    """The faults of a run: a replayed schedule, or `--faults` draws from `--seed`."""
    if args.replay:
        return args.replay
    rng = random.Random(args.seed)
    deck = Deck(args.kinds, rng)
    return [draw_fault(n, deck.draw(), rng, float(args.ttl_sec)) for n in range(1, args.faults + 1)]


class Nemesis:
    def __init__(
        self, args: argparse.Namespace, fleet: Fleet, api: ControlApiRunner, t0: float
    ) -> None:
        self.args = args
        self.fleet = fleet
        self.api = api
        self.t0 = t0
        self.ttl = float(args.ttl_sec)
        self.faults: list[Fault] = []
        self.unsettled = 0

    def run(self, deadline: float) -> None:
        for fault in plan(self.args):
            if time.monotonic() + fault.pause_s > deadline:
                progress(f"time bound reached after {len(self.faults)} faults")
                break
            time.sleep(fault.pause_s)
            self.inject(fault)
            self.faults.append(fault)
            progress(
                f"fault {fault.n}: {fault.kind} {fault.node or fault.target}"
                f"{' (leader)' if fault.hit_leader else ''} "
                f"{ {k: round(v, 2) for k, v in fault.params.items()} }"
                + (f" ({fault.note})" if fault.note else "")
            )
            self.settle(deadline)

    def now_s(self) -> float:
        return time.monotonic() - self.t0

    def resolve(self, fault: Fault) -> Node | None:
        nodes = self.fleet.nodes
        leader = self.fleet.leader()
        fault.leader_key = leader.key if leader else None
        if fault.target == "leader" and leader is not None:
            node = leader.node
        elif fault.target in ("leader", "other"):
            others = [n for n in nodes if leader is None or n is not leader.node]
            node = others[min(int(fault.pick * len(others)), len(others) - 1)]
        else:
            return None
        fault.node = node.node_id if node else None
        fault.hit_leader = node is not None and leader is not None and node is leader.node
        return node

    def inject(self, fault: Fault) -> None:
        node = self.resolve(fault) if fault.target != "api" else None
        fault.at_mono = time.monotonic()
        fault.at_s = self.now_s()
        p = fault.params
        try:
            if fault.kind == "node_kill" and node is not None:
                restarted = self.kill_node(node, p["restart_after_s"])
                if restarted is not None and not self.fleet.started(restarted):
                    fault.note = "the restarted node did not start in time"
            elif fault.kind == "node_pause" and node is not None:
                self.pause_node(node, p["pause_s"])
            elif fault.kind == "api_kill":
                self.api.kill()
                time.sleep(p["restart_after_s"])
                try:
                    port = self.api.start()
                except SetupError:  # once more (a loaded machine); a second failure ends the run
                    port = self.api.start()
                for each in self.fleet.nodes:
                    each.proxy.set_upstream(port)
            elif fault.kind == "clock_step":
                if self.api.lib is None:
                    fault.note = "no libfaketime"
                self.api.step_clock(p["step_s"])
            elif fault.kind in NET_KINDS:
                proxies = [node.proxy] if node is not None else [n.proxy for n in self.fleet.nodes]
                self.net_fault(fault.kind, proxies, p)
        finally:
            fault.end_s = self.now_s()

    def kill_node(self, node: Node, restart_after_s: float) -> Incarnation | None:
        inc = node.current
        if inc is None:
            return None
        inc.killed_at = time.monotonic()
        send_signal(inc, signal.SIGKILL)  # the daemon only: its --exec guard must cope
        inc.proc.wait_exit(timeout=5)
        time.sleep(restart_after_s)
        self.fleet.restarts += 1
        return self.fleet.spawn(node)

    def pause_node(self, node: Node, pause_s: float) -> None:
        inc = node.current
        if inc is None or not inc.proc.alive:
            return
        node.paused = True
        try:
            send_signal(inc, signal.SIGSTOP)
            time.sleep(pause_s)
        finally:
            send_signal(inc, signal.SIGCONT)
            node.paused = False

    @staticmethod
    def net_fault(kind: str, proxies: list[FaultProxy], p: dict[str, float]) -> None:
        try:
            for proxy in proxies:
                if kind == "net_latency":
                    proxy.set_latency(p["latency_s"])
                elif kind == "net_drop":
                    proxy.set_blackhole(True)
                else:
                    proxy.set_reset(True)
            time.sleep(p["duration_s"])
        finally:
            for proxy in proxies:
                proxy.heal()

    def settle(self, deadline: float) -> None:
        """Until some node leads again (bounded): the next fault then starts from a fleet."""
        limit = min(time.monotonic() + 3 * self.ttl + 5.0, deadline)
        while time.monotonic() < limit:
            if self.fleet.leader() is not None:
                return
            time.sleep(0.02)
        self.unsettled += 1


# -- the run ----------------------------------------------------------------------------------


def leftover_pids(marker: str) -> list[int]:
    """Processes (not this one) whose command line names the run's directory."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if needle in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_leftovers(workdir: str) -> int:
    """Kill what still names the run's directory: `--exec` children and guards, with their groups.

    Every process of the run has the directory on its command line (the nodes' --runs-dir, the
    children's --lock), so this reaches only processes this run started.
    """
    left = leftover_pids(workdir)
    own_group = os.getpgid(0)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(pid)
            if pgid != own_group:
                os.killpg(pgid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
    return len(left)


def transitions_near(incs: list[Incarnation], at: float, t0: float) -> list[dict[str, Any]]:
    """The nodes' own `lease.transition` lines within 3 s of `at` (evidence of an episode)."""
    found = []
    for inc in incs:
        for event in inc.proc.snapshot_events():
            if event.get("event") == "lease.transition" and abs(event["_seen_mono"] - at) <= 3.0:
                found.append(
                    {
                        "node": inc.key,
                        "at_s": round(event["_seen_mono"] - t0, 3),
                        "from": event.get("from_state"),
                        "to": event.get("to_state"),
                        "reason": event.get("reason"),
                        "term": event.get("term"),
                    }
                )
    return sorted(found, key=lambda t: t["at_s"])


def read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readlines()
    except FileNotFoundError:
        return []


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["python", "bench/chaos.py", "--seed", str(args.seed), "--faults", str(args.faults)]
    parts += ["--nodes", str(args.nodes), "--store", args.store, "--ttl-sec", str(args.ttl_sec)]
    parts += [
        "--renew-ms",
        str(args.renew_ms),
        "--request-timeout-ms",
        str(args.request_timeout_ms),
    ]
    parts += ["--children", args.children, "--kinds", ",".join(args.kinds)]
    parts += ["--poll-ms", str(args.poll_ms)]
    return " ".join(parts)


def run(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    began = time.monotonic()
    load_before = round(os.getloadavg()[0], 2)
    token = new_token()
    faketime: dict[str, Any] | None = None
    if "clock_step" in args.kinds:
        lib = faketime_lib()
        if lib is None:
            raise SetupError("clock_step needs libfaketime (apt-get install faketime)")
        faketime = probe_faketime(lib, workdir)
        if not faketime["ok"]:
            raise SetupError(f"libfaketime does not step the wall clock alone: {faketime}")

    api = ControlApiRunner(args, workdir, token)
    fleet: Fleet | None = None
    nemesis: Nemesis | None = None
    t0 = t0_wall = 0.0
    leftovers = 0
    try:
        api.start()
        fleet = Fleet(args, workdir, token, api)
        for node in fleet.nodes:
            fleet.spawn(node)
        for node in fleet.nodes:
            assert node.current is not None
            fleet.wait_started(node.current)
        deadline_leader = time.monotonic() + args.ttl_sec + 10.0
        while fleet.leader() is None and time.monotonic() < deadline_leader:
            time.sleep(0.02)
        if fleet.leader() is None:
            raise SetupError("no node became leader")
        progress(f"fleet of {args.nodes} up; control API {api.port}; {args.store}")
        t0, t0_wall = time.monotonic(), time.time()
        nemesis = Nemesis(args, fleet, api, t0)
        nemesis.run(deadline=began + args.max_seconds)
        time.sleep(args.ttl_sec + 1.0)  # watch the healed fleet for one more TTL
        end = time.monotonic()
        fleet.stop_pollers()
    finally:
        if fleet is not None:
            fleet.stop_pollers()
            fleet.close()
        api.close()
        found = child_log(read_lines(os.path.join(workdir, "children.log")), t0_wall=t0_wall)
        leftovers = kill_leftovers(workdir)

    records = fleet.records()
    proofs = proven_overlaps(records)
    overlap_episodes = episodes(proofs)
    for episode in overlap_episodes:
        episode["at_s"] = round(episode.pop("at") - t0, 3)
    by_key = {inc.key: inc for inc in fleet.incarnations()}
    for episode in overlap_episodes[:EVIDENCE_CAP]:
        episode["transitions"] = transitions_near(
            [by_key[k] for k in (episode["node"], episode["other"]) if k in by_key],
            episode["at_s"] + t0,
            t0,
        )
    api_events = api.lease_events()
    takeovers = [
        {
            "at_s": round(event["_seen_mono"] - t0, 3),
            "term": event.get("term"),
            "holder_id": event.get("holder_id"),
            "previous_holder_id": event.get("previous_holder_id"),
            "previous_term": event.get("previous_term"),
            "expired_for_sec": event.get("expired_for_sec"),
        }
        for event in api_events
        if event.get("event") == "lease.takeover"
    ]
    index = EnabledIndex(records)
    faults = nemesis.faults
    failovers = []
    for i, fault in enumerate(faults):
        if fault.kind in ("node_kill", "node_pause") and fault.hit_leader and fault.leader_key:
            until = faults[i + 1].at_mono if i + 1 < len(faults) else end
            assert fault.at_mono is not None and until is not None
            regained = index.first_after(fault.at_mono, not_key=fault.leader_key, until=until)
            if regained is not None:
                fault.failover_s = regained - fault.at_mono
                failovers.append(fault.failover_s)
    no_leader_s, longest_s, stretches = leaderless(records, t0, end)

    exec_mode = args.children == "exec"
    flock_overlaps = found.flock_overlaps if exec_mode else None
    stale_writes = found.stale_writes if exec_mode else None
    violations = len(proofs) + (flock_overlaps or 0) + (stale_writes or 0)
    by_kind = Counter(f.kind for f in faults)
    result: dict[str, Any] = {
        "bench": "chaos",
        "seed": args.seed,
        "faults": args.faults,
        "nodes": args.nodes,
        "store": args.store,
        "ttl_sec": args.ttl_sec,
        "renew_ms": args.renew_ms,
        "request_timeout_ms": args.request_timeout_ms,
        "children": args.children,
        "kinds": list(args.kinds),
        "replayed": bool(args.replay),
        "faults_injected": len(faults),
        "faults_by_kind": {kind: by_kind.get(kind, 0) for kind in args.kinds},
        "two_scheduler_polls": len(proofs),
        "overlap_episodes": len(overlap_episodes),
        "flock_overlaps": flock_overlaps,
        "stale_writes": stale_writes,
        "violations": violations,
        # With exec children, a run in which none ever ran has checked no overlap at all.
        "checked_children": found.runs > 0 if exec_mode else None,
        "pass": violations == 0 and (not exec_mode or found.runs > 0),
        "no_leader_s": round(no_leader_s, 3),
        "longest_no_leader_s": round(longest_s, 3),
        "no_leader_stretches": stretches,
        "failover_s": summary(failovers),
        "leader_faults_without_failover": sum(
            1
            for f in faults
            if f.kind in ("node_kill", "node_pause") and f.hit_leader and f.failover_s is None
        ),
        "unsettled_faults": nemesis.unsettled,
        "polls": sum(r.polls for r in records),
        "polls_failed": sum(r.failures for r in records),
        "poll_ms": args.poll_ms,
        "enabled_answers": sum(len(r.enabled) for r in records),
        "incarnations": len(records),
        "node_restarts": fleet.restarts,
        "api_starts": len(api.procs),
        "api_lease_events": dict(Counter(event["event"] for event in api_events)),
        "api_clock_offset_s": round(api.offset_s, 3),
        "proxy": {
            "connections": sum(n.proxy.connections_total for n in fleet.nodes),
            "resets": sum(n.proxy.resets_total for n in fleet.nodes),
        },
        "child_runs": found.runs if exec_mode else None,
        "child_log_lines": found.lines if exec_mode else None,
        "leftover_processes_killed": leftovers,
        "faketime": faketime,
        "evidence": {
            "overlap_episodes": overlap_episodes[:EVIDENCE_CAP],
            "proofs": [p.as_dict(t0) for p in proofs[:EVIDENCE_CAP]],
            "children": found.evidence,
            "api_takeovers": takeovers[-EVIDENCE_CAP:],
        },
        "elapsed_s": round(time.monotonic() - began, 1),
        "loadavg_1m_at_start": load_before,
        "machine": machine_info(),
    }
    if violations:
        schedule = [f.as_dict() for f in faults]
        result["reproduce"] = reproduce_command(args)
        result["schedule"] = schedule
        progress(f"VIOLATIONS: {violations}; reproduce: {result['reproduce']}")
        progress("or save the JSON line and rerun with --replay FILE; schedule:")
        for entry in schedule:
            progress("  " + json.dumps(entry, separators=(",", ":")))
    return result


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        named = ", ".join(unknown) or "(none)"
        raise argparse.ArgumentTypeError(f"unknown fault kind(s) {named}; one of {','.join(KINDS)}")
    return kinds


def load_replay(path: str) -> list[Fault]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.loads(handle.read().strip().splitlines()[-1])
        entries = data["schedule"] if isinstance(data, dict) else data
        return [Fault.from_dict(entry) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SetupError(f"--replay {path}: not a chaos result or schedule ({exc})") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="seed of the nemesis (1)")
    parser.add_argument("--faults", type=int, default=20, help="faults to inject (20)")
    parser.add_argument("--nodes", type=int, default=5, help="fleet size, >= 2 (5)")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-dsn", default=None, help="default: the test server's DSN")
    parser.add_argument("--ttl-sec", type=int, default=2, help="lease TTL (2)")
    parser.add_argument("--renew-ms", type=int, default=250, help="renew interval (250)")
    parser.add_argument("--request-timeout-ms", type=int, default=1000, help="(1000)")
    parser.add_argument(
        "--children", choices=("exec", "none"), default="exec", help="--exec flock children"
    )
    parser.add_argument(
        "--kinds",
        type=parse_kinds,
        default=KINDS,
        help=f"comma-separated fault kinds (default: all of {','.join(KINDS)})",
    )
    parser.add_argument("--poll-ms", type=int, default=10, help="status polling period (10)")
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="bound on the run (30 + 20 per fault)"
    )
    parser.add_argument("--replay", default=None, help="a failing run's JSON line: its schedule")
    parser.add_argument(
        "--node-pythonpath",
        default=None,
        help="prepended to the nodes' PYTHONPATH only, ahead of this checkout's conductord "
        "(tests plant bugs with it)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.faults < 1 or args.poll_ms < 1 or args.ttl_sec < 1:
        parser.error("--nodes must be >= 2, --faults, --poll-ms and --ttl-sec >= 1")
    if args.request_timeout_ms >= args.ttl_sec * 1000:
        parser.error("--request-timeout-ms must be below --ttl-sec x 1000 (SPEC §3)")
    if args.children == "exec" and exec_grace_ms(args) < 50:
        parser.error("--children exec needs a step-down margin of >= 300 ms (raise --ttl-sec)")
    if args.max_seconds is None:
        args.max_seconds = 30.0 + 20.0 * args.faults
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the `finally:` blocks kill every process of the run.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if args.replay:
            args.replay = load_replay(args.replay)
            args.faults = len(args.replay)
            args.kinds = tuple(dict.fromkeys(f.kind for f in args.replay))
        with tempfile.TemporaryDirectory(prefix="conductord-chaos-") as workdir:
            result = run(args, workdir)
    except SetupError as exc:
        sys.stderr.write(f"chaos: error: {exc}\n")
        return EXIT_USAGE
    emit(result)
    if result["violations"]:
        return EXIT_VIOLATION
    if result["checked_children"] is False:
        sys.stderr.write("chaos: error: no --exec child ever ran: the run checked nothing\n")
        return EXIT_VIOLATION
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
