"""The reference Control API over real HTTP: a server subprocess on 127.0.0.1, `requests` clients.

Stateless checks share one module-wide server; lease scenarios get a fresh server (and database)
each. A few in-process tests cover what a subprocess cannot show: TCP_NODELAY on accepted
sockets and the 500/503 envelopes of a failing store.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import stat
import time

import pytest
import requests
import structlog

from conductord.control_api.app import MAX_BODY_BYTES, ControlApiApp
from conductord.control_api.server import main as server_main
from conductord.control_api.store import StoreError
from conductord.logs import configure
from tests.support.control_api import ControlApiProcess, run_control_api
from tests.support.race import run_together
from tests.support.wait import wait_until

ACQUIRE = "/v1/leader/acquire"
RELEASE = "/v1/leader/release"
HEARTBEAT = "/v1/controllers/heartbeat"


@pytest.fixture(autouse=True)
def _restore_logging():
    # In-process tests configure structlog (to capsys or a StringIO); leave no trace behind.
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory):
    db = tmp_path_factory.mktemp("shared") / "control.sqlite3"
    with ControlApiProcess(str(db), token=f"mod-{secrets.token_hex(8)}").start() as server:
        yield server


def post(server, path, body, *, token=True, session=None, **kwargs):
    headers = server.headers if token else {}
    return (session or requests).post(
        server.url + path, json=body, headers=headers, timeout=10, **kwargs
    )


def get(server, path, *, token=True):
    return requests.get(server.url + path, headers=server.headers if token else {}, timeout=10)


def acquire(server, controller_id, *, ttl=10, session=None, **extra):
    body = {"controller_id": controller_id, "host": f"{controller_id}-host", "ttl_sec": ttl}
    body.update(extra)
    response = post(server, ACQUIRE, body, session=session)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def release(server, controller_id, term):
    response = post(server, RELEASE, {"controller_id": controller_id, "term": term})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["ok"] is False
    assert body["error"] == code
    assert body["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# -- envelopes, auth, errors --------------------------------------------------------------------


def test_healthz_needs_no_token_and_carries_a_request_id(shared_api):
    response = requests.get(shared_api.url + "/healthz", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    # The store kind (SPEC §17): a node given several URLs warns about a SQLite one.
    assert body["data"] == {"status": "ok", "store": "sqlite"}
    assert body["request_id"] == response.headers["x-request-id"]
    assert len(body["request_id"]) >= 16


def test_a_plain_caller_request_id_is_echoed(shared_api):
    response = requests.get(
        shared_api.url + "/healthz", headers={"x-request-id": "trace-42"}, timeout=10
    )
    assert response.json()["request_id"] == "trace-42"
    hostile = requests.get(
        shared_api.url + "/healthz", headers={"x-request-id": "<script>"}, timeout=10
    )
    assert hostile.json()["request_id"] != "<script>"


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong-token"}, {"authorization": "Basic abc"}],
    ids=["missing", "wrong", "other-scheme"],
)
def test_everything_but_healthz_needs_the_token(shared_api, headers):
    for method, path in (("GET", "/v1/leader"), ("GET", "/v1/controllers"), ("POST", ACQUIRE)):
        response = requests.request(
            method, shared_api.url + path, headers=headers, json={}, timeout=10
        )
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_auth_failures_are_logged_without_any_token(shared_api):
    bad = "wrong-" + secrets.token_hex(6)
    response = requests.get(
        shared_api.url + "/v1/leader", headers={"authorization": f"Bearer {bad}"}, timeout=10
    )
    request_id = response.headers["x-request-id"]

    def logged():
        return [e for e in shared_api.logs("auth.failed") if e["request_id"] == request_id]

    wait_until(logged)
    [entry] = logged()
    assert entry["reason"] == "invalid_token"
    assert entry["path"] == "/v1/leader"
    output = "\n".join(shared_api.stdout_lines) + shared_api.stderr
    assert bad not in output
    assert shared_api.token not in output


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"controller_id", "host", "ttl_sec"}),
        ({"controller_id": " ", "host": "h", "ttl_sec": 5}, {"controller_id"}),
        ({"controller_id": "a", "host": "h", "ttl_sec": 0}, {"ttl_sec"}),
        ({"controller_id": "a", "host": "h", "ttl_sec": "5"}, {"ttl_sec"}),
        ({"controller_id": "a", "host": "h", "ttl_sec": 1.5}, {"ttl_sec"}),
        ({"controller_id": "a", "host": "h", "ttl_sec": 5, "preferred": "yes"}, {"preferred"}),
    ],
)
def test_invalid_acquire_fields_give_400_with_details(shared_api, body, fields):
    error = assert_error(post(shared_api, ACQUIRE, body), 400, "invalid_request")
    assert set(error["details"]) == fields


def test_invalid_release_and_heartbeat_fields_give_400(shared_api):
    error = assert_error(post(shared_api, RELEASE, {"controller_id": "a"}), 400, "invalid_request")
    assert set(error["details"]) == {"term"}
    error = assert_error(post(shared_api, HEARTBEAT, {"host": "h"}), 400, "invalid_request")
    assert set(error["details"]) == {"controller_id"}


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_invalid_json_gives_400(shared_api, data):
    response = requests.post(
        shared_api.url + ACQUIRE,
        data=data,
        headers={**shared_api.headers, "content-type": "application/json"},
        timeout=10,
    )
    error = assert_error(response, 400, "invalid_json")
    assert error["details"]["body"]


def test_unknown_path_is_a_404_envelope(shared_api):
    assert_error(get(shared_api, "/v1/nope"), 404, "not_found")
    assert_error(get(shared_api, "/"), 404, "not_found")
    # SPEC §9: an unknown path is a 404 whoever asks; the token guards the routes that exist
    assert_error(get(shared_api, "/v1/nope", token=False), 404, "not_found")
    assert_error(get(shared_api, "/v1/leader", token=False), 401, "unauthorized")


def test_wrong_method_is_a_405_envelope_with_allow(shared_api):
    response = get(shared_api, ACQUIRE)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    response = post(shared_api, "/v1/leader", {})
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


def test_oversized_body_is_a_413_envelope(shared_api):
    body = {"controller_id": "a", "host": "h", "ttl_sec": 5, "pad": "x" * MAX_BODY_BYTES}
    assert_error(post(shared_api, ACQUIRE, body), 413, "payload_too_large")


def test_oversized_chunked_body_is_a_413_envelope(shared_api):
    def chunks():
        for _ in range(5):
            yield b" " * (MAX_BODY_BYTES // 4)

    response = requests.post(
        shared_api.url + ACQUIRE, data=chunks(), headers=shared_api.headers, timeout=10
    )
    assert_error(response, 413, "payload_too_large")


def test_content_length_is_refused_before_the_body_is_read(shared_api):
    """Only headers are sent: the 413 must come back without waiting for 10 MB."""
    with socket.create_connection(("127.0.0.1", shared_api.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST {ACQUIRE} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {shared_api.token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "connection closed without an answer"
            head += chunk
    assert head.startswith(b"HTTP/1.1 413")


# -- lease rules over HTTP ----------------------------------------------------------------------


def test_acquire_renew_deny_release_over_http(control_api):
    first = acquire(control_api, "a", ttl=30, preferred=True, metadata_json='{"v":1}')
    assert first["operation"] == "acquire"
    assert first["is_leader"] is True
    assert (first["holder_id"], first["holder_host"], first["term"]) == ("a", "a-host", 1)
    assert first["lease"]["lease_name"] == "global"
    assert first["lease"]["preferred_holder_id"] == "a"
    assert first["lease"]["metadata_json"] == '{"v":1}'

    renewed = acquire(control_api, "a", ttl=30)
    assert (renewed["operation"], renewed["term"], renewed["is_leader"]) == ("renew", 1, True)

    denied = acquire(control_api, "b", ttl=30, preferred=True)
    assert denied["is_leader"] is False
    assert denied["operation"] == "acquire"
    assert (denied["holder_id"], denied["term"]) == ("a", 1)
    # Preference is recorded, never used to preempt the live holder.
    assert denied["lease"]["preferred_holder_id"] == "b"

    assert release(control_api, "b", 1)["released"] is False
    assert release(control_api, "a", 2)["released"] is False
    assert acquire(control_api, "b")["is_leader"] is False  # still a's lease

    released = release(control_api, "a", 1)
    assert released["released"] is True
    assert released["lease"]["term"] == 1

    taken = acquire(control_api, "b")
    assert (taken["operation"], taken["holder_id"], taken["term"]) == ("acquire", "b", 2)
    # The server logs before it answers, but the test reads its stdout on another thread.
    deadline = time.monotonic() + 10
    while len(control_api.logs("lease.granted")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    entries = control_api.logs()
    events = [e["event"] for e in entries]
    assert events.count("lease.granted") == 2
    assert events.count("lease.released") == 1
    assert "lease.takeover" not in events  # released, not expired
    # Renewals, denials and requests are debug-only: a steady fleet logs nothing per call.
    assert not {"http.request", "lease.renew", "lease.deny"} & set(events)


def test_takeover_after_expiry_with_subsecond_expiry_and_truncated_wire_times(control_api):
    first = acquire(control_api, "a", ttl=1)
    assert first["lease_expires_at"] - first["renewed_at"] == 1
    assert isinstance(first["lease_expires_at"], int)
    leader = get(control_api, "/v1/leader").json()["data"]
    assert leader["lease"]["holder_id"] == "a"
    if leader["is_live"]:
        # Seconds left keep their fraction; a whole-second rounding would show 1 or 0.
        assert 0 < leader["expires_in_sec"] <= 1
    wait_until(lambda: not get(control_api, "/v1/leader").json()["data"]["is_live"], timeout=10)
    taken = acquire(control_api, "b", ttl=5)
    assert (taken["holder_id"], taken["term"], taken["is_leader"]) == ("b", 2, True)
    takeover = control_api.wait_for_log("lease.takeover")
    assert takeover["previous_holder_id"] == "a"
    assert takeover["previous_term"] == 1
    assert takeover["term"] == 2
    assert takeover["expired_for_sec"] >= 0


def test_client_now_is_recorded_not_trusted(control_api):
    before = int(time.time())
    for client_now in (0, 4_000_000_000):
        data = acquire(control_api, "a", ttl=10, now=client_now)
        assert before - 1 <= data["renewed_at"] <= int(time.time()) + 1
        assert data["lease_expires_at"] == data["renewed_at"] + 10


def test_heartbeat_and_controllers(control_api):
    body = {
        "controller_id": "mini-main",
        "host": "mini",
        "role": "primary",
        "priority": 100,
        "status": "standby",
        "version": "0.1.0",
        "heartbeat_at": 1,
        "started_at": 1,
    }
    response = post(control_api, HEARTBEAT, body)
    assert response.status_code == 200, response.text
    assert response.json()["data"]["controller_id"] == "mini-main"
    post(control_api, HEARTBEAT, {**body, "status": "leader"})
    post(control_api, HEARTBEAT, {"controller_id": "mini-standby", "host": "mini2"})
    data = get(control_api, "/v1/controllers").json()["data"]
    by_id = {c["controller_id"]: c for c in data["controllers"]}
    assert set(by_id) == {"mini-main", "mini-standby"}
    main = by_id["mini-main"]
    assert (main["status"], main["priority"], main["role"]) == ("leader", 100, "primary")
    assert 0 <= main["seconds_since_heartbeat"] < 10
    assert abs(main["last_seen_at"] - time.time()) < 10  # the server's clock, not heartbeat_at


def test_concurrent_acquires_yield_exactly_one_leader(control_api):
    def worker(i):
        with requests.Session() as session:
            return acquire(control_api, f"node-{i}", session=session)

    results = run_together(worker, 20)
    leaders = [r for r in results if r["is_leader"]]
    assert len(leaders) == 1
    assert {(r["holder_id"], r["term"]) for r in results} == {(leaders[0]["holder_id"], 1)}
    assert len(control_api.logs("lease.granted")) == 1


def test_acknowledged_lease_survives_kill_9_and_terms_never_go_back(control_api):
    first = acquire(control_api, "a", ttl=60)
    assert control_api.kill() == -9
    control_api.restart()
    leader = get(control_api, "/v1/leader").json()["data"]
    assert leader["is_live"] is True
    assert (leader["lease"]["holder_id"], leader["lease"]["term"]) == ("a", first["term"])
    assert acquire(control_api, "b")["is_leader"] is False
    resumed = acquire(control_api, "a")
    assert (resumed["operation"], resumed["term"]) == ("renew", 1)
    assert release(control_api, "a", 1)["released"] is True
    assert control_api.kill() == -9
    control_api.restart()
    assert acquire(control_api, "b")["term"] == 2


def test_sigterm_stops_cleanly_and_database_files_are_owner_only(control_api):
    acquire(control_api, "a")  # a write, so -wal and -shm exist
    db = control_api.db_path
    for path in (db, db + "-wal", db + "-shm"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    with requests.Session() as idle:  # an idle keep-alive peer must not hold up the stop
        assert idle.get(control_api.url + "/healthz", timeout=10).status_code == 200
        assert control_api.stop() == 0
    events = [e["event"] for e in control_api.logs()]
    assert events[-2:] == ["control_api.stopping", "control_api.stopped"]
    assert control_api.stderr == ""


def test_without_a_token_it_serves_on_loopback_and_warns(tmp_path):
    with ControlApiProcess(str(tmp_path / "db.sqlite3")).start() as server:
        assert acquire(server, "a")["is_leader"] is True
        warning = server.wait_for_log("config.warning")
        assert "no shared token" in warning["message"]
        assert server.wait_for_log("control_api.listening")["auth"] is False


# -- refusals at start-up -------------------------------------------------------------------


def assert_refused(code, out, err, text):
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("conductord: error: ")
    assert text in lines[0]
    assert "Traceback" not in err


def test_non_loopback_without_token_is_refused_by_the_process(tmp_path):
    db = tmp_path / "db.sqlite3"
    result = run_control_api(["--listen", "0.0.0.0:0", "--db", str(db)])
    assert_refused(result.returncode, result.stdout, result.stderr, "non-loopback")
    assert not db.exists()


@pytest.mark.parametrize(
    ("args", "env", "text"),
    [
        (["--listen", "[::]:0"], {}, "non-loopback address :: without a shared token"),
        ([], {"BAA_CONTROL_API_LISTEN": "nope"}, "BAA_CONTROL_API_LISTEN"),
        (["--listen", "127.0.0.1:99999"], {}, "port 0-65535"),
        (["--db", "{tmp}/missing-dir/db"], {}, "cannot open database"),
        (["--log-level", "loud"], {}, "--log-level / BAA_LOG_LEVEL"),
        ([], {"BAA_SHARED_TOKEN_FILE": "{tmp}/absent"}, "BAA_SHARED_TOKEN_FILE: cannot read"),
        (
            ["--shared-token", "s3cret-value", "--shared-token-file", "{tmp}/t"],
            {},
            "mutually exclusive",
        ),
        (["--shared-tokn=s3cret-value"], {}, "unknown option --shared-tokn"),
    ],
    ids=[
        "ipv6-any",
        "bad-listen",
        "bad-port",
        "unwritable-db",
        "bad-log-level",
        "token-file",
        "two-tokens",
        "unknown-option",
    ],
)
def test_configuration_mistakes_are_one_line_and_exit_2(tmp_path, capsys, args, env, text):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    if "--listen" not in argv and "BAA_CONTROL_API_LISTEN" not in env:
        argv += ["--listen", "127.0.0.1:0"]  # never the default port 8787 in tests
    if "--db" not in argv:
        argv += ["--db", str(tmp_path / "db.sqlite3")]
    code = server_main(argv, env)
    out, err = capsys.readouterr()
    assert_refused(code, out, err, text)
    assert "s3cret-value" not in err


def test_port_in_use_is_refused(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = server_main(["--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "db")], {})
    out, err = capsys.readouterr()
    assert_refused(code, out, err, f"cannot listen on 127.0.0.1:{port}")


# -- in process -------------------------------------------------------------------------------


def test_accepted_sockets_get_tcp_nodelay():
    import gevent.socket
    from gevent.pywsgi import WSGIHandler

    from conductord.httpserver import LimitedWSGIServer

    seen: list[int] = []

    class Probe(WSGIHandler):
        """Sees the accepted socket as the server hands it over."""

        def handle(self):
            seen.append(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            return super().handle()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = LimitedWSGIServer(
        ("127.0.0.1", 0),
        app,
        log=configure(stream=io.StringIO()),
        max_connections=8,
        max_body_bytes=1024,
        handler_class=Probe,
    )
    server.start()
    try:
        conn = gevent.socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
        with conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert seen and seen[0] != 0
    finally:
        server.stop(timeout=1)


class _FailingStore:
    def __init__(self, exc):
        self.exc = exc

    def leader(self):
        raise self.exc

    def now(self):
        return time.time()

    def lease_time(self):
        return time.monotonic()


def _call(app, path="/v1/leader"):
    captured = {}

    def start_response(status, headers):
        captured["status"], captured["headers"] = status, dict(headers)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "wsgi.input": io.BytesIO()}
    body = b"".join(app(environ, start_response))
    return captured["status"], captured["headers"], json.loads(body)


def test_unexpected_errors_are_500_envelopes_and_an_error_log_line():
    stream = io.StringIO()
    log = configure(level="info", stream=stream)
    status, headers, body = _call(ControlApiApp(_FailingStore(RuntimeError("boom")), log=log))
    assert status.startswith("500")
    assert body["ok"] is False and body["error"] == "internal_error"
    assert "boom" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    assert headers["X-Request-Id"] == body["request_id"]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in lines] == [("http.error", "error")]


def test_store_failures_are_503_envelopes():
    log = configure(level="info", stream=io.StringIO())
    status, _, body = _call(ControlApiApp(_FailingStore(StoreError("disk full")), log=log))
    assert status.startswith("503")
    assert body["error"] == "unavailable"
    status, _, body = _call(
        ControlApiApp(_FailingStore(StoreError("disk full")), log=log), "/healthz"
    )
    assert status.startswith("503")


# -- request heads: stock gevent.pywsgi behind the server's reader and guard -----------------


def raw_exchange(server, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes: (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def healthz_with(extra: bytes, *, eol: bytes = b"\r\n") -> bytes:
    lines = [b"GET /healthz HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    return eol.join(lines) + eol + extra + eol


@pytest.mark.parametrize(
    "extra",
    [
        b"X-A: one\rX-Request-Id: injected\r\n",  # a bare CR: the email parser makes 2 headers
        b"X-A: one\r\n folded continuation\r\n",
        b"X-A: nul \x00 byte\r\n",
        b"X-A: delete \x7f char\r\n",
        b"X-A: vertical \x0b tab\r\n",
        b"Content-Length: \xb2\r\n",  # a latin-1 superscript two: str.isdigit() says yes
        b"".join(b"X-H%d: v\r\n" % i for i in range(99)),  # 101 header lines
        b"X-Long: " + b"v" * 20_000 + b"\r\n",  # over the 16 KiB head
    ],
    ids=["bare-cr", "folded", "nul", "del", "vt", "unicode-digit-length", "101-lines", "long-line"],
)
def test_malformed_request_headers_are_a_plain_400_and_close(shared_api, extra):
    # (Logged as rate-limited `http.protocol_error` warnings: test_http_limits checks those.)
    status, headers, body = raw_exchange(shared_api, healthz_with(extra))
    assert status.startswith("HTTP/1.1 400"), (status, body)
    assert headers.get("connection") == "close"
    assert "x-request-id" not in headers  # refused before the app ran
    assert "Traceback" not in shared_api.stderr


@pytest.mark.parametrize(
    "extra",
    [
        b"X-A : blank before the colon\r\n",
        b"no colon at all\r\n",
        b": no name\r\n",
        b"Content-Length: 2\r\nContent-Length: 3\r\n",
        b"Content-Length: +0\r\n",
        b"Content-Length: 1_0\r\n",
    ],
    ids=[
        "space-before-colon",
        "no-colon",
        "empty-name",
        "two-lengths",
        "plus-length",
        "underscore-length",
    ],
)
def test_header_blocks_the_guard_refuses_are_400_envelopes_and_close(shared_api, extra):
    status, headers, body = raw_exchange(shared_api, healthz_with(extra))
    assert status.startswith("HTTP/1.1 400"), (status, body)
    assert headers.get("connection") == "close"
    assert json.loads(body)["request_id"] == headers["x-request-id"]
    assert "Traceback" not in shared_api.stderr


def test_a_request_line_gevent_would_choke_on_is_closed_quietly(shared_api):
    # "HTTP/1" made gevent raise IndexError and print a traceback; the reader closes instead.
    for line in (b"GET / HTTP/1\r\n", b"GET / HTTP/2.0\r\n", b"PRI * HTTP/2.0\r\n"):
        status, _, _ = raw_exchange(shared_api, line + b"Host: x\r\n\r\n")
        assert status == ""  # closed without an answer
    assert "Traceback" not in shared_api.stderr


@pytest.mark.parametrize(
    ("extra", "eol", "request_id"),
    [
        (b"X-Request-Id: \t trimmed-id \t\r\n", b"\r\n", "trimmed-id"),
        (b"x-request-id: lf-only\n", b"\n", "lf-only"),  # bare LF line ends, lower case
        (b"X-Note: caf\xe9 \tinner tab\r\nX-Request-Id: obs-text\r\n", b"\r\n", "obs-text"),
        (b"Content-Length: 0\r\nContent-Length: 0\r\nX-Request-Id: same\r\n", b"\r\n", "same"),
        (
            b"".join(b"X-H%d: v\r\n" % i for i in range(90)) + b"X-Request-Id: n93\r\n",
            b"\r\n",
            "n93",
        ),
    ],
    ids=["trimmed", "lf-only", "obs-text-and-tab", "equal-lengths", "93-lines"],
)
def test_well_formed_request_headers_reach_the_app(shared_api, extra, eol, request_id):
    status, headers, body = raw_exchange(shared_api, healthz_with(extra, eol=eol))
    assert status.startswith("HTTP/1.1 200"), (status, body)
    assert headers["x-request-id"] == request_id
    assert json.loads(body)["request_id"] == request_id


def test_keep_alive_serves_many_requests_on_one_connection(shared_api):
    with requests.Session() as session:
        for index in range(20):
            response = session.post(
                shared_api.url + ACQUIRE,
                json={"controller_id": f"ka-{index % 2}", "host": "h", "ttl_sec": 5},
                headers=shared_api.headers,
                timeout=10,
            )
            assert response.status_code == 200, response.text
            assert response.headers.get("connection") != "close"
    assert not shared_api.logs("http.connection_error")


def test_a_pipelined_request_is_served_after_the_first(shared_api):
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: first\r\n\r\n"
    two = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: second\r\nConnection: close\r\n\r\n"
    status, _, body = raw_exchange(shared_api, one + two)
    assert status.startswith("HTTP/1.1 200")
    assert b'"request_id":"first"' in body and b'"request_id":"second"' in body


# -- invalid bodies: the schema words the 400 -------------------------------------------------


def test_invalid_hot_bodies_keep_marshmallows_messages():
    from marshmallow import ValidationError

    from conductord import wire

    app = ControlApiApp(_FailingStore(RuntimeError("unused")), log=configure(stream=io.StringIO()))
    body = json.dumps({"controller_id": " ", "host": 5, "ttl_sec": True, "wait_ms": -1}).encode()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": ACQUIRE,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    captured = {}
    payload = json.loads(b"".join(app(environ, lambda s, h: captured.update(status=s))))
    assert captured["status"].startswith("400")
    assert payload["message"] == "invalid fields: controller_id, host, ttl_sec, wait_ms"
    with pytest.raises(ValidationError) as caught:
        wire.AcquireRequestSchema().load(json.loads(body))
    assert payload["details"] == caught.value.messages


# -- a heartbeat riding on the acquire (issue 20) ---------------------------------------------


def test_a_heartbeat_riding_on_an_acquire_is_recorded_and_acknowledged(control_api):
    ridden = {"role": "standby", "priority": 50, "status": "standby", "version": "9.9"}
    answer = acquire(control_api, "rider", instance_id="i-1", heartbeat=ridden)
    assert answer["heartbeat_recorded"] is True
    rows = get(control_api, "/v1/controllers").json()["data"]["controllers"]
    (row,) = [r for r in rows if r["controller_id"] == "rider"]
    assert (row["host"], row["role"], row["priority"], row["version"]) == (
        "rider-host",
        "standby",
        50,
        "9.9",
    )
    assert row["instance_id"] == "i-1" and row["seconds_since_heartbeat"] < 5
    # Without one, or from a one-shot run (never recorded), the answer does not say so.
    assert "heartbeat_recorded" not in acquire(control_api, "plain")
    one_shot = acquire(control_api, "probe", heartbeat=ridden, one_shot=True)
    assert "heartbeat_recorded" not in one_shot
    rows = get(control_api, "/v1/controllers").json()["data"]["controllers"]
    assert {r["controller_id"] for r in rows} == {"rider"}
    # The ridden fields are checked like a heartbeat's own.
    bad = post(
        control_api,
        ACQUIRE,
        {"controller_id": "x", "host": "h", "ttl_sec": 5, "heartbeat": {"priority": -1}},
    )
    assert bad.status_code == 400 and "heartbeat" in bad.json()["details"]
