"""What both of our HTTP servers share: gevent.pywsgi with limits, on public APIs only (§9, §18).

`LimitedWSGIServer` is the stock `gevent.pywsgi.WSGIServer` with the stock `WSGIHandler`, used
through documented hooks only: `WSGIServer(spawn=Pool(n))`, an overridden
`WSGIServer.handle(sock, address)` (TCP_NODELAY, the idle timeout, the connection registry, the
handler's `rfile` wrapped), `close()`, a WSGI middleware (`RequestGuard`) in front of the app,
the `error_log` stream and the hub's `handle_error` (documented as settable on the hub). The
Control API (`control_api/server.py`) and the node's status endpoint (`status.py`) both run it.

Limits, per connection:
- TCP_NODELAY: pywsgi sends an answer's headers and body in separate writes; with Nagle's
  algorithm a keep-alive client would wait ~40 ms (its delayed ACK) for the body. Where the
  system has TCP_CORK (Linux), a whole (non-streamed) answer is corked while gevent writes it
  and uncorked at the next read, so it still leaves in one segment.
- Idle: a connection waiting for the first byte of a request (its first or a later keep-alive
  one) is closed after `IDLE_TIMEOUT_S` (a socket timeout).
- Deadline: from a request's first byte, its head and body must arrive within
  `REQUEST_DEADLINE_S`: one hub timer (`gevent.Timeout.start_new`) per request, armed at the
  first byte by the reader and cancelled by the guard once the body is in, so it can only fire
  inside a read of that request, never in the app (a parked long-poll is not cut).
- Head: at most `MAX_HEAD_BYTES` (request line and header lines together) and `MAX_HEADER_LINES`
  header lines, counted by the reader as gevent reads them, so an oversized head is refused
  (400 and close, by gevent) before the app runs and before it is held in memory. The reader
  also refuses bytes no header line may hold (control characters, a bare CR, which the stdlib
  parser would split a header on, and obsolete line folding) and a request line that does not
  end in HTTP/1.0 or HTTP/1.1; it counts and checks bytes, the parsing stays gevent's.
- Framing (the guard, before the app runs): Content-Length together with Transfer-Encoding, a
  Transfer-Encoding other than exactly `chunked`, differing or non-digit Content-Lengths, or a
  header block the stdlib parser found defects in → 400 and close. The guard reads the whole
  body (at most `max_body_bytes`, else 413 and close; a malformed chunked body → 400 and close)
  and hands the app a plain, already-read `wsgi.input`.
- Connections: at most `max_connections` at once (the spawn pool: while it is full gevent stops
  accepting, so the process never runs out of descriptors). At the cap the idlest connection is
  shed (`shutdown(SHUT_RDWR)`): first those that never sent a byte (oldest first), then idle
  keep-alive ones (longest idle first). A connection is busy from the first byte of a request
  until the next read after its answer, and a busy one is never shed; parked long-polls are
  busy, so the app must keep them well below the cap (`--max-waiters`).

Errors: a client's fault is never a traceback. gevent's own protocol errors arrive on the
`error_log` stream and become `http.protocol_error` warnings; the guard's refusals
`http.bad_request` warnings; anything escaping the handler or reported to the hub for one of
these servers (an accept error, a send that timed out) one `http.connection_error` warning;
each rate-limited (`RateLimitedLog`). The hub's `handle_error` is wrapped once per hub and
passes every other context on unchanged, so the daemon's own greenlets report as before.

Each request's environ carries the accepted socket under `SOCKET_ENVIRON_KEY` (found through the
registry by REMOTE_ADDR and REMOTE_PORT), so a parked request can tell its client has left.

Limits of the design: a busy connection that trickles a request (slowloris) holds its slot for
up to the deadline; enough of them fill the cap for that long. TLS belongs to a reverse proxy.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

__all__ = [
    "IDLE_TIMEOUT_S",
    "MAX_HEADER_LINES",
    "MAX_HEAD_BYTES",
    "REQUEST_DEADLINE_S",
    "SERVER_ENVIRON_KEY",
    "SOCKET_ENVIRON_KEY",
    "ClientError",
    "Connection",
    "Connections",
    "ErrorLog",
    "LimitedWSGIServer",
    "RateLimitedLog",
    "RequestGuard",
    "RequestProblem",
    "connection_cap",
    "descriptor_limit",
    "raise_descriptor_limit",
    "read_capped",
]

REQUEST_DEADLINE_S = 10.0
IDLE_TIMEOUT_S = 60.0
MAX_HEAD_BYTES = 16 * 1024
# http.client refuses more than 100 lines with an exception gevent prints as a traceback; the
# reader refuses well before.
MAX_HEADER_LINES = 96

# Where each request's environ carries the accepted socket, and the server that serves it.
SOCKET_ENVIRON_KEY = "conductord.socket"
SERVER_ENVIRON_KEY = "conductord.server"

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# A control character other than HT anywhere in a header line but its line end.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HTTP_1X = (b" HTTP/1.1", b" HTTP/1.0")
# Linux: hold partial segments back until uncorked (other systems send two segments).
_TCP_CORK = getattr(socket, "TCP_CORK", None)


class ClientError(OSError, ValueError):
    """A client's fault found while reading a request.

    Both an OSError and a ValueError, so that gevent takes it for what it is wherever it
    surfaces: at the request line a quiet close (a socket error), in the header block a
    400 without a traceback (a ValueError), in the discarded rest of a body a socket error
    it ignores.
    """


class RequestTimeout(ClientError):
    pass


# -- logs ----------------------------------------------------------------------------------


class RateLimitedLog:
    """At most `burst` lines per event name in each `window_s`; the rest are counted.

    The first line of an event after a window in which lines were dropped carries
    `suppressed` (how many). Never raises: a failing log must not fail a request.
    """

    def __init__(
        self,
        log: Any,
        *,
        burst: int = 10,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._windows: dict[str, list[float]] = {}  # event -> [start, logged, dropped]

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        now = self._clock()
        window = self._windows.get(event)
        if window is None or now - window[0] >= self._window_s:
            if window is not None and window[2]:
                fields["suppressed"] = int(window[2])
            window = self._windows[event] = [now, 0, 0]
        if window[1] >= self._burst:
            window[2] += 1
            return
        window[1] += 1
        with contextlib.suppress(Exception):
            getattr(self._log, level)(event, **fields)


class ErrorLog:
    """gevent.pywsgi's `error_log` stream (its protocol errors) as rate-limited warnings."""

    def __init__(self, log: RateLimitedLog) -> None:
        self._log = log

    def write(self, message: str) -> None:
        text = str(message).strip()
        if text:
            self._log.warning("http.protocol_error", detail=text[:500])

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


# -- descriptors -------------------------------------------------------------------------------


def descriptor_limit() -> int:
    """RLIMIT_NOFILE's soft limit (a large number when unlimited or not POSIX)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1024
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one where allowed; return the soft limit."""
    try:
        import resource
    except ImportError:
        return descriptor_limit()
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS refuses an infinite soft limit (and one above OPEN_MAX): fall back to 10240 there.
    for target in (hard, 10240 if hard == infinity else min(hard, 10240)):
        if target == infinity or soft == infinity or target <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        break
    return descriptor_limit()


def connection_cap(descriptor_limit: int, *, reserve: int, ceiling: int, floor: int = 8) -> int:
    """Connections to allow: below the descriptor limit by `reserve`, within [floor, ceiling]."""
    return max(floor, min(ceiling, descriptor_limit - reserve))


# -- connections ----------------------------------------------------------------------------

FRESH = "fresh"  # accepted, no byte yet
IDLE = "idle"  # keep-alive, between requests
READING = "reading"  # from a request's first byte until its body is in
SERVING = "serving"  # the app runs, the answer leaves


class Connection:
    """One accepted socket: its state, the current request's head and deadline."""

    __slots__ = (
        "_registry",
        "address",
        "corked",
        "deadline",
        "handler",
        "head",
        "head_bytes",
        "head_done",
        "key",
        "refuse_reads",
        "shed",
        "sock",
        "state",
    )

    def __init__(self, registry: Connections, sock: Any, address: Any) -> None:
        self._registry = registry
        self.sock = sock
        self.address = address
        peer = address if isinstance(address, tuple) else (address, "")
        self.key = (str(peer[0]), str(peer[1]) if len(peer) > 1 else "")
        self.state = FRESH
        self.handler: Any = None
        self.head: list[bytes] = []
        self.head_bytes = 0
        self.head_done = False
        self.deadline: gevent.Timeout | None = None
        self.refuse_reads = False
        self.shed = False
        self.corked = False

    def begin_request(self) -> None:
        """The first byte of a request is here: busy, fresh head counters, deadline armed."""
        registry = self._registry
        self.state = READING
        self.head = []
        self.head_bytes = 0
        self.head_done = False
        registry._mark_busy(self)
        self.deadline = gevent.Timeout.start_new(
            registry.request_deadline_s, RequestTimeout(registry.deadline_message)
        )

    def request_read(self) -> None:
        """The body is in (or refused): the deadline no longer applies; the app runs."""
        self._cancel_deadline()
        self.state = SERVING

    def cork(self) -> None:
        """Hold back partial segments until `answered()`: an answer leaves in one segment."""
        if _TCP_CORK is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
            except OSError:
                return
            self.corked = True

    def answered(self) -> None:
        """The next read after an answer: idle until the next request's first byte."""
        if self.corked:
            self.corked = False
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)  # sends what is held
        self.state = IDLE
        self._registry._mark_idle(self)

    def shutdown(self) -> None:
        """Shed: wake the handler's read with EOF so it closes the connection."""
        self.shed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def closed(self) -> None:
        self._cancel_deadline()
        self._registry._remove(self)

    def _cancel_deadline(self) -> None:
        deadline, self.deadline = self.deadline, None
        if deadline is not None:
            deadline.close()


class Connections:
    """The open connections of one server; sheds the idlest at the cap."""

    def __init__(self, cap: int, *, request_deadline_s: float = REQUEST_DEADLINE_S) -> None:
        if cap < 1:
            raise ValueError("the connection cap must be at least 1")
        self.cap = cap
        self.request_deadline_s = request_deadline_s
        self.deadline_message = (
            f"request head and body did not arrive within {request_deadline_s:g} s"
        )
        self.shed_total = 0
        self._by_peer: dict[tuple[str, str], Connection] = {}
        self._fresh: OrderedDict[Connection, None] = OrderedDict()
        self._idle: OrderedDict[Connection, None] = OrderedDict()
        self._shedding = 0  # shed, not closed yet
        self._closing = False

    def __len__(self) -> int:
        return len(self._by_peer)

    def open(self, sock: Any, address: Any) -> Connection:
        conn = Connection(self, sock, address)
        self._by_peer[conn.key] = conn
        self._fresh[conn] = None
        self._relieve(spare=conn)  # shedding the newest to make room for the next is no gain
        return conn

    def lookup(self, environ: Mapping[str, Any]) -> Connection | None:
        """The connection a request came on, by its REMOTE_ADDR and REMOTE_PORT."""
        return self._by_peer.get((environ.get("REMOTE_ADDR", ""), environ.get("REMOTE_PORT", "")))

    def shed_idle(self) -> int:
        """The server is closing: shed every connection not inside a request, now and later."""
        self._closing = True
        victims = [*self._fresh, *self._idle]
        for conn in victims:
            self._shed(conn)
        return len(victims)

    def _mark_busy(self, conn: Connection) -> None:
        self._fresh.pop(conn, None)
        self._idle.pop(conn, None)

    def _mark_idle(self, conn: Connection) -> None:
        if conn.shed:
            return
        if self._closing:
            self._shed(conn)
            return
        self._idle[conn] = None
        self._idle.move_to_end(conn)
        self._relieve()

    def _remove(self, conn: Connection) -> None:
        if self._by_peer.get(conn.key) is conn:
            del self._by_peer[conn.key]
        self._fresh.pop(conn, None)
        self._idle.pop(conn, None)
        if conn.shed:
            self._shedding -= 1

    def _relieve(self, spare: Connection | None = None) -> None:
        # Keep one slot free for the next accept while any connection is idle.
        while len(self._by_peer) - self._shedding >= self.cap:
            victim = next(iter(self._fresh), None)
            if victim is None or victim is spare:
                victim = next(iter(self._idle), None)
            if victim is None:
                return  # every connection is inside a request: accepting waits for one to end
            self._shed(victim)

    def _shed(self, conn: Connection) -> None:
        self._fresh.pop(conn, None)
        self._idle.pop(conn, None)
        if not conn.shed:
            self._shedding += 1
            self.shed_total += 1
            conn.shutdown()


class _Reader:
    """The handler's `rfile`, wrapped: request boundaries, head limits, the deadline's start.

    gevent reads a request line and header lines with `readline`, bodies with `read` and
    `readline`; these are the only calls it makes (and `closed`).
    """

    __slots__ = ("_conn", "_on_refused", "_peek", "_rfile")

    def __init__(self, rfile: Any, conn: Connection, on_refused: Callable[[str], None]) -> None:
        self._rfile = rfile
        self._conn = conn
        self._peek = getattr(rfile, "peek", None)
        self._on_refused = on_refused

    @property
    def closed(self) -> bool:
        return self._rfile.closed

    def readline(self, size: int | None = -1) -> bytes:
        conn = self._conn
        if conn.state is not READING:
            if not self._await_request():
                return b""
        elif conn.head_done:
            try:
                return self._rfile.readline(size)
            except ClientError:
                raise
            except OSError as exc:
                raise ClientError(f"read failed: {exc}") from None
        return self._head_line(size)

    def read(self, size: int | None = -1) -> bytes:
        conn = self._conn
        if conn.state is not READING and not self._await_request():
            return b""
        try:
            return self._rfile.read(size)
        except ClientError:
            raise
        except OSError as exc:
            raise ClientError(f"read failed: {exc}") from None

    def _await_request(self) -> bool:
        """Block until the next request's first byte (True) or EOF (False)."""
        conn = self._conn
        if conn.refuse_reads:
            raise ClientError("the connection closes after a refused request")
        if conn.state is SERVING:
            conn.answered()
        if self._peek is not None and not self._peek(1):  # the idle timeout ends this wait
            return False
        conn.begin_request()
        return True

    def _head_line(self, size: int | None) -> bytes:
        conn = self._conn
        budget = MAX_HEAD_BYTES - conn.head_bytes
        limit = budget + 1 if size is None or size < 0 else min(size, budget + 1)
        first = not conn.head
        try:
            line = self._rfile.readline(limit)
        except RequestTimeout as exc:
            if first:  # gevent closes quietly at the request line; say why once
                self._on_refused(str(exc))
            raise
        except ClientError:
            raise
        except OSError as exc:  # a reset mid-head would otherwise be a traceback in gevent
            raise ClientError(f"read failed: {exc}") from None
        conn.head_bytes += len(line)
        if conn.head_bytes > MAX_HEAD_BYTES:
            raise self._refuse(f"request head exceeds {MAX_HEAD_BYTES} bytes", log=first)
        conn.head.append(line)
        if first:
            if line and not line.rstrip().endswith(_HTTP_1X):
                raise self._refuse("request line is not HTTP/1.0 or HTTP/1.1", log=True)
            return line
        if line in (b"\r\n", b"\n"):
            conn.head_done = True
            return line
        if len(conn.head) > MAX_HEADER_LINES + 1:
            raise self._refuse(f"more than {MAX_HEADER_LINES} header lines")
        if line[:1] in (b" ", b"\t"):
            raise self._refuse("folded header line")
        stop = len(line) - (2 if line.endswith(b"\r\n") else 1 if line.endswith(b"\n") else 0)
        if _CONTROL.search(line, 0, stop):
            raise self._refuse("control character in a header line")
        return line

    def _refuse(self, reason: str, *, log: bool = False) -> ClientError:
        # In the header block gevent answers 400 and logs the error itself (`error_log`).
        self._conn.refuse_reads = True
        if log:
            self._on_refused(reason)
        return ClientError(reason)


# -- the guard --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestProblem:
    """Why the guard refused a request before the app saw it; the connection then closes."""

    status: int
    code: str
    message: str


_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large"}


def default_reject(
    environ: dict[str, Any], start_response: StartResponse, problem: RequestProblem
) -> list[bytes]:
    """A small JSON error body (`error`, `message`), the status endpoint's format."""
    body = json.dumps({"error": problem.code, "message": problem.message}).encode("ascii")
    start_response(
        f"{problem.status} {_REASONS.get(problem.status, 'Error')}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]


Reject = Callable[[dict[str, Any], StartResponse, RequestProblem], Iterable[bytes]]


class RequestGuard:
    """WSGI middleware: framing checks and the whole body read before the app runs.

    A refused request is answered by `reject(environ, start_response, problem)`, which renders
    and logs it in the app's own terms; without one, by `default_reject` and an
    `http.bad_request` warning. Outside a `LimitedWSGIServer` (no registered connection: an
    in-process test) requests pass straight through.
    """

    def __init__(
        self,
        app: WsgiApp,
        connections: Connections,
        *,
        max_body_bytes: int,
        log: RateLimitedLog,
        reject: Reject | None = None,
    ) -> None:
        self._app = app
        self._connections = connections
        self._max_body = max_body_bytes
        self._log = log
        self._reject = reject

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        conn = self._connections.lookup(environ)
        if conn is None:
            return self._app(environ, start_response)
        environ[SOCKET_ENVIRON_KEY] = conn.sock
        try:
            problem = self._framing(environ, conn)
            if problem is None:
                problem = self._read_body(environ, conn)
        finally:
            conn.request_read()
        if problem is None:
            result = self._app(environ, start_response)
            if isinstance(result, list | tuple):  # a whole answer, not a stream
                conn.cork()
            return result
        conn.refuse_reads = True  # gevent would read the refused body on to its declared end

        def closing(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not any(name.lower() == "connection" for name, _ in headers):
                headers = [*headers, ("Connection", "close")]
            return start_response(status, headers, exc_info)

        if self._reject is not None:
            return self._reject(environ, closing, problem)  # it logs, in the app's own terms
        self._log.warning(
            "http.bad_request",
            status=problem.status,
            error=problem.code,
            message=problem.message,
            method=environ.get("REQUEST_METHOD"),
            path=environ.get("PATH_INFO"),
            remote_addr=environ.get("REMOTE_ADDR"),
        )
        return default_reject(environ, closing, problem)

    def _framing(self, environ: dict[str, Any], conn: Connection) -> RequestProblem | None:
        if not conn.head_done:
            return RequestProblem(400, "invalid_request", "the request head ended early")
        headers = getattr(conn.handler, "headers", None)
        if headers is None:
            return None
        if headers.defects:
            return RequestProblem(400, "invalid_request", "malformed request header block")
        codings = headers.get_all("transfer-encoding") or []
        if codings:
            if len(codings) != 1 or codings[0].lower() != "chunked":
                return RequestProblem(
                    400, "invalid_request", 'Transfer-Encoding other than "chunked"'
                )
            # gevent drops Content-Length when the body is chunked; the raw head still has it.
            raw = http.client.parse_headers(io.BytesIO(b"".join(conn.head[1:])))
            if raw.get_all("content-length"):
                return RequestProblem(
                    400, "invalid_request", "both Content-Length and Transfer-Encoding"
                )
            return None
        lengths = {value.strip(" \t") for value in headers.get_all("content-length") or []}
        if len(lengths) > 1:
            return RequestProblem(400, "invalid_request", "conflicting Content-Length headers")
        if lengths and not all(value.isascii() and value.isdigit() for value in lengths):
            return RequestProblem(400, "invalid_request", "invalid Content-Length header")
        return None

    def _read_body(self, environ: dict[str, Any], conn: Connection) -> RequestProblem | None:
        stream = environ.get("wsgi.input")
        length_text = environ.get("CONTENT_LENGTH")
        chunked = "HTTP_TRANSFER_ENCODING" in environ
        too_large = RequestProblem(
            413, "payload_too_large", f"request body exceeds {self._max_body} bytes"
        )
        try:
            want = int(length_text) if length_text is not None else self._max_body + 1
        except ValueError:
            return RequestProblem(400, "invalid_request", "invalid Content-Length header")
        if length_text is not None and want > self._max_body:
            return too_large
        data = b""
        try:
            if chunked or length_text is not None:
                data = read_capped(stream, want)
        except RequestTimeout as exc:
            return RequestProblem(408, "request_timeout", str(exc))
        except (OSError, ValueError) as exc:
            kind = "chunked body" if chunked else "body"
            return RequestProblem(400, "invalid_request", f"malformed {kind}: {exc}"[:200])
        if len(data) > self._max_body:
            return too_large
        if length_text is not None and len(data) < want:
            return RequestProblem(400, "invalid_request", "the request body ended early")
        environ["wsgi.input"] = io.BytesIO(data)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        if length_text is not None or chunked:
            environ["CONTENT_LENGTH"] = str(len(data))
        return None


def read_capped(stream: Any, limit: int) -> bytes:
    """Up to `limit` bytes of a WSGI input stream, in reads of at most 64 KiB (b"" for None)."""
    if stream is None:
        return b""
    parts: list[bytes] = []
    got = 0
    while got < limit:
        part = stream.read(min(limit - got, 65536))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# -- the server -------------------------------------------------------------------------------


class LimitedWSGIServer(WSGIServer):
    """gevent.pywsgi's server and handler with the limits of this module.

    `log` needs `warning` and `error` (and is rate-limited here); `reject` renders and logs a
    refusal in the app's own format (see `RequestGuard`). Other keyword arguments go to
    `WSGIServer` (`backlog`, `handler_class`); `environ` is the base environ, as there.
    """

    def __init__(
        self,
        listener: Any,
        application: WsgiApp,
        *,
        log: Any,
        max_connections: int,
        max_body_bytes: int,
        reject: Reject | None = None,
        request_deadline_s: float = REQUEST_DEADLINE_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        environ: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.limited_log = log if isinstance(log, RateLimitedLog) else RateLimitedLog(log)
        self.connections = Connections(max_connections, request_deadline_s=request_deadline_s)
        self.idle_timeout_s = idle_timeout_s
        guard = RequestGuard(
            application,
            self.connections,
            max_body_bytes=max_body_bytes,
            log=self.limited_log,
            reject=reject,
        )
        super().__init__(
            listener,
            guard,
            spawn=Pool(max_connections),
            log=None,  # no access log: a steady fleet logs nothing per request
            error_log=ErrorLog(self.limited_log),
            environ={**(environ or {}), SERVER_ENVIRON_KEY: self},
            **kwargs,
        )
        _install_hub_safety_net(gevent.get_hub())

    def handle(self, sock: Any, address: Any) -> None:
        conn = self.connections.open(sock, address)
        try:
            # Not every socket family has TCP options (a Unix socket, say); that is fine.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.idle_timeout_s)
            handler = self.handler_class(sock, address, self)
            handler.rfile = _Reader(handler.rfile, conn, self._refused)
            conn.handler = handler
            handler.handle()
        except OSError:
            pass  # the client left or was refused; gevent closed the socket
        except Exception as exc:
            self.limited_log.error("http.connection_error", error=_describe(exc))
        finally:
            conn.closed()

    def _refused(self, reason: str) -> None:
        self.limited_log.warning("http.protocol_error", detail=reason)

    def close(self) -> None:
        """Stop accepting and shed every connection not inside a request."""
        super().close()
        self.connections.shed_idle()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _server_of(context: Any) -> LimitedWSGIServer | None:
    if isinstance(context, LimitedWSGIServer):
        return context  # accept errors
    if isinstance(context, tuple):  # (address, server): a spawn that failed
        for item in context:
            if isinstance(item, LimitedWSGIServer):
                return item
    if isinstance(context, Mapping):  # a request's environ: errors escaping the handler
        server = context.get(SERVER_ENVIRON_KEY)
        if isinstance(server, LimitedWSGIServer):
            return server
    return None


def _install_hub_safety_net(hub: Any) -> None:
    """Wrap `hub.handle_error` once: errors of our servers become one rate-limited line."""
    previous = hub.handle_error
    if getattr(previous, "conductord_http", False):
        return

    def handle_error(context: Any, type_: Any, value: Any, tb: Any) -> None:
        server = None
        with contextlib.suppress(Exception):
            if type_ is not None and issubclass(type_, Exception):
                server = _server_of(context)
        if server is None:
            previous(context, type_, value, tb)
            return
        level = "warning" if issubclass(type_, OSError) else "error"
        getattr(server.limited_log, level)("http.connection_error", error=_describe(value))

    handle_error.conductord_http = True  # type: ignore[attr-defined]
    hub.handle_error = handle_error
