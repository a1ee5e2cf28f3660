"""Control API capacity: K simulated nodes heartbeating and renewing (SPEC §11).

Rerun (from the repository root; about 55 s at the defaults):

    .venv/bin/python bench/control_api_load.py                          # 500 nodes, 30 s
    .venv/bin/python bench/control_api_load.py --nodes 20 --seconds 2   # quick look

Set-up: the reference Control API (`conductord control-api`, a subprocess, a real SQLite file
in WAL mode, a shared token) and `--procs` load-generator processes (this script run with
`--worker`; gevent, monkey-patched first thing), each simulating its share of the `--nodes`.
Every simulated node has its own keep-alive connection and sends the daemon's wire bodies
(TTL 30 s): one node holds the lease and renews, every other one is denied. The parent only
spawns, commands (one JSON line on each worker's stdin), samples CPU and merges; it sends no
requests, so one Python generator process is never what saturates.

Pacing is open-loop: each node has a schedule (random initial phase; a heartbeat, then half
an interval later an acquire/renew, each step ±10 % jitter), so the offered rate is
nodes x 2 / interval whatever the latency. A node whose previous answer is late sends the
next request at once, late. Latency is measured twice: from the actual send (what the server
and the wire cost) and from the scheduled send time (what a node waits; this one does not
hide the queueing behind a slow answer, i.e. no coordinated omission). The pass verdict uses
the scheduled one. Requests count by their scheduled time inside the window; `rps` counts
answers received inside it. A request still unsent at the drain deadline (window end + 2
request timeouts) is an error.

Clients (`--client`): `socket` (default: a hand-written HTTP/1.1 keep-alive client on one
socket, the cheapest, so the generator steals the least CPU from the server on a small
machine), `raw` (`http.client`) and `requests` (a `Session` per node, exactly like the daemon,
about 3 x the generator CPU of `raw`). All three send the same method, path, body and auth.

Measured over `--seconds` after `--warmup-seconds`, from /proc by the parent: CPU of the
server, of the workers and of the whole machine (`/proc/stat`), so `other_cpu_cores` shows
other work on the machine; CPU ms per request on each side; `server_capacity_rps` (1000 / the
server's ms: one Python process, one core at most) and `projected_idle_rps`. Each worker
also measures its own event-loop lag (a 10 ms timer's overshoot): high lag means the
generator, not the server, delayed the sends.

`--saturation-seconds` (default 10; 0 = off) adds a closed-loop run afterwards: every node
sends back-to-back with no pacing, which gives the server's ceiling on this machine.

Output: one JSON line on stdout; progress on stderr. Every child (server, workers) is killed
on the way out. Limits: Linux only; loopback only; the clock shared by parent and workers is
CLOCK_MONOTONIC, which is system-wide on Linux.
"""

import sys

WORKER_FLAG = "--worker"

if __name__ == "__main__" and sys.argv[1:2] == [WORKER_FLAG]:
    # Only a worker runs gevent; the parent uses plain threads and never sends a request.
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from _common import (  # noqa: E402
    ControlApi,
    Proc,
    child_env,
    cpu_ns,
    emit,
    kill_all,
    machine_info,
    new_token,
    percentile,
    progress,
    rounded,
)

TTL_SEC = 30
REQUEST_TIMEOUT_S = 5.0
TARGET_RPS = 1000.0
TARGET_P99_MS = 50.0
TARGET_NODES = 500
KINDS = ("heartbeat", "acquire")
PATHS = {"heartbeat": "/v1/controllers/heartbeat", "acquire": "/v1/leader/acquire"}
LAG_TICK_S = 0.010
TOKEN_ENV = "BAA_SHARED_TOKEN"


# -- /proc ----------------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already inside user/nice; the first 8 fields are the disjoint ones.
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# -- transports (worker side) ---------------------------------------------------------------


class TransportError(Exception):
    """A request that got no HTTP answer; the message is the error kind."""


class SocketTransport:
    """HTTP/1.1 keep-alive over one socket, written for the server's answers only.

    It relies on what the reference server always sends: a Content-Length. It costs a small
    fraction of `http.client`, whose header parsing goes through `email`.
    """

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        lines = [f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
        self.head = "\r\n".join(lines)
        self.sock: socket.socket | None = None

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        try:
            if self.sock is None:
                self.sock = socket.create_connection(
                    ("127.0.0.1", self.port), timeout=REQUEST_TIMEOUT_S
                )
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = f"POST {path} HTTP/1.1\r\n{self.head}\r\nContent-Length: {len(body)}\r\n\r\n"
            self.sock.sendall(request.encode("latin-1") + body)
            return self._read_reply(self.sock, deadline)
        except TimeoutError:
            self.close()
            raise TransportError("timeout") from None
        except (OSError, ValueError) as exc:
            self.close()
            raise TransportError(f"connection: {type(exc).__name__}") from None

    def _read_reply(self, sock: socket.socket, deadline: float) -> tuple[int, bytes]:
        buffer = b""
        for _ in range(1000):  # bounded: a reply is a few hundred bytes
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            buffer += self._recv(sock, deadline)
        else:
            raise ValueError("reply header too long")
        head, rest = buffer[:end].decode("latin-1"), buffer[end + 4 :]
        status_line, *header_lines = head.split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        for _ in range(1000):
            if len(rest) >= length:
                break
            rest += self._recv(sock, deadline)
        if len(rest) != length:
            raise ValueError("reply body length mismatch")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, rest

    @staticmethod
    def _recv(sock: socket.socket, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed by the server")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


class RawTransport:
    """One keep-alive `http.client` connection."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.headers = headers
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S
            )
        try:
            self.conn.request("POST", path, body=body, headers=self.headers)
            reply = self.conn.getresponse()
            return reply.status, reply.read()
        except TimeoutError:
            self.close()
            raise TransportError("timeout") from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError(f"connection: {type(exc).__name__}") from None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class RequestsTransport:
    """One `requests.Session` (keep-alive), set up as the daemon's client sets its own."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        import requests  # only this client needs it (imported after the worker's patching)

        self._requests = requests
        self.url = f"http://127.0.0.1:{port}"
        self.session = requests.Session()
        self.session.trust_env = False  # as the daemon's client: no proxy/netrc lookups per call
        self.session.headers.update(headers)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            reply = self.session.post(self.url + path, data=body, timeout=REQUEST_TIMEOUT_S)
            return reply.status_code, reply.content
        except self._requests.Timeout:
            raise TransportError("timeout") from None
        except self._requests.RequestException as exc:
            raise TransportError(f"connection: {type(exc).__name__}") from None

    def close(self) -> None:
        self.session.close()


TRANSPORTS = {"socket": SocketTransport, "raw": RawTransport, "requests": RequestsTransport}


# -- the worker -----------------------------------------------------------------------------


@dataclass
class Recorder:
    """What one worker saw in one run; requests count by their scheduled time."""

    window_start: float
    window_end: float
    send_us: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in KINDS})
    sched_us: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: Counter = field(default_factory=Counter)
    answered_in_window: int = 0
    loop_lag_us: list[int] = field(default_factory=list)

    def inside(self, t: float) -> bool:
        return self.window_start <= t < self.window_end

    def record(self, kind: str, scheduled: float, sent: float, done: float, error: str | None):
        if error is None and self.inside(done):
            self.answered_in_window += 1
        if not self.inside(scheduled):
            return
        if error is not None:
            self.errors[error] += 1
            return
        self.send_us[kind].append(round((done - sent) * 1e6))
        self.sched_us[kind].append(round((done - scheduled) * 1e6))

    def to_json(self) -> dict[str, Any]:
        return {
            "send_us": self.send_us,
            "sched_us": self.sched_us,
            "errors": dict(self.errors),
            "answered_in_window": self.answered_in_window,
            "loop_lag_us": self.loop_lag_us,
        }


class SimulatedNode:
    def __init__(self, index: int, port: int, token: str, client: str) -> None:
        self.node_id = f"sim-{index:04d}"
        headers = {
            "authorization": f"Bearer {token}",
            "content-type": "application/json",
            "accept": "application/json",
            "user-agent": "conductord-bench",
        }
        self.transport = TRANSPORTS[client](port, headers)
        self.started_at = int(time.time())
        self.status = "standby"

    def body(self, kind: str) -> bytes:
        now = int(time.time())
        if kind == "heartbeat":
            document: dict[str, Any] = {
                "controller_id": self.node_id,
                "host": "127.0.0.1",
                "role": "standby",
                "priority": 50,
                "status": self.status,
                "version": "bench",
                "heartbeat_at": now,
                "started_at": self.started_at,
            }
        else:
            document = {
                "controller_id": self.node_id,
                "host": "127.0.0.1",
                "ttl_sec": TTL_SEC,
                "preferred": False,
                "now": now,
            }
        return json.dumps(document).encode()

    def send(self, kind: str) -> str | None:
        """One request; None when answered 200 with an ok envelope, else the error kind."""
        try:
            status, content = self.transport.post(PATHS[kind], self.body(kind))
        except TransportError as exc:
            return str(exc)
        if status != 200:
            return f"http {status}"
        compact = content.replace(b" ", b"")
        if b'"ok":true' not in compact:
            return "envelope not ok"
        if kind == "acquire":
            self.status = "leader" if b'"is_leader":true' in compact else "standby"
        return None

    def paced(self, interval: float, start: float, drain_until: float, rec: Recorder, rng):
        """Open loop: the schedule never waits for an answer; a late send is sent at once."""
        import gevent

        step = interval / 2.0
        scheduled = start + rng.uniform(0, interval)
        kind_index = rng.randrange(2)
        steps = int((rec.window_end - start) / (step * 0.9)) + 2
        for _ in range(steps):  # bounded by count as well as by the window end
            if scheduled >= rec.window_end:
                return
            kind = KINDS[kind_index]
            delay = scheduled - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            sent = time.monotonic()
            if sent > drain_until:
                rec.record(kind, scheduled, sent, sent, "not sent by the drain deadline")
            else:
                error = self.send(kind)
                rec.record(kind, scheduled, sent, time.monotonic(), error)
            kind_index ^= 1
            scheduled += step * rng.uniform(0.9, 1.1)

    def closed_loop(self, rec: Recorder, max_requests: int) -> None:
        kind_index = 0
        for _ in range(max_requests):
            sent = time.monotonic()
            if sent >= rec.window_end:
                return
            error = self.send(KINDS[kind_index])
            rec.record(KINDS[kind_index], sent, sent, time.monotonic(), error)
            kind_index ^= 1


def _loop_lag(rec: Recorder) -> None:
    import gevent

    for _ in range(int((rec.window_end - time.monotonic()) / LAG_TICK_S) + 2):
        began = time.monotonic()
        if began >= rec.window_end:
            return
        gevent.sleep(LAG_TICK_S)
        if rec.inside(began):
            rec.loop_lag_us.append(round((time.monotonic() - began - LAG_TICK_S) * 1e6))


def worker_main(spec: dict[str, Any]) -> int:
    """A generator process: set up its nodes, then run each command read from stdin."""
    import gevent
    from gevent.pool import Pool

    token = os.environ.get(TOKEN_ENV, "")
    rng = random.Random(spec["seed"])
    nodes = [
        SimulatedNode(i, spec["port"], token, spec["client"])
        for i in range(spec["first"], spec["first"] + spec["count"])
    ]
    # Connect every node and register it once, so the run starts on warm connections.
    setup_errors = Counter(Pool(50).imap_unordered(lambda n: n.send("heartbeat"), nodes))
    setup_errors.pop(None, None)
    emit({"event": "ready", "pid": os.getpid(), "setup_errors": dict(setup_errors)})
    for _ in range(10):  # a handful of commands at most
        line = sys.stdin.readline()
        if not line:
            break
        command = json.loads(line)
        rec = Recorder(command["window_start"], command["window_end"])
        if command["run"] == "paced":
            greenlets = [
                gevent.spawn(
                    node.paced,
                    spec["interval_s"],
                    command["start"],
                    command["drain_until"],
                    rec,
                    random.Random(rng.random()),
                )
                for node in nodes
            ]
            give_up = command["drain_until"] + REQUEST_TIMEOUT_S + 1
        else:
            cap = int((rec.window_end - time.monotonic()) * 20000) + 10
            greenlets = [gevent.spawn(node.closed_loop, rec, cap) for node in nodes]
            give_up = rec.window_end + REQUEST_TIMEOUT_S + 1
        greenlets.append(gevent.spawn(_loop_lag, rec))
        gevent.joinall(greenlets, timeout=max(give_up - time.monotonic(), 0))
        gevent.killall(greenlets, block=True, timeout=5)
        emit(
            {
                "event": "done",
                "run": command["run"],
                "leaders": sum(node.status == "leader" for node in nodes),
                **rec.to_json(),
            }
        )
    for node in nodes:
        node.transport.close()
    return 0


# -- the parent -----------------------------------------------------------------------------


def spawn_workers(args: argparse.Namespace, api: ControlApi, run_dir: str) -> list[Proc]:
    workers = []
    share, extra = divmod(args.nodes, args.procs)
    first = 0
    seed = random.Random(args.seed)
    for index in range(args.procs):
        count = share + (1 if index < extra else 0)
        spec = {
            "port": api.port,
            "first": first,
            "count": count,
            "client": args.client,
            "interval_s": args.interval_ms / 1000.0,
            "seed": seed.random(),
            "run_dir": run_dir,  # on the command line so a leftover worker is easy to find
        }
        first += count
        argv = [sys.executable, os.path.abspath(__file__), WORKER_FLAG, json.dumps(spec)]
        # The token travels in the environment, never in argv.
        env = child_env(**{TOKEN_ENV: api.token})
        workers.append(Proc(argv, env=env, name=f"worker-{index}", stdin=True))
    return workers


def wait_all(workers: list[Proc], predicate, timeout: float, what: str) -> list[dict]:
    deadline = time.monotonic() + timeout
    found = []
    for worker in workers:
        event = worker.wait_for(predicate, timeout=max(deadline - time.monotonic(), 0.1))
        if event is None:
            raise RuntimeError(f"{worker.name} gave no {what}: {worker.tail_stderr()}")
        found.append(event)
    return found


@dataclass
class CpuSample:
    at: float
    server_ns: int
    workers_ns: int
    self_ns: int
    machine_s: float


def sample_cpu(server_pid: int, workers: list[Proc]) -> CpuSample:
    return CpuSample(
        at=time.monotonic(),
        server_ns=cpu_ns(server_pid),
        workers_ns=sum(cpu_ns(w.pid) for w in workers),
        self_ns=cpu_ns("self"),
        machine_s=machine_busy_s(),
    )


def sleep_until(moment: float) -> None:
    time.sleep(max(moment - time.monotonic(), 0))


def run_phase(
    workers: list[Proc], api: ControlApi, command: dict[str, Any], timeout: float
) -> tuple[list[dict], dict[str, Any]]:
    """Send `command` to every worker, sample CPU at the window edges, collect the results."""
    marks = [len(w.snapshot_events()) for w in workers]
    for worker in workers:
        worker.send_line(json.dumps(command))
    sleep_until(command["window_start"])
    first = sample_cpu(api.proc.pid, workers)
    sleep_until(command["window_end"])
    last = sample_cpu(api.proc.pid, workers)
    loadavg = os.getloadavg()[0]
    results = []
    deadline = time.monotonic() + timeout
    for worker, mark in zip(workers, marks, strict=True):
        event = worker.wait_for(
            lambda e: e.get("event") == "done" and e.get("run") == command["run"],
            timeout=max(deadline - time.monotonic(), 0.1),
            after=mark,
        )
        if event is None:
            raise RuntimeError(f"{worker.name} did not finish its run: {worker.tail_stderr()}")
        results.append(event)
    seconds = last.at - first.at
    server, generator = (
        (last.server_ns - first.server_ns) / 1e9 / seconds,
        (last.workers_ns - first.workers_ns) / 1e9 / seconds,
    )
    parent = (last.self_ns - first.self_ns) / 1e9 / seconds
    machine = (last.machine_s - first.machine_s) / seconds
    cpu = {
        "server_cpu_cores": round(server, 3),
        "generator_cpu_cores": round(generator, 3),
        "machine_busy_cores": round(machine, 2),
        # Other work on the machine (1/100 s ticks, so only roughly): steals from the server.
        "other_cpu_cores": round(max(machine - server - generator - parent, 0.0), 2),
        "loadavg_1m_at_window_end": round(loadavg, 2),
    }
    return results, cpu


def pct(values: list[float], q: float) -> float | None:
    return rounded(percentile(values, q), 2)


def merge(results: list[dict], window_s: float, offered_rps: float | None) -> dict[str, Any]:
    send_ms = {k: [x / 1000 for r in results for x in r["send_us"][k]] for k in KINDS}
    sched_ms = {k: [x / 1000 for r in results for x in r["sched_us"][k]] for k in KINDS}
    all_send = send_ms["heartbeat"] + send_ms["acquire"]
    all_sched = sched_ms["heartbeat"] + sched_ms["acquire"]
    # Send lag: how late each request left (a slow previous answer, or the generator's loop).
    lag_ms = [
        b - a
        for k in KINDS
        for r in results
        for a, b in zip(r["send_us"][k], r["sched_us"][k], strict=True)
    ]
    errors: Counter = Counter()
    for r in results:
        errors.update(r["errors"])
    loop_lag_ms = [x / 1000 for r in results for x in r["loop_lag_us"]]
    answered = sum(r["answered_in_window"] for r in results)
    scheduled = len(all_send) + sum(errors.values())
    return {
        "window_s": round(window_s, 2),
        "offered_rps": rounded(offered_rps, 1),
        "scheduled_rps": round(scheduled / window_s, 1) if offered_rps else None,
        "rps": round(answered / window_s, 1),
        "requests": scheduled,
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "p50_ms": pct(all_sched, 50),
        "p90_ms": pct(all_sched, 90),
        "p99_ms": pct(all_sched, 99),
        "max_ms": rounded(max(all_sched, default=None), 2),
        "send_p50_ms": pct(all_send, 50),
        "send_p90_ms": pct(all_send, 90),
        "send_p99_ms": pct(all_send, 99),
        "send_max_ms": rounded(max(all_send, default=None), 2),
        "send_lag_p99_ms": rounded(percentile(lag_ms, 99) / 1000 if lag_ms else None, 2),
        "by_endpoint": {
            k: {
                "requests": len(send_ms[k]),
                "p50_ms": pct(sched_ms[k], 50),
                "p99_ms": pct(sched_ms[k], 99),
                "send_p99_ms": pct(send_ms[k], 99),
            }
            for k in KINDS
        },
        "generator_loop_lag_p99_ms": pct(loop_lag_ms, 99),
        "generator_loop_lag_max_ms": rounded(max(loop_lag_ms, default=None), 2),
        "leaders_seen": sum(r["leaders"] for r in results),
    }


def with_costs(figures: dict[str, Any], procs: int) -> dict[str, Any]:
    """CPU ms per request on each side, and what the server alone could carry.

    `server_capacity_rps`: the server is one Python process (one core at most), so it cannot
    answer more than 1000 / its ms per request. `projected_idle_rps` also charges the
    generator to the same cores: min(that, procs x 1000 / generator ms,
    cores x 1000 / (sum of both)). Both ignore latency; they tell which side runs out first.
    """
    rps, server, generator = (
        figures["rps"],
        figures["server_cpu_cores"],
        figures["generator_cpu_cores"],
    )
    if not rps or not server or not generator:
        return {
            **figures,
            "server_cpu_ms_per_request": None,
            "generator_cpu_ms_per_request": None,
            "server_capacity_rps": None,
            "projected_idle_rps": None,
        }
    server_ms, generator_ms = server * 1000.0 / rps, generator * 1000.0 / rps
    cores = len(os.sched_getaffinity(0))
    return {
        **figures,
        "server_cpu_ms_per_request": round(server_ms, 3),
        "generator_cpu_ms_per_request": round(generator_ms, 3),
        "server_capacity_rps": round(1000.0 / server_ms),
        "projected_idle_rps": round(
            min(
                1000.0 / server_ms,
                procs * 1000.0 / generator_ms,
                cores * 1000.0 / (server_ms + generator_ms),
            )
        ),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=TARGET_NODES, help="simulated nodes (500)")
    parser.add_argument(
        "--interval-ms", type=int, default=800, help="heartbeat + renew cycle per node (800)"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window (30)")
    parser.add_argument("--warmup-seconds", type=float, default=3.0, help="before it (3)")
    parser.add_argument(
        "--saturation-seconds", type=float, default=10.0, help="closed-loop run, 0 = off (10)"
    )
    parser.add_argument(
        "--procs", type=int, default=2, help="load-generator processes sharing the nodes (2)"
    )
    parser.add_argument(
        "--client",
        choices=sorted(TRANSPORTS),
        default="socket",
        help="socket (cheapest), raw (http.client) or requests (a Session per node, as the daemon)",
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.interval_ms < 1 or args.seconds <= 0 or args.procs < 1:
        parser.error("--nodes, --interval-ms, --seconds and --procs must be positive")
    if args.warmup_seconds < 0 or args.saturation_seconds < 0:
        parser.error("--warmup-seconds and --saturation-seconds must be >= 0")
    args.procs = min(args.procs, args.nodes)
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == [WORKER_FLAG]:
        return worker_main(json.loads(argv[1]))
    args = parse_args(argv)
    interval = args.interval_ms / 1000.0
    offered = args.nodes * 2 / interval
    api: ControlApi | None = None
    workers: list[Proc] = []
    loadavg_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="conductord-bench-") as tmp:
        try:
            api = ControlApi(os.path.join(tmp, "control.sqlite3"), token=new_token())
            progress(
                f"control API on {api.url} (pid {api.proc.pid}); {args.nodes} nodes over"
                f" {args.procs} {args.client} worker(s), {offered:.0f} req/s offered"
            )
            workers = spawn_workers(args, api, tmp)
            ready = wait_all(workers, lambda e: e.get("event") == "ready", 60, "ready line")
            setup_errors = sum(sum(r["setup_errors"].values()) for r in ready)

            start = time.monotonic() + 0.5
            window_start = start + args.warmup_seconds
            window_end = window_start + args.seconds
            drain_until = window_end + 2 * REQUEST_TIMEOUT_S
            progress(f"paced run: {args.warmup_seconds:g} s warm-up, {args.seconds:g} s window")
            results, cpu = run_phase(
                workers,
                api,
                {
                    "run": "paced",
                    "start": start,
                    "window_start": window_start,
                    "window_end": window_end,
                    "drain_until": drain_until,
                },
                timeout=drain_until - window_end + 2 * REQUEST_TIMEOUT_S + 10,
            )
            paced = with_costs({**merge(results, args.seconds, offered), **cpu}, args.procs)

            saturation = None
            if args.saturation_seconds > 0:
                progress(f"saturation run: {args.saturation_seconds:g} s closed loop")
                window_start = time.monotonic() + 1.0
                results, cpu = run_phase(
                    workers,
                    api,
                    {
                        "run": "closed",
                        "window_start": window_start,
                        "window_end": window_start + args.saturation_seconds,
                    },
                    timeout=2 * REQUEST_TIMEOUT_S + 10,
                )
                figures = merge(results, args.saturation_seconds, None)
                saturation = with_costs({**figures, **cpu}, args.procs)
            server_alive = api.proc.alive
        finally:
            kill_all([*workers, api])

    meets = (
        args.nodes >= TARGET_NODES
        and paced["rps"] >= TARGET_RPS
        and paced["p99_ms"] is not None
        and paced["p99_ms"] <= TARGET_P99_MS
        and paced["errors"] == 0
        and setup_errors == 0
    )
    emit(
        {
            "bench": "control_api_load",
            "nodes": args.nodes,
            "procs": args.procs,
            "interval_ms": args.interval_ms,
            "client": args.client,
            "offered_rps": paced["offered_rps"],
            "rps": paced["rps"],
            "p50_ms": paced["p50_ms"],
            "p99_ms": paced["p99_ms"],
            "send_p99_ms": paced["send_p99_ms"],
            "errors": paced["errors"] + setup_errors,
            "server_cpu_ms_per_request": paced["server_cpu_ms_per_request"],
            "paced": paced,
            "saturation": saturation,
            "setup_errors": setup_errors,
            "server_alive": server_alive,
            "targets": {
                "nodes": TARGET_NODES,
                "rps": TARGET_RPS,
                "p99_ms": TARGET_P99_MS,
                "errors": 0,
            },
            "pass": bool(meets and server_alive),
            "machine": {**machine_info(), "loadavg_1m_at_start": round(loadavg_before, 2)},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
