"""The lease rules of the reference Control API, as pure functions (SPEC §9, §13).

Every store (SQLite now, PostgreSQL later) and the fleet simulator call these functions and
nothing else to decide a lease, so there is one source of truth for who holds which term. They
take the current row and the server's clock reading and return the new row; they never do I/O,
never read a clock and never sleep.

Rules:
- no lease, or an expired (or released) one: the caller takes it with term + 1 (`acquire`);
- the caller holds the live lease: `renew`, same term, new expiry `now + ttl_sec`;
- another controller holds the live lease: `deny`, the row is returned as it is.
- release by the holder of that exact term expires the lease at `now`; anyone else changes
  nothing. Release is idempotent, so a client may retry it after a lost answer.

The term is kept on the row after release or expiry, so terms only ever grow. A controller
that restarts with the same id while its lease is still live resumes it at once (`renew`):
it is the same node and the term still fences it. `preferred` is recorded as
`preferred_holder_id` but never preempts a live holder: safety before preference.

Limits: the server's wall clock is the authority. A clock step forward on the server shortens
every live lease by the step; a step backward lengthens them. Times are float seconds so that
expiry keeps sub-second precision; only the wire truncates them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

LEASE_NAME = "global"

Operation = Literal["acquire", "renew", "deny"]


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

    def is_live(self, now: float) -> bool:
        """Whether the lease still binds others at `now`."""
        return not self.released and now < self.lease_expires_at


@dataclass(frozen=True)
class AcquireDecision:
    """Outcome of an acquire: the row to store and answer with.

    `takeover` is true when the caller took the lease over from another controller whose lease
    lapsed without being released (the interesting failover case for logs). `previous` is the
    row the decision started from.
    """

    row: LeaseRow
    operation: Operation
    is_leader: bool
    takeover: bool
    previous: LeaseRow | None

    @property
    def changed(self) -> bool:
        """Whether a store must write `row` back."""
        return self.row != self.previous


@dataclass(frozen=True)
class ReleaseDecision:
    """Outcome of a release: the row to store (None when there never was a lease)."""

    row: LeaseRow | None
    released: bool
    previous: LeaseRow | None

    @property
    def changed(self) -> bool:
        return self.row != self.previous


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
    lease_name: str = LEASE_NAME,
) -> AcquireDecision:
    """Decide an acquire request from `controller_id` at server time `now`."""
    if ttl_sec <= 0:
        raise ValueError("ttl_sec must be positive")
    if not controller_id:
        raise ValueError("controller_id must be non-empty")
    preferred_holder_id = _preferred_after(row, controller_id, preferred)

    if row is not None and row.is_live(now):
        if row.holder_id == controller_id:
            renewed = replace(
                row,
                holder_host=host,
                lease_expires_at=now + ttl_sec,
                renewed_at=now,
                preferred_holder_id=preferred_holder_id,
                metadata_json=metadata_json if metadata_json is not None else row.metadata_json,
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
        lease_expires_at=now + ttl_sec,
        renewed_at=now,
        preferred_holder_id=preferred_holder_id,
        metadata_json=metadata_json,
        released=False,
    )
    takeover = row is not None and not row.released and row.holder_id != controller_id
    return AcquireDecision(granted, "acquire", True, takeover, row)


def decide_release(
    row: LeaseRow | None, *, controller_id: str, term: int, now: float
) -> ReleaseDecision:
    """Decide a release of `term` by `controller_id` at server time `now`."""
    if row is None or row.holder_id != controller_id or row.term != term:
        return ReleaseDecision(row, False, row)
    released = replace(row, released=True, lease_expires_at=min(row.lease_expires_at, now))
    return ReleaseDecision(released, True, row)
