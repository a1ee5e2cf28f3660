"""Tests of the SQLite store on a real temporary database file (fake clock where it matters)."""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import replace

import pytest

from conductord.control_api.store import (
    SCHEMA_VERSION,
    SqliteStore,
    StoreError,
    open_store,
)
from conductord.wire import Heartbeat
from tests.support.race import run_together


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "control.sqlite3")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(db_path, clock):
    s = SqliteStore(db_path, clock=clock, lease_clock=clock)
    yield s
    s.close()


def acquire(store, controller_id, *, ttl=10, preferred=False, client_now=None):
    return store.acquire(
        controller_id=controller_id,
        host=f"{controller_id}-host",
        ttl_sec=ttl,
        preferred=preferred,
        client_now=client_now,
    )


def test_schema_is_created_and_versioned(store, db_path):
    assert store.schema_version == SCHEMA_VERSION
    with sqlite3.connect(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"leases", "controllers"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(db_path):
    SqliteStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version"):
        SqliteStore(db_path)


def test_database_files_are_owner_only(store, db_path):
    acquire(store, "a")  # a write, so that -wal and -shm exist
    for path in (db_path, db_path + "-wal", db_path + "-shm"):
        assert os.path.exists(path), path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_unwritable_path_is_a_one_line_store_error(tmp_path):
    missing = tmp_path / "no-such-dir" / "db.sqlite3"
    with pytest.raises(StoreError) as info:
        SqliteStore(str(missing))
    assert "cannot open database" in str(info.value)
    assert "\n" not in str(info.value)


def test_unreachable_postgresql_url_is_a_store_error():
    with pytest.raises(StoreError, match="PostgreSQL"):
        open_store("postgresql://127.0.0.1:9/db")


def test_acquire_renew_deny_release(store, clock):
    first = acquire(store, "a", ttl=10)
    assert (first.operation, first.row.term, first.row.holder_id) == ("acquire", 1, "a")
    clock.now += 2.5
    renewed = acquire(store, "a", ttl=10)
    assert renewed.operation == "renew"
    assert renewed.row.lease_expires_at == pytest.approx(clock.now + 10)
    denied = acquire(store, "b")
    assert (denied.operation, denied.is_leader, denied.row.holder_id) == ("deny", False, "a")
    assert not store.release(controller_id="b", term=1).released
    assert store.release(controller_id="a", term=1).released
    leader = store.leader()
    assert leader is not None and leader.released and leader.term == 1
    taken = acquire(store, "b")
    assert (taken.operation, taken.row.term, taken.takeover) == ("acquire", 2, False)


def test_expiry_keeps_subsecond_precision(store, clock):
    acquire(store, "a", ttl=1)
    clock.now += 0.999
    assert acquire(store, "b").operation == "deny"
    clock.now += 0.001
    decision = acquire(store, "b")
    assert (decision.operation, decision.takeover, decision.row.term) == ("acquire", True, 2)
    assert store.leader().renewed_at == pytest.approx(clock.now)


def test_client_now_is_recorded_not_trusted(store, db_path, clock):
    decision = acquire(store, "a", ttl=10, client_now=5.0)  # a client clock far in the past
    assert decision.row.renewed_at == clock.now
    assert decision.row.lease_expires_at == clock.now + 10
    with sqlite3.connect(db_path) as conn:
        (recorded,) = conn.execute("SELECT last_client_now FROM leases").fetchone()
    assert recorded == 5.0


def test_terms_survive_restart(db_path, clock):
    s = SqliteStore(db_path, clock=clock, lease_clock=clock)
    acquire(s, "a")
    assert s.release(controller_id="a", term=1).released
    s.close()
    s = SqliteStore(db_path, clock=clock, lease_clock=clock)
    assert s.leader().term == 1
    assert acquire(s, "b").row.term == 2
    clock.now += 60  # expires without release
    s.close()
    s = SqliteStore(db_path, clock=clock, lease_clock=clock)
    assert acquire(s, "a").row.term == 3
    s.close()


def test_a_live_lease_survives_restart_and_its_holder_resumes(db_path, clock):
    s = SqliteStore(db_path, clock=clock, lease_clock=clock)
    acquire(s, "a", ttl=30)
    s.close()
    s = SqliteStore(db_path, clock=clock, lease_clock=clock)
    assert acquire(s, "b").operation == "deny"
    resumed = acquire(s, "a")
    assert (resumed.operation, resumed.row.term) == ("renew", 1)
    s.close()


# -- clocks and restarts (SPEC §15) -----------------------------------------------------------


def test_a_wall_clock_step_never_shortens_a_live_lease(db_path, clock):
    wall = FakeClock(1_700_000_000.0)
    s = SqliteStore(db_path, clock=wall, lease_clock=clock)
    acquire(s, "a", ttl=10)
    wall.now += 60  # NTP at boot, a resumed VM: the wall clock jumps, the lease clock does not
    clock.now += 5
    assert acquire(s, "b").operation == "deny"
    clock.now += 5  # one TTL on the lease clock: now it has expired
    taken = acquire(s, "b")
    assert (taken.operation, taken.row.term) == ("acquire", 2)
    assert taken.row.lease_expires_at == wall.now + 10  # the wire still shows wall time
    s.close()


def test_a_restart_on_the_same_boot_keeps_the_exact_deadline(db_path, clock):
    s = SqliteStore(db_path, clock=clock, lease_clock=clock, boot_id=lambda: "boot-1")
    acquire(s, "a", ttl=10)
    s.close()
    clock.now += 4
    s = SqliteStore(db_path, clock=clock, lease_clock=clock, boot_id=lambda: "boot-1")
    clock.now += 6  # 10 s after the grant: expired exactly on time, not a TTL after restart
    assert acquire(s, "b").operation == "acquire"
    s.close()


@pytest.mark.parametrize("wall_step", [0.0, 3600.0, -3600.0])
def test_a_restart_on_another_boot_honours_every_unreleased_lease_for_a_full_ttl(
    db_path, clock, wall_step
):
    wall = FakeClock(1_700_000_000.0)
    s = SqliteStore(db_path, clock=wall, lease_clock=clock, boot_id=lambda: "boot-1")
    acquire(s, "a", ttl=10)
    s.close()
    # The machine reboots: the lease clock starts again near zero, the wall clock may step.
    wall.now += wall_step
    clock.now = 3.0
    s = SqliteStore(db_path, clock=wall, lease_clock=clock, boot_id=lambda: "boot-2")
    clock.now += 9.9
    assert acquire(s, "b").operation == "deny"
    assert acquire(s, "a").operation == "renew"  # the holder may resume, as after any restart
    clock.now += 10.0
    assert acquire(s, "b").operation == "acquire"
    s.close()


def test_a_released_lease_is_not_held_back_by_the_restart_rule(db_path, clock):
    s = SqliteStore(db_path, clock=clock, lease_clock=clock, boot_id=lambda: "boot-1")
    acquire(s, "a", ttl=10)
    assert s.release(controller_id="a", term=1).released
    s.close()
    clock.now = 1.0
    s = SqliteStore(db_path, clock=clock, lease_clock=clock, boot_id=lambda: "boot-2")
    assert acquire(s, "b").operation == "acquire"
    s.close()


_SCHEMA_V1 = (
    """CREATE TABLE leases (
        lease_name TEXT PRIMARY KEY, holder_id TEXT NOT NULL, holder_host TEXT NOT NULL,
        term INTEGER NOT NULL CHECK (term >= 1), lease_expires_at REAL NOT NULL,
        renewed_at REAL NOT NULL, preferred_holder_id TEXT, metadata_json TEXT,
        released INTEGER NOT NULL DEFAULT 0, last_client_now REAL, updated_at REAL NOT NULL)""",
    """CREATE TABLE controllers (
        controller_id TEXT PRIMARY KEY, host TEXT NOT NULL, role TEXT, priority INTEGER,
        status TEXT, version TEXT, heartbeat_at INTEGER, started_at INTEGER,
        first_seen_at REAL NOT NULL, last_seen_at REAL NOT NULL)""",
)


def test_a_database_written_by_schema_1_upgrades_in_place(db_path, clock):
    # What the previous release wrote: schema 1, a live lease of term 7 held by "a".
    with sqlite3.connect(db_path) as conn:
        for statement in _SCHEMA_V1:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO leases VALUES ('global', 'a', 'a-host', 7, ?, ?, NULL, NULL, 0, NULL, ?)",
            (clock.now + 10, clock.now, clock.now),
        )
        conn.execute(
            "INSERT INTO controllers VALUES ('a', 'a-host', 'primary', 100, 'leader', '0.1.0',"
            " 1, 1, ?, ?)",
            (clock.now, clock.now),
        )
        conn.execute("PRAGMA user_version = 1")
    s = SqliteStore(db_path, clock=clock, lease_clock=clock)
    assert s.schema_version == SCHEMA_VERSION
    row = s.leader()
    assert (row.holder_id, row.term, row.holder_instance_id) == ("a", 7, None)
    assert row.deadline == pytest.approx(clock.now + 10)  # one full TTL from the upgrade
    assert acquire(s, "b").operation == "deny"
    resumed = s.acquire(
        controller_id="a", host="a-host", ttl_sec=10, preferred=False, instance_id="i-1"
    )
    assert (resumed.operation, resumed.row.term, resumed.row.holder_instance_id) == (
        "renew",
        7,
        "i-1",
    )
    assert [c.controller_id for c in s.controllers()] == ["a"]
    s.close()


# -- instances (SPEC §15) -------------------------------------------------------------------


def test_another_instance_of_the_holder_is_refused_its_renewal_and_release(store, clock):
    def call(instance, **kwargs):
        return store.acquire(
            controller_id="a", host="a-host", ttl_sec=10, preferred=False, instance_id=instance
        )

    assert call("i-1").operation == "acquire"
    conflict = call("i-2")
    assert (conflict.operation, conflict.conflict, conflict.is_leader) == ("deny", True, False)
    refused = store.release(controller_id="a", term=1, instance_id="i-2")
    assert (refused.released, refused.conflict) == (False, True)
    assert store.leader().is_live(store.lease_time())
    assert store.release(controller_id="a", term=1, instance_id="i-1").released


def test_heartbeats_record_every_instance_of_a_controller_id(store, clock):
    def beat(instance, host):
        return store.heartbeat(Heartbeat(controller_id="a", host=host, instance_id=instance))

    assert beat("i-1", "mini-1").instance_id == "i-1"
    clock.now += 1
    assert beat("i-2", "mini-2").instance_id == "i-2"
    clock.now += 1
    store.heartbeat(
        Heartbeat(controller_id="b", host="b-host")
    )  # an older node: no instance at all
    rows = {row.controller_id: row for row in store.controllers()}
    a = rows["a"]
    assert [entry[:2] for entry in a.instances] == [("i-2", "mini-2"), ("i-1", "mini-1")]
    assert len(a.recent_instances(clock.now, window_sec=30)) == 2
    assert len(a.recent_instances(clock.now + 30, window_sec=30)) == 0
    assert rows["b"].instances == () and rows["b"].instance_id is None


def test_a_lower_term_is_never_written(store, clock):
    first = acquire(store, "a").row
    clock.now += 60
    acquire(store, "b")
    with pytest.raises(StoreError, match="lower the term"), store._immediate() as conn:
        store._write_lease(conn, replace(first, lease_expires_at=clock.now + 60), client_now=None)
    assert (store.leader().term, store.leader().holder_id) == (2, "b")


def test_heartbeat_upserts_the_controller(store, clock):
    row = store.heartbeat(
        Heartbeat(
            controller_id="a",
            host="mini",
            role="primary",
            priority=100,
            status="standby",
            version="0.1.0",
            heartbeat_at=1,
            started_at=1,
        )
    )
    assert (row.first_seen_at, row.last_seen_at) == (clock.now, clock.now)
    clock.now += 7.5
    row = store.heartbeat(Heartbeat(controller_id="a", host="mini", status="leader"))
    assert row.status == "leader"
    assert row.first_seen_at == clock.now - 7.5
    assert row.last_seen_at == clock.now
    store.heartbeat(Heartbeat(controller_id="0-first", host="other"))
    assert [c.controller_id for c in store.controllers()] == ["0-first", "a"]
    clock.now += 2.0
    assert store.controllers()[1].seconds_since_heartbeat(clock.now) == pytest.approx(2.0)


def test_closed_store_refuses_work(db_path):
    s = SqliteStore(db_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError):
        s.leader()


def test_concurrent_acquires_from_many_connections_yield_one_holder_per_term(db_path, clock):
    """Each thread has its own store (connection) on the same file, like separate servers."""
    threads = 12
    rounds = 4
    stores = [SqliteStore(db_path, clock=clock, lease_clock=clock) for _ in range(threads)]
    try:
        for round_no in range(1, rounds + 1):
            clock.now += 100.0  # past every previous lease
            results = run_together(
                lambda i: acquire(stores[i], f"node-{i}", ttl=10), threads, timeout=30
            )
            winners = [r for r in results if r.operation == "acquire"]
            assert len(winners) == 1
            assert winners[0].row.term == round_no
            holder = winners[0].row.holder_id
            for r in results:
                assert r.row.term == round_no
                assert r.row.holder_id == holder
                assert r.is_leader == (r.operation == "acquire")
    finally:
        for s in stores:
            s.close()


# -- the cheap paths: denial from a snapshot, heartbeat in one statement ----------------------


def _hold_write_lock(db_path):
    """Another connection (as another process would) holding the database write lock."""
    other = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_denial_needs_no_write_lock_but_a_change_does(db_path, clock):
    s = SqliteStore(db_path, clock=clock, lease_clock=clock, busy_timeout_ms=200)
    try:
        acquire(s, "a")
        other = _hold_write_lock(db_path)
        try:
            denied = acquire(s, "b")  # decided from a snapshot while the lock is held elsewhere
            assert (denied.operation, denied.is_leader, denied.row.holder_id) == (
                "deny",
                False,
                "a",
            )
            clock.now += 1.0
            with pytest.raises(StoreError, match="locked"):
                acquire(s, "a")  # a renewal writes, so it waits for the lock (and times out)
            with pytest.raises(StoreError, match="locked"):
                acquire(s, "b", preferred=True)  # a new preference is a change too
        finally:
            other.rollback()
            other.close()
        assert s.leader().preferred_holder_id is None
        assert acquire(s, "a").operation == "renew"
    finally:
        s.close()


def test_an_instance_conflict_takes_the_write_lock_once_to_record_it(db_path, clock):
    s = SqliteStore(db_path, clock=clock, lease_clock=clock, busy_timeout_ms=200)

    def second_process():
        return s.acquire(
            controller_id="a", host="a-host", ttl_sec=10, preferred=False, instance_id="i-2"
        )

    try:
        s.acquire(controller_id="a", host="a-host", ttl_sec=10, preferred=False, instance_id="i-1")
        other = _hold_write_lock(db_path)
        try:
            with pytest.raises(StoreError, match="locked"):
                second_process()  # the first conflict of (term 1, i-2) is a history entry
        finally:
            other.rollback()
            other.close()
        assert second_process().conflict
        other = _hold_write_lock(db_path)
        try:
            assert second_process().conflict  # recorded: a snapshot decides it, no lock
        finally:
            other.rollback()
            other.close()
        assert [(e.reason, e.instance_id) for e in s.history(10)] == [
            ("instance_conflict", "i-2"),
            ("granted", "i-1"),
        ]
    finally:
        s.close()


class _StaleSnapshotStore(SqliteStore):
    """Its first read of the lease sees no lease at all, as a snapshot taken long ago would."""

    stale_reads = 1

    def _read_lease(self, conn, lease_name):
        if self.stale_reads:
            self.stale_reads -= 1
            return None
        return SqliteStore._read_lease(conn, lease_name)


def test_a_change_is_decided_again_under_the_lock_never_written_from_the_snapshot(db_path, clock):
    holder = SqliteStore(db_path, clock=clock, lease_clock=clock)
    stale = _StaleSnapshotStore(db_path, clock=clock, lease_clock=clock)
    try:
        assert acquire(holder, "a").row.term == 1
        # The snapshot says "free" (a grant); under the lock the live lease of "a" shows.
        decision = acquire(stale, "b")
        assert stale.stale_reads == 0
        assert (decision.operation, decision.is_leader) == ("deny", False)
        assert (decision.row.holder_id, decision.row.term) == ("a", 1)
        row = holder.leader()
        assert (row.holder_id, row.term) == ("a", 1)
    finally:
        holder.close()
        stale.close()


@pytest.mark.parametrize("returning", [True, False], ids=["returning", "fallback"])
def test_heartbeat_upserts_in_either_form_and_leaves_no_transaction_open(db_path, clock, returning):
    s = SqliteStore(db_path, clock=clock, lease_clock=clock)
    s._upsert_returning = returning  # the fallback is what SQLite < 3.35 gets
    try:
        first = s.heartbeat(Heartbeat(controller_id="n1", host="h1", role="standby", priority=5))
        clock.now += 2.5
        second = s.heartbeat(
            Heartbeat(controller_id="n1", host="h2", status="leader", heartbeat_at=7)
        )
        assert (first.first_seen_at, first.last_seen_at) == (1_000.0, 1_000.0)
        assert second.first_seen_at == 1_000.0 and second.last_seen_at == 1_002.5
        assert (second.host, second.role, second.priority, second.status) == (
            "h2",
            None,
            None,
            "leader",
        )
        assert second.heartbeat_at == 7
        assert s.controllers() == [second]
        assert not s._conn.in_transaction
        # Committed and unlocked: another connection writes at once, with no busy wait.
        _hold_write_lock(db_path).close()
    finally:
        s.close()


def test_heartbeat_uses_returning_on_a_library_that_has_it(store):
    assert store._upsert_returning == (sqlite3.sqlite_version_info >= (3, 35, 0))


# -- imports flow one way (issue 20) --------------------------------------------------------------


def test_neither_store_module_imports_the_other():
    # A fresh interpreter: what each module pulls in by itself. The PostgreSQL store needs
    # only the shared base; the SQLite module reaches PostgreSQL only inside open_store().
    import subprocess
    import sys

    probe = (
        "import sys, importlib; importlib.import_module(sys.argv[1]);"
        " print(' '.join(sorted(m for m in sys.modules if m.startswith('conductord.control_api'))))"
    )

    def loaded(module: str) -> set[str]:
        result = subprocess.run(
            [sys.executable, "-c", probe, module],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return set(result.stdout.split())

    assert "conductord.control_api.store" not in loaded("conductord.control_api.store_postgres")
    assert "conductord.control_api.store_postgres" not in loaded("conductord.control_api.store")
