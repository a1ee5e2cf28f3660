"""Control API v1 wire contract (SPEC §4), shared by the client and the reference server.

Request bodies: one marshmallow schema per endpoint. `.dump(dict)` builds the wire body the
client sends (snake_case, unset or None keys omitted, declared key order); `.load(dict)` is the
server's validation and raises `marshmallow.ValidationError` with per-field messages. Types are
strict: an integer must be a JSON integer (not a string, float or boolean), a boolean a JSON
boolean. Unknown keys are ignored so newer clients keep working against older servers.

Responses: the envelopes, and the acquire and release answers. A client accepts snake_case or
camelCase keys (the TypeScript original spoke camelCase), fills the defaults of §4 rule 5, and
turns anything it cannot use into `ControlApiError` with the exact §4 text. One deliberate
tightening beyond the seed: an acquire answer never makes this node leader unless it also
names this node as holder, whatever `is_leader` says, so a confused server cannot cause two
nodes to schedule at once.

Limits: no schema versioning beyond v1; the lease record inside a release answer is dropped
(None) rather than rejected when its identity fields are unusable, since release is best
effort on the way out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_dump, pre_load, validate

MAX_WAIT_MS: Final = 60_000
ACQUIRE_PATH: Final = "/v1/leader/acquire"
RELEASE_PATH: Final = "/v1/leader/release"
HEARTBEAT_PATH: Final = "/v1/controllers/heartbeat"
DEFAULT_LEASE_NAME: Final = "global"

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


# -- results -------------------------------------------------------------------------------


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


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("Must not be blank.")


def _required_text() -> fields.String:
    return fields.String(required=True, validate=_not_blank)


class _WireSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    @post_dump
    def _omit_unset(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if value is not None}


# -- request bodies -----------------------------------------------------------------------------


class HeartbeatRequestSchema(_WireSchema):
    controller_id = _required_text()
    host = _required_text()
    role = fields.String()
    priority = StrictInteger()
    status = fields.String()
    version = fields.String()
    heartbeat_at = StrictInteger()
    started_at = StrictInteger()
    instance_id = fields.String(validate=_not_blank)


class AcquireRequestSchema(_WireSchema):
    controller_id = _required_text()
    host = _required_text()
    ttl_sec = StrictInteger(
        required=True, validate=validate.Range(min=1, error="Must be a positive integer.")
    )
    preferred = StrictBoolean()
    metadata_json = fields.String(allow_none=True)
    now = StrictNumber()
    wait_ms = StrictInteger(validate=validate.Range(min=0, max=MAX_WAIT_MS))
    # The process instance of the controller (SPEC §15); absent from older nodes.
    instance_id = fields.String(validate=_not_blank)


class ReleaseRequestSchema(_WireSchema):
    controller_id = _required_text()
    term = StrictInteger(required=True, validate=validate.Range(min=0))
    instance_id = fields.String(validate=_not_blank)


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


def _accepts(field: fields.Field) -> Callable[[Any], bool] | None:
    """A test that `field` loads a JSON value as that very value, or None if there is none.

    It only says yes where marshmallow would accept the value and return it unchanged, so a
    payload that passes gets exactly the result marshmallow would give.
    """
    check: Callable[[Any], bool]
    if type(field) is fields.Raw and not field.validators:
        return _is_anything
    if isinstance(field, fields.String) and field.validators == [_not_blank]:
        check = _is_filled_text
    elif field.validators:
        return None
    elif isinstance(field, StrictInteger):
        check = _is_int
    elif isinstance(field, StrictNumber):
        check = _is_finite_number
    elif isinstance(field, StrictBoolean):
        check = _is_bool
    elif isinstance(field, fields.String):
        check = _is_text
    else:
        return None
    if field.allow_none:
        return lambda value: value is None or check(value)
    return check


def _is_anything(value: Any) -> bool:
    return True


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_finite_number(value: Any) -> bool:
    return type(value) is int or (type(value) is float and math.isfinite(value))


def _is_bool(value: Any) -> bool:
    return value is True or value is False


def _is_text(value: Any) -> bool:
    return type(value) is str


def _is_filled_text(value: Any) -> bool:
    return type(value) is str and bool(value.strip())


class _CamelTolerantSchema(_WireSchema):
    """Loads snake_case or camelCase keys; snake_case wins when a payload has both.

    `load_valid` first tries a fast path for the usual answer (snake_case keys, every value
    of its declared type); anything else goes through marshmallow, which stays the
    authority. The fast path was worth it: marshmallow took a tenth of the client's CPU per
    call, on the daemon's idle hot path.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Worked out once rather than for every field of every answer.
        self._camel_names = tuple((name, _camel(name)) for name in self.fields)
        self._plan = tuple(
            (name, camel, _accepts(self.fields[name])) for name, camel in self._camel_names
        )

    def load_valid(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The fields that load cleanly; a wrongly typed optional field counts as absent."""
        loaded: dict[str, Any] = {}
        for name, camel, accepts in self._plan:
            if name in payload:
                value = payload[name]
                if accepts is None or not accepts(value):
                    return _load_valid(self, payload)
                loaded[name] = value
            elif camel in payload:
                return _load_valid(self, payload)
        return loaded

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
    lease_name = fields.String(validate=_not_blank)
    holder_id = fields.String(validate=_not_blank)
    holder_host = fields.String(validate=_not_blank)
    term = StrictInteger()
    lease_expires_at = StrictNumber()
    renewed_at = StrictNumber()
    preferred_holder_id = fields.String(allow_none=True)
    metadata_json = fields.String(allow_none=True)
    holder_instance_id = fields.String(allow_none=True)


class _AcquireResponseSchema(_CamelTolerantSchema):
    holder_id = fields.String(validate=_not_blank)
    holder_host = fields.String(validate=_not_blank)
    term = StrictInteger()
    lease_expires_at = StrictNumber()
    renewed_at = StrictNumber()
    is_leader = StrictBoolean()
    operation = fields.String()
    lease = fields.Raw(allow_none=True)
    holder_instance_id = fields.String(allow_none=True)


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
        return dict(err.valid_data or {})


def _lease_record(raw: Any, fallback: dict[str, Any]) -> LeaseRecord:
    loaded = _LEASE_RECORD.load_valid(raw) if isinstance(raw, dict) else {}
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
    loaded = _ACQUIRE_RESPONSE.load_valid(payload)
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
        operation="renew" if loaded.get("operation") == "renew" else "acquire",
        lease=_lease_record(loaded.get("lease"), {**top, "holder_instance_id": holder_instance}),
        holder_instance_id=holder_instance,
        instance_conflict=conflict,
    )


def acquire_result_to_wire(result: AcquireResult) -> dict[str, Any]:
    """The acquire answer's `data`, snake_case with the nested lease record.

    `instance_conflict` is the client's reading of an answer, not a wire field.
    """
    data = dataclasses.asdict(result)
    del data["instance_conflict"]
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
