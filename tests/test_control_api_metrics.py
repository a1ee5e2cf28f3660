"""The Control API's `GET /metrics` (SPEC §16), scraped from a real server over HTTP.

Each scrape is parsed with prometheus-client's own text parser; the counts must move as the
requests are made, the endpoint needs no token, and nothing secret or identifying (the token,
controller ids, hosts) is in it. A failing store and a parked long-poll are shown in process.
"""

from __future__ import annotations

import io
import json
import secrets
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conductord.control_api.app import ControlApiApp
from conductord.control_api.store import SqliteStore, StoreError
from conductord.logs import configure
from tests.support.control_api import ControlApiProcess

ACQUIRE = "/v1/leader/acquire"
RELEASE = "/v1/leader/release"
HEARTBEAT = "/v1/controllers/heartbeat"
PREFIX = "conductord_control_api_"


@pytest.fixture
def server(tmp_path):
    token = f"metrics-{secrets.token_hex(8)}"
    with ControlApiProcess(str(tmp_path / "control.sqlite3"), token=token).start() as api:
        yield api


def post(server, path, body):
    response = requests.post(server.url + path, json=body, headers=server.headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def acquire(server, controller_id, **extra):
    body = {"controller_id": controller_id, "host": f"{controller_id}-host", "ttl_sec": 10}
    return post(server, ACQUIRE, {**body, **extra})


class Scrape:
    """One parsed scrape: the samples by (name, labels) and the text itself."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in self.families.values()
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def labels(self, name: str, label: str) -> set[str]:
        return {dict(key[1])[label] for key in self.samples if key[0] == name}


def scrape(server) -> Scrape:
    response = requests.get(server.url + "/metrics", timeout=10)  # no token
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def test_metrics_need_no_token_and_count_requests_by_route_and_status(server):
    before = scrape(server)
    assert before.value(f"{PREFIX}lease_term") == 0
    assert before.value(f"{PREFIX}lease_live") == 0
    assert before.value(f"{PREFIX}waiters") == 0
    for reason in ("granted", "taken_over", "released", "instance_conflict"):
        assert (f"{PREFIX}holder_changes_total", (("reason", reason),)) in before.samples

    post(server, HEARTBEAT, {"controller_id": "node-a", "host": "mini-a"})
    assert acquire(server, "node-a")["is_leader"]
    assert acquire(server, "node-a")["operation"] == "renew"
    assert not acquire(server, "node-b")["is_leader"]
    live = scrape(server)
    assert live.value(f"{PREFIX}lease_term") == 1
    assert live.value(f"{PREFIX}lease_live") == 1
    assert 8 < live.value(f"{PREFIX}lease_seconds_left") <= 10

    assert post(server, RELEASE, {"controller_id": "node-a", "term": 1})["released"]
    assert requests.get(server.url + "/v1/leader", timeout=10).status_code == 401
    for path in ("/nope", f"/random/{secrets.token_hex(4)}"):
        assert requests.get(server.url + path, timeout=10).status_code == 404
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    requests_total = f"{PREFIX}requests_total"
    assert moved(requests_total, route=ACQUIRE, status="200") == 3
    assert moved(requests_total, route=RELEASE, status="200") == 1
    assert moved(requests_total, route=HEARTBEAT, status="200") == 1
    assert moved(requests_total, route="/v1/leader", status="401") == 1
    assert moved(requests_total, route="other", status="404") == 2  # one label for any path
    assert moved(requests_total, route="/metrics", status="200") == 2  # the scrapes between
    assert after.labels(requests_total, "route") <= {
        "/healthz", "/metrics", "other", ACQUIRE, RELEASE, HEARTBEAT, "/v1/leader",
    }
    duration = f"{PREFIX}request_duration_seconds"
    assert after.families[duration].type == "histogram"
    assert moved(f"{duration}_count", route=ACQUIRE) == 3
    assert moved(f"{duration}_bucket", route=ACQUIRE, le="+Inf") == 3
    assert 0 < moved(f"{duration}_sum", route=ACQUIRE) < 3

    changes = f"{PREFIX}holder_changes_total"
    assert moved(changes, reason="granted") == 1
    assert moved(changes, reason="released") == 1
    assert moved(changes, reason="taken_over") == 0
    assert after.value(f"{PREFIX}lease_term") == 1
    assert after.value(f"{PREFIX}lease_live") == 0
    assert after.value(f"{PREFIX}lease_seconds_left") == 0

    # Counts only: no token, no controller id or host, and only the fixed names.
    assert server.token not in after.text
    for identifying in ("node-a", "node-b", "mini-a"):
        assert identifying not in after.text
    ours = {name for name in after.families if name.startswith("conductord_")}
    assert ours == {
        f"{PREFIX}{name}"
        for name in (
            "requests", "request_duration_seconds", "holder_changes", "store_errors",
            "instance_conflicts", "waiters", "lease_term", "lease_live", "lease_seconds_left",
        )
    }
    assert "process_cpu_seconds_total" in after.text  # the standard collectors stay


def test_a_takeover_and_instance_conflicts_are_counted(server):
    body = {"controller_id": "node-a", "host": "a-host", "ttl_sec": 1}
    assert post(server, ACQUIRE, {**body, "instance_id": "i-1"})["is_leader"]
    time.sleep(1.2)  # the lease lapses unreleased
    assert acquire(server, "node-b", instance_id="i-b")["is_leader"]
    for _ in range(3):  # another process of node-b, asking again and again
        assert acquire(server, "node-b", instance_id="i-2")["holder_instance_id"] == "i-b"
    conflict = requests.post(
        server.url + RELEASE,
        json={"controller_id": "node-b", "term": 2, "instance_id": "i-2"},
        headers=server.headers,
        timeout=10,
    )
    assert conflict.json()["data"]["released"] is False
    after = scrape(server)
    changes = f"{PREFIX}holder_changes_total"
    assert after.value(changes, reason="granted") == 1
    assert after.value(changes, reason="taken_over") == 1
    assert after.value(changes, reason="instance_conflict") == 1  # once per (term, instance)
    assert after.value(f"{PREFIX}instance_conflicts_total") == 4  # every refused request
    assert after.value(f"{PREFIX}lease_term") == 2


def test_a_wrong_method_on_metrics_is_a_405_envelope(server):
    response = requests.post(server.url + "/metrics", json={}, timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.json()["error"] == "method_not_allowed"


# -- in process: a failing store, a parked long-poll ----------------------------------------------


def _get(app, path):
    captured = {}

    def start_response(status, headers):
        captured["status"], captured["headers"] = status, dict(headers)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "wsgi.input": io.BytesIO()}
    body = b"".join(app(environ, start_response))
    return captured["status"], captured["headers"], body


class _FailingStore:
    def leader(self):
        raise StoreError("disk full")

    def now(self):
        return time.time()

    def lease_time(self):
        return time.monotonic()


def test_store_errors_are_counted_and_a_failed_read_omits_the_lease_gauges():
    app = ControlApiApp(_FailingStore(), log=configure(level="info", stream=io.StringIO()))
    status, _, body = _get(app, "/v1/leader")
    assert status.startswith("503") and json.loads(body)["error"] == "unavailable"
    status, _, body = _get(app, "/metrics")
    assert status.startswith("200")
    parsed = Scrape(body.decode())
    assert parsed.value(f"{PREFIX}store_errors_total") == 2  # the 503 and this scrape's read
    assert parsed.value(f"{PREFIX}requests_total", route="/v1/leader", status="503") == 1
    assert f"{PREFIX}lease_live" not in parsed.families  # no made-up value
    assert f"{PREFIX}waiters" in parsed.families


def test_parked_long_polls_are_a_gauge(tmp_path):
    import gevent

    store = SqliteStore(str(tmp_path / "control.sqlite3"))
    app = ControlApiApp(store, log=configure(level="info", stream=io.StringIO()))
    try:
        store.acquire(controller_id="a", host="a-host", ttl_sec=30, preferred=False)
        body = json.dumps(
            {"controller_id": "b", "host": "b-host", "ttl_sec": 30, "wait_ms": 5000}
        ).encode()
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": ACQUIRE,
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
        parked = gevent.spawn(app, environ, lambda status, headers: None)
        deadline = time.monotonic() + 5
        while app.waiters.parked == 0:
            assert time.monotonic() < deadline
            gevent.sleep(0.01)
        assert Scrape(_get(app, "/metrics")[2].decode()).value(f"{PREFIX}waiters") == 1
        app.close()  # answers the parked acquire now
        parked.join(timeout=5)
        assert Scrape(_get(app, "/metrics")[2].decode()).value(f"{PREFIX}waiters") == 0
    finally:
        store.close()


def test_two_apps_in_one_process_have_their_own_registries(tmp_path):
    stores = [SqliteStore(str(tmp_path / f"{n}.sqlite3")) for n in range(2)]
    try:
        apps = [ControlApiApp(s, log=configure(level="info", stream=io.StringIO())) for s in stores]
        _get(apps[0], "/healthz")
        counts = [
            Scrape(_get(app, "/metrics")[2].decode()).value(
                f"{PREFIX}requests_total", route="/healthz", status="200"
            )
            for app in apps
        ]
        assert counts == [1, 0]
    finally:
        for s in stores:
            s.close()

