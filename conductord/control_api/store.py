"""Storage of the reference Control API: the SQLite store, and `open_store()` to pick one.

The app talks to a `Store` only (acquire, release, heartbeat, leader, controllers, close; the
interface and its rows are in `store_base.py`, shared with the PostgreSQL store), so the
PostgreSQL store (`store_postgres.py`, `--db postgresql://…`, an optional extra) sits beside
`SqliteStore` and `open_store()` picks one by the `--db` value. Lease decisions come from
`rules.py`; a store only reads the row, asks the rules, and writes the result inside one
transaction, reading the server clock after it holds the write lock, so that a decision that
changes the lease never rests on a stale reading (SQLite decides a denial, which writes
nothing, from a snapshot without the lock: see below).

SQLite specifics:
- WAL journal with `synchronous=NORMAL`: a commit is in the WAL (the OS page cache) before it
  returns, so a `kill -9` of the server loses no acknowledged lease; only an OS crash or power
  loss can drop the last commits, and then the lease simply lapses earlier than promised to
  nobody (the leader's own deadline is measured from its request, not from the server's row).
- Every lease change runs in `BEGIN IMMEDIATE`, which takes the database write lock before the
  read, so concurrent acquirers (greenlets, threads, even other processes on the same file)
  are serialised and never both win one term. Busy waits are bounded by `busy_timeout`.
- Acquire decides from a plain read first (an autocommit SELECT: one consistent snapshot)
  and takes the write lock only when the decision would change the row (grant, renew,
  takeover, a new preference), then reads and decides again under the lock and writes that
  second decision, never the first. Most acquires are denials (every standby, every renew
  interval); a denial changes nothing, so deciding it from a committed snapshot is the same
  as the request arriving at the moment of that snapshot, when the lease was indeed live.
  One holder per term and growing terms rest on the locked path alone.
- Heartbeat is one autocommit `INSERT … ON CONFLICT … RETURNING` (SQLite >= 3.35; older
  libraries get BEGIN IMMEDIATE, upsert, SELECT, COMMIT). Its `last_seen_at` is read just
  before the statement rather than under the lock: a heartbeat that waited for another
  process's lock is stamped when it arrived, which is what the field means.
- Lease expiry is decided on the lease clock (`conductord.clock.lease_clock`, CLOCK_BOOTTIME
  on Linux), never on the wall clock: a row keeps its `deadline` on that clock and the
  `boot_id` it belongs to. The wall clock only stamps `lease_expires_at` / `renewed_at` for
  display, so a step of the server's clock (NTP at boot, a resumed VM) never shortens a live
  lease (SPEC §15). On open, every unreleased lease whose deadline belongs to another boot (or
  to none) gets a fresh deadline of one full TTL from now: the restart rule, judged without
  the wall clock, which may have stepped with the restart; on the same boot the stored
  deadline is exact and kept.
- Heartbeats record the sender's instance in `controller_instances`, so two processes with one
  controller id show up (SPEC §15); rows not heard of for a day are pruned.
- Lease history (SPEC §16, `store_base.history_entry`): each grant, takeover, release and
  instance conflict adds a `lease_history` row in the transaction that decided it, and the
  oldest rows past `history_keep` go in the same transaction. An instance conflict, which a
  denial-only snapshot would not write, takes the write lock once per (term, instance): a
  unique index keeps one entry, and `RecordedConflicts` spares the refused process's every
  later request the lock.
- The schema is versioned with `PRAGMA user_version` and migrated forward on open (1 -> 2 -> 3,
  all steps in one transaction); a newer database than this code knows is refused
  rather than guessed at.
- The database file is created mode 0600 before SQLite opens it; SQLite gives the `-wal` and
  `-shm` files the mode of the database file. Existing files keep their mode.
- One connection per store, guarded by a lock: SQLite calls do not yield to gevent, so each
  transaction is short and runs to completion without interleaving.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
    POSTGRES_SCHEMES,
    Clock,
    ControllerRow,
    HistoryEntry,
    HistorySql,
    RecordedConflicts,
    Store,
    StoreError,
    describe_db,
    dsn_secrets,
    read_controllers,
    read_history,
    record_history,
    unrecorded_conflict,
)
from conductord.wire import Heartbeat

# What callers import from here (the interface lives in store_base, shared with PostgreSQL).
__all__ = [
    "SCHEMA_VERSION",
    "ControllerRow",
    "HistoryEntry",
    "SqliteStore",
    "Store",
    "StoreError",
    "describe_db",
    "dsn_secrets",
    "open_store",
]

SCHEMA_VERSION = 3


def open_store(db: str, *, clock: Clock = time.time) -> Store:
    """Open the store named by `--db`: a PostgreSQL URL, else a SQLite file path.

    `clock` is the wall clock rows are stamped with (SQLite only; PostgreSQL stamps with the
    database's clock). Neither decides expiry: see the module docstring.
    """
    if db.startswith(POSTGRES_SCHEMES):
        try:
            # Imported here, after the entry point's monkey-patching (psycopg picks its
            # gevent-aware wait at import), and only when asked for (an optional extra).
            from conductord.control_api.store_postgres import PostgresStore
        except ModuleNotFoundError as exc:
            if exc.name not in ("psycopg", "psycopg_pool"):
                raise
            raise StoreError(
                "PostgreSQL support is not installed: pip install 'conductord[postgres]'"
            ) from None
        return PostgresStore(db)
    return SqliteStore(db, clock=clock)


_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE leases (
            lease_name TEXT PRIMARY KEY,
            holder_id TEXT NOT NULL,
            holder_host TEXT NOT NULL,
            term INTEGER NOT NULL CHECK (term >= 1),
            lease_expires_at REAL NOT NULL,
            renewed_at REAL NOT NULL,
            preferred_holder_id TEXT,
            metadata_json TEXT,
            released INTEGER NOT NULL DEFAULT 0,
            last_client_now REAL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE controllers (
            controller_id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            role TEXT,
            priority INTEGER,
            status TEXT,
            version TEXT,
            heartbeat_at INTEGER,
            started_at INTEGER,
            first_seen_at REAL NOT NULL,
            last_seen_at REAL NOT NULL
        )
        """,
    ),
    # SPEC §15: the holder's instance, expiry on the lease clock of a named boot, and every
    # instance a controller id was heard from.
    2: (
        "ALTER TABLE leases ADD COLUMN holder_instance_id TEXT",
        "ALTER TABLE leases ADD COLUMN deadline REAL",
        "ALTER TABLE leases ADD COLUMN boot_id TEXT",
        "ALTER TABLE controllers ADD COLUMN instance_id TEXT",
        """
        CREATE TABLE controller_instances (
            controller_id TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            host TEXT NOT NULL,
            last_seen_at REAL NOT NULL,
            PRIMARY KEY (controller_id, instance_id)
        )
        """,
    ),
    # SPEC §16: every change of holder or term; one instance conflict per (term, instance).
    3: (
        """
        CREATE TABLE lease_history (
            id INTEGER PRIMARY KEY,
            lease_name TEXT NOT NULL,
            at REAL NOT NULL,
            term INTEGER NOT NULL,
            holder_id TEXT NOT NULL,
            holder_host TEXT NOT NULL,
            previous_holder_id TEXT,
            reason TEXT NOT NULL,
            instance_id TEXT
        )
        """,
        # Newest first, and a release's grant is found walking back from the newest.
        "CREATE INDEX lease_history_recent ON lease_history (lease_name, id)",
        "CREATE UNIQUE INDEX lease_history_conflicts ON lease_history"
        " (lease_name, term, instance_id) WHERE reason = 'instance_conflict'",
    ),
}

_LEASE_COLUMNS = (
    "lease_name, holder_id, holder_host, term, lease_expires_at, renewed_at, "
    "preferred_holder_id, metadata_json, released, holder_instance_id, deadline"
)
_UPSERT_CONTROLLER = f"""
    INSERT INTO controllers ({CONTROLLER_COLUMNS})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (controller_id) DO UPDATE SET
        host = excluded.host, role = excluded.role, priority = excluded.priority,
        status = excluded.status, version = excluded.version,
        heartbeat_at = excluded.heartbeat_at, started_at = excluded.started_at,
        last_seen_at = excluded.last_seen_at,
        instance_id = coalesce(excluded.instance_id, controllers.instance_id)
"""
_HISTORY_SQL = HistorySql.styled("?", lambda name: f":{name}")
_UPSERT_INSTANCE = """
    INSERT INTO controller_instances (controller_id, instance_id, host, last_seen_at)
    VALUES (?, ?, ?, ?)
    ON CONFLICT (controller_id, instance_id) DO UPDATE SET
        host = excluded.host, last_seen_at = excluded.last_seen_at
"""


def _lease_from_row(values: tuple | None) -> LeaseRow | None:
    if values is None:
        return None
    *head, released, holder_instance_id, deadline = values
    return LeaseRow(
        *head, released=bool(released), holder_instance_id=holder_instance_id, deadline=deadline
    )


def _create_private_file(path: str) -> None:
    # O_CREAT with 0600: created owner-only from the first byte (umask can only narrow it).
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


class SqliteStore:
    """The SQLite store. One connection; safe to share between greenlets and threads.

    `clock` stamps rows (wall time); `lease_clock` decides expiry and `boot_id` names the boot
    its readings belong to (tests inject both to stage a restart on another boot).
    `history_keep` is how many lease history entries are kept (tests make it small).
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Clock = time.time,
        lease_clock: Clock = lease_clocks.lease_clock,
        boot_id: Callable[[], str | None] = lease_clocks.boot_id,
        busy_timeout_ms: int = 5000,
        history_keep: int = HISTORY_KEEP,
    ):
        self.path = path
        self._history_keep = history_keep
        self._conflicts = RecordedConflicts()
        self._clock = clock
        self._lease_clock = lease_clock
        self._boot_id = boot_id()
        self._pruned_at = float("-inf")
        self._lock = threading.Lock()
        self._closed = False
        # RETURNING arrived in SQLite 3.35 (the library Python runs on, not the module).
        self._upsert_returning = sqlite3.sqlite_version_info >= (3, 35, 0)
        try:
            if path != ":memory:":
                _create_private_file(path)
            self._conn = sqlite3.connect(
                path,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,
                timeout=busy_timeout_ms / 1000,
            )
        except OSError as exc:
            raise StoreError(f"cannot open database {path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if path != ":memory:" and str(mode).lower() != "wal":
                raise StoreError(f"cannot open database {path}: WAL journal mode unavailable")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            self._restart_rule()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"cannot open database {path}: {exc}") from None
        except StoreError:
            self._conn.close()
            raise

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                # e.g. "database is locked" after busy_timeout, or a full disk. A failed
                # COMMIT can leave the transaction open; roll it back so the next request
                # does not fail with "cannot start a transaction within a transaction".
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise StoreError(f"database {self.path}: {exc}") from None

    @contextmanager
    def _autocommit(self) -> Iterator[sqlite3.Connection]:
        # No BEGIN: each statement is its own transaction (a read sees one committed snapshot).
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"database {self.path}: {exc}") from None

    def _migrate(self) -> None:
        with self._immediate() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {version}; "
                    f"this conductord knows up to {SCHEMA_VERSION}"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _restart_rule(self) -> None:
        """Every unreleased lease not on this boot's lease clock is live one TTL from now.

        Judged without the wall clock, which may have stepped together with the restart. A
        lease written on this very boot keeps its exact deadline.
        """
        with self._immediate() as conn:
            start = self._lease_clock()
            stale = "released = 0 AND (deadline IS NULL OR boot_id IS NULL"
            stale += " OR boot_id != ?)" if self._boot_id is not None else " OR 1)"
            conn.execute(
                "UPDATE leases SET deadline = ? + max(lease_expires_at - renewed_at, 0),"
                f" boot_id = ? WHERE {stale}",
                (start, self._boot_id, *([self._boot_id] if self._boot_id is not None else [])),
            )

    @property
    def schema_version(self) -> int:
        with self._autocommit() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    # -- the Store interface --------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def lease_time(self) -> float:
        return self._lease_clock()

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
        def decide(row: LeaseRow | None) -> AcquireDecision:
            return decide_acquire(
                row,
                controller_id=controller_id,
                host=host,
                ttl_sec=ttl_sec,
                preferred=preferred,
                metadata_json=metadata_json,
                # Read after the row: the row is never newer than `now`.
                now=self._lease_clock(),
                wall=self._clock(),
                instance_id=instance_id,
                one_shot=one_shot,
                lease_name=lease_name,
            )

        # A denial from a snapshot equals the request arriving at that snapshot, so it needs
        # no write lock. Anything that would change the row is decided afresh under the lock
        # below; the snapshot's decision is never written (it may be stale by then).
        # An instance conflict changes no row but is a history entry, once per (term, instance).
        with self._autocommit() as conn:
            decision = decide(self._read_lease(conn, lease_name))
        if not (decision.changed or self._unrecorded_conflict(decision, instance_id)):
            return decision
        with self._immediate() as conn:
            decision = decide(self._read_lease(conn, lease_name))
            if decision.changed:
                # The client's clock is kept for diagnosis only; it decides nothing.
                recorded = client_now if decision.is_leader else None
                self._write_lease(conn, decision.row, client_now=recorded)
            conflict = self._record(conn, decision, instance_id)
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
        with self._immediate() as conn:
            row = self._read_lease(conn, lease_name)
            decision = decide_release(
                row,
                controller_id=controller_id,
                term=term,
                now=self._lease_clock(),
                wall=self._clock(),
                instance_id=instance_id,
                one_shot=one_shot,
            )
            if decision.changed and decision.row is not None:
                self._write_lease(conn, decision.row, client_now=None)
            conflict = self._record(conn, decision, instance_id)
        self._conflicts.add(conflict)  # once committed
        return decision

    def heartbeat(self, heartbeat: Heartbeat) -> ControllerRow:
        hb = heartbeat
        controller_id, host, instance_id = hb.controller_id, hb.host, hb.instance_id
        reported = (
            controller_id, host, hb.role, hb.priority, hb.status, hb.version, hb.heartbeat_at,
            hb.started_at,
        )
        if self._upsert_returning and instance_id is None:
            # One statement in autocommit is its own transaction: no BEGIN/SELECT/COMMIT.
            with self._autocommit() as conn:
                now = self._clock()
                rows = conn.execute(
                    f"{_UPSERT_CONTROLLER} RETURNING {CONTROLLER_COLUMNS}",
                    (*reported, now, now, None),
                ).fetchall()  # drains the statement, so its transaction commits here
            return ControllerRow(*rows[0])
        with self._immediate() as conn:
            now = self._clock()
            conn.execute(_UPSERT_CONTROLLER, (*reported, now, now, instance_id))
            if instance_id is not None:
                conn.execute(_UPSERT_INSTANCE, (controller_id, instance_id, host, now))
                if now - self._pruned_at >= 60.0:
                    self._pruned_at = now
                    conn.execute(
                        "DELETE FROM controller_instances WHERE last_seen_at < ?",
                        (now - INSTANCE_RETENTION_SEC,),
                    )
            values = conn.execute(
                f"SELECT {CONTROLLER_COLUMNS} FROM controllers WHERE controller_id = ?",
                (controller_id,),
            ).fetchone()
            return ControllerRow(*values)

    def leader(self, lease_name: str = LEASE_NAME) -> LeaseRow | None:
        with self._autocommit() as conn:
            return self._read_lease(conn, lease_name)

    def controllers(self) -> list[ControllerRow]:
        with self._autocommit() as conn:
            return read_controllers(conn)

    def history(self, limit: int, lease_name: str = LEASE_NAME) -> list[HistoryEntry]:
        with self._autocommit() as conn:
            return read_history(conn, _HISTORY_SQL, lease_name, limit)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    # -- rows -----------------------------------------------------------------------------

    def _unrecorded_conflict(self, decision: AcquireDecision, instance_id: str | None) -> bool:
        return unrecorded_conflict(self._conflicts, decision, instance_id)

    def _record(
        self,
        conn: sqlite3.Connection,
        decision: AcquireDecision | ReleaseDecision,
        instance_id: str | None,
    ) -> tuple[str, int, str | None] | None:
        """The decision's history entry, in the caller's transaction (`record_history`)."""
        return record_history(
            conn,
            _HISTORY_SQL,
            decision,
            instance_id=instance_id,
            at=self._clock(),
            conflicts=self._conflicts,
            keep=self._history_keep,
        )

    @staticmethod
    def _read_lease(conn: sqlite3.Connection, lease_name: str) -> LeaseRow | None:
        values = conn.execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_name = ?", (lease_name,)
        ).fetchone()
        return _lease_from_row(values)

    def _write_lease(
        self, conn: sqlite3.Connection, row: LeaseRow, *, client_now: float | None
    ) -> None:
        cursor = conn.execute(
            f"""
            INSERT INTO leases ({_LEASE_COLUMNS}, boot_id, last_client_now, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (lease_name) DO UPDATE SET
                holder_id = excluded.holder_id, holder_host = excluded.holder_host,
                term = excluded.term, lease_expires_at = excluded.lease_expires_at,
                renewed_at = excluded.renewed_at,
                preferred_holder_id = excluded.preferred_holder_id,
                metadata_json = excluded.metadata_json, released = excluded.released,
                holder_instance_id = excluded.holder_instance_id,
                deadline = excluded.deadline, boot_id = excluded.boot_id,
                last_client_now = coalesce(excluded.last_client_now, leases.last_client_now),
                updated_at = excluded.updated_at
            WHERE excluded.term >= leases.term
            """,
            (
                row.lease_name,
                row.holder_id,
                row.holder_host,
                row.term,
                row.lease_expires_at,
                row.renewed_at,
                row.preferred_holder_id,
                row.metadata_json,
                int(row.released),
                row.holder_instance_id,
                row.deadline,
                self._boot_id,
                client_now,
                self._clock(),
            ),
        )
        if cursor.rowcount != 1:
            # Belt and braces: the rules never lower a term; refuse to store one that would.
            raise StoreError(f"refused to lower the term of lease {row.lease_name!r}")

