"""The pure lease state machine, driven by a fake monotonic clock (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conductord.lease import (
    STARTUP_CHECKLIST,
    LeaseMachine,
    LeaseState,
    Reason,
    default_margin_s,
    startup_checklist,
)

TTL = 30
MARGIN = 5.0


@dataclass(frozen=True)
class Answer:
    holder_id: str
    term: int
    lease_expires_at: float = 1130.0
    is_leader: bool = True
    operation: str = "acquire"
    instance_conflict: bool = False


def ours(term: int = 1, operation: str = "acquire") -> Answer:
    return Answer(holder_id="mini-main", term=term, operation=operation)


def theirs(term: int = 1) -> Answer:
    return Answer(holder_id="mini-standby", term=term, is_leader=False)


def machine(threshold: int = 2) -> LeaseMachine:
    return LeaseMachine(
        node_id="mini-main", lease_ttl_sec=TTL, renew_failure_threshold=threshold, margin_s=MARGIN
    )


def test_starts_as_standby_with_scheduler_off() -> None:
    m = machine()
    assert m.state is LeaseState.STANDBY
    assert not m.scheduler_enabled(0.0)
    status = m.status(0.0)
    assert status["lease_state"] == "standby"
    assert status["consecutive_renew_failures"] == 0
    assert status["current_term"] is None


def test_grant_makes_leader_and_enables_scheduler() -> None:
    m = machine()
    t = m.lease_succeeded(ours(term=3), sent_at=100.0, now=100.2)
    assert t is not None
    assert (t.from_state, t.to_state, t.reason) == (
        LeaseState.STANDBY,
        LeaseState.LEADER,
        Reason.ACQUIRED,
    )
    assert t.term == 3 and t.leader_id == "mini-main"
    assert m.scheduler_enabled(100.3)
    assert m.status(100.3)["last_lease_operation"] == "acquire"
    assert m.status(100.3)["lease_expires_at"] == 1130


def test_renewal_keeps_leader_without_a_transition() -> None:
    m = machine()
    m.lease_succeeded(ours(), sent_at=100.0, now=100.1)
    assert m.lease_succeeded(ours(operation="renew"), sent_at=105.0, now=105.1) is None
    assert m.state is LeaseState.LEADER
    assert m.status(105.1)["last_lease_operation"] == "renew"


def test_other_holder_makes_standby() -> None:
    m = machine()
    t = m.lease_succeeded(theirs(term=4), sent_at=1.0, now=1.1)
    # standby -> standby is no transition, but the leader and term are recorded
    assert t is None
    assert m.state is LeaseState.STANDBY
    assert m.current_leader_id == "mini-standby" and m.current_term == 4
    assert not m.scheduler_enabled(1.2)


def test_response_naming_another_holder_ends_leadership_at_once() -> None:
    m = machine()
    m.lease_succeeded(ours(term=1), sent_at=100.0, now=100.1)
    t = m.lease_succeeded(theirs(term=2), sent_at=101.0, now=101.1)
    assert t is not None and t.reason is Reason.HELD_BY_OTHER
    assert t.to_state is LeaseState.STANDBY and t.leader_id == "mini-standby" and t.term == 2
    # well inside the old local deadline, yet no scheduling
    assert not m.scheduler_enabled(101.2)


def test_is_leader_true_with_foreign_holder_is_not_trusted() -> None:
    m = machine()
    m.lease_succeeded(Answer(holder_id="someone-else", term=9, is_leader=True), sent_at=0, now=0)
    assert m.state is LeaseState.STANDBY
    assert not m.scheduler_enabled(0.1)


def test_repeated_renew_failures_degrade_after_the_configured_threshold() -> None:
    # The seed's test: threshold 2, two failures -> degraded with the count recorded.
    m = machine(threshold=2)
    m.lease_succeeded(ours(), sent_at=100.0, now=100.1)
    assert m.lease_failed("boom 1", now=105.0) is None
    assert m.state is LeaseState.LEADER
    assert m.consecutive_renew_failures == 1
    t = m.lease_failed("boom 2", now=110.0)
    assert t is not None and t.to_state is LeaseState.DEGRADED
    assert t.reason is Reason.RENEW_FAILURES
    assert m.status(110.0)["consecutive_renew_failures"] == 2
    assert m.last_error == "boom 2"
    assert not m.scheduler_enabled(110.0)


def test_failures_below_threshold_keep_standby() -> None:
    m = machine(threshold=3)
    assert m.lease_failed("down", now=1.0) is None
    assert m.lease_failed("down", now=2.0) is None
    assert m.state is LeaseState.STANDBY
    assert m.lease_failed("down", now=3.0).to_state is LeaseState.DEGRADED


@pytest.mark.parametrize("answer,state", [(ours(), LeaseState.LEADER), (theirs(), "standby")])
def test_success_recovers_from_degraded(answer: Answer, state: str) -> None:
    m = machine(threshold=1)
    m.lease_failed("down", now=1.0)
    assert m.state is LeaseState.DEGRADED
    t = m.lease_succeeded(answer, sent_at=2.0, now=2.1)
    assert t is not None and t.from_state is LeaseState.DEGRADED and t.to_state == state
    assert m.consecutive_renew_failures == 0
    assert m.last_error is None


def test_leader_steps_down_by_time_while_renewals_hang() -> None:
    m = machine(threshold=100)
    m.lease_succeeded(ours(), sent_at=100.0, now=100.5)
    deadline = 100.0 + TTL - MARGIN
    assert m.tick(deadline - 0.001) is None
    assert m.scheduler_enabled(deadline - 0.001)
    # the scheduler gate closes exactly at the deadline, even before anyone ticks
    assert not m.scheduler_enabled(deadline)
    t = m.tick(deadline)
    assert t is not None and t.to_state is LeaseState.DEGRADED and t.reason is Reason.DEADLINE
    assert m.last_error


def test_deadline_counts_from_send_time_not_answer_time() -> None:
    m = machine()
    # answered 10 s after it was sent: the lease is valid for TTL - margin from the send
    m.lease_succeeded(ours(), sent_at=100.0, now=110.0)
    assert m.scheduler_enabled(124.9)
    assert not m.scheduler_enabled(125.0)


def test_failure_below_threshold_still_steps_down_past_deadline() -> None:
    m = machine(threshold=5)
    m.lease_succeeded(ours(), sent_at=0.0, now=0.1)
    t = m.lease_failed("timed out", now=TTL - MARGIN + 1)
    assert t is not None and t.reason is Reason.DEADLINE


def test_grant_arriving_after_local_deadline_is_not_used() -> None:
    m = machine()
    t = m.lease_succeeded(ours(term=7), sent_at=0.0, now=TTL - MARGIN)
    assert t is None  # stays standby
    assert m.state is LeaseState.STANDBY
    assert not m.scheduler_enabled(TTL - MARGIN)
    assert m.needs_prompt_renew()
    # the prompt renewal works normally
    t = m.lease_succeeded(ours(term=7, operation="renew"), sent_at=26.0, now=26.1)
    assert t is not None and t.to_state is LeaseState.LEADER
    assert not m.needs_prompt_renew()


def test_late_grant_demotes_a_leader() -> None:
    m = machine()
    m.lease_succeeded(ours(), sent_at=0.0, now=0.1)
    t = m.lease_succeeded(ours(operation="renew"), sent_at=1.0, now=1.0 + TTL)
    assert t is not None and t.reason is Reason.LATE_GRANT
    assert not m.scheduler_enabled(1.0 + TTL)


def test_wall_clock_is_never_consulted() -> None:
    # lease_expires_at (server wall time) far in the future must not extend local validity
    m = machine()
    m.lease_succeeded(Answer("mini-main", 1, lease_expires_at=10**12), sent_at=0.0, now=0.0)
    assert not m.scheduler_enabled(TTL - MARGIN)


def test_heartbeat_failures_never_change_the_lease_state() -> None:
    m = machine()
    m.lease_succeeded(ours(), sent_at=0.0, now=0.1)
    for _ in range(10):
        m.heartbeat_failed("hb down")
    assert m.state is LeaseState.LEADER
    assert m.consecutive_heartbeat_failures == 10
    assert m.last_error == "hb down"
    m.heartbeat_succeeded(wall_time=1234.9)
    assert m.consecutive_heartbeat_failures == 0
    assert m.status(1.0)["last_heartbeat_at"] == 1234
    assert m.last_error is None


def test_lease_success_keeps_a_heartbeat_error_visible() -> None:
    m = machine()
    m.heartbeat_failed("Control API /v1/controllers/heartbeat: connection failed: refused")
    m.register_failed()
    assert m.state is LeaseState.DEGRADED
    t = m.lease_succeeded(ours(), sent_at=0.0, now=0.1)
    assert t is not None and t.to_state is LeaseState.LEADER
    assert m.consecutive_heartbeat_failures == 1
    assert "heartbeat" in m.last_error


def test_register_failure_degrades_with_reason() -> None:
    m = machine()
    m.heartbeat_failed("nope")
    t = m.register_failed()
    assert t is not None and t.reason is Reason.REGISTER_FAILED
    assert t.as_fields() == {
        "from_state": "standby",
        "to_state": "degraded",
        "reason": "register_failed",
        "term": None,
        "leader_id": None,
    }


def test_stop_disables_scheduler_first_then_moves_to_standby() -> None:
    m = machine()
    m.lease_succeeded(ours(term=5), sent_at=0.0, now=0.1)
    m.begin_stop()
    assert not m.scheduler_enabled(0.2)
    assert m.state is LeaseState.LEADER
    assert m.held_term == 5
    t = m.stopped()
    assert t is not None and t.reason is Reason.STOPPING and t.to_state is LeaseState.STANDBY
    assert t.term == 5
    assert m.stopped() is None  # idempotent


def test_margin_defaults() -> None:
    assert default_margin_s(5000, 30) == 5.0
    assert default_margin_s(250, 30) == 1.0  # at least 1 s
    assert default_margin_s(250, 1) == 0.5  # never more than half the TTL
    with pytest.raises(ValueError):
        LeaseMachine(node_id="n", lease_ttl_sec=1, renew_failure_threshold=1, margin_s=1.0)


def test_checklist_order_is_the_start_sequence() -> None:
    keys = [item["key"] for item in startup_checklist()]
    assert keys == [
        "register-controller",
        "acquire-lease",
        "load-runs",
        "reconcile-runs",
        "start-heartbeat-loop",
        "start-scheduler",
    ]
    assert len(STARTUP_CHECKLIST) == 6


def test_prompt_renewal_is_one_shot_and_never_follows_a_step_down():
    # A leader that stepped down (by deadline or by count) still holds its term for the
    # release on stop, but must not renew back to back: that would spin against a dead API.
    m = machine(threshold=2)
    m.lease_succeeded(ours(term=3), sent_at=0.0, now=0.1)
    m.tick(TTL - MARGIN)
    assert m.state is LeaseState.DEGRADED and m.held_term == 3
    assert not m.needs_prompt_renew()
    m.lease_failed("refused", now=TTL)
    assert not m.needs_prompt_renew()
    # a late grant asks for one prompt retry; a failure of that retry returns to the pace
    m.lease_succeeded(ours(term=3), sent_at=100.0, now=100.0 + TTL)
    assert m.needs_prompt_renew()
    m.lease_failed("refused", now=131.0)
    assert not m.needs_prompt_renew()
