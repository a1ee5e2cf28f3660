"""PostgreSQL store of the reference Control API (SPEC §9): several servers, one database.

`--db postgresql://…` selects it (`open_store`). Several Control API processes on different
machines, behind a load balancer, share one database and so one lease. The `Store` contract is
the SQLite store's, and so are the guarantees: never two holders of one term, terms only grow.

Design:
- Lease decisions come from `rules.py`. An acquire is one transaction that locks the lease row
  (`SELECT … FOR UPDATE`; a placeholder row is inserted with `ON CONFLICT DO NOTHING` the first
  time, so even the very first acquirers serialise on a row), THEN reads the database clock
  (`clock_timestamp()`, after the lock: a decision never rests on a reading taken before a
  wait), asks the rules and writes the result, refusing to lower a term. Release likewise.
- Expiry never rests on a clock that can step (SPEC §15). The database clock stamps rows
  (`lease_expires_at`, `renewed_at`, shown on the wire) but decides nothing: every write bumps
  the row's `revision`, and each server process notes on its own lease clock
  (`conductord.clock.lease_clock`) when it first saw each revision. A lease binds others until
  that revision has stayed unchanged for one TTL on this process's own clock: since a process
  can only see a revision after it was written, it never grants before the holder's own
  deadline, whatever the database clock (or this machine's wall clock) does. A process that
  just started has seen nothing, so every unreleased lease is live one TTL from its first look:
  the restart rule for free. A write is named by its revision and a random `write_id`: a
  database failover that lost writes makes the next write reuse a revision number, which
  must still count as new. Every write NOTIFYs it (renewals included), so every
  process's first sighting is within milliseconds of the write and a crash failover still
  takes TTL, not TTL plus the time until the next look. `now()` is the database clock as last
  read (every transaction reads it; a reading older than `CLOCK_REFRESH_SEC` is refreshed by a
  query) carried forward by this machine's monotonic clock, for display only.
- A placeholder row (term 0) stands for "no lease yet"; the rules see `None` for it.
- Connections come from a psycopg_pool pool (checked on checkout, so a database restart costs
  no failed request once it is back). Sessions get a `statement_timeout` (a request never hangs
  on the database) and an `idle_in_transaction_session_timeout` (a frozen server process cannot
  hold the lease row lock for the whole fleet).
- Lease history (SPEC §16, `store_base.history_entry`): each grant, takeover, release and
  instance conflict adds a `lease_history` row in the transaction that decided it, under the
  lease row lock, so the ids follow the decisions of every process; the oldest rows past
  `history_keep` go in the same transaction. A unique index keeps one instance conflict per
  (term, instance) across processes; `RecordedConflicts` spares a refused process's later
  requests the insert in this one.
- Schema: a `schema_version` table; migrations run on open under an advisory lock (several
  servers may start at once), all steps in one transaction, and a newer schema than this code
  knows is refused.
- Errors: every psycopg failure becomes a one-line `StoreError` (the app answers 503, the
  server exits 2 at start); the DSN's password is masked in every message.
- Cross-process wake (SPEC §12): every lease write `NOTIFY conductord_lease` in its
  transaction with the payload `<leases table oid> <lease> <revision> <write_id>
  <change|renew>`, delivered at commit.
  `watch(callback)` runs one LISTEN connection in a greenlet; it records each revision's first
  sighting and calls every callback on a holder change (grant, takeover, release; not on a
  renewal, which would only wake every parked waiter for nothing) and after every
  (re)connect, since notifications sent while it was not listening are lost. Without a
  watcher, a process notes revisions only when it reads the row: slower failover, never an
  early grant.

gevent: psycopg >= 3.1.14 notices a monkey-patched `select` when it is imported and then waits
on sockets through it, so a slow query parks only its own greenlet. This module must therefore
be imported after `monkey.patch_all()` (the CLI imports it lazily, after patching). The LISTEN
greenlet waits with `gevent.socket.wait_read`, which cooperates with or without patching.

Limits: NOTIFY is per database; a notification names the `leases` table it is about (its oid),
so fleets in different schemas of one database never take each other's writes for their own.
`watch()` must be called from the gevent hub's thread, and so must `close()` when a watcher
runs. Each process holds up to
`max_size` + 1 connections.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import psycopg
from gevent.event import Event
from gevent.socket import wait_read
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from conductord import clock as lease_clocks
from conductord.control_api.rules import (
    LEASE_NAME,
    AcquireDecision,
    LeaseRow,
    ReleaseDecision,
    decide_acquire,
    decide_release,
)
from conductord.control_api.store_base import (
    CONTROLLER_COLUMNS,
    HISTORY_KEEP,
    INSTANCE_RETENTION_SEC,
    ControllerRow,
    HistoryEntry,
    HistorySql,
    RecordedConflicts,
    StoreError,
    describe_db,
    dsn_secrets,
    read_controllers,
    read_history,
    record_history,
    unrecorded_conflict,
)
from conductord.logs import get_logger
from conductord.wire import Heartbeat

SCHEMA_VERSION = 4
NOTIFY_CHANNEL = "conductord_lease"
CLOCK_REFRESH_SEC = 5.0

# Key of the transaction-scoped advisory lock that serialises migrations (any constant works;
# this one spells "cndctrd" in ASCII).
_MIGRATION_LOCK_KEY = 0x636E6463747264

# Connection defaults; anything the DSN itself sets wins. TCP keepalives and a user timeout
# make a vanished database server an error within seconds instead of a hang.
_CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "application_name": "conductord-control-api",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
}

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE leases (
            lease_name text PRIMARY KEY,
            holder_id text NOT NULL,
            holder_host text NOT NULL,
            term bigint NOT NULL CHECK (term >= 0),
            lease_expires_at double precision NOT NULL,
            renewed_at double precision NOT NULL,
            preferred_holder_id text,
            metadata_json text,
            released boolean NOT NULL DEFAULT false,
            last_client_now double precision,
            updated_at double precision NOT NULL
        )
        """,
        """
        CREATE TABLE controllers (
            controller_id text PRIMARY KEY,
            host text NOT NULL,
            role text,
            priority integer,
            status text,
            version text,
            heartbeat_at bigint,
            started_at bigint,
            first_seen_at double precision NOT NULL,
            last_seen_at double precision NOT NULL
        )
        """,
    ),
    # SPEC §15: the holder's instance, a revision per write (expiry is judged per process on
    # its own clock), and every instance a controller id was heard from.
    2: (
        "ALTER TABLE leases ADD COLUMN holder_instance_id text",
        "ALTER TABLE leases ADD COLUMN revision bigint NOT NULL DEFAULT 0",
        "ALTER TABLE controllers ADD COLUMN instance_id text",
        """
        CREATE TABLE controller_instances (
            controller_id text NOT NULL,
            instance_id text NOT NULL,
            host text NOT NULL,
            last_seen_at double precision NOT NULL,
            PRIMARY KEY (controller_id, instance_id)
        )
        """,
    ),
    # SPEC §16: every change of holder or term; one instance conflict per (term, instance).
    3: (
        """
        CREATE TABLE lease_history (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            lease_name text NOT NULL,
            at double precision NOT NULL,
            term bigint NOT NULL,
            holder_id text NOT NULL,
            holder_host text NOT NULL,
            previous_holder_id text,
            reason text NOT NULL,
            instance_id text
        )
        """,
        # Newest first, and a release's grant is found walking back from the newest.
        "CREATE INDEX lease_history_recent ON lease_history (lease_name, id)",
        "CREATE UNIQUE INDEX lease_history_conflicts ON lease_history"
        " (lease_name, term, instance_id) WHERE reason = 'instance_conflict'",
    ),
    # SPEC §15: a random name for every write of the lease row, so a write is known by itself,
    # not by a revision number that a database failover losing writes would hand out again.
    4: ("ALTER TABLE leases ADD COLUMN write_id text",),
}

_CLOCK = "extract(epoch FROM clock_timestamp())::float8"
_LEASE_COLUMNS = (
    "lease_name, holder_id, holder_host, term, lease_expires_at, renewed_at, "
    "preferred_holder_id, metadata_json, released, holder_instance_id, revision, write_id"
)
_READ_LEASE = f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_name = %s"
# The `leases` table this connection's search_path finds, as text: what a notification is about.
_TABLE_OID = "'leases'::regclass::oid::text"
_LOCK_LEASE = f"{_READ_LEASE} FOR UPDATE"
_INSERT_PLACEHOLDER = f"""
    INSERT INTO leases ({_LEASE_COLUMNS}, updated_at)
    VALUES (%s, '', '', 0, 0, 0, NULL, NULL, true, NULL, 0, NULL, {_CLOCK})
    ON CONFLICT (lease_name) DO NOTHING
"""
_UPDATE_LEASE = f"""
    UPDATE leases SET
        holder_id = %(holder_id)s, holder_host = %(holder_host)s, term = %(term)s,
        lease_expires_at = %(lease_expires_at)s, renewed_at = %(renewed_at)s,
        preferred_holder_id = %(preferred_holder_id)s, metadata_json = %(metadata_json)s,
        released = %(released)s, holder_instance_id = %(holder_instance_id)s,
        revision = revision + %(bump)s,
        write_id = CASE WHEN %(bump)s = 1 THEN %(write_id)s ELSE write_id END,
        last_client_now = coalesce(%(client_now)s, last_client_now),
        updated_at = {_CLOCK}
    WHERE lease_name = %(lease_name)s AND term <= %(term)s
    RETURNING revision, write_id
"""
_HISTORY_SQL = HistorySql.styled("%s", lambda name: f"%({name})s")
# The controller upsert and, when the sender names its instance, the instance upsert, in one
# round trip.
_HEARTBEAT = f"""
    WITH beat AS (
        INSERT INTO controllers ({CONTROLLER_COLUMNS})
        VALUES (%(controller_id)s, %(host)s, %(role)s, %(priority)s, %(status)s, %(version)s,
                %(heartbeat_at)s, %(started_at)s, {_CLOCK}, {_CLOCK}, %(instance_id)s)
        ON CONFLICT (controller_id) DO UPDATE SET
            host = excluded.host, role = excluded.role, priority = excluded.priority,
            status = excluded.status, version = excluded.version,
            heartbeat_at = excluded.heartbeat_at, started_at = excluded.started_at,
            last_seen_at = excluded.last_seen_at,
            instance_id = coalesce(excluded.instance_id, controllers.instance_id)
        RETURNING {CONTROLLER_COLUMNS}
    ), seen AS (
        INSERT INTO controller_instances (controller_id, instance_id, host, last_seen_at)
        SELECT %(controller_id)s, %(instance_id)s, %(host)s, {_CLOCK}
        WHERE %(instance_id)s::text IS NOT NULL
        ON CONFLICT (controller_id, instance_id) DO UPDATE SET
            host = excluded.host, last_seen_at = excluded.last_seen_at
    )
    SELECT {CONTROLLER_COLUMNS} FROM beat
"""

Callback = Callable[[], None]
Clock = Callable[[], float]
# One write of the lease row as a process sees it: (revision, write_id).
Write = tuple[int, str | None]


def _is_placeholder(values: tuple | None) -> bool:
    # The placeholder (term 0) means "never granted": the rules must see no lease at all.
    return values is None or values[3] == 0


class PostgresStore:
    """The PostgreSQL store; safe to share between greenlets and threads."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout: float = 3.0,
        statement_timeout_ms: int = 5000,
        idle_in_transaction_timeout_ms: int = 10000,
        log: Any = None,
        lease_clock: Clock = lease_clocks.lease_clock,
        history_keep: int = HISTORY_KEEP,
    ) -> None:
        self.display = describe_db(dsn)
        self._history_keep = history_keep
        self._conflicts = RecordedConflicts()
        self._lease_clock = lease_clock
        # lease name -> (the write, lease-clock time this process first saw it); see module doc.
        self._sightings: dict[str, tuple[Write, float]] = {}
        self._pruned_at = float("-inf")
        self._secrets = dsn_secrets(dsn)
        self._log = log if log is not None else get_logger()
        self._pool_timeout = pool_timeout
        self._session_settings = (
            f"SET statement_timeout = {int(statement_timeout_ms)};"
            f" SET idle_in_transaction_session_timeout = {int(idle_in_transaction_timeout_ms)}"
        )
        self._closed = False
        self._clock_reading: tuple[float, float] | None = None  # (db seconds, local monotonic)
        self._callbacks: list[Callback] = []
        self._watch_lock = threading.Lock()
        self._listener: gevent.Greenlet | None = None
        self._stop_listening = Event()
        try:
            given = conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise StoreError(f"invalid PostgreSQL URL {self.display}: {self._clean(exc)}") from None
        extra = {key: value for key, value in _CONNECT_DEFAULTS.items() if key not in given}
        self._conninfo = make_conninfo(dsn, **extra)

        # One direct connection first: it migrates the schema, and if the database is
        # unreachable its error (not a pool timeout) is what the operator reads.
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                self._migrate(conn)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot open PostgreSQL database {self.display}: {self._clean(exc)}"
            ) from None

        self._pool = ConnectionPool(
            self._conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout,
            kwargs={"autocommit": True},
            configure=self._configure,
            check=ConnectionPool.check_connection,
            name="conductord-control-api",
            open=False,
        )
        self._pool.open(wait=False)

    # -- plumbing --------------------------------------------------------------------------

    def _clean(self, exc: BaseException) -> str:
        """One line, password masked: libpq messages span lines and may echo the DSN."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute(self._session_settings)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        if self._closed:
            raise StoreError("store is closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout:
            raise StoreError(
                f"database {self.display}: no connection within {self._pool_timeout:g} s"
            ) from None
        except psycopg.Error as exc:
            raise StoreError(f"database {self.display}: {self._clean(exc)}") from None

    def _db_now(self, conn: psycopg.Connection) -> float:
        now = conn.execute(f"SELECT {_CLOCK}").fetchone()[0]
        self._clock_reading = (now, time.monotonic())
        return now

    def _migrate(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version integer PRIMARY KEY, migrated_at double precision NOT NULL)"
            )
            version = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
            current = version.fetchone()[0]
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.display} has schema version {current}; "
                    f"this conductord knows up to {SCHEMA_VERSION}"
                )
            for step in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
                conn.execute(
                    f"INSERT INTO schema_version (version, migrated_at) VALUES (%s, {_CLOCK})",
                    (step,),
                )

    @property
    def schema_version(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    # -- the Store interface ---------------------------------------------------------------

    def lease_time(self) -> float:
        return self._lease_clock()

    def _sighted(self, lease_name: str, write: Write, at: float | None = None) -> float:
        """When this process first saw `write` of the lease (noting it now if new).

        A write is named by its revision AND its random `write_id`: after a database failover
        that lost the last writes, the next write reuses a revision number this process may
        have seen long ago, and must still count as new. An older revision than the one noted
        (a late notification) changes nothing and is treated as just seen.
        """
        seen = self._sightings.get(lease_name)
        if seen is None or write[0] > seen[0][0] or (write[0] == seen[0][0] and write != seen[0]):
            seen = (write, self._lease_clock() if at is None else at)
            self._sightings[lease_name] = seen
        return seen[1] if seen[0] == write else self._lease_clock()

    def _lease(self, values: tuple | None) -> LeaseRow | None:
        """The row for the rules, its deadline one TTL after this process first saw it."""
        if _is_placeholder(values):
            return None
        *head, released, holder_instance_id, revision, write_id = values
        row = LeaseRow(*head, released=released, holder_instance_id=holder_instance_id)
        first_seen = self._sighted(row.lease_name, (revision, write_id))
        return dataclasses.replace(row, deadline=first_seen + max(row.ttl_sec, 0.0))

    def now(self) -> float:
        reading = self._clock_reading
        if reading is not None and time.monotonic() - reading[1] < CLOCK_REFRESH_SEC:
            return reading[0] + (time.monotonic() - reading[1])
        with self._connection() as conn:
            return self._db_now(conn)

    def acquire(
        self,
        *,
        controller_id: str,
        host: str,
        ttl_sec: int,
        preferred: bool,
        metadata_json: str | None = None,
        client_now: float | None = None,
        instance_id: str | None = None,
        one_shot: bool = False,
        lease_name: str = LEASE_NAME,
    ) -> AcquireDecision:
        def decide(values: tuple | None, now: float, wall: float) -> AcquireDecision:
            return decide_acquire(
                self._lease(values),
                controller_id=controller_id,
                host=host,
                ttl_sec=ttl_sec,
                preferred=preferred,
                metadata_json=metadata_json,
                now=now,
                wall=wall,
                instance_id=instance_id,
                one_shot=one_shot,
                lease_name=lease_name,
            )

        # Most acquires are denials (every standby, every renew interval, on every process).
        # A denial changes nothing, so deciding it from a committed read is the request
        # arriving at the moment of that read, when the lease was indeed live: no row lock, no
        # clock query (the display clock carried forward will do). Anything that would change
        # the row, or record a history entry, is decided afresh under the lock below.
        with self._connection() as conn:
            values = conn.execute(_READ_LEASE, (lease_name,)).fetchone()
        if values is not None:
            decision = decide(values, self._lease_clock(), self.now())
            if not (decision.changed or self._unrecorded_conflict(decision, instance_id)):
                return decision
        with self._connection() as conn, conn.transaction():
            values = conn.execute(_LOCK_LEASE, (lease_name,)).fetchone()
            if values is None:
                # First acquire ever: create the row to lock. A concurrent first acquirer
                # waits on our insert, does nothing, and then waits on our row lock.
                conn.execute(_INSERT_PLACEHOLDER, (lease_name,))
                values = conn.execute(_LOCK_LEASE, (lease_name,)).fetchone()
            wall = self._db_now(conn)
            decided_at = self._lease_clock()  # after the row lock: never before the read
            decision = decide(values, decided_at, wall)
            if decision.changed:
                # The client's clock is kept for diagnosis only; it decides nothing.
                recorded = client_now if decision.is_leader else None
                # A denial writes only a new preference: the lease itself did not change, so
                # it is no new revision (it must keep ageing in every process's view).
                change = {"acquire": "change", "renew": "renew"}.get(decision.operation)
                self._write_lease(conn, decision.row, decided_at, change, client_now=recorded)
            conflict = self._record(conn, decision, instance_id, wall)
        self._conflicts.add(conflict)  # once committed
        return decision

    def release(
        self,
        *,
        controller_id: str,
        term: int,
        instance_id: str | None = None,
        one_shot: bool = False,
        lease_name: str = LEASE_NAME,
    ) -> ReleaseDecision:
        with self._connection() as conn, conn.transaction():
            values = conn.execute(_LOCK_LEASE, (lease_name,)).fetchone()
            wall = self._db_now(conn)
            decided_at = self._lease_clock()
            decision = decide_release(
                self._lease(values),
                controller_id=controller_id,
                term=term,
                now=decided_at,
                wall=wall,
                instance_id=instance_id,
                one_shot=one_shot,
            )
            if decision.changed and decision.row is not None:
                self._write_lease(conn, decision.row, decided_at, "change", client_now=None)
            conflict = self._record(conn, decision, instance_id, wall)
        self._conflicts.add(conflict)  # once committed
        return decision

    def heartbeat(self, heartbeat: Heartbeat) -> ControllerRow:
        with self._connection() as conn:
            values = conn.execute(_HEARTBEAT, dataclasses.asdict(heartbeat)).fetchone()
            row = ControllerRow(*values)
            if heartbeat.instance_id is not None and row.last_seen_at - self._pruned_at >= 60.0:
                self._pruned_at = row.last_seen_at
                conn.execute(
                    "DELETE FROM controller_instances WHERE last_seen_at < %s",
                    (row.last_seen_at - INSTANCE_RETENTION_SEC,),
                )
        self._clock_reading = (row.last_seen_at, time.monotonic())
        return row

    def leader(self, lease_name: str = LEASE_NAME) -> LeaseRow | None:
        with self._connection() as conn:
            values = conn.execute(_READ_LEASE, (lease_name,)).fetchone()
        return self._lease(values)

    def controllers(self) -> list[ControllerRow]:
        with self._connection() as conn:
            return read_controllers(conn)

    def history(self, limit: int, lease_name: str = LEASE_NAME) -> list[HistoryEntry]:
        with self._connection() as conn:
            return read_history(conn, _HISTORY_SQL, lease_name, limit)

    def watch(self, callback: Callback) -> None:
        """Call `callback()` whenever any server changes the lease holder (see module doc)."""
        with self._watch_lock:
            if self._closed:
                raise StoreError("store is closed")
            self._callbacks.append(callback)
            if self._listener is None:
                self._listener = gevent.spawn(self._listen)

    def close(self) -> None:
        with self._watch_lock:
            if self._closed:
                return
            self._closed = True
            listener, self._listener = self._listener, None
        self._stop_listening.set()
        if listener is not None:
            listener.kill(block=True, timeout=2)
        self._pool.close(timeout=2)

    # -- rows and notifications ------------------------------------------------------------

    def _write_lease(
        self,
        conn: psycopg.Connection,
        row: LeaseRow,
        decided_at: float,
        change: str | None,
        *,
        client_now: float | None,
    ) -> None:
        """Write `row`; a `change` ("change" or "renew") makes it the next revision, announced
        to every process (delivered at commit). None: only the preference changed."""
        cursor = conn.execute(
            _UPDATE_LEASE,
            {
                "lease_name": row.lease_name,
                "holder_id": row.holder_id,
                "holder_host": row.holder_host,
                "term": row.term,
                "lease_expires_at": row.lease_expires_at,
                "renewed_at": row.renewed_at,
                "preferred_holder_id": row.preferred_holder_id,
                "metadata_json": row.metadata_json,
                "released": row.released,
                "holder_instance_id": row.holder_instance_id,
                "client_now": client_now,
                "bump": 0 if change is None else 1,
                "write_id": secrets.token_hex(8),
            },
        )
        written = cursor.fetchone()
        if written is None:
            # Belt and braces: the rules never lower a term; refuse to store one that would.
            raise StoreError(f"refused to lower the term of lease {row.lease_name!r}")
        if change is None:
            return
        write: Write = (written[0], written[1])
        # Our own write: this process knows it from the moment it decided it (the holder's
        # deadline is measured from its send, before that moment).
        self._sighted(row.lease_name, write, at=decided_at)
        # Delivered to every listener when this transaction commits, never before.
        payload = f"{row.lease_name} {write[0]} {write[1]} {change}"
        # NOTIFY is per database: the payload names our `leases` table (its oid), so that a
        # fleet in another schema of the same database is never taken for ours.
        conn.execute(
            f"SELECT pg_notify(%s, {_TABLE_OID} || ' ' || %s)", (NOTIFY_CHANNEL, payload)
        )

    def _unrecorded_conflict(self, decision: AcquireDecision, instance_id: str | None) -> bool:
        return unrecorded_conflict(self._conflicts, decision, instance_id)

    def _record(
        self,
        conn: psycopg.Connection,
        decision: AcquireDecision | ReleaseDecision,
        instance_id: str | None,
        wall: float,
    ) -> tuple[str, int, str | None] | None:
        """The decision's history entry in the caller's transaction (which holds the lease row
        lock, so entries are numbered in decision order across processes)."""
        return record_history(
            conn,
            _HISTORY_SQL,
            decision,
            instance_id=instance_id,
            at=wall,
            conflicts=self._conflicts,
            keep=self._history_keep,
        )

    def _on_notify(self, payload: str, table_oid: str) -> bool:
        """Note a write another process made; True when the holder changed (wake waiters).

        Payload: `<leases table oid> <lease> <revision> <write_id> <change|renew>`. A write to
        another `leases` table (another fleet in another schema of the database) is none of
        ours: ignored. Anything else (an older server's payload) only wakes.
        """
        parts = payload.split(" ")
        if len(parts) != 5 or not parts[2].isdigit():
            return True
        oid, lease_name, revision, write_id, change = parts
        if oid != table_oid:
            return False
        self._sighted(lease_name, (int(revision), write_id))
        return change != "renew"

    def _fire(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                self._log.exception("store.watch_callback_failed")

    def _listen(self) -> None:
        """The LISTEN loop: reconnects with backoff until `close()`."""
        backoff, failing = 0.1, False
        while not self._stop_listening.is_set():
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True)
            except psycopg.Error as exc:
                if not failing:
                    self._log.warning(
                        "store.listen_failed", db=self.display, error=self._clean(exc)
                    )
                failing = True
                self._stop_listening.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            listening_since = None
            try:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                table_oid = str(conn.execute(f"SELECT {_TABLE_OID}").fetchone()[0])
                listening_since = time.monotonic()
                if failing:
                    self._log.info("store.listen_recovered", db=self.display)
                failing = False
                self._fire()  # whatever changed while we were not listening
                while not self._stop_listening.is_set():
                    wait_read(conn.fileno())
                    # timeout=0: drain what has arrived without blocking the hub.
                    # (Exhaust the generator: it holds the connection lock while suspended.)
                    notes = [note.payload for note in conn.notifies(timeout=0)]
                    if any([self._on_notify(payload, table_oid) for payload in notes]):
                        self._fire()
            except (psycopg.Error, OSError) as exc:
                if not self._stop_listening.is_set():
                    # A connection that dies soon after LISTEN backs off like one that never
                    # came up; only a connection that lasted a while starts again at 0.1 s.
                    lasted = listening_since is not None and (
                        time.monotonic() - listening_since >= 10.0
                    )
                    backoff = 0.1 if lasted else min(backoff * 2, 5.0)
                    if not failing:
                        self._log.warning(
                            "store.listen_failed", db=self.display, error=self._clean(exc)
                        )
                    failing = True
                    self._stop_listening.wait(backoff)
            finally:
                conn.close()
