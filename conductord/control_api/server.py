"""`conductord control-api`: run the reference Control API on gevent.pywsgi (SPEC §9).

Settings: `--listen HOST:PORT` (`BAA_CONTROL_API_LISTEN`, default 127.0.0.1:8787), `--db PATH`
(`BAA_CONTROL_API_DB`, default ./conductord-control.sqlite3; a `postgresql://` URL selects the
PostgreSQL store, whose password is masked in every message), `--shared-token` /
`--shared-token-file` (`BAA_SHARED_TOKEN` / `BAA_SHARED_TOKEN_FILE`), `--log-level`
(`BAA_LOG_LEVEL`). Flags beat the environment; an empty or blank value counts as unset. The
settings are resolved in `control_api/settings.py` by the node's own settings machinery.

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
from typing import Any

import gevent
from gevent.event import Event

from conductord import httpserver
from conductord.argparsing import UsageError, fail
from conductord.config import ConfigError
from conductord.control_api.app import MAX_BODY_BYTES, ControlApiApp
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
# Descriptors kept below the limit for everything but client connections (listener, SQLite
# files or PostgreSQL pool, stdio, the event loop); the cap is at most MAX_CONNECTIONS.
CONNECTION_FD_RESERVE = 48
MAX_CONNECTIONS = 8192


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
