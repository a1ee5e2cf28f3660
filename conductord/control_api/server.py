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

The process entry point monkey-patches; this module does not. HTTP is served by
`httpserver.LimitedWSGIServer` (stock gevent.pywsgi plus the limits of SPEC §9: TCP_NODELAY, a
10 s deadline for a request's head and body, a 60 s idle timeout, a 16 KiB head, framing
checks, at most `max_connections` connections with the idlest shed at the cap). At start the
descriptor soft limit is raised to the hard one where allowed, and the connection cap set
below it (`CONNECTION_FD_RESERVE` descriptors kept for the store, logs and the listener).

Wait-for-lease (SPEC §12): `--max-waiters N` (`BAA_CONTROL_API_MAX_WAITERS`, default 1000)
caps parked acquires (429 past it), and never more than half the connection cap: parked
requests hold their connections and cannot be shed. `--no-long-poll`
(`BAA_CONTROL_API_LONG_POLL=0`) ignores `wait_ms` and answers at once, so benchmarks can
compare polling and long-poll on one build. On stop, parked acquires are answered at once
before the grace period starts.

Limits: TLS belongs to a reverse proxy. Malformed HTTP (a broken request line or header line,
say) is answered by gevent.pywsgi itself before the app runs, as a plain-text 400 that closes
the connection, and logged as `http.protocol_error`; what the guard in front of the app refuses
(ambiguous framing, a malformed or oversized body) is an error envelope.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.event import Event

from conductord import httpserver
from conductord.argparsing import ArgumentParser, UsageError, fail
from conductord.config import (
    given,
    is_loopback_host,
    parse_bool,
    resolve_shared_token,
    token_warnings,
)
from conductord.control_api.app import MAX_BODY_BYTES, ControlApiApp
from conductord.control_api.store import (
    Store,
    StoreError,
    describe_db,
    dsn_secrets,
    open_store,
)
from conductord.control_api.waiters import DEFAULT_MAX_WAITERS
from conductord.logs import LEVELS, configure

DEFAULT_LISTEN = "127.0.0.1:8787"
DEFAULT_DB = "./conductord-control.sqlite3"
STOP_GRACE_SEC = 1.0  # answers take milliseconds; idle keep-alive peers need not be awaited
# Descriptors kept below the limit for everything but client connections (listener, SQLite
# files or PostgreSQL pool, stdio, the event loop); the cap is at most MAX_CONNECTIONS.
CONNECTION_FD_RESERVE = 48
MAX_CONNECTIONS = 8192

USAGE = """\
usage: conductord control-api [--listen HOST:PORT] [--db PATH]
                              [--shared-token T | --shared-token-file F] [--log-level LEVEL]
                              [--max-waiters N] [--no-long-poll]

Run the reference Control API (SQLite, WAL). Precedence: default < environment < flag.
  --listen HOST:PORT         BAA_CONTROL_API_LISTEN   default 127.0.0.1:8787
  --db PATH                  BAA_CONTROL_API_DB       default ./conductord-control.sqlite3
                             or postgresql://USER@HOST:PORT/DB (needs conductord[postgres];
                             keep the password in PGPASSWORD or ~/.pgpass, not in argv)
  --shared-token T           BAA_SHARED_TOKEN         bearer token clients must send
  --shared-token-file F      BAA_SHARED_TOKEN_FILE    file holding the token (stripped)
  --log-level LEVEL          BAA_LOG_LEVEL            debug, info, warning, error (info)
  --max-waiters N            BAA_CONTROL_API_MAX_WAITERS  parked wait_ms acquires (1000)
  --no-long-poll             BAA_CONTROL_API_LONG_POLL=0  ignore wait_ms, answer at once
Without a token the server accepts any request, and it refuses a non-loopback --listen.
SIGTERM or SIGINT stops it (exit 0); a configuration error exits 2."""


class _ConfigProblems(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    db: str
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    log_level: str = "info"
    max_waiters: int = DEFAULT_MAX_WAITERS
    long_poll: bool = True

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` -> (host, port); raises ValueError."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(text)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(text)
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(text)
    return host, int(port_text)


def resolve_settings(args: Any, env: Mapping[str, str]) -> ServerSettings:
    """Merge default < env < flags and validate; raises `_ConfigProblems` with every problem."""
    problems: list[str] = []
    listen = given(args.listen) or given(env.get("BAA_CONTROL_API_LISTEN")) or DEFAULT_LISTEN
    host, port = "", 0
    try:
        host, port = parse_listen(listen)
    except ValueError:
        problems.append(
            "--listen / BAA_CONTROL_API_LISTEN must be HOST:PORT with a port 0-65535"
            f' (got "{listen}")'
        )
    db = given(args.db) or given(env.get("BAA_CONTROL_API_DB")) or DEFAULT_DB

    token, token_file = resolve_shared_token(
        {"shared_token": args.shared_token, "shared_token_file": args.shared_token_file},
        env,
        problems,
    )

    log_level = (given(args.log_level) or given(env.get("BAA_LOG_LEVEL")) or "info").lower()
    if log_level not in LEVELS:
        problems.append(
            f'--log-level / BAA_LOG_LEVEL must be one of {", ".join(LEVELS)} (got "{log_level}")'
        )
    max_waiters = _max_waiters(args, env, problems)
    long_poll = _long_poll(args, env, problems)
    if not problems and not token and not is_loopback_host(host):
        problems.append(
            f"refusing to listen on non-loopback address {host} without a shared token"
            " (--shared-token-file / BAA_SHARED_TOKEN_FILE or --shared-token / BAA_SHARED_TOKEN)"
        )
    if problems:
        raise _ConfigProblems(problems)
    return ServerSettings(
        host, port, db, token, token_file, log_level, max_waiters=max_waiters, long_poll=long_poll
    )


def _max_waiters(args: Any, env: Mapping[str, str], problems: list[str]) -> int:
    text = given(args.max_waiters) or given(env.get("BAA_CONTROL_API_MAX_WAITERS"))
    if text is None:
        return DEFAULT_MAX_WAITERS
    if len(text) <= 9 and text.isascii() and text.isdigit() and int(text) >= 1:
        return int(text)
    problems.append(
        f'--max-waiters / BAA_CONTROL_API_MAX_WAITERS must be an integer >= 1 (got "{text}")'
    )
    return DEFAULT_MAX_WAITERS


def _long_poll(args: Any, env: Mapping[str, str], problems: list[str]) -> bool:
    if args.no_long_poll:
        return False
    text = (given(env.get("BAA_CONTROL_API_LONG_POLL")) or "1").lower()
    enabled = parse_bool(text)
    if enabled is not None:
        return enabled
    problems.append(
        "--no-long-poll / BAA_CONTROL_API_LONG_POLL must be one of 1/0, true/false, yes/no,"
        f' on/off (got "{text}")'
    )
    return True


def settings_warnings(settings: ServerSettings) -> list[str]:
    return token_warnings(
        settings.token,
        settings.token_file,
        without_token="the Control API accepts unauthenticated requests",
    )


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="conductord control-api")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--listen")
    parser.add_argument("--db")
    parser.add_argument("--shared-token")
    parser.add_argument("--shared-token-file")
    parser.add_argument("--log-level")
    parser.add_argument("--max-waiters")
    parser.add_argument("--no-long-poll", action="store_true")
    return parser


def main(argv: list[str], env: Mapping[str, str]) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the exit status (0, 1 or 2)."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as err:
        return fail(str(err))
    if args.help:
        sys.stdout.write(USAGE + "\n")
        sys.stdout.flush()
        return 0
    try:
        settings = resolve_settings(args, env)
    except _ConfigProblems as err:
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
    descriptors = httpserver.raise_descriptor_limit()
    max_connections = httpserver.connection_cap(
        descriptors, reserve=CONNECTION_FD_RESERVE, ceiling=MAX_CONNECTIONS
    )
    # Parked long-polls hold their connections and cannot be shed: keep them well below the cap.
    max_waiters = min(settings.max_waiters, max(1, max_connections // 2))
    app = ControlApiApp(
        store,
        token=settings.token,
        log=log,
        long_poll=settings.long_poll,
        max_waiters=max_waiters,
    )
    server = httpserver.LimitedWSGIServer(
        (settings.host, settings.port),
        app,
        log=log,
        max_connections=max_connections,
        max_body_bytes=MAX_BODY_BYTES,
        reject=app.reject,
        backlog=1024,
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
        if max_waiters < settings.max_waiters:
            log.warning(
                "config.warning",
                message=f"--max-waiters {settings.max_waiters} lowered to {max_waiters}:"
                f" half the connection cap ({max_connections}, from a descriptor limit of"
                f" {descriptors})",
            )
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
            max_waiters=max_waiters,
            max_connections=max_connections,
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
