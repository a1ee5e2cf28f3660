"""HTTP client of the Control API v1 (SPEC §4, §17): transport policy in one place.

Public APIs only (SPEC §18). One plain `requests.Session` (`trust_env` off: environment proxies
and `~/.netrc`, whose entry would replace the authorization header, are never consulted) with
one plain `HTTPAdapter(max_retries=0)` keeping a keep-alive pool per base URL. The request of
each URL and path is prepared once with the session's headers (`Session.prepare_request`); a
call sends a copy carrying its body (`PreparedRequest.copy`, `prepare_body`) through
`HTTPAdapter.send` with `stream=True`. `Session.send` would add only cookies, hooks and
redirects, none of them wanted, and its look at a redirect reads a 3xx body whole, past the
body cap. So: no redirects followed, no hidden retries (the lease loop owns retrying, and a
retry here would stretch a renewal past what the lease state machine assumes), bodies above
`MAX_BODY_BYTES` refused after capped reads of the raw stream (`response.raw.read(amt)`).

Deadline: the whole call (name resolution, connect, send, every read, every URL it tries)
runs inside one `gevent.Timeout` of the call's budget, `timeout_ms` plus `wait_ms` for a
long-poll (§12), as client-go wraps each call in one `context.WithTimeout`. The daemon always
runs monkey-patched, where the timeout interrupts whatever socket operation is blocking, so a
server that trickles bytes cannot stretch a call. The connect timeout is the request timeout
capped at the time left, each read's the time left: outside gevent (plain threads, most unit
tests) they still bound every socket operation, but not their sum.

Several base URLs (§17): the client uses one at a time, starting with the first and staying on
whichever last answered. A call whose connection could not even be opened (refused, reset or
unreachable while connecting, name not resolved: urllib3's `NewConnectionError`) has sent
nothing, so it moves on to the next URL within its own budget. Any failure once a connection
was open is that call's failure, since the request may have reached a server and a renewal
must never be sent twice: a timeout (connect or read), a reset or close after connecting
(urllib3 reports a failed send and a failed read alike, so both count as "may have been
sent"), a 5xx, or a 2xx that is not a Control API answer (not JSON, too large); the next call
then uses the next URL. A 4xx is a live server's answer (the others share its configuration
and store) and moves nothing. Only the call that used the current URL moves it, so the
heartbeat and lease loops failing together move it once, not twice. A TLS handshake reset
counts as "may have been sent" (one failed call instead of a move): the cost of deciding from
public exceptions rather than inside the socket send. `call_counts()` feeds the metric
`conductord_control_api_calls_total{base_url,outcome}`.

Every failure is a `ControlApiError` whose text is exactly SPEC §4's. A server's text in it is
made valid Unicode and stripped of the token and of any piece of it of 8 characters or more
(`conductord.redact`) before it is cut to length.

GETs (`ControlApiClient.get`, for `fleet`, `diagnose`'s endpoint checks and the daemon's store
check) go the same way: the same session, one `gevent.Timeout` of `timeout_ms` around the
call, the same body cap, §4 rules 1–4 with the same texts and redaction. A GET goes to one URL
(`base_url=`, default the one in use): it never moves on by itself, never moves the URL the
POSTs use, and is not counted in `call_counts()`. Callers that read several URLs choose how
(`fleet`: the first that answers; `endpoints`: each one). `capped_get(url, ...)` is that
transport for an endpoint that is no Control API (the node's own `/v1/status`, read by
`conductord status`): raw status and bytes, failures as `TransportError`.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import gevent
import requests
from marshmallow import Schema, ValidationError
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError, ReadTimeoutError

from conductord import __version__
from conductord.redact import redact, safe_text, server_text
from conductord.wire import (
    ACQUIRE_PATH,
    HEARTBEAT_PATH,
    MAX_WAIT_MS,
    RELEASE_PATH,
    AcquireRequestSchema,
    AcquireResult,
    ControlApiError,
    Heartbeat,
    HeartbeatRequestSchema,
    ReleaseRequestSchema,
    ReleaseResult,
    dump_request,
    parse_acquire_result,
    parse_envelope,
    parse_release_result,
)

__all__ = [
    "MAX_BODY_BYTES",
    "OUTCOMES",
    "Answer",
    "ControlApiClient",
    "ControlApiError",
    "TransportError",
    "capped_get",
    "describe_transport_error",
    "new_session",
]

MAX_BODY_BYTES: Final = 1024 * 1024
OUTCOMES: Final = ("ok", "error", "moved")
_BODY_PREVIEW_CHARS: Final = 200  # §4 rule 2
_ENVELOPE_TEXT_CHARS: Final = 1000  # keeps a runaway server message out of every log line
_REDACT_SLACK: Final = 1024  # server bytes decoded beyond a cut, so redaction sees the cut
_READ_CHUNK: Final = 64 * 1024
# Two loops (heartbeat, lease) and a release may overlap; more would only idle.
_POOL_SIZE: Final = 4
_PATHS: Final = (HEARTBEAT_PATH, ACQUIRE_PATH, RELEASE_PATH)

_HEARTBEAT_SCHEMA = HeartbeatRequestSchema()
_ACQUIRE_SCHEMA = AcquireRequestSchema()
_RELEASE_SCHEMA = ReleaseRequestSchema()


class _NotSent(Exception):
    """No connection could be opened: nothing of the request left this process."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class TransportError(Exception):
    """A request got no answer to interpret. `kind`:

    - `refused`: no connection could be opened (refused, unreachable, name not resolved):
      nothing of the request was sent;
    - `failed`: the connection broke once open: the request may have reached the server;
    - `timeout`: a connect or read timeout, or the whole-call deadline;
    - `too_large`: a 2xx body above `MAX_BODY_BYTES` (`status` set).

    `detail` is the cause as one line of valid text, not redacted (the caller knows its
    secrets).
    """

    def __init__(
        self,
        kind: Literal["refused", "failed", "timeout", "too_large"],
        detail: str,
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status


@dataclass(frozen=True)
class Answer:
    """An HTTP answer read whole (a non-2xx body may be cut at the cap)."""

    status: int
    reason: str
    body: bytes

    def json(self) -> tuple[bool, Any]:
        """(parsed?, value): the body as strict JSON (no NaN/Infinity), UTF-8."""
        return _json_or_none(self.body)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_or_none(body: bytes) -> tuple[bool, Any]:
    """(parsed?, value): strict JSON (no NaN/Infinity), UTF-8."""
    try:
        return True, json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are both
        return False, None


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (requests' and urllib3's layers), outermost first."""
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    found: list[BaseException] = []
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__]
        nested.extend(current.args)
        queue.extend(item for item in nested if isinstance(item, BaseException))
    return found


def describe_transport_error(exc: BaseException) -> str:
    """The most telling cause in requests' and urllib3's layers of wrapping.

    "Connection refused" rather than the urllib3 pool repr around it; `conductord status`
    uses it too.
    """
    fallback: BaseException | None = None
    for current in _causes(exc):
        if isinstance(current, http.client.IncompleteRead):
            partial = current.partial
            read = len(partial) if isinstance(partial, bytes) else partial
            more = "" if current.expected is None else f", {current.expected} more expected"
            return f"response cut short ({read} bytes read{more})"
        module = type(current).__module__
        if isinstance(current, OSError) and not module.startswith(("requests", "urllib3")):
            return current.strerror or str(current) or type(current).__name__
        if isinstance(current, http.client.BadStatusLine):  # RemoteDisconnected is one too
            return f"invalid HTTP status line {_cut(str(current.line).strip(), 100)!r}"
        if isinstance(current, http.client.HTTPException) and fallback is None:
            fallback = current
    chosen = fallback or exc
    return str(chosen) or type(chosen).__name__


def _never_sent(exc: BaseException) -> bool:
    """The failure was opening a new connection, before any byte of the request was written."""
    return any(isinstance(cause, NewConnectionError) for cause in _causes(exc))


def _unhealthy(err: ControlApiError) -> bool:
    """The URL did not answer as a Control API: no answer, a 5xx, or a 2xx that is no answer."""
    status = err.status
    return status is None or status >= 500 or (status < 300 and err.code is None)


def _base_urls(base_urls: str | Sequence[str]) -> tuple[str, ...]:
    raw = base_urls.split(",") if isinstance(base_urls, str) else list(base_urls)
    urls: list[str] = []
    for item in raw:
        url = item.strip().rstrip("/") if isinstance(item, str) else ""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("Control API base URL must be an http:// or https:// URL")
        if url in urls:
            raise ValueError("Control API base URLs must not repeat")
        urls.append(url)
    if not urls:
        raise ValueError("Control API base URL must be an http:// or https:// URL")
    return tuple(urls)


def new_session(
    *, user_agent: str | None = None, pool_connections: int = 1, pool_maxsize: int = _POOL_SIZE
) -> requests.Session:
    """A `requests.Session` with the client's policy: `trust_env` off (no proxies or `~/.netrc`
    from the environment), one `HTTPAdapter(max_retries=0)` for http and https, and only the
    `accept` and `user-agent` headers."""
    session = requests.Session()
    session.trust_env = False
    adapter = HTTPAdapter(
        max_retries=0, pool_connections=pool_connections, pool_maxsize=pool_maxsize
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.clear()
    session.headers.update(
        {"accept": "application/json", "user-agent": user_agent or f"conductord/{__version__}"}
    )
    return session


def _read_body(response: requests.Response) -> bytes:
    """The whole body by capped reads of the raw stream; a 2xx above the cap is `too_large`,
    a larger error page is cut (its first characters are all §4 rule 2 quotes)."""
    status = response.status_code
    ok = 200 <= status < 300
    declared = response.headers.get("content-length", "")
    if ok and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large(status)
    chunks: list[bytes] = []
    total = 0
    while total <= MAX_BODY_BYTES:
        chunk = response.raw.read(min(_READ_CHUNK, MAX_BODY_BYTES + 1 - total))
        if not chunk:
            response.raw.release_conn()  # read to the end: the connection stays alive
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if response.raw.length_remaining == 0:
            # All the declared bytes are in: asking for the end again would be a read more.
            response.raw.release_conn()
            return b"".join(chunks)
    response.close()
    if not ok:
        return b"".join(chunks)
    raise _too_large(status)


def _too_large(status: int) -> TransportError:
    return TransportError(
        "too_large", f"response body larger than {MAX_BODY_BYTES} bytes", status=status
    )


def exchange(
    session: requests.Session,
    request: requests.PreparedRequest,
    *,
    connect_s: float,
    read_s: float,
) -> Answer:
    """Send one prepared request through the session's adapter and read the whole answer.

    `HTTPAdapter.send` with `stream=True`: no redirects followed, no retries, and the body
    read under the cap (`Session.send` would read a redirect's body whole just to look at
    it). Raises `TransportError`; the whole-call deadline is the caller's `gevent.Timeout`.
    """
    try:
        response = session.get_adapter(request.url or "").send(
            request,
            stream=True,
            timeout=(connect_s, read_s),
            verify=session.verify,
            cert=session.cert,
            proxies={},
        )
        try:
            body = _read_body(response)
        except BaseException:
            response.close()  # a half-read connection must not go back to the pool
            raise
        return Answer(response.status_code, response.reason or "", body)
    except TransportError:
        raise
    except (requests.Timeout, ReadTimeoutError, TimeoutError):
        raise TransportError("timeout", "timed out") from None
    except Exception as exc:  # requests, urllib3, http.client, ssl, socket: all transport
        detail = safe_text(" ".join(describe_transport_error(exc).split()))
        raise TransportError("refused" if _never_sent(exc) else "failed", detail) from None


def capped_get(
    url: str, *, timeout_ms: int, headers: Mapping[str, str] | None = None
) -> Answer:
    """One GET of `url` with the client's transport (session policy, body cap, whole-call
    deadline as a `gevent.Timeout` of `timeout_ms`), for an endpoint that is not the Control
    API. Raises `TransportError`."""
    seconds = timeout_ms / 1000
    with new_session() as session:
        request = session.prepare_request(requests.Request("GET", url, headers=headers))
        timer = gevent.Timeout(seconds)
        try:
            with timer:
                return exchange(session, request, connect_s=seconds, read_s=seconds)
        except gevent.Timeout as fired:
            if fired is not timer:
                raise
            raise TransportError("timeout", "timed out") from None


def _field_errors(messages: Any, prefix: str = "") -> list[str]:
    if isinstance(messages, dict):
        found: list[str] = []
        for key, value in messages.items():
            found += _field_errors(value, f"{prefix}{key}: ")
        return found
    if isinstance(messages, list | tuple):
        return [f"{prefix}{' '.join(str(m) for m in messages)}"]
    return [f"{prefix}{messages}"]


def _piggyback(heartbeat: Heartbeat) -> dict[str, Any]:
    """The part of a heartbeat that rides on an acquire (its identity is the acquire's)."""
    return {
        "role": heartbeat.role,
        "priority": heartbeat.priority,
        "status": heartbeat.status,
        "version": heartbeat.version,
        "heartbeat_at": heartbeat.heartbeat_at,
        "started_at": heartbeat.started_at,
    }


class ControlApiClient:
    """Control API v1 over keep-alive sessions; see the module docstring for the policy.

    `base_urls` is one URL, a comma-separated list, or a sequence of URLs (a trailing `/` is
    dropped). `base_url` is the one in use, `base_urls` all of them.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout_ms: int = 5000,
        user_agent: str | None = None,
    ) -> None:
        urls = _base_urls(base_urls)
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 1:
            raise ValueError("timeout_ms must be an integer >= 1")
        if token is not None and (
            not token or any(ch in token for ch in "\r\n\0") or not token.isprintable()
        ):
            # Checked here because requests would echo the header value in its own error.
            raise ValueError("shared token is empty or holds characters not allowed in a header")
        self.base_urls = urls
        self.timeout_ms = timeout_ms
        self._token = token or None
        self._secrets = (self._token,) if self._token else ()
        session = new_session(user_agent=user_agent, pool_connections=len(urls))
        session.headers["content-type"] = "application/json"
        if self._token is not None:
            session.headers["authorization"] = f"Bearer {self._token}"
        self._session = session
        self._requests = [
            {path: session.prepare_request(requests.Request("POST", url + path)) for path in _PATHS}
            for url in urls
        ]
        self._lock = threading.Lock()
        self._current = 0
        self._counts = {(url, outcome): 0 for url in urls for outcome in OUTCOMES}

    def __repr__(self) -> str:
        return (
            f"ControlApiClient(base_urls={list(self.base_urls)!r}, timeout_ms={self.timeout_ms}, "
            f"has_token={self._token is not None})"
        )

    def __enter__(self) -> ControlApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    @property
    def base_url(self) -> str:
        """The base URL in use: the next call starts there."""
        return self.base_urls[self._current]

    def call_counts(self) -> dict[tuple[str, str], int]:
        """Calls per (base URL, outcome), every pair present, for
        `conductord_control_api_calls_total{base_url,outcome}`: `ok` answered there, `error`
        failed there, `moved` refused there before the request was sent and went on."""
        with self._lock:
            return dict(self._counts)

    # -- endpoints ---------------------------------------------------------------------------

    def heartbeat(self, heartbeat: Heartbeat) -> object:
        """Register or refresh this node; returns the response data (None for no body)."""
        return self._post(HEARTBEAT_PATH, self._body(HEARTBEAT_PATH, _HEARTBEAT_SCHEMA, heartbeat))

    def acquire_leader_lease(
        self,
        *,
        controller_id: str,
        host: str,
        ttl_sec: int,
        preferred: bool,
        now: int | None = None,
        metadata_json: str | None = None,
        wait_ms: int | None = None,
        instance_id: str | None = None,
        one_shot: bool | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> AcquireResult:
        """Acquire or renew the lease; `wait_ms` > 0 long-polls (§12) and extends the budget.

        A wait above the wire's 60 s is cut to it rather than refused. `heartbeat` rides along
        (its identity is the acquire's); `AcquireResult.heartbeat_recorded` says whether the
        server took it.
        """
        if now is None:
            now = int(time.time())
        wait = min(max(wait_ms or 0, 0), MAX_WAIT_MS)
        body = self._body(
            ACQUIRE_PATH,
            _ACQUIRE_SCHEMA,
            {
                "controller_id": controller_id,
                "host": host,
                "ttl_sec": ttl_sec,
                "preferred": preferred,
                "metadata_json": metadata_json,
                "now": now,
                "wait_ms": wait or None,
                "instance_id": instance_id,
                "one_shot": one_shot or None,
                "heartbeat": None if heartbeat is None else _piggyback(heartbeat),
            },
        )
        data = self._post(ACQUIRE_PATH, body, extra_ms=wait)
        return parse_acquire_result(
            data, controller_id=controller_id, host=host, now=now, instance_id=instance_id
        )

    def release_leader_lease(
        self,
        *,
        controller_id: str,
        term: int,
        instance_id: str | None = None,
        one_shot: bool | None = None,
    ) -> ReleaseResult:
        """Give the lease up; a server without this endpoint (404) yields supported=False."""
        body = self._body(
            RELEASE_PATH,
            _RELEASE_SCHEMA,
            {
                "controller_id": controller_id,
                "term": term,
                "instance_id": instance_id,
                "one_shot": one_shot or None,
            },
        )
        try:
            data = self._post(RELEASE_PATH, body)
        except ControlApiError as err:
            if err.status == 404:
                return ReleaseResult(released=False, supported=False, lease=None)
            raise
        return parse_release_result(data)

    def get(
        self,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        base_url: str | None = None,
        authorized: bool = True,
    ) -> Any:
        """GET `path` (`params` as its query) from `base_url` (one of `base_urls`; default the
        one in use) and return the answer's data by §4 rules 1–3, or raise `ControlApiError`
        with the §4 text (`{path}` without the query). `authorized=False` sends no token.

        Bounded as a whole by `timeout_ms`. Never tries another URL, never moves the URL in use
        and is not counted in `call_counts()` (module docstring)."""
        index = self._index_of(base_url)
        headers: dict[str, str | None] = {"content-type": None}  # None: no such header
        if not authorized:
            headers["authorization"] = None
        request = self._session.prepare_request(
            requests.Request("GET", self.base_urls[index] + path, params=params, headers=headers)
        )
        budget_ms = self.timeout_ms
        deadline = time.monotonic() + budget_ms / 1000
        timer = gevent.Timeout(budget_ms / 1000)
        try:
            with timer:
                answer = self._exchange(path, request, deadline, budget_ms)
        except gevent.Timeout as fired:
            if fired is not timer:
                raise
            raise self._timed_out(path, budget_ms) from None
        except _NotSent as refused:
            raise ControlApiError(
                f"Control API {path}: connection failed: {refused.detail}", path=path
            ) from None
        except ControlApiError as err:
            raise self._redacted(err) from None
        return self._interpret(path, answer.status, answer.reason, answer.body)

    def _index_of(self, base_url: str | None) -> int:
        if base_url is None:
            return self._current
        try:
            return self.base_urls.index(base_url.strip().rstrip("/"))
        except ValueError:
            raise ValueError(f"{base_url!r} is not one of this client's base URLs") from None

    # -- transport ---------------------------------------------------------------------------

    @staticmethod
    def _body(path: str, schema: Schema, value: Any) -> dict[str, Any]:
        """The wire body, checked against the rules the server holds it to."""
        try:
            return dump_request(schema, value)
        except ValidationError as err:
            # The messages name fields and rules, never values.
            detail = "; ".join(_field_errors(err.messages))
            raise ControlApiError(
                f"Control API {path}: request not sent: {detail}", path=path
            ) from None

    def _post(self, path: str, body: dict[str, Any], *, extra_ms: int = 0) -> Any:
        budget_ms = self.timeout_ms + extra_ms
        data = json.dumps(body, separators=(",", ":")).encode("ascii")
        first = index = self._current
        deadline = time.monotonic() + budget_ms / 1000
        timer = gevent.Timeout(budget_ms / 1000)
        try:
            with timer:
                while True:
                    request = self._requests[index][path].copy()
                    request.prepare_body(data, None)
                    try:
                        answer = self._exchange(path, request, deadline, budget_ms)
                        break
                    except _NotSent as refused:
                        following = (index + 1) % len(self.base_urls)
                        if following == first:
                            raise ControlApiError(
                                f"Control API {path}: connection failed: {refused.detail}",
                                path=path,
                            ) from None
                        self._count(index, "moved")
                        index = following
        except gevent.Timeout as fired:
            if fired is not timer:
                raise
            self._failed(index, advance=True)
            raise self._timed_out(path, budget_ms) from None
        except ControlApiError as err:
            self._failed(index, advance=_unhealthy(err))
            raise self._redacted(err) from None
        try:
            payload = self._interpret(path, answer.status, answer.reason, answer.body)
        except ControlApiError as err:
            self._failed(index, advance=_unhealthy(err))
            raise
        with self._lock:
            self._current = index  # stay on whichever URL last answered
            self._counts[(self.base_urls[index], "ok")] += 1
        return payload

    def _count(self, index: int, outcome: str) -> None:
        with self._lock:
            self._counts[(self.base_urls[index], outcome)] += 1

    def _failed(self, index: int, *, advance: bool) -> None:
        with self._lock:
            self._counts[(self.base_urls[index], "error")] += 1
            # Only if no other call has moved on already (both loops failing at once).
            if advance and self._current == index:
                self._current = (index + 1) % len(self.base_urls)

    @staticmethod
    def _timed_out(path: str, budget_ms: int) -> ControlApiError:
        return ControlApiError(f"Control API {path}: timed out after {budget_ms} ms", path=path)

    def _exchange(
        self, path: str, request: requests.PreparedRequest, deadline: float, budget_ms: int
    ) -> Answer:
        """Send to one URL and read the whole answer; failures as §4 texts, or `_NotSent`."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out(path, budget_ms)
        try:
            return exchange(
                self._session, request, connect_s=min(self.timeout_ms / 1000, left), read_s=left
            )
        except TransportError as err:
            if err.kind == "timeout":
                raise self._timed_out(path, budget_ms) from None
            if err.kind == "too_large":
                raise ControlApiError(
                    f"Control API {path}: {err.detail}", path=path, status=err.status
                ) from None
            detail = self._server_text(err.detail, _BODY_PREVIEW_CHARS)
            if err.kind == "refused":
                raise _NotSent(detail) from None
            raise ControlApiError(
                f"Control API {path}: connection failed: {detail}", path=path
            ) from None

    def _interpret(self, path: str, status: int, reason: str, raw: bytes) -> Any:
        """§4 rules 1–3."""
        empty = not raw.strip()
        parsed, payload = (False, None) if empty else _json_or_none(raw)
        envelope = parse_envelope(payload) if parsed else None
        if 200 <= status < 300:
            if empty:
                return None
            if not parsed:
                raise ControlApiError(
                    f"Control API returned invalid JSON for {path}.", path=path, status=status
                )
            if envelope is None:
                return payload
            if envelope.ok:
                return envelope.data
            raise self._error(f"Control API {path}: ", path, status, envelope)
        if envelope is not None and not envelope.ok:
            raise self._error(f"Control API {status} {path}: ", path, status, envelope)
        if empty:
            detail = safe_text(reason) or http.client.responses.get(status, "Unknown")
        else:
            text = raw[: 4 * (_BODY_PREVIEW_CHARS + _REDACT_SLACK)].decode("utf-8", "replace")
            detail = self._server_text(text.strip(), _BODY_PREVIEW_CHARS)
        raise self._redacted(
            ControlApiError(f"Control API {status} {path}: {detail}", path=path, status=status)
        )

    def _error(self, prefix: str, path: str, status: int, envelope: Any) -> ControlApiError:
        error = self._server_text(envelope.error, _ENVELOPE_TEXT_CHARS)
        message = self._server_text(envelope.message, _ENVELOPE_TEXT_CHARS)
        return self._redacted(
            ControlApiError(f"{prefix}{error}: {message}", path=path, status=status, code=error)
        )

    def _server_text(self, text: str, limit: int) -> str:
        """A server's text, valid Unicode and redacted, then cut to `limit` characters."""
        return server_text(text, self._secrets, limit)

    def _redacted(self, err: ControlApiError) -> ControlApiError:
        """The last line of defence over the whole message."""
        message = redact(safe_text(err.message), self._secrets)
        if message == err.message:
            return err
        return ControlApiError(message, path=err.path, status=err.status, code=err.code)
