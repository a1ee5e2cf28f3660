"""`conductord.endpoints`: every Control API URL checked on its own (SPEC §17).

Against scripted loopback servers (real sockets): the SPEC §4 failure texts of the two GETs,
the token kept out of them, and the "one shared store?" judgement, including a lease that
changes between the reads. `diagnose` and the daemon with real Control API processes are in
tests/test_daemon.py and tests/test_postgres_ha.py.
"""

from __future__ import annotations

import socket

import pytest

from conductord.endpoints import EndpointCheck, check_endpoints, judge, store_kinds
from tests.support.scripted_server import Reply, ScriptedServer

TOKEN = "s3cret-token-never-shown"


def envelope(data):
    return {"ok": True, "request_id": "r", "data": data}


def healthz(store="postgresql"):
    return Reply(body=envelope({"status": "ok", "store": store}))


def leader(term, holder, live=True):
    lease = None if term is None else {"term": term, "holder_id": holder, "lease_name": "global"}
    return Reply(body=envelope({"lease": lease, "is_live": live, "waiters": 0}))


@pytest.fixture
def servers():
    with ScriptedServer() as one, ScriptedServer() as two:
        yield one, two


def refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def only(section):
    return [EndpointCheck(**values) for values in section["endpoints"]]


def test_two_urls_with_one_lease_share_a_store(servers):
    for server in servers:
        server.default("/healthz", healthz()).default("/v1/leader", leader(7, "n1"))
    urls = [server.url for server in servers]
    section = check_endpoints(urls, token=TOKEN, timeout_ms=1000, in_use=urls[1])
    assert section["shared_store"] is True, section
    assert section["warnings"] == []
    assert [(c.in_use, c.reachable, c.store, c.term, c.holder_id) for c in only(section)] == [
        (False, True, "postgresql", 7, "n1"),
        (True, True, "postgresql", 7, "n1"),
    ]
    # /healthz needs no token and gets none; /v1/leader gets ours.
    for server in servers:
        by_path = {rec.path: rec.headers for rec in server.requests}
        assert "authorization" not in by_path["/healthz"]
        assert by_path["/v1/leader"]["authorization"] == f"Bearer {TOKEN}"


def test_a_sqlite_url_among_several_is_a_warning(servers):
    one, two = servers
    one.default("/healthz", healthz("sqlite")).default("/v1/leader", leader(1, "n1"))
    two.default("/healthz", healthz("postgresql")).default("/v1/leader", leader(1, "n1"))
    section = check_endpoints([one.url, two.url], token=TOKEN, timeout_ms=1000)
    assert section["shared_store"] is False
    assert section["warnings"] == [
        f"Control API {one.url} answers from a SQLite store: the URLs of --control-api-base /"
        " BAA_CONTROL_API_BASE must share one PostgreSQL store, or nodes on different URLs can"
        " hold the lease at once"
    ]
    # One URL on SQLite is the ordinary embedded set-up: nothing to warn about.
    alone = check_endpoints([one.url], token=TOKEN, timeout_ms=1000)
    assert (alone["shared_store"], alone["warnings"]) == (None, [])


def test_different_leases_are_read_twice_before_they_count(servers):
    one, two = servers
    for server in servers:
        server.default("/healthz", healthz())
    # The lease moves between the first two reads (a takeover): the second reading agrees.
    one.script("/v1/leader", leader(3, "n1"), leader(4, "n2"))
    two.default("/v1/leader", leader(4, "n2"))
    moved = check_endpoints([one.url, two.url], token=TOKEN, timeout_ms=1000)
    assert moved["shared_store"] is True, moved
    assert one.count("/v1/leader") == 2
    # Two stores that really differ: a warning naming both views.
    one.default("/v1/leader", leader(3, "n1"))
    split = check_endpoints([one.url, two.url], token=TOKEN, timeout_ms=1000)
    assert split["shared_store"] is False
    assert split["warnings"] == [
        "the Control API URLs do not share one store: the URLs see different leases:"
        f" {one.url} term 3 held by n1; {two.url} term 4 held by n2"
    ]


def test_failures_are_the_spec_texts_without_the_token(servers):
    one, two = servers
    one.default("/healthz", Reply(hang=True))
    two.default("/healthz", healthz())
    two.default(
        "/v1/leader",
        Reply(
            status=401,
            body={"ok": False, "request_id": "r", "error": "unauthorized", "message": TOKEN},
        ),
    )
    down = refused_url()
    section = check_endpoints([one.url, two.url, down], token=TOKEN, timeout_ms=300)
    hung, denied, refused = only(section)
    assert (hung.reachable, hung.error) == (False, "Control API /healthz: timed out after 300 ms")
    assert denied.reachable and not denied.lease_read
    assert denied.error == "Control API 401 /v1/leader: unauthorized: ***"
    assert (refused.reachable, refused.error) == (
        False,
        "Control API /healthz: connection failed: Connection refused",
    )
    assert section["shared_store"] is None  # one lease read: nothing to compare
    assert TOKEN not in repr(section)


def test_a_holder_id_that_is_the_token_is_redacted(servers):
    one, two = servers
    for server in servers:
        server.default("/healthz", healthz()).default("/v1/leader", leader(2, TOKEN))
    section = check_endpoints([one.url, two.url], token=TOKEN, timeout_ms=1000)
    assert [c.holder_id for c in only(section)] == ["***", "***"]
    assert TOKEN[:8] not in repr(section)


@pytest.mark.parametrize(
    "reply,expected",
    [
        (
            Reply(status=502, body="<html>" + "x" * 300, headers={"content-type": "text/html"}),
            "Control API 502 /healthz: <html>" + "x" * 194,
        ),
        (Reply(status=503, body=b""), "Control API 503 /healthz: Service Unavailable"),
        (
            Reply(status=200, body="not json", headers={"content-type": "text/plain"}),
            "Control API returned invalid JSON for /healthz.",
        ),
        (
            Reply(body={"ok": False, "request_id": "r", "error": "nope", "message": "m"}),
            "Control API /healthz: nope: m",
        ),
    ],
    ids=["html-502", "empty-503", "not-json", "2xx-error-envelope"],
)
def test_each_answer_rule_of_spec_4(servers, reply, expected):
    one, _ = servers
    one.default("/healthz", reply)
    (check,) = store_kinds([one.url], timeout_ms=1000)
    assert (check.reachable, check.error) == (False, expected)


def test_judge_says_what_it_cannot_tell():
    lone = EndpointCheck("http://a", reachable=True, store="postgresql", lease_read=True, term=1)
    assert judge([lone]) == (None, "one URL")
    silent = EndpointCheck("http://b", error="Control API /healthz: connection failed: x")
    assert judge([lone, silent])[0] is None
    empty = [EndpointCheck(u, reachable=True, lease_read=True) for u in ("http://a", "http://b")]
    assert judge(empty) == (None, "no URL has a lease yet; nothing to compare")
    # A server too old to name its store, with the same lease: shared, as far as we can see.
    old = [
        EndpointCheck(u, reachable=True, lease_read=True, term=2, holder_id="n")
        for u in ("http://a", "http://b")
    ]
    assert judge(old)[0] is True
