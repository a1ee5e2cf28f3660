"""The limits of our HTTP servers under hostile clients (SPEC §9 Limits, issue 15).

Real sockets on 127.0.0.1 against real subprocesses: the reference Control API (some runs under
a low descriptor limit, as launchd's default 256) and a node's status endpoint. Each case is
one named finding of issue 15: idle connections filling the descriptor table, half-sent
requests, an oversized header block, ambiguous framing, malformed bodies, long-poll squatting.
"""

from __future__ import annotations

import json
import resource
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support import control_api as control_api_support
from tests.support.control_api import ControlApiProcess
from tests.support.daemon import FakeControlApi, clean_env
from tests.support.scripted_server import ScriptedServer

ACQUIRE = "/v1/leader/acquire"
RELEASE = "/v1/leader/release"

LOW_NOFILE = 256  # launchd's default soft and hard limit

# Runs `python -m conductord ARGS...` with RLIMIT_NOFILE lowered (soft and hard) first.
_LAUNCH = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'conductord', *sys.argv[2:]])\n"
)


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_NOFILE, LOW_NOFILE))


@pytest.fixture
def api(tmp_path) -> Iterator[ControlApiProcess]:
    token = f"lim-{secrets.token_hex(8)}"
    with ControlApiProcess(str(tmp_path / "control.sqlite3"), token=token).start() as server:
        yield server


@pytest.fixture
def low_api(tmp_path, monkeypatch) -> Iterator[ControlApiProcess]:
    """The Control API under a descriptor limit of 256 (soft and hard, so none to raise)."""
    monkeypatch.setattr(
        control_api_support,
        "COMMAND",
        (sys.executable, "-c", _LAUNCH, str(LOW_NOFILE), "control-api"),
    )
    token = f"low-{secrets.token_hex(8)}"
    with ControlApiProcess(str(tmp_path / "control.sqlite3"), token=token).start() as server:
        yield server


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_until_close(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes: (bytes, closed within `timeout`)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def statuses(data: bytes) -> list[int]:
    """The status codes of every answer in a byte stream of HTTP/1.1 answers."""
    found = []
    for part in data.split(b"HTTP/1.1 ")[1:]:
        code = part[:3]
        if code.isdigit():
            found.append(int(code))
    return found


def head_and_body(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def request(
    api: ControlApiProcess, method: str, path: str, body: bytes = b"", headers: bytes = b""
) -> bytes:
    auth = f"Authorization: Bearer {api.token}\r\n".encode() if api.token else b""
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + auth
        + b"Content-Type: application/json\r\n"
        + length
        + headers
        + b"\r\n"
        + body
    )


def no_tracebacks(api: ControlApiProcess) -> None:
    assert "Traceback" not in api.stderr, api.stderr[-3000:]
    for line in api.stdout_lines:
        assert "Traceback" not in line, line


# -- connections -------------------------------------------------------------------------------


def test_idle_connections_do_not_lock_out_an_honest_request(low_api):
    idle: list[socket.socket] = []
    try:
        for _ in range(300):  # more than the whole descriptor table of the server
            idle.append(connect(low_api.port))
        started = time.monotonic()
        answer = requests.get(low_api.url + "/healthz", timeout=5)
        assert answer.status_code == 200
        assert time.monotonic() - started < 3.0
        # And an authenticated POST on a fresh connection too, while the idle ones stay.
        answer = requests.post(
            low_api.url + ACQUIRE,
            json={"controller_id": "honest", "host": "h", "ttl_sec": 10},
            headers=low_api.headers,
            timeout=5,
        )
        assert answer.status_code == 200, answer.text
    finally:
        for sock in idle:
            sock.close()
    assert requests.get(low_api.url + "/healthz", timeout=5).status_code == 200
    no_tracebacks(low_api)


@pytest.mark.slow
def test_half_sent_requests_are_cut_after_the_request_deadline(api):
    half_head = b"POST /v1/leader/acquire HTTP/1.1\r\nHost: x\r\nContent-"
    half_body = request(api, "POST", ACQUIRE, b'{"controller_id": "x", "host": "h"}')[:-10]
    socks = [connect(api.port, timeout=20) for _ in range(20)]
    started = time.monotonic()
    for index, sock in enumerate(socks):
        sock.sendall(half_head if index % 2 else half_body)
    answers = []
    for sock in socks:
        with sock:
            data, closed = read_until_close(sock, timeout=16 - (time.monotonic() - started))
        assert closed, "the server kept a half-sent request open"
        answers.append(data)
    elapsed = time.monotonic() - started
    assert 9.0 <= elapsed <= 14.0, elapsed
    # A half-sent head: gevent's plain 400; a half-sent body: the app's 408 envelope.
    assert {statuses(data)[0] for data in answers[1::2]} == {400}
    for data in answers[0::2]:
        status, headers, body = head_and_body(data)
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["request_id"]
    assert requests.get(api.url + "/healthz", timeout=5).status_code == 200
    no_tracebacks(api)


# -- heads and framing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "padding",
    [
        b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(17)),  # 17 KiB, 17 lines
        b"X-Long: " + b"v" * (17 * 1024) + b"\r\n",  # one 17 KiB line (gevent allows 64 KiB)
        b"".join(b"X-H%d: v\r\n" % i for i in range(97)),  # 99 lines: http.client's limit
    ],
    ids=["many-lines", "one-line", "too-many-lines"],
)
def test_an_oversized_header_block_is_refused_before_the_app_runs(api, padding):
    with connect(api.port) as sock:
        sock.sendall(request(api, "GET", "/healthz", headers=padding))
        data, closed = read_until_close(sock, timeout=5)
    assert closed
    status, headers, _ = head_and_body(data)
    assert status in (400, 431)
    assert "x-request-id" not in headers  # the app (which always sets it) never ran
    assert api.wait_for_log("http.protocol_error")["level"] == "warning"
    no_tracebacks(api)


SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        (b"Content-Length: 5\r\nTransfer-Encoding: gzip\r\n", b"abcde"),
        (b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        (b"Transfer-Encoding: chunked \r\n", b"0\r\n\r\n"),
        (b"Content-Length: 2\r\nContent-Length: 5\r\n", b"{}\r\n\r\n"),
        (b"Content-Length: +2\r\n", b"{}"),
        (b"Content-Length: 1_0\r\n", b"{}" * 5),
    ],
    ids=[
        "cl-then-te",
        "te-then-cl",
        "te-gzip",
        "te-list",
        "te-twice",
        "te-trailing-blank",
        "two-lengths",
        "plus-length",
        "underscore-length",
    ],
)
def test_ambiguous_framing_is_a_400_and_the_connection_closes(api, framing, body):
    head = (
        b"POST /v1/leader/release HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {api.token}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + framing
        + b"\r\n"
    )
    with connect(api.port) as sock:
        sock.sendall(head + body + SMUGGLED)  # a second request right behind the first
        data, closed = read_until_close(sock, timeout=5)
    assert closed, data
    assert statuses(data) == [400], data  # the request behind it was never read
    _, headers, payload = head_and_body(data)
    assert headers["connection"] == "close"
    assert json.loads(payload)["request_id"]
    no_tracebacks(api)


# -- bodies ------------------------------------------------------------------------------------


def _acquire_json(**fields: Any) -> bytes:
    return json.dumps({"controller_id": "c", "host": "h", "ttl_sec": 10, **fields}).encode()


MALFORMED = {
    "nested-arrays": b"[" * 30_000 + b"]" * 30_000,
    "nested-in-a-field": b'{"controller_id": "c", "host": "h", "ttl_sec": 10, "x": '
    + b"[" * 20_000
    + b"]" * 20_000
    + b"}",
    "int-2-63": _acquire_json(ttl_sec=2**63),
    "int-in-an-unknown-field": _acquire_json(extra=2**70),
    "negative-2-63-minus-1": _acquire_json(now=-(2**63) - 1),
    "lone-surrogate": b'{"controller_id": "\\ud800", "host": "h", "ttl_sec": 10}',
    "lone-low-surrogate-key": b'{"\\udc00": 1, "controller_id": "c", "host": "h", "ttl_sec": 1}',
    "invalid-utf8": b'{"controller_id": "\xff\xfe", "host": "h", "ttl_sec": 10}',
    "nan": b'{"controller_id": "c", "host": "h", "ttl_sec": 10, "now": NaN}',
    "infinity-by-overflow": b'{"controller_id": "c", "host": "h", "ttl_sec": 10, "now": 1e999}',
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_bodies_are_400_envelopes_logged_once_without_a_traceback(api, name):
    since = len(api.stdout_lines)
    with connect(api.port) as sock:
        sock.sendall(request(api, "POST", ACQUIRE, MALFORMED[name], b"Connection: close\r\n"))
        data, closed = read_until_close(sock, timeout=10)
    assert closed
    status, headers, body = head_and_body(data)
    assert status == 400, body[:300]
    envelope = json.loads(body)
    assert envelope["ok"] is False and envelope["request_id"] == headers["x-request-id"]
    logged = api.wait_for_log("http.bad_request", since=since)
    assert logged["level"] == "warning" and logged["request_id"] == envelope["request_id"]
    assert "exception" not in logged
    assert len(api.logs("http.bad_request", since=since)) == 1
    no_tracebacks(api)


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",  # not hex
        b"\r\n{}\r\n0\r\n\r\n",  # no size at all
        b"2\r\n{}XX0\r\n\r\n",  # no CRLF after the data
        b"ffffffffffffffffff\r\n{}",  # longer than any 64-bit size
        b"2;" + b"e" * 70_000 + b"\r\n{}\r\n0\r\n\r\n",  # an endless chunk extension
        b"2\r\n{}\r\n0\r\nbad trailer\x00\r\n\r\n",  # a trailer that is not a header
    ],
    ids=["not-hex", "no-size", "no-crlf", "huge-size", "long-extension", "bad-trailer"],
)
def test_malformed_chunked_bodies_are_400_envelopes(api, chunks):
    since = len(api.stdout_lines)
    with connect(api.port) as sock:
        sock.sendall(request(api, "POST", ACQUIRE, headers=b"Transfer-Encoding: chunked\r\n"))
        sock.sendall(chunks)
        sock.shutdown(socket.SHUT_WR)
        data, closed = read_until_close(sock, timeout=10)
    assert closed
    status, headers, body = head_and_body(data)
    assert status in (400, 413), body[:300]
    assert json.loads(body)["request_id"] == headers["x-request-id"]
    assert api.wait_for_log("http.bad_request", since=since)["level"] == "warning"
    no_tracebacks(api)


def test_a_flood_of_malformed_bodies_is_logged_rate_limited(api):
    since = len(api.stdout_lines)
    session = requests.Session()
    for _ in range(60):
        answer = session.post(
            api.url + ACQUIRE, data=b"[" * 5000, headers=api.headers, timeout=5
        )
        assert answer.status_code == 400
    time.sleep(0.2)
    logged = api.logs("http.bad_request", since=since)
    assert 1 <= len(logged) <= 10
    no_tracebacks(api)


# -- long-poll squatting -------------------------------------------------------------------


def test_a_thousand_long_polls_from_one_client_do_not_starve_another_controller(api):
    holder = requests.post(
        api.url + ACQUIRE,
        json={"controller_id": "holder", "host": "h", "ttl_sec": 30},
        headers=api.headers,
        timeout=5,
    ).json()["data"]
    assert holder["is_leader"]
    squat = request(
        api, "POST", ACQUIRE, _acquire_json(controller_id="squatter", ttl_sec=30, wait_ms=20_000)
    )
    selector = selectors.DefaultSelector()
    socks = []
    try:
        for _ in range(1000):
            sock = connect(api.port)
            sock.sendall(squat)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        refused = 0
        deadline = time.monotonic() + 15
        while refused < 990 and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                data = key.fileobj.recv(65536)
                selector.unregister(key.fileobj)
                if statuses(data) == [429]:
                    refused += 1
        assert refused >= 990, refused

        parked = requests.get(api.url + "/v1/leader", headers=api.headers, timeout=5).json()
        squatting = parked["data"]["waiters"]
        assert 1 <= squatting <= 8, squatting

        answers: list[requests.Response] = []
        standby = threading.Thread(
            target=lambda: answers.append(
                requests.post(
                    api.url + ACQUIRE,
                    json={"controller_id": "standby", "host": "s", "ttl_sec": 30, "wait_ms": 3000},
                    headers=api.headers,
                    timeout=15,
                )
            )
        )
        standby.start()
        deadline = time.monotonic() + 5
        while True:  # the standby is parked beside the squatter, not refused
            info = requests.get(api.url + "/v1/leader", headers=api.headers, timeout=5).json()
            if info["data"]["waiters"] == squatting + 1 or answers:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.02)
        standby.join(timeout=15)
        assert answers and answers[0].status_code == 200, answers and answers[0].text
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    no_tracebacks(api)


# -- the status endpoint ---------------------------------------------------------------------


def test_the_status_endpoint_under_idle_connection_pressure_still_answers(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    local = f"http://127.0.0.1:{port}"
    with ScriptedServer() as control:
        FakeControlApi(control)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conductord",
                "start",
                "--node-id",
                "pressure-main",
                "--control-api-base",
                control.url,
                "--local-api",
                local,
                "--heartbeat-interval-ms",
                "300",
                "--lease-renew-interval-ms",
                "300",
                "--request-timeout-ms",
                "1000",
                "--lease-ttl-sec",
                "5",
            ],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_low_nofile,
        )
        idle: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if requests.get(local + "/readyz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "never ready"
                time.sleep(0.1)
            for _ in range(300):
                idle.append(connect(port))
            started = time.monotonic()
            answer = requests.get(local + "/healthz", timeout=5)
            assert answer.status_code == 200, answer.text
            assert time.monotonic() - started < 3.0
            time.sleep(1.0)  # the node keeps talking to its Control API meanwhile
            assert requests.get(local + "/readyz", timeout=5).status_code == 200
        finally:
            for sock in idle:
                sock.close()
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "Traceback" not in out


# -- in process: the shedding order and the hub's last net -----------------------------------


class _FakeSock:
    def __init__(self) -> None:
        self.shut = False

    def shutdown(self, how: int) -> None:
        self.shut = True


def test_at_the_cap_never_used_connections_go_first_then_the_longest_idle():
    from conductord.httpserver import Connections

    conns = Connections(cap=4)
    kept = conns.open(_FakeSock(), ("127.0.0.1", 1))
    kept.begin_request()  # busy from its first byte: never shed
    kept.request_read()
    idle_old = conns.open(_FakeSock(), ("127.0.0.1", 2))
    idle_old.begin_request()
    idle_old.request_read()
    idle_old.answered()
    fresh_old = conns.open(_FakeSock(), ("127.0.0.1", 3))
    fresh_new = conns.open(_FakeSock(), ("127.0.0.1", 4))  # at the cap: the oldest fresh goes
    assert fresh_old.sock.shut and not fresh_new.sock.shut
    assert not idle_old.sock.shut and not kept.sock.shut
    fresh_old.closed()
    fresh_new.begin_request()
    newest = conns.open(_FakeSock(), ("127.0.0.1", 5))  # only the newest is fresh: idle goes
    assert idle_old.sock.shut and not newest.sock.shut and not fresh_new.sock.shut
    idle_old.closed()
    newest.begin_request()
    assert len(conns) == 3
    another = conns.open(_FakeSock(), ("127.0.0.1", 6))  # all busy: nobody to shed
    assert len(conns) == 4 and not another.sock.shut
    for conn in (kept, fresh_new, newest, another):
        conn.closed()
    assert len(conns) == 0


def test_the_hub_net_turns_our_servers_errors_into_one_warning(capsys):
    import gevent

    from conductord.httpserver import SERVER_ENVIRON_KEY, LimitedWSGIServer

    class Log:
        def __init__(self) -> None:
            self.lines: list[tuple[str, str, dict[str, Any]]] = []

        def warning(self, event: str, **fields: Any) -> None:
            self.lines.append(("warning", event, fields))

        def error(self, event: str, **fields: Any) -> None:
            self.lines.append(("error", event, fields))

    log = Log()
    server = LimitedWSGIServer(
        ("127.0.0.1", 0), lambda e, s: [], log=log, max_connections=8, max_body_bytes=10
    )
    hub = gevent.get_hub()
    try:
        emfile = OSError(24, "Too many open files")
        hub.handle_error(server, OSError, emfile, None)  # an accept error
        timeout = TimeoutError("timed out")
        hub.handle_error({SERVER_ENVIRON_KEY: server}, TimeoutError, timeout, None)  # a send
        assert [(level, event) for level, event, _ in log.lines] == [
            ("warning", "http.connection_error"),
            ("warning", "http.connection_error"),
        ]
        assert "Too many open files" in log.lines[0][2]["error"]
        hub.handle_error("someone else", ValueError, ValueError("theirs"), None)
        assert "ValueError: theirs" in capsys.readouterr().err  # other contexts as before
    finally:
        server.close()


def test_idle_timeout_and_request_deadline_never_cut_a_slow_app():
    import gevent
    import gevent.socket

    from conductord.httpserver import LimitedWSGIServer

    class Log:
        def warning(self, event: str, **fields: Any) -> None:
            pass

        error = warning

    def slow_app(environ, start_response):
        gevent.sleep(0.8)  # longer than the deadline and the idle timeout: a parked long-poll
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = LimitedWSGIServer(
        ("127.0.0.1", 0),
        slow_app,
        log=Log(),
        max_connections=8,
        max_body_bytes=100,
        request_deadline_s=0.25,
        idle_timeout_s=0.5,
    )
    server.start()
    port = server.server_port

    def timed(send: bytes) -> tuple[float, bytes]:
        sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=5)
        started = time.monotonic()
        with sock:
            sock.sendall(send)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return time.monotonic() - started, data

    try:
        idle, half, slow = (
            gevent.spawn(timed, data)
            for data in (
                b"",
                b"GET / HTTP/1.1\r\nHost:",
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        )
        gevent.joinall([idle, half, slow], timeout=5, raise_error=True)
        elapsed, data = idle.value
        assert data == b"" and 0.45 <= elapsed < 1.2  # the idle timeout
        elapsed, data = half.value
        assert data.startswith(b"HTTP/1.1 400") and 0.2 <= elapsed < 0.45  # the deadline
        elapsed, data = slow.value
        assert data.startswith(b"HTTP/1.1 200") and elapsed >= 0.8  # the app is never cut
    finally:
        server.stop(timeout=1)
