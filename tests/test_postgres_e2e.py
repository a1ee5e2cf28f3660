"""The PostgreSQL store beyond the shared contract, and two Control API servers over one database.

- DSN masking (pure);
- errors: an unreachable or refusing database is one line without the password, at open, and
  a database lost while running gives StoreError (503 from the server), then recovery;
- gevent: in a monkey-patched child process, an acquire blocked on the lease row lock parks
  only its own greenlet;
- `watch()`: LISTEN/NOTIFY wakes on grants and releases made by any store;
- end to end: two `conductord control-api` processes on one database (one schema per test),
  `conductord start` nodes split between them: one leader fleet-wide, failover after kill -9 to
  a node of the other server, a graceful handover woken across servers by NOTIFY, and
  concurrent acquires through both servers never giving two holders one term.
PostgreSQL tests fail in CI when no server is configured, and skip elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from conductord.control_api.store import StoreError, describe_db, dsn_secrets
from tests.support.control_api import ControlApiProcess, run_control_api
from tests.support.daemon import DaemonProcess, overlap_seconds, scheduler_intervals
from tests.support.postgres import fresh_schema, require_dsn
from tests.support.race import run_together

TTL = 2.0
RENEW = 0.25
SLACK = 1.5  # process start-up, log pipes, a loaded 2-core CI machine


@pytest.fixture
def pg_dsn():
    """A DSN bound to a fresh schema of the test server."""
    with fresh_schema(require_dsn()) as dsn:
        yield dsn


def password_of(dsn: str) -> str:
    found = dsn_secrets(dsn)
    assert found, "the test DSN carries no password; the masking checks would prove nothing"
    return found[0]


def with_port(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host = hostport.rsplit(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}:{port}"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- masking (pure) -------------------------------------------------------------------------


def test_describe_db_masks_every_password_form():
    assert describe_db("postgresql://u:p%40ss@db.example:5432/x?sslmode=require") == (
        "postgresql://u:***@db.example:5432/x?sslmode=require"
    )
    assert describe_db("postgres://u@h/x?password=hunter2&application_name=a") == (
        "postgres://u@h/x?password=***&application_name=a"
    )
    assert describe_db("postgresql://h1:5432,h2:5433/x") == "postgresql://h1:5432,h2:5433/x"
    assert describe_db("rel/control.sqlite3") == os.path.abspath("rel/control.sqlite3")
    assert set(dsn_secrets("postgresql://u:p%40ss@h/x?password=two")) == {"p%40ss", "p@ss", "two"}
    assert dsn_secrets("/var/lib/control.sqlite3") == []


# -- errors --------------------------------------------------------------------------------


def test_unreachable_or_refusing_database_is_one_line_without_the_password(pg_dsn):
    from conductord.control_api.store_postgres import PostgresStore

    password = password_of(pg_dsn)
    refused = with_port(pg_dsn, free_port())
    wrong_password = pg_dsn.replace(f":{password}@", ":not-the-password-x@")
    for dsn, secret in ((refused, password), (wrong_password, "not-the-password-x")):
        with pytest.raises(StoreError) as info:
            PostgresStore(dsn)
        message = str(info.value)
        assert message.startswith(
            "cannot open PostgreSQL database postgresql://conductord:***@127.0.0.1:"
        )
        assert "\n" not in message and secret not in message


def test_control_api_exits_2_with_one_line_when_the_database_is_unreachable(pg_dsn):
    password = password_of(pg_dsn)
    result = run_control_api(["--listen", "127.0.0.1:0", "--db", with_port(pg_dsn, free_port())])
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("conductord: error: cannot open PostgreSQL database postgresql://")
    assert "Connection refused" in lines[0] or "connection failed" in lines[0]
    assert password not in result.stderr and "Traceback" not in result.stderr


class TcpProxy:
    """A loopback TCP forwarder that can be cut (every connection dropped) and restored."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Stop listening and drop every connection (as a database host that went away)."""
        if self._listener is not None:
            # shutdown() first: a bare close() leaves a thread blocked in accept() accepting.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_database_lost_while_running_gives_503_envelopes_then_recovers(pg_dsn):
    parts = urlsplit(pg_dsn)
    proxy = TcpProxy((parts.hostname, parts.port)).start()
    token = f"test-{secrets.token_hex(8)}"
    server = ControlApiProcess(with_port(pg_dsn, proxy.port), token=token)
    try:
        with server.start():
            body = {"controller_id": "a", "host": "h", "ttl_sec": 60}
            url = f"{server.url}/v1/leader/acquire"
            assert requests.post(url, json=body, headers=server.headers, timeout=10).ok
            proxy.cut()
            answer = requests.post(url, json=body, headers=server.headers, timeout=15)
            assert answer.status_code == 503
            envelope = answer.json()
            assert (envelope["ok"], envelope["error"]) == (False, "unavailable")
            assert envelope["request_id"]
            proxy.start()  # the database is back on the same address
            deadline = time.monotonic() + 30
            while requests.get(f"{server.url}/healthz", timeout=15).status_code != 200:
                assert time.monotonic() < deadline, "no recovery after the database came back"
                time.sleep(0.2)
            again = requests.post(url, json=body, headers=server.headers, timeout=10).json()
            assert again["data"]["holder_id"] == "a" and again["data"]["term"] == 1
            assert server.logs("store.error"), "the outage was not logged"
    finally:
        proxy.cut()
    output = "\n".join(server.stdout_lines) + server.stderr
    assert password_of(pg_dsn) not in output
    assert "Traceback" not in output


# -- gevent ----------------------------------------------------------------------------------

GEVENT_CHILD = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import json, os, sys, time

    import gevent
    import psycopg

    from conductord.control_api.store import open_store

    dsn = os.environ["TEST_DSN"]
    store = open_store(dsn)
    store.acquire(controller_id="a", host="h", ttl_sec=30, preferred=False)

    # Another session holds the lease row lock; the server ends that session after 1 s idle
    # in its transaction, which frees the lock even if this process never runs again.
    locker = psycopg.connect(dsn)
    locker.execute("SET idle_in_transaction_session_timeout = 1000")
    locker.execute("SELECT 1 FROM leases FOR UPDATE")

    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.02)

    tick = gevent.spawn(ticker)
    started = time.monotonic()
    blocked = gevent.spawn(
        store.acquire, controller_id="a", host="h", ttl_sec=30, preferred=False
    )
    decision = blocked.get(timeout=20)
    waited = time.monotonic() - started
    during = [t for t in ticks if started <= t <= started + waited]
    tick.kill()
    store.close()
    print(json.dumps({"waited": waited, "ticks": len(during), "op": decision.operation}))
    """
)


def test_a_query_waiting_on_the_database_parks_only_its_own_greenlet(pg_dsn):
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_CHILD],
        env={**os.environ, "TEST_DSN": pg_dsn},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["op"] == "renew"
    assert outcome["waited"] > 0.7, outcome  # it really waited for the row lock
    # ~50 ticks of 20 ms in a second; a blocked hub would allow at most one or two.
    assert outcome["ticks"] >= 10, outcome


# -- watch (LISTEN/NOTIFY) -------------------------------------------------------------------


def test_watch_is_called_for_grants_and_releases_by_any_store(pg_dsn):
    from gevent.event import Event

    from conductord.control_api.store_postgres import PostgresStore

    watcher, other = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    calls: list[float] = []
    called = Event()

    def callback() -> None:
        calls.append(time.monotonic())
        called.set()

    def expect_call(what: str) -> None:
        assert called.wait(10), f"no watch callback after {what}"
        called.clear()

    try:
        watcher.watch(callback)
        expect_call("listening started")  # fired once on (re)connect, by design
        granted = other.acquire(controller_id="b", host="h", ttl_sec=30, preferred=False)
        expect_call("a grant by another store")
        other.acquire(controller_id="b", host="h", ttl_sec=30, preferred=False)  # renew
        other.acquire(controller_id="c", host="h", ttl_sec=30, preferred=False)  # deny
        assert not called.wait(0.5), "renewals and denials must not wake waiters"
        assert other.release(controller_id="b", term=granted.row.term).released
        expect_call("a release by another store")
        watcher.acquire(controller_id="a", host="h", ttl_sec=30, preferred=False)
        expect_call("a grant by the watching store itself")
    finally:
        watcher.close()
        other.close()


# -- end to end: two servers, one database ---------------------------------------------------


@pytest.fixture
def servers(pg_dsn):
    token = f"test-{secrets.token_hex(8)}"
    pair = [ControlApiProcess(pg_dsn, token=token) for _ in range(2)]
    try:
        for server in pair:
            server.start()
        yield pair
    finally:
        for server in pair:
            if server.proc is not None and server.proc.poll() is None:
                server.stop()
        output = "".join("\n".join(s.stdout_lines) + s.stderr for s in pair)
        assert password_of(pg_dsn) not in output
        assert "Traceback" not in output


@pytest.fixture
def fleet():
    nodes: list[DaemonProcess] = []

    def start(server: ControlApiProcess, node_id: str, **timing: float) -> DaemonProcess:
        renew, ttl = timing.get("renew", RENEW), timing.get("ttl", TTL)
        node = DaemonProcess(
            [
                *("--node-id", node_id, "--host", "127.0.0.1"),
                *("--control-api-base", server.url, "--shared-token", server.token),
                *("--heartbeat-interval-ms", "500"),
                *("--lease-renew-interval-ms", str(int(renew * 1000))),
                *("--lease-ttl-sec", str(int(ttl))),
                *("--request-timeout-ms", "1000"),
            ]
        )
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.close()


def leader_seen_by(server: ControlApiProcess) -> dict:
    answer = requests.get(f"{server.url}/v1/leader", headers=server.headers, timeout=10)
    answer.raise_for_status()
    return answer.json()["data"]


def test_two_servers_one_leader_and_failover_across_servers(servers, fleet):
    a, b = servers
    first = fleet(a, "node-a1")
    first.transition_to("leader")
    others = [fleet(b, "node-b1"), fleet(b, "node-b2")]
    for node in others:
        started = node.wait_event("conductor.started", timeout=15)
        assert started["snapshot"]["daemon"]["lease_state"] == "standby"
        assert started["snapshot"]["daemon"]["current_leader_id"] == "node-a1"
    # Both servers see one lease, held by the node that talks to the other server.
    seen = [leader_seen_by(server)["lease"] for server in servers]
    assert seen[0]["holder_id"] == seen[1]["holder_id"] == "node-a1"
    assert seen[0]["term"] == seen[1]["term"] == 1

    killed_at_wall, killed_at = time.time(), time.monotonic()
    first.send(signal.SIGKILL)
    first.wait_exit()
    deadline = killed_at + TTL + RENEW + SLACK + 10
    winner = None
    while winner is None:
        assert time.monotonic() < deadline, "no node of the other server took over"
        for node in others:
            if node.named("lease.transition") and any(
                e["to_state"] == "leader" for e in node.named("lease.transition")
            ):
                winner = node
        time.sleep(0.02)
    took_over = winner.transition_to("leader")
    assert took_over["term"] == 2
    assert took_over["_seen_at"] - killed_at < TTL + RENEW + SLACK
    assert took_over["_seen_at"] - killed_at > TTL - 1.0  # the lease really had to expire

    time.sleep(3 * RENEW)  # a few renew cycles of the new leader and the other standby
    loser = next(node for node in others if node is not winner)
    assert not any(e["to_state"] == "leader" for e in loser.named("lease.transition"))
    assert (
        overlap_seconds(
            scheduler_intervals(first.events, ended_at=killed_at_wall),
            *(scheduler_intervals(node.events) for node in others),
        )
        == 0.0
    )
    for node in others:
        node.send(signal.SIGTERM)
        assert node.wait_exit() == 0


def test_graceful_handover_across_servers_is_woken_by_notify(servers, fleet):
    """The standby parks on server B (wait_ms = renew = 3 s); the leader releases through A.

    Without the cross-process wake, B would notice only when the wait ends (up to 3 s);
    with it, the grant follows the release at once.
    """
    a, b = servers
    renew, ttl = 3.0, 10.0
    leader = fleet(a, "node-a1", renew=renew, ttl=ttl)
    leader.transition_to("leader", timeout=15)
    standby = fleet(b, "node-b1", renew=renew, ttl=ttl)
    standby.wait_event("conductor.started", timeout=15)
    deadline = time.monotonic() + 15
    while leader_seen_by(b).get("waiters", 0) < 1:  # parked on B
        assert time.monotonic() < deadline, "the standby never parked on server B"
        time.sleep(0.05)

    signalled_at = time.monotonic()
    leader.send(signal.SIGTERM)
    took_over = standby.transition_to("leader", timeout=15)
    assert leader.wait_exit() == 0
    assert took_over["term"] == 2
    assert took_over["_seen_at"] - signalled_at < renew / 2, "woken by the wait's end, not NOTIFY"
    standby.send(signal.SIGTERM)
    assert standby.wait_exit() == 0


def test_concurrent_acquires_through_both_servers_never_share_a_term(servers):
    workers, rounds = 6, 12
    seen: dict[int, set[str]] = defaultdict(set)
    grants: list[int] = []
    lock = threading.Lock()

    def race(index: int) -> None:
        me = f"racer-{index}"
        server = servers[index % 2]
        with requests.Session() as session:
            session.headers.update(server.headers)
            for _ in range(rounds):
                answer = session.post(
                    f"{server.url}/v1/leader/acquire",
                    json={"controller_id": me, "host": "h", "ttl_sec": 30},
                    timeout=10,
                )
                answer.raise_for_status()
                data = answer.json()["data"]
                with lock:
                    seen[data["term"]].add(data["holder_id"])
                    if data["is_leader"] and data["operation"] == "acquire":
                        grants.append(data["term"])
                if data["is_leader"]:
                    released = session.post(
                        f"{server.url}/v1/leader/release",
                        json={"controller_id": me, "term": data["term"]},
                        timeout=10,
                    )
                    assert released.json()["data"]["released"] is True

    run_together(race, workers)
    assert {term: holders for term, holders in seen.items() if len(holders) > 1} == {}
    assert sorted(grants) == list(range(1, len(grants) + 1))
    assert len(grants) >= 3
