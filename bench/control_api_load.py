"""Control API capacity: K simulated nodes heartbeating and renewing (SPEC §11).

Rerun (from the repository root; about 50 s at the defaults):

    .venv/bin/python bench/control_api_load.py                          # 500 nodes, 30 s
    .venv/bin/python bench/control_api_load.py --nodes 20 --seconds 2   # quick look

Set-up: the reference Control API (`conductord control-api`, a subprocess, a real SQLite file
in WAL mode, a shared token) and, in this process, `--nodes` greenlets (gevent monkey-patched
first thing), each a simulated node with its own `requests.Session` (keep-alive, like the
daemon). Each sends a heartbeat and then an acquire/renew every `--interval-ms` (±10 % jitter,
start-to-start, random initial phase), with the daemon's wire bodies (TTL 30 s): one node holds
the lease and renews, every other one is denied. That is open-loop pacing: the offered rate is
nodes x 2 / interval whatever the latency; a node that falls behind starts its next cycle at
once and counts a `late_cycles`.

Measured over `--seconds` after `--warmup-seconds`: sustained requests/s (answered, per second
of window), p50/p90/p99/max latency as seen by the client (so it includes this process's own
scheduling delay), and errors by kind (non-200, envelope not ok, timeout, connection). Also
the CPU used by the server and by this load generator in the window (from
`/proc/PID/task/*/schedstat`), as a share of one core: the generator shares the machine's
cores with the server, and one Python process can use one core at most.

`--saturation-seconds` (default 10; 0 = off) adds a closed-loop run afterwards: the same
greenlets send back-to-back with no pacing, which gives the server's ceiling on this machine.

Output: one JSON line on stdout; progress on stderr. The server is killed on the way out.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import glob  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
from _common import (  # noqa: E402
    ControlApi,
    emit,
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


def cpu_ns(pid: int | str) -> int:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path, encoding="ascii") as handle:
                total += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass
class Window:
    """What was observed between `start` and `end` (monotonic); requests sent inside count."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    late_cycles: int = 0

    def inside(self, t: float) -> bool:
        return self.start <= t < self.end


class RequestsTransport:
    """One `requests.Session` (keep-alive), set up as the daemon's client sets its own."""

    def __init__(self, api: ControlApi, headers: dict[str, str]) -> None:
        self.url = api.url
        self.session = requests.Session()
        self.session.trust_env = False  # as the daemon's client: no proxy/netrc lookups per call
        self.session.headers.update(headers)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            reply = self.session.post(self.url + path, data=body, timeout=REQUEST_TIMEOUT_S)
            return reply.status_code, reply.content
        except requests.Timeout:
            raise TransportError("timeout") from None
        except requests.RequestException as exc:
            raise TransportError(f"connection: {type(exc).__name__}") from None

    def close(self) -> None:
        self.session.close()


class RawTransport:
    """One keep-alive `http.client` connection: a far cheaper client, to load the server harder."""

    def __init__(self, api: ControlApi, headers: dict[str, str]) -> None:
        self.port = api.port
        self.headers = {**headers, "content-type": "application/json"}
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


class TransportError(Exception):
    """A request that got no HTTP answer; the message is the error kind."""


TRANSPORTS = {"requests": RequestsTransport, "raw": RawTransport}


class SimulatedNode:
    def __init__(self, index: int, api: ControlApi, transport: str) -> None:
        self.node_id = f"sim-{index:04d}"
        headers = {**api.headers, "accept": "application/json", "user-agent": "conductord-bench"}
        self.transport = TRANSPORTS[transport](api, headers)
        self.started_at = int(time.time())
        self.status = "standby"

    def _post(self, path: str, body: dict, window: Window | None) -> None:
        sent = time.monotonic()
        try:
            status, content = self.transport.post(path, json.dumps(body).encode())
        except TransportError as exc:
            self._count(window, sent, str(exc))
            return
        elapsed = time.monotonic() - sent
        if status != 200:
            self._count(window, sent, f"http {status}")
            return
        compact = content.replace(b" ", b"")
        if b'"ok":true' not in compact:
            self._count(window, sent, "envelope not ok")
            return
        if path == "/v1/leader/acquire":
            self.status = "leader" if b'"is_leader":true' in compact else "standby"
        if window is not None and window.inside(sent):
            window.latencies.append(elapsed)

    @staticmethod
    def _count(window: Window | None, sent: float, kind: str) -> None:
        if window is not None and window.inside(sent):
            window.errors[kind] += 1

    def cycle(self, window: Window | None) -> None:
        now = int(time.time())
        self._post(
            "/v1/controllers/heartbeat",
            {
                "controller_id": self.node_id,
                "host": "127.0.0.1",
                "role": "standby",
                "priority": 50,
                "status": self.status,
                "version": "bench",
                "heartbeat_at": now,
                "started_at": self.started_at,
            },
            window,
        )
        self._post(
            "/v1/leader/acquire",
            {
                "controller_id": self.node_id,
                "host": "127.0.0.1",
                "ttl_sec": TTL_SEC,
                "preferred": False,
                "now": now,
            },
            window,
        )

    def paced(self, interval: float, until: float, window: Window, rng: random.Random) -> None:
        next_at = time.monotonic() + rng.uniform(0, interval)
        while True:
            delay = next_at - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            began = time.monotonic()
            if began >= until:
                return
            self.cycle(window)
            next_at = began + interval * rng.uniform(0.9, 1.1)
            if time.monotonic() > next_at and window.inside(began):
                window.late_cycles += 1

    def closed_loop(self, until: float, window: Window) -> None:
        while time.monotonic() < until:
            self.cycle(window)


def summary(window: Window, offered_rps: float | None) -> dict:
    seconds = window.end - window.start
    lat_ms = [x * 1000.0 for x in window.latencies]
    errors = sum(window.errors.values())
    return {
        "window_s": round(seconds, 2),
        "offered_rps": rounded(offered_rps, 1),
        "requests": len(lat_ms) + errors,
        "rps": round(len(lat_ms) / seconds, 1),
        "p50_ms": rounded(percentile(lat_ms, 50), 2),
        "p90_ms": rounded(percentile(lat_ms, 90), 2),
        "p99_ms": rounded(percentile(lat_ms, 99), 2),
        "max_ms": rounded(max(lat_ms) if lat_ms else None, 2),
        "errors": errors,
        "errors_by_kind": dict(window.errors),
        "late_cycles": window.late_cycles,
    }


def measure_spawned(run, server_pid: int, window: Window) -> dict:
    """Run `run()` (it returns after window.end); CPU of both sides sampled at the edges."""
    samples: dict[str, int] = {}

    def sample(name: str, at: float) -> None:
        gevent.sleep(max(at - time.monotonic(), 0))
        samples[f"server_{name}"] = cpu_ns(server_pid)
        samples[f"self_{name}"] = cpu_ns("self")

    samplers = [gevent.spawn(sample, "0", window.start), gevent.spawn(sample, "1", window.end)]
    run()
    gevent.joinall(samplers, timeout=5)
    seconds = window.end - window.start
    if len(samples) < 4:
        return {"server_cpu_cores": None, "generator_cpu_cores": None}
    return {
        "server_cpu_cores": round((samples["server_1"] - samples["server_0"]) / 1e9 / seconds, 3),
        "generator_cpu_cores": round((samples["self_1"] - samples["self_0"]) / 1e9 / seconds, 3),
    }


def with_costs(figures: dict) -> dict:
    """Add CPU ms per request on each side and the rate this machine could carry if idle.

    The projection: the server and the generator are one process each (one core at most) and
    together share the machine's cores, so rps <= 1000 / each side's ms and
    <= cores x 1000 / (sum of both). It ignores latency; it says which side runs out first.
    """
    rps, server, generator = (
        figures["rps"],
        figures["server_cpu_cores"],
        figures["generator_cpu_cores"],
    )
    if not rps or not server or not generator:
        return {**figures, "server_cpu_ms_per_request": None, "generator_cpu_ms_per_request": None}
    server_ms, generator_ms = server * 1000.0 / rps, generator * 1000.0 / rps
    cores = len(os.sched_getaffinity(0))
    return {
        **figures,
        "server_cpu_ms_per_request": round(server_ms, 3),
        "generator_cpu_ms_per_request": round(generator_ms, 3),
        "projected_idle_rps": round(
            min(
                1000.0 / server_ms,
                1000.0 / generator_ms,
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
        "--client",
        choices=sorted(TRANSPORTS),
        default="requests",
        help="requests (a Session per node, like the daemon) or raw (http.client, cheaper)",
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.interval_ms < 1 or args.seconds <= 0:
        parser.error("--nodes, --interval-ms and --seconds must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    api: ControlApi | None = None
    with tempfile.TemporaryDirectory(prefix="conductord-bench-") as tmp:
        try:
            api = ControlApi(os.path.join(tmp, "control.sqlite3"), token=new_token())
            progress(f"control API on {api.url}; {args.nodes} simulated nodes")
            nodes = [SimulatedNode(i, api, args.client) for i in range(args.nodes)]
            interval = args.interval_ms / 1000.0

            began = time.monotonic()
            paced = Window(began + args.warmup_seconds, began + args.warmup_seconds + args.seconds)

            def run_paced() -> None:
                group = [
                    gevent.spawn(node.paced, interval, paced.end, paced, rng) for node in nodes
                ]
                gevent.joinall(group, timeout=paced.end - time.monotonic() + 2 * REQUEST_TIMEOUT_S)
                gevent.killall(group, block=True, timeout=5)

            progress(f"paced run: {args.warmup_seconds:g} s warm-up, {args.seconds:g} s window")
            paced_cpu = measure_spawned(run_paced, api.proc.pid, paced)
            paced_result = with_costs(
                {**summary(paced, offered_rps=args.nodes * 2 / interval), **paced_cpu}
            )

            saturation_result = None
            if args.saturation_seconds > 0:
                start = time.monotonic() + 1.0
                saturated = Window(start, start + args.saturation_seconds)

                def run_closed() -> None:
                    group = [
                        gevent.spawn(node.closed_loop, saturated.end, saturated) for node in nodes
                    ]
                    gevent.joinall(
                        group, timeout=saturated.end - time.monotonic() + 2 * REQUEST_TIMEOUT_S
                    )
                    gevent.killall(group, block=True, timeout=5)

                progress(f"saturation run: {args.saturation_seconds:g} s closed loop")
                saturated_cpu = measure_spawned(run_closed, api.proc.pid, saturated)
                saturation_result = with_costs(
                    {**summary(saturated, offered_rps=None), **saturated_cpu}
                )
            for node in nodes:
                node.transport.close()
            server_alive = api.proc.alive
        finally:
            if api is not None:
                api.close()

    meets = (
        args.nodes >= TARGET_NODES
        and paced_result["rps"] >= TARGET_RPS
        and paced_result["p99_ms"] is not None
        and paced_result["p99_ms"] <= TARGET_P99_MS
        and paced_result["errors"] == 0
    )
    result = {
        "bench": "control_api_load",
        "nodes": args.nodes,
        "interval_ms": args.interval_ms,
        "client": args.client,
        "rps": paced_result["rps"],
        "p50_ms": paced_result["p50_ms"],
        "p99_ms": paced_result["p99_ms"],
        "errors": paced_result["errors"],
        "paced": paced_result,
        "saturation": saturation_result,
        "server_alive": server_alive,
        "targets": {"nodes": TARGET_NODES, "rps": TARGET_RPS, "p99_ms": TARGET_P99_MS, "errors": 0},
        "pass": bool(meets and server_alive),
        "machine": machine_info(),
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
