"""Fuzz-style: many generated malformed requests against both HTTP servers (SPEC §9, issue 15).

A seeded generator builds requests that are each wrong in at least one way (so none may
succeed): a broken JSON body (truncated, nested deep, integers beyond 64 bits, NaN, lone
surrogates, invalid UTF-8, the wrong shape or types), ambiguous framing, a corrupt chunked
body, a bad head (control characters, folding, a malformed line, too many or too long lines, a
request line that is not HTTP/1.x), an unknown path or a wrong method. On top comes noise that
keeps the fault: header-name case, benign extra headers, HTTP/1.0, the bytes sent in random
fragments. Each request goes on a fresh connection, half-closed after sending.

Every answer must be one of `ALLOWED` or a close without an answer: never a 5xx, never a
traceback or an error-level log line; afterwards honest requests still succeed. Bounded:
a fixed count per seed, a per-request timeout and an overall deadline. A failure prints the
seed and the request's index, which reproduce it exactly.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests

from tests.support.control_api import ControlApiProcess

ALLOWED = {400, 404, 405, 408, 413, 414, 431}
SEEDS = (15, 20, 2026)
PER_SEED = 150
REQUEST_TIMEOUT_S = 5.0
OVERALL_S = 90.0

CONTROL_ROUTES = {
    "/v1/controllers/heartbeat": "POST",
    "/v1/leader/acquire": "POST",
    "/v1/leader/release": "POST",
    "/v1/leader": "GET",
    "/v1/controllers": "GET",
    "/healthz": "GET",
}
STATUS_ROUTES = {"/healthz": "GET", "/readyz": "GET", "/v1/status": "GET", "/metrics": "GET"}

VALID_BODIES = {
    "/v1/controllers/heartbeat": {"controller_id": "fz", "host": "h", "role": "standby"},
    "/v1/leader/acquire": {"controller_id": "fz", "host": "h", "ttl_sec": 5},
    "/v1/leader/release": {"controller_id": "fz", "term": 1},
}


@dataclass
class Fuzzed:
    method: str
    path: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    version: bytes = b"HTTP/1.1"
    raw_head: bytes | None = None  # a hand-broken head replaces the built one
    framing: str = "length"  # length | chunked | none | raw
    fault: str = ""

    def to_bytes(self) -> bytes:
        if self.raw_head is not None:
            return self.raw_head + self.body
        head = [f"{self.method} {self.path} ".encode() + self.version]
        head += [name + b": " + value for name, value in self.headers]
        if self.framing == "length":
            head.append(b"Content-Length: %d" % len(self.body))
        elif self.framing == "chunked":
            head.append(b"Transfer-Encoding: chunked")
        return b"\r\n".join(head) + b"\r\n\r\n" + self.body


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"


class Generator:
    """Requests that are each wrong in at least one way; `routes` is path -> method."""

    def __init__(self, seed: int, routes: dict[str, str], *, bodies: bool) -> None:
        self.rng = random.Random(seed)
        self.routes = routes
        self.bodies = bodies  # whether the app parses bodies (the Control API does)

    # -- building blocks --

    def _route(self) -> tuple[str, str]:
        path = self.rng.choice(sorted(self.routes))
        return self.routes[path], path

    def _post_route(self) -> str:
        return self.rng.choice(sorted(p for p, m in self.routes.items() if m == "POST"))

    def _valid_request(self) -> Fuzzed:
        method, path = self._route()
        body = b""
        if method == "POST":
            body = json.dumps(VALID_BODIES[path]).encode()
        return Fuzzed(method, path, [(b"Host", b"127.0.0.1")], body)

    def _bad_json(self) -> bytes:
        rng = self.rng
        valid = json.dumps(VALID_BODIES["/v1/leader/acquire"]).encode()
        kind = rng.randrange(12)
        if kind == 0:
            return valid[: rng.randrange(1, len(valid) - 1)]
        if kind == 1:
            depth = rng.randrange(1500, 30_000)
            opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
            inner = opener * depth + b"1" + closer * depth
            return b'{"controller_id": "c", "host": "h", "ttl_sec": 5, "x": ' + inner + b"}"
        if kind == 2:
            big = rng.choice([2**63, 2**64 + 1, 10**30, -(2**63) - 1, 2**300])
            name = rng.choice(["ttl_sec", "now", "priority", "term", "unknown"])
            return valid[:-1] + b', "%s": %d}' % (name.encode(), big)
        if kind == 3:
            constant = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
            return valid[:-1] + b', "now": ' + constant + b"}"
        if kind == 4:
            surrogate = b"\\u%04x" % rng.randrange(0xD800, 0xE000)
            if rng.random() < 0.5:
                return b'{"controller_id": "' + surrogate + b'", "host": "h", "ttl_sec": 5}'
            return b'{"' + surrogate + b'": 1, "controller_id": "c", "host": "h", "ttl_sec": 5}'
        if kind == 5:
            junk = bytes(rng.choice([0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFF, 0xED]) for _ in range(3))
            return b'{"controller_id": "' + junk + b'", "host": "h", "ttl_sec": 5}'
        if kind == 6:
            return rng.choice([b"[]", b'"text"', b"42", b"true", b"null", b"[{}]"])
        if kind == 7:
            return b'{"controller_id": 5, "host": [], "ttl_sec": "5", "term": "x"}'
        if kind == 8:
            return valid + rng.choice([b"}", b"x", b",", b" {}", b"\x00"])
        if kind == 9:
            return rng.choice([b"", b" ", b"\r\n\t "])
        if kind == 10:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"{"
        return b"{" + b'"k": "' + b"v" * (70 * 1024) + b'"}'  # over the 64 KiB cap: 413

    # -- faults --

    def json_body(self) -> Fuzzed:
        path = self._post_route()
        req = Fuzzed("POST", path, [(b"Host", b"x")], self._bad_json(), fault="json")
        if self.rng.random() < 0.3:
            req.framing, req.body = "chunked", _chunked(req.body)
        return req

    def framing_fault(self) -> Fuzzed:
        rng = self.rng
        req = self._valid_request()
        req.method = "POST" if rng.random() < 0.7 else req.method
        req.fault = "framing"
        body = req.body or b"{}"
        kind = rng.randrange(7)
        req.framing = "raw"
        if kind == 0:
            req.headers += [
                (b"Content-Length", b"%d" % len(body)),
                (b"Transfer-Encoding", b"chunked"),
            ]
            rng.shuffle(req.headers)
            req.body = _chunked(body)
        elif kind == 1:
            coding = rng.choice([b"gzip", b"chunked, gzip", b"identity", b"chunked ", b"xchunked"])
            req.headers += [(b"Transfer-Encoding", coding), (b"Content-Length", b"%d" % len(body))]
            req.body = body
        elif kind == 2:
            req.headers += [(b"Transfer-Encoding", b"chunked")] * 2
            req.body = _chunked(body)
        elif kind == 3:
            req.headers += [(b"Content-Length", b"%d" % len(body))]
            req.headers += [(b"Content-Length", b"%d" % (len(body) + rng.randrange(1, 9)))]
            req.body = body
        elif kind == 4:
            bad = rng.choice([b"+2", b"-1", b"1e3", b"0x2", b"2_0", b"\xd9\xa2", b"two"])
            req.headers += [(b"Content-Length", bad)]
            req.body = body
        elif kind == 5:
            req.headers += [(b"Content-Length", b"%d" % (len(body) + rng.randrange(5, 500)))]
            req.body = body  # shorter than declared, then the client half-closes
        else:
            req.headers += [(b"Content-Length", b"99999999999")]
            req.body = body
        return req

    def chunked_fault(self) -> Fuzzed:
        rng = self.rng
        method, path = self._route()
        payload = b"{bad"  # whatever the decoder makes of it, the body is no JSON object
        good = b"%x\r\n%s\r\n" % (len(payload), payload)
        kind = rng.randrange(8)
        if kind == 0:
            body = b"zz\r\n" + payload + b"\r\n0\r\n\r\n"
        elif kind == 1:
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload) + rng.randrange(1, 50), payload)
        elif kind == 2:
            body = b"%x\r\n%sXX0\r\n\r\n" % (len(payload), payload)
        elif kind == 3:
            body = b"f" * rng.randrange(17, 40) + b"\r\n" + payload
        elif kind == 4:
            body = b"%x;%s\r\n%s\r\n0\r\n\r\n" % (len(payload), b"e" * 9000, payload)
        elif kind == 5:
            body = good + b"0\r\nbad trailer\x01\r\n\r\n"
        elif kind == 6:
            body = good  # no last chunk before the client half-closes
        else:
            body = b"\r\n" + good + b"0\r\n\r\n"
        return Fuzzed(
            "POST" if rng.random() < 0.8 else method,
            path,
            [(b"Host", b"x")],
            body,
            framing="chunked",
            fault="chunked",
        )

    def head_fault(self) -> Fuzzed:
        rng = self.rng
        req = self._valid_request()
        req.fault = "head"
        kind = rng.randrange(8)
        if kind == 0:
            char = bytes([rng.choice([0, 1, 8, 11, 12, 13, 27, 127])])
            req.headers.append((b"X-Fuzz", b"a" + char + b"b"))
        elif kind == 1:
            req.headers.append((b"X-Fuzz", b"one\r\n folded"))
        elif kind == 2:
            line = rng.choice([b"X-Fuzz : v", b"no colon", b": empty", b"X Fuzz: v"])
            req.headers.append((line, b""))  # built as "line: " -- still malformed
            req.framing = "length"
            return self._raw(req, extra=line)
        elif kind == 3:
            req.headers += [(b"X-F%d" % i, b"v") for i in range(rng.randrange(97, 140))]
        elif kind == 4:
            req.headers.append((b"X-Big", b"v" * rng.randrange(17_000, 40_000)))
        elif kind == 5:
            req.version = rng.choice(
                [b"HTTP/1", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1x", b"HTTP/", b"XYZ"]
            )
        elif kind == 6:
            return self._raw(
                req, line=rng.choice([b"\r\n", b"GET", b"GET /healthz", b" / HTTP/1.1"])
            )
        else:
            req.path = "/" + "a" * rng.randrange(8200, 12000)
        return req

    def _raw(self, req: Fuzzed, *, extra: bytes = b"", line: bytes | None = None) -> Fuzzed:
        request_line = line if line is not None else f"{req.method} {req.path} HTTP/1.1".encode()
        parts = [request_line, b"Host: x"]
        if extra:
            parts.append(extra)
        parts.append(b"Content-Length: %d" % len(req.body))
        req.raw_head = b"\r\n".join(parts) + b"\r\n\r\n"
        req.framing = "raw"
        return req

    def routing_fault(self) -> Fuzzed:
        rng = self.rng
        if rng.random() < 0.5:
            while True:
                path = "/" + "/".join(
                    "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_-.") for _ in range(5))
                    for _ in range(rng.randrange(1, 4))
                )
                if path not in self.routes:
                    break
            method = rng.choice(["GET", "POST"])
        else:
            known, path = self._route()
            method = rng.choice(
                [m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "FOO") if m != known]
            )
        body = b"{}" if method != "GET" else b""
        return Fuzzed(method, path, [(b"Host", b"x")], body, fault="routing")

    def oversized_body(self) -> Fuzzed:
        method, path = self._route()
        size = (70 if self.bodies else 5) * 1024
        body = b'{"pad": "' + b"x" * size + b'"}'
        req = Fuzzed(method, path, [(b"Host", b"x")], body, fault="oversized")
        if self.rng.random() < 0.4:
            req.framing, req.body = "chunked", _chunked(body)
        return req

    def next(self) -> Fuzzed:
        families = [self.framing_fault, self.chunked_fault, self.head_fault, self.routing_fault]
        families.append(self.oversized_body)
        if self.bodies:
            families += [self.json_body, self.json_body]
        req = self.rng.choice(families)()
        return self._noise(req)

    def _noise(self, req: Fuzzed) -> Fuzzed:
        rng = self.rng
        if req.raw_head is None:
            if rng.random() < 0.3:
                req.headers = [(name.swapcase(), value) for name, value in req.headers]
            for index in range(rng.randrange(3)):
                req.headers.append((b"X-Noise-%d" % index, b"n" * rng.randrange(1, 40)))
            if rng.random() < 0.2 and req.version == b"HTTP/1.1":
                req.version = b"HTTP/1.0"
            if rng.random() < 0.3:
                req.headers.append((b"Connection", rng.choice([b"close", b"keep-alive"])))
        return req


def exchange(port: int, data: bytes, rng: random.Random) -> bytes:
    """Send `data` (in random fragments), half-close, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S) as sock:
        try:
            if rng.random() < 0.3:
                cut = 0
                while cut < len(data):
                    step = rng.randrange(1, 64) if rng.random() < 0.5 else rng.randrange(64, 4096)
                    sock.sendall(data[cut : cut + step])
                    cut += step
                    if rng.random() < 0.1:
                        time.sleep(0.001)
            else:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server refused mid-way and closed (EPIPE, ECONNRESET, ENOTCONN)
        received = b""
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError("the server neither answered nor closed") from None
            except OSError:
                break  # reset
            if not chunk:
                break
            received += chunk
        return received


def check_answer(received: bytes, where: str) -> None:
    if not received:
        return  # closed without an answer
    assert received.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), (where, received[:200])
    code = int(received[9:12])
    assert code in ALLOWED, (where, received[:300])


def run_fuzz(port: int, routes: dict[str, str], *, bodies: bool) -> dict[str, int]:
    started = time.monotonic()
    faults: dict[str, int] = {}
    for seed in SEEDS:
        generator = Generator(seed, routes, bodies=bodies)
        sender = random.Random(seed * 7919)
        for index in range(PER_SEED):
            assert time.monotonic() - started < OVERALL_S, "the fuzz run overran its budget"
            req = generator.next()
            faults[req.fault] = faults.get(req.fault, 0) + 1
            received = exchange(port, req.to_bytes(), sender)
            check_answer(received, f"seed={seed} index={index} fault={req.fault}")
    return faults


# -- the Control API ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[ControlApiProcess]:
    db = tmp_path_factory.mktemp("fuzz") / "control.sqlite3"
    with ControlApiProcess(str(db)).start() as server:  # no token: auth is not what is fuzzed
        yield server


def test_the_control_api_answers_malformed_requests_with_4xx_or_a_close(api):
    faults = run_fuzz(api.port, CONTROL_ROUTES, bodies=True)
    assert set(faults) == {"json", "framing", "chunked", "head", "routing", "oversized"}
    for path, body in VALID_BODIES.items():
        answer = requests.post(api.url + path, json=body, timeout=5)
        assert answer.status_code == 200, answer.text
    assert requests.get(api.url + "/v1/leader", timeout=5).status_code == 200
    assert "Traceback" not in api.stderr, api.stderr[-3000:]
    for entry in api.logs():
        assert entry["level"] != "error", entry
        assert "exception" not in entry, entry


# -- the status endpoint ---------------------------------------------------------------------


def test_the_status_endpoint_answers_malformed_requests_with_4xx_or_a_close():
    from conductord.status import StatusServer
    from tests.test_status import FakeRuntime, in_thread

    runtime = FakeRuntime()
    runtime.loops_ran()
    server = StatusServer(runtime, "http://127.0.0.1:0")
    server.start()
    try:
        port = int(server.url.rsplit(":", 1)[1])
        faults = in_thread(run_fuzz, port, STATUS_ROUTES, bodies=False)
        assert set(faults) == {"framing", "chunked", "head", "routing", "oversized"}
        answer = in_thread(requests.get, server.url + "/v1/status", timeout=5)
        assert answer.status_code == 200
    finally:
        server.stop()
    levels = {level for level, _, _ in runtime.log.events}
    assert "error" not in levels, [e for e in runtime.log.events if e[0] == "error"]
