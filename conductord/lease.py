"""The lease state machine: pure, clock-driven, no I/O.

Every input is an event with the monotonic time it happened at (a lease response, a failure,
a heartbeat, a tick); every output is the new state and, when the state changed, a
`Transition` for the caller to log and hand to hooks. Nothing here sleeps or talks HTTP, so
tests and the fleet simulator (SPEC §13) drive it with a fake clock.

Safety (SPEC §5, §15): a leader's lease is locally valid until the time at which its last
successful acquire/renew request was *sent*, plus the TTL, minus a margin, on the lease
clock (`conductord.clock.lease_clock`: monotonic and counting system sleep, so a leader that
sleeps past its lease wakes knowing it has lost it). The server
can only have started that lease after the request was sent, so the node stops believing in
it before the server can hand it to anyone else, whatever the wall clock does. The margin
covers clock-rate drift between node and server and the gap between a scheduler check and
the act it guards; the term (fencing token) covers the rest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, Protocol

# The start sequence, in order (SPEC §5). Keys are stable identifiers; descriptions are prose.
STARTUP_CHECKLIST: Final[tuple[tuple[str, str], ...]] = (
    ("register-controller", "register the controller and send the first heartbeat"),
    ("acquire-lease", "acquire or renew the leader lease"),
    ("load-runs", "scan local runs that have not finished"),
    ("reconcile-runs", "reconcile stale local runs with the control plane"),
    ("start-heartbeat-loop", "start the heartbeat and lease loops"),
    ("start-scheduler", "only the leader enters the scheduler loop; a standby refuses"),
)

# The loops pace each cycle at the interval ±JITTER (runtime.py); the status endpoint's health
# limits and the simulator assume the same spread.
JITTER: Final = 0.10
# How long stop lets an in-flight lease call finish before killing it, so that a renewal
# the server has not yet processed cannot re-take the lease after our release.
INFLIGHT_GRACE_S: Final = 0.5


def startup_checklist() -> list[dict[str, str]]:
    """The checklist as the snapshot and `checklist --json` show it."""
    return [{"key": key, "description": text} for key, text in STARTUP_CHECKLIST]


class LeaseState(enum.StrEnum):
    LEADER = "leader"
    STANDBY = "standby"
    DEGRADED = "degraded"


class Reason(enum.StrEnum):
    """Why a transition happened; the `reason` field of `lease.transition`."""

    ACQUIRED = "acquired"  # the server granted this node the lease
    HELD_BY_OTHER = "held_by_other"  # the server names another holder
    RENEW_FAILURES = "renew_failure_threshold"  # consecutive failures reached the threshold
    DEADLINE = "lease_deadline_passed"  # the local validity ran out before a renewal succeeded
    LATE_GRANT = "grant_arrived_late"  # a grant whose local validity had already run out
    REGISTER_FAILED = "register_failed"  # the start sequence's first heartbeat failed
    IDENTITY_CONFLICT = "identity_conflict"  # our node id is held by another instance (§15)
    STOPPING = "stopping"


class LeaseResponse(Protocol):
    """What the machine needs of an acquire/renew answer (`wire.AcquireResult` fits)."""

    holder_id: str
    term: int
    lease_expires_at: float
    is_leader: bool
    operation: str  # "acquire" or "renew" (`wire.wire_operation`)
    # The holder is our node id from another process instance (SPEC §15).
    instance_conflict: bool


@dataclass(frozen=True)
class Transition:
    from_state: LeaseState
    to_state: LeaseState
    reason: Reason
    term: int | None
    leader_id: str | None

    def as_fields(self) -> dict[str, Any]:
        return {
            "from_state": str(self.from_state),
            "to_state": str(self.to_state),
            "reason": str(self.reason),
            "term": self.term,
            "leader_id": self.leader_id,
        }


def default_margin_s(lease_renew_interval_ms: int, lease_ttl_sec: int) -> float:
    """One renew interval, at least 1 s, but never more than half the TTL.

    The cap keeps a short TTL usable (TTL 1 s would otherwise leave no valid time at all);
    half the TTL is still far more than any plausible clock-rate drift over one TTL.
    """
    return min(max(lease_renew_interval_ms / 1000.0, 1.0), lease_ttl_sec / 2.0)


class LeaseMachine:
    """One node's view of the global lease.

    `now` arguments are monotonic seconds. Methods that may change the state return the
    `Transition` when it changed, else None.
    """

    def __init__(
        self,
        *,
        node_id: str,
        lease_ttl_sec: int,
        renew_failure_threshold: int,
        margin_s: float,
    ) -> None:
        if margin_s < 0 or margin_s >= lease_ttl_sec:
            raise ValueError("margin must be >= 0 and below the lease TTL")
        self.node_id = node_id
        self.lease_ttl_sec = lease_ttl_sec
        self.renew_failure_threshold = renew_failure_threshold
        self.margin_s = margin_s

        self.state = LeaseState.STANDBY
        self.current_leader_id: str | None = None
        self.current_term: int | None = None
        self.lease_expires_at: float | None = None  # server wall time, for display only
        self.last_lease_operation: str | None = None
        self.consecutive_renew_failures = 0
        self.consecutive_heartbeat_failures = 0
        self.last_heartbeat_at: float | None = None  # wall time of the last good heartbeat
        self.last_error: str | None = None
        self.valid_until: float | None = None  # monotonic; set only while we hold the lease
        self.held_term: int | None = None  # a term we were granted and never saw end
        self._renew_at_once = False  # set by a grant we could not use; one retry only
        self.stopping = False

    # -- queries ---------------------------------------------------------------

    def scheduler_enabled(self, now: float) -> bool:
        return (
            not self.stopping
            and self.state is LeaseState.LEADER
            and self.valid_until is not None
            and now < self.valid_until
        )

    def status(self, now: float) -> dict[str, Any]:
        """The lease part of the snapshot's `daemon` section (SPEC §6)."""
        return {
            "lease_state": str(self.state),
            "scheduler_enabled": self.scheduler_enabled(now),
            "current_leader_id": self.current_leader_id,
            "current_term": self.current_term,
            "lease_expires_at": _whole(self.lease_expires_at),
            "last_heartbeat_at": _whole(self.last_heartbeat_at),
            "last_lease_operation": self.last_lease_operation,
            "consecutive_renew_failures": self.consecutive_renew_failures,
            "consecutive_heartbeat_failures": self.consecutive_heartbeat_failures,
            "last_error": self.last_error,
        }

    # -- lease events ----------------------------------------------------------

    def lease_succeeded(
        self, response: LeaseResponse, *, sent_at: float, now: float
    ) -> Transition | None:
        """An acquire/renew request sent at `sent_at` answered at `now`."""
        self._renew_at_once = False
        self.consecutive_renew_failures = 0
        self.current_leader_id = response.holder_id
        self.current_term = response.term
        self.lease_expires_at = response.lease_expires_at
        self.last_lease_operation = response.operation  # already the wire's acquire or renew
        if self.consecutive_heartbeat_failures == 0:
            self.last_error = None

        ours = (
            response.is_leader
            and response.holder_id == self.node_id
            and not response.instance_conflict
        )
        if not ours:
            # Another holder: leadership ends at once, whatever our local deadline says.
            self.valid_until = None
            self.held_term = None
            if response.instance_conflict:
                # Another process with our id holds it: stay standby until it is released
                # or expires; never lead beside it.
                self.last_error = (
                    f"node id {self.node_id} is held by another instance of it"
                    " (two processes with one node id)"
                )
                return self._move(LeaseState.STANDBY, Reason.IDENTITY_CONFLICT)
            return self._move(LeaseState.STANDBY, Reason.HELD_BY_OTHER)

        valid_until = sent_at + self.lease_ttl_sec - self.margin_s
        self.held_term = response.term
        if now >= valid_until:
            # The answer took so long that the lease may already be someone else's by the
            # time we act; do not lead on it. The next cycle renews at once.
            self.valid_until = None
            self._renew_at_once = True
            self.last_error = "lease grant arrived after its local validity had run out"
            return self._move(LeaseState.STANDBY, Reason.LATE_GRANT)
        self.valid_until = valid_until
        return self._move(LeaseState.LEADER, Reason.ACQUIRED)

    def lease_failed(self, error: str, *, now: float) -> Transition | None:
        self._renew_at_once = False  # a failing Control API gets the normal pace, never a spin
        self.consecutive_renew_failures += 1
        self.last_error = error
        if self.consecutive_renew_failures >= self.renew_failure_threshold:
            self.valid_until = None
            return self._move(LeaseState.DEGRADED, Reason.RENEW_FAILURES)
        return self.tick(now)

    def tick(self, now: float) -> Transition | None:
        """Step down by time: the leader's local validity has run out."""
        if self.state is LeaseState.LEADER and (
            self.valid_until is None or now >= self.valid_until
        ):
            self.valid_until = None
            self.last_error = self.last_error or "leader lease ran out before a renewal succeeded"
            return self._move(LeaseState.DEGRADED, Reason.DEADLINE)
        return None

    def needs_prompt_renew(self) -> bool:
        """True right after a grant we could not use: renew now, once, not after an interval."""
        return self._renew_at_once

    # -- heartbeat events (never change the lease state) -----------------------

    def heartbeat_succeeded(self, *, wall_time: float) -> None:
        self.consecutive_heartbeat_failures = 0
        self.last_heartbeat_at = wall_time
        if self.consecutive_renew_failures == 0 and self.state is not LeaseState.DEGRADED:
            self.last_error = None

    def heartbeat_failed(self, error: str) -> None:
        self.consecutive_heartbeat_failures += 1
        self.last_error = error

    def register_failed(self) -> Transition | None:
        """The start sequence's registration heartbeat (already counted) failed (SPEC §5)."""
        return self._move(LeaseState.DEGRADED, Reason.REGISTER_FAILED)

    # -- stopping --------------------------------------------------------------

    def begin_stop(self) -> None:
        """The scheduler is off from here on, before anything else happens."""
        self.stopping = True

    def stopped(self) -> Transition | None:
        """The lease was released (or given up): this node is a standby again."""
        self.valid_until = None
        self.held_term = None
        return self._move(LeaseState.STANDBY, Reason.STOPPING)

    # -- internals -------------------------------------------------------------

    def _move(self, to_state: LeaseState, reason: Reason) -> Transition | None:
        if to_state is self.state:
            return None
        transition = Transition(
            from_state=self.state,
            to_state=to_state,
            reason=reason,
            term=self.current_term,
            leader_id=self.current_leader_id,
        )
        self.state = to_state
        return transition


def _whole(value: float | None) -> int | None:
    return None if value is None else int(value)
