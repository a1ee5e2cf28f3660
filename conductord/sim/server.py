"""The simulated Control API's lease: the real rules on the server's two clocks (SPEC §9, §15).

`ControlApi` holds the lease row and decides every acquire and release with
`control_api.rules`, as both stores do; `world.py` carries the requests to it and its answers
back (and keeps the parked long-polls, which are connections). Nothing here reads a clock:
every call gets the real time `t` of the run.

Two clocks, as in the stores:
- the decision clock is monotonic (CLOCK_BOOTTIME in the SQLite store): it is the run's real
  time, never steps, and `LeaseRow.deadline` is on it;
- the wall clock is real time + `wall_offset`; it only stamps `lease_expires_at` and
  `renewed_at` (display, the wire). A `clock_step` fault moves the offset by any amount
  either way (NTP at boot, a resumed VM, a manual fix).
A `server_restart` fault is a reboot of the server's host: the monotonic reading of the old
boot means nothing any more, so the store's restart rule gives every unreleased lease one full
TTL from the restart (judged without the wall clock, which may step with the reboot). A
process restart on the same boot keeps the exact deadline; that is what an `outage` already
models (the row survives it, parked requests die).

`server="wall-clock"` is broken on purpose (the SQLite store before SPEC §15): it decides
expiry on its wall clock, so a forward step expires a live lease at once and a backward one
keeps a dead leader's lease alive. The simulator must catch it.
"""

from __future__ import annotations

import dataclasses

from conductord.control_api.rules import (
    AcquireDecision,
    LeaseRow,
    ReleaseDecision,
    decide_acquire,
    decide_release,
)

# The real server, and a broken one the invariants must catch.
SERVERS = ("real", "wall-clock")


class ControlApi:
    """The lease row of one simulated Control API and the clocks it is judged on."""

    def __init__(self, variant: str, ttl_sec: float) -> None:
        if variant not in SERVERS:
            raise ValueError(f"unknown server {variant!r}")
        self.on_wall = variant == "wall-clock"
        self.ttl_sec = ttl_sec
        self.row: LeaseRow | None = None
        self.wall_offset = 0.0

    # -- clocks ------------------------------------------------------------------

    def wall(self, t: float) -> float:
        """The server's wall clock at real time `t` (unix-like seconds, display only)."""
        return t + self.wall_offset

    def clock(self, t: float) -> float:
        """The clock the server decides expiry on: monotonic, or (broken) its wall clock."""
        return self.wall(t) if self.on_wall else t

    def step_wall(self, seconds: float) -> None:
        self.wall_offset += seconds

    # -- queries -----------------------------------------------------------------

    def live(self, t: float) -> bool:
        """Whether the lease binds others at real time `t`, by the server's own judgement."""
        return self.row is not None and self.row.is_live(self.clock(t))

    def holds(self, controller_id: str, term: int, t: float) -> bool:
        """Whether the server holds `term` live for `controller_id` at real time `t`."""
        row = self.row
        return row is not None and row.holder_id == controller_id and row.term == term and (
            self.live(t)
        )

    def expiry_at(self, t: float) -> float | None:
        """The real time at which the lease stops binding, as the server's own (monotonic)
        timer would fire if armed now; None without a row."""
        if self.row is None:
            return None
        if not self.on_wall:
            return self.row.expires  # the decision clock is the run's real time
        return t + (self.row.expires - self.clock(t))

    # -- decisions ---------------------------------------------------------------

    def acquire(self, controller_id: str, *, preferred: bool, t: float) -> AcquireDecision:
        decision = decide_acquire(
            self.row,
            controller_id=controller_id,
            host=f"{controller_id}.local",
            ttl_sec=self.ttl_sec,
            preferred=preferred,
            metadata_json=None,
            now=self.clock(t),
            wall=self.wall(t),
        )
        self.row = decision.row
        return decision

    def release(self, controller_id: str, term: int, t: float) -> ReleaseDecision:
        decision = decide_release(
            self.row, controller_id=controller_id, term=term, now=self.clock(t), wall=self.wall(t)
        )
        self.row = decision.row
        return decision

    def restart(self, t: float) -> None:
        """The host rebooted: the restart rule (a wall-clock server just reads its rows)."""
        row = self.row
        if row is not None and not row.released and not self.on_wall:
            self.row = dataclasses.replace(row, deadline=t + max(row.ttl_sec, 0.0))

    def describe(self, t: float) -> str:
        row = self.row
        if row is None:
            return "no lease"
        expiry = self.expiry_at(t)
        assert expiry is not None
        released = " (released)" if row.released else ""
        return f"term {row.term} of {row.holder_id}, expiring {expiry:.6f}{released}"
