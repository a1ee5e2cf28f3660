"""The daemon: the start sequence, the heartbeat and lease loops, signals and shutdown.

Design (SPEC §5, §8):
- The lease decisions live in `lease.LeaseMachine` (pure); this module feeds it events with
  the monotonic time and logs what changed.
- Each loop is a greenlet in one group. An iteration is a method; the loop only paces it
  (start-to-start, ±10 % jitter, waiting on the stop Event so stop is prompt). Every call is
  bounded by the request timeout, so a hung call in one loop never delays the other.
- A leader's local deadline is enforced twice: `scheduler_enabled` compares against it on
  every read, and a deadline greenlet moves the state to `degraded` when it passes even while
  the renewal call is still hanging. Every decision reads the lease clock afresh
  (`conductord.clock.lease_clock`, which counts system sleep): gevent's timers run on a clock
  that does not, so after a wake they fire late. The deadline greenlet therefore waits at most
  `DEADLINE_POLL_S` at a time, and every read of the state (snapshot, status endpoint,
  scheduler pass) first applies a step-down that is due.
- Instance identity (SPEC §15): every call carries this process's instance id
  (`conductord.identity`); an answer naming our node id held by another instance keeps us
  standby (`lease.identity_conflict`). A one-shot run (`--run-once`, `diagnose`) has a fresh
  instance and releases on its way out only a term the server said it granted (an explicit
  `"operation": "acquire"`, `AcquireResult.granted`), so it can never end the lease of a
  running daemon, even against a server that ignores instances: such a server answers it
  `renew`, or says no operation at all, and then the run leaves the lease to expire.
- A loop that raises is a bug: `link_exception` logs `conductor.crashed` and stops the daemon
  (exit 1) rather than leaving a node that looks alive but no longer renews.
- Leader-only work (SPEC §14) begins only after the start sequence (`begin_work`, after
  `conductor.started` in the daemon) and never in a one-shot run: the `--scheduler` plug-in in
  a greenlet of its own, and the `--exec` command through `exec.ExecSupervisor`, which gets
  `lead(...)` after every lease cycle that leaves this node leader with the scheduler enabled
  and `lose(reason)` on every transition out of leader. A failure of the supervisor is a crash.
- Stop: scheduler off first, the `--exec` group told to stop, loops stopped, the group waited
  for until it is gone, then the lease released when held (404 tolerated), all within request
  timeout + 1 s (+ the exec stop grace with `--exec`). A group that cannot be confirmed gone
  keeps the lease unreleased (it expires; the guard's deadline kills the group before that)
  and the exit is 1. The signal handler only sets an Event.

Limits: hooks (`load_runs`, `reconcile_runs`, `on_lease_state_change`) run in the calling
greenlet and must not block for long; a scheduler pass runs in the daemon's hub too, so it must
yield (gevent I/O) rather than compute for seconds. docs/embedding.md says what is safe where.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import gevent
from gevent.event import Event
from gevent.pool import Group

from conductord import endpoints, identity, logs, pacing
from conductord.client import ControlApiClient, ControlApiError
from conductord.clock import lease_clock
from conductord.config import Config, config_warnings
from conductord.exec import ExecSupervisor, disabled_snapshot
from conductord.lease import (
    INFLIGHT_GRACE_S,
    STARTUP_CHECKLIST,
    LeaseMachine,
    LeaseState,
    Reason,
    Transition,
    default_margin_s,
    startup_checklist,
)
from conductord.plugins import load_plugins
from conductord.redact import clean
from conductord.status import StatusServer, StatusServerError
from conductord.wire import Heartbeat

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DEGRADED = 3

# While failures repeat, remind at most this often (the first failure is always logged).
FAILURE_REMINDER_S = 60.0
# The deadline greenlet re-reads the lease clock at least this often while leader, so a
# leader that wakes from system sleep steps down within this long of the wake.
DEADLINE_POLL_S = 1.0
# Why the --exec group is stopped (`ExecSupervisor.lose`), by the reason leadership ended.
EXEC_LOSE_REASONS: Final = {
    Reason.HELD_BY_OTHER: "leadership_lost",
    Reason.RENEW_FAILURES: "leadership_lost",
    Reason.IDENTITY_CONFLICT: "leadership_lost",
    Reason.DEADLINE: "deadline",
    Reason.LATE_GRANT: "deadline",
    Reason.STOPPING: "stopping",
}


@dataclass(frozen=True)
class SchedulerContext:
    """What one scheduler pass gets: who leads, and the term as the fencing token (SPEC §5).

    `still_leader()` re-reads the lease deadline on the lease clock (and applies a step-down
    that is due): call it before each act that must not happen once leadership ended, and send
    `term` with the act so the shared side can refuse a stale one; the check alone leaves the
    gap between check and act. A context built by hand (no `leader_check`) is never leader.
    """

    controller_id: str
    host: str
    term: int
    leader_check: Callable[[], bool] | None = field(default=None, repr=False, compare=False)

    def still_leader(self) -> bool:
        return self.leader_check is not None and bool(self.leader_check())


class _FailureStreak:
    """Log the first failure of a streak and its recovery, not every repeat."""

    def __init__(
        self,
        log: Any,
        failed_event: str,
        recovered_event: str,
        clock: Callable[[], float],
        remind_after_s: float | None = None,
    ) -> None:
        self._log = log
        self._failed_event = failed_event
        self._recovered_event = recovered_event
        self._clock = clock
        self._remind_after_s = remind_after_s
        self._count = 0
        self._last_logged = 0.0

    def failed(self, error: str) -> None:
        self._count += 1
        now = self._clock()
        remind = (
            self._remind_after_s is not None and now - self._last_logged >= self._remind_after_s
        )
        if self._count == 1 or remind:
            self._last_logged = now
            self._log.warning(self._failed_event, error=error, consecutive_failures=self._count)
        else:
            self._log.debug(self._failed_event, error=error, consecutive_failures=self._count)

    def succeeded(self) -> None:
        if self._count:
            self._log.info(self._recovered_event, failed_attempts=self._count)
        self._count = 0


def count_runs(runs_dir: str | None) -> str:
    """Default `load-runs` hook: count the entries of `runs_dir`."""
    if not runs_dir:
        return "runs_dir not configured"
    try:
        return f"{len(os.listdir(runs_dir))} entries in {runs_dir}"
    except FileNotFoundError:
        return f"{runs_dir} does not exist"
    except OSError as err:  # a file, or unreadable: report it, never crash the start sequence
        return f"cannot read {runs_dir}: {err.strerror or err}"


class Runtime:
    """One conductor node: owns the client, the lease machine and the loops."""

    def __init__(
        self,
        config: Config,
        *,
        client: ControlApiClient | None = None,
        log: Any = None,
        clock: Callable[[], float] = lease_clock,
        wall: Callable[[], float] = time.time,
        load_runs: Callable[[], str | None] | None = None,
        reconcile_runs: Callable[[], str | None] | None = None,
        scheduler: Callable[[SchedulerContext], Any] | None = None,
        instance: identity.Instance | None = None,
        one_shot: bool = False,
    ) -> None:
        self.config = config
        self.instance = instance or identity.ephemeral()
        self.instance_id = self.instance.instance_id
        self.one_shot = one_shot
        self.client = client or ControlApiClient(
            config.control_api_bases,
            token=config.shared_token,
            timeout_ms=config.request_timeout_ms,
        )
        self.log = log or logs.get_logger()
        self.clock = clock
        self.wall = wall
        self.machine = LeaseMachine(
            node_id=config.node_id,
            lease_ttl_sec=config.lease_ttl_sec,
            renew_failure_threshold=config.renew_failure_threshold,
            margin_s=default_margin_s(config.lease_renew_interval_ms, config.lease_ttl_sec),
        )
        self.warnings = config_warnings(config)
        self.started_at = wall()
        self.steps: list[dict[str, Any]] = []
        self.crashed: BaseException | None = None

        # Plug-ins named by the config (--scheduler, --hooks); arguments given here win.
        plugins = load_plugins(config)
        hooks = plugins.hooks
        load_runs = load_runs or (hooks.load_runs if hooks else None)
        reconcile_runs = reconcile_runs or (hooks.reconcile_runs if hooks else None)
        self._load_runs = load_runs or (lambda: count_runs(config.paths.runs_dir))
        self._reconcile_runs = reconcile_runs or (lambda: None)
        self._state_hooks: list[Callable[[dict[str, Any]], None]] = []
        if hooks is not None and hooks.on_lease_state_change is not None:
            self._state_hooks.append(hooks.on_lease_state_change)
        self.scheduler = scheduler or plugins.scheduler

        # --exec (SPEC §14): never in a one-shot run (`--run-once`, `diagnose`).
        self.exec_supervisor: ExecSupervisor | None = None
        if config.exec_argv and not one_shot:
            if clock is not lease_clock:
                raise ValueError("--exec needs the lease clock: its guard reads that clock")
            self.exec_supervisor = ExecSupervisor(
                config.exec_argv,
                node_id=config.node_id,
                host=config.host,
                log=self.log,
                token=config.shared_token,
                every_ms=config.exec_every_ms,
                stop_grace_ms=config.exec_stop_grace_ms,
                on_crash=self.crash,
                lock_path=identity.exec_lock_path(config.paths.state_dir),
            )
        self._rng = random.Random()
        self._group = Group()
        self._loops: dict[str, gevent.Greenlet] = {}
        self._deadline_timer: gevent.Greenlet | None = None
        self._deadline_moved = Event()
        # Terms the server said it granted this process (an explicit operation "acquire").
        self._granted_terms: set[int] = set()
        # When a heartbeat that rode along on a lease call was last recorded (lease clock).
        self._heartbeat_ridden_at: float | None = None
        self._conflict_logged: tuple[str | None, float] | None = None
        self._stop_requested = Event()
        self._long_polled = False  # the last lease cycle asked the server to wait
        self._started = False
        self._stopped = False
        self._working = False  # the leader-only work has begun (`begin_work`)
        self._leading = Event()  # set while leader with the work begun; the scheduler waits on it
        self._scheduler_loop: gevent.Greenlet | None = None
        self._scheduler_overran = False

        # Read by the status endpoint (SPEC §8): loop progress and totals for /metrics.
        self.loop_progress: dict[str, float | None] = {"heartbeat": None, "lease": None}
        self.transitions_total: Counter[tuple[str, str]] = Counter()
        self.renew_failures_total = 0
        self.heartbeat_failures_total = 0
        self.last_renew_at: float | None = None  # wall time of the last successful lease call

        self._heartbeat_streak = _FailureStreak(
            self.log, "heartbeat.failed", "heartbeat.recovered", clock
        )
        self._renew_streak = _FailureStreak(
            self.log, "lease.renew_failed", "lease.renew_recovered", clock, FAILURE_REMINDER_S
        )

    # -- public API ------------------------------------------------------------

    def on_lease_state_change(self, hook: Callable[[dict[str, Any]], None]) -> None:
        """Register `hook(snapshot)`, called after every lease state change."""
        self._state_hooks.append(hook)

    def refresh(self) -> None:
        """Apply a step-down by time that is due (see the module docstring on late timers)."""
        if self.machine.state is LeaseState.LEADER:
            self._apply(self.machine.tick(self.clock()))

    def run_scheduler_pass(self, work: Callable[[SchedulerContext], Any]) -> str:
        """Run `work` only while this node may schedule; the term is its fencing token.

        Returns "scheduled" or "skipped_not_leader"; what `work` raises propagates.
        """
        context = self._scheduler_context()
        if context is None:
            return "skipped_not_leader"
        work(context)
        return "scheduled"

    def still_leader(self, term: int) -> bool:
        """True while this node may schedule under `term` (read on the lease clock now)."""
        self.refresh()
        m = self.machine
        return m.scheduler_enabled(self.clock()) and m.current_term == term

    def begin_work(self) -> None:
        """Begin the leader-only work: the `--scheduler` greenlet, and the `--exec` command
        while leader. `start()` calls it unless told not to (the daemon calls it after
        `conductor.started`); idempotent; nothing happens without running loops or in a
        one-shot run."""
        if self._working or self._stopped or self.one_shot or not self._loops:
            return
        self._working = True
        if self.scheduler is not None:
            greenlet = self._group.spawn(self._run_scheduler)
            greenlet.link_exception(self._on_loop_crash)
            self._scheduler_loop = greenlet
        self._lead_work()

    @property
    def stop_requested(self) -> Event:
        return self._stop_requested

    def request_stop(self) -> None:
        self._stop_requested.set()

    def snapshot(self) -> dict[str, Any]:
        """The runtime snapshot of SPEC §6."""
        self.refresh()
        cfg = self.config
        return {
            "identity": f"{cfg.node_id}@{cfg.host}({cfg.role})",
            "daemon": {
                "node_id": cfg.node_id,
                "host": cfg.host,
                "role": cfg.role,
                **self.machine.status(self.clock()),
            },
            "loops": {name: self._loop_alive(name) for name in ("heartbeat", "lease")},
            "paths": cfg.paths.as_dict(),
            "control_api": {
                # The URL in use (SPEC §17) and every URL given.
                "base_url": getattr(self.client, "base_url", cfg.control_api_bases[0]),
                "base_urls": list(cfg.control_api_bases),
                "local_api_base": cfg.local_api_base,
                "has_shared_token": cfg.has_shared_token,
                "uses_placeholder_token": cfg.uses_placeholder_token,
            },
            "runtime": {
                "pid": os.getpid(),
                "started": self._started,
                "started_at": int(self.started_at),
                "instance_id": self.instance_id,
            },
            "exec": (
                self.exec_supervisor.snapshot()
                if self.exec_supervisor is not None
                else disabled_snapshot()
            ),
            "startup_checklist": startup_checklist(),
            "warnings": list(self.warnings),
        }

    def start(self, *, loops: bool = True, work: bool = True) -> dict[str, Any]:
        """Run the start sequence (SPEC §5) once; idempotent.

        With `loops`, the heartbeat and lease loops keep running afterwards; with `work` too,
        the leader-only work begins at once (`begin_work`).
        """
        if self._started or self._stopped:
            return self.snapshot()
        steps = dict(STARTUP_CHECKLIST)

        def step(key: str, action: Callable[[], tuple[str, str | None]]) -> None:
            began = self.clock()
            outcome, detail = action()
            self.steps.append(
                {
                    "key": key,
                    "description": steps[key],
                    "outcome": outcome,
                    "detail": detail,
                    "duration_ms": round((self.clock() - began) * 1000, 1),
                }
            )

        step("register-controller", self._register)
        step("acquire-lease", self._first_lease_cycle)
        step("load-runs", lambda: ("ok", self._load_runs()))
        step("reconcile-runs", lambda: ("ok", self._reconcile_runs()))
        step("start-heartbeat-loop", lambda: self._start_loops() if loops else ("skipped", None))
        step("start-scheduler", self._scheduler_step)
        self._started = True
        if loops and work:
            self.begin_work()
        return self.snapshot()

    def stop(self) -> dict[str, Any]:
        """Stop loops, release a held lease, log the way out; idempotent."""
        if self._stopped:
            return self.snapshot()
        self._stopped = True
        began = self.clock()
        self.machine.begin_stop()
        self._leading.clear()
        if self.exec_supervisor is not None:
            # SIGTERM to the --exec group as the stop begins; `_stop_exec` waits for it.
            self._exec_call(self.exec_supervisor.lose, "stopping")
        self.log.info("conductor.stopping", snapshot=self.snapshot())
        self._stop_requested.set()

        # Known limit: a renewal still in flight after the grace is killed here; if the
        # server processes it after our release, it grants this stopped node term + 1 and
        # failover waits one TTL. Never two schedulers: this node schedules nothing more.
        live = [g for g in self._loops.values() if not g.dead]
        if self._scheduler_loop is not None and not self._scheduler_loop.dead:
            live.append(self._scheduler_loop)  # a pass under way may finish within the grace
        gevent.joinall(live, timeout=INFLIGHT_GRACE_S)
        self._group.kill(block=True, timeout=1.0)
        if self._deadline_timer is not None:
            self._deadline_timer.kill(block=False)
        group_gone = self._stop_exec()

        released: dict[str, Any] | None = None
        term = self.machine.held_term
        if term is not None and self.one_shot and term not in self._granted_terms:
            # Not granted to this run (the server said renew, or no operation: the lease may
            # be a running daemon's, under a server that ignores instances). Never end it.
            self.log.info("lease.release_skipped", term=term, reason="not_granted_to_this_run")
            term = None
        if term is not None and not group_gone:
            # Releasing now could start another node's copy beside ours: let the lease
            # expire instead (the guard kills the group before it can).
            self.log.error("lease.release_skipped", term=term, reason="exec_group_not_gone")
            term = None
        if term is not None:
            budget = self._stop_budget_s() - (self.clock() - began) - 0.1
            released = self._release(term, max(budget, 0.1))
        self._apply(self.machine.stopped())
        if released is not None:
            self.log.info("lease.released", term=term, **released)
        self._started = False
        self.client.close()
        self.instance.close()
        self.log.info("conductor.stopped", snapshot=self.snapshot())
        return self.snapshot()

    # -- start sequence steps --------------------------------------------------

    def _register(self) -> tuple[str, str | None]:
        error = self._heartbeat_once()
        if error is None:
            return "ok", None
        self._apply(self.machine.register_failed())
        return "failed", error

    def _first_lease_cycle(self) -> tuple[str, str | None]:
        error = self._lease_cycle(wait=False)
        if error is not None:
            return "failed", error
        m = self.machine
        return "ok", f"{m.state} (leader {m.current_leader_id}, term {m.current_term})"

    def _start_loops(self) -> tuple[str, str | None]:
        cfg = self.config
        self._spawn_loop("heartbeat", cfg.heartbeat_interval_ms, self._heartbeat_once)
        self._spawn_loop("lease", cfg.lease_renew_interval_ms, self._lease_iteration)
        return "ok", None

    def _scheduler_step(self) -> tuple[str, str | None]:
        if self.machine.scheduler_enabled(self.clock()):
            return "ok", f"leader of term {self.machine.current_term}: scheduler enabled"
        return "ok", f"{self.machine.state}: scheduler refused"

    # -- loop iterations -------------------------------------------------------

    def _heartbeat_value(self) -> Heartbeat:
        cfg = self.config
        return Heartbeat(
            controller_id=cfg.node_id,
            host=cfg.host,
            role=cfg.role,
            priority=cfg.priority,
            status=str(self.machine.state),
            version=cfg.controller_version,
            heartbeat_at=int(self.wall()),
            started_at=int(self.started_at),
            instance_id=self.instance_id,
            one_shot=self.one_shot or None,
        )

    def _heartbeat_once(self) -> str | None:
        """Send one heartbeat; returns the error text on failure.

        Skipped (a success) while a heartbeat that rode along on a lease call was recorded
        within the last heartbeat interval: an idle node then makes one call per interval, not
        two. The start sequence's registration is never skipped (nothing has ridden yet).
        """
        ridden = self._heartbeat_ridden_at
        if ridden is not None and self.clock() - ridden < self.config.heartbeat_interval_ms / 1e3:
            return None
        try:
            self.client.heartbeat(self._heartbeat_value())
        except ControlApiError as exc:
            error = str(exc)
            self.heartbeat_failures_total += 1
            self.machine.heartbeat_failed(error)
            self._heartbeat_streak.failed(error)
            return error
        self.machine.heartbeat_succeeded(wall_time=self.wall())
        self._heartbeat_streak.succeeded()
        return None

    def _lease_iteration(self) -> None:
        self._lease_cycle(wait=True)

    def _lease_cycle(self, *, wait: bool) -> str | None:
        """One acquire/renew call; returns the error text on failure."""
        cfg = self.config
        m = self.machine
        # A standby may long-poll (SPEC §12); a leader, or a node renewing a grant it could
        # not use, never waits (the same rule the simulator paces by).
        long_poll = wait and pacing.long_polls(m)
        sent_at = self.clock()
        try:
            try:
                result = self._acquire(cfg.lease_renew_interval_ms if long_poll else None)
            except ControlApiError as exc:
                if not (long_poll and exc.status == 429):
                    raise
                # The server has no room to park us: ask once more without waiting, so a
                # full waiter list never degrades a healthy standby.
                long_poll = False
                sent_at = self.clock()
                result = self._acquire(None)
        except ControlApiError as exc:
            error = str(exc)
            self.renew_failures_total += 1
            self._renew_streak.failed(error)
            self._apply(m.lease_failed(error, now=self.clock()))
            return error
        finally:
            self._long_polled = long_poll
        self._renew_streak.succeeded()
        self.last_renew_at = self.wall()
        if result.heartbeat_recorded:
            # The server took the heartbeat that rode along (recorded when it arrived).
            self._heartbeat_ridden_at = sent_at
            self.machine.heartbeat_succeeded(wall_time=self.wall())
            self._heartbeat_streak.succeeded()
        if result.is_leader and result.granted:
            # Only the server's own "acquire": a missing `operation` is no proof (wire.py).
            self._granted_terms.add(result.term)
        self._apply(m.lease_succeeded(result, sent_at=sent_at, now=self.clock()))
        if result.instance_conflict:
            self._log_identity_conflict(result)
        else:
            self._conflict_logged = None
        self._arm_deadline()
        self._lead_work()
        return None

    def _log_identity_conflict(self, result: Any) -> None:
        """`lease.identity_conflict`: first sighting, a new conflicting instance, then once a
        minute while it lasts."""
        now = self.clock()
        last = self._conflict_logged
        if (
            last is not None
            and last[0] == result.holder_instance_id
            and now - last[1] < FAILURE_REMINDER_S
        ):
            return
        self._conflict_logged = (result.holder_instance_id, now)
        self.log.warning(
            "lease.identity_conflict",
            node_id=self.config.node_id,
            instance_id=self.instance_id,
            holder_instance_id=result.holder_instance_id,
            holder_host=result.holder_host,
            term=result.term,
            message=(
                "another process with this node id holds the lease; this one stays standby"
                " until it is released or expires (give every process its own --node-id)"
            ),
        )

    def _acquire(self, wait_ms: int | None) -> Any:
        cfg = self.config
        return self.client.acquire_leader_lease(
            controller_id=cfg.node_id,
            host=cfg.host,
            ttl_sec=cfg.lease_ttl_sec,
            preferred=cfg.preferred,
            now=int(self.wall()),
            wait_ms=wait_ms,
            instance_id=self.instance_id,
            one_shot=self.one_shot or None,
            # One-shot runs send their own registration heartbeat and nothing more.
            heartbeat=None if self.one_shot else self._heartbeat_value(),
        )

    # -- leader-only work (SPEC §14) ------------------------------------------

    def _scheduler_context(self) -> SchedulerContext | None:
        """The context of a pass that may run now, or None when this node may not schedule."""
        self.refresh()
        m = self.machine
        if not m.scheduler_enabled(self.clock()):
            return None
        assert m.current_term is not None
        term = m.current_term
        return SchedulerContext(
            controller_id=self.config.node_id,
            host=self.config.host,
            term=term,
            leader_check=lambda: self.still_leader(term),
        )

    def _lead_work(self) -> None:
        """After a lease cycle: while leader, hand the work the lease and its deadlines."""
        m = self.machine
        if not self._working or not m.scheduler_enabled(self.clock()):
            return
        self._leading.set()
        if self.exec_supervisor is not None:
            assert m.current_term is not None and m.valid_until is not None
            # valid_until = send time + TTL - margin; the lease itself ends a margin later.
            self._exec_call(
                self.exec_supervisor.lead, m.current_term, m.valid_until, m.valid_until + m.margin_s
            )

    def _exec_call(self, action: Callable[..., Any], *args: Any) -> None:
        """Call the exec supervisor; its failure is a crash (the stop then ends the group)."""
        try:
            action(*args)
        except Exception as exc:
            self.crash(exc)

    def _stop_exec(self) -> bool:
        """Wait until the --exec group is gone (True), or report that it may not be."""
        sup = self.exec_supervisor
        if sup is None:
            return True
        try:
            # Returns by stop grace + 1 s after the `lose("stopping")` at the start of `stop`
            # (the release then still has about a request timeout of the stop budget).
            gone = sup.stop()
        except Exception as exc:
            self.crash(exc)
            gone = False
        if not gone:
            self.log.error(
                "exec.stop_failed",
                pid=sup.snapshot()["pid"],
                message="the --exec process group could not be confirmed gone",
            )
            if self.crashed is None:
                self.crashed = RuntimeError("the --exec process group could not be confirmed gone")
        return gone

    def _stop_budget_s(self) -> float:
        """SPEC §5: request timeout + 1 s, and with --exec the stop grace on top (§14)."""
        budget = self.config.request_timeout_ms / 1000.0 + 1.0
        if self.exec_supervisor is not None:
            budget += self.config.exec_stop_grace_ms / 1000.0
        return budget

    def _run_scheduler(self) -> None:
        """The --scheduler greenlet: a pass every interval (start to start) while leader.

        One greenlet, so a pass never starts while the previous one runs; a pass that takes
        longer than the interval is followed by the next at once (`scheduler.overran`).
        """
        interval_s = self.config.scheduler_interval_ms / 1000.0
        while not self._stop_requested.is_set():
            if not self._leading.is_set():
                gevent.wait([self._leading, self._stop_requested], count=1)
                continue
            began = self.clock()
            self._scheduler_pass()
            elapsed = self.clock() - began
            overran = elapsed > interval_s
            if overran and not self._scheduler_overran:
                self.log.warning(
                    "scheduler.overran",
                    seconds=round(elapsed, 3),
                    interval_ms=self.config.scheduler_interval_ms,
                )
            self._scheduler_overran = overran
            if self._stop_requested.wait(max(interval_s - elapsed, 0.0)):
                return

    def _scheduler_pass(self) -> None:
        assert self.scheduler is not None
        context = self._scheduler_context()
        if context is None:
            self._leading.clear()  # stepped down since the last cycle; wait for the next grant
            return
        try:
            self.scheduler(context)
        except (Exception, SystemExit) as exc:  # the plug-in's failure, not the daemon's
            self.log.error(
                "scheduler.failed", term=context.term, error=f"{type(exc).__name__}: {exc}"
            )

    # -- machinery -------------------------------------------------------------

    def _spawn_loop(self, name: str, interval_ms: int, iteration: Callable[[], Any]) -> None:
        self.loop_progress[name] = self.clock()
        greenlet = self._group.spawn(self._run_loop, name, interval_ms / 1000.0, iteration)
        greenlet.link_exception(self._on_loop_crash)
        self._loops[name] = greenlet

    def _run_loop(self, name: str, interval_s: float, iteration: Callable[[], Any]) -> None:
        # The first iteration of each loop already ran in the start sequence (whose acquire
        # never waits); `pacing` decides every wait from there, the first one included.
        began = self.clock()
        after_start = True
        while True:
            remaining = self._pace(name, interval_s, self.clock() - began, after_start=after_start)
            after_start = False
            if remaining > 0:
                if self._stop_requested.wait(remaining):
                    return
            elif self._stop_requested.is_set():
                return
            began = self.clock()
            iteration()
            self.loop_progress[name] = self.clock()

    def _pace(
        self, name: str, interval_s: float, elapsed: float, *, after_start: bool = False
    ) -> float:
        """Seconds to wait before the next cycle (the rules are in `conductord.pacing`)."""
        if name != "lease":
            return pacing.loop_wait_s(interval_s, elapsed, self._rng)
        return pacing.lease_wait_s(
            self.machine,
            interval_s=interval_s,
            elapsed_s=elapsed,
            long_polled=self._long_polled,
            rng=self._rng,
            after_start=after_start,
        )

    def _loop_alive(self, name: str) -> bool:
        greenlet = self._loops.get(name)
        return greenlet is not None and not greenlet.dead

    def _on_loop_crash(self, greenlet: gevent.Greenlet) -> None:
        self.crash(greenlet.exception)

    def crash(self, exc: BaseException) -> None:
        """A bug surfaced (a loop or the start sequence raised): log it and stop the daemon.

        Never raises: the stop is requested first, and whatever fails while describing the
        crash (a snapshot, a log line) is swallowed, so the process always gets to exit 1
        instead of lingering without loops while /readyz still answers.
        """
        self._stop_requested.set()
        if self.crashed is None:
            self.crashed = exc
        try:
            error = f"{type(exc).__name__}: {exc}"
        except Exception:  # an exception whose str() raises
            error = type(exc).__name__
        try:
            snapshot: Any = self.snapshot()
        except Exception as inner:
            snapshot = {"identity": self.config.node_id, "error": f"no snapshot: {inner!r}"}
        with contextlib.suppress(Exception):
            self.log.error("conductor.crashed", error=error, snapshot=snapshot, exc_info=exc)

    def _arm_deadline(self) -> None:
        """Make sure the deadline greenlet watches the current `valid_until`."""
        if self.machine.valid_until is None or self._stopped:
            return
        self._deadline_moved.set()
        if self._deadline_timer is None or self._deadline_timer.dead:
            self._deadline_timer = gevent.spawn(self._watch_deadline)

    def _watch_deadline(self) -> None:
        """Step down when the local deadline passes, even while a renewal hangs.

        The wait is re-aimed from a fresh clock reading after every wake-up: a timer may fire
        a hair early (gevent arms it from the loop's cached time) or very late (after system
        sleep), and a renewal may move the deadline meanwhile.
        """
        while not self._stopped:
            valid_until = self.machine.valid_until
            if valid_until is None or self.machine.state is not LeaseState.LEADER:
                return
            remaining = valid_until - self.clock()
            if remaining <= 0:
                self._apply(self.machine.tick(self.clock()))
                return
            self._deadline_moved.clear()
            self._deadline_moved.wait(min(remaining, DEADLINE_POLL_S))

    def _apply(self, transition: Transition | None) -> None:
        if transition is None:
            return
        if transition.from_state is LeaseState.LEADER:  # a transition always changes the state
            self._leading.clear()
            if self.exec_supervisor is not None and not self.machine.stopping:  # stop told it
                reason = EXEC_LOSE_REASONS.get(transition.reason, "leadership_lost")
                self._exec_call(self.exec_supervisor.lose, reason)
        self.transitions_total[(str(transition.from_state), str(transition.to_state))] += 1
        snapshot = self.snapshot()
        level = "warning" if transition.to_state is LeaseState.DEGRADED else "info"
        getattr(self.log, level)(
            "lease.transition",
            **transition.as_fields(),
            last_error=self.machine.last_error,
            snapshot=snapshot,
        )
        for hook in self._state_hooks:
            try:
                hook(snapshot)
            except Exception as exc:
                self.log.error(
                    "hook.failed", hook=getattr(hook, "__name__", repr(hook)), error=str(exc)
                )

    def _release(self, term: int, budget_s: float) -> dict[str, Any]:
        try:
            with gevent.Timeout(
                budget_s,
                ControlApiError(
                    f"Control API /v1/leader/release: timed out after {int(budget_s * 1000)} ms",
                    path="/v1/leader/release",
                ),
            ):
                result = self.client.release_leader_lease(
                    controller_id=self.config.node_id,
                    term=term,
                    instance_id=self.instance_id,
                    one_shot=self.one_shot or None,
                )
        except ControlApiError as exc:
            return {"released": False, "supported": None, "error": str(exc)}
        return {"released": result.released, "supported": result.supported}


def install_signal_handlers(runtime: Runtime) -> None:
    """First SIGTERM/SIGINT: stop gracefully. A second one: exit at once."""

    def handle(signum: int) -> None:
        if runtime.stop_requested.is_set():
            runtime.log.warning("conductor.aborted", signal=signal.Signals(signum).name)
            os._exit(EXIT_FAILURE)
        runtime.log.info("conductor.signal", signal=signal.Signals(signum).name)
        runtime.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, handle, signum)


def run_start(config: Config, *, run_once: bool) -> int:
    """The `start` command. Returns the process exit code (SPEC §7)."""
    # With --run-once, stdout carries the snapshot document alone.
    log = logs.configure(
        level=config.log_level,
        stream=sys.stderr if run_once else sys.stdout,
        secrets=[config.shared_token],
        node_id=config.node_id,
        host=config.host,
        role=config.role,
    )
    if run_once:
        instance, one_shot = identity.ephemeral(), True
    else:
        try:
            instance, one_shot = identity.claim(config.paths.state_dir), False
        except identity.InstanceLockError as err:
            sys.stderr.write(f"conductord: error: {err}\n")
            return EXIT_USAGE
    runtime = Runtime(config, log=log, instance=instance, one_shot=one_shot)
    install_signal_handlers(runtime)
    return _run(runtime, run_once=run_once)


def _run(runtime: Runtime, *, run_once: bool) -> int:
    log = runtime.log
    for warning in runtime.warnings:
        log.warning("config.warning", message=warning)
    if not run_once:
        # Several URLs (SPEC §17): one bounded look, beside the start sequence, at whether any
        # answers from SQLite, which no second process can share (config.warning if so).
        endpoints.warn_about_stores(runtime)
    # Bound before the start sequence so a taken port fails fast; not for --run-once, whose
    # short life would only collide with a daemon already serving the same port.
    status_server = None
    if runtime.config.local_api_base is not None and not run_once:
        status_server = StatusServer(runtime, runtime.config.local_api_base)
        try:
            status_server.start()
        except StatusServerError as err:
            sys.stderr.write(f"conductord: error: {err}\n")
            return EXIT_USAGE
    try:
        return _serve(runtime, run_once=run_once)
    finally:
        if status_server is not None:
            status_server.stop()


def _serve(runtime: Runtime, *, run_once: bool) -> int:
    log = runtime.log
    log.info("conductor.starting", snapshot=runtime.snapshot())
    document: dict[str, Any] | None = None
    try:
        starter = gevent.spawn(runtime.start, loops=not run_once, work=False)
        gevent.wait([starter, runtime.stop_requested], count=1)
        if not starter.dead:  # a signal arrived during the start sequence
            starter.kill(block=True, timeout=1.0)
        elif starter.exception is not None:
            runtime.crash(starter.exception)
        else:
            log.info("conductor.started", snapshot=runtime.snapshot())
            if not run_once:
                runtime.begin_work()  # the start-time leader's work begins only now (§14)
        if run_once:
            document = runtime.snapshot()  # the state the node reached, before stopping
        else:
            runtime.stop_requested.wait()
    except Exception as exc:  # a bug, not an operator error: one log line, exit 1
        runtime.crash(exc)
    finally:
        runtime.stop()  # idempotent; releases a held lease whatever happened above

    if runtime.crashed is not None:
        return EXIT_FAILURE
    if document is not None:
        shown = clean(document, [runtime.config.shared_token])
        sys.stdout.write(json.dumps(shown, indent=2) + "\n")
        sys.stdout.flush()
        degraded = document["daemon"]["lease_state"] == str(LeaseState.DEGRADED)
        return EXIT_DEGRADED if degraded else EXIT_OK
    return EXIT_OK
