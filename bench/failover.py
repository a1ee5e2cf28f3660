"""Failover benchmark: crash failover (kill -9 of the leader) and graceful handover (SIGTERM),
polling and long-poll side by side in one run (SPEC §11, §12).

Rerun (from the repository root, about 4 minutes at the defaults):

    .venv/bin/python bench/failover.py                       # both modes, 30 + 30 trials each
    .venv/bin/python bench/failover.py --mode longpoll       # one mode only
    .venv/bin/python bench/failover.py --trials 5 --nodes 2  # quick look
    .venv/bin/python bench/failover.py --control-apis 2 --api-kill   # SPEC §17, PostgreSQL

Modes: `--mode both` (default) runs polling, then long-poll, each with a fresh reference
Control API (`conductord control-api`, its own SQLite file) and a fresh fleet, so neither run
inherits the other's lease, terms or warm processes. Polling starts the server with
`--no-long-poll` (it then ignores `wait_ms`); long-poll starts it as it ships. The nodes are
the same in both: standbys always send `wait_ms` = their renew interval. Each server's mode is
probed (`server_mode`: a server that answers a contended acquire carrying `wait_ms` at once is
"polling"); a mode whose server probes otherwise does not pass. Both modes use the same
`--seed`, hence the same sequence of signal phases.

Set-up per mode: `--nodes` `python -m conductord start` subprocesses with short timings (TTL
`--ttl-sec`, renew `--renew-ms`, request timeout `--request-timeout-ms`, heartbeat 1 s), each
with its status endpoint on. Crash and graceful trials alternate; before each, a random pause
of up to one renew interval puts the signal at a random phase of the leader's renew cycle.
After each trial the signalled node is restarted (same node id), so the fleet keeps `--nodes`
members.

Several Control API processes (SPEC §17): `--control-apis N` (N >= 2 needs `--store postgres`,
the default then) starts N processes over one fresh schema of the PostgreSQL server
(`--postgres-dsn`, default `CONDUCTORD_TEST_POSTGRES_DSN` or the test server's DSN file; the
password reaches the servers in `PGPASSWORD`, never argv). Every node lists all N URLs, node i
starting at process i mod N, so standbys park on different processes. `--api-kill` adds a third
trial kind after crash and graceful: `kill -9` of the process the leader uses (read from its
`/v1/status`), then one TTL of watching: the time until the leader's next successful lease call
(through another process; target below the step-down margin, so it never loses its lease),
lease transitions on every node (target 0), and whether it still leads with the same term. The
process is then restarted on its port.

Measured per trial: from a wall-clock stamp taken just before the signal to the `timestamp` of
another node's `lease.transition` line with `to_state: leader` (all processes share this
machine's clock; pipe and parsing delays do not count). Reported per kind: median, p90, max in
seconds and as a ratio of the TTL (crash) or the renew interval (graceful), and trials where no
node took over within TTL + renew + request timeout + 3 s.

Safety, two ways, both must be 0:
- `overlap_ms` from the logs: per process, scheduler-enabled intervals run from a transition to
  `leader` to the first later line whose snapshot shows `scheduler_enabled: false` or that
  leaves `leader` (SIGTERM disables the scheduler at `conductor.stopping`, before the release);
  a killed process's interval ends at the kill instant. The total time two intervals overlap.
- `status_overlap_samples` from polling every node's `/v1/status` every `--status-poll-ms`:
  when node X reports the scheduler enabled in two consecutive polls with the same term, X was
  enabled all the time between them; any other node's "enabled" answer whose whole request
  fell inside that span is a proven overlap. (A plain "two said yes in one polling round" is
  not proof: the round itself takes time.) When the daemon serves no status endpoint, this is
  reported as `status_endpoint: "unavailable"`.

Output: one JSON line on stdout: the parameters, `modes` (one object per mode run, with its
figures, `targets` (the SPEC §11 column of that mode, seconds) and `pass`), `side_by_side`
(the headline figures per mode), an overall `pass` (every mode run passed) and the machine
with its load average. Progress on stderr. Every process is killed (its whole group) on the
way out of each mode, whatever happens.

Limits: the two modes run one after the other, not interleaved, so a change in the machine's
load between them skews the comparison (`loadavg_1m` per mode records it).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests
from _common import (
    ControlApi,
    Event,
    Proc,
    child_env,
    emit,
    fleet_node_argv,
    free_port,
    is_event,
    kill_all,
    machine_info,
    new_token,
    parse_timestamp,
    percentile,
    probe_server_mode,
    progress,
    rounded,
)

from conductord.lease import default_margin_s

HEARTBEAT_MS = 1000
START_TIMEOUT_S = 20.0
MODES = ("polling", "longpoll")
# The reference server honours `wait_ms` unless told not to (SPEC §12).
SERVER_FLAGS: dict[str, tuple[str, ...]] = {"polling": ("--no-long-poll",), "longpoll": ()}


@dataclass
class Incarnation:
    """One process of one node; a restart is a new incarnation."""

    node_id: str
    proc: Proc
    status_url: str
    killed_at: float | None = None  # wall time of a SIGKILL sent by the benchmark
    ended_at: float | None = None  # wall time the benchmark saw it gone or killed it

    @property
    def key(self) -> str:
        return f"{self.node_id}#{self.proc.pid}"


@dataclass
class Trial:
    kind: str
    old_leader: str
    standbys_parked: bool  # long-poll: every standby parked before the signal (polling: True)
    seconds: float | None = None  # signal -> new leader's transition timestamp
    read_seconds: float | None = None  # signal -> that line read by the benchmark
    new_leader: str | None = None
    exit_code: int | None = None
    api: str | None = None  # api_kill: the Control API process killed (A, B, ...)
    transitions: int | None = None  # api_kill: lease transitions on any node within a TTL
    term_kept: bool | None = None  # api_kill: the leader still led, same term, after a TTL


@dataclass
class ApiSlot:
    """One Control API process of the run, restartable on its port (every node lists its URL)."""

    name: str
    db: str
    token: str
    extra_args: tuple[str, ...]
    env: dict[str, str]
    port: int = 0
    api: ControlApi | None = None
    all: list[ControlApi] = field(default_factory=list)  # every incarnation, for the cleanup

    def start(self) -> ControlApi:
        api = ControlApi(
            self.db, token=self.token, extra_args=self.extra_args, port=self.port, env=self.env
        )
        self.port, self.api = api.port, api
        self.all.append(api)
        return api

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.api is not None and self.api.proc.alive

    def kill(self) -> None:
        if self.api is not None:
            self.api.close()


@dataclass
class Fleet:
    args: argparse.Namespace
    mode: str
    apis: list[ApiSlot]
    token: str
    runs_dir: str  # also puts the run's temporary directory on every node's command line
    live: dict[str, Incarnation] = field(default_factory=dict)
    all: list[Incarnation] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    session: requests.Session = field(default_factory=requests.Session)  # to the Control API

    def spawn(self, index: int) -> Incarnation:
        a = self.args
        node_id = f"bench-n{index}"
        status_url = f"http://127.0.0.1:{free_port()}"
        # Every node lists every Control API, each starting at another (SPEC §17).
        turn = index % len(self.apis)
        urls = [slot.url for slot in self.apis[turn:] + self.apis[:turn]]
        argv = fleet_node_argv(
            node_id=node_id,
            index=index,
            control_api_base=",".join(urls),
            local_api=status_url,
            ttl_sec=a.ttl_sec,
            renew_ms=a.renew_ms,
            request_timeout_ms=a.request_timeout_ms,
            runs_dir=self.runs_dir,
            heartbeat_ms=HEARTBEAT_MS,
        )
        proc = Proc(argv, env=child_env(BAA_SHARED_TOKEN=self.token), name=node_id)
        inc = Incarnation(node_id, proc, status_url)
        with self.lock:
            self.live[node_id] = inc
            self.all.append(inc)
        return inc

    def wait_started(self, inc: Incarnation) -> None:
        if inc.proc.wait_for(is_event("conductor.started"), timeout=START_TIMEOUT_S) is None:
            raise RuntimeError(f"{inc.node_id} did not start: {inc.proc.tail_stderr()}")

    def parked_standbys(self) -> int | None:
        """How many acquires the live servers hold parked now (`GET /v1/leader` `waiters`)."""
        parked = None
        for slot in self.apis:
            if not slot.alive or slot.api is None:
                continue
            try:
                reply = self.session.get(
                    slot.url + "/v1/leader", headers=slot.api.headers, timeout=1.0
                )
                reply.raise_for_status()
                parked = (parked or 0) + int(reply.json()["data"]["waiters"])
            except (requests.RequestException, ValueError, KeyError, TypeError):
                continue
        return parked

    def status(self, inc: Incarnation) -> dict[str, Any] | None:
        """The node's snapshot from its `/v1/status`, or None."""
        try:
            reply = self.session.get(inc.status_url + "/v1/status", timeout=1.0)
            reply.raise_for_status()
            return reply.json()
        except (requests.RequestException, ValueError):
            return None

    def last_renew(self, inc: Incarnation) -> float | None:
        """`conductord_last_renew_timestamp_seconds` from the node's `/metrics`, or None."""
        try:
            reply = self.session.get(inc.status_url + "/metrics", timeout=1.0)
            reply.raise_for_status()
        except requests.RequestException:
            return None
        for line in reply.text.splitlines():
            name, _, value = line.partition(" ")
            if name == "conductord_last_renew_timestamp_seconds":
                try:
                    return float(value)
                except ValueError:
                    return None
        return None

    def settle(self, restarted: Incarnation) -> bool:
        """Wait until the fleet is in its steady state; False if long-poll standbys never parked.

        A started node's lease loop runs its first cycle one renew interval after start, so a
        restarted standby is given 1.5 intervals (both modes). In long-poll mode, every standby
        must also be parked on the server: a handover in the moment after a restart would
        measure the restart, not the steady state the targets are for.
        """
        renew_s = self.args.renew_ms / 1000.0
        started = restarted.proc.wait_for(is_event("conductor.started"), timeout=0)
        since = time.monotonic() - (started or {}).get("_seen_mono", time.monotonic())
        time.sleep(max(1.5 * renew_s - since, 0.0))
        if self.mode != "longpoll":
            return True
        deadline = time.monotonic() + 3 * renew_s + 2.0
        while time.monotonic() < deadline:
            if (self.parked_standbys() or 0) >= self.args.nodes - 1:
                return True
            time.sleep(0.01)
        return False

    def leader(self, timeout: float) -> Incarnation | None:
        """The live incarnation whose latest transition is to leader (waits up to `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                candidates = list(self.live.values())
            for inc in candidates:
                transitions = [
                    e for e in inc.proc.snapshot_events() if e.get("event") == "lease.transition"
                ]
                if transitions and transitions[-1].get("to_state") == "leader" and inc.proc.alive:
                    return inc
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)


def new_leader_after(
    fleet: Fleet, old: Incarnation, signalled_wall: float, timeout: float
) -> tuple[Incarnation, Event] | None:
    """The first `to_state: leader` line of another live node stamped after the signal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with fleet.lock:
            others = [inc for inc in fleet.live.values() if inc is not old]
        found: list[tuple[float, Incarnation, Event]] = []
        for inc in others:
            for event in inc.proc.snapshot_events():
                if event.get("event") == "lease.transition" and event.get("to_state") == "leader":
                    stamp = parse_timestamp(event["timestamp"])
                    if stamp >= signalled_wall:
                        found.append((stamp, inc, event))
                        break
        if found:
            _, inc, event = min(found, key=lambda item: item[0])
            return inc, event
        time.sleep(0.005)
    return None


def run_trial(fleet: Fleet, kind: str, rng: random.Random) -> Trial:
    if kind == "api_kill":
        return run_api_kill(fleet, rng)
    a = fleet.args
    old = fleet.leader(timeout=a.ttl_sec + 5.0)
    if old is None:
        raise RuntimeError("no leader before the trial")
    with fleet.lock:
        newest = fleet.all[-1]
    parked = fleet.settle(newest)
    time.sleep(rng.uniform(0.0, a.renew_ms / 1000.0))  # a random phase of the renew cycle
    trial = Trial(kind, old.node_id, standbys_parked=parked)
    signum = signal.SIGKILL if kind == "crash" else signal.SIGTERM
    signalled_mono = time.monotonic()
    signalled_wall = time.time()
    old.proc.signal(signum)
    if kind == "crash":
        old.killed_at = signalled_wall

    timeout = a.ttl_sec + a.renew_ms / 1000.0 + a.request_timeout_ms / 1000.0 + 3.0
    taken = new_leader_after(fleet, old, signalled_wall, timeout)
    if taken is not None:
        inc, event = taken
        trial.new_leader = inc.node_id
        trial.seconds = parse_timestamp(event["timestamp"]) - signalled_wall
        trial.read_seconds = event["_seen_mono"] - signalled_mono

    trial.exit_code = old.proc.wait_exit(timeout=a.request_timeout_ms / 1000.0 + 5.0)
    if trial.exit_code is None:
        old.proc.kill_group()
        trial.exit_code = old.proc.proc.returncode
    old.ended_at = old.ended_at or time.time()

    index = int(old.node_id.rsplit("n", 1)[1])
    fleet.wait_started(fleet.spawn(index))
    return trial


def run_api_kill(fleet: Fleet, rng: random.Random) -> Trial:
    """`kill -9` of the Control API process the leader uses; then a TTL of watching.

    Measured: from the kill to the end of the leader's first successful lease call after it
    (`conductord_last_renew_timestamp_seconds` from its `/metrics`, polled every 10 ms; that
    call went through another process, unless an answer of the killed one was still being
    read at the kill, which can only make the figure smaller); every node's lease transitions
    until one TTL after the kill, when a lease the leader failed to keep would have run out;
    whether the leader then still leads with the same term. The process is restarted on its
    port afterwards.
    """
    a = fleet.args
    old = fleet.leader(timeout=a.ttl_sec + 5.0)
    if old is None:
        raise RuntimeError("no leader before the trial")
    with fleet.lock:
        newest = fleet.all[-1]
        live = list(fleet.live.values())
    parked = fleet.settle(newest)
    time.sleep(rng.uniform(0.0, a.renew_ms / 1000.0))  # a random phase of the renew cycle
    before = fleet.status(old)
    if before is None:
        raise RuntimeError(f"{old.node_id} did not answer its status endpoint")
    used = before["control_api"]["base_url"]
    slot = next(slot for slot in fleet.apis if slot.url == used)
    term = before["daemon"]["current_term"]
    marks = {inc.key: len(inc.proc.snapshot_events()) for inc in live}
    trial = Trial("api_kill", old.node_id, standbys_parked=parked, api=slot.name)
    killed_wall = time.time()
    slot.kill()

    deadline = time.monotonic() + a.ttl_sec
    while time.monotonic() < deadline:
        renewed = fleet.last_renew(old)
        if renewed is not None and renewed > killed_wall:
            trial.seconds = renewed - killed_wall
            break
        time.sleep(0.01)
    time.sleep(max(killed_wall + a.ttl_sec + a.renew_ms / 1000.0 - time.time(), 0.0))
    trial.transitions = sum(
        1
        for inc in live
        for event in inc.proc.snapshot_events()[marks[inc.key] :]
        if event.get("event") == "lease.transition"
    )
    after = fleet.status(old)
    trial.term_kept = bool(
        after is not None
        and after["daemon"]["lease_state"] == "leader"
        and after["daemon"]["current_term"] == term
    )
    slot.start()  # on its port again: every node lists it
    return trial


# -- safety from the logs -----------------------------------------------------------------


def _enabled(event: Event) -> bool | None:
    daemon = (event.get("snapshot") or {}).get("daemon") or {}
    value = daemon.get("scheduler_enabled")
    return value if isinstance(value, bool) else None


def scheduler_intervals(inc: Incarnation, end_of_run: float) -> list[tuple[float, float]]:
    """[start, end) wall-time intervals in which this process had the scheduler enabled."""
    intervals: list[tuple[float, float]] = []
    opened: float | None = None
    for event in inc.proc.snapshot_events():
        if "timestamp" not in event:
            continue
        stamp = parse_timestamp(event["timestamp"])
        leaving = event.get("event") == "lease.transition" and event.get("from_state") == "leader"
        if opened is None:
            if (
                event.get("event") == "lease.transition"
                and event.get("to_state") == "leader"
                and _enabled(event) is not False
            ):
                opened = stamp
        elif _enabled(event) is False or leaving:
            intervals.append((opened, stamp))
            opened = None
    if opened is not None:
        end = inc.killed_at or inc.ended_at or end_of_run
        intervals.append((opened, max(end, opened)))
    return intervals


def overlap(intervals_by_key: dict[str, list[tuple[float, float]]]) -> tuple[float, int]:
    """(seconds during which >= 2 processes had the scheduler on, number of such episodes)."""
    edges: list[tuple[float, int]] = []
    for spans in intervals_by_key.values():
        for start, end in spans:
            edges.append((start, 1))
            edges.append((end, -1))
    edges.sort(key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same instant
    active, total, episodes, since = 0, 0.0, 0, 0.0
    for stamp, delta in edges:
        if active >= 2:
            total += stamp - since
        before = active
        active += delta
        if before < 2 <= active:
            episodes += 1
        since = stamp
    return total, episodes


# -- safety by polling the status endpoints -----------------------------------------------


@dataclass(frozen=True)
class Sample:
    key: str
    sent: float
    received: float
    enabled: bool
    term: int | None


class StatusPoller(threading.Thread):
    """Polls every live node's `/v1/status` every `interval_s` until stopped."""

    def __init__(self, fleet: Fleet, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.failures = 0
        self.stop_event = threading.Event()
        self._sessions: dict[str, requests.Session] = {}

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            with self.fleet.lock:
                targets = list(self.fleet.live.values())
            for inc in targets:
                if inc.proc.alive:  # a killed node stays listed until its restart
                    self._poll(inc)

    def _poll(self, inc: Incarnation) -> None:
        session = self._sessions.setdefault(inc.key, requests.Session())
        sent = time.monotonic()
        try:
            reply = session.get(inc.status_url + "/v1/status", timeout=0.5)
            reply.raise_for_status()
            daemon = reply.json()["daemon"]
        except (requests.RequestException, ValueError, KeyError, TypeError):
            self.failures += 1
            return
        self.samples.append(
            Sample(
                inc.key,
                sent,
                time.monotonic(),
                bool(daemon.get("scheduler_enabled")),
                daemon.get("current_term"),
            )
        )

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        for session in self._sessions.values():
            session.close()

    def proven_overlaps(self) -> int:
        enabled = sorted((s for s in self.samples if s.enabled), key=lambda s: s.sent)
        sent_times = [s.sent for s in enabled]
        by_key: dict[str, list[Sample]] = {}
        for sample in enabled:
            by_key.setdefault(sample.key, []).append(sample)
        all_by_key: dict[str, list[Sample]] = {}
        for sample in sorted(self.samples, key=lambda s: s.sent):
            all_by_key.setdefault(sample.key, []).append(sample)
        proven = 0
        for key, samples in all_by_key.items():
            for first, second in itertools.pairwise(samples):
                if not (first.enabled and second.enabled and first.term == second.term):
                    continue
                lo, hi = first.received, second.sent
                i = bisect.bisect_left(sent_times, lo)
                while i < len(enabled) and enabled[i].sent <= hi:
                    other = enabled[i]
                    if other.key != key and other.received <= hi:
                        proven += 1
                    i += 1
        return proven


# -- report -------------------------------------------------------------------------------


def targets(mode: str, ttl: float, renew: float) -> dict[str, dict[str, float]]:
    """SPEC §11, in seconds."""
    if mode == "longpoll":
        return {
            "crash": {"median_s": ttl + 0.1, "max_s": ttl + 0.1},
            "graceful": {"median_s": 0.05, "max_s": 0.15},
        }
    return {
        "crash": {"median_s": ttl + renew / 2, "max_s": ttl + renew + 0.3},
        "graceful": {"median_s": renew / 2 + 0.1, "max_s": renew + 0.2},
    }


def summarize(trials: list[Trial], kind: str, unit_s: float, goal: dict[str, float]) -> dict:
    mine = [t for t in trials if t.kind == kind]
    times = [t.seconds for t in mine if t.seconds is not None]
    reads = [t.read_seconds for t in mine if t.read_seconds is not None]
    median = statistics.median(times) if times else None
    worst = max(times) if times else None
    p90 = percentile(times, 90)
    missing = [i for i, t in enumerate(mine) if t.seconds is None]
    unit = "ttl" if kind == "crash" else "renew"
    return {
        "trials": len(mine),
        "takeovers": len(times),
        "no_takeover_trials": missing,
        "median_s": rounded(median),
        "p90_s": rounded(p90),
        "max_s": rounded(worst),
        "min_s": rounded(min(times) if times else None),
        f"median_{unit}_ratio": rounded(median / unit_s if median is not None else None),
        f"p90_{unit}_ratio": rounded(p90 / unit_s if p90 is not None else None),
        f"max_{unit}_ratio": rounded(worst / unit_s if worst is not None else None),
        "median_read_s": rounded(statistics.median(reads) if reads else None),
        "bad_exit_codes": sorted({t.exit_code for t in mine if t.exit_code not in (0, -9)}),
        "unparked_trials": sum(not t.standbys_parked for t in mine),
        "target_median_s": rounded(goal["median_s"]),
        "target_max_s": rounded(goal["max_s"]),
        "pass": bool(
            times
            and not missing
            and median is not None
            and worst is not None
            and median <= goal["median_s"]
            and worst <= goal["max_s"]
        ),
    }


def summarize_api_kill(trials: list[Trial], margin_s: float) -> dict[str, Any]:
    """The api_kill trials: the leader must keep its lease (SPEC §17), renewing through another
    process before its local deadline, i.e. within the step-down margin of the kill."""
    mine = [t for t in trials if t.kind == "api_kill"]
    times = [t.seconds for t in mine if t.seconds is not None]
    worst = max(times) if times else None
    transitions = sum(t.transitions or 0 for t in mine)
    lost = [i for i, t in enumerate(mine) if not t.term_kept]
    return {
        "trials": len(mine),
        "killed": dict(sorted(Counter(t.api for t in mine).items())),
        "renewed_median_s": rounded(statistics.median(times) if times else None),
        "renewed_max_s": rounded(worst),
        "not_renewed_trials": [i for i, t in enumerate(mine) if t.seconds is None],
        "lease_transitions": transitions,
        "term_lost_trials": lost,
        "unparked_trials": sum(not t.standbys_parked for t in mine),
        "target_renewed_max_s": rounded(margin_s),
        "pass": bool(
            mine
            and len(times) == len(mine)
            and worst is not None
            and worst < margin_s
            and transitions == 0
            and not lost
        ),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="trials of each kind per mode (30)")
    parser.add_argument("--nodes", type=int, default=3, help="fleet size, >= 2 (3)")
    parser.add_argument("--ttl-sec", type=int, default=2, help="lease TTL (2)")
    parser.add_argument("--renew-ms", type=int, default=250, help="renew interval (250)")
    parser.add_argument(
        "--request-timeout-ms", type=int, default=1000, help="request timeout (1000)"
    )
    parser.add_argument(
        "--mode",
        choices=("both", *MODES),
        default="both",
        help="both (default): polling, then long-poll, each with a fresh server and fleet",
    )
    parser.add_argument(
        "--status-poll-ms", type=int, default=100, help="status polling period, 0 = off (100)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the random phases")
    parser.add_argument(
        "--control-apis",
        type=int,
        default=1,
        help="Control API processes over one store; every node lists them all (1)",
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default=None,
        help="sqlite (default with one process) or postgres (default, and needed, with more)",
    )
    parser.add_argument(
        "--postgres-dsn",
        default=None,
        help="default: CONDUCTORD_TEST_POSTGRES_DSN, else the test server's (see docs/postgres.md)",
    )
    parser.add_argument(
        "--api-kill",
        action="store_true",
        help="a third trial kind: kill -9 of the Control API process the leader uses",
    )
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.trials < 1 or args.control_apis < 1:
        parser.error("--nodes must be >= 2, --trials and --control-apis >= 1")
    if args.store is None:
        args.store = "sqlite" if args.control_apis == 1 else "postgres"
    if args.control_apis > 1 and args.store != "postgres":
        parser.error("several --control-apis need --store postgres (a SQLite file has one owner)")
    if args.api_kill and args.control_apis < 2:
        parser.error("--api-kill needs --control-apis >= 2")
    if args.request_timeout_ms >= args.ttl_sec * 1000:
        parser.error("--request-timeout-ms must be below --ttl-sec x 1000 (SPEC §3)")
    return args


def run_mode(args: argparse.Namespace, mode: str, workdir: str) -> dict[str, Any]:
    """One mode end to end: its own server, fleet and trials; every process killed at the end."""
    began = time.monotonic()
    load_before = round(os.getloadavg()[0], 2)
    # One seed for both modes: the same sequence of signal phases, a like-for-like comparison.
    rng = random.Random(args.seed)
    token = new_token()
    slots: list[ApiSlot] = []
    schema: Any = None
    fleet: Fleet | None = None
    poller: StatusPoller | None = None
    trials: list[Trial] = []
    os.mkdir(workdir)
    try:
        db, env = os.path.join(workdir, "control.sqlite3"), {}
        if args.store == "postgres":
            # A fresh schema per mode, as a fresh SQLite file; the password goes in PGPASSWORD.
            from chaos import PostgresSchema, SetupError, postgres_dsn

            try:
                schema = PostgresSchema(postgres_dsn(args.postgres_dsn))
            except SetupError as err:
                sys.stderr.write(f"failover: {err}\n")
                raise SystemExit(2) from None
            db = schema.url
            env = {"PGPASSWORD": schema.password} if schema.password else {}
        for number in range(args.control_apis):
            slot = ApiSlot(chr(ord("A") + number), db, token, SERVER_FLAGS[mode], env)
            slots.append(slot)
            slot.start()
        server_mode = probe_server_mode(slots[0].api)
        if server_mode != mode:
            progress(f"warning: {mode} run, but the server probes as {server_mode}")
        shown_urls = ", ".join(f"{slot.name} {slot.url}" for slot in slots)
        progress(f"{mode}: control API {shown_urls} ({args.store}), server mode {server_mode}")

        runs_dir = os.path.join(workdir, "runs")
        os.mkdir(runs_dir)
        fleet = Fleet(args, mode, slots, token, runs_dir)
        for inc in [fleet.spawn(i) for i in range(args.nodes)]:
            fleet.wait_started(inc)
        if fleet.leader(timeout=args.ttl_sec + 5.0) is None:
            raise RuntimeError("no node became leader")
        if args.status_poll_ms > 0:
            poller = StatusPoller(fleet, args.status_poll_ms / 1000.0)
            poller.start()

        kinds = [kind for _ in range(args.trials) for kind in trial_kinds(args)]
        for number, kind in enumerate(kinds, 1):
            trial = run_trial(fleet, kind, rng)
            trials.append(trial)
            shown = "none" if trial.seconds is None else f"{trial.seconds * 1000:.0f} ms"
            if kind == "api_kill":
                outcome = (
                    f"{trial.old_leader} renewed in {shown}, {trial.transitions} transitions,"
                    f" term kept {trial.term_kept}"
                )
            else:
                outcome = f"{trial.old_leader} -> {trial.new_leader} in {shown}"
            killed = f" of {trial.api}" if trial.api else ""
            progress(f"{mode} trial {number}/{len(kinds)} {kind}{killed}: {outcome}")
        end_of_run = time.time()
    finally:
        if poller is not None:
            poller.stop()
        stopped_at = time.time()
        if fleet is not None:
            for inc in fleet.all:
                if inc.proc.alive:
                    inc.ended_at = stopped_at
        kill_all(
            [
                *(inc.proc for inc in (fleet.all if fleet else [])),
                *(api for slot in slots for api in slot.all),
            ]
        )
        if fleet is not None:
            fleet.session.close()
        if schema is not None:
            schema.drop()

    intervals = {inc.key: scheduler_intervals(inc, end_of_run) for inc in fleet.all}
    overlap_s, overlap_episodes = overlap(intervals)
    goal = targets(mode, float(args.ttl_sec), args.renew_ms / 1000.0)
    crash = summarize(trials, "crash", float(args.ttl_sec), goal["crash"])
    graceful = summarize(trials, "graceful", args.renew_ms / 1000.0, goal["graceful"])
    api_kill = None
    if args.api_kill:
        # SPEC §17: the leader renews through another process before its local deadline.
        margin = default_margin_s(args.renew_ms, args.ttl_sec)
        goal["api_kill"] = {"renewed_max_s": margin}
        api_kill = summarize_api_kill(trials, margin)

    status: dict[str, Any] = {"status_endpoint": "off"}
    if poller is not None:
        status = {
            "status_endpoint": "ok" if poller.samples else "unavailable",
            "status_polls_ok": len(poller.samples),
            "status_polls_failed": poller.failures,
            "status_overlap_samples": poller.proven_overlaps(),
        }
    no_takeover = len(crash["no_takeover_trials"]) + len(graceful["no_takeover_trials"])
    return {
        "mode": mode,
        "server_flags": list(SERVER_FLAGS[mode]),
        "server_mode": server_mode,
        "crash": crash,
        "graceful": graceful,
        **({"api_kill": api_kill} if api_kill is not None else {}),
        "no_takeover_trials": no_takeover,
        "overlap_ms": round(overlap_s * 1000.0, 3),
        "overlap_episodes": overlap_episodes,
        "leader_intervals": sum(len(spans) for spans in intervals.values()),
        **status,
        "non_json_stdout_lines": sum(len(inc.proc.non_json) for inc in fleet.all),
        "targets": {kind: {k: rounded(v) for k, v in goal[kind].items()} for kind in goal},
        # A server that does not behave as the mode says measured the wrong thing: a miss.
        "pass": bool(
            server_mode == mode
            and crash["pass"]
            and graceful["pass"]
            and (api_kill is None or api_kill["pass"])
            and overlap_s == 0
            and status.get("status_overlap_samples", 0) == 0
        ),
        "loadavg_1m": [load_before, round(os.getloadavg()[0], 2)],
        "elapsed_s": round(time.monotonic() - began, 1),
    }


def trial_kinds(args: argparse.Namespace) -> tuple[str, ...]:
    return ("crash", "graceful", "api_kill") if args.api_kill else ("crash", "graceful")


def side_by_side(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The headline figures, one row per figure and one column per mode."""
    rows: dict[str, dict[str, Any]] = {}
    for kind in ("crash", "graceful"):
        for figure in ("median_s", "max_s"):
            rows[f"{kind}_{figure}"] = {m: r[kind][figure] for m, r in results.items()}
    if any("api_kill" in r for r in results.values()):
        rows["api_kill_renewed_max_s"] = {
            m: r["api_kill"]["renewed_max_s"] for m, r in results.items()
        }
        rows["api_kill_lease_transitions"] = {
            m: r["api_kill"]["lease_transitions"] for m, r in results.items()
        }
    rows["overlap_ms"] = {m: r["overlap_ms"] for m, r in results.items()}
    rows["pass"] = {m: r["pass"] for m, r in results.items()}
    return rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    modes = MODES if args.mode == "both" else (args.mode,)
    load_before = round(os.getloadavg()[0], 2)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="conductord-bench-") as tmp:
        for mode in modes:
            results[mode] = run_mode(args, mode, os.path.join(tmp, mode))
    emit(
        {
            "bench": "failover",
            "mode": args.mode,
            "nodes": args.nodes,
            "trials": args.trials,
            "ttl_sec": args.ttl_sec,
            "renew_ms": args.renew_ms,
            "request_timeout_ms": args.request_timeout_ms,
            "control_apis": args.control_apis,
            "store": args.store,
            "api_kill": args.api_kill,
            "modes": results,
            "side_by_side": side_by_side(results),
            "pass": all(r["pass"] for r in results.values()),
            "elapsed_s": round(time.monotonic() - began, 1),
            "loadavg_1m_at_start": load_before,
            "machine": machine_info(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
