"""`conductord control-api`: run the reference Control API on gevent.pywsgi (SPEC §9).

Settings: `--listen HOST:PORT` (`BAA_CONTROL_API_LISTEN`, default 127.0.0.1:8787), `--db PATH`
(`BAA_CONTROL_API_DB`, default ./conductord-control.sqlite3; a `postgresql://` URL selects the
PostgreSQL store, whose password is masked in every message), `--shared-token` /
`--shared-token-file` (`BAA_SHARED_TOKEN` / `BAA_SHARED_TOKEN_FILE`), `--log-level`
(`BAA_LOG_LEVEL`). Flags beat the environment; an empty or blank value counts as unset.

Safe defaults: loopback unless told otherwise; without a token it serves but logs a
`config.warning`, and it refuses a non-loopback address without a token. Every mistake (bad
listen address, unusable database, port in use) is one line on stderr and exit 2, with no
traceback and nothing on stdout. SIGTERM or SIGINT stops the server cleanly: in-flight
requests get a short grace period, then the database is closed, exit 0.

The process entry point monkey-patches; this module does not. Every accepted socket gets
TCP_NODELAY: a streamed answer still leaves in several writes, and with Nagle's algorithm a
keep-alive client would wait ~40 ms (its delayed ACK) for the later ones.

Cost per request (SPEC §11: 500 nodes, >= 1,000 requests/s on one process): the handler
parses request headers with `RequestHeaders` (one regular expression a line, stricter than
the `email` parser gevent uses, same limits: 100 lines of at most 64 KiB), sends an answer's
headers and body in one `send()`, caches the `Date` header for the current second, and
keeps no access log.

Wait-for-lease (SPEC §12): `--max-waiters N` (`BAA_CONTROL_API_MAX_WAITERS`, default 1000)
caps parked acquires (429 past it); `--no-long-poll` (`BAA_CONTROL_API_LONG_POLL=0`) ignores
`wait_ms` and answers at once, so benchmarks can compare polling and long-poll on one build.
On stop, parked acquires are answered at once before the grace period starts. Each request's
environ carries its accepted socket (`app.SOCKET_ENVIRON_KEY`) so a parked request can tell
that its client has left.

Limits: TLS belongs to a reverse proxy. Malformed HTTP (a broken request line or header line,
say) is answered by gevent.pywsgi itself before the app runs, as a plain-text 400 that closes
the connection, and logged as `http.protocol_error`. The handler overrides three gevent
internals (`MessageClass`, `_write_with_headers`, `finalize_headers`); the in-process tests
fail if a gevent upgrade changes what they rely on.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer, format_date_time

from conductord.argparsing import UsageError, fail
from conductord.config import ConfigError
from conductord.control_api.app import SOCKET_ENVIRON_KEY, ControlApiApp
from conductord.control_api.settings import (
    ServerSettings,
    parse_args,
    resolve_settings,
    settings_warnings,
    usage_text,
)
from conductord.control_api.store import (
    Store,
    StoreError,
    describe_db,
    dsn_secrets,
    open_store,
)
from conductord.logs import configure

STOP_GRACE_SEC = 1.0  # answers take milliseconds; idle keep-alive peers need not be awaited

# Limits of the request header block, those of `http.client.parse_headers` (gevent's default):
# 100 header lines of at most 64 KiB each (http.client counts the blank end line among its 100).
MAX_HEADER_LINES = 100
MAX_HEADER_LINE = 65536

# One header line: an RFC 9110 token, a colon, the value without leading or trailing blanks.
# The value may hold visible ASCII, spaces, tabs and obs-text (0x80-0xFF), never a control
# character: a bare CR would otherwise start a header the client did not send.
_HEADER_LINE = re.compile(
    r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    r"((?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*\r?\n"
)


_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The HTTP `Date` value for now, formatted once per second."""
    global _date_cache
    now = int(time.time())
    second, text = _date_cache
    if second != now:
        text = format_date_time(now)
        _date_cache = (now, text)
    return text


class RequestHeaders:
    """Request headers parsed without the `email` package, shaped like gevent's `OldMessage`.

    gevent.pywsgi reads request headers with `http.client.parse_headers`, which builds an
    `email` message: ~70 µs a request, the largest single cost of a heartbeat. This parser
    reads the same lines with one regular expression each and offers exactly what
    `WSGIHandler` uses: `status` (non-empty means "answer 400 and close"), `get`,
    `getheader`, `typeheader`, `del headers[name]` and `headers` (the raw lines, which
    `get_environ` turns into `HTTP_*` keys).

    It is stricter than the `email` parser, which silently drops or splits what it does not
    understand: a line that is not `token: value`, a blank before the colon, a control
    character in a value (a bare CR split one header into two there), an obsolete folded
    continuation line (RFC 9112 §5.2 allows answering it with 400), or two different
    Content-Length values (request smuggling) all make the request a 400. LF alone ends a
    line, as `http.client` accepts.
    """

    __slots__ = ("_fields", "status")

    def __init__(self, fields: list[tuple[str, str, str]] | None = None, status: str = "") -> None:
        self._fields = fields if fields is not None else []  # (name, lowered name, value)
        self.status = status

    @classmethod
    def parse(cls, rfile: Any, *_ignored: Any) -> RequestHeaders:
        """Read the header block from `rfile` up to and including its blank line."""
        fields: list[tuple[str, str, str]] = []
        match_line = _HEADER_LINE.fullmatch
        for _ in range(MAX_HEADER_LINES + 1):
            raw = rfile.readline(MAX_HEADER_LINE + 1)
            if len(raw) > MAX_HEADER_LINE:
                return cls(status="Line too long")
            if raw in (b"\r\n", b"\n"):
                return cls._checked(fields)
            if not raw.endswith(b"\n"):
                return cls(status="Incomplete headers")  # the client left mid-way
            if len(fields) == MAX_HEADER_LINES:
                break
            line = raw.decode("latin-1")
            match = match_line(line)
            if match is None:
                if line[:1] in (" ", "\t"):
                    return cls(status="Folded header line")
                return cls(status="Malformed header line")
            name, value = match.groups()
            fields.append((name, name.lower(), value))
        return cls(status=f"More than {MAX_HEADER_LINES} headers")

    @classmethod
    def _checked(cls, fields: list[tuple[str, str, str]]) -> RequestHeaders:
        lengths = {value for _, lowered, value in fields if lowered == "content-length"}
        if len(lengths) > 1:
            return cls(status="Conflicting Content-Length headers")
        for length in lengths:  # plain ASCII digits only: int() would take "+1", "1_0", "²"
            if not (length.isascii() and length.isdigit()):
                return cls(status="Invalid Content-Length header")
        return cls(fields)

    def get(self, name: str, default: Any = None) -> Any:
        lowered = name.lower()
        for _, key, value in self._fields:
            if key == lowered:
                return value
        return default

    getheader = get

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __delitem__(self, name: str) -> None:
        lowered = name.lower()
        self._fields = [field for field in self._fields if field[1] != lowered]

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name, _, value in self._fields]

    @property
    def typeheader(self) -> str | None:
        return self.get("content-type")

    @property
    def headers(self) -> Iterator[str]:
        for name, _, value in self._fields:
            yield f"{name}: {value}\r\n"


class _SocketInEnvironHandler(WSGIHandler):
    """gevent.pywsgi's handler, made cheaper per request, with the socket in the environ.

    - Request headers go through `RequestHeaders` instead of the `email` package.
    - An answer's headers and its first body chunk leave in one `send()`: gevent writes them
      separately, two syscalls (and two TCP segments) for every answer. Later chunks of a
      streamed or chunked answer are written by gevent as before.
    - The accepted socket goes in the environ: a parked acquire peeks at it (app.py).
    """

    MessageClass = staticmethod(RequestHeaders.parse)

    def finalize_headers(self) -> None:
        if self.provided_date is None:
            # gevent would format the date afresh for every answer; a set `provided_date`
            # tells it the Date header is there already.
            self.provided_date = date = _http_date()
            self.response_headers.append((b"Date", date))
        super().finalize_headers()

    def log_request(self) -> None:
        # The server runs without an access log (`log=None`); gevent would still format a
        # line per request for its no-op log.
        pass

    def _write_with_headers(self, data: bytes) -> None:
        # gevent's own method, with the body appended to the header block before the send.
        self.headers_sent = True
        self.finalize_headers()
        towrite = bytearray(b"HTTP/1.1 ")
        towrite += self.status
        towrite += b"\r\n"
        for name, value in self.response_headers:
            towrite += name
            towrite += b": "
            towrite += value
            towrite += b"\r\n"
        towrite += b"\r\n"
        if data:  # gevent skips empty chunks too: an empty chunk would end a chunked answer
            if self.response_use_chunked:
                towrite += b"%x\r\n" % len(data)
                towrite += data
                towrite += b"\r\n"
            else:
                towrite += data
        self._sendall(towrite)

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ[SOCKET_ENVIRON_KEY] = self.socket
        return environ


class NoDelayWSGIServer(WSGIServer):
    """gevent.pywsgi server that disables Nagle's algorithm on every accepted socket."""

    handler_class = _SocketInEnvironHandler

    def handle(self, sock: Any, address: Any) -> None:
        # `handle` runs for every connection (`wrap_socket_and_handle` only with TLS). Not
        # every socket family has TCP options (a Unix socket, say); that is fine.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


class _ErrorLog:
    """gevent.pywsgi's error stream (protocol errors) turned into JSON log lines."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def write(self, message: str) -> None:
        text = message.strip()
        if text:
            self._log.warning("http.protocol_error", detail=text[:500])

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


def main(argv: list[str], env: Mapping[str, str]) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the exit status (0, 1 or 2)."""
    try:
        args = parse_args(argv)
    except UsageError as err:
        return fail(str(err))
    if args.help:
        sys.stdout.write(usage_text() + "\n")
        sys.stdout.flush()
        return 0
    try:
        settings = resolve_settings(args, env)
    except ConfigError as err:
        for problem in err.problems:
            fail(problem)
        return 2

    log = configure(
        level=settings.log_level,
        secrets=[*([settings.token] if settings.token else ()), *dsn_secrets(settings.db)],
        service="control-api",
    )
    try:
        store = open_store(settings.db)
    except StoreError as err:
        return fail(str(err))
    try:
        return _serve(settings, store, log)
    finally:
        store.close()


def _serve(settings: ServerSettings, store: Store, log: Any) -> int:
    app = ControlApiApp(
        store,
        token=settings.token,
        log=log,
        long_poll=settings.long_poll,
        max_waiters=settings.max_waiters,
    )
    server = NoDelayWSGIServer(
        (settings.host, settings.port),
        app,
        backlog=1024,
        log=None,  # no access log: a steady fleet logs nothing per request
        error_log=_ErrorLog(log),
        environ={"SERVER_NAME": settings.host},
    )
    try:
        server.start()
    except OSError as err:
        return fail(f"cannot listen on {settings.host}:{settings.port}: {err.strerror or err}")

    stop = Event()
    handlers = [
        gevent.signal_handler(signum, stop.set) for signum in (signal.SIGTERM, signal.SIGINT)
    ]
    try:
        for warning in settings_warnings(settings):
            log.warning("config.warning", message=warning)
        host, port = server.address[:2]
        url_host = f"[{host}]" if ":" in host else host
        log.info(
            "control_api.listening",
            host=host,
            port=port,
            url=f"http://{url_host}:{port}",
            db=describe_db(settings.db),  # a PostgreSQL URL's password masked
            auth=bool(settings.token),
            long_poll=settings.long_poll,
            max_waiters=settings.max_waiters,
            pid=os.getpid(),
        )
        stop.wait()
        log.info("control_api.stopping")
        app.close()  # parked acquires answer now instead of being cut off after the grace
        server.stop(timeout=STOP_GRACE_SEC)
    except Exception:
        log.exception("control_api.crashed")
        server.stop(timeout=0)
        return 1
    finally:
        for handler in handlers:
            handler.cancel()
    store.close()
    log.info("control_api.stopped")
    return 0
