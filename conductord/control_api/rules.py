"""The lease rules of the reference Control API, as pure functions (SPEC §9, §13).

Every store (SQLite now, PostgreSQL later) and the fleet simulator call these functions and
nothing else to decide a lease, so there is one source of truth for who holds which term. They
take the current row and the server's clock reading and return the new row; they never do I/O,
never read a clock and never sleep.

Rules:
- no lease, or an expired (or released) one: the caller takes it with term + 1 (`acquire`);
- the caller holds the live lease: `renew`, same term, new expiry `now + ttl_sec`;
- another controller holds the live lease: `deny`, the row is returned as it is;
- the caller's controller id holds the live lease, but from another process instance (SPEC
  §15: a copied config, a cloned image, a second copy under one supervisor): `deny` with
  `conflict` set, so two processes with one id never both lead. A request or a row without an
  instance id conflicts with nothing (older nodes). A one-shot run (`diagnose`, `--run-once`)
  says so: it is refused the same, but its refusal is no duplicate id of the fleet
  (`one_shot` on the decision: no history entry, no conflict count);
- release by the holder of that exact term (and instance, when both are known) expires the
  lease at `now`; anyone else changes nothing. Release is idempotent, so a client may retry it
  after a lost answer.

The term is kept on the row after release or expiry, so terms only ever grow. A controller
that restarts with the same id and instance while its lease is still live resumes it at once
(`renew`): it is the same node and the term still fences it. `preferred` is recorded as
`preferred_holder_id` but never preempts a live holder: safety before preference.

Two clocks (SPEC §15). `now` is the store's decision clock: monotonic, so a step of the
server's wall clock can neither shorten nor lengthen a live lease; `LeaseRow.deadline` is on
that clock. `wall` (unix seconds) only stamps `lease_expires_at` and `renewed_at` for display
and the wire. A store that restarts cannot carry a monotonic reading across the restart; it
gives every unreleased lease a fresh deadline of one full TTL from its start (see the stores).
Pure tests and the simulator may use one clock for both (`wall` defaults to `now`, and a row
without a `deadline` expires at `lease_expires_at`); both stores always set the deadline.
Times are float seconds so that expiry keeps sub-second precision; only the wire truncates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

LEASE_NAME = "global"

Operation = Literal["acquire", "renew", "deny"]
HolderChange = Literal["granted", "taken_over", "released", "instance_conflict"]


@dataclass(frozen=True)
class LeaseRow:
    """One lease as a store keeps it (server clock, float unix seconds).

    `released` is true once the holder of `term` released it; such a row keeps its holder and
    term for the record but is no longer live.
    """

    lease_name: str
    holder_id: str
    holder_host: str
    term: int
    lease_expires_at: float
    renewed_at: float
    preferred_holder_id: str | None = None
    metadata_json: str | None = None
    released: bool = False
    holder_instance_id: str | None = None
    # The decision-clock instant the lease stops binding others (see the module docstring).
    deadline: float | None = None

    @property
    def expires(self) -> float:
        """The decision-clock expiry: `deadline`, or `lease_expires_at` in one-clock use."""
        return self.lease_expires_at if self.deadline is None else self.deadline

    @property
    def ttl_sec(self) -> float:
        """The TTL the lease was last granted or renewed with."""
        return self.lease_expires_at - self.renewed_at

    def is_live(self, now: float) -> bool:
        """Whether the lease still binds others at decision-clock time `now`."""
        return not self.released and now < self.expires


@dataclass(frozen=True)
class AcquireDecision:
    """Outcome of an acquire: the row to store and answer with.

    `takeover` is true when the caller took the lease over from another controller whose lease
    lapsed without being released (the interesting failover case for logs). `conflict` is true
    when the caller's controller id holds the live lease from another instance. `previous` is
    the row the decision started from.
    """

    row: LeaseRow
    operation: Operation
    is_leader: bool
    takeover: bool
    previous: LeaseRow | None
    conflict: bool = False
    one_shot: bool = False  # asked by a one-shot run (diagnostics), not by a daemon

    @property
    def changed(self) -> bool:
        """Whether a store must write `row` back."""
        return self.row != self.previous

    @property
    def duplicate_id(self) -> bool:
        """A second live process of the holder's id: a conflict that was not a one-shot run."""
        return self.conflict and not self.one_shot

    @property
    def holder_change(self) -> HolderChange | None:
        """How the holder or term changed, for the lease history (SPEC §16); None if not."""
        if self.conflict:
            return "instance_conflict" if self.duplicate_id else None
        if self.operation != "acquire":
            return None
        return "taken_over" if self.takeover else "granted"


@dataclass(frozen=True)
class ReleaseDecision:
    """Outcome of a release: the row to store (None when there never was a lease)."""

    row: LeaseRow | None
    released: bool
    previous: LeaseRow | None
    conflict: bool = False  # the holder's controller id asked, from another instance
    one_shot: bool = False

    @property
    def changed(self) -> bool:
        return self.row != self.previous

    @property
    def duplicate_id(self) -> bool:
        return self.conflict and not self.one_shot


def _preferred_after(row: LeaseRow | None, controller_id: str, preferred: bool) -> str | None:
    current = row.preferred_holder_id if row is not None else None
    if preferred:
        return controller_id
    # A node that stopped claiming preference no longer is the preferred one.
    return None if current == controller_id else current


def decide_acquire(
    row: LeaseRow | None,
    *,
    controller_id: str,
    host: str,
    ttl_sec: float,
    preferred: bool,
    metadata_json: str | None,
    now: float,
    wall: float | None = None,
    instance_id: str | None = None,
    one_shot: bool = False,
    lease_name: str = LEASE_NAME,
) -> AcquireDecision:
    """Decide an acquire request from `controller_id` (process `instance_id`, if known).

    `now` is the decision clock, `wall` the unix time stamped on the row (default `now`).
    `one_shot` marks a diagnostic run's request: decided the same, reported differently.
    """
    if ttl_sec <= 0:
        raise ValueError("ttl_sec must be positive")
    if not controller_id:
        raise ValueError("controller_id must be non-empty")
    wall = now if wall is None else wall
    preferred_holder_id = _preferred_after(row, controller_id, preferred)

    if row is not None and row.is_live(now):
        if row.holder_id == controller_id:
            if _other_instance(row.holder_instance_id, instance_id):
                # The same id from another process: never two leaders. The row stays as it is.
                return AcquireDecision(
                    row, "deny", False, False, row, conflict=True, one_shot=one_shot
                )
            renewed = replace(
                row,
                holder_host=host,
                lease_expires_at=wall + ttl_sec,
                renewed_at=wall,
                deadline=now + ttl_sec,
                preferred_holder_id=preferred_holder_id,
                metadata_json=metadata_json if metadata_json is not None else row.metadata_json,
                # An older node without an instance id keeps the row's instance (if any).
                holder_instance_id=instance_id or row.holder_instance_id,
            )
            return AcquireDecision(renewed, "renew", True, False, row)
        # Another controller holds a live lease. Only the preference record may change.
        denied = replace(row, preferred_holder_id=preferred_holder_id)
        return AcquireDecision(denied, "deny", False, False, row)

    granted = LeaseRow(
        lease_name=row.lease_name if row is not None else lease_name,
        holder_id=controller_id,
        holder_host=host,
        term=(row.term if row is not None else 0) + 1,
        lease_expires_at=wall + ttl_sec,
        renewed_at=wall,
        preferred_holder_id=preferred_holder_id,
        metadata_json=metadata_json,
        released=False,
        holder_instance_id=instance_id,
        deadline=now + ttl_sec,
    )
    takeover = row is not None and not row.released and row.holder_id != controller_id
    return AcquireDecision(granted, "acquire", True, takeover, row)


def decide_release(
    row: LeaseRow | None,
    *,
    controller_id: str,
    term: int,
    now: float,
    wall: float | None = None,
    instance_id: str | None = None,
    one_shot: bool = False,
) -> ReleaseDecision:
    """Decide a release of `term` by `controller_id` (process `instance_id`, if known)."""
    if row is None or row.holder_id != controller_id or row.term != term:
        return ReleaseDecision(row, False, row)
    if _other_instance(row.holder_instance_id, instance_id):
        # Another process of this id may not end the holder's lease (SPEC §15).
        return ReleaseDecision(row, False, row, conflict=True, one_shot=one_shot)
    if row.released:
        return ReleaseDecision(row, True, row)  # idempotent: nothing to write
    wall = now if wall is None else wall
    released = replace(
        row,
        released=True,
        lease_expires_at=min(row.lease_expires_at, wall),
        deadline=min(row.expires, now),
    )
    return ReleaseDecision(released, True, row)


def _other_instance(holder_instance: str | None, instance_id: str | None) -> bool:
    """Both instances known and different: another process of the same controller id."""
    return None not in (holder_instance, instance_id) and holder_instance != instance_id
