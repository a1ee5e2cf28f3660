"""Parked wait-for-lease requests of the reference Control API (SPEC §12).

A standby's acquire may carry `wait_ms`. When the lease is held by another controller, the
request is parked here instead of being answered at once, and it is answered when:
- the lease is released: the release wakes the lease's Event, the waiter asks the store again
  and is granted in that same round trip;
- the lease expires (its holder crashed): each waiter's wait is bounded by the expiry instant
  it last saw, so it wakes at that instant without any polling and asks again;
- `wait_ms` passes: it is answered with the holder it last saw (`is_leader` false);
- the server stops: `close()` answers every waiter at once, the same way.

Design:
- One gevent Event per lease, replaced on every wake ("generation"): a waiter takes the current
  Event *before* it asks the store, so a release that lands while the store is deciding still
  wakes it. A wake (release, grant, another process's change via `Store.watch`, see app.py) is
  only a hint: the waiter asks the store again, and the store decides in one transaction by
  the rules of §9 exactly as for any other acquire. One re-check per wake; no loop polls the
  database. Many waiters woken at once all ask; the store serialises them, one wins, the
  others see the new holder and park again until their own `wait_ms` ends.
- A parked request costs its server greenlet (gevent.pywsgi already runs one per connection)
  and one timer; no thread, no database connection between wakes.
- Bounded: a request waits at most `wait_ms`; at most `max_waiters` requests are parked at
  once, at most `max_per_controller` (default 4) for one controller id and `max_per_address`
  (default 64) from one client address, and one past a cap gets `TooManyWaiters` (the app
  answers 429). So one client parking a thousand requests holds a handful of places, not the
  whole cap: another controller still parks beside it and is woken with it. The caps count
  only parked requests: an acquire that can be answered at once (free lease, own renewal) is
  never refused.
- A waiter whose client has gone away (`connected()` false at a wake) gives up without asking
  the store, so a dead standby's orphaned request cannot take the lease nobody would use.

Limits: gevent only (Events are the hub's; call `wake`/`wake_all` from a greenlet of the
server's hub, not from another OS thread). The wake is local to this process; across processes
it needs the store's `watch` hook, and the expiry bound is the fallback in every case (a release
in another process without `watch` is noticed at the old expiry instant). A client that vanishes
without closing its connection (a network partition) is not noticed until its `wait_ms` ends.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gevent.event import Event

from conductord.control_api.rules import LEASE_NAME, AcquireDecision

DEFAULT_MAX_WAITERS = 1000
# A node parks one request at a time; a few more cover a restart that overlaps its old request.
DEFAULT_MAX_PER_CONTROLLER = 4
# Several nodes may share an address (behind NAT or a proxy); one client still cannot take all.
DEFAULT_MAX_PER_ADDRESS = 64

# Timers may fire a hair early relative to the store's clock; waking 1 ms after the expiry
# instant keeps a waiter from finding the lease still live and parking again for ~0 s.
EXPIRY_SLACK_S = 0.001
# Long gevent timer waits end late by up to ~1 ms per second waited (measured here: 30 ms on a
# 30 s TTL), which a crash failover would pay. A wait for an expiry further off than twice this
# wakes this much before it, without asking the store, and aims the last stretch afresh.
REAIM_S = 0.25
# If the store still finds the lease live after its expiry by `clock` (a store whose clock is
# not quite ours), look again after 10 ms, 20 ms, ... up to 1 s: never a tight loop of queries.
SKEW_RETRY_S = 0.01
SKEW_RETRY_MAX_S = 1.0

WaitEnd = Literal["granted", "timeout", "closing", "gone"]
CapScope = Literal["server", "controller", "address"]
_WHERE = {"server": "", "controller": " for this controller", "address": " from this address"}


class TooManyWaiters(Exception):
    """A cap on parked requests is reached (`scope`: which one); the request was not parked."""

    def __init__(self, limit: int, scope: CapScope = "server") -> None:
        super().__init__(f"{limit} requests are already waiting for the lease{_WHERE[scope]}")
        self.limit = limit
        self.scope = scope

    @property
    def max_waiters(self) -> int:
        return self.limit


@dataclass(frozen=True)
class WaitOutcome:
    """How a wait ended: the decision to answer with, why, how long, and how many re-checks."""

    decision: AcquireDecision
    end: WaitEnd
    waited_s: float
    rechecks: int


class LeaseWaiters:
    """The parked acquire requests of one server process, with one wake Event per lease.

    `clock` is the store's decision clock (`Store.lease_time`; the rows' `expires` instants
    are on it); `monotonic` measures `wait_ms`.
    """

    def __init__(
        self,
        *,
        max_waiters: int = DEFAULT_MAX_WAITERS,
        max_per_controller: int = DEFAULT_MAX_PER_CONTROLLER,
        max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(max_waiters, max_per_controller, max_per_address) < 1:
            raise ValueError("every waiter cap must be at least 1")
        self.max_waiters = max_waiters
        self.max_per_controller = max_per_controller
        self.max_per_address = max_per_address
        self._clock = clock
        self._monotonic = monotonic
        self._events: dict[str, Event] = {}
        self._parked = 0
        self._by_controller: Counter[str] = Counter()
        self._by_address: Counter[str] = Counter()
        self._closed = False

    @property
    def parked(self) -> int:
        """Requests parked right now."""
        return self._parked

    @property
    def closed(self) -> bool:
        return self._closed

    def wake(self, lease_name: str = LEASE_NAME) -> None:
        """Wake every waiter of `lease_name` to ask the store again."""
        event = self._events.pop(lease_name, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        """Wake every waiter of every lease (the `Store.watch` callback)."""
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    def close(self) -> None:
        """Answer every parked request now and park no more (server shutdown)."""
        self._closed = True
        self.wake_all()

    def _generation(self, lease_name: str) -> Event:
        event = self._events.get(lease_name)
        if event is None:
            event = self._events[lease_name] = Event()
        return event

    def wait_for_lease(
        self,
        attempt: Callable[[], AcquireDecision],
        *,
        wait_s: float,
        lease_name: str = LEASE_NAME,
        connected: Callable[[], bool] | None = None,
        controller_id: str | None = None,
        address: str | None = None,
    ) -> WaitOutcome:
        """Ask `attempt()` (one store transaction) now and after each wake, for up to `wait_s`.

        Returns at the first decision that makes the caller leader, or with the last decision
        seen when `wait_s` passes, the server closes, or the client is gone. Raises
        `TooManyWaiters` instead of parking past a cap (the caps per controller and address
        apply when `controller_id` / `address` are given); `attempt()`'s errors propagate.
        """
        began = self._monotonic()
        deadline = began + wait_s
        generation = self._generation(lease_name)
        decision = attempt()
        if decision.is_leader:
            return WaitOutcome(decision, "granted", 0.0, 0)
        if self._closed or wait_s <= 0:
            return WaitOutcome(decision, "closing" if self._closed else "timeout", 0.0, 0)
        self._admit(controller_id, address)

        rechecks = 0
        skewed = 0  # expiry re-checks in a row that found the same lease still live
        try:
            while True:
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    end: WaitEnd = "timeout"
                    break
                until_expiry = decision.row.expires - self._clock() + EXPIRY_SLACK_S
                if skewed:
                    backoff = min(SKEW_RETRY_S * 2 ** min(skewed - 1, 10), SKEW_RETRY_MAX_S)
                    until_expiry = max(until_expiry, backoff)
                expiry_first = until_expiry < remaining
                # Re-aim only a first, long wait; once the store disagreed about the expiry
                # (skewed), every timeout must end in a re-check, or the backoff would
                # keep re-aiming without ever asking the store again.
                aiming = not skewed and expiry_first and until_expiry > 2 * REAIM_S
                timeout = until_expiry - REAIM_S if aiming else min(remaining, until_expiry)
                woken = generation.wait(max(timeout, 0.0))
                if self._closed:
                    end = "closing"
                    break
                if not woken and not expiry_first:
                    end = "timeout"
                    break
                if not woken and aiming:
                    continue
                if connected is not None and not connected():
                    end = "gone"
                    break
                generation = self._generation(lease_name)
                seen = decision.row
                decision = attempt()
                rechecks += 1
                skewed = skewed + 1 if not woken and decision.row == seen else 0
                if decision.is_leader:
                    end = "granted"
                    break
        finally:
            self._release(controller_id, address)
        return WaitOutcome(decision, end, self._monotonic() - began, rechecks)

    def _admit(self, controller_id: str | None, address: str | None) -> None:
        if self._parked >= self.max_waiters:
            raise TooManyWaiters(self.max_waiters, "server")
        if controller_id is not None and self._by_controller[controller_id] >= (
            self.max_per_controller
        ):
            raise TooManyWaiters(self.max_per_controller, "controller")
        if address is not None and self._by_address[address] >= self.max_per_address:
            raise TooManyWaiters(self.max_per_address, "address")
        self._parked += 1
        if controller_id is not None:
            self._by_controller[controller_id] += 1
        if address is not None:
            self._by_address[address] += 1

    def _release(self, controller_id: str | None, address: str | None) -> None:
        self._parked -= 1
        for counts, key in ((self._by_controller, controller_id), (self._by_address, address)):
            if key is not None:
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]  # keep the maps as small as the parked set
