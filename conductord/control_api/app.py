"""The WSGI app of the reference Control API (SPEC §4, §9).

A plain WSGI callable over a `Store`: it authenticates, reads and validates the JSON body
(schemas from `conductord.wire`), asks the store, and answers with an envelope. Every answer,
errors included, is a JSON envelope carrying a `request_id` (also sent as `x-request-id`);
nothing ever answers with an HTML page or a traceback.

Routes:
  POST /v1/controllers/heartbeat   upsert the controller row
  POST /v1/leader/acquire          acquire / renew / deny (rules.py, on the store's monotonic
                                   decision clock); records a heartbeat that rides along
  POST /v1/leader/release          release by the holder of that term
  GET  /v1/leader                  the lease row, live or not, seconds left, parked waiters
  GET  /v1/controllers             the controllers with seconds since their last heartbeat
  GET  /v1/leader/history?limit=N  the lease history, newest first (SPEC §16)
  GET  /healthz                    liveness of the app and its store; needs no token
  GET  /metrics                    Prometheus metrics (`metrics.py`); needs no token, counts only

Every body goes through its `wire` schema (`schema.load`). Before that the JSON itself must be
plain: valid UTF-8, no NaN or Infinity, no float that overflows, no integer outside the signed
64-bit range (a store column could not hold it), no string with a lone surrogate (not Unicode:
SPEC §9), not nested past the parser's recursion limit. Each of these, and every other client
fault, is a 400 (413 past the size cap) envelope, logged once as an `http.bad_request` warning,
rate-limited; never a 500 or a traceback.

Auth is a bearer token compared in constant time (`hmac.compare_digest`); without a configured
token every request is accepted (the server refuses that off loopback). Bodies are capped at
64 KiB: a larger Content-Length is refused before reading, and reads are capped as well (a
chunked body has no length up front). Behind `httpserver.LimitedWSGIServer` the server's guard
has read and checked the body before the app runs and hands refusals to `reject`, which
answers them as envelopes too.

Wait-for-lease (SPEC §12): an acquire with `wait_ms` > 0 that finds the lease held by another
controller is parked in `waiters.LeaseWaiters` until a release or a grant wakes it, the lease
expires, or `wait_ms` passes; each wake costs one more store transaction, decided by the same
rules as any acquire. Past `max_waiters` parked requests, or `max_waiters_per_controller` for
one controller id, or `max_waiters_per_address` from one client address (defaults in
`waiters`), the answer is 429 `too_many_waiters`.
`long_poll=False` ignores `wait_ms` (answers at once, as §12 allows), for benchmarks. A store
with a `watch(callback)` method (one shared by several server processes) gets
`LeaseWaiters.wake_all` at construction, so a change made by another process wakes our waiters.
The server finds out whether a parked client is still connected through the accepted socket the
server puts in the environ under `SOCKET_ENVIRON_KEY` (absent: assumed connected).

Metrics (`metrics.py`, SPEC §16): `_respond` counts and times every envelope answered,
`__call__` hands `/metrics` to `_metrics` before dispatch (it answers in Prometheus' text format,
without a token), and the store handlers report each lease decision and store error.

Lease history: `GET /v1/leader/history?limit=N` (default 100, 1 to 1000, anything else a 400)
answers `{"entries": [...]}` newest first, each `{at, term, holder_id, holder_host,
previous_holder_id, reason}`, from `Store.history` (written by the stores, `store_base`).

Logs: lease grants, takeovers after expiry, releases and auth failures at info/warning, and
`lease.waiters_full` (a 429) at warning; renewals, denials, each request and each finished wait
(`lease.wait`: controller_id, end, waited_ms, rechecks) at debug only, so a steady fleet logs
nothing per call.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import math
import os
import re
import select
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from marshmallow import ValidationError

from conductord import httpserver, wire
from conductord.control_api import metrics
from conductord.control_api.rules import AcquireDecision, LeaseRow, ReleaseDecision
from conductord.control_api.store_base import ControllerRow, HistoryEntry, Store, StoreError
from conductord.control_api.waiters import (
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_MAX_PER_CONTROLLER,
    DEFAULT_MAX_WAITERS,
    LeaseWaiters,
    TooManyWaiters,
)
from conductord.logs import get_logger

MAX_BODY_BYTES = 64 * 1024

# Where the server puts the accepted socket, so a parked request can tell its client left.
SOCKET_ENVIRON_KEY = httpserver.SOCKET_ENVIRON_KEY

# What a store column (SQLite INTEGER, PostgreSQL bigint) can hold.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

# `lease.instance_conflict` is logged at most this often per (controller id, instance).
CONFLICT_LOG_INTERVAL_S = 60.0
# Without a lease to take the TTL from, two instances heartbeating within this window are
# reported as a duplicate id.
DUPLICATE_WINDOW_S = 30.0
# Which store answers `GET /healthz` (SPEC §17): a node given several URLs warns when one is
# SQLite, which no second process can share. Told by the store's module, so psycopg is never
# imported for it; any other store (a test double) is null, "unknown".
_STORE_KINDS = {
    "conductord.control_api.store": "sqlite",
    "conductord.control_api.store_postgres": "postgresql",
}
# `GET /v1/leader/history?limit=N` (SPEC §16).
HISTORY_DEFAULT_LIMIT = 100
HISTORY_MAX_LIMIT = 1000

StartResponse = Callable[..., Any]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# `json.dumps(..., separators=...)` builds a new encoder on every call; this one is reused.
_ENCODER = json.JSONEncoder(separators=(",", ":"))

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    408: "Request Timeout",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpError(Exception):
    """An answer other than success; turned into an error envelope by the app."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Any = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = list(headers)


@dataclass
class Request:
    environ: Mapping[str, Any]
    method: str
    path: str
    request_id: str


Handler = Callable[[Request], Any]


def _wire_time(value: float) -> int:
    # Wire times are integer seconds, truncated: a client never sees a later expiry than ours.
    return int(value)


def lease_record(row: LeaseRow) -> wire.LeaseRecord:
    return wire.LeaseRecord(
        lease_name=row.lease_name,
        holder_id=row.holder_id,
        holder_host=row.holder_host,
        term=row.term,
        lease_expires_at=_wire_time(row.lease_expires_at),
        renewed_at=_wire_time(row.renewed_at),
        preferred_holder_id=row.preferred_holder_id,
        metadata_json=row.metadata_json,
        holder_instance_id=row.holder_instance_id,
    )


def acquire_result(
    decision: AcquireDecision, heartbeat_recorded: bool = False
) -> wire.AcquireResult:
    row = decision.row
    return wire.AcquireResult(
        holder_id=row.holder_id,
        holder_host=row.holder_host,
        term=row.term,
        lease_expires_at=_wire_time(row.lease_expires_at),
        renewed_at=_wire_time(row.renewed_at),
        is_leader=decision.is_leader,
        # The wire knows "acquire" and "renew"; a denial is an acquire that did not win.
        operation=wire.wire_operation(decision.operation),
        lease=lease_record(row),
        holder_instance_id=row.holder_instance_id,
        heartbeat_recorded=heartbeat_recorded,
    )


def release_result(decision: ReleaseDecision) -> wire.ReleaseResult:
    lease = lease_record(decision.row) if decision.row is not None else None
    return wire.ReleaseResult(released=decision.released, supported=True, lease=lease)


def history_record(entry: HistoryEntry) -> dict[str, Any]:
    """A lease history entry as `GET /v1/leader/history` shows it (SPEC §16)."""
    return {
        "at": _wire_time(entry.at),
        "term": entry.term,
        "holder_id": entry.holder_id,
        "holder_host": entry.holder_host,
        "previous_holder_id": entry.previous_holder_id,
        "reason": entry.reason,
    }


def controller_record(row: ControllerRow, now: float, window_sec: float) -> dict[str, Any]:
    """A controller as `GET /v1/controllers` shows it; `duplicate` when two instances of its
    id heartbeated within `window_sec` (SPEC §15: a copied config, a second process)."""
    recent = row.recent_instances(now, window_sec)
    return {
        "controller_id": row.controller_id,
        "host": row.host,
        "role": row.role,
        "priority": row.priority,
        "status": row.status,
        "version": row.version,
        "heartbeat_at": row.heartbeat_at,
        "started_at": row.started_at,
        "first_seen_at": _wire_time(row.first_seen_at),
        "last_seen_at": _wire_time(row.last_seen_at),
        "seconds_since_heartbeat": round(row.seconds_since_heartbeat(now), 3),
        "instance_id": row.instance_id,
        "instances": [
            {
                "instance_id": instance_id,
                "host": host,
                "seconds_since_heartbeat": round(max(now - seen, 0.0), 3),
            }
            for instance_id, host, seen in recent
        ],
        "duplicate": len(recent) > 1,
    }


class ControlApiApp:
    """The WSGI callable. `token=None` disables auth (the server allows that on loopback only).

    Must run under gevent (gevent.pywsgi): parked acquires wait on gevent Events.
    """

    def __init__(
        self,
        store: Store,
        *,
        token: str | None = None,
        log: Any = None,
        long_poll: bool = True,
        max_waiters: int = DEFAULT_MAX_WAITERS,
        max_waiters_per_controller: int = DEFAULT_MAX_PER_CONTROLLER,
        max_waiters_per_address: int = DEFAULT_MAX_PER_ADDRESS,
    ) -> None:
        self._store = store
        self._token = token.encode("utf-8") if token else None
        self._log = log if log is not None else get_logger()
        self._client_faults = httpserver.RateLimitedLog(self._log)
        self.long_poll = long_poll
        self.waiters = LeaseWaiters(
            max_waiters=max_waiters,
            max_per_controller=max_waiters_per_controller,
            max_per_address=max_waiters_per_address,
            clock=store.lease_time,
        )
        self._conflicts = _RateLimit(CONFLICT_LOG_INTERVAL_S, time.monotonic)
        watch = getattr(store, "watch", None)
        if watch is not None:
            watch(self.waiters.wake_all)
        self._routes: dict[str, dict[str, Handler]] = {
            wire.HEALTHZ_PATH: {"GET": self._healthz},
            wire.HEARTBEAT_PATH: {"POST": self._heartbeat},
            wire.ACQUIRE_PATH: {"POST": self._acquire},
            wire.RELEASE_PATH: {"POST": self._release},
            wire.LEADER_PATH: {"GET": self._leader},
            wire.CONTROLLERS_PATH: {"GET": self._controllers},
            wire.HISTORY_PATH: {"GET": self._history},
        }
        self._public = frozenset({wire.HEALTHZ_PATH})
        self.metrics = metrics.ControlApiMetrics(store, self._routes, lambda: self.waiters.parked)
        # Schemas are stateless once built; building one per request would cost more than SQLite.
        self._heartbeat_schema = wire.HeartbeatRequestSchema()
        self._acquire_schema = wire.AcquireRequestSchema()
        self._release_schema = wire.ReleaseRequestSchema()

    def close(self) -> None:
        """Answer every parked acquire now and park no more; call before stopping the server."""
        self.waiters.close()

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        started = time.perf_counter()
        request = _request(environ)
        if request.path == metrics.PATH:  # text, not an envelope
            return self._metrics(request, start_response, started)
        try:
            status, headers = 200, []
            body = wire.success_envelope(self._dispatch(request), request.request_id)
        except HttpError as err:
            status, headers, body = self._refusal(request, err)
        except Exception:
            status, headers = 500, []
            self._log.exception(
                "http.error",
                method=request.method,
                path=request.path,
                request_id=request.request_id,
            )
            body = wire.error_envelope(
                "internal_error", "internal server error", request.request_id
            )
        return self._respond(request, start_response, status, headers, body, started)

    def reject(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        problem: httpserver.RequestProblem,
    ) -> list[bytes]:
        """Answer a request the server's guard refused before dispatch (bad framing or body)."""
        started = time.perf_counter()
        request = _request(environ)
        error = HttpError(
            problem.status, problem.code, problem.message, headers=[("Connection", "close")]
        )
        status, headers, body = self._refusal(request, error)
        return self._respond(request, start_response, status, headers, body, started)

    def _refusal(
        self, request: Request, err: HttpError
    ) -> tuple[int, list[tuple[str, str]], dict[str, Any]]:
        if err.status in (400, 408, 413):  # the client's fault: once, as a warning, no traceback
            self._client_faults.warning(
                "http.bad_request",
                status=err.status,
                error=err.code,
                message=err.message,
                method=request.method,
                path=request.path,
                remote_addr=request.environ.get("REMOTE_ADDR"),
                request_id=request.request_id,
            )
        body = wire.error_envelope(err.code, err.message, request.request_id, err.details)
        return err.status, err.headers, body

    def _respond(
        self,
        request: Request,
        start_response: StartResponse,
        status: int,
        headers: list[tuple[str, str]],
        body: dict[str, Any],
        started: float,
    ) -> list[bytes]:
        payload = _ENCODER.encode(body).encode("utf-8")
        self.metrics.observe(request.path, status, time.perf_counter() - started)
        start_response(
            f"{status} {_REASONS.get(status, 'Error')}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
                ("Cache-Control", "no-store"),
                ("X-Request-Id", request.request_id),
                *headers,
            ],
        )
        self._log.debug(
            "http.request",
            method=request.method,
            path=request.path,
            status=status,
            request_id=request.request_id,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return [payload]

    def _dispatch(self, request: Request) -> Any:
        methods = self._routes.get(request.path)
        if methods is None:
            raise HttpError(404, "not_found", f"no route for {request.path}")
        if request.path not in self._public:
            self._authenticate(request)
        handler = methods.get(request.method)
        if handler is None:
            raise _method_not_allowed(request, methods)
        try:
            return handler(request)
        except StoreError as exc:
            self.metrics.store_error()
            self._log.error(
                "store.error", path=request.path, request_id=request.request_id, error=str(exc)
            )
            raise HttpError(503, "unavailable", "the lease store is unavailable") from None

    def _authenticate(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            if hmac.compare_digest(given.strip().encode("utf-8"), self._token):
                return
            reason, message = "invalid_token", "invalid bearer token"
        else:
            reason, message = "missing_token", "missing bearer token"
        self._log.warning(
            "auth.failed",
            reason=reason,
            method=request.method,
            path=request.path,
            remote_addr=request.environ.get("REMOTE_ADDR"),
            request_id=request.request_id,
        )
        raise HttpError(
            401,
            "unauthorized",
            message,
            headers=[("WWW-Authenticate", 'Bearer realm="conductord"')],
        )

    # -- request bodies --------------------------------------------------------------------

    def _load(self, request: Request, schema: Any) -> Any:
        document = _read_json(request.environ)
        try:
            return schema.load(document)
        except ValidationError as err:
            fields = ", ".join(sorted(str(key) for key in _as_mapping(err.messages)))
            raise HttpError(
                400,
                "invalid_request",
                f"invalid fields: {fields}" if fields else "invalid request body",
                details=err.messages,
            ) from None
        except (RecursionError, OverflowError, ValueError, TypeError) as exc:
            # A validator that cannot cope with a value: the body's fault, not ours.
            raise HttpError(
                400, "invalid_request", "invalid request body", details={"body": [str(exc)]}
            ) from None

    # -- handlers --------------------------------------------------------------------------

    def _healthz(self, request: Request) -> dict[str, Any]:
        self._store.leader()  # a cheap read: healthy means the store answers too
        return {"status": "ok", "store": _STORE_KINDS.get(type(self._store).__module__)}

    def _heartbeat(self, request: Request) -> dict[str, Any]:
        heartbeat: wire.Heartbeat = self._load(request, self._heartbeat_schema)
        if heartbeat.one_shot:
            # A diagnostic run: checked and answered, but not recorded, so it never stands in
            # for its node's daemon nor shows as a second process of its node id.
            now = self._store.now()
            hb = dataclasses.asdict(heartbeat)
            del hb["one_shot"]
            row = ControllerRow(**hb, first_seen_at=now, last_seen_at=now)
        else:
            row = self._store.heartbeat(heartbeat)
        return controller_record(row, self._store.now(), DUPLICATE_WINDOW_S)

    def _acquire(self, request: Request) -> dict[str, Any]:
        body = self._load(request, self._acquire_schema)
        # A heartbeat riding along is recorded on arrival, before any wait; a one-shot run's
        # is not recorded (see `_heartbeat`), so it is not acknowledged either.
        recorded = body.get("heartbeat") is not None and not body.get("one_shot")
        if recorded:
            self._store.heartbeat(
                wire.Heartbeat(
                    controller_id=body["controller_id"],
                    host=body["host"],
                    instance_id=body.get("instance_id"),
                    **body["heartbeat"],
                )
            )
        wait_ms = body.get("wait_ms") or 0
        if wait_ms > 0 and self.long_poll:
            decision = self._wait_for_lease(body, wait_ms, request)
        else:
            decision = self._acquire_lease(body)
        self._log_acquire(decision, request, body.get("instance_id"))
        return wire.acquire_result_to_wire(acquire_result(decision, heartbeat_recorded=recorded))

    def _wait_for_lease(
        self, body: Mapping[str, Any], wait_ms: int, request: Request
    ) -> AcquireDecision:
        try:
            outcome = self.waiters.wait_for_lease(
                lambda: self._acquire_lease(body),
                wait_s=wait_ms / 1000.0,
                connected=lambda: _client_connected(request.environ),
                controller_id=body["controller_id"],
                address=request.environ.get("REMOTE_ADDR"),
            )
        except TooManyWaiters as exc:
            self._client_faults.warning(
                "lease.waiters_full",
                controller_id=body["controller_id"],
                scope=exc.scope,
                max_waiters=exc.limit,
                remote_addr=request.environ.get("REMOTE_ADDR"),
                request_id=request.request_id,
            )
            details = (
                {"max_waiters": exc.limit}
                if exc.scope == "server"
                else {"max_waiters": exc.limit, "scope": exc.scope}
            )
            raise HttpError(
                429,
                "too_many_waiters",
                f"{exc}; retry later or without wait_ms",
                details=details,
                headers=[("Retry-After", "1")],
            ) from None
        self._log.debug(
            "lease.wait",
            controller_id=body["controller_id"],
            end=outcome.end,
            waited_ms=round(outcome.waited_s * 1000, 1),
            rechecks=outcome.rechecks,
            request_id=request.request_id,
        )
        return outcome.decision

    def _acquire_lease(self, body: Mapping[str, Any]) -> AcquireDecision:
        decision = self._store.acquire(
            controller_id=body["controller_id"],
            host=body["host"],
            ttl_sec=body["ttl_sec"],
            preferred=bool(body.get("preferred", False)),
            metadata_json=body.get("metadata_json"),
            client_now=body.get("now"),
            instance_id=body.get("instance_id"),
            one_shot=bool(body.get("one_shot")),
        )
        self.metrics.decided(decision, body.get("instance_id"))
        if decision.operation == "acquire":
            # A new holder: parked waiters look again (they park on, now until the new expiry).
            self.waiters.wake(decision.row.lease_name)
        return decision

    def _release(self, request: Request) -> dict[str, Any]:
        body = self._load(request, self._release_schema)
        decision = self._store.release(
            controller_id=body["controller_id"],
            term=body["term"],
            instance_id=body.get("instance_id"),
            one_shot=bool(body.get("one_shot")),
        )
        self.metrics.decided(decision, body.get("instance_id"))
        if decision.conflict and decision.row is not None:
            self._log_conflict(decision, body.get("instance_id"), "release", request)
        if decision.released and decision.changed and decision.row is not None:
            self.waiters.wake(decision.row.lease_name)
            self._log.info(
                "lease.released",
                holder_id=decision.row.holder_id,
                term=decision.row.term,
                request_id=request.request_id,
            )
        elif not decision.released:
            self._log.debug(
                "lease.release_ignored",
                controller_id=body["controller_id"],
                term=body["term"],
                holder_id=decision.row.holder_id if decision.row else None,
                current_term=decision.row.term if decision.row else None,
                request_id=request.request_id,
            )
        return wire.release_result_to_wire(release_result(decision))

    def _leader(self, request: Request) -> dict[str, Any]:
        row = self._store.leader()
        now, wall = self._store.lease_time(), self._store.now()
        live = row is not None and row.is_live(now)
        return {
            "lease": dataclasses.asdict(lease_record(row)) if row is not None else None,
            "is_live": live,
            # On the decision clock: what this server will honour, whatever the wall says.
            "expires_in_sec": round(row.expires - now, 3) if live and row else None,
            "server_time": _wire_time(wall),
            "waiters": self.waiters.parked,
        }

    def _controllers(self, request: Request) -> dict[str, Any]:
        rows = self._store.controllers()
        now = self._store.now()
        # Two instances of one id heartbeating within a lease TTL are two live processes.
        lease = self._store.leader()
        window = max(lease.ttl_sec, 1.0) if lease is not None else DUPLICATE_WINDOW_S
        return {
            "controllers": [controller_record(row, now, window) for row in rows],
            "server_time": _wire_time(now),
        }

    def _history(self, request: Request) -> dict[str, Any]:
        limit = _history_limit(request.environ.get("QUERY_STRING", ""))
        return {"entries": [history_record(entry) for entry in self._store.history(limit)]}

    def _metrics(
        self, request: Request, start_response: StartResponse, started: float
    ) -> list[bytes]:
        """`GET /metrics` in Prometheus' text format (or OpenMetrics, when asked for)."""
        if request.method != "GET":
            error = _method_not_allowed(request, ("GET",))
            status, headers, body = self._refusal(request, error)
            return self._respond(request, start_response, status, headers, body, started)
        content_type, payload = self.metrics.exposition(request.environ.get("HTTP_ACCEPT", ""))
        self.metrics.observe(request.path, 200, time.perf_counter() - started)
        start_response(
            "200 OK",
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(payload))),
                ("Cache-Control", "no-store"),
                ("X-Request-Id", request.request_id),
            ],
        )
        return [payload]

    # -- logs ------------------------------------------------------------------------------

    def _log_conflict(
        self,
        decision: AcquireDecision | ReleaseDecision,
        instance_id: str | None,
        operation: str,
        request: Request,
    ) -> None:
        """`lease.instance_conflict`, at most once a minute per (controller, instance); a
        one-shot diagnostic run refused the same way is only `lease.one_shot_refused` (debug):
        it is no second process of the fleet."""
        row = decision.row
        assert row is not None
        if not decision.duplicate_id:
            self._log.debug(
                "lease.one_shot_refused",
                controller_id=row.holder_id,
                instance_id=instance_id,
                term=row.term,
                operation=operation,
                request_id=request.request_id,
            )
            return
        if not self._conflicts.allow((row.holder_id, instance_id)):
            return
        self._log.warning(
            "lease.instance_conflict",
            controller_id=row.holder_id,
            instance_id=instance_id,
            holder_instance_id=row.holder_instance_id,
            holder_host=row.holder_host,
            term=row.term,
            operation=operation,
            remote_addr=request.environ.get("REMOTE_ADDR"),
            request_id=request.request_id,
        )

    def _log_acquire(
        self, decision: AcquireDecision, request: Request, instance_id: str | None
    ) -> None:
        row, previous = decision.row, decision.previous
        if decision.conflict:
            self._log_conflict(decision, instance_id, "acquire", request)
            return
        fields = {
            "holder_id": row.holder_id,
            "holder_host": row.holder_host,
            "term": row.term,
            "lease_expires_at": round(row.lease_expires_at, 3),
            "request_id": request.request_id,
        }
        if decision.operation != "acquire":
            self._log.debug(f"lease.{decision.operation}", **fields)
        elif decision.takeover and previous is not None:
            self._log.warning(
                "lease.takeover",
                previous_holder_id=previous.holder_id,
                previous_term=previous.term,
                expired_for_sec=round(row.renewed_at - previous.lease_expires_at, 3),
                **fields,
            )
        else:
            self._log.info(
                "lease.granted",
                previous_holder_id=previous.holder_id if previous else None,
                previous_term=previous.term if previous else None,
                **fields,
            )


class _RateLimit:
    """Says yes to a key at most once per `interval` seconds (bounded memory)."""

    def __init__(self, interval: float, clock: Callable[[], float], max_keys: int = 10_000):
        self._interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[Any, float] = {}

    def allow(self, key: Any) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        if len(self._last) >= self._max_keys:
            self._last = {k: t for k, t in self._last.items() if now - t < self._interval}
        self._last[key] = now
        return True


def _request(environ: Mapping[str, Any]) -> Request:
    method = environ.get("REQUEST_METHOD", "GET").upper()
    path = environ.get("PATH_INFO", "") or "/"
    return Request(environ, method, path, _request_id(environ))


def _request_id(environ: Mapping[str, Any]) -> str:
    given = environ.get("HTTP_X_REQUEST_ID", "")
    # A caller's own id is echoed for tracing when it is short and plain; otherwise we mint one.
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return os.urandom(16).hex()  # 128 random bits, as a uuid4 had, without the UUID object


def _history_limit(query: str) -> int:
    """`limit` of a history query: 1..HISTORY_MAX_LIMIT, default HISTORY_DEFAULT_LIMIT."""
    values = parse_qs(query, keep_blank_values=True).get("limit", [])
    if not values:
        return HISTORY_DEFAULT_LIMIT
    text = values[0].strip()
    if len(values) == 1 and text.isascii() and text.isdigit() and len(text) <= 6:
        limit = int(text)
        if 1 <= limit <= HISTORY_MAX_LIMIT:
            return limit
    raise HttpError(
        400,
        "invalid_request",
        f"limit must be one integer from 1 to {HISTORY_MAX_LIMIT}",
        details={"limit": [f"Must be an integer from 1 to {HISTORY_MAX_LIMIT}."]},
    )


def _client_connected(environ: Mapping[str, Any]) -> bool:
    """Whether the client of a parked request still holds its connection open.

    A parked client sends nothing more until it has its answer, so a socket that has become
    readable means the client closed it (or reset it). Nothing is read: were it ever a
    pipelined request instead, the waiter would merely answer early and that request would be
    served next, as usual.
    """
    sock = environ.get(SOCKET_ENVIRON_KEY)
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):  # closed under us
        return False
    return not readable


def _method_not_allowed(request: Request, methods: Iterable[str]) -> HttpError:
    allow = ", ".join(sorted(methods))
    return HttpError(
        405,
        "method_not_allowed",
        f"{request.method} is not allowed on {request.path}; use {allow}",
        headers=[("Allow", allow)],
    )


def _read_json(environ: Mapping[str, Any]) -> Any:
    raw_length = environ.get("CONTENT_LENGTH") or ""
    stream = environ.get("wsgi.input")
    try:
        if raw_length.strip():
            if not (raw_length.isascii() and raw_length.strip().isdigit()):
                raise HttpError(400, "invalid_request", "invalid Content-Length header")
            length = int(raw_length)
            if length > MAX_BODY_BYTES:
                raise _too_large()
            data = httpserver.read_capped(stream, length) if length else b""
        elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            data = httpserver.read_capped(stream, MAX_BODY_BYTES + 1)
            if len(data) > MAX_BODY_BYTES:
                raise _too_large()
        else:
            data = b""
    except (OSError, ValueError) as exc:  # a malformed chunked body, a client that left
        raise HttpError(
            400,
            "invalid_request",
            "the request body could not be read",
            details={"body": [str(exc)[:200]]},
            headers=[("Connection", "close")],
        ) from None
    if not data.strip():
        raise HttpError(
            400,
            "invalid_json",
            "request body is empty; expected a JSON object",
            details={"body": ["Expected a JSON object."]},
        )
    try:
        text = data.decode("utf-8")
        document = json.loads(
            text,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
        if "\\u" in text:  # only an escape can make a lone surrogate out of valid UTF-8
            json.dumps(document, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise HttpError(
            400,
            "invalid_json",
            "request body is not valid JSON",
            details={"body": [_json_problem(exc)]},
        ) from None
    if not isinstance(document, dict):
        raise HttpError(
            400,
            "invalid_json",
            "request body must be a JSON object",
            details={"body": ["Expected a JSON object."]},
        )
    return document


def _bounded_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise ValueError(f"integer out of range (beyond 64 bits): {text[:40]}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _json_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeEncodeError):
        return "a string holds a lone surrogate (not Unicode)"
    return str(exc)[:200]


def _too_large() -> HttpError:
    return HttpError(
        413,
        "payload_too_large",
        f"request body exceeds {MAX_BODY_BYTES} bytes",
        # Do not keep the connection for a body we will not read.
        headers=[("Connection", "close")],
    )


def _as_mapping(messages: Any) -> Mapping[str, Any]:
    return messages if isinstance(messages, Mapping) else {"_schema": messages}
