"""`GET /v1/leader/history` over real HTTP (SPEC §16): auth, limits, ordering, the entries.

The stores' side (every reason, both stores, trimming, upgrades) is in test_store_contract.py.
"""

from __future__ import annotations

import secrets
import time

import pytest
import requests

from tests.support.control_api import ControlApiProcess

ACQUIRE = "/v1/leader/acquire"
RELEASE = "/v1/leader/release"
HISTORY = "/v1/leader/history"
FIELDS = {"at", "term", "holder_id", "holder_host", "previous_holder_id", "reason"}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """One server whose history holds 51 grants and 51 releases (terms 1..51), a grant of term
    52 and its takeover after expiry as term 53: 104 entries."""
    db = tmp_path_factory.mktemp("history") / "control.sqlite3"
    with ControlApiProcess(str(db), token=f"hist-{secrets.token_hex(8)}").start() as server:
        with requests.Session() as session:
            session.headers.update(server.headers)

            def post(path, body):
                response = session.post(server.url + path, json=body, timeout=10)
                assert response.status_code == 200, response.text
                return response.json()["data"]

            for term in range(1, 52):
                holder = "node-a" if term % 2 else "node-b"
                body = {"controller_id": holder, "host": f"{holder}-host", "ttl_sec": 30}
                assert post(ACQUIRE, body)["term"] == term
                assert post(ACQUIRE, body)["operation"] == "renew"  # not an entry
                assert post(RELEASE, {"controller_id": holder, "term": term})["released"]
            body = {"controller_id": "node-a", "host": "node-a-host", "ttl_sec": 1}
            assert post(ACQUIRE, body)["term"] == 52
            time.sleep(1.2)
            taken = post(ACQUIRE, {"controller_id": "node-c", "host": "node-c-host", "ttl_sec": 30})
            assert (taken["term"], taken["is_leader"]) == (53, True)
        yield server


def history(server, query="", *, headers=None):
    return requests.get(
        f"{server.url}{HISTORY}{query}",
        headers=server.headers if headers is None else headers,
        timeout=10,
    )


def entries(server, query=""):
    response = history(server, query)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is True and set(body["data"]) == {"entries"}
    return body["data"]["entries"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": "Basic abc"}],
    ids=["missing", "wrong", "other-scheme"],
)
def test_history_needs_the_token(api, headers):
    response = history(api, headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert (body["ok"], body["error"]) == (False, "unauthorized")
    assert "node-a" not in response.text


def test_newest_first_with_every_change_and_no_renewal(api):
    newest = entries(api, "?limit=5")
    assert all(set(entry) == FIELDS for entry in newest)
    assert [(e["reason"], e["term"], e["holder_id"], e["previous_holder_id"]) for e in newest] == [
        ("taken_over", 53, "node-c", "node-a"),
        ("granted", 52, "node-a", "node-a"),  # node-a had released term 51 itself
        ("released", 51, "node-a", "node-b"),
        ("granted", 51, "node-a", "node-b"),
        ("released", 50, "node-b", "node-a"),
    ]
    assert newest[0]["holder_host"] == "node-c-host"
    assert all(isinstance(entry["at"], int) for entry in newest)  # unix seconds
    assert abs(newest[0]["at"] - time.time()) < 120
    assert [e["at"] for e in newest] == sorted((e["at"] for e in newest), reverse=True)


def test_the_default_limit_is_100_and_at_most_1000_are_given(api):
    assert len(entries(api)) == 100
    everything = entries(api, "?limit=1000")
    assert len(everything) == 104  # 51 grants, 51 releases, term 52, its takeover
    first = everything[-1]
    assert (first["reason"], first["term"], first["holder_id"]) == ("granted", 1, "node-a")
    assert first["previous_holder_id"] is None  # the very first term
    assert entries(api, "?limit=1") == everything[:1]
    assert entries(api, "?limit=100&other=x") == everything[:100]  # other parameters ignored


@pytest.mark.parametrize(
    "query",
    ["?limit=0", "?limit=1001", "?limit=-1", "?limit=abc", "?limit=", "?limit=1.5",
     "?limit=1&limit=2", "?limit=%00", f"?limit={'9' * 5000}"],
)
def test_a_bad_limit_is_a_400_envelope(api, query):
    response = history(api, query)
    assert response.status_code == 400, response.text
    body = response.json()
    assert (body["ok"], body["error"]) == (False, "invalid_request")
    assert "limit" in body["details"]
    assert body["request_id"] == response.headers["x-request-id"]


def test_a_wrong_method_is_a_405_envelope(api):
    response = requests.post(api.url + HISTORY, json={}, headers=api.headers, timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
