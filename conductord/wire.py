"""Control API v1 wire contract (SPEC §4), shared by the client and the reference server.

Every body goes through its marshmallow schema, both ways; there is no hand-written shortcut
around one (SPEC §18).

Request bodies: one schema per endpoint. `dump_request(schema, value)` builds the wire body the
client sends (snake_case, unset or None keys omitted, declared key order) and checks it with the
very rules the server loads it with, so a node never sends what a server must refuse; `.load()`
is the server's validation and raises `marshmallow.ValidationError` with per-field messages. The
heartbeat is one value end to end: `Heartbeat`, which `HeartbeatRequestSchema` dumps from and
loads into. Types are strict: an integer must be a JSON integer (not a string, float or
boolean), a boolean a JSON boolean. Unknown keys are ignored so newer clients keep working
against older servers.

Bounds on what a client sends (SPEC §9; the server answers 400 beyond them):
  ttl_sec 1..86400            wait_ms 0..60000           priority 0..2^31-1
  heartbeat_at, started_at, now 0..2^33 (unix seconds)   term 0..2^63-1
  controller_id, host <= 255 characters                  role, status <= 32
  version <= 128              instance_id <= 128         metadata_json <= 16 KiB of UTF-8
  and in every string: no lone surrogate (not valid Unicode, SPEC §9) and no NUL.

Responses: the envelopes, and the acquire and release answers. A client accepts snake_case or
camelCase keys (the TypeScript original spoke camelCase), fills the defaults of §4 rule 5, and
turns anything it cannot use into `ControlApiError` with the exact §4 text. A server's string
field is held to the bounds of the request field it mirrors (holder ids as controller ids, and
so on) and must be valid Unicode without NUL: a wrong one counts as absent, so an identity field
with a lone surrogate is the §4 missing-identity error and no such string reaches a log line or
the snapshot. One deliberate tightening beyond the seed: an acquire answer never makes this node
leader unless it also names this node as holder, whatever `is_leader` says, so a confused
server cannot cause two nodes to schedule at once.

Limits: no schema versioning beyond v1; the lease record inside a release answer is dropped
(None) rather than rejected when its identity fields are unusable, since release is best
effort on the way out.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Final

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    pre_load,
    validate,
)

ACQUIRE_PATH: Final = "/v1/leader/acquire"
RELEASE_PATH: Final = "/v1/leader/release"
HEARTBEAT_PATH: Final = "/v1/controllers/heartbeat"
LEADER_PATH: Final = "/v1/leader"
CONTROLLERS_PATH: Final = "/v1/controllers"
HISTORY_PATH: Final = "/v1/leader/history"
HEALTHZ_PATH: Final = "/healthz"
DEFAULT_LEASE_NAME: Final = "global"

# Bounds (module docstring).
MAX_TTL_SEC: Final = 86_400
MAX_WAIT_MS: Final = 60_000
MAX_PRIORITY: Final = 2**31 - 1
MAX_UNIX_TIME: Final = 2**33
MAX_TERM: Final = 2**63 - 1
MAX_ID_CHARS: Final = 255  # controller_id, host
MAX_LABEL_CHARS: Final = 32  # role, status, operation
MAX_VERSION_CHARS: Final = 128
MAX_INSTANCE_CHARS: Final = 128
MAX_METADATA_BYTES: Final = 16 * 1024

NON_OBJECT_MESSAGE: Final = f"Control API {ACQUIRE_PATH} returned a non-object payload."
MISSING_IDENTITY_MESSAGE: Final = (
    f"Control API {ACQUIRE_PATH} response is missing lease identity fields."
)


class ControlApiError(Exception):
    """Every Control API failure. `str(err)` is the exact SPEC §4 text, never the token."""

    def __init__(
        self, message: str, *, path: str, status: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.status = status
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments would otherwise be lost when the error is pickled.
        return (_rebuild_error, (self.message, self.path, self.status, self.code))


def _rebuild_error(message: str, path: str, status: int | None, code: str | None):
    return ControlApiError(message, path=path, status=status, code=code)


# -- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat (SPEC §4), as the node sends it and the server loads it."""

    controller_id: str
    host: str
    role: str | None = None
    priority: int | None = None
    status: str | None = None  # the node's lease state
    version: str | None = None
    heartbeat_at: int | None = None
    started_at: int | None = None
    instance_id: str | None = None  # the process instance (SPEC §15); absent from older nodes
    # A one-shot run (diagnose, --run-once): the server answers without recording it.
    one_shot: bool | None = None


@dataclass(frozen=True)
class LeaseRecord:
    lease_name: str
    holder_id: str
    holder_host: str
    term: int
    lease_expires_at: float
    renewed_at: float
    preferred_holder_id: str | None
    metadata_json: str | None
    holder_instance_id: str | None = None


@dataclass(frozen=True)
class AcquireResult:
    holder_id: str
    holder_host: str
    term: int
    lease_expires_at: float
    renewed_at: float
    is_leader: bool
    operation: str  # "acquire" | "renew"
    lease: LeaseRecord
    # The holder's process instance when the server tracks instances (SPEC §15), else None.
    holder_instance_id: str | None = None
    # The holder is this controller id but another instance of it: a copied config or a
    # second process. Never leader then, whatever `is_leader` said.
    instance_conflict: bool = False
    # The server said `"operation": "acquire"` itself. `operation` is "acquire" by §4 rule 5's
    # default when the server says nothing, which proves no grant: a server that ignores
    # instances and omits `operation` answers a one-shot run beside the leader with the
    # leader's own lease. Only an explicit grant lets a one-shot run release (SPEC §15).
    granted: bool = False
    # The server recorded the heartbeat that rode along on this call (see
    # `AcquireRequestSchema.heartbeat`); a server that ignores the field never says so.
    heartbeat_recorded: bool = False


@dataclass(frozen=True)
class ReleaseResult:
    released: bool
    supported: bool  # False when the server has no release endpoint (404)
    lease: LeaseRecord | None


@dataclass(frozen=True)
class Envelope:
    """A recognised envelope: success (`ok` true, `data`) or error (`error`, `message`)."""

    ok: bool
    request_id: str | None
    data: Any = None
    error: str | None = None
    message: str | None = None
    details: Any = None


def wire_operation(operation: object) -> str:
    """The wire's `operation`: "renew" only for a renewal; a grant or a denial is "acquire".

    The one place this is decided, for the client reading an answer and a server writing one.
    """
    return "renew" if operation == "renew" else "acquire"


# -- strict fields ---------------------------------------------------------------------------


class StrictInteger(fields.Integer):
    """A JSON integer: no strings, floats or booleans (marshmallow 4 already refuses bools)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)


class StrictNumber(fields.Field):
    """A finite JSON number, kept as given (int stays int); no strings or booleans."""

    default_error_messages = {"invalid": "Not a valid number."}  # noqa: RUF012

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.make_error("invalid")
        return value


class StrictBoolean(fields.Field):
    """A JSON boolean only: marshmallow's Boolean would take "yes" or 1."""

    default_error_messages = {"invalid": "Not a valid boolean."}  # noqa: RUF012

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if value is True or value is False:
            return value
        raise self.make_error("invalid")


def _valid_unicode(value: str) -> None:
    if "\0" in value:
        raise ValidationError("Must not contain NUL.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("Not valid Unicode.") from None


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("Must not be blank.")


def _utf8_at_most(limit: int):
    def check(value: str) -> None:
        if len(value.encode("utf-8", "surrogatepass")) > limit:
            raise ValidationError(f"Longer than {limit} bytes of UTF-8.")

    return check


def _text(max_chars: int | None = None, *, blank: bool = True, **kwargs: Any) -> fields.String:
    """A string field: valid Unicode, no NUL, at most `max_chars`, not blank unless `blank`."""
    checks: list[Any] = [_valid_unicode]
    if max_chars is not None:
        checks.append(validate.Length(max=max_chars))
    if not blank:
        checks.append(_not_blank)
    return fields.String(validate=checks, **kwargs)


def _time(**kwargs: Any) -> StrictInteger:
    return StrictInteger(validate=validate.Range(min=0, max=MAX_UNIX_TIME), **kwargs)


class _WireSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    @post_dump
    def _omit_unset(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if value is not None}


# -- request bodies -----------------------------------------------------------------------------


class HeartbeatRequestSchema(_WireSchema):
    controller_id = _text(MAX_ID_CHARS, blank=False, required=True)
    host = _text(MAX_ID_CHARS, blank=False, required=True)
    role = _text(MAX_LABEL_CHARS)
    priority = StrictInteger(validate=validate.Range(min=0, max=MAX_PRIORITY))
    status = _text(MAX_LABEL_CHARS)
    version = _text(MAX_VERSION_CHARS)
    heartbeat_at = _time()
    started_at = _time()
    instance_id = _text(MAX_INSTANCE_CHARS, blank=False)
    one_shot = StrictBoolean()

    @post_load
    def _heartbeat(self, data: dict[str, Any], **kwargs: Any) -> Heartbeat:
        return Heartbeat(**data)


class AcquireRequestSchema(_WireSchema):
    controller_id = _text(MAX_ID_CHARS, blank=False, required=True)
    host = _text(MAX_ID_CHARS, blank=False, required=True)
    ttl_sec = StrictInteger(
        required=True,
        validate=validate.Range(
            min=1, max=MAX_TTL_SEC, error=f"Must be an integer from 1 to {MAX_TTL_SEC}."
        ),
    )
    preferred = StrictBoolean()
    metadata_json = fields.String(
        allow_none=True, validate=[_valid_unicode, _utf8_at_most(MAX_METADATA_BYTES)]
    )
    now = StrictNumber(validate=validate.Range(min=0, max=MAX_UNIX_TIME))
    wait_ms = StrictInteger(validate=validate.Range(min=0, max=MAX_WAIT_MS))
    # The process instance of the controller (SPEC §15); absent from older nodes.
    instance_id = _text(MAX_INSTANCE_CHARS, blank=False)
    # A one-shot run (diagnose, --run-once): decided as any request, never counted as a
    # second process of its node id.
    one_shot = StrictBoolean()
    # A heartbeat riding along (its controller, host and instance are the acquire's): a
    # server that records it answers `heartbeat_recorded: true`, and the node then skips its
    # separate heartbeat for that interval, halving an idle node's calls. A server that
    # ignores the field never says so, and the node keeps sending heartbeats on their own.
    heartbeat = fields.Nested(lambda: HeartbeatFieldsSchema())


class HeartbeatFieldsSchema(_WireSchema):
    """What a heartbeat reports beyond the sender's identity (the acquire names that)."""

    role = _text(MAX_LABEL_CHARS)
    priority = StrictInteger(validate=validate.Range(min=0, max=MAX_PRIORITY))
    status = _text(MAX_LABEL_CHARS)
    version = _text(MAX_VERSION_CHARS)
    heartbeat_at = _time()
    started_at = _time()


class ReleaseRequestSchema(_WireSchema):
    controller_id = _text(MAX_ID_CHARS, blank=False, required=True)
    term = StrictInteger(required=True, validate=validate.Range(min=0, max=MAX_TERM))
    instance_id = _text(MAX_INSTANCE_CHARS, blank=False)
    one_shot = StrictBoolean()


def dump_request(schema: Schema, value: Any) -> dict[str, Any]:
    """The wire body of `value` (a dict, or a `Heartbeat`), held to the server's own rules.

    Raises `ValidationError` with per-field messages (never the values) for a body a server
    would refuse.
    """
    body = schema.dump(value)
    errors = schema.validate(body)
    if errors:
        raise ValidationError(errors)
    return body


# -- envelopes ---------------------------------------------------------------------------------


def success_envelope(data: Any, request_id: str) -> dict[str, Any]:
    return {"ok": True, "request_id": request_id, "data": data}


def error_envelope(code: str, message: str, request_id: str, details: Any = None) -> dict[str, Any]:
    envelope = {"ok": False, "request_id": request_id, "error": code, "message": message}
    if details is not None:
        envelope["details"] = details
    return envelope


class _SuccessEnvelopeSchema(_WireSchema):
    ok = StrictBoolean(required=True, validate=validate.Equal(True))
    request_id = fields.String(allow_none=True, load_default=None)
    data = fields.Raw(required=True, allow_none=True)


class _ErrorEnvelopeSchema(_WireSchema):
    ok = StrictBoolean(required=True, validate=validate.Equal(False))
    request_id = fields.String(allow_none=True, load_default=None)
    # Kept even when not valid Unicode: the client makes an error's text safe itself.
    error = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Raw(allow_none=True, load_default=None)


_SUCCESS_ENVELOPE = _SuccessEnvelopeSchema()
_ERROR_ENVELOPE = _ErrorEnvelopeSchema()


def parse_envelope(payload: Any) -> Envelope | None:
    """The envelope `payload` is, or None when it is some other JSON value (§4 rule 1)."""
    if not isinstance(payload, dict):
        return None
    schema = _SUCCESS_ENVELOPE if payload.get("ok") is True else _ERROR_ENVELOPE
    try:
        loaded = schema.load(payload)
    except ValidationError:
        return None
    return Envelope(**loaded)


# -- responses ---------------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class _CamelTolerantSchema(_WireSchema):
    """Loads snake_case or camelCase keys; snake_case wins when a payload has both."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._camel_names = tuple((name, _camel(name)) for name in self.fields)

    @pre_load
    def _snake_keys(self, data: Any, **kwargs: Any) -> Any:
        if not isinstance(data, dict):
            return data
        snake = dict(data)
        for name, camel in self._camel_names:
            if name not in snake and camel in snake:
                snake[name] = snake[camel]
        return snake


class _LeaseRecordSchema(_CamelTolerantSchema):
    lease_name = _text(MAX_ID_CHARS, blank=False)
    holder_id = _text(MAX_ID_CHARS, blank=False)
    holder_host = _text(MAX_ID_CHARS, blank=False)
    term = StrictInteger()
    lease_expires_at = StrictNumber()
    renewed_at = StrictNumber()
    preferred_holder_id = _text(MAX_ID_CHARS, allow_none=True)
    metadata_json = fields.String(
        allow_none=True, validate=[_valid_unicode, _utf8_at_most(MAX_METADATA_BYTES)]
    )
    holder_instance_id = _text(MAX_INSTANCE_CHARS, allow_none=True)


class _AcquireResponseSchema(_CamelTolerantSchema):
    holder_id = _text(MAX_ID_CHARS, blank=False)
    holder_host = _text(MAX_ID_CHARS, blank=False)
    term = StrictInteger()
    lease_expires_at = StrictNumber()
    renewed_at = StrictNumber()
    is_leader = StrictBoolean()
    operation = _text(MAX_LABEL_CHARS)
    lease = fields.Raw(allow_none=True)
    holder_instance_id = _text(MAX_INSTANCE_CHARS, allow_none=True)
    heartbeat_recorded = StrictBoolean()


class _ReleaseResponseSchema(_CamelTolerantSchema):
    released = StrictBoolean()
    lease = fields.Raw(allow_none=True)


_LEASE_RECORD = _LeaseRecordSchema()
_ACQUIRE_RESPONSE = _AcquireResponseSchema()
_RELEASE_RESPONSE = _ReleaseResponseSchema()

_IDENTITY = ("holder_id", "term", "lease_expires_at")


def _load_valid(schema: Schema, payload: Any) -> dict[str, Any]:
    """The fields that loaded cleanly; a wrongly typed optional field counts as absent."""
    try:
        return schema.load(payload)
    except ValidationError as err:
        valid = err.valid_data
        return dict(valid) if isinstance(valid, dict) else {}


def _lease_record(raw: Any, fallback: dict[str, Any]) -> LeaseRecord:
    loaded = _load_valid(_LEASE_RECORD, raw) if isinstance(raw, dict) else {}
    return LeaseRecord(
        lease_name=loaded.get("lease_name", DEFAULT_LEASE_NAME),
        holder_id=loaded.get("holder_id", fallback["holder_id"]),
        holder_host=loaded.get("holder_host", fallback["holder_host"]),
        term=loaded.get("term", fallback["term"]),
        lease_expires_at=loaded.get("lease_expires_at", fallback["lease_expires_at"]),
        renewed_at=loaded.get("renewed_at", fallback["renewed_at"]),
        preferred_holder_id=loaded.get("preferred_holder_id"),
        metadata_json=loaded.get("metadata_json"),
        holder_instance_id=loaded.get("holder_instance_id", fallback.get("holder_instance_id")),
    )


def parse_acquire_result(
    payload: Any, *, controller_id: str, host: str, now: int, instance_id: str | None = None
) -> AcquireResult:
    """Normalise an acquire answer (§4 rule 5); `now` is the request's own `now`.

    `instance_id` is this process's instance (SPEC §15): an answer naming our controller id
    with another instance is an identity conflict and never makes us leader.
    """
    if not isinstance(payload, dict):
        raise ControlApiError(NON_OBJECT_MESSAGE, path=ACQUIRE_PATH)
    loaded = _load_valid(_ACQUIRE_RESPONSE, payload)
    if any(key not in loaded for key in _IDENTITY):
        raise ControlApiError(MISSING_IDENTITY_MESSAGE, path=ACQUIRE_PATH)
    holder_id = loaded["holder_id"]
    is_self = holder_id == controller_id
    top = {
        "holder_id": holder_id,
        "holder_host": loaded.get("holder_host", host if is_self else "unknown"),
        "term": loaded["term"],
        "lease_expires_at": loaded["lease_expires_at"],
        "renewed_at": loaded.get("renewed_at", now),
    }
    holder_instance = loaded.get("holder_instance_id")
    conflict = (
        is_self
        and instance_id is not None
        and holder_instance is not None
        and holder_instance != instance_id
    )
    return AcquireResult(
        **top,
        # Leadership needs the server's word AND this node (this very instance, when both
        # sides know instances) named as holder (module docstring).
        is_leader=loaded.get("is_leader", True) and is_self and not conflict,
        operation=wire_operation(loaded.get("operation")),
        lease=_lease_record(loaded.get("lease"), {**top, "holder_instance_id": holder_instance}),
        holder_instance_id=holder_instance,
        instance_conflict=conflict,
        granted=loaded.get("operation") == "acquire",
        heartbeat_recorded=loaded.get("heartbeat_recorded", False),
    )


def acquire_result_to_wire(result: AcquireResult) -> dict[str, Any]:
    """The acquire answer's `data`, snake_case with the nested lease record.

    `instance_conflict` and `granted` are the client's reading of an answer, not wire fields;
    `heartbeat_recorded` is sent only when true (older clients never see it).
    """
    data = dataclasses.asdict(result)
    del data["instance_conflict"], data["granted"]
    if not data["heartbeat_recorded"]:
        del data["heartbeat_recorded"]
    return data


def parse_release_result(payload: Any) -> ReleaseResult:
    """Normalise a release answer; no body means the server did not say it released."""
    if payload is None:
        return ReleaseResult(released=False, supported=True, lease=None)
    if not isinstance(payload, dict):
        raise ControlApiError(
            f"Control API {RELEASE_PATH} returned a non-object payload.", path=RELEASE_PATH
        )
    loaded = _load_valid(_RELEASE_RESPONSE, payload)
    lease = None
    raw_lease = loaded.get("lease")
    if isinstance(raw_lease, dict):
        record = _load_valid(_LEASE_RECORD, raw_lease)
        # No top-level fields to fall back on here: a record without its identity is dropped.
        if all(key in record for key in (*_IDENTITY, "renewed_at")):
            lease = _lease_record(record, {"holder_host": "unknown", **record})
    return ReleaseResult(released=loaded.get("released", False), supported=True, lease=lease)


def release_result_to_wire(result: ReleaseResult) -> dict[str, Any]:
    """The release answer's `data`; `supported` is the client's own knowledge, not wire."""
    lease = dataclasses.asdict(result.lease) if result.lease is not None else None
    return {"released": result.released, "lease": lease}
