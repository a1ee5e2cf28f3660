"""The simulated world: nodes, the network and the Control API's front end, in one event heap.

`Simulation(seed, config).run()` plays one seed (see the package docstring for the model and
the invariants it checks). The lease row and the server's clocks are `server.ControlApi`;
here are the requests to it, the parked long-polls and the answers back. Nothing here
sleeps, reads a clock or opens a socket.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from conductord import pacing
from conductord.lease import INFLIGHT_GRACE_S, LeaseMachine, LeaseState
from conductord.sim.model import (
    Fault,
    RunResult,
    SimConfig,
    Violation,
    generate_faults,
    make_machine,
)
from conductord.sim.server import ControlApi
from conductord.wire import wire_operation

INF = math.inf


@dataclass(frozen=True)
class _Answer:
    holder_id: str
    term: int
    lease_expires_at: float
    is_leader: bool
    operation: str
    instance_conflict: bool = False  # one process per node id in the model


class _Interval:
    __slots__ = ("end", "kind", "start")

    def __init__(self, kind: str, start: float, end: float = INF) -> None:
        self.kind, self.start, self.end = kind, start, end

    def overlaps(self, lo: float, hi: float) -> bool:
        return self.start <= hi and self.end >= lo


class _Node:
    __slots__ = (
        "began",
        "cycle_starts",
        "deadline_gen",
        "death",
        "disturb",
        "down_iv",
        "idx",
        "inc",
        "inflight",
        "long_polled",
        "lossy",
        "machine",
        "node_id",
        "offset",
        "partition_depth",
        "partition_iv",
        "passes_running",
        "paused_until",
        "rate",
        "refused",
        "releasing",
        "req",
        "rng",
        "sent_at",
        "stop_began",
        "stop_down_for",
        "stopping",
        "up",
    )

    def __init__(self, idx: int, rate: float, offset: float, rng: random.Random) -> None:
        self.idx = idx
        self.node_id = f"node-{idx}"
        self.rate, self.offset, self.rng = rate, offset, rng
        self.inc = 0
        self.up = False
        self.paused_until = 0.0
        self.partition_depth = 0
        self.lossy = 0
        self.refused = False
        self.partition_iv: _Interval | None = None
        self.down_iv: _Interval | None = _Interval("down", 0.0)
        self.disturb: list[_Interval] = [self.down_iv]
        self.machine: LeaseMachine | None = None
        self.req = 0
        self.inflight: int | None = None
        self.sent_at = 0.0
        self.began: float | None = None
        self.long_polled = False  # the last lease cycle asked the server to wait
        self.deadline_gen = 0
        self.passes_running = False
        self.stopping = False
        self.releasing = False
        self.stop_began = 0.0
        self.stop_down_for = 0.0
        self.death: _Death | None = None
        self.cycle_starts: list[float] = []

    def local(self, t: float) -> float:
        return self.rate * t + self.offset

    def real(self, local: float) -> float:
        return (local - self.offset) / self.rate


class _Death:
    __slots__ = ("at", "interval", "kind", "node", "recovered_at", "resolved_at", "term")

    def __init__(self, node: _Node, at: float, kind: str, interval: _Interval, term: int) -> None:
        self.node, self.at, self.kind, self.interval, self.term = node, at, kind, interval, term
        self.recovered_at: float | None = None
        self.resolved_at: float | None = None


class Simulation:
    """One seeded run. `run()` returns a `RunResult`; nothing here sleeps or does I/O."""

    def __init__(
        self,
        seed: int,
        config: SimConfig,
        *,
        faults: Sequence[Fault] | None = None,
        trace: bool = False,
        stop_at_first_violation: bool = False,
    ) -> None:
        self.config = config
        self.seed = seed
        rng = random.Random(seed)
        generated = generate_faults(config, rng)
        self.faults = tuple(generated if faults is None else faults)
        d = config.drift
        self.nodes = [
            _Node(
                i,
                rate=rng.uniform(1 - d, 1 + d),
                offset=rng.uniform(0, 1e5),
                rng=random.Random(rng.getrandbits(64)),
            )
            for i in range(config.nodes)
        ]
        self.start_times = [rng.uniform(0.0, 2.0) for _ in range(config.nodes)]
        self.result = RunResult(
            seed=seed,
            faults=self.faults,
            clock_rates={n.node_id: n.rate for n in self.nodes},
            trace=[] if trace else None,
        )
        self.stop_at_first_violation = stop_at_first_violation

        self.ttl = config.lease_ttl_sec
        self.renew_s = config.lease_renew_interval_ms / 1000.0
        self.timeout_s = config.request_timeout_ms / 1000.0
        self.now = 0.0
        self._heap: list[tuple[Any, ...]] = []
        self._seq = 0

        self.server = ControlApi(config.server, float(config.lease_ttl_sec))
        self.outage_depth = 0
        self.outage_refused = False
        self.outages: list[_Interval] = []
        self.waiters: list[tuple[_Node, int, int, float]] = []  # node, inc, request, deadline
        self.pending_gap: float | None = None

        self.term_owner_performed: dict[int, str] = {}
        self.max_term_performed = 0
        self.term_owner_accepted: dict[int, str] = {}
        self.fence_term = 0
        self.pending_deaths: list[_Death] = []

    # -- event queue -------------------------------------------------------------

    def _push(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, t, self._seq, None, 0, fn, args))

    def _push_node(self, t: float, node: _Node, fn: Callable[..., None], *args: Any) -> None:
        """An event that happens inside the node's process: dropped on crash, paused."""
        self._seq += 1
        heapq.heappush(self._heap, (t, t, self._seq, node, node.inc, fn, args))

    def _timer(self, node: _Node, local_at: float, fn: Callable[..., None], *args: Any) -> None:
        jitter = node.rng.uniform(0.0, self.config.timer_jitter_ms / 1000.0)
        self._push_node(max(self.now, node.real(local_at)) + jitter, node, fn, *args)

    def _log(self, node: _Node | None, text: str) -> None:
        if self.result.trace is not None:
            who = "server " if node is None else node.node_id
            self.result.trace.append(f"{self.now:12.6f} {who:<7} {text}")

    def run(self) -> RunResult:
        for i, node in enumerate(self.nodes):
            self._push(self.start_times[i], self._restart, node)
        for fault in self.faults:
            self._push(fault.at, self._fault, fault)
        end = self.config.duration_s
        heap = self._heap
        result = self.result
        while heap:
            t, order, seq, node, inc, fn, args = heapq.heappop(heap)
            if t > end:
                break
            self.now = t
            result.events += 1
            if node is not None:
                if node.inc != inc or not node.up:
                    continue
                if node.paused_until > t:
                    heapq.heappush(heap, (node.paused_until, order, seq, node, inc, fn, args))
                    continue
            fn(*args)
            if self.stop_at_first_violation and result.violations:
                break
        result.sim_seconds = self.now if result.violations else end
        return result

    # -- invariants --------------------------------------------------------------

    def _violate(self, kind: str, detail: str) -> None:
        self._log(None, f"VIOLATION {kind}: {detail}")
        result = self.result
        result.violation_events += 1
        # The first of each kind tells the story; a broken node repeats it every pass.
        if all(v.kind != kind for v in result.violations):
            result.violations.append(Violation(kind, self.now, detail))

    @staticmethod
    def _act_invariants(
        owners: dict[int, str], max_term: int, node: _Node, term: int
    ) -> tuple[str, str] | None:
        owner = owners.setdefault(term, node.node_id)
        if owner != node.node_id:
            return (
                "two_schedulers_in_term",
                f"{node.node_id} acted in term {term}, which {owner} already acted in",
            )
        if term < max_term:
            return (
                "term_decreased",
                f"{node.node_id} acted with term {term} after term {max_term} had acted",
            )
        return None

    # -- faults ------------------------------------------------------------------

    def _fault(self, fault: Fault) -> None:
        self._log(None, f"FAULT {fault}")
        injected = self.result.faults_injected
        injected[fault.kind] = injected.get(fault.kind, 0) + 1
        if fault.kind in ("outage", "server_restart"):
            self.outage_depth += 1
            self.outage_refused = fault.refused
            iv = _Interval("outage", self.now, self.now + fault.duration)
            self.outages.append(iv)
            self.waiters.clear()  # parked connections die with the server process
            self._push(self.now + fault.duration, self._outage_end, fault)
            return
        if fault.kind == "clock_step":
            # Not a disturbance for the liveness check: the real server does not notice it.
            self.server.step_wall(fault.step_s)
            return
        if fault.kind == "gap_pause":
            self.pending_gap = fault.duration
            return
        assert fault.node is not None
        node = self.nodes[fault.node]
        if not node.up:
            return
        if fault.kind == "crash":
            self._record_death(node, "crash", lambda: self._go_down(node))
            self._push(self.now + fault.duration, self._restart, node)
        elif fault.kind == "stop":
            # SIGTERM is handled inside the process: a paused node handles it on resume.
            self._push_node(self.now, node, self._stop_begin, node, fault.duration)
        elif fault.kind == "partition":
            node.partition_depth += 1
            node.refused = fault.refused
            if node.partition_depth == 1:
                node.partition_iv = _Interval("partition", self.now)
                node.disturb.append(node.partition_iv)
                self._record_death(node, "partition", lambda: node.partition_iv)
            self._push(self.now + fault.duration, self._partition_end, node)
        elif fault.kind == "pause":
            self._pause(node, fault.duration)
        elif fault.kind == "lossy":
            node.lossy += 1
            node.disturb.append(_Interval("lossy", self.now, self.now + fault.duration))
            self._push(self.now + fault.duration, self._lossy_end, node)

    def _pause(self, node: _Node, duration: float) -> None:
        until = self.now + duration
        if until > node.paused_until:
            node.paused_until = until
        node.disturb.append(_Interval("pause", self.now, until))

    def _lossy_end(self, node: _Node) -> None:
        node.lossy -= 1

    def _outage_end(self, fault: Fault) -> None:
        self.outage_depth -= 1
        if fault.kind == "server_restart":
            self.server.step_wall(fault.step_s)
            self.server.restart(self.now)
            self._log(None, f"restarted on a new boot: {self.server.describe(self.now)}")
        else:
            self._log(None, "outage over")

    def _partition_end(self, node: _Node) -> None:
        node.partition_depth -= 1
        if node.partition_depth == 0 and node.partition_iv is not None:
            node.partition_iv.end = self.now
            node.partition_iv = None
            self._log(node, "partition healed")
            if node.death is not None and node.death.kind == "partition":
                node.death.recovered_at = self.now
                node.death = None

    def _record_death(self, node: _Node, kind: str, make_interval: Callable[[], Any]) -> None:
        m = node.machine
        leading = m is not None and m.scheduler_enabled(node.local(self.now))
        interval = make_interval()
        if not leading or node.stopping:
            return
        assert m is not None and m.current_term is not None
        death = _Death(node, self.now, kind, interval, m.current_term)
        node.death = death
        self.pending_deaths.append(death)
        deadline = self.now + self.config.failover_bound_s()
        self._push(deadline, self._liveness_deadline, death)

    def _go_down(self, node: _Node) -> _Interval:
        node.up = False
        node.inc += 1
        node.passes_running = False
        if node.down_iv is None:  # a crash while stopping keeps the stop's interval
            node.down_iv = _Interval("down", self.now)
            node.disturb.append(node.down_iv)
        self._log(node, "crashed")
        return node.down_iv

    def _restart(self, node: _Node) -> None:
        if node.up:
            return
        node.up = True
        node.inc += 1
        node.paused_until = 0.0
        if node.down_iv is not None:
            node.down_iv.end = self.now
            node.down_iv = None
        if node.death is not None and node.death.kind in ("crash", "stop"):
            node.death.recovered_at = self.now
            node.death = None
        node.machine = make_machine(self.config, node.node_id)
        node.inflight = None
        node.began = None
        node.cycle_starts.clear()  # a spin is one process's; a restart starts afresh
        node.stopping = False
        node.passes_running = False
        node.deadline_gen += 1
        self._log(node, "start")
        self._start_cycle(node, wait=False)

    # -- graceful stop (runtime.stop) --------------------------------------------

    def _stop_begin(self, node: _Node, down_for: float) -> None:
        if node.stopping:
            return
        interval = _Interval("down", self.now)
        self._record_death(node, "stop", lambda: interval)
        node.disturb.append(interval)
        node.down_iv = interval
        node.stopping = True
        node.releasing = False
        node.stop_began = self.now
        node.stop_down_for = down_for
        assert node.machine is not None
        node.machine.begin_stop()
        self._log(node, "stopping")
        if node.inflight is not None:
            self._timer(node, node.local(self.now) + INFLIGHT_GRACE_S, self._stop_release, node)
        else:
            self._stop_release(node)

    def _stop_release(self, node: _Node) -> None:
        if not node.stopping or node.releasing:
            return
        node.releasing = True
        node.inflight = None  # killed: it may still reach the server
        node.req += 1
        assert node.machine is not None
        term = node.machine.held_term
        if term is None:
            self._stop_finish(node)
            return
        budget = self.timeout_s + 1.0 - (self.now - node.stop_began) - 0.1
        rid = node.req
        self._timer(node, node.local(self.now) + max(budget, 0.1), self._stop_finish, node)
        self._send(node, rid, self._server_release, (term,))

    def _stop_finish(self, node: _Node) -> None:
        # Runs once: the release answer or the budget timer, whichever comes first; the
        # other is dropped because the process (incarnation) is gone.
        assert node.machine is not None
        node.machine.stopped()
        self._log(node, "stopped")
        node.up = False
        node.inc += 1
        node.passes_running = False
        self._push(max(self.now, node.stop_began + node.stop_down_for), self._restart, node)

    # -- lease loop (runtime._lease_cycle / _run_loop) ---------------------------

    def _start_cycle(self, node: _Node, *, wait: bool) -> None:
        m = node.machine
        assert m is not None
        # Asked as the runtime asks; whether the server parks it is `config.long_poll`.
        long_poll = wait and pacing.long_polls(m)
        node.long_polled = long_poll
        local_now = node.local(self.now)
        starts = node.cycle_starts
        starts.append(local_now)
        while starts[0] <= local_now - self.renew_s:
            starts.pop(0)
        if len(starts) > self.result.max_cycles_per_interval:
            self.result.max_cycles_per_interval = len(starts)
        node.req += 1
        rid = node.req
        node.inflight = rid
        node.sent_at = local_now
        wait_s = self.renew_s if long_poll else 0.0
        if self.result.trace is not None:
            self._log(node, f"acquire sent{' (long-poll)' if long_poll else ''} as {m.state}")
        self._timer(node, local_now + self.timeout_s + wait_s, self._cycle_timeout, node, rid)
        self._send(node, rid, self._server_acquire, (wait_s,))

    def _cycle_timeout(self, node: _Node, rid: int) -> None:
        if node.inflight == rid:
            self._cycle_failed(node, rid, "timed out")

    def _cycle_failed(self, node: _Node, rid: int, error: str) -> None:
        if node.inflight != rid:
            return
        node.inflight = None
        m = node.machine
        assert m is not None
        self._log(node, f"lease call failed: {error}")
        self._transition(node, m.lease_failed(error, now=node.local(self.now)))
        self._after_cycle(node)

    def _cycle_answer(self, node: _Node, rid: int, answer: _Answer) -> None:
        if node.inflight != rid:
            return  # the caller gave up on it already
        node.inflight = None
        m = node.machine
        assert m is not None
        local_now = node.local(self.now)
        self._transition(node, m.lease_succeeded(answer, sent_at=node.sent_at, now=local_now))
        node.deadline_gen += 1
        if m.valid_until is not None:
            self._timer(node, m.valid_until, self._deadline, node, node.deadline_gen)
        self._after_cycle(node)

    def _deadline(self, node: _Node, gen: int) -> None:
        if gen == node.deadline_gen and node.machine is not None:
            self._transition(node, node.machine.tick(node.local(self.now)))

    def _after_cycle(self, node: _Node) -> None:
        if node.stopping:
            self._stop_release(node)
            return
        m = node.machine
        assert m is not None
        local_now = node.local(self.now)
        after_start = node.began is None  # the start sequence's cycle: the loop starts now
        if after_start:
            node.began = local_now
        assert node.began is not None
        wait = pacing.lease_wait_s(
            m,
            interval_s=self.renew_s,
            elapsed_s=local_now - node.began,
            long_polled=node.long_polled,
            rng=node.rng,
            after_start=after_start,
        )
        if wait > 0:
            self._timer(node, local_now + wait, self._loop_cycle, node)
        else:
            self._push_node(self.now, node, self._loop_cycle, node)

    def _loop_cycle(self, node: _Node) -> None:
        if node.stopping or node.inflight is not None:
            return
        node.began = node.local(self.now)
        self._start_cycle(node, wait=True)

    def _transition(self, node: _Node, transition: Any) -> None:
        m = node.machine
        assert m is not None
        if transition is not None:
            self._log(
                node,
                f"{transition.from_state} -> {transition.to_state} ({transition.reason}, "
                f"term {transition.term}, leader {transition.leader_id})",
            )
        if m.state is LeaseState.LEADER and not node.passes_running:
            node.passes_running = True
            self._push_node(self.now, node, self._scheduler_pass, node)

    # -- network -----------------------------------------------------------------

    def _latency(self, node: _Node) -> tuple[float, bool]:
        cfg = self.config
        rng = node.rng
        if rng.random() < (cfg.lossy_slow_prob if node.lossy else cfg.slow_prob):
            return rng.uniform(cfg.latency_max_ms / 1000.0, 2 * self.timeout_s), True
        lat = cfg.latency_min_ms + rng.expovariate(1.0 / cfg.latency_mean_ms)
        return min(lat, cfg.latency_max_ms) / 1000.0, False

    def _loss_prob(self, node: _Node) -> float:
        return self.config.lossy_loss_prob if node.lossy else self.config.loss_prob

    def _cut_off(self, node: _Node) -> bool:
        return node.partition_depth > 0 or self.outage_depth > 0

    def _send(self, node: _Node, rid: int, handler: Callable[..., None], args: tuple) -> None:
        """A request from `node` to the Control API."""
        rng = node.rng
        if self._cut_off(node):
            if node.refused if node.partition_depth else self.outage_refused:
                lat, _ = self._latency(node)
                self._push_node(self.now + 2 * lat, node, self._cycle_failed, node, rid, "refused")
            return  # otherwise it hangs until the timeout
        if rng.random() < self._loss_prob(node):
            node.disturb.append(_Interval("lost", self.now, self.now + self.timeout_s))
            self._log(node, "request lost")
            return
        lat, slow = self._latency(node)
        if slow:
            node.disturb.append(_Interval("slow", self.now, self.now + lat))
        self._push(self.now + lat, self._arrive, node, node.inc, rid, handler, args)

    def _arrive(self, node: _Node, inc: int, rid: int, handler: Callable, args: tuple) -> None:
        if self._cut_off(node):
            return  # dropped on the way: the client times out
        handler(node, inc, rid, *args)

    def _reply(self, node: _Node, inc: int, rid: int, answer: Any, on_answer: Callable) -> None:
        """A reply from the Control API to `node`; lost replies leave the client waiting."""
        rng = node.rng
        if self._cut_off(node):
            return
        if rng.random() < self._loss_prob(node):
            node.disturb.append(_Interval("lost", self.now, self.now + self.timeout_s))
            self._log(node, "reply lost (server applied the request)")
            return
        lat, slow = self._latency(node)
        if slow:
            node.disturb.append(_Interval("slow", self.now, self.now + lat))
        self._push(self.now + lat, self._deliver, node, inc, rid, answer, on_answer)

    def _deliver(self, node: _Node, inc: int, rid: int, answer: Any, on_answer: Callable) -> None:
        if node.partition_depth > 0 or node.inc != inc:
            return
        self._seq += 1
        heapq.heappush(
            self._heap, (self.now, self.now, self._seq, node, inc, on_answer, (node, rid, answer))
        )

    # -- Control API (the real rules) ---------------------------------------------

    def _decide(self, node: _Node) -> _Answer:
        server = self.server
        previous = server.row
        decision = server.acquire(node.node_id, preferred=node.idx == 0, t=self.now)
        row = decision.row
        if decision.operation != "deny":
            self._log(None, f"{decision.operation} term {row.term} for {node.node_id}")
        expiry_moved = previous is None or previous.expires != row.expires
        if expiry_moved and self.waiters:
            self._wake_at_expiry()
        return _Answer(
            holder_id=row.holder_id,
            term=row.term,
            lease_expires_at=row.lease_expires_at,
            is_leader=decision.is_leader,
            operation=wire_operation(decision.operation),
        )

    def _wake_at_expiry(self) -> None:
        """The server's timer for the expiry instant (monotonic, like gevent's)."""
        at = self.server.expiry_at(self.now)
        if at is not None:
            self._push(max(at, self.now), self._wake_waiters)

    def _server_acquire(self, node: _Node, inc: int, rid: int, wait_s: float) -> None:
        server = self.server
        if (
            wait_s > 0
            and self.config.long_poll
            and server.live(self.now)
            and server.row is not None
            and server.row.holder_id != node.node_id
        ):
            self.waiters.append((node, inc, rid, self.now + wait_s))
            self._wake_at_expiry()
            self._push(self.now + wait_s, self._waiter_done, node, inc, rid)
            return
        self._reply(node, inc, rid, self._decide(node), self._cycle_answer)

    def _wake_waiters(self) -> None:
        if not self.waiters or self.server.live(self.now):
            return
        for waiter in list(self.waiters):
            node, inc, rid, _ = waiter
            answer = self._decide(node)
            if answer.is_leader:
                self.waiters.remove(waiter)
                self._reply(node, inc, rid, answer, self._cycle_answer)

    def _waiter_done(self, node: _Node, inc: int, rid: int) -> None:
        for waiter in self.waiters:
            if waiter[0] is node and waiter[1] == inc and waiter[2] == rid:
                self.waiters.remove(waiter)
                self._reply(node, inc, rid, self._decide(node), self._cycle_answer)
                return

    def _server_release(self, node: _Node, inc: int, rid: int, term: int) -> None:
        decision = self.server.release(node.node_id, term, self.now)
        self._log(None, f"release term {term} by {node.node_id}: {decision.released}")
        self._reply(node, inc, rid, decision.released, self._release_answer)
        if decision.released:
            self._wake_waiters()

    def _release_answer(self, node: _Node, rid: int, released: bool) -> None:
        self._stop_finish(node)

    # -- scheduler ---------------------------------------------------------------

    def _scheduler_pass(self, node: _Node) -> None:
        m = node.machine
        assert m is not None
        if m.state is not LeaseState.LEADER:
            node.passes_running = False
            return
        local_now = node.local(self.now)
        if m.scheduler_enabled(local_now):
            self._checked(node, m, local_now)
        self._timer(
            node, local_now + self.config.pass_interval_ms / 1000.0, self._scheduler_pass, node
        )

    def _checked(self, node: _Node, m: LeaseMachine, local_now: float) -> None:
        result = self.result
        result.passes_checked += 1
        term = m.current_term
        assert term is not None
        if not self.server.holds(node.node_id, term, self.now):
            self._violate(
                "lease_overrun",
                f"{node.node_id} passed its check for term {term} while the server has "
                + self.server.describe(self.now),
            )
        if self.pending_deaths:
            for death in list(self.pending_deaths):
                if self.now > death.at and (
                    death.node is not node
                    or (death.recovered_at is not None and self.now >= death.recovered_at)
                ):
                    death.resolved_at = self.now
                    self.pending_deaths.remove(death)
        delay = node.rng.uniform(0.0, self.config.act_delay_max_ms / 1000.0)
        assert m.valid_until is not None
        if self.pending_gap is not None and m.valid_until - local_now < self.config.gap_window_s:
            self._log(
                node, f"check passed for term {term}; paused {self.pending_gap:.6f}s before acting"
            )
            self._pause(node, self.pending_gap)
            self.pending_gap = None
        self._push_node(self.now + delay, node, self._act, node, term)

    def _act(self, node: _Node, term: int) -> None:
        result = self.result
        result.acts_performed += 1
        fenced = self.config.fencing
        problem = self._act_invariants(
            self.term_owner_performed, self.max_term_performed, node, term
        )
        self.max_term_performed = max(self.max_term_performed, term)
        if problem is not None:
            result.unfenced_violations += 1
            self._log(node, f"unfenced: {problem[1]}")
            if not fenced:
                self._violate(*problem)
        if term < self.fence_term:
            result.acts_rejected += 1
            self._log(
                node, f"act with term {term} rejected by the fence (has seen {self.fence_term})"
            )
            return
        self.fence_term = term
        result.acts_accepted += 1
        problem = self._act_invariants(self.term_owner_accepted, term, node, term)
        if problem is not None and fenced:
            self._violate(*problem)

    def _liveness_deadline(self, death: _Death) -> None:
        if death in self.pending_deaths:
            self.pending_deaths.remove(death)
        cfg = self.config
        # Faults before the death cannot matter: nobody else holds the lease before it, and a
        # slow renewal of the dead leader still in flight has an interval that reaches past it.
        lo, hi = death.at, self.now
        qualifies = not any(iv.overlaps(lo, hi) for iv in self.outages)
        healthy = 0
        for node in self.nodes:
            if not qualifies:
                break
            touching = [
                iv for iv in node.disturb if iv is not death.interval and iv.overlaps(lo, hi)
            ]
            if node is death.node:
                qualifies = not touching
            elif not touching:
                healthy += 1
            elif not (
                len(touching) == 1
                and touching[0].kind == "down"
                and touching[0].start <= lo
                and touching[0].end >= hi
            ):
                qualifies = False
        if not qualifies or healthy == 0:
            self.result.liveness_windows_skipped += 1
            return
        if death.resolved_at is None:
            self._violate(
                "no_failover",
                f"leader {death.node.node_id} (term {death.term}) {death.kind} at {death.at:.6f}; "
                f"nobody scheduled within {cfg.failover_bound_s():.3f}s although "
                f"{healthy} node(s) stayed healthy",
            )
        else:
            self.result.failovers.append(death.resolved_at - death.at)
