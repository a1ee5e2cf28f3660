"""HTTP client of the Control API v1 (SPEC §4): transport policy in one place.

One `requests.Session` per client, kept alive between calls (the idle CPU budget of §11 rests
on reusing the connection), with the four §4 headers. Every call is a POST bounded by the
call's budget, `timeout_ms` (plus `wait_ms` for a long-poll, §12): the connect and every read
have that timeout, and an overall deadline from the start of the call caps the whole exchange,
so a server that trickles bytes cannot stretch a call past its budget. The deadline is
enforced inside the socket reads (each read's timeout is cut to the time left), not by a
watchdog thread or greenlet, so the same code runs in plain threads and under gevent.
Bodies above `MAX_BODY_BYTES` are refused. There are no hidden retries (`max_retries=0`,
redirects not followed): the lease loop owns retrying, and a retry here would stretch a
renewal past what the lease state machine assumes. Every failure is a `ControlApiError` whose
text is exactly SPEC §4's.

`trust_env` is off: environment proxies and `~/.netrc` are neither consulted (a netrc entry
would otherwise replace the authorization header) nor paid for on every call.

CPU per call (the idle daemon's whole footprint, §11): the request of each path is prepared
once, and each call hands a copy carrying its body straight to the session's adapter, so
nothing is merged, parsed or cookie-checked per call (`Session.send` would add only cookie,
hook and redirect work, all unused here). The adapter reuses its pool without re-parsing the
URL; a pooled connection is checked with one non-blocking peek instead of a poll (costly
under gevent); head and body go out in one write; the everyday success envelope and acquire
answer skip marshmallow (`wire` falls back to it for anything unusual).

Limits: name resolution is not bounded by the deadline (the resolver gives no timeout); use
an IP address or a local resolver if that matters. The token is redacted from every message
even if a server echoes it back.
"""

from __future__ import annotations

import contextvars
import http.client
import io
import json
import socket
import time
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ReadTimeoutError

from conductord import __version__
from conductord.wire import (
    ACQUIRE_PATH,
    HEARTBEAT_PATH,
    RELEASE_PATH,
    AcquireRequestSchema,
    AcquireResult,
    ControlApiError,
    HeartbeatRequestSchema,
    ReleaseRequestSchema,
    ReleaseResult,
    parse_acquire_result,
    parse_envelope,
    parse_release_result,
)

__all__ = ["MAX_BODY_BYTES", "ControlApiClient", "ControlApiError", "describe_transport_error"]

MAX_BODY_BYTES: Final = 1024 * 1024
_BODY_PREVIEW_CHARS: Final = 200  # §4 rule 2
_ENVELOPE_TEXT_CHARS: Final = 1000  # keeps a runaway server message out of every log line
_READ_CHUNK: Final = 64 * 1024
# Two loops (heartbeat, lease) and a release may overlap; more would only idle.
_POOL_SIZE: Final = 4
_NO_PROXIES: Final[dict[str, str]] = {}  # trust_env is off and the session sets none

_HEARTBEAT_SCHEMA = HeartbeatRequestSchema()
_ACQUIRE_SCHEMA = AcquireRequestSchema()
_RELEASE_SCHEMA = ReleaseRequestSchema()

# The monotonic deadline of the call running in this thread or greenlet (each has its own
# context), read by the sockets below.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "conductord_client_deadline", default=None
)


class _DeadlineReader(io.RawIOBase):
    """Socket reads whose timeout never reaches past the current call's deadline."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._raw = raw
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        per_read = self._sock.gettimeout()
        if per_read is not None and per_read <= remaining:
            return self._raw.readinto(buffer)
        self._sock.settimeout(remaining)
        try:
            return self._raw.readinto(buffer)
        finally:
            self._sock.settimeout(per_read)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


class _DeadlineHTTPResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        deadline = _deadline.get()
        if deadline is not None:
            self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


class _OneSendMixin:
    """Sends the request head and a bytes body in one write instead of two.

    urllib3 writes the head, then the body: two syscalls and, on loopback, two wake-ups of
    the server per call. Here the body rides along with the head's write.
    """

    _body_tail: bytes | None = None

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any):
        framed = headers is not None and "Content-Length" in headers
        if not (isinstance(body, bytes) and body and framed and not kwargs.get("chunked")):
            return super().request(method, url, body, headers, **kwargs)  # type: ignore[misc]
        self._body_tail = body
        try:
            # No body here: the framing header is already set, so urllib3 adds none.
            return super().request(method, url, None, headers, **kwargs)  # type: ignore[misc]
        finally:
            self._body_tail = None

    def send(self, data: Any) -> None:
        tail, self._body_tail = self._body_tail, None
        super().send(data + tail if tail is not None else data)  # type: ignore[misc]


class _HTTPConnection(_OneSendMixin, HTTPConnection):
    response_class = _DeadlineHTTPResponse

    @property
    def is_connected(self) -> bool:
        # urllib3 asks this before reusing a pooled connection, via a zero-timeout poll();
        # under gevent that poll builds and tears down watchers on every call. One
        # non-blocking peek gives the same answer: nothing to read means the server has
        # neither closed the connection nor sent anything unasked.
        sock = self.sock
        if sock is None:
            return False
        per_read = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            sock.settimeout(per_read)
        return False  # end of stream, or bytes nobody asked for


class _HTTPSConnection(_OneSendMixin, HTTPSConnection):
    response_class = _DeadlineHTTPResponse


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with the pool classes above, trimmed of per-call work this client
    does not need: with no proxy, the pool for a URL is looked up once (not parsed out of
    the URL and searched for on every call), and the request line is the path alone.
    Responses carry no cookie jar contents and no charset guess: nothing here reads them.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._pools: dict[tuple[Any, ...], HTTPConnectionPool] = {}

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: Any,
        proxies: Any = None,
        cert: Any = None,
    ) -> HTTPConnectionPool:
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        key = (request.url, verify, cert)
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:  # a closed pool (close(), eviction) is replaced
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self._pools[key] = pool
        return pool

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        return super().request_url(request, proxies) if proxies else request.path_url

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        self._pools.clear()
        super().close()


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


def _is_plain_success(payload: Any) -> bool:
    """True for the everyday success envelope, which `parse_envelope` would take as such.

    Checked by hand because marshmallow was a tenth of the client's CPU per call; any other
    shape (an error envelope, a mistyped `request_id`, no `data`) goes to `parse_envelope`.
    """
    return (
        type(payload) is dict
        and payload.get("ok") is True
        and "data" in payload
        and (payload.get("request_id") is None or type(payload["request_id"]) is str)
    )


def describe_transport_error(exc: BaseException) -> str:
    """The most telling cause in requests' and urllib3's layers of wrapping.

    "Connection refused" rather than the urllib3 pool repr around it; `conductord status`
    uses it too.
    """
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    fallback: BaseException | None = None
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
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
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__]
        nested.extend(current.args)
        queue.extend(item for item in nested if isinstance(item, BaseException))
    chosen = fallback or exc
    return str(chosen) or type(chosen).__name__


class ControlApiClient:
    """Control API v1 over one keep-alive session; see the module docstring for the policy."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_ms: int = 5000,
        user_agent: str | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("Control API base URL must be an http:// or https:// URL")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 1:
            raise ValueError("timeout_ms must be an integer >= 1")
        if token is not None and (
            not token or any(ch in token for ch in "\r\n\0") or not token.isprintable()
        ):
            # Checked here because requests would echo the header value in its own error.
            raise ValueError("shared token is empty or holds characters not allowed in a header")
        self.base_url = base_url.rstrip("/")
        self.timeout_ms = timeout_ms
        self._token = token or None
        session = requests.Session()
        session.trust_env = False
        adapter = _DeadlineAdapter(
            max_retries=0, pool_connections=1, pool_maxsize=_POOL_SIZE, pool_block=False
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.clear()
        session.headers.update(
            {
                "accept": "application/json",
                "content-type": "application/json",
                "user-agent": user_agent or f"conductord/{__version__}",
            }
        )
        if self._token is not None:
            session.headers["authorization"] = f"Bearer {self._token}"
        self._session = session
        self._adapter = adapter
        # Each call copies its path's request, prepared here once: preparing it per call
        # (URL parsing, merging session settings, requests' Protocol isinstance checks) was
        # a third of the CPU a call costs.
        self._templates = {
            path: session.prepare_request(requests.Request("POST", self.base_url + path))
            for path in (HEARTBEAT_PATH, ACQUIRE_PATH, RELEASE_PATH)
        }

    def __repr__(self) -> str:
        return (
            f"ControlApiClient(base_url={self.base_url!r}, timeout_ms={self.timeout_ms}, "
            f"has_token={self._token is not None})"
        )

    def __enter__(self) -> ControlApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    # -- endpoints ---------------------------------------------------------------------------

    def heartbeat(
        self,
        *,
        controller_id: str,
        host: str,
        role: str | None,
        priority: int | None,
        status: str | None,
        version: str | None,
        heartbeat_at: int | None,
        started_at: int | None,
        instance_id: str | None = None,
    ) -> object:
        """Register or refresh this node; returns the response data (None for no body)."""
        body = _HEARTBEAT_SCHEMA.dump(
            {
                "controller_id": controller_id,
                "host": host,
                "role": role,
                "priority": priority,
                "status": status,
                "version": version,
                "heartbeat_at": heartbeat_at,
                "started_at": started_at,
                "instance_id": instance_id,
            }
        )
        return self._post(HEARTBEAT_PATH, body)

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
    ) -> AcquireResult:
        """Acquire or renew the lease; `wait_ms` > 0 long-polls (§12) and extends the budget."""
        if now is None:
            now = int(time.time())
        wait = wait_ms if wait_ms is not None and wait_ms > 0 else 0
        body = _ACQUIRE_SCHEMA.dump(
            {
                "controller_id": controller_id,
                "host": host,
                "ttl_sec": ttl_sec,
                "preferred": preferred,
                "metadata_json": metadata_json,
                "now": now,
                "wait_ms": wait or None,
                "instance_id": instance_id,
            }
        )
        data = self._post(ACQUIRE_PATH, body, extra_ms=wait)
        return parse_acquire_result(
            data, controller_id=controller_id, host=host, now=now, instance_id=instance_id
        )

    def release_leader_lease(
        self, *, controller_id: str, term: int, instance_id: str | None = None
    ) -> ReleaseResult:
        """Give the lease up; a server without this endpoint (404) yields supported=False."""
        body = _RELEASE_SCHEMA.dump(
            {"controller_id": controller_id, "term": term, "instance_id": instance_id}
        )
        try:
            data = self._post(RELEASE_PATH, body)
        except ControlApiError as err:
            if err.status == 404:
                return ReleaseResult(released=False, supported=False, lease=None)
            raise
        return parse_release_result(data)

    # -- transport ---------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any], *, extra_ms: int = 0) -> Any:
        budget_ms = self.timeout_ms + extra_ms
        try:
            status, reason, raw = self._exchange(path, body, budget_ms)
        except ControlApiError as err:
            raise self._redacted(err) from None
        return self._interpret(path, status, reason, raw)

    def _exchange(self, path: str, body: dict[str, Any], budget_ms: int) -> tuple[int, str, bytes]:
        """Send and read the whole answer within the budget: (status, reason, body bytes)."""
        data = json.dumps(body, separators=(",", ":")).encode("ascii")
        token = _deadline.set(time.monotonic() + budget_ms / 1000)
        try:
            response = self._adapter.send(
                self._prepared(path, data),
                timeout=(self.timeout_ms / 1000, budget_ms / 1000),
                stream=True,
                # What Session.request would merge in; passing it skips the merging.
                verify=self._session.verify,
                cert=self._session.cert,
                proxies=_NO_PROXIES,
            )
            try:
                raw = self._read_body(path, response)
            except BaseException:
                response.close()  # a half-read connection must not go back to the pool
                raise
            return response.status_code, response.reason or "", raw
        except ControlApiError:
            raise
        except (requests.Timeout, ReadTimeoutError, TimeoutError):
            raise ControlApiError(
                f"Control API {path}: timed out after {budget_ms} ms", path=path
            ) from None
        except Exception as exc:  # requests, urllib3, http.client, ssl, socket: all transport
            detail = _cut(" ".join(describe_transport_error(exc).split()), _BODY_PREVIEW_CHARS)
            raise ControlApiError(
                f"Control API {path}: connection failed: {detail}", path=path
            ) from None
        finally:
            _deadline.reset(token)

    def _prepared(self, path: str, data: bytes) -> requests.PreparedRequest:
        """A fresh copy of `path`'s prepared request carrying `data`."""
        template = self._templates[path]
        request = requests.PreparedRequest()
        request.method = template.method
        request.url = template.url
        request.headers = template.headers.copy()
        request.headers["Content-Length"] = str(len(data))
        request.body = data
        request.hooks = template.hooks
        return request

    @staticmethod
    def _read_body(path: str, response: requests.Response) -> bytes:
        ok = 200 <= response.status_code < 300
        declared = response.headers.get("content-length", "")
        if ok and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ControlApiError(
                f"Control API {path}: response body larger than {MAX_BODY_BYTES} bytes",
                path=path,
                status=response.status_code,
            )
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
                # All the declared bytes are in (urllib3 has already put the connection
                # back): asking for the end of the body again would be one more read.
                response.raw.release_conn()
                return b"".join(chunks)
        response.close()
        if not ok:
            return b"".join(chunks)  # an error page only needs its first characters
        raise ControlApiError(
            f"Control API {path}: response body larger than {MAX_BODY_BYTES} bytes",
            path=path,
            status=response.status_code,
        )

    def _interpret(self, path: str, status: int, reason: str, raw: bytes) -> Any:
        """§4 rules 1–3."""
        empty = not raw.strip()
        parsed, payload = (False, None) if empty else _json_or_none(raw)
        if parsed and 200 <= status < 300 and _is_plain_success(payload):
            return payload["data"]
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
            detail = reason or http.client.responses.get(status, "Unknown")
        else:
            detail = _cut(raw.decode("utf-8", errors="replace").strip(), _BODY_PREVIEW_CHARS)
        raise self._redacted(
            ControlApiError(f"Control API {status} {path}: {detail}", path=path, status=status)
        )

    def _error(self, prefix: str, path: str, status: int, envelope: Any) -> ControlApiError:
        error = _cut(envelope.error, _ENVELOPE_TEXT_CHARS)
        message = _cut(envelope.message, _ENVELOPE_TEXT_CHARS)
        return self._redacted(
            ControlApiError(
                f"{prefix}{error}: {message}", path=path, status=status, code=envelope.error
            )
        )

    def _redacted(self, err: ControlApiError) -> ControlApiError:
        if self._token is None or self._token not in err.message:
            return err
        return ControlApiError(
            err.message.replace(self._token, "***"),
            path=err.path,
            status=err.status,
            code=err.code,
        )
