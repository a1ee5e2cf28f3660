"""What every store of the reference Control API shares: the `Store` interface and its rows.

`store.py` (SQLite, and `open_store`) and `store_postgres.py` (PostgreSQL) both import from
here and never from each other, so the imports flow one way: app -> store -> store_base <-
store_postgres (`open_store` imports the PostgreSQL store lazily, after the entry point's
monkey-patching, and only when asked for).

Lease history (SPEC §16): every change of holder or term is one `HistoryEntry`, written by the
store in the transaction that decided it. `history_entry` says which decisions are entries,
so both stores agree: a grant, a takeover after expiry, a release by the holder, and an instance
conflict (refused renewal or release from a second process of the holder's id), the last one
once per (term, instance). A renewal, a denial and an idempotent repeat of a release are not
changes. Each store keeps the newest `HISTORY_KEEP` entries.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from conductord.control_api.rules import (
    AcquireDecision,
    HolderChange,
    LeaseRow,
    ReleaseDecision,
)
from conductord.wire import Heartbeat

__all__ = [
    "HISTORY_KEEP",
    "HISTORY_REASONS",
    "INSTANCE_RETENTION_SEC",
    "POSTGRES_SCHEMES",
    "Clock",
    "ControllerRow",
    "HistoryEntry",
    "RecordedConflicts",
    "Store",
    "StoreError",
    "describe_db",
    "dsn_secrets",
    "history_entry",
    "needs_previous",
    "with_instances",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# Instance rows of controllers not heard of for this long are dropped.
INSTANCE_RETENTION_SEC = 86_400.0
# Lease history entries kept per database (the newest); older ones are deleted as new ones come.
HISTORY_KEEP = 10_000
HISTORY_REASONS: tuple[HolderChange, ...] = (
    "granted",
    "taken_over",
    "released",
    "instance_conflict",
)

Clock = Callable[[], float]


class StoreError(Exception):
    """The store cannot be opened or used; the message is one line fit for an operator."""


@dataclass(frozen=True)
class ControllerRow:
    """A controller as last heard of. `last_seen_at` is the server clock; the rest is reported."""

    controller_id: str
    host: str
    role: str | None
    priority: int | None
    status: str | None
    version: str | None
    heartbeat_at: int | None
    started_at: int | None
    first_seen_at: float
    last_seen_at: float
    instance_id: str | None = None
    # Every instance heard of under this id, newest first: (instance_id, host, last_seen_at).
    instances: tuple[tuple[str, str, float], ...] = ()

    def seconds_since_heartbeat(self, now: float) -> float:
        return max(0.0, now - self.last_seen_at)

    def recent_instances(self, now: float, window_sec: float) -> list[tuple[str, str, float]]:
        """The instances that heartbeated within `window_sec` of `now`."""
        return [entry for entry in self.instances if now - entry[2] <= window_sec]


@dataclass(frozen=True)
class HistoryEntry:
    """One change of holder or term (SPEC §16), as `GET /v1/leader/history` shows it.

    `at` is the server's wall clock (unix seconds) when the change was decided. `holder_id`
    and `holder_host` are the holder of `term` (for `released`, the one who released it);
    `previous_holder_id` is the holder of the term before, None when unknown (the first term,
    or a term granted before the store kept history). `instance_id` is the instance the entry
    is about: the holder's, or for `instance_conflict` the refused one's.
    """

    at: float
    term: int
    holder_id: str
    holder_host: str
    previous_holder_id: str | None
    reason: HolderChange
    instance_id: str | None = None


def history_entry(
    decision: AcquireDecision | ReleaseDecision, *, instance_id: str | None, at: float
) -> HistoryEntry | None:
    """The history entry `decision` makes at wall time `at`, or None when it changed nothing.

    `instance_id` is the requesting process's. For `released` and `instance_conflict` the
    holder of the term before is not in the decision: the store fills `previous_holder_id`
    from the term's grant entry (`needs_previous`). An `instance_conflict` is returned for
    every refused request; the stores keep only the first per (term, instance).
    """
    row = decision.row
    if row is None:
        return None

    def entry(reason: HolderChange, previous: str | None, instance: str | None) -> HistoryEntry:
        holder = (row.term, row.holder_id, row.holder_host)
        return HistoryEntry(at, *holder, previous, reason, instance)

    if isinstance(decision, AcquireDecision):
        reason = decision.holder_change
        if reason in ("granted", "taken_over"):
            previous = decision.previous.holder_id if decision.previous is not None else None
            return entry(reason, previous, row.holder_instance_id)
    elif decision.released and decision.changed:
        return entry("released", None, row.holder_instance_id)
    # The holder's id asking from another process: the entry names the refused instance. (A
    # one-shot diagnostic run refused the same way is no duplicate id: no entry.)
    return entry("instance_conflict", None, instance_id) if decision.duplicate_id else None


def needs_previous(entry: HistoryEntry) -> bool:
    """Whether the store must look up `previous_holder_id` (see `history_entry`)."""
    return entry.reason in ("released", "instance_conflict")


class RecordedConflicts:
    """The (lease, term, instance) conflicts this process has written, so that a refused
    second process, which keeps asking every renew interval, costs no write after its first.

    Bounded: when full it forgets everything, which costs one more insert per conflict that the
    store's unique index turns into nothing.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._seen: set[tuple[str, int, str | None]] = set()

    def known(self, key: tuple[str, int, str | None]) -> bool:
        return key in self._seen

    def add(self, key: tuple[str, int, str | None] | None) -> None:
        if key is None:
            return
        if len(self._seen) >= self._limit:
            self._seen.clear()
        self._seen.add(key)


class Store(Protocol):
    """What the Control API app needs from storage. Implementations are safe to share.

    Optional: `watch(callback: Callable[[], None]) -> None`, for a store shared by several
    server processes; it calls `callback` (from a greenlet) whenever another process changed
    the lease, so parked wait-for-lease requests look again (SPEC §12). SqliteStore has none:
    one process, whose own releases and grants wake its waiters.
    """

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
    ) -> AcquireDecision: ...

    def release(
        self,
        *,
        controller_id: str,
        term: int,
        instance_id: str | None = None,
        one_shot: bool = False,
    ) -> ReleaseDecision: ...

    def heartbeat(self, heartbeat: Heartbeat) -> ControllerRow: ...

    def leader(self) -> LeaseRow | None: ...

    def controllers(self) -> list[ControllerRow]: ...

    def history(self, limit: int) -> list[HistoryEntry]:
        """The newest `limit` lease history entries, newest first."""
        ...

    def now(self) -> float:
        """Wall-clock unix seconds: what rows are stamped with, for display only."""
        ...

    def lease_time(self) -> float:
        """The decision clock that `LeaseRow.deadline` is on (monotonic, never steps)."""
        ...

    def close(self) -> None: ...


def describe_db(db: str) -> str:
    """`--db` fit for logs and errors: a path made absolute, a URL with its password masked."""
    if not db.startswith(POSTGRES_SCHEMES):
        return os.path.abspath(db)
    parts = urlsplit(db)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"{user}@{hosts}"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def dsn_secrets(db: str) -> list[str]:
    """The password(s) inside a PostgreSQL URL, as written and decoded, for log redaction."""
    if not db.startswith(POSTGRES_SCHEMES):
        return []
    parts = urlsplit(db)
    found = []
    userinfo, at, _hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.partition(":")[2])
    found += re.findall(r"(?:^|&)password=([^&]*)", parts.query)
    return sorted({form for raw in found if raw for form in (raw, unquote(raw))}, key=len)[::-1]


def with_instances(
    controllers: list[ControllerRow], instances: list[tuple[str, str, str, float]]
) -> list[ControllerRow]:
    """`controllers` with their `instances` filled from (controller_id, instance, host, seen)."""
    by_id: dict[str, list[tuple[str, str, float]]] = {}
    for controller_id, instance_id, host, seen in instances:
        by_id.setdefault(controller_id, []).append((instance_id, host, seen))
    return [
        dataclasses.replace(row, instances=tuple(by_id.get(row.controller_id, ())))
        for row in controllers
    ]


# -- the readers and the history (the same for both stores; only the placeholder style differs) --

# The `controllers` columns, in `ControllerRow`'s order but for `instances`.
CONTROLLER_COLUMNS = (
    "controller_id, host, role, priority, status, version, heartbeat_at, started_at, "
    "first_seen_at, last_seen_at, instance_id"
)


def read_controllers(conn: Any) -> list[ControllerRow]:
    """Every controller with its instances, newest sighting first (`conn`: DB-API)."""
    rows = conn.execute(
        f"SELECT {CONTROLLER_COLUMNS} FROM controllers ORDER BY controller_id"
    ).fetchall()
    instances = conn.execute(
        "SELECT controller_id, instance_id, host, last_seen_at FROM controller_instances"
        " ORDER BY last_seen_at DESC"
    ).fetchall()
    return with_instances([ControllerRow(*values) for values in rows], instances)


def read_history(conn: Any, sql: HistorySql, lease_name: str, limit: int) -> list[HistoryEntry]:
    """The newest `limit` history entries of `lease_name`, newest first."""
    rows = conn.execute(sql.recent, (lease_name, limit)).fetchall()
    return [HistoryEntry(*values) for values in rows]


_HISTORY_FIELDS = (
    "at",
    "term",
    "holder_id",
    "holder_host",
    "previous_holder_id",
    "reason",
    "instance_id",
)
HISTORY_COLUMNS = ", ".join(_HISTORY_FIELDS)


@dataclass(frozen=True)
class HistorySql:
    """The statements that record the history, in one driver's placeholder style."""

    insert: str
    previous_holder: str
    trim: str
    recent: str

    @classmethod
    def styled(cls, positional: str, named: Callable[[str], str]) -> HistorySql:
        values = ", ".join(named(name) for name in ("lease_name", *_HISTORY_FIELDS))
        return cls(
            # A repeated instance conflict of one (term, instance) meets the unique index and
            # adds nothing.
            insert=f"INSERT INTO lease_history (lease_name, {HISTORY_COLUMNS})"
            f" VALUES ({values}) ON CONFLICT DO NOTHING",
            # The holder of the term before `term`, as its grant recorded it.
            previous_holder="SELECT previous_holder_id FROM lease_history"
            f" WHERE lease_name = {positional} AND term = {positional}"
            " AND reason IN ('granted', 'taken_over') ORDER BY id DESC LIMIT 1",
            # Everything older than the newest `keep` entries (NULL while there are fewer).
            trim="DELETE FROM lease_history WHERE id <= (SELECT id FROM lease_history"
            f" ORDER BY id DESC LIMIT 1 OFFSET {positional})",
            recent=f"SELECT {HISTORY_COLUMNS} FROM lease_history"
            f" WHERE lease_name = {positional} ORDER BY id DESC LIMIT {positional}",
        )


def unrecorded_conflict(
    conflicts: RecordedConflicts, decision: AcquireDecision, instance_id: str | None
) -> bool:
    """A duplicate-id refusal this process has not written yet (it costs one write, once)."""
    return decision.duplicate_id and not conflicts.known(
        (decision.row.lease_name, decision.row.term, instance_id)
    )


def record_history(
    conn: Any,
    sql: HistorySql,
    decision: AcquireDecision | ReleaseDecision,
    *,
    instance_id: str | None,
    at: float,
    conflicts: RecordedConflicts,
    keep: int,
) -> tuple[str, int, str | None] | None:
    """Add the history entry `decision` makes, if any, in the caller's transaction on `conn`
    (a DB-API connection with `execute`), and keep the newest `keep` entries.

    Returns the (lease, term, instance) of an instance conflict, for `conflicts` once the
    transaction has committed.
    """
    entry = history_entry(decision, instance_id=instance_id, at=at)
    if entry is None or decision.row is None:
        return None
    lease_name = decision.row.lease_name
    conflict = (lease_name, entry.term, entry.instance_id)
    if entry.reason == "instance_conflict" and conflicts.known(conflict):
        return None
    if needs_previous(entry):
        found = conn.execute(sql.previous_holder, (lease_name, entry.term)).fetchone()
        entry = dataclasses.replace(entry, previous_holder_id=found[0] if found else None)
    cursor = conn.execute(sql.insert, {"lease_name": lease_name, **dataclasses.asdict(entry)})
    if cursor.rowcount == 1:
        conn.execute(sql.trim, (keep,))
    return conflict if entry.reason == "instance_conflict" else None
