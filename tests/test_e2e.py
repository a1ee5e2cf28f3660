"""End to end: several `conductord start` nodes against the real reference Control API.

Short timings (TTL 2 s, renew 250 ms). Every node is a real subprocess; failover is driven
with real signals. Scheduler-enabled intervals come from each node's own log lines.
"""

from __future__ import annotations

import signal
import time

import pytest
import requests

from tests.support.daemon import DaemonProcess, overlap_seconds, parse_ts, scheduler_intervals

TTL = 2.0
RENEW = 0.25
SLACK = 1.0  # process start-up, log pipes and a loaded CI machine


def start_node(control_api, node_id: str, role: str, *extra: str) -> DaemonProcess:
    return DaemonProcess(
        [
            *extra,
            "--node-id",
            node_id,
            "--role",
            role,
            "--host",
            "127.0.0.1",
            "--control-api-base",
            control_api.url,
            "--shared-token",
            control_api.token,
            "--heartbeat-interval-ms",
            "500",
            "--lease-renew-interval-ms",
            str(int(RENEW * 1000)),
            "--lease-ttl-sec",
            str(int(TTL)),
            "--request-timeout-ms",
            "1000",
        ]
    )


@pytest.fixture
def fleet(control_api):
    nodes: list[DaemonProcess] = []

    def start(node_id: str, role: str, *extra: str) -> DaemonProcess:
        node = start_node(control_api, node_id, role, *extra)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.close()


def test_primary_leads_and_standby_takes_over_after_kill_9(control_api, fleet):
    primary = fleet("mini-main", "primary")
    primary.transition_to("leader")
    standby = fleet("mini-standby", "standby")
    started = standby.wait_event("conductor.started")
    assert started["snapshot"]["daemon"]["lease_state"] == "standby"
    assert started["snapshot"]["daemon"]["current_leader_id"] == "mini-main"

    killed_at_wall, killed_at = time.time(), time.monotonic()
    primary.send(signal.SIGKILL)
    took_over = standby.transition_to("leader", timeout=TTL + RENEW + 10)
    assert took_over["term"] == 2
    assert took_over["_seen_at"] - killed_at < TTL + RENEW + SLACK
    assert took_over["_seen_at"] - killed_at > TTL - 1.0  # the lease really had to expire

    overlap = overlap_seconds(
        scheduler_intervals(primary.events, ended_at=killed_at_wall),
        scheduler_intervals(standby.events),
    )
    assert overlap == 0.0
    standby.send(signal.SIGTERM)
    assert standby.wait_exit() == 0


def test_sigterm_of_the_leader_hands_over_within_about_one_renew_interval(control_api, fleet):
    primary = fleet("mini-main", "primary")
    primary.transition_to("leader")
    standby = fleet("mini-standby", "standby")
    standby.wait_event("conductor.started")

    signalled_at = time.monotonic()
    primary.send(signal.SIGTERM)
    took_over = standby.transition_to("leader", timeout=10)
    assert primary.wait_exit() == 0
    assert took_over["_seen_at"] - signalled_at < RENEW + SLACK
    released = primary.named("lease.released")[0]
    assert released["released"] is True
    # the new leader's grant follows the old leader's stop line: never two schedulers
    stopping = primary.named("conductor.stopping")[0]
    assert parse_ts(stopping) <= parse_ts(took_over)
    assert (
        overlap_seconds(scheduler_intervals(primary.events), scheduler_intervals(standby.events))
        == 0.0
    )
    standby.send(signal.SIGTERM)
    assert standby.wait_exit() == 0


def test_restarted_leader_with_its_state_dir_resumes_its_unexpired_lease_at_once(
    control_api, fleet, tmp_path
):
    state = ("--state-dir", str(tmp_path / "state"))
    first = fleet("mini-main", "primary", *state)
    granted = first.transition_to("leader")
    instance = granted["snapshot"]["runtime"]["instance_id"]
    standby = fleet("mini-standby", "standby")
    standby.wait_event("conductor.started")
    first.send(signal.SIGKILL)
    first.wait_exit()
    again = fleet("mini-main", "primary", *state)
    resumed = again.wait_event("conductor.started", timeout=10)
    assert resumed["snapshot"]["runtime"]["instance_id"] == instance  # kept in the state dir
    daemon = resumed["snapshot"]["daemon"]
    assert daemon["lease_state"] == "leader"
    assert daemon["current_term"] == granted["term"]  # same term: a renewal, not a takeover
    assert daemon["last_lease_operation"] == "renew"
    assert not standby.named("lease.transition")  # the standby never led
    for node in (again, standby):
        node.send(signal.SIGTERM)
        assert node.wait_exit() == 0


def test_restarted_leader_without_a_state_dir_is_a_new_instance_and_waits_out_its_lease(
    control_api, fleet
):
    first = fleet("mini-main", "primary")
    granted = first.transition_to("leader")
    first.send(signal.SIGKILL)
    first.wait_exit()
    killed_at = time.monotonic()
    again = fleet("mini-main", "primary")
    started = again.wait_event("conductor.started", timeout=10)
    assert started["snapshot"]["daemon"]["lease_state"] == "standby"  # not its lease any more
    conflict = again.wait_event("lease.identity_conflict", timeout=5)
    assert conflict["holder_instance_id"] == granted["snapshot"]["runtime"]["instance_id"]
    took = again.transition_to("leader", timeout=TTL + SLACK + 5)
    assert took["term"] == granted["term"] + 1  # the old lease expired first
    assert took["_seen_at"] - killed_at > TTL - 1.0
    again.send(signal.SIGTERM)
    assert again.wait_exit() == 0


def test_three_nodes_one_leader_through_repeated_failovers(control_api, fleet):
    nodes = {"n1": fleet("n1", "primary")}
    nodes["n1"].transition_to("leader")
    nodes.update({name: fleet(name, "standby") for name in ("n2", "n3")})
    for node in nodes.values():
        node.wait_event("conductor.started")
    ended: dict[str, float] = {}
    leader = "n1"
    for _ in range(2):
        marks = {name: len(node.events) for name, node in nodes.items()}
        ended[leader] = time.time()
        nodes[leader].send(signal.SIGTERM)
        assert nodes[leader].wait_exit() == 0
        survivors = [n for n in nodes if n not in ended]
        deadline = time.monotonic() + 10
        new_leader = None
        while new_leader is None and time.monotonic() < deadline:
            for name in survivors:
                if any(
                    e.get("event") == "lease.transition" and e["to_state"] == "leader"
                    for e in nodes[name].events[marks[name] :]
                ):
                    new_leader = name
            time.sleep(0.05)
        assert new_leader is not None
        leader = new_leader
    intervals = [scheduler_intervals(node.events) for node in nodes.values()]
    assert overlap_seconds(*intervals) == 0.0
    terms = sorted(
        e["term"]
        for node in nodes.values()
        for e in node.named("lease.transition")
        if e["to_state"] == "leader"
    )
    assert terms == [1, 2, 3]
    nodes[leader].send(signal.SIGTERM)
    assert nodes[leader].wait_exit() == 0


def _heartbeat_requests(control_api) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{control_api.url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "conductord_control_api_requests":
            return sum(
                s.value
                for s in family.samples
                if s.name.endswith("_total") and s.labels["route"] == "/v1/controllers/heartbeat"
            )
    return 0.0


def test_heartbeats_ride_on_lease_calls_so_an_idle_node_makes_one_call_per_interval(
    control_api, fleet
):
    leader = fleet("mini-main", "primary", "--heartbeat-interval-ms", "250")
    leader.transition_to("leader")
    standby = fleet("mini-standby", "standby", "--heartbeat-interval-ms", "250")
    standby.wait_event("conductor.started")
    before = _heartbeat_requests(control_api)
    time.sleep(8 * RENEW)  # about 8 heartbeat intervals of each node
    separate = _heartbeat_requests(control_api) - before
    assert separate <= 2, separate  # without riding along: ~16 (2 nodes x 8 intervals)
    rows = requests.get(
        f"{control_api.url}/v1/controllers", headers=control_api.headers, timeout=5
    ).json()["data"]["controllers"]
    # Both still fresh on the server: the leader by its renewals, the standby by its
    # long-polls (recorded when they arrive).
    assert {r["controller_id"]: r["seconds_since_heartbeat"] < 3 * RENEW for r in rows} == {
        "mini-main": True,
        "mini-standby": True,
    }
    assert {r["controller_id"]: r["status"] for r in rows} == {
        "mini-main": "leader",
        "mini-standby": "standby",
    }
