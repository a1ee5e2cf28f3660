"""The local status endpoint of a running node, its Prometheus metrics, and `conductord status`.

Endpoint (SPEC §8), served by gevent.pywsgi inside the daemon on `local_api_base`:
- `GET /healthz`: 200 while both loops make progress; 503 once a loop has not finished a cycle
  for longer than its worst-case cycle gap (see `progress_limits`), or while the loops are not
  running (not started yet, stopping, crashed). A wedged renewal must not look healthy to
  launchd, supervisord or a probe.
- `GET /readyz`: 200 when leader or standby, 503 when degraded.
- `GET /v1/status`: the runtime snapshot (SPEC §6).
- `GET /metrics`: Prometheus text (OpenMetrics when the scraper asks for it).
Other paths 404, other methods 405 (with `allow`), all as small compact JSON bodies. HEAD is
answered like GET without a body.

Design: the app only reads the runtime, at request time; nothing is pushed on the hot path. The
metrics come from a custom collector on a private registry that reads the runtime's counters
when scraped, so there is no global registry and no per-event bookkeeping here. The server is
`httpserver.LimitedWSGIServer`, as for the Control API: TCP_NODELAY, a 10 s request deadline,
a 60 s idle timeout, a 16 KiB head, framing checks, bodies of at most 4 KiB, and at most
`MAX_CONNECTIONS` connections (fewer under a low descriptor limit: the daemon's own Control API
calls need descriptors too), the idlest shed at the cap; client faults are rate-limited
warnings, never tracebacks. Requests are not logged at info.

Limits: loopback only (the config refuses anything else), no auth, no TLS. The app runs in the
daemon's hub: a handler must never block. The daemon does not raise its descriptor limit (its
children would inherit it); the connection cap follows the limit it was started with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from conductord import __version__, httpserver
from conductord.config import SETTINGS_BY_NAME
from conductord.exec import EXIT_REASONS as EXEC_EXIT_REASONS
from conductord.lease import JITTER, LeaseState
from conductord.redact import clean

__all__ = [
    "RuntimeCollector",
    "StatusServer",
    "StatusServerError",
    "health",
    "make_app",
    "progress_limits",
]

# The loops pace with ±JITTER; a cycle may start that much later.
# Slack on top of the worst-case cycle gap (SPEC §8: interval + request timeout + 1 s).
_HEALTH_SLACK_S = 1.0
# Connections at most; under a low descriptor limit a quarter of it (the daemon's own calls and
# its children's pipes need the rest).
MAX_CONNECTIONS = 64
# Requests are GETs; a body is read and dropped, up to this.
_MAX_BODY_BYTES = 4096
# How long stop() lets in-flight answers finish; every handler answers from memory.
_STOP_GRACE_S = 0.25

_JSON = "application/json"
_ALLOW = "GET, HEAD"
_LOCAL_API = SETTINGS_BY_NAME["local_api_base"]


# ---------------------------------------------------------------------------------------------
# Health


def progress_limits(config: Any, lease_state: LeaseState | str) -> dict[str, float]:
    """Seconds each loop may go without finishing a cycle before /healthz reports 503.

    A cycle ends at most one jittered interval plus one call after the previous one ended (the
    client caps each call at the request timeout). A non-leader's lease call may long-poll for
    `wait_ms` = the renew interval more (SPEC §12).
    """
    timeout_s = config.request_timeout_ms / 1000.0

    def limit(interval_ms: int) -> float:
        return interval_ms / 1000.0 * (1 + JITTER) + timeout_s + _HEALTH_SLACK_S

    lease = limit(config.lease_renew_interval_ms)
    if str(lease_state) != LeaseState.LEADER:
        lease += config.lease_renew_interval_ms / 1000.0
    return {"heartbeat": limit(config.heartbeat_interval_ms), "lease": lease}


def health(runtime: Any) -> tuple[bool, dict[str, Any]]:
    """(healthy, body) of /healthz, read from the runtime at call time."""
    now = runtime.clock()
    state = runtime.machine.state
    limits = progress_limits(runtime.config, state)
    reasons: list[str] = []
    if runtime.stop_requested.is_set():
        reasons.append("the daemon is stopping")
    loops: dict[str, dict[str, float | None]] = {}
    for name, limit in limits.items():
        progress = runtime.loop_progress.get(name)
        age = None if progress is None else round(max(now - progress, 0.0), 3)
        loops[name] = {"seconds_since_progress": age, "limit_seconds": round(limit, 3)}
        if age is None:
            reasons.append(f"the {name} loop is not running")
        elif age > limit:
            reasons.append(
                f"the {name} loop has not finished a cycle for {age:.1f} s (limit {limit:.1f} s)"
            )
    body: dict[str, Any] = {"status": "unhealthy" if reasons else "ok"}
    if reasons:
        body["reason"] = "; ".join(reasons)
    body["lease_state"] = str(state)
    body["loops"] = loops
    return not reasons, body


# ---------------------------------------------------------------------------------------------
# Metrics


class RuntimeCollector(Collector):
    """Builds every `conductord_*` metric from the runtime's state when scraped."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[Metric]:
        rt = self._runtime
        machine = rt.machine
        now = rt.clock()
        state = machine.state

        info = GaugeMetricFamily(
            "conductord_build_info", "conductord build; the value is always 1", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info

        states = GaugeMetricFamily(
            "conductord_lease_state",
            "1 for the node's current lease state, 0 for the others",
            labels=["state"],
        )
        for candidate in LeaseState:
            states.add_metric([str(candidate)], 1 if state is candidate else 0)
        yield states

        yield _gauge(
            "conductord_lease_term",
            "current lease term (fencing token) as last reported by the Control API",
            machine.current_term,
        )
        yield _gauge(
            "conductord_is_leader", "1 while this node is the leader", state is LeaseState.LEADER
        )
        yield _gauge(
            "conductord_scheduler_enabled",
            "1 while this node may schedule (leader and within its local lease deadline)",
            machine.scheduler_enabled(now),
        )
        yield _gauge(
            "conductord_lease_expires_timestamp_seconds",
            "lease expiry as reported by the Control API (unix time, server clock)",
            machine.lease_expires_at,
        )
        yield _gauge(
            "conductord_last_heartbeat_timestamp_seconds",
            "unix time of the last successful heartbeat",
            machine.last_heartbeat_at,
        )
        yield _gauge(
            "conductord_last_renew_timestamp_seconds",
            "unix time of the last successful acquire/renew call",
            rt.last_renew_at,
        )

        ages = GaugeMetricFamily(
            "conductord_loop_progress_age_seconds",
            "seconds since the loop last finished a cycle (what /healthz judges)",
            labels=["loop"],
        )
        for name, progress in sorted(rt.loop_progress.items()):
            if progress is not None:
                ages.add_metric([name], max(now - progress, 0.0))
        yield ages

        yield CounterMetricFamily(
            "conductord_lease_renew_failures",
            "failed acquire/renew calls",
            value=rt.renew_failures_total,
        )
        yield CounterMetricFamily(
            "conductord_heartbeat_failures",
            "failed heartbeat calls",
            value=rt.heartbeat_failures_total,
        )
        per_url = CounterMetricFamily(
            "conductord_control_api_calls",
            "Control API calls by base URL and outcome (ok; error; moved: refused before"
            " the request was sent, so the call went on to the next URL)",
            labels=["base_url", "outcome"],
        )
        for (base_url, outcome), count in sorted(rt.client.call_counts().items()):
            per_url.add_metric([base_url, outcome], count)
        yield per_url
        transitions = CounterMetricFamily(
            "conductord_lease_transitions",
            "lease state transitions by from/to state",
            labels=["from_state", "to_state"],
        )
        for (from_state, to_state), count in sorted(rt.transitions_total.items()):
            transitions.add_metric([from_state, to_state], count)
        yield transitions
        yield from _exec_metrics(getattr(rt, "exec_supervisor", None))


def _exec_metrics(sup: Any) -> Iterable[Metric]:
    """The --exec metrics (SPEC §14); zero without --exec, so every node exports them."""
    yield _gauge(
        "conductord_exec_running",
        "1 while this node's --exec command runs",
        sup is not None and sup.running,
    )
    yield CounterMetricFamily(
        "conductord_exec_starts",
        "--exec command runs started",
        value=sup.starts_total if sup is not None else 0,
    )
    exits = CounterMetricFamily(
        "conductord_exec_exits",
        "--exec command runs ended, by reason (exited on its own, leadership_lost, stopping,"
        " deadline)",
        labels=["reason"],
    )
    counts = sup.exits_total if sup is not None else {}
    for reason in EXEC_EXIT_REASONS:
        exits.add_metric([reason], counts.get(reason, 0))
    yield exits


def _gauge(name: str, documentation: str, value: float | bool | None) -> GaugeMetricFamily:
    """A single-sample gauge; an unknown value yields the family with no sample."""
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], float(value))
    return family


# ---------------------------------------------------------------------------------------------
# WSGI app

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _json_bytes(document: Any, secrets: tuple[str, ...] = ()) -> bytes:
    # Redacted like a log line: a server could name the token as the lease holder.
    return json.dumps(clean(document, secrets), separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


class _App:
    """The status endpoint's routes over one runtime."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        token = runtime.config.shared_token
        self._secrets: tuple[str, ...] = (token,) if token else ()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(RuntimeCollector(runtime))
        self._routes: dict[str, Callable[[dict[str, Any]], tuple[int, str, bytes]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/v1/status": self._status,
            "/metrics": self._metrics,
        }

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        route = self._routes.get(environ.get("PATH_INFO") or "/")
        extra: list[tuple[str, str]] = []
        if route is None:
            code, ctype, body = _error(404, "not_found", "no such path; see /v1/status")
        elif method not in ("GET", "HEAD"):
            code, ctype, body = _error(405, "method_not_allowed", "only GET and HEAD")
            extra.append(("Allow", _ALLOW))
        else:
            try:
                # A step-down that is due is applied before anything is read: after a system
                # sleep, gevent's timers fire late (see runtime.Runtime.refresh).
                refresh = getattr(self._runtime, "refresh", None)
                if refresh is not None:
                    refresh()
                code, ctype, body = route(environ)
            except Exception as exc:  # a bug here must not take the daemon's hub down
                self._runtime.log.error(
                    "status_api.error",
                    path=environ.get("PATH_INFO"),
                    error=f"{type(exc).__name__}: {exc}",
                )
                code, ctype, body = _error(500, "internal_error", "see the daemon's log")
        headers = [
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *extra,
        ]
        start_response(_STATUS_LINES[code], headers)
        return [] if method == "HEAD" else [body]

    def _healthz(self, environ: dict[str, Any]) -> tuple[int, str, bytes]:
        ok, body = health(self._runtime)
        return (200 if ok else 503), _JSON, _json_bytes(body, self._secrets)

    def _readyz(self, environ: dict[str, Any]) -> tuple[int, str, bytes]:
        machine = self._runtime.machine
        degraded = machine.state is LeaseState.DEGRADED
        body: dict[str, Any] = {
            "status": "degraded" if degraded else "ready",
            "lease_state": str(machine.state),
        }
        if degraded:
            body["last_error"] = machine.last_error
        return (503 if degraded else 200), _JSON, _json_bytes(body, self._secrets)

    def _status(self, environ: dict[str, Any]) -> tuple[int, str, bytes]:
        return 200, _JSON, _json_bytes(self._runtime.snapshot(), self._secrets)

    def _metrics(self, environ: dict[str, Any]) -> tuple[int, str, bytes]:
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        return 200, content_type, encoder(self._registry)


_STATUS_LINES = {
    200: "200 OK",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}


def _error(code: int, error: str, message: str) -> tuple[int, str, bytes]:
    return code, _JSON, _json_bytes({"error": error, "message": message})


def make_app(runtime: Any) -> WsgiApp:
    """The WSGI app of the status endpoint, reading `runtime` at request time.

    `runtime` needs: `snapshot()`, `config`, `machine`, `clock()`, `loop_progress`,
    `stop_requested` (an Event), `transitions_total`, `renew_failures_total`,
    `heartbeat_failures_total`, `last_renew_at`, `log`, `client.call_counts()`, and optionally
    `refresh()` (called before each answer) and `exec_supervisor` (`running`, `starts_total`,
    `exits_total`; None without --exec).
    """
    return _App(runtime)


# ---------------------------------------------------------------------------------------------
# Server


class StatusServerError(Exception):
    """The status endpoint could not start; `str()` is one line naming the address."""


class StatusServer:
    """The status endpoint on `base_url` (`http://HOST:PORT`; port 0 picks a free one)."""

    def __init__(self, runtime: Any, base_url: str) -> None:
        self._runtime = runtime
        parts = urlsplit(base_url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None:
            raise StatusServerError(f"status endpoint URL must be http://HOST:PORT: {base_url}")
        self._host: str = parts.hostname
        self._port: int = port
        self._server: httpserver.LimitedWSGIServer | None = None

    @property
    def url(self) -> str:
        """The base URL clients use; after `start()` it carries the bound port."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    def start(self) -> None:
        """Bind and serve in the background (in the current hub); idempotent."""
        if self._server is not None:
            return
        server = httpserver.LimitedWSGIServer(
            (self._host, self._port),
            make_app(self._runtime),
            log=self._runtime.log,
            max_connections=_connection_cap(),
            max_body_bytes=_MAX_BODY_BYTES,
        )
        try:
            server.start()
        except OSError as err:
            server.close()
            # gevent appends the address to strerror; the message names it once already.
            reason = os.strerror(err.errno) if err.errno else str(err) or type(err).__name__
            raise StatusServerError(
                f"cannot serve the status endpoint on {self.url} ({_LOCAL_API.label}): {reason}"
            ) from None
        self._port = server.server_port
        self._server = server
        self._runtime.log.info("status_api.listening", url=self.url)

    def stop(self) -> None:
        """Stop accepting, let in-flight answers finish briefly, close the rest; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=_STOP_GRACE_S)


def _connection_cap() -> int:
    limit = httpserver.descriptor_limit()
    return httpserver.connection_cap(limit // 4, reserve=0, ceiling=MAX_CONNECTIONS)
