"""The storage contract of the reference Control API, run against SQLite and PostgreSQL alike.

Each test gets a `Backend` that opens stores on one fresh database (SQLite: a temp file;
PostgreSQL: a fresh schema, see tests/support/postgres.py) and can move time forward:
- SQLite takes an injected clock, so `advance()` moves a fake clock;
- PostgreSQL stamps rows with the database's own clock, which cannot be faked, so `advance()`
  moves the stored times (lease expiry, renewal, heartbeats) back by the same amount and moves
  the fake lease clock each store process judges expiry on (SPEC §15) forward.
  `test_real_time_expiry_on_the_store_clock` lets real time pass instead, on both backends,
  so the real clocks are exercised too.
PostgreSQL cases fail in CI when no server is configured, and skip elsewhere.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from conductord.control_api.store import SqliteStore, StoreError
from conductord.wire import Heartbeat
from tests.support.postgres import admin, fresh_schema, require_dsn
from tests.support.race import run_together


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    open: Callable[..., object]  # a new store on this test's database (keywords: its options)
    advance: Callable[[float], None]  # let this much time pass for the stored leases
    set_schema_version: Callable[[int], None]
    real_clock: Callable[[], object]  # a store on the same database using the real clock
    # Write the database an older release left: schema `version` (1 or 2, by that release's
    # migrations) holding a live lease of term 7 held by "a" with a 30 s TTL.
    write_old_schema: Callable[[int], None]


def _sqlite_backend(tmp_path) -> Iterator[Backend]:
    path = str(tmp_path / "control.sqlite3")
    clock = FakeClock()

    def advance(seconds: float) -> None:
        clock.now += seconds

    def set_version(version: int) -> None:
        import sqlite3

        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA user_version = {version}")

    def write_old_schema(version: int) -> None:
        import sqlite3

        from conductord.control_api.store import _MIGRATIONS

        columns = "lease_name, holder_id, holder_host, term, lease_expires_at, renewed_at"
        with sqlite3.connect(path) as conn:
            for step in range(1, version + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(
                f"INSERT INTO leases ({columns}, released, updated_at)"
                " VALUES ('global', 'a', 'a-host', 7, ?, ?, 0, ?)",
                (clock.now + 30, clock.now, clock.now),
            )
            conn.execute(f"PRAGMA user_version = {version}")

    yield Backend(
        "sqlite",
        lambda **options: SqliteStore(path, clock=clock, lease_clock=clock, **options),
        advance,
        set_version,
        lambda: SqliteStore(path),
        write_old_schema,
    )


def _postgres_backend() -> Iterator[Backend]:
    base = require_dsn()
    from conductord.control_api.store_postgres import PostgresStore

    with fresh_schema(base) as dsn:
        clock = FakeClock()

        def advance(seconds: float) -> None:
            clock.now += seconds
            admin(
                dsn,
                f"UPDATE leases SET lease_expires_at = lease_expires_at - {seconds},"
                f" renewed_at = renewed_at - {seconds} WHERE term > 0;"
                f" UPDATE controllers SET last_seen_at = last_seen_at - {seconds},"
                f" first_seen_at = first_seen_at - {seconds}",
            )

        def set_version(version: int) -> None:
            admin(dsn, f"INSERT INTO schema_version VALUES ({version}, 0)")

        def write_old_schema(version: int) -> None:
            from conductord.control_api.store_postgres import _MIGRATIONS

            now = "extract(epoch FROM clock_timestamp())"
            statements = [
                "CREATE TABLE schema_version ("
                " version integer PRIMARY KEY, migrated_at double precision NOT NULL)",
                *(statement for step in range(1, version + 1) for statement in _MIGRATIONS[step]),
                "INSERT INTO leases (lease_name, holder_id, holder_host, term, lease_expires_at,"
                f" renewed_at, released, updated_at) VALUES ('global', 'a', 'a-host', 7,"
                f" {now} + 30, {now}, false, {now})",
                *(f"INSERT INTO schema_version VALUES ({n}, 0)" for n in range(1, version + 1)),
            ]
            for statement in statements:
                admin(dsn, statement)

        yield Backend(
            "postgres",
            lambda **options: PostgresStore(
                dsn, min_size=1, max_size=4, lease_clock=clock, **options
            ),
            advance,
            set_version,
            lambda: PostgresStore(dsn, min_size=1, max_size=4),
            write_old_schema,
        )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield from _sqlite_backend(tmp_path)
    else:
        yield from _postgres_backend()


@pytest.fixture
def opened(backend):
    """Stores opened by a test; all closed at the end."""
    stores: list = []

    def open_one(factory=None):
        store = (factory or backend.open)()
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        store.close()


@pytest.fixture
def store(opened):
    return opened()


def acquire(store, controller_id, *, ttl=10, preferred=False, client_now=None):
    return store.acquire(
        controller_id=controller_id,
        host=f"{controller_id}-host",
        ttl_sec=ttl,
        preferred=preferred,
        client_now=client_now,
    )


def test_first_acquire_takes_term_1_and_the_holder_renews(store):
    assert store.leader() is None
    first = acquire(store, "a", ttl=10, preferred=True)
    assert (first.operation, first.is_leader, first.takeover) == ("acquire", True, False)
    assert (first.row.holder_id, first.row.holder_host, first.row.term) == ("a", "a-host", 1)
    assert first.row.lease_expires_at == pytest.approx(first.row.renewed_at + 10)
    assert first.row.preferred_holder_id == "a"
    renewed = acquire(store, "a", ttl=20)
    assert (renewed.operation, renewed.is_leader, renewed.row.term) == ("renew", True, 1)
    assert renewed.row.lease_expires_at == pytest.approx(renewed.row.renewed_at + 20)
    assert renewed.row.renewed_at >= first.row.renewed_at
    assert store.leader() == renewed.row


def test_others_are_denied_while_the_lease_is_live(store, backend):
    acquire(store, "a", ttl=10)
    backend.advance(9.5)
    before = store.leader()
    denied = acquire(store, "b")
    assert (denied.operation, denied.is_leader) == ("deny", False)
    assert (denied.row.holder_id, denied.row.term) == ("a", 1)
    assert store.leader() == before  # a denial writes nothing


def test_takeover_after_expiry_takes_term_plus_1(store, backend):
    acquire(store, "a", ttl=1)
    backend.advance(0.9)
    assert acquire(store, "b").operation == "deny"  # sub-second precision: not yet
    backend.advance(0.2)
    taken = acquire(store, "b", ttl=5)
    assert (taken.operation, taken.is_leader, taken.takeover) == ("acquire", True, True)
    assert (taken.row.holder_id, taken.row.term) == ("b", 2)
    assert taken.previous is not None and taken.previous.holder_id == "a"
    late = acquire(store, "a")  # the old holder comes back: denied, it must not act
    assert (late.operation, late.is_leader, late.row.holder_id) == ("deny", False, "b")


def test_release_by_the_holder_of_that_term_only(store):
    acquire(store, "a")
    before = store.leader()
    assert not store.release(controller_id="b", term=1).released  # not the holder
    assert not store.release(controller_id="a", term=2).released  # not that term
    assert store.leader() == before  # releases by others change nothing
    done = store.release(controller_id="a", term=1)
    assert done.released and done.row.released
    assert done.row.lease_expires_at <= before.lease_expires_at
    again = store.release(controller_id="a", term=1)  # idempotent: a retried release
    assert again.released and not again.changed
    taken = acquire(store, "b")
    assert (taken.operation, taken.row.term, taken.takeover) == ("acquire", 2, False)


def test_release_without_any_lease_changes_nothing(store):
    decision = store.release(controller_id="a", term=1)
    assert (decision.released, decision.row) == (False, None)
    assert store.leader() is None
    assert acquire(store, "a").row.term == 1


def test_terms_survive_reopening_the_database(opened, backend):
    first = opened()
    acquire(first, "a")
    assert first.release(controller_id="a", term=1).released
    first.close()
    second = opened()
    assert second.leader().term == 1
    assert acquire(second, "b", ttl=2).row.term == 2
    second.close()
    backend.advance(5)  # expires without a release while no server runs
    third = opened()
    if backend.name == "postgres":
        # A process that never saw this revision judges it on its own clock only: live one
        # TTL from its first look (the restart rule, SPEC §15). SQLite, on the same boot, kept
        # the exact deadline on the boot clock.
        assert acquire(third, "a").operation == "deny"
        backend.advance(2)
    resumed = acquire(third, "a")
    assert (resumed.operation, resumed.row.term, resumed.takeover) == ("acquire", 3, True)


def test_a_live_lease_survives_reopening_and_its_holder_resumes(opened):
    first = opened()
    acquire(first, "a", ttl=30)
    first.close()
    second = opened()
    assert acquire(second, "b").operation == "deny"
    resumed = acquire(second, "a")
    assert (resumed.operation, resumed.row.term) == ("renew", 1)


def test_heartbeat_upserts_one_row_per_controller(store, backend):
    first = store.heartbeat(Heartbeat(controller_id="a", host="h1", role="primary", priority=100))
    assert (first.controller_id, first.host, first.role, first.priority) == (
        "a",
        "h1",
        "primary",
        100,
    )
    assert first.first_seen_at == pytest.approx(first.last_seen_at, abs=0.01)
    backend.advance(3)
    second = store.heartbeat(
        Heartbeat(
            controller_id="a",
            host="h2",
            role="standby",
            priority=50,
            status="standby",
            version="1.2.3",
            heartbeat_at=1_700_000_000,
            started_at=1_699_999_000,
        )
    )
    assert (second.host, second.role, second.priority, second.status) == (
        "h2",
        "standby",
        50,
        "standby",
    )
    assert (second.version, second.heartbeat_at, second.started_at) == (
        "1.2.3",
        1_700_000_000,
        1_699_999_000,
    )
    assert second.last_seen_at - second.first_seen_at == pytest.approx(3, abs=0.5)
    rows = store.controllers()
    assert [r.controller_id for r in rows] == ["a"]
    assert rows[0] == second


def test_controllers_are_listed_by_id_with_time_since_heartbeat(store, backend):
    for controller_id in ("c", "a", "b"):
        store.heartbeat(Heartbeat(controller_id=controller_id, host=f"{controller_id}-host"))
    backend.advance(2)
    store.heartbeat(Heartbeat(controller_id="b", host="b-host"))
    rows = store.controllers()
    assert [r.controller_id for r in rows] == ["a", "b", "c"]
    now = store.now()
    since = {r.controller_id: r.seconds_since_heartbeat(now) for r in rows}
    assert since["a"] == pytest.approx(2, abs=0.5)
    assert since["c"] == pytest.approx(2, abs=0.5)
    assert since["b"] == pytest.approx(0, abs=0.5)


def test_client_now_is_recorded_not_trusted(store):
    before = store.now()
    decision = acquire(store, "a", ttl=10, client_now=5.0)  # a client clock far in the past
    assert decision.row.renewed_at >= before - 0.01
    assert decision.row.lease_expires_at == pytest.approx(decision.row.renewed_at + 10)


def test_real_time_expiry_on_the_store_clock(opened, backend):
    store = opened(backend.real_clock)
    now = store.now()
    assert now == pytest.approx(time.time(), abs=1.0)  # same machine, so nearly the same
    granted = acquire(store, "a", ttl=1)
    assert granted.row.renewed_at == pytest.approx(now, abs=1.0)
    deadline = time.monotonic() + 10
    while store.now() <= granted.row.lease_expires_at:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    taken = acquire(store, "b")
    assert (taken.operation, taken.row.term, taken.takeover) == ("acquire", 2, True)
    assert taken.row.renewed_at > granted.row.lease_expires_at


def test_a_newer_schema_is_refused(opened, backend):
    opened().close()
    backend.set_schema_version(99)
    with pytest.raises(StoreError, match="schema version 99") as info:
        opened()
    assert "\n" not in str(info.value)


def test_concurrent_acquires_from_many_stores_give_one_holder_per_term(opened, backend):
    """Threads, each with its own store (its own connection), race for the lease.

    Every winner releases at once so the next race starts; every answer, grant or denial,
    names a (term, holder). One term must only ever be named with one holder, and the granted
    terms must be exactly 1..N with no gaps or repeats.
    """
    workers, rounds = 6, 15
    stores = [opened() for _ in range(workers)]
    seen: dict[int, set[str]] = defaultdict(set)
    grants: list[tuple[int, str]] = []
    lock = threading.Lock()

    def race(index: int) -> None:
        me = f"node-{index}"
        for _ in range(rounds):
            decision = acquire(stores[index], me, ttl=30)
            with lock:
                seen[decision.row.term].add(decision.row.holder_id)
                if decision.operation == "acquire":
                    grants.append((decision.row.term, me))
            if decision.is_leader:
                assert stores[index].release(controller_id=me, term=decision.row.term).released

    run_together(race, workers)
    assert {term: holders for term, holders in seen.items() if len(holders) > 1} == {}
    terms = sorted(term for term, _ in grants)
    assert terms == list(range(1, len(terms) + 1))  # each grant exactly term + 1
    assert len(terms) >= 3  # the race really happened (dozens of grants are typical)
    assert len({holder for _, holder in grants}) >= 2


# -- instances (SPEC §15), both stores -----------------------------------------------------------


def _as(store, controller_id, instance, *, ttl=10):
    return store.acquire(
        controller_id=controller_id,
        host=f"{controller_id}-host",
        ttl_sec=ttl,
        preferred=False,
        instance_id=instance,
    )


def test_one_id_from_two_instances_never_has_two_leaders(store, backend):
    assert _as(store, "a", "i-1").operation == "acquire"
    conflict = _as(store, "a", "i-2")
    assert (conflict.operation, conflict.is_leader, conflict.conflict) == ("deny", False, True)
    assert store.leader().holder_instance_id == "i-1"
    refused = store.release(controller_id="a", term=1, instance_id="i-2")
    assert (refused.released, refused.conflict) == (False, True)
    assert _as(store, "a", "i-1").operation == "renew"  # the holder is untouched
    backend.advance(11)  # once its lease has expired, the other instance may take it
    taken = _as(store, "a", "i-2")
    assert (taken.operation, taken.row.term, taken.row.holder_instance_id) == ("acquire", 2, "i-2")


def test_heartbeats_list_every_instance_of_an_id(store, backend):
    store.heartbeat(Heartbeat(controller_id="a", host="mini-1", instance_id="i-1"))
    backend.advance(1)
    store.heartbeat(Heartbeat(controller_id="a", host="mini-2", instance_id="i-2"))
    store.heartbeat(Heartbeat(controller_id="b", host="b-host"))
    rows = {row.controller_id: row for row in store.controllers()}
    assert rows["a"].instance_id == "i-2"
    assert [entry[:2] for entry in rows["a"].instances] == [("i-2", "mini-2"), ("i-1", "mini-1")]
    assert len(rows["a"].recent_instances(store.now(), window_sec=30)) == 2
    assert rows["b"].instances == ()


# -- lease history (SPEC §16), both stores -------------------------------------------------------


def _history(store, limit=100):
    return [
        (entry.reason, entry.term, entry.holder_id, entry.holder_host, entry.previous_holder_id)
        for entry in store.history(limit)
    ]


def test_history_records_every_change_of_holder_or_term_and_no_renewal(opened, backend):
    store, other = opened(), opened()  # two server processes on one database
    assert store.history(100) == []
    assert _as(store, "a", "i-a").operation == "acquire"
    for _ in range(3):
        backend.advance(2)
        assert _as(store, "a", "i-a").operation == "renew"  # not a change
        assert _as(other, "b", "i-b").operation == "deny"  # nor is a denial
    assert _history(store) == [("granted", 1, "a", "a-host", None)]

    backend.advance(11)  # a's lease lapses unreleased: b takes it over
    assert _as(other, "b", "i-b").operation == "acquire"
    assert other.release(controller_id="b", term=2, instance_id="i-b").released
    assert other.release(controller_id="b", term=2, instance_id="i-b").released  # a retry
    assert _as(store, "a", "i-a").operation == "acquire"  # a free lease: granted

    # A second process of "a": one entry per (term, instance), whichever server it asks and
    # whether it renews or releases.
    for server in (store, other, store):
        assert _as(server, "a", "i-x").conflict
    assert other.release(controller_id="a", term=3, instance_id="i-x").conflict
    assert _as(other, "a", "i-y").conflict

    expected = [
        ("instance_conflict", 3, "a", "a-host", "b"),
        ("instance_conflict", 3, "a", "a-host", "b"),
        ("granted", 3, "a", "a-host", "b"),
        ("released", 2, "b", "b-host", "a"),
        ("taken_over", 2, "b", "b-host", "a"),
        ("granted", 1, "a", "a-host", None),
    ]
    assert _history(store) == expected
    assert _history(other) == expected  # the same database, whichever process reads it
    entries = store.history(100)
    assert [e.instance_id for e in entries] == ["i-y", "i-x", "i-a", "i-b", "i-b", "i-a"]
    assert entries[0].at == pytest.approx(store.now(), abs=2.0)  # server time, unix seconds
    assert [e.at for e in entries] == sorted((e.at for e in entries), reverse=True)
    assert _history(store, limit=2) == expected[:2]  # newest first


def test_history_keeps_only_the_newest_entries(opened, backend):
    store = opened(lambda: backend.open(history_keep=5))
    for term in range(1, 5):
        assert acquire(store, "a").row.term == term
        assert store.release(controller_id="a", term=term).released
    assert [(reason, term) for reason, term, *_ in _history(store)] == [
        ("released", 4),
        ("granted", 4),
        ("released", 3),
        ("granted", 3),
        ("released", 2),
    ]
    # Trimming loses nothing it still needs: a release finds its term's grant.
    assert _history(store, limit=1) == [("released", 4, "a", "a-host", "a")]


@pytest.mark.parametrize("version", [1, 2])
def test_a_database_of_an_older_schema_upgrades_in_place(opened, backend, version):
    backend.write_old_schema(version)
    store = opened()
    newest = sys.modules[type(store).__module__].SCHEMA_VERSION  # SQLite 3, PostgreSQL 4
    assert store.schema_version == newest
    row = store.leader()
    assert (row.holder_id, row.holder_host, row.term) == ("a", "a-host", 7)
    assert acquire(store, "b").operation == "deny"  # the lease stayed live through the upgrade
    assert store.history(100) == []  # nothing was recorded before the upgrade
    assert store.release(controller_id="a", term=7).released
    assert acquire(store, "b").row.term == 8
    assert _history(store) == [
        ("granted", 8, "b", "b-host", "a"),
        ("released", 7, "a", "a-host", None),  # who held term 6 was never recorded
    ]
    store.close()
    assert opened().schema_version == newest  # and it opens again as it is


# -- PostgreSQL: expiry on each process's own clock (SPEC §15) -----------------------------------


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    base = require_dsn()
    with fresh_schema(base) as dsn:
        yield dsn


def test_postgres_never_grants_early_when_the_database_clock_steps(pg_dsn):
    from conductord.control_api.store_postgres import PostgresStore

    clock_a, clock_b = FakeClock(), FakeClock(50.0)  # two processes, two unrelated clocks
    a = PostgresStore(pg_dsn, min_size=1, max_size=2, lease_clock=clock_a)
    b = PostgresStore(pg_dsn, min_size=1, max_size=2, lease_clock=clock_b)
    try:
        assert acquire(a, "leader", ttl=10).operation == "acquire"
        assert acquire(b, "standby").operation == "deny"  # b first sees the lease now
        # The database clock jumps 60 s forward: by its own stamps the lease expired long ago.
        admin(
            pg_dsn,
            "UPDATE leases SET lease_expires_at = lease_expires_at - 60,"
            " renewed_at = renewed_at - 60",
        )
        clock_b.now += 9.9
        assert acquire(b, "standby").operation == "deny"
        clock_b.now += 0.2  # a full TTL on b's own clock since it first saw that revision
        taken = acquire(b, "standby")
        assert (taken.operation, taken.row.term) == ("acquire", 2)
    finally:
        a.close()
        b.close()


def test_postgres_sees_renewals_through_notify_so_failover_takes_one_ttl(pg_dsn):
    import gevent  # the LISTEN loop is a greenlet: wait with gevent.sleep so it runs

    from conductord.control_api.store_postgres import PostgresStore

    clock_a, clock_b = FakeClock(), FakeClock()
    a = PostgresStore(pg_dsn, min_size=1, max_size=2, lease_clock=clock_a)
    b = PostgresStore(pg_dsn, min_size=1, max_size=2, lease_clock=clock_b)
    woken: list[int] = []
    try:
        b.watch(lambda: woken.append(1))
        acquire(a, "leader", ttl=10)
        deadline = time.monotonic() + 5
        while not woken:  # the listener is up (it fires once when it connects)
            assert time.monotonic() < deadline
            gevent.sleep(0.01)
        clock_b.now += 6
        renewed = acquire(a, "leader", ttl=10)
        assert renewed.operation == "renew"
        wakes = len(woken)
        while b._sightings.get("global", (0, 0))[1] != clock_b.now:
            assert time.monotonic() < deadline
            gevent.sleep(0.01)
        assert len(woken) == wakes  # a renewal does not wake parked waiters
        clock_b.now += 10.1  # one TTL after the renewal, as b heard it
        taken = acquire(b, "standby")
        assert (taken.operation, taken.row.term) == ("acquire", 2)
    finally:
        a.close()
        b.close()


def test_postgres_preference_writes_do_not_keep_a_dead_lease_alive(pg_dsn):
    # Two preferred standbys on one process rewrite preferred_holder_id on every denial. The
    # lease itself does not change, so it must keep ageing (found by the e2e failover test).
    from conductord.control_api.store_postgres import PostgresStore

    clock_a, clock_b = FakeClock(), FakeClock()
    a = PostgresStore(pg_dsn, min_size=1, max_size=2, lease_clock=clock_a)
    b = PostgresStore(pg_dsn, min_size=1, max_size=2, lease_clock=clock_b)
    try:
        acquire(a, "leader", ttl=10)  # and then it dies: no more renewals
        for _ in range(4):
            assert acquire(b, "s1", preferred=True).operation == "deny"
            assert acquire(b, "s2", preferred=True).operation == "deny"
            clock_b.now += 2.6
        taken = acquire(b, "s1", preferred=True)
        assert (taken.operation, taken.row.term) == ("acquire", 2)
    finally:
        a.close()
        b.close()


def test_postgres_decides_a_denial_without_the_row_lock(pg_dsn):
    import psycopg

    from conductord.control_api.store_postgres import PostgresStore

    store = PostgresStore(pg_dsn, min_size=1, max_size=2)
    try:
        assert acquire(store, "leader", ttl=30).operation == "acquire"
        with psycopg.connect(pg_dsn) as locker:  # another process holds the lease row lock
            locker.execute("SELECT 1 FROM leases FOR UPDATE")
            began = time.monotonic()
            assert acquire(store, "standby").operation == "deny"
            assert time.monotonic() - began < 1.0  # answered from a read, not queued
            locker.rollback()
        assert acquire(store, "leader").operation == "renew"  # a change still takes the lock
    finally:
        store.close()


def test_postgres_another_fleet_in_the_same_database_never_keeps_our_lease_alive():
    # NOTIFY is per database: the renewals of a fleet in another schema must not count as
    # writes of our lease (they kept a dead leader's lease alive in this process for good).
    import gevent

    from conductord.control_api.store_postgres import PostgresStore

    base = require_dsn()
    with fresh_schema(base) as ours_dsn, fresh_schema(base) as theirs_dsn:
        clock = FakeClock()
        ours = PostgresStore(ours_dsn, min_size=1, max_size=2, lease_clock=clock)
        watcher = PostgresStore(ours_dsn, min_size=1, max_size=2, lease_clock=clock)
        theirs = PostgresStore(theirs_dsn, min_size=1, max_size=2)
        woken: list[int] = []
        try:
            watcher.watch(lambda: woken.append(1))
            deadline = time.monotonic() + 5
            while not woken:  # listening (it fires once when it connects)
                assert time.monotonic() < deadline
                gevent.sleep(0.01)
            acquire(ours, "leader", ttl=10)  # and then our leader dies
            acquire(watcher, "standby")  # the watcher has seen the lease
            for _ in range(5):  # the other fleet keeps renewing its own lease meanwhile
                acquire(theirs, "their-leader", ttl=10)
                gevent.sleep(0.05)
            clock.now += 10.5
            taken = acquire(watcher, "standby")
            assert (taken.operation, taken.row.term) == ("acquire", 2)
        finally:
            for store in (ours, watcher, theirs):
                store.close()
