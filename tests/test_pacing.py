"""The loops' pacing rules (SPEC §5, §12), pure, with a seeded RNG and a fake lease clock.

The runtime and the fleet simulator both call `conductord.pacing`; these tests pin the rules
themselves, `test_runtime.py` / `test_daemon.py` the runtime's use of them and `test_sim.py`
the simulator's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from conductord import pacing
from conductord.lease import JITTER, LeaseMachine, LeaseState

TTL = 30
INTERVAL = 5.0


@dataclass(frozen=True)
class Answer:
    holder_id: str
    term: int = 1
    lease_expires_at: float = 0.0
    is_leader: bool = False
    operation: str = "acquire"
    instance_conflict: bool = False


def machine() -> LeaseMachine:
    return LeaseMachine(node_id="n1", lease_ttl_sec=TTL, renew_failure_threshold=2, margin_s=5.0)


def leader() -> LeaseMachine:
    m = machine()
    m.lease_succeeded(Answer("n1", is_leader=True), sent_at=100.0, now=100.1)
    assert m.state is LeaseState.LEADER
    return m


def standby() -> LeaseMachine:
    m = machine()
    m.lease_succeeded(Answer("other"), sent_at=100.0, now=100.1)
    assert m.state is LeaseState.STANDBY
    return m


def failed(m: LeaseMachine) -> LeaseMachine:
    m.lease_failed("Control API /v1/leader/acquire: connection refused", now=101.0)
    return m


def late_grant() -> LeaseMachine:
    m = machine()
    m.lease_succeeded(Answer("n1", is_leader=True), sent_at=100.0, now=100.0 + TTL)
    assert m.needs_prompt_renew()
    return m


def wait(m: LeaseMachine, elapsed: float, *, long_polled: bool = False, **kw: bool) -> float:
    return pacing.lease_wait_s(
        m,
        interval_s=INTERVAL,
        elapsed_s=elapsed,
        long_polled=long_polled,
        rng=random.Random(1),
        **kw,
    )


def test_start_to_start_with_ten_percent_jitter_seeded() -> None:
    rng = random.Random(42)
    waits = [pacing.loop_wait_s(INTERVAL, 1.0, rng) for _ in range(2000)]
    # one interval ±10 % from the previous start, the cycle's own 1 s already spent
    assert all(INTERVAL * (1 - JITTER) - 1.0 <= w <= INTERVAL * (1 + JITTER) - 1.0 for w in waits)
    assert min(waits) < 3.52 and max(waits) > 4.48  # the whole spread is used
    again = random.Random(42)
    assert waits == [pacing.loop_wait_s(INTERVAL, 1.0, again) for _ in range(2000)]


def test_a_cycle_that_overran_its_interval_is_followed_at_once_never_by_a_negative_wait() -> None:
    rng = random.Random(3)
    assert pacing.loop_wait_s(INTERVAL, INTERVAL * 1.2, rng) == 0.0
    assert wait(leader(), INTERVAL * 3) == 0.0


def test_a_leader_renews_every_interval_and_never_long_polls() -> None:
    m = leader()
    assert not pacing.long_polls(m)
    assert 4.4 <= wait(m, 0.1) <= 5.4
    # even a renewal that took most of an interval waits out the rest, long_polled or not
    assert 0.0 < wait(m, 4.4, long_polled=False) <= 1.1


def test_a_standby_held_for_the_whole_wait_re_parks_at_once() -> None:
    m = standby()
    assert pacing.long_polls(m)
    assert wait(m, INTERVAL + 0.01, long_polled=True) == 0.0
    assert wait(m, INTERVAL * (1 - JITTER), long_polled=True) == 0.0
    # the same elapsed time without a long-poll is an ordinary slow cycle
    assert wait(m, INTERVAL * (1 - JITTER), long_polled=False) > 0.0


def test_a_server_that_ignores_wait_ms_keeps_the_interval() -> None:
    m = standby()
    assert 4.4 <= wait(m, 0.01, long_polled=True) <= 5.5


def test_a_failing_long_poll_gets_the_normal_pace() -> None:
    m = failed(standby())
    assert 4.4 <= wait(m, 0.01, long_polled=True) <= 5.5  # refused at once: never a spin
    # failed after most of the wait (a proxy cut it, a 503): not a re-park but start to start
    held = INTERVAL * (1 - JITTER) + 0.05
    assert wait(m, held, long_polled=True) == pacing.loop_wait_s(INTERVAL, held, random.Random(1))
    assert wait(m, held, long_polled=True) > 0.0
    # a long-poll that timed out (wait + request timeout) overran: the next cycle at once
    assert wait(m, INTERVAL + 5.0, long_polled=True) == 0.0


def test_a_late_grant_is_renewed_at_once_once() -> None:
    m = late_grant()
    assert not pacing.long_polls(m)  # the prompt renewal never waits on the server
    assert wait(m, 0.01) == 0.0
    failed(m)  # the prompt renewal failed: back to the interval
    assert not m.needs_prompt_renew()
    assert 4.4 <= wait(m, 0.01) <= 5.5


def test_after_the_start_sequence_a_standby_parks_at_once() -> None:
    assert wait(standby(), 0.0, after_start=True) == 0.0
    # a leader renews an interval later; so does a node whose first acquire failed
    assert 4.4 <= wait(leader(), 0.0, after_start=True) <= 5.5
    assert 4.4 <= wait(failed(machine()), 0.0, after_start=True) <= 5.5
    # the park is for the first wait only
    assert 4.4 <= wait(standby(), 0.0) <= 5.5


def test_never_a_spin_over_a_random_script_of_outcomes() -> None:
    """Drive the rules through a seeded random mix of answers, failures, late grants and
    long-polls; the loop never starts more than three cycles within one interval."""
    rng = random.Random(2026)
    m = machine()
    now = 1000.0
    starts: list[float] = []
    long_polled = False
    after_start = True
    for _ in range(5000):
        elapsed = now - starts[-1] if starts else 0.0
        now += pacing.lease_wait_s(
            m,
            interval_s=INTERVAL,
            elapsed_s=elapsed,
            long_polled=long_polled,
            rng=rng,
            after_start=after_start,
        )
        after_start = False
        starts.append(now)
        long_polled = pacing.long_polls(m)
        outcome = rng.choice(("refused", "timeout", "held", "ours", "theirs", "late"))
        if outcome == "refused":
            now += rng.uniform(0.0, 0.01)
            m.lease_failed("refused", now=now)
        elif outcome == "timeout":
            now += 5.0 + (INTERVAL if long_polled else 0.0)
            m.lease_failed("timed out", now=now)
        elif outcome == "late":
            sent, now = now, now + TTL
            m.lease_succeeded(Answer("n1", is_leader=True), sent_at=sent, now=now)
        else:
            sent = now
            held = outcome == "held" and long_polled
            now += (INTERVAL if held else 0.0) + rng.uniform(0.0, 0.02)
            answer = Answer("n1", is_leader=True) if outcome == "ours" else Answer("other")
            m.lease_succeeded(answer, sent_at=sent, now=now)
    worst = max(
        sum(1 for s in starts[i : i + 10] if s < start + INTERVAL)
        for i, start in enumerate(starts)
    )
    assert worst <= 3, worst
