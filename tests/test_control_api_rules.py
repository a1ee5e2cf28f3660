"""Unit tests of the pure lease rules (no I/O, times are plain floats)."""

from __future__ import annotations

import pytest

from conductord.control_api.rules import (
    LEASE_NAME,
    LeaseRow,
    decide_acquire,
    decide_release,
)


def acquire(
    row,
    controller_id="a",
    *,
    now,
    ttl=10,
    preferred=False,
    host=None,
    metadata=None,
    wall=None,
    instance=None,
):
    return decide_acquire(
        row,
        controller_id=controller_id,
        host=host or f"{controller_id}-host",
        ttl_sec=ttl,
        preferred=preferred,
        metadata_json=metadata,
        now=now,
        wall=wall,
        instance_id=instance,
    )


def test_first_acquire_takes_term_one_with_subsecond_expiry():
    decision = acquire(None, "a", now=100.25, ttl=3)
    assert decision.operation == "acquire"
    assert decision.is_leader is True
    assert decision.takeover is False
    assert decision.previous is None
    assert decision.changed
    row = decision.row
    assert row.lease_name == LEASE_NAME
    assert (row.holder_id, row.holder_host, row.term) == ("a", "a-host", 1)
    assert row.lease_expires_at == pytest.approx(103.25)
    assert row.renewed_at == pytest.approx(100.25)
    assert row.released is False


def test_holder_renews_same_term_with_new_expiry_and_new_host():
    first = acquire(None, "a", now=100.0).row
    decision = acquire(first, "a", now=105.5, ttl=10, host="a-new-host")
    assert decision.operation == "renew"
    assert decision.is_leader is True
    assert decision.row.term == 1
    assert decision.row.lease_expires_at == pytest.approx(115.5)
    assert decision.row.renewed_at == pytest.approx(105.5)
    assert decision.row.holder_host == "a-new-host"


def test_renew_keeps_metadata_unless_given():
    first = acquire(None, "a", now=100.0, metadata='{"v":1}').row
    assert acquire(first, "a", now=101.0).row.metadata_json == '{"v":1}'
    assert acquire(first, "a", now=101.0, metadata='{"v":2}').row.metadata_json == '{"v":2}'


def test_other_controller_is_denied_while_lease_is_live():
    held = acquire(None, "a", now=100.0, ttl=10).row
    decision = acquire(held, "b", now=109.999)
    assert decision.operation == "deny"
    assert decision.is_leader is False
    assert decision.takeover is False
    assert decision.row == held
    assert not decision.changed


def test_expiry_is_exact_to_the_subsecond():
    held = acquire(None, "a", now=100.0, ttl=1).row  # expires at 101.0
    assert acquire(held, "b", now=100.9).operation == "deny"
    decision = acquire(held, "b", now=101.0)
    assert decision.operation == "acquire"
    assert decision.row.term == 2


def test_takeover_after_expiry_grows_the_term():
    held = acquire(None, "a", now=100.0, ttl=5).row
    decision = acquire(held, "b", now=106.0)
    assert decision.operation == "acquire"
    assert decision.is_leader is True
    assert decision.takeover is True
    assert decision.previous == held
    assert (decision.row.holder_id, decision.row.term) == ("b", 2)
    assert decision.row.lease_expires_at == pytest.approx(116.0)


def test_own_expired_lease_is_reacquired_with_a_new_term():
    held = acquire(None, "a", now=100.0, ttl=5).row
    decision = acquire(held, "a", now=200.0)
    assert decision.operation == "acquire"
    assert decision.row.term == 2
    assert decision.takeover is False


def test_restarted_holder_with_same_id_resumes_its_live_lease():
    held = acquire(None, "a", now=100.0, ttl=30).row
    decision = acquire(held, "a", now=101.0, host="a-host")
    assert decision.operation == "renew"
    assert decision.row.term == held.term


def test_terms_only_grow_over_many_handovers():
    row = None
    terms = []
    now = 0.0
    for i in range(20):
        now += 11.0  # past the previous lease's expiry
        row = acquire(row, f"node-{i % 3}", now=now, ttl=10).row
        terms.append(row.term)
        if i % 2:
            row = decide_release(row, controller_id=row.holder_id, term=row.term, now=now).row
    assert terms == list(range(1, 21))


def test_release_by_holder_expires_at_once_and_keeps_the_term():
    held = acquire(None, "a", now=100.0, ttl=30).row
    decision = decide_release(held, controller_id="a", term=1, now=101.5)
    assert decision.released is True
    assert decision.changed
    assert decision.row.released is True
    assert decision.row.term == 1
    assert decision.row.holder_id == "a"
    assert decision.row.lease_expires_at == pytest.approx(101.5)
    assert not decision.row.is_live(101.5)
    # The next acquire, by anyone, is the next term, and is not a takeover.
    after = acquire(decision.row, "b", now=101.6)
    assert (after.operation, after.row.term, after.takeover) == ("acquire", 2, False)


def test_release_is_idempotent_for_the_holder():
    held = acquire(None, "a", now=100.0).row
    once = decide_release(held, controller_id="a", term=1, now=101.0).row
    twice = decide_release(once, controller_id="a", term=1, now=102.0)
    assert twice.released is True
    assert twice.row.lease_expires_at == pytest.approx(101.0)
    assert not twice.changed


@pytest.mark.parametrize(
    ("controller_id", "term"),
    [("b", 1), ("a", 2), ("a", 0)],
    ids=["other-controller", "future-term", "past-term"],
)
def test_release_by_anyone_but_the_holder_of_that_term_changes_nothing(controller_id, term):
    held = acquire(None, "a", now=100.0).row
    decision = decide_release(held, controller_id=controller_id, term=term, now=101.0)
    assert decision.released is False
    assert decision.row == held
    assert not decision.changed


def test_release_of_a_stale_term_after_takeover_changes_nothing():
    first = acquire(None, "a", now=100.0, ttl=5).row
    second = acquire(first, "b", now=110.0).row
    decision = decide_release(second, controller_id="a", term=1, now=111.0)
    assert decision.released is False
    assert decision.row.is_live(111.0)


def test_release_without_any_lease():
    decision = decide_release(None, controller_id="a", term=1, now=1.0)
    assert (decision.row, decision.released, decision.changed) == (None, False, False)


def test_preferred_is_recorded_but_never_preempts_a_live_holder():
    held = acquire(None, "standby", now=100.0).row
    decision = acquire(held, "primary", now=101.0, preferred=True)
    assert decision.operation == "deny"
    assert decision.row.holder_id == "standby"
    assert decision.row.preferred_holder_id == "primary"
    assert decision.changed  # the preference is written, the holder is not


def test_preference_is_kept_by_others_and_dropped_by_its_owner():
    row = acquire(None, "p", now=100.0, preferred=True).row
    assert row.preferred_holder_id == "p"
    assert acquire(row, "p", now=101.0, preferred=True).row.preferred_holder_id == "p"
    assert acquire(row, "s", now=101.0).row.preferred_holder_id == "p"
    assert acquire(row, "p", now=101.0, preferred=False).row.preferred_holder_id is None


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError):
        acquire(None, "a", now=1.0, ttl=0)
    with pytest.raises(ValueError):
        acquire(None, "", now=1.0)


def test_is_live_boundaries():
    row = LeaseRow(LEASE_NAME, "a", "h", 1, lease_expires_at=10.5, renewed_at=0.5)
    assert row.is_live(10.49)
    assert not row.is_live(10.5)


# -- two clocks (SPEC §15) -------------------------------------------------------------------


def test_expiry_is_decided_on_the_decision_clock_never_on_the_wall_clock():
    # The decision clock says 100; the wall clock (display only) says anything at all.
    held = acquire(None, "a", now=100.0, wall=1_700_000_000.0, ttl=10).row
    assert (held.deadline, held.lease_expires_at) == (110.0, 1_700_000_010.0)
    # A +60 s wall step changes nothing: still live on the decision clock.
    stepped = acquire(held, "b", now=105.0, wall=1_700_000_065.0)
    assert (stepped.operation, stepped.is_leader) == ("deny", False)
    # A -60 s wall step does not lengthen it either.
    back = acquire(held, "b", now=110.0, wall=1_699_999_950.0)
    assert (back.operation, back.row.term) == ("acquire", 2)
    assert back.row.renewed_at == 1_699_999_950.0


def test_release_ends_the_lease_on_both_clocks():
    held = acquire(None, "a", now=100.0, wall=5000.0, ttl=30).row
    released = decide_release(held, controller_id="a", term=1, now=101.0, wall=5001.0).row
    assert (released.deadline, released.lease_expires_at) == (101.0, 5001.0)
    assert not released.is_live(101.0)


# -- instances (SPEC §15) --------------------------------------------------------------------


def test_another_instance_of_the_holders_id_is_refused_and_changes_nothing():
    held = acquire(None, "a", now=100.0, instance="i-1").row
    assert held.holder_instance_id == "i-1"
    decision = acquire(held, "a", now=101.0, instance="i-2")
    assert (decision.operation, decision.is_leader, decision.conflict) == ("deny", False, True)
    assert decision.row == held and not decision.changed
    assert decision.holder_change == "instance_conflict"
    # The holder's own instance renews as usual.
    ours = acquire(held, "a", now=101.0, instance="i-1")
    assert (ours.operation, ours.conflict, ours.holder_change) == ("renew", False, None)


def test_once_the_conflicting_lease_ends_the_other_instance_may_acquire():
    held = acquire(None, "a", now=100.0, ttl=10, instance="i-1").row
    after = acquire(held, "a", now=110.0, instance="i-2")
    assert (after.operation, after.row.term, after.row.holder_instance_id) == ("acquire", 2, "i-2")
    released = decide_release(held, controller_id="a", term=1, now=101.0, instance_id="i-1").row
    again = acquire(released, "a", now=101.5, instance="i-2")
    assert (again.operation, again.row.term) == ("acquire", 2)


def test_a_side_without_an_instance_conflicts_with_nothing():
    # An older node (no instance id) renews a row held by a known instance, and the row keeps
    # that instance; a row without one is claimed by the first instance that renews it.
    held = acquire(None, "a", now=100.0, instance="i-1").row
    old_node = acquire(held, "a", now=101.0)
    assert (old_node.operation, old_node.row.holder_instance_id) == ("renew", "i-1")
    unknown = acquire(None, "a", now=100.0).row
    claimed = acquire(unknown, "a", now=101.0, instance="i-9")
    assert (claimed.operation, claimed.row.holder_instance_id) == ("renew", "i-9")


def test_release_from_another_instance_is_refused():
    held = acquire(None, "a", now=100.0, instance="i-1").row
    refused = decide_release(held, controller_id="a", term=1, now=101.0, instance_id="i-2")
    assert (refused.released, refused.conflict, refused.changed) == (False, True, False)
    assert refused.row.is_live(101.0)
    ok = decide_release(held, controller_id="a", term=1, now=101.0, instance_id="i-1")
    assert (ok.released, ok.conflict) == (True, False)


def test_holder_changes_for_the_history():
    first = acquire(None, "a", now=100.0, ttl=5)
    assert first.holder_change == "granted"
    assert acquire(first.row, "a", now=101.0).holder_change is None  # a renewal
    assert acquire(first.row, "b", now=101.0).holder_change is None  # a denial
    assert acquire(first.row, "b", now=106.0).holder_change == "taken_over"
