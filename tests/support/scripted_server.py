"""A scripted HTTP/1.1 server on 127.0.0.1 for tests: real sockets, no mocking.

Replies for a path come, in this order, from its script queue (`script`, one reply per
request), its handler (`handler`, a callable for stateful fakes), its default (`default`), or
a 404 error envelope. Every request is recorded (`requests`, `count`, `wait_for`). A reply can
be delayed, hang until `release_hangs()` or `stop()`, trickle its bytes, be written raw (for
broken or truncated answers), close the connection, or reset it (RST, nothing answered).
Responses carry Content-Length (unless a reply sets its own), so keep-alive clients reuse one
connection; `connections` counts the accepted ones and `Recorded.connection` says which one
carried a request.

Built on the stdlib `ThreadingHTTPServer` with daemon threads; thread-safe; usable from the
test process while a daemon subprocess talks to it. `stop()` is prompt even with hung or
trickling handlers: it wakes them and shuts every open connection down.

Limits: request bodies are read by Content-Length only (no chunked uploads); one script queue
per path, whatever the method.
"""

from __future__ import annotations

import contextlib
import http
import json
import socket
import struct
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Recorded", "Reply", "ScriptedServer"]


@dataclass(frozen=True)
class Reply:
    """One scripted answer. A dict or list body is sent as JSON with its content-type."""

    status: int = 200
    body: bytes | str | dict | list | None = None
    headers: Mapping[str, str] | None = None
    delay: float = 0.0
    hang: bool = False  # block until release_hangs() or stop(), then answer (or just close)
    trickle: bool = False  # send the response (or `raw`) a byte at a time
    trickle_interval: float = 0.05
    trickle_after: int = 0  # bytes sent at once before the trickle starts
    raw: bytes | None = None  # written verbatim instead of a response; the connection closes
    close: bool = False  # `connection: close` and close after answering
    reset: bool = False  # answer nothing: reset the connection (RST) once the request is in
    reason: str | None = None


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lowercased names
    body: bytes
    json: Any  # the parsed body, or None when it is not JSON
    at: float  # time.monotonic() when the request was fully read
    client_address: tuple[str, int] = ("", 0)
    connection: int = 0  # 1-based number of the connection that carried it


Handler = Callable[[Recorded], "Reply | dict | list"]


def _route(path: str) -> str:
    return urlsplit(path).path


def _not_found(path: str) -> Reply:
    return Reply(
        404,
        {
            "ok": False,
            "request_id": "scripted",
            "error": "not_found",
            "message": f"no scripted reply for {path}",
        },
    )


def _encode(reply: Reply) -> bytes:
    status = reply.status
    try:
        reason = reply.reason if reply.reason is not None else http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    headers = {key.lower(): value for key, value in (reply.headers or {}).items()}
    body = reply.body
    if isinstance(body, dict | list):
        payload = json.dumps(body).encode("utf-8")
        headers.setdefault("content-type", "application/json")
    elif isinstance(body, str):
        payload = body.encode("utf-8")
        headers.setdefault("content-type", "text/plain; charset=utf-8")
    else:
        payload = body or b""
    headers.setdefault("content-length", str(len(payload)))
    if reply.close:
        headers["connection"] = "close"
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(
        f"{key}: {value}\r\n" for key, value in headers.items()
    )
    return head.encode("latin-1") + b"\r\n" + payload


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection_number = self.server.owner._connection_opened()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read `requests`, not stderr

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        recorded = Recorded(
            method=self.command,
            path=self.path,
            headers={key.lower(): value for key, value in self.headers.items()},
            body=body,
            json=parsed,
            at=time.monotonic(),
            client_address=self.client_address,
            connection=self.connection_number,
        )
        owner._record(recorded)
        reply = owner._reply_for(recorded)
        if (reply.delay > 0 and owner._stopping.wait(reply.delay)) or (
            reply.hang and not owner._wait_hang()
        ):
            self.close_connection = True
            return
        if reply.reset:
            self.close_connection = True
            # A zero linger time makes close() send RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        if reply.raw is not None or reply.close:
            self.close_connection = True
        data = reply.raw if reply.raw is not None else _encode(reply)
        if not reply.trickle:
            self._write(data)
            return
        head = max(reply.trickle_after, 0)
        if head and not self._write(data[:head]):
            return
        for offset in range(head, len(data)):
            if not self._write(data[offset : offset + 1]) or owner._stopping.wait(
                reply.trickle_interval
            ):
                self.close_connection = True
                return

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True
            return False
        return True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, owner: ScriptedServer, host: str) -> None:
        self.owner = owner
        super().__init__((host, 0), _RequestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owner._track(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        self.owner._untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-request is normal in these tests; anything else is kept.
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, OSError):
            self.owner._note_error(exc)


class ScriptedServer:
    """See the module docstring. Use as a context manager, or call start() and stop()."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._cond = threading.Condition(threading.RLock())
        self._stopping = threading.Event()
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._handlers: dict[str, Handler] = {}
        self._defaults: dict[str, Reply] = {}
        self._records: list[Recorded] = []
        self._sockets: set[socket.socket] = set()
        self._connections = 0
        self._hang_generation = 0
        self.errors: list[BaseException] = []
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ScriptedServer:
        self._server = _HTTPServer(self, self._host)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="scripted-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            sockets = list(self._sockets)
        for sock in sockets:
            # Wakes handlers blocked reading the next keep-alive request.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    # -- scripting -----------------------------------------------------------------------------

    def script(self, path: str, *replies: Reply) -> ScriptedServer:
        """Queue one-off replies for `path`; they win over its handler and default."""
        with self._cond:
            self._scripts[path].extend(replies)
        return self

    def default(self, path: str, reply: Reply) -> ScriptedServer:
        with self._cond:
            self._defaults[path] = reply
        return self

    def handler(self, path: str, fn: Handler) -> ScriptedServer:
        """`fn(recorded) -> Reply` (or a dict/list for a 200 JSON answer), in handler threads."""
        with self._cond:
            self._handlers[path] = fn
        return self

    def release_hangs(self) -> None:
        """Let every reply hanging right now answer; later hangs hang again."""
        with self._cond:
            self._hang_generation += 1
            self._cond.notify_all()

    # -- observation ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return list(self._records)

    @property
    def connections(self) -> int:
        """How many connections the server has accepted."""
        with self._cond:
            return self._connections

    def count(self, path: str) -> int:
        route = _route(path)
        with self._cond:
            return sum(1 for record in self._records if _route(record.path) == route)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` is true (re-checked on each request and every 50 ms)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._cond:
                self._cond.wait(min(remaining, 0.05))
        return True

    # -- called from handler threads ---------------------------------------------------------

    def _connection_opened(self) -> int:
        with self._cond:
            self._connections += 1
            return self._connections

    def _track(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(sock)

    def _note_error(self, exc: BaseException) -> None:
        with self._cond:
            self.errors.append(exc)

    def _record(self, recorded: Recorded) -> None:
        with self._cond:
            self._records.append(recorded)
            self._cond.notify_all()

    def _reply_for(self, recorded: Recorded) -> Reply:
        route = _route(recorded.path)
        with self._cond:
            queue = self._scripts.get(route)
            if queue:
                return queue.popleft()
            fn = self._handlers.get(route)
            fallback = self._defaults.get(route)
        if fn is None:
            return fallback or _not_found(route)
        try:
            reply = fn(recorded)
        except Exception as exc:
            self._note_error(exc)
            return Reply(500, f"scripted handler failed: {exc!r}")
        return reply if isinstance(reply, Reply) else Reply(200, reply)

    def _wait_hang(self) -> bool:
        """True when released, False when the server is stopping."""
        with self._cond:
            generation = self._hang_generation
            self._cond.wait_for(
                lambda: self._hang_generation != generation or self._stopping.is_set()
            )
            return not self._stopping.is_set()
