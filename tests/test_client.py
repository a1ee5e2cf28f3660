"""ControlApiClient against real scripted HTTP servers on 127.0.0.1 (SPEC §4, §17, §18).

Most tests call the client in this process, unpatched: every socket operation is still bounded
by the connect and read timeouts, which is all a hang needs. The whole-call deadline is a
`gevent.Timeout`, which can only interrupt a socket the hub watches, so the tests that need it
(a server trickling bytes, greenlets sharing one client, both loops failing at once) run the
client monkey-patched in a subprocess, as the daemon runs it (`run_patched`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conductord import __version__
from conductord.client import (
    MAX_BODY_BYTES,
    OUTCOMES,
    ControlApiClient,
    ControlApiError,
    TransportError,
    capped_get,
)
from conductord.wire import (
    AcquireResult,
    Heartbeat,
    LeaseRecord,
    ReleaseResult,
    success_envelope,
)
from tests.support.scripted_server import Reply, ScriptedServer

ACQUIRE = "/v1/leader/acquire"
RELEASE = "/v1/leader/release"
HEARTBEAT = "/v1/controllers/heartbeat"
REPO = Path(__file__).resolve().parents[1]

SEED_LEASE = {
    "lease_name": "global",
    "holder_id": "mini-main",
    "holder_host": "mini",
    "term": 3,
    "lease_expires_at": 130,
    "renewed_at": 100,
    "preferred_holder_id": "mini-main",
    "metadata_json": None,
}
SEED_DATA = {
    "holder_id": "mini-main",
    "holder_host": "mini",
    "term": 3,
    "lease_expires_at": 130,
    "renewed_at": 100,
    "is_leader": True,
    "operation": "renew",
    "lease": SEED_LEASE,
}


@pytest.fixture
def server():
    with ScriptedServer() as srv:
        yield srv
        assert srv.errors == []


@pytest.fixture
def client(server):
    with ControlApiClient(server.url, timeout_ms=2000) as api:
        yield api


def ok(data) -> Reply:
    return Reply(200, success_envelope(data, "req-1"))


def acquire(api: ControlApiClient, **overrides):
    args = {"controller_id": "mini-main", "host": "mini", "ttl_sec": 30, "preferred": True}
    args.update(overrides)
    args.setdefault("now", 100)
    return api.acquire_leader_lease(**args)


BEAT = Heartbeat(
    controller_id="mini-main",
    host="mini",
    role="primary",
    priority=100,
    status="leader",
    version="1.2.3",
    heartbeat_at=1700000000,
    started_at=1699999990,
)


def heartbeat(api: ControlApiClient):
    return api.heartbeat(BEAT)


def failure(call, *args, **kwargs) -> ControlApiError:
    with pytest.raises(ControlApiError) as info:
        call(*args, **kwargs)
    return info.value


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the seed's test, and the request side ----------------------------------------------------- --


def test_seed_envelope_unwrapped_with_bearer_auth(server):
    server.script(ACQUIRE, ok(SEED_DATA))
    with ControlApiClient(server.url + "/", token="secret-token") as api:
        result = api.acquire_leader_lease(
            controller_id="mini-main", host="mini", ttl_sec=30, preferred=True, now=100
        )
    [request] = server.requests
    assert (request.method, request.path) == ("POST", ACQUIRE)
    assert request.headers["authorization"] == "Bearer secret-token"
    assert (
        request.body
        == b'{"controller_id":"mini-main","host":"mini","ttl_sec":30,"preferred":true,"now":100}'
    )
    assert (result.holder_id, result.holder_host, result.term) == ("mini-main", "mini", 3)
    assert (result.operation, result.is_leader) == ("renew", True)
    assert result.lease == LeaseRecord(**SEED_LEASE)


def test_headers_without_token(server, client):
    server.default(HEARTBEAT, Reply(204))
    assert heartbeat(client) is None
    headers = server.requests[0].headers
    assert headers["accept"] == "application/json"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == f"conductord/{__version__}"
    assert "authorization" not in headers


def test_custom_user_agent(server):
    server.default(HEARTBEAT, Reply(204))
    with ControlApiClient(server.url, user_agent="conductord/9.9 (test)") as api:
        heartbeat(api)
    assert server.requests[0].headers["user-agent"] == "conductord/9.9 (test)"


def test_heartbeat_body_is_snake_case_and_omits_unset(server, client):
    server.default(HEARTBEAT, ok({"registered": True}))
    assert heartbeat(client) == {"registered": True}
    assert server.requests[0].json == {
        "controller_id": "mini-main",
        "host": "mini",
        "role": "primary",
        "priority": 100,
        "status": "leader",
        "version": "1.2.3",
        "heartbeat_at": 1700000000,
        "started_at": 1699999990,
    }
    client.heartbeat(
        Heartbeat(
            controller_id="a",
            host="h",
            role="standby",
            priority=50,
            status="standby",
            heartbeat_at=5,
        )
    )
    assert server.requests[1].json == {
        "controller_id": "a",
        "host": "h",
        "role": "standby",
        "priority": 50,
        "status": "standby",
        "heartbeat_at": 5,
    }


def test_acquire_sends_metadata_and_defaults_now_to_wall_clock(server, client):
    server.default(ACQUIRE, ok(SEED_DATA))
    before = int(time.time())
    client.acquire_leader_lease(
        controller_id="mini-main", host="mini", ttl_sec=30, preferred=False, metadata_json="{}"
    )
    after = int(time.time())
    body = server.requests[0].json
    assert before <= body.pop("now") <= after
    assert body == {
        "controller_id": "mini-main",
        "host": "mini",
        "ttl_sec": 30,
        "preferred": False,
        "metadata_json": "{}",
    }


def test_wait_ms_zero_is_not_sent(server, client):
    server.default(ACQUIRE, ok(SEED_DATA))
    acquire(client, wait_ms=0)
    assert "wait_ms" not in server.requests[0].json


def test_release_sends_controller_and_term(server, client):
    server.default(RELEASE, ok({"released": True, "lease": SEED_LEASE}))
    result = client.release_leader_lease(controller_id="mini-main", term=3)
    assert server.requests[0].json == {"controller_id": "mini-main", "term": 3}
    assert result == ReleaseResult(released=True, supported=True, lease=LeaseRecord(**SEED_LEASE))


# -- rule 1: 2xx ---------------------------------------------------------------------------------


def test_rule1_error_envelope_on_2xx(server, client):
    server.default(
        HEARTBEAT,
        Reply(200, {"ok": False, "request_id": "r", "error": "conflict", "message": "stale term"}),
    )
    err = failure(heartbeat, client)
    assert str(err) == "Control API /v1/controllers/heartbeat: conflict: stale term"
    assert (err.path, err.status, err.code) == (HEARTBEAT, 200, "conflict")


def test_rule1_other_json_is_the_data(server, client):
    server.script(HEARTBEAT, Reply(200, [1, 2]), Reply(201, {"ok": True}), Reply(200, "null"))
    assert heartbeat(client) == [1, 2]
    assert heartbeat(client) == {"ok": True}
    assert heartbeat(client) is None


@pytest.mark.parametrize("status", [200, 202, 204])
def test_rule1_empty_body_is_no_data(server, client, status):
    server.default(HEARTBEAT, Reply(status))
    assert heartbeat(client) is None


# -- rule 2: non-2xx -------------------------------------------------------------------------------


def test_rule2_error_envelope(server, client):
    server.default(
        ACQUIRE,
        Reply(
            401, {"ok": False, "request_id": "r", "error": "unauthorized", "message": "bad token"}
        ),
    )
    err = failure(acquire, client)
    assert str(err) == "Control API 401 /v1/leader/acquire: unauthorized: bad token"
    assert (err.status, err.code) == (401, "unauthorized")


def test_rule2_html_error_page_cut_to_200_characters(server, client):
    page = "<html><body>" + "Bad gateway. " * 40 + "</body></html>\n"
    server.default(HEARTBEAT, Reply(502, page, headers={"content-type": "text/html"}))
    err = failure(heartbeat, client)
    assert str(err) == f"Control API 502 /v1/controllers/heartbeat: {page[:200]}"
    assert (err.status, err.code) == (502, None)


def test_rule2_other_json_body_is_quoted(server, client):
    server.default(HEARTBEAT, Reply(500, {"detail": "boom"}))
    assert str(failure(heartbeat, client)) == (
        'Control API 500 /v1/controllers/heartbeat: {"detail": "boom"}'
    )


def test_rule2_empty_body_gives_reason_phrase(server, client):
    server.script(
        HEARTBEAT, Reply(503), Reply(418, reason="Short And Stout"), Reply(599, reason="")
    )
    assert str(failure(heartbeat, client)) == (
        "Control API 503 /v1/controllers/heartbeat: Service Unavailable"
    )
    assert str(failure(heartbeat, client)) == (
        "Control API 418 /v1/controllers/heartbeat: Short And Stout"
    )
    assert str(failure(heartbeat, client)) == "Control API 599 /v1/controllers/heartbeat: Unknown"


def test_rule2_redirect_is_not_followed(server, client):
    server.default(HEARTBEAT, Reply(307, headers={"location": "/elsewhere"}))
    server.default("/elsewhere", Reply(204))
    assert str(failure(heartbeat, client)) == (
        "Control API 307 /v1/controllers/heartbeat: Temporary Redirect"
    )
    assert server.count("/elsewhere") == 0


# -- rule 3: 2xx that is not JSON ------------------------------------------------------------------

INVALID_JSON = "Control API returned invalid JSON for /v1/leader/acquire."


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>It works!</body></html>",
        '{"ok": true, "data": {"holder_id": "mini-ma',  # truncated, Content-Length matches
        b'{"ok": true, "data": "\xff\xfe"}',  # not UTF-8
        '{"ok": true, "data": NaN}',
        "[" * 100_000 + "]" * 100_000,  # nests deeper than the parser's recursion limit
    ],
    ids=["html", "truncated", "not-utf8", "nan", "deep"],
)
def test_rule3_invalid_json(server, client, body):
    server.default(ACQUIRE, Reply(200, body))
    err = failure(acquire, client)
    assert str(err) == INVALID_JSON
    assert (err.path, err.status) == (ACQUIRE, 200)


# -- rule 4: transport -----------------------------------------------------------------------------


def test_rule4_connection_refused():
    with ControlApiClient(f"http://127.0.0.1:{closed_port()}", timeout_ms=2000) as api:
        err = failure(acquire, api)
    assert str(err) == "Control API /v1/leader/acquire: connection failed: Connection refused"
    assert (err.path, err.status, err.code) == (ACQUIRE, None, None)


def test_rule4_hang_times_out_after_the_budget(server):
    server.default(ACQUIRE, Reply(hang=True))
    with ControlApiClient(server.url, timeout_ms=300) as api:
        started = time.monotonic()
        err = failure(acquire, api)
        elapsed = time.monotonic() - started
    assert str(err) == "Control API /v1/leader/acquire: timed out after 300 ms"
    assert 0.25 <= elapsed < 5


def test_rule4_trickling_server_is_cut_at_the_overall_deadline(server):
    # Each byte arrives well within the per-read timeout; sending the whole answer would take
    # 10+ s, so only the whole-call deadline (a gevent.Timeout) ends the call near 400 ms.
    server.default(
        ACQUIRE, Reply(200, success_envelope(SEED_DATA, "r"), trickle=True, trickle_interval=0.05)
    )
    [[(outcome, elapsed)]] = run_patched([server.url], [["acquire"]], timeout_ms=400)["results"]
    assert outcome == "Control API /v1/leader/acquire: timed out after 400 ms"
    assert elapsed < 4


def test_rule4_body_trickle_after_prompt_headers_is_cut_too(server):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    server.default(
        HEARTBEAT,
        Reply(raw=head + b" " * 1000, trickle=True, trickle_after=len(head) + 10),
    )
    [[(outcome, elapsed)]] = run_patched([server.url], [["heartbeat"]], timeout_ms=300)["results"]
    assert outcome == "Control API /v1/controllers/heartbeat: timed out after 300 ms"
    assert elapsed < 4


def test_unpatched_the_timeouts_still_bound_each_read(server):
    # Outside gevent the timer cannot interrupt a blocking socket: each read is still bounded.
    server.default(ACQUIRE, Reply(hang=True))
    with ControlApiClient(server.url, timeout_ms=300) as api:
        started = time.monotonic()
        err = failure(acquire, api)
        assert time.monotonic() - started < 5
    assert str(err) == "Control API /v1/leader/acquire: timed out after 300 ms"


def test_rule4_connection_closed_mid_body(server, client):
    server.default(ACQUIRE, Reply(raw=b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"ok":'))
    assert str(failure(acquire, client)) == (
        "Control API /v1/leader/acquire: connection failed: "
        "response cut short (6 bytes read, 94 more expected)"
    )


def test_rule4_connection_closed_without_response(server, client):
    server.default(HEARTBEAT, Reply(raw=b""))
    assert str(failure(heartbeat, client)) == (
        "Control API /v1/controllers/heartbeat: connection failed: "
        "Remote end closed connection without response"
    )
    assert server.count(HEARTBEAT) == 1  # no hidden retry


def test_rule4_garbage_status_line(server, client):
    server.default(HEARTBEAT, Reply(raw=b"SPDY/9 teapot\r\n\r\n"))
    assert str(failure(heartbeat, client)) == (
        "Control API /v1/controllers/heartbeat: connection failed: "
        "invalid HTTP status line 'SPDY/9 teapot'"
    )


# -- long-poll (§12) ------------------------------------------------------------------------------


def test_long_poll_extends_the_read_budget(server):
    server.default(ACQUIRE, Reply(200, success_envelope(SEED_DATA, "r"), delay=0.6))
    with ControlApiClient(server.url, timeout_ms=300) as api:
        result = acquire(api, wait_ms=1500)
    assert result.term == 3
    assert server.requests[0].json["wait_ms"] == 1500


def test_long_poll_timeout_reports_timeout_plus_wait(server):
    server.default(ACQUIRE, Reply(hang=True))
    with ControlApiClient(server.url, timeout_ms=200) as api:
        started = time.monotonic()
        err = failure(acquire, api, wait_ms=300)
        elapsed = time.monotonic() - started
    assert str(err) == "Control API /v1/leader/acquire: timed out after 500 ms"
    assert 0.45 <= elapsed < 5


# -- oversized bodies -----------------------------------------------------------------------------

TOO_LARGE = f"Control API /v1/leader/acquire: response body larger than {MAX_BODY_BYTES} bytes"


def test_body_over_the_cap_with_content_length(server, client):
    server.default(ACQUIRE, Reply(200, b"x" * (3 * MAX_BODY_BYTES)))
    assert str(failure(acquire, client)) == TOO_LARGE


def test_body_over_the_cap_without_content_length(server, client):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
    server.default(ACQUIRE, Reply(raw=head + b"[" + b"1," * MAX_BODY_BYTES + b"1]"))
    assert str(failure(acquire, client)) == TOO_LARGE


def test_large_error_page_is_still_quoted(server, client):
    server.default(ACQUIRE, Reply(500, "E" * (2 * MAX_BODY_BYTES)))
    assert str(failure(acquire, client)) == f"Control API 500 /v1/leader/acquire: {'E' * 200}"


def test_connection_recovers_after_failures(server, client):
    server.script(ACQUIRE, Reply(200, b"x" * (2 * MAX_BODY_BYTES)), Reply(raw=b""))
    server.default(ACQUIRE, ok(SEED_DATA))
    failure(acquire, client)
    failure(acquire, client)
    assert acquire(client).term == 3


# -- rule 5 through the client --------------------------------------------------------------------


def test_rule5_camel_case_response(server, client):
    server.default(
        ACQUIRE,
        ok(
            {
                "holderId": "mini-main",
                "holderHost": "mini",
                "term": 4,
                "leaseExpiresAt": 131,
                "isLeader": True,
                "operation": "renew",
            }
        ),
    )
    result = acquire(client)
    assert result == AcquireResult(
        holder_id="mini-main",
        holder_host="mini",
        term=4,
        lease_expires_at=131,
        renewed_at=100,
        is_leader=True,
        operation="renew",
        lease=LeaseRecord("global", "mini-main", "mini", 4, 131, 100, None, None),
    )


def test_rule5_defaults_for_another_holder(server, client):
    server.default(ACQUIRE, ok({"holder_id": "mini-standby", "term": 7, "lease_expires_at": 150}))
    result = acquire(client, now=120)
    assert (result.holder_host, result.is_leader, result.operation, result.renewed_at) == (
        "unknown",
        False,
        "acquire",
        120,
    )
    assert result.lease.lease_name == "global"


def test_rule5_non_object_and_missing_identity(server, client):
    server.script(
        ACQUIRE,
        ok([SEED_DATA]),
        ok(None),
        Reply(204),
        ok({"holder_id": "mini-main", "term": "3", "lease_expires_at": 1}),
    )
    for _ in range(3):
        assert str(failure(acquire, client)) == (
            "Control API /v1/leader/acquire returned a non-object payload."
        )
    assert str(failure(acquire, client)) == (
        "Control API /v1/leader/acquire response is missing lease identity fields."
    )


# -- release --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Reply(404),
        Reply(404, {"ok": False, "request_id": "r", "error": "not_found", "message": "no route"}),
        Reply(404, "<html>Not Found</html>"),
    ],
    ids=["empty", "envelope", "html"],
)
def test_release_404_means_not_supported(server, client, reply):
    server.default(RELEASE, reply)
    assert client.release_leader_lease(controller_id="mini-main", term=3) == ReleaseResult(
        released=False, supported=False, lease=None
    )


def test_release_other_failures_raise(server, client):
    server.default(
        RELEASE,
        Reply(
            409,
            {
                "ok": False,
                "request_id": "r",
                "error": "not_holder",
                "message": "term 3 is not yours",
            },
        ),
    )
    err = failure(client.release_leader_lease, controller_id="mini-main", term=3)
    assert str(err) == "Control API 409 /v1/leader/release: not_holder: term 3 is not yours"


# -- keep-alive -----------------------------------------------------------------------------------


def test_calls_reuse_one_connection(server, client):
    server.default(ACQUIRE, ok(SEED_DATA))
    server.default(HEARTBEAT, Reply(500, "oops"))  # a read-to-the-end error keeps it too
    acquire(client)
    failure(heartbeat, client)
    acquire(client)
    records = server.requests
    assert server.connections == 1
    assert len({record.connection for record in records}) == 1
    assert len({record.client_address for record in records}) == 1


def test_a_timed_out_connection_is_not_reused(server):
    server.script(ACQUIRE, Reply(hang=True))
    server.default(ACQUIRE, ok(SEED_DATA))
    with ControlApiClient(server.url, timeout_ms=300) as api:
        failure(acquire, api)
        server.release_hangs()  # its late answer must not be read as the next call's
        assert acquire(api, now=101).term == 3
    assert server.requests[0].connection != server.requests[1].connection


# -- secrets --------------------------------------------------------------------------------------


def test_token_never_in_messages_or_repr(server):
    server.script(
        ACQUIRE,
        Reply(401, "rejected authorization: Bearer secret-token"),
        Reply(
            200,
            {"ok": False, "request_id": "r", "error": "secret-token", "message": "secret-token"},
        ),
    )
    with ControlApiClient(server.url, token="secret-token") as api:
        first = failure(acquire, api)
        second = failure(acquire, api)
        text = repr(api)
    assert str(first) == "Control API 401 /v1/leader/acquire: rejected authorization: Bearer ***"
    assert str(second) == "Control API /v1/leader/acquire: ***: ***"
    assert "secret-token" not in text and "has_token=True" in text


def test_rejects_a_token_that_cannot_be_a_header():
    with pytest.raises(ValueError) as info:
        ControlApiClient("http://127.0.0.1:1", token="secret\ntoken")
    assert "secret" not in str(info.value)


def test_rejects_bad_construction_arguments():
    with pytest.raises(ValueError):
        ControlApiClient("ftp://127.0.0.1:1")
    with pytest.raises(ValueError):
        ControlApiClient("http://127.0.0.1:1", timeout_ms=0)


# -- under gevent ---------------------------------------------------------------------------------

PATCHED_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import json, sys, time
    import gevent
    from conductord.client import ControlApiClient, ControlApiError, TransportError, capped_get
    from conductord.wire import Heartbeat

    spec = json.loads(sys.argv[1])
    api = ControlApiClient(spec["urls"], timeout_ms=spec["timeout_ms"])

    def call(name):
        started = time.monotonic()
        try:
            if name == "heartbeat":
                api.heartbeat(Heartbeat(controller_id="a", host="h", status="standby"))
            elif name == "get":
                api.get("/v1/leader")
            elif name == "capped_get":
                try:
                    capped_get(spec["urls"][0] + "/v1/status", timeout_ms=spec["timeout_ms"])
                except TransportError as err:
                    raise ControlApiError(f"{err.kind}: {err.detail}", path="") from None
            else:
                api.acquire_leader_lease(
                    controller_id="mini-main", host="mini", ttl_sec=30, preferred=True, now=100
                )
            outcome = "ok"
        except ControlApiError as err:
            outcome = str(err)
        return [outcome, time.monotonic() - started]

    results = []
    for group in spec["groups"]:  # the calls of a group run at once, one greenlet each
        greenlets = []
        for name in group:
            greenlets.append(gevent.spawn(call, name))
            gevent.sleep(spec["stagger"])
        gevent.joinall(greenlets)
        results.append([g.value for g in greenlets])
    counts = [[url, outcome, n] for (url, outcome), n in api.call_counts().items()]
    print(json.dumps({"results": results, "base_url": api.base_url, "counts": counts}))
    """
)


def run_patched(
    urls: list[str], groups: list[list[str]], *, timeout_ms: int, stagger: float = 0.0
) -> dict:
    """Run calls ("heartbeat", "acquire", "get" or "capped_get") through a monkey-patched
    client in a subprocess."""
    spec = {"urls": urls, "groups": groups, "timeout_ms": timeout_ms, "stagger": stagger}
    run = subprocess.run(
        [sys.executable, "-c", PATCHED_SCRIPT, json.dumps(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_under_gevent_each_greenlet_keeps_its_own_deadline(server):
    # The daemon runs the client monkey-patched, with the heartbeat and lease loops in
    # separate greenlets: a trickling answer in one must neither outlive its budget nor
    # delay the other.
    server.script(
        HEARTBEAT,
        Reply(200, {"ok": True, "data": 1}, trickle=True, trickle_interval=0.05),
        Reply(200, {"ok": True, "data": 2}),
    )
    [[(slow, slow_s), (quick, quick_s)]] = run_patched(
        [server.url], [["heartbeat", "heartbeat"]], timeout_ms=400, stagger=0.05
    )["results"]
    assert slow == "Control API /v1/controllers/heartbeat: timed out after 400 ms"
    assert slow_s < 4
    assert quick == "ok"
    assert quick_s < slow_s


# -- keep-alive and the prepared copies ----------------------------------------------------------


def test_a_connection_the_server_dropped_while_idle_is_replaced():
    # A keep-alive connection the server closed between calls must be noticed before reuse
    # (urllib3 checks a pooled connection), not written to and reported as a failure.
    closed = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(10)
                    request = b""
                    while b"\r\n\r\n" not in request:
                        request += conn.recv(65536)
                    body = b'{"ok":true,"request_id":"r","data":7}'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body)
                    )
                closed.set()  # closed without `connection: close`: an idle drop

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with ControlApiClient(f"http://127.0.0.1:{port}", timeout_ms=5000) as api:
            assert heartbeat(api) == 7
            assert closed.wait(10)
            assert heartbeat(api) == 7
        thread.join(10)
        assert not thread.is_alive()


def test_calls_after_close_open_a_fresh_connection(server, client):
    server.default(HEARTBEAT, ok(1))
    assert heartbeat(client) == 1
    client.close()
    assert heartbeat(client) == 1
    assert server.connections == 2


def test_request_head_is_unchanged_by_the_prepared_copies(server):
    # Each call sends a copy of one prepared request: no header may leak between calls or
    # paths, and Content-Length always matches the body.
    server.default(HEARTBEAT, Reply(204))
    server.default(ACQUIRE, ok(SEED_DATA))
    with ControlApiClient(server.url, token="secret-token") as api:
        heartbeat(api)
        acquire(api, metadata_json="x" * 50)
        acquire(api)
    first, second, third = server.requests
    assert [r.path for r in server.requests] == [HEARTBEAT, ACQUIRE, ACQUIRE]
    for record in (first, second, third):
        assert set(record.headers) == {
            "accept",
            "accept-encoding",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "user-agent",
        }
        assert record.headers["content-length"] == str(len(record.body))
        assert record.headers["accept-encoding"] == "identity"
    assert len(second.body) > len(third.body)


# -- several base URLs (SPEC §17) -----------------------------------------------------------------


@pytest.fixture
def second():
    with ScriptedServer() as srv:
        yield srv
        assert srv.errors == []


def counts(api: ControlApiClient) -> dict[tuple[str, str], int]:
    """The non-zero call counts."""
    return {key: n for key, n in api.call_counts().items() if n}


def test_base_urls_one_list_or_comma_separated(server, second):
    for given in (f"{server.url}/, {second.url}", [server.url, second.url + "/"]):
        with ControlApiClient(given) as api:
            assert api.base_urls == (server.url, second.url)
            assert api.base_url == server.url
            assert set(api.call_counts()) == {
                (url, outcome) for url in (server.url, second.url) for outcome in OUTCOMES
            }
    with ControlApiClient(server.url) as api:
        assert api.base_urls == (server.url,)
    for bad in (f"{server.url},{server.url}/", f"{server.url},", [], ["ftp://x"]):
        with pytest.raises(ValueError):
            ControlApiClient(bad)


def test_a_refused_url_moves_within_the_call(second):
    refused = f"http://127.0.0.1:{closed_port()}"
    second.default(ACQUIRE, ok(SEED_DATA))
    with ControlApiClient([refused, second.url], timeout_ms=2000) as api:
        assert acquire(api).term == 3
        assert api.base_url == second.url
        assert acquire(api).term == 3  # stays on the URL that answered
        assert counts(api) == {(refused, "moved"): 1, (second.url, "ok"): 2}
    assert second.count(ACQUIRE) == 2


def test_every_url_refused_fails_with_the_connection_error():
    first, other = (f"http://127.0.0.1:{closed_port()}" for _ in range(2))
    with ControlApiClient([first, other], timeout_ms=2000) as api:
        err = failure(acquire, api)
        assert str(err) == "Control API /v1/leader/acquire: connection failed: Connection refused"
        assert api.base_url == first
        assert counts(api) == {(first, "moved"): 1, (other, "error"): 1}


def test_a_5xx_fails_the_call_and_the_next_call_moves(server, second):
    server.default(ACQUIRE, Reply(503))
    second.default(ACQUIRE, ok(SEED_DATA))
    with ControlApiClient([server.url, second.url], timeout_ms=2000) as api:
        assert str(failure(acquire, api)) == (
            "Control API 503 /v1/leader/acquire: Service Unavailable"
        )
        assert second.count(ACQUIRE) == 0
        assert api.base_url == second.url
        assert acquire(api).term == 3
        assert acquire(api).term == 3
        assert counts(api) == {(server.url, "error"): 1, (second.url, "ok"): 2}
    assert server.count(ACQUIRE) == 1


def test_a_renewal_that_timed_out_is_not_sent_to_the_next_url(server, second):
    # The first server may have renewed before hanging: sending the renewal again elsewhere
    # would act twice on one request. The call fails; the next one goes to the next URL.
    server.default(ACQUIRE, Reply(hang=True))
    second.default(ACQUIRE, ok(SEED_DATA))
    with ControlApiClient([server.url, second.url], timeout_ms=300) as api:
        err = failure(acquire, api)
        assert str(err) == "Control API /v1/leader/acquire: timed out after 300 ms"
        time.sleep(0.2)
        assert second.count(ACQUIRE) == 0
        assert api.base_url == second.url
        assert acquire(api).term == 3
    assert (server.count(ACQUIRE), second.count(ACQUIRE)) == (1, 1)


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        (Reply(reset=True), "Connection reset by peer"),
        (Reply(raw=b""), "Remote end closed connection without response"),
        (Reply(raw=b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{"), "response cut short"),
    ],
    ids=["reset", "closed", "cut-short"],
)
def test_a_connection_lost_after_sending_is_the_calls_failure(server, second, reply, detail):
    server.script(ACQUIRE, reply)
    second.default(ACQUIRE, ok(SEED_DATA))
    with ControlApiClient([server.url, second.url], timeout_ms=2000) as api:
        err = failure(acquire, api)
        assert str(err).startswith("Control API /v1/leader/acquire: connection failed: ")
        assert detail in str(err)
        assert second.count(ACQUIRE) == 0
        assert api.base_url == second.url
        assert acquire(api).term == 3


def test_a_killed_server_costs_an_idle_client_no_failed_call(second):
    # The pooled connection to the dead process is noticed before reuse; the reconnect is
    # refused, which sends nothing, so the call moves on within its budget.
    second.default(HEARTBEAT, ok(2))
    first = ScriptedServer().start()
    first.default(HEARTBEAT, ok(1))
    dead = first.url
    try:
        with ControlApiClient([dead, second.url], timeout_ms=2000) as api:
            assert heartbeat(api) == 1
            first.stop()
            time.sleep(0.1)
            assert heartbeat(api) == 2
            assert counts(api) == {(dead, "ok"): 1, (dead, "moved"): 1, (second.url, "ok"): 1}
    finally:
        first.stop()


def test_a_4xx_is_an_answer_and_moves_nothing(server, second):
    server.default(
        ACQUIRE,
        Reply(401, {"ok": False, "request_id": "r", "error": "unauthorized", "message": "no"}),
    )
    with ControlApiClient([server.url, second.url], timeout_ms=2000) as api:
        failure(acquire, api)
        failure(acquire, api)
        assert api.base_url == server.url
        assert counts(api) == {(server.url, "error"): 2}
    assert second.count(ACQUIRE) == 0


def test_both_loops_failing_at_once_move_the_url_once(server, second):
    # Heartbeat and lease calls hang on the first URL together and both time out: the URL
    # moves once (to the second), not twice (back onto the first).
    server.default(HEARTBEAT, Reply(hang=True))
    server.default(ACQUIRE, Reply(hang=True))
    second.default(HEARTBEAT, ok(1))
    second.default(ACQUIRE, ok(SEED_DATA))
    out = run_patched(
        [server.url, second.url], [["heartbeat", "acquire"], ["heartbeat"]], timeout_ms=300
    )
    timed_out = [outcome for outcome, _ in out["results"][0]]
    assert timed_out == [
        "Control API /v1/controllers/heartbeat: timed out after 300 ms",
        "Control API /v1/leader/acquire: timed out after 300 ms",
    ]
    assert out["results"][1][0][0] == "ok"
    assert out["base_url"] == second.url
    assert {(url, o): n for url, o, n in out["counts"] if n} == {
        (server.url, "error"): 2,
        (second.url, "ok"): 1,
    }
    assert (server.count(HEARTBEAT), server.count(ACQUIRE), second.count(ACQUIRE)) == (1, 1, 0)


# -- hostile servers (issue 15) -------------------------------------------------------------------

TOKEN = "s3cr3t-T0KEN-0123456789-abcdefXYZ"


def token_pieces(text: str, size: int = 8) -> list[str]:
    windows = (TOKEN[i : i + size] for i in range(len(TOKEN) - size + 1))
    return [window for window in windows if window in text]


@pytest.mark.parametrize("before", [170, 178, 185, 190, 192])
def test_a_token_echoed_across_the_200_character_cut_leaks_no_piece(server, before):
    page = "E" * (before - len("Bearer ")) + "Bearer " + TOKEN + " and more text"
    server.default(ACQUIRE, Reply(500, page))
    with ControlApiClient(server.url, token=TOKEN) as api:
        text = str(failure(acquire, api))
    assert text.startswith("Control API 500 /v1/leader/acquire: EEEE")
    assert not token_pieces(text), text


@pytest.mark.parametrize("status", [200, 409])
@pytest.mark.parametrize("before", [980, 990, 995])
def test_a_token_echoed_across_the_1000_character_cut_leaks_no_piece(server, status, before):
    message = "m" * before + TOKEN + "m" * 50
    envelope = {"ok": False, "request_id": "r", "error": "e" * before + TOKEN, "message": message}
    server.default(ACQUIRE, Reply(status, envelope))
    with ControlApiClient(server.url, token=TOKEN) as api:
        err = failure(acquire, api)
    assert not token_pieces(str(err)), str(err)
    assert not token_pieces(err.code or "")


def test_a_partial_token_anywhere_is_masked(server):
    server.script(
        ACQUIRE,
        Reply(502, f"upstream saw Bearer {TOKEN[:12]}... and {TOKEN[-9:]}"),
        Reply(raw=b"HTTP/1.1 " + b"a" * 85 + TOKEN.encode() + b"\r\n\r\n"),
    )
    with ControlApiClient(server.url, token=TOKEN) as api:
        first = str(failure(acquire, api))
        second = str(failure(acquire, api))
    assert first == "Control API 502 /v1/leader/acquire: upstream saw Bearer ***... and ***"
    assert second.startswith("Control API /v1/leader/acquire: connection failed: invalid HTTP")
    assert not token_pieces(second), second


def test_a_lone_surrogate_holder_id_is_missing_identity(server, client):
    server.script(
        ACQUIRE,
        ok({**SEED_DATA, "holder_id": "\ud800"}),
        ok({**SEED_DATA, "holder_id": "mini-main\udc00", "is_leader": True}),
    )
    for _ in range(2):
        assert str(failure(acquire, client)) == (
            "Control API /v1/leader/acquire response is missing lease identity fields."
        )


def test_server_text_that_is_not_valid_unicode_is_made_safe(server, client):
    server.script(
        ACQUIRE,
        Reply(409, {"ok": False, "request_id": "r", "error": "c\ud800", "message": "\udfff boom"}),
        Reply(200, {"ok": False, "request_id": "r", "error": "e", "message": "x\ud83d"}),
    )
    first = failure(acquire, client)
    assert str(first) == "Control API 409 /v1/leader/acquire: c\ufffd: \ufffd boom"
    assert first.code == "c\ufffd"
    second = failure(acquire, client)
    assert str(second) == "Control API /v1/leader/acquire: e: x\ufffd"
    str(first).encode("utf-8")


def test_a_request_a_server_must_refuse_is_not_sent(server, client):
    server.default(HEARTBEAT, ok(1))
    server.default(ACQUIRE, ok(SEED_DATA))
    err = failure(client.heartbeat, Heartbeat(controller_id="a", host="h", priority=2**31))
    assert str(err) == (
        "Control API /v1/controllers/heartbeat: request not sent: "
        "priority: Must be greater than or equal to 0 and less than or equal to 2147483647."
    )
    err = failure(acquire, client, host="bad\ud800", ttl_sec=10**12)
    assert str(err) == (
        "Control API /v1/leader/acquire: request not sent: host: Not valid Unicode.; "
        "ttl_sec: Must be an integer from 1 to 86400."
    )
    assert server.requests == []
    assert counts(client) == {}


def test_a_wait_above_the_wire_limit_is_cut_to_it(server, client):
    server.default(ACQUIRE, ok(SEED_DATA))
    acquire(client, wait_ms=90_000)
    assert server.requests[0].json["wait_ms"] == 60_000


# -- GETs: the same transport (SPEC §18) -------------------------------------------------------


LEADER = "/v1/leader"


def test_get_is_a_plain_get_with_the_clients_headers(server):
    server.default(LEADER, ok({"lease": None, "is_live": False}))
    server.default("/v1/leader/history", ok({"entries": []}))
    server.default("/healthz", Reply(200, {"status": "ok"}))  # other JSON is the data
    with ControlApiClient(server.url, token=TOKEN, timeout_ms=2000) as api:
        assert api.get(LEADER) == {"lease": None, "is_live": False}
        assert api.get("/v1/leader/history", params={"limit": 10}) == {"entries": []}
        assert api.get("/healthz", authorized=False) == {"status": "ok"}
        assert api.call_counts() == {(server.url, o): 0 for o in OUTCOMES}  # POSTs' only
    leader, history, health = server.requests
    assert (leader.method, leader.path, leader.body) == ("GET", LEADER, b"")
    assert leader.headers["authorization"] == f"Bearer {TOKEN}"
    assert leader.headers["accept"] == "application/json"
    assert leader.headers["user-agent"] == f"conductord/{__version__}"
    assert "content-type" not in leader.headers  # no body, no type
    assert history.path == "/v1/leader/history?limit=10"
    assert "authorization" not in health.headers
    assert leader.connection == history.connection == health.connection  # one keep-alive pool


def test_get_asks_the_url_it_is_given_and_moves_nothing(server, second):
    refused = f"http://127.0.0.1:{closed_port()}"
    second.default(LEADER, ok({"term": 1}))
    with ControlApiClient([refused, second.url], timeout_ms=2000) as api:
        err = failure(api.get, LEADER)  # the URL in use; a GET never moves on by itself
        assert str(err) == "Control API /v1/leader: connection failed: Connection refused"
        assert api.get(LEADER, base_url=second.url + "/") == {"term": 1}
        assert api.base_url == refused  # the POSTs' URL is theirs to move
        assert not counts(api)
        with pytest.raises(ValueError):
            api.get(LEADER, base_url="http://127.0.0.1:1")


@pytest.mark.parametrize(
    ("reply", "expected", "status"),
    [
        (
            Reply(401, {"ok": False, "request_id": "r", "error": "unauthorized", "message": "no"}),
            "Control API 401 /v1/leader: unauthorized: no",
            401,
        ),
        (Reply(404, b""), "Control API 404 /v1/leader: Not Found", 404),
        (Reply(502, "<html>" + "x" * 300), "Control API 502 /v1/leader: <html>" + "x" * 194, 502),
        (Reply(200, "nope"), "Control API returned invalid JSON for /v1/leader.", 200),
        (
            Reply(200, {"ok": False, "request_id": "r", "error": "e", "message": "m"}),
            "Control API /v1/leader: e: m",
            200,
        ),
        (
            Reply(200, b"[" + b" " * MAX_BODY_BYTES + b"]"),
            f"Control API /v1/leader: response body larger than {MAX_BODY_BYTES} bytes",
            200,
        ),
        (Reply(hang=True), "Control API /v1/leader: timed out after 300 ms", None),
        (Reply(reset=True), "Control API /v1/leader: connection failed: ", None),
    ],
    ids=["401", "404-empty", "html-502", "not-json", "2xx-error", "too-large", "hang", "reset"],
)
def test_get_answers_by_the_spec_4_rules(server, reply, expected, status):
    server.default(LEADER, reply)
    with ControlApiClient(server.url, timeout_ms=300) as api:
        err = failure(api.get, LEADER, params={"limit": 3})  # {path} is without the query
    assert str(err).startswith(expected) and (str(err) == expected or expected.endswith(": "))
    assert err.status == status


def test_get_redacts_a_server_echoing_pieces_of_the_token(server):
    message = f"who is {TOKEN[3:17]}? " + "m" * 990 + TOKEN
    server.script(
        LEADER,
        Reply(403, {"ok": False, "request_id": "r", "error": "forbidden", "message": message}),
        Reply(500, f"Bearer {TOKEN[:-4]}"),
    )
    with ControlApiClient(server.url, token=TOKEN) as api:
        first, second = (str(failure(api.get, LEADER)) for _ in range(2))
    assert first.startswith("Control API 403 /v1/leader: forbidden: who is ***? mmm")
    assert second == "Control API 500 /v1/leader: Bearer ***"
    assert not token_pieces(first + second)


def test_get_and_capped_get_are_cut_at_the_whole_call_deadline(server):
    # A byte every 50 ms keeps every read within its timeout: only the gevent.Timeout ends it.
    trickle = Reply(200, success_envelope({"x": "y" * 200}, "r"), trickle=True)
    server.default(LEADER, trickle).default("/v1/status", trickle)
    results = run_patched([server.url], [["get"], ["capped_get"]], timeout_ms=400)["results"]
    [[(got, got_s)], [(capped, capped_s)]] = results
    assert got == "Control API /v1/leader: timed out after 400 ms"
    assert capped == "timeout: timed out"
    assert got_s < 4 and capped_s < 4


def test_capped_get_reads_any_endpoint_with_the_clients_policy(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # never consulted
    server.default("/v1/status", Reply(200, {"daemon": {}}))
    server.default("/big", Reply(200, b" " * (MAX_BODY_BYTES + 1)))
    server.default("/page", Reply(503, b"x" * (MAX_BODY_BYTES + 10)))
    answer = capped_get(server.url + "/v1/status", timeout_ms=1000)
    assert (answer.status, answer.reason, answer.json()) == (200, "OK", (True, {"daemon": {}}))
    assert server.requests[-1].headers["accept"] == "application/json"
    with pytest.raises(TransportError) as info:
        capped_get(server.url + "/big", timeout_ms=1000)
    assert (info.value.kind, info.value.status) == ("too_large", 200)
    page = capped_get(server.url + "/page", timeout_ms=1000)  # an error page is cut, not refused
    assert page.status == 503 and len(page.body) == MAX_BODY_BYTES + 1
    with pytest.raises(TransportError) as info:
        capped_get(f"http://127.0.0.1:{closed_port()}/v1/status", timeout_ms=1000)
    assert (info.value.kind, info.value.detail) == ("refused", "Connection refused")
