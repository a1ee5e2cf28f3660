"""Wire schemas (SPEC §4): request bodies both ways, envelopes, and the response normalisers."""

from __future__ import annotations

import pickle

import pytest
from marshmallow import ValidationError

from conductord.wire import (
    MAX_WAIT_MS,
    AcquireRequestSchema,
    AcquireResult,
    ControlApiError,
    Heartbeat,
    HeartbeatRequestSchema,
    LeaseRecord,
    ReleaseRequestSchema,
    ReleaseResult,
    acquire_result_to_wire,
    dump_request,
    error_envelope,
    parse_acquire_result,
    parse_envelope,
    parse_release_result,
    release_result_to_wire,
    success_envelope,
    wire_operation,
)

NON_OBJECT = "Control API /v1/leader/acquire returned a non-object payload."
MISSING = "Control API /v1/leader/acquire response is missing lease identity fields."


def load_errors(schema, data) -> dict:
    with pytest.raises(ValidationError) as info:
        schema.load(data)
    return info.value.messages


# -- request bodies: dump (client side) ------------------------------------------------------


def test_acquire_dump_omits_unset_keys_in_wire_order():
    body = AcquireRequestSchema().dump(
        {
            "now": 100,
            "preferred": True,
            "metadata_json": None,
            "wait_ms": None,
            "ttl_sec": 30,
            "host": "mini",
            "controller_id": "mini-main",
        }
    )
    assert list(body.items()) == [
        ("controller_id", "mini-main"),
        ("host", "mini"),
        ("ttl_sec", 30),
        ("preferred", True),
        ("now", 100),
    ]


def test_acquire_dump_keeps_set_optional_keys():
    body = AcquireRequestSchema().dump(
        {
            "controller_id": "a",
            "host": "h",
            "ttl_sec": 5,
            "preferred": False,
            "metadata_json": '{"zone":"eu"}',
            "now": 7,
            "wait_ms": 2500,
        }
    )
    assert body == {
        "controller_id": "a",
        "host": "h",
        "ttl_sec": 5,
        "preferred": False,
        "metadata_json": '{"zone":"eu"}',
        "now": 7,
        "wait_ms": 2500,
    }


def test_heartbeat_dump_omits_none_and_missing():
    body = HeartbeatRequestSchema().dump(
        {"controller_id": "a", "host": "h", "priority": 0, "version": None, "status": "standby"}
    )
    assert body == {"controller_id": "a", "host": "h", "priority": 0, "status": "standby"}


def test_release_dump():
    assert ReleaseRequestSchema().dump({"controller_id": "a", "term": 0}) == {
        "controller_id": "a",
        "term": 0,
    }


# -- request bodies: load (server side) -------------------------------------------------------


def test_heartbeat_load_accepts_a_full_body_and_ignores_unknown_keys():
    body = {
        "controller_id": "mini-main",
        "host": "mini",
        "role": "primary",
        "priority": 100,
        "status": "leader",
        "version": "0.1.0",
        "heartbeat_at": 1700000000,
        "started_at": 1699999990,
        "from_the_future": {"x": 1},
    }
    loaded = HeartbeatRequestSchema().load(body)
    del body["from_the_future"]
    assert loaded == Heartbeat(**body)


def test_heartbeat_load_requires_identity():
    assert load_errors(HeartbeatRequestSchema(), {}) == {
        "controller_id": ["Missing data for required field."],
        "host": ["Missing data for required field."],
    }


def test_heartbeat_load_rejects_blank_and_mistyped_fields():
    errors = load_errors(
        HeartbeatRequestSchema(),
        {
            "controller_id": "  ",
            "host": 7,
            "role": ["primary"],
            "priority": "100",
            "status": None,
            "version": 1,
            "heartbeat_at": 1.5,
            "started_at": True,
        },
    )
    assert errors == {
        "controller_id": ["Must not be blank."],
        "host": ["Not a valid string."],
        "role": ["Not a valid string."],
        "priority": ["Not a valid integer."],
        "status": ["Field may not be null."],
        "version": ["Not a valid string."],
        "heartbeat_at": ["Not a valid integer."],
        "started_at": ["Not a valid integer."],
    }


def test_acquire_load_accepts_minimal_and_full_bodies():
    schema = AcquireRequestSchema()
    minimal = {"controller_id": "a", "host": "h", "ttl_sec": 1}
    assert schema.load(minimal) == minimal
    full = {
        **minimal,
        "preferred": True,
        "metadata_json": None,
        "now": 1700000000.25,
        "wait_ms": MAX_WAIT_MS,
    }
    assert schema.load(full) == full
    assert schema.load({**minimal, "wait_ms": 0})["wait_ms"] == 0


def test_acquire_load_requires_identity_and_ttl():
    assert load_errors(AcquireRequestSchema(), {"ignored": 1}) == {
        "controller_id": ["Missing data for required field."],
        "host": ["Missing data for required field."],
        "ttl_sec": ["Missing data for required field."],
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ttl_sec", 0, "Must be an integer from 1 to 86400."),
        ("ttl_sec", -5, "Must be an integer from 1 to 86400."),
        ("ttl_sec", 86_401, "Must be an integer from 1 to 86400."),
        ("ttl_sec", 10**12, "Must be an integer from 1 to 86400."),
        ("ttl_sec", "30", "Not a valid integer."),
        ("ttl_sec", 30.0, "Not a valid integer."),
        ("ttl_sec", True, "Not a valid integer."),
        ("preferred", "yes", "Not a valid boolean."),
        ("preferred", 1, "Not a valid boolean."),
        ("metadata_json", {"a": 1}, "Not a valid string."),
        ("now", "100", "Not a valid number."),
        ("now", False, "Not a valid number."),
        ("now", float("inf"), "Not a valid number."),
        ("wait_ms", -1, "Must be greater than or equal to 0 and less than or equal to 60000."),
        ("wait_ms", 60_001, "Must be greater than or equal to 0 and less than or equal to 60000."),
        ("wait_ms", "10", "Not a valid integer."),
        ("host", "", "Must not be blank."),
    ],
)
def test_acquire_load_rejects_bad_field(field, value, message):
    body = {"controller_id": "a", "host": "h", "ttl_sec": 30, field: value}
    assert load_errors(AcquireRequestSchema(), body) == {field: [message]}


def test_release_load():
    schema = ReleaseRequestSchema()
    assert schema.load({"controller_id": "a", "term": 0}) == {"controller_id": "a", "term": 0}
    assert load_errors(schema, {"term": -1}) == {
        "controller_id": ["Missing data for required field."],
        "term": [f"Must be greater than or equal to 0 and less than or equal to {2**63 - 1}."],
    }
    assert load_errors(schema, {"controller_id": "a", "term": "3"}) == {
        "term": ["Not a valid integer."]
    }
    assert load_errors(schema, {"controller_id": "a"}) == {
        "term": ["Missing data for required field."]
    }


@pytest.mark.parametrize("payload", [[], "body", 3, None])
def test_load_rejects_non_object_bodies(payload):
    assert load_errors(AcquireRequestSchema(), payload) == {"_schema": ["Invalid input type."]}


# -- envelopes ---------------------------------------------------------------------------------


def test_envelope_builders():
    assert success_envelope({"x": 1}, "req-1") == {
        "ok": True,
        "request_id": "req-1",
        "data": {"x": 1},
    }
    assert error_envelope("bad_request", "nope", "req-2") == {
        "ok": False,
        "request_id": "req-2",
        "error": "bad_request",
        "message": "nope",
    }
    assert error_envelope("bad_request", "nope", "req-2", {"ttl_sec": ["x"]})["details"] == {
        "ttl_sec": ["x"]
    }


def test_parse_envelope_recognises_both_kinds_and_nothing_else():
    ok = parse_envelope(success_envelope(None, "r1"))
    assert ok is not None and ok.ok and ok.data is None and ok.request_id == "r1"
    err = parse_envelope(error_envelope("conflict", "held", "r2", [1]))
    assert err is not None and not err.ok
    assert (err.error, err.message, err.details) == ("conflict", "held", [1])
    for other in (
        {"ok": True},  # no data: plain JSON
        {"ok": "true", "data": 1},
        {"ok": False, "error": "x"},  # no message
        {"ok": False, "error": 1, "message": "m"},
        [success_envelope(1, "r")],
        "text",
        None,
    ):
        assert parse_envelope(other) is None, other


# -- acquire response (§4 rule 5) ---------------------------------------------------------------


def parse(payload, controller_id="mini-main", host="mini", now=100):
    return parse_acquire_result(payload, controller_id=controller_id, host=host, now=now)


@pytest.mark.parametrize("payload", [None, [], ["holder_id"], "mini-main", 3, True])
def test_acquire_non_object(payload):
    with pytest.raises(ControlApiError) as info:
        parse(payload)
    assert str(info.value) == NON_OBJECT
    assert info.value.path == "/v1/leader/acquire"


@pytest.mark.parametrize(
    "change",
    [
        {"holder_id": None},
        {"holder_id": ""},
        {"holder_id": 5},
        {"term": None},
        {"term": "3"},
        {"term": 3.5},
        {"term": True},
        {"lease_expires_at": None},
        {"lease_expires_at": "130"},
        {"lease_expires_at": False},
        {"lease_expires_at": float("nan")},
    ],
)
def test_acquire_missing_or_mistyped_identity(change):
    payload = {"holder_id": "mini-main", "term": 3, "lease_expires_at": 130}
    payload.update(change)
    payload = {key: value for key, value in payload.items() if value is not None}
    with pytest.raises(ControlApiError) as info:
        parse(payload)
    assert str(info.value) == MISSING


def test_acquire_full_snake_case():
    lease = {
        "lease_name": "global",
        "holder_id": "mini-main",
        "holder_host": "mini",
        "term": 3,
        "lease_expires_at": 130,
        "renewed_at": 100,
        "preferred_holder_id": "mini-main",
        "metadata_json": None,
        "holder_instance_id": None,
    }
    payload = {**lease, "is_leader": True, "operation": "renew", "lease": lease}
    del payload["lease_name"], payload["preferred_holder_id"], payload["metadata_json"]
    result = parse(payload)
    assert result == AcquireResult(
        holder_id="mini-main",
        holder_host="mini",
        term=3,
        lease_expires_at=130,
        renewed_at=100,
        is_leader=True,
        operation="renew",
        lease=LeaseRecord(**lease),
    )
    assert acquire_result_to_wire(result) == {**payload, "lease": lease}


def test_acquire_camel_case():
    result = parse(
        {
            "holderId": "mini-standby",
            "holderHost": "mini2",
            "term": 9,
            "leaseExpiresAt": 140.5,
            "renewedAt": 110,
            "isLeader": False,
            "operation": "acquire",
            "lease": {
                "leaseName": "global",
                "holderId": "mini-standby",
                "holderHost": "mini2",
                "term": 9,
                "leaseExpiresAt": 140.5,
                "renewedAt": 110,
                "preferredHolderId": "mini-main",
                "metadataJson": '{"a":1}',
            },
        }
    )
    assert (result.holder_id, result.holder_host, result.term) == ("mini-standby", "mini2", 9)
    assert (result.lease_expires_at, result.renewed_at, result.is_leader) == (140.5, 110, False)
    assert result.lease == LeaseRecord(
        "global", "mini-standby", "mini2", 9, 140.5, 110, "mini-main", '{"a":1}'
    )


def test_acquire_snake_case_wins_over_camel_case():
    result = parse({"holder_id": "mini-main", "holderId": "other", "term": 1, "leaseExpiresAt": 5})
    assert result.holder_id == "mini-main" and result.lease_expires_at == 5


def test_acquire_defaults_when_this_node_holds():
    result = parse({"holder_id": "mini-main", "term": 2, "lease_expires_at": 130}, now=111)
    assert result == AcquireResult(
        holder_id="mini-main",
        holder_host="mini",
        term=2,
        lease_expires_at=130,
        renewed_at=111,
        is_leader=True,
        operation="acquire",
        lease=LeaseRecord("global", "mini-main", "mini", 2, 130, 111, None, None),
    )


def test_acquire_defaults_when_another_node_holds():
    result = parse({"holder_id": "other-main", "term": 2, "lease_expires_at": 130})
    assert (result.holder_host, result.is_leader, result.operation) == ("unknown", False, "acquire")
    assert result.lease.holder_host == "unknown"


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        ("renew", "renew"),
        ("acquire", "acquire"),
        ("RENEW", "acquire"),
        (7, "acquire"),
        (None, "acquire"),
    ],
)
def test_acquire_operation_is_renew_only_when_the_server_says_renew(operation, expected):
    payload = {"holder_id": "mini-main", "term": 1, "lease_expires_at": 5, "operation": operation}
    assert parse(payload).operation == expected


@pytest.mark.parametrize(
    ("operation", "granted"),
    [("acquire", True), ("renew", False), ("ACQUIRE", False), (7, False), (None, False)],
)
def test_granted_only_when_the_server_itself_says_acquire(operation, granted):
    # SPEC §15: a one-shot run releases only a term granted to it. The §4 default of
    # `operation` ("acquire" when absent) is for display; it proves no grant.
    payload = {"holder_id": "mini-main", "term": 1, "lease_expires_at": 5, "operation": operation}
    result = parse(payload)
    assert result.granted is granted
    assert result.operation == ("renew" if operation == "renew" else "acquire")
    assert "granted" not in acquire_result_to_wire(result)
    missing = parse({"holder_id": "mini-main", "term": 1, "lease_expires_at": 5})
    assert (missing.operation, missing.granted) == ("acquire", False)
    camel = parse({"holderId": "mini-main", "term": 1, "leaseExpiresAt": 5, "operation": "acquire"})
    assert camel.granted is True


def test_acquire_mistyped_optional_fields_fall_back_to_defaults():
    result = parse(
        {
            "holder_id": "mini-main",
            "term": 1,
            "lease_expires_at": 5,
            "holder_host": "",
            "renewed_at": "soon",
            "is_leader": "yes",
            "lease": "not-an-object",
        },
        now=42,
    )
    assert (result.holder_host, result.renewed_at, result.is_leader) == ("mini", 42, True)
    assert result.lease == LeaseRecord("global", "mini-main", "mini", 1, 5, 42, None, None)


def test_acquire_is_never_leader_when_another_node_is_named():
    # Split brain guard: the server's is_leader alone cannot make this node leader.
    payload = {"holder_id": "other-main", "term": 4, "lease_expires_at": 5, "is_leader": True}
    assert parse(payload).is_leader is False
    payload["holder_id"] = "mini-main"
    payload["is_leader"] = False
    assert parse(payload).is_leader is False


def test_acquire_another_instance_of_this_id_is_a_conflict_never_a_leader():
    # SPEC §15: the same controller id from another process must not lead beside it.
    payload = {
        "holder_id": "mini-main",
        "term": 4,
        "lease_expires_at": 5,
        "is_leader": True,
        "holder_instance_id": "other-instance",
    }
    conflict = parse_acquire_result(
        payload, controller_id="mini-main", host="mini", now=1, instance_id="mine"
    )
    assert (conflict.is_leader, conflict.instance_conflict) == (False, True)
    assert conflict.holder_instance_id == "other-instance"
    assert conflict.lease.holder_instance_id == "other-instance"
    ours = parse_acquire_result(
        {**payload, "holder_instance_id": "mine"},
        controller_id="mini-main",
        host="mini",
        now=1,
        instance_id="mine",
    )
    assert (ours.is_leader, ours.instance_conflict) == (True, False)
    # A server that ignores instances (no field) or a node without one: no conflict to see.
    del payload["holder_instance_id"]
    old_server = parse_acquire_result(
        payload, controller_id="mini-main", host="mini", now=1, instance_id="mine"
    )
    assert (old_server.is_leader, old_server.instance_conflict) == (True, False)
    assert "instance_conflict" not in acquire_result_to_wire(conflict)


def _get(loaded, name):
    return getattr(loaded, name) if isinstance(loaded, Heartbeat) else loaded.get(name)


def test_instance_id_is_an_optional_request_field():
    for schema, body in (
        (HeartbeatRequestSchema(), {"controller_id": "a", "host": "h"}),
        (AcquireRequestSchema(), {"controller_id": "a", "host": "h", "ttl_sec": 5}),
        (ReleaseRequestSchema(), {"controller_id": "a", "term": 1}),
    ):
        assert _get(schema.load(body), "instance_id") is None
        assert _get(schema.load({**body, "instance_id": "i-1"}), "instance_id") == "i-1"
        assert "instance_id" in load_errors(schema, {**body, "instance_id": " "})


def test_acquire_partial_nested_lease_takes_the_rest_from_top_level():
    result = parse(
        {
            "holder_id": "mini-main",
            "term": 3,
            "lease_expires_at": 130,
            "lease": {"lease_name": "fleet", "term": "x", "preferred_holder_id": "mini-main"},
        }
    )
    assert result.lease == LeaseRecord("fleet", "mini-main", "mini", 3, 130, 100, "mini-main", None)


# -- release response --------------------------------------------------------------------------


def test_release_result_round_trip():
    lease = LeaseRecord("global", "mini-main", "mini", 3, 100, 90, None, None)
    result = ReleaseResult(released=True, supported=True, lease=lease)
    wire = release_result_to_wire(result)
    assert wire == {
        "released": True,
        "lease": {
            "lease_name": "global",
            "holder_id": "mini-main",
            "holder_host": "mini",
            "term": 3,
            "lease_expires_at": 100,
            "renewed_at": 90,
            "preferred_holder_id": None,
            "metadata_json": None,
            "holder_instance_id": None,
        },
    }
    assert parse_release_result(wire) == result
    assert release_result_to_wire(ReleaseResult(False, True, None)) == {
        "released": False,
        "lease": None,
    }


def test_release_result_lenient_fields():
    assert parse_release_result(None) == ReleaseResult(False, True, None)
    assert parse_release_result({}) == ReleaseResult(False, True, None)
    assert parse_release_result({"released": "yes"}) == ReleaseResult(False, True, None)
    # A lease without its identity is dropped rather than invented.
    assert parse_release_result({"released": True, "lease": {"holder_id": None, "term": 3}}) == (
        ReleaseResult(True, True, None)
    )
    camel = parse_release_result(
        {
            "released": True,
            "lease": {"holderId": "a", "term": 1, "leaseExpiresAt": 5, "renewedAt": 4},
        }
    )
    assert camel.lease == LeaseRecord("global", "a", "unknown", 1, 5, 4, None, None)


def test_release_result_non_object():
    with pytest.raises(ControlApiError) as info:
        parse_release_result([True])
    assert str(info.value) == "Control API /v1/leader/release returned a non-object payload."


# -- the error type ----------------------------------------------------------------------------


def test_control_api_error_fields_and_pickling():
    err = ControlApiError(
        "Control API 401 /v1/x: unauthorized: no", path="/v1/x", status=401, code="unauthorized"
    )
    assert str(err) == "Control API 401 /v1/x: unauthorized: no"
    assert (err.path, err.status, err.code) == ("/v1/x", 401, "unauthorized")
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.path, copy.status, copy.code) == (
        str(err),
        "/v1/x",
        401,
        "unauthorized",
    )
    bare = ControlApiError("m", path="/p")
    assert (bare.status, bare.code) == (None, None)


# -- one Heartbeat value end to end (issue 20) ---------------------------------------------------


def test_heartbeat_dumps_from_and_loads_into_one_value():
    beat = Heartbeat(
        controller_id="mini-main",
        host="mini",
        role="primary",
        priority=100,
        status="leader",
        version="0.1.0",
        heartbeat_at=1700000000,
        started_at=1699999990,
        instance_id="i-1",
    )
    schema = HeartbeatRequestSchema()
    body = dump_request(schema, beat)
    assert list(body) == [
        "controller_id",
        "host",
        "role",
        "priority",
        "status",
        "version",
        "heartbeat_at",
        "started_at",
        "instance_id",
    ]
    assert schema.load(body) == beat
    minimal = Heartbeat(controller_id="a", host="h")
    assert dump_request(schema, minimal) == {"controller_id": "a", "host": "h"}
    assert schema.load({"controller_id": "a", "host": "h"}) == minimal


def test_wire_operation_is_renew_only_for_a_renewal():
    assert wire_operation("renew") == "renew"
    for other in ("acquire", "deny", "RENEW", None, 7):
        assert wire_operation(other) == "acquire"


# -- bounds on what a client sends (issue 15) ----------------------------------------------------

LIMITS = [
    # (schema, base body, field, largest valid value, first invalid value above it)
    (AcquireRequestSchema, {"ttl_sec": 30}, "ttl_sec", 86_400, 86_401),
    (AcquireRequestSchema, {}, "wait_ms", 60_000, 60_001),
    (AcquireRequestSchema, {}, "now", 2**33, 2**33 + 1),
    (AcquireRequestSchema, {}, "controller_id", "c" * 255, "c" * 256),
    (AcquireRequestSchema, {}, "host", "h" * 255, "h" * 256),
    (AcquireRequestSchema, {}, "instance_id", "i" * 128, "i" * 129),
    (AcquireRequestSchema, {}, "metadata_json", "m" * 16384, "m" * 16385),
    (AcquireRequestSchema, {}, "metadata_json", "é" * 8192, "é" * 8192 + "m"),  # bytes count
    (HeartbeatRequestSchema, {}, "priority", 2**31 - 1, 2**31),
    (HeartbeatRequestSchema, {}, "heartbeat_at", 2**33, 2**33 + 1),
    (HeartbeatRequestSchema, {}, "started_at", 2**33, 2**33 + 1),
    (HeartbeatRequestSchema, {}, "controller_id", "c" * 255, "c" * 256),
    (HeartbeatRequestSchema, {}, "host", "h" * 255, "h" * 256),
    (HeartbeatRequestSchema, {}, "role", "r" * 32, "r" * 33),
    (HeartbeatRequestSchema, {}, "status", "s" * 32, "s" * 33),
    (HeartbeatRequestSchema, {}, "version", "v" * 128, "v" * 129),
    (HeartbeatRequestSchema, {}, "instance_id", "i" * 128, "i" * 129),
    (ReleaseRequestSchema, {"term": 1}, "term", 2**63 - 1, 2**63),
    (ReleaseRequestSchema, {"term": 1}, "controller_id", "c" * 255, "c" * 256),
]
BASE = {
    AcquireRequestSchema: {"controller_id": "a", "host": "h", "ttl_sec": 30},
    HeartbeatRequestSchema: {"controller_id": "a", "host": "h"},
    ReleaseRequestSchema: {"controller_id": "a", "term": 1},
}


@pytest.mark.parametrize(("schema", "extra", "field", "largest", "beyond"), LIMITS)
def test_every_request_field_is_bounded(schema, extra, field, largest, beyond):
    body = {**BASE[schema], **extra}
    schema().load({**body, field: largest})
    assert list(load_errors(schema(), {**body, field: beyond})) == [field]
    with pytest.raises(ValidationError):
        dump_request(schema(), {**body, field: beyond})


@pytest.mark.parametrize(
    ("schema", "field", "lowest"),
    [
        (AcquireRequestSchema, "ttl_sec", 1),
        (AcquireRequestSchema, "wait_ms", 0),
        (AcquireRequestSchema, "now", 0),
        (HeartbeatRequestSchema, "priority", 0),
        (HeartbeatRequestSchema, "heartbeat_at", 0),
        (HeartbeatRequestSchema, "started_at", 0),
        (ReleaseRequestSchema, "term", 0),
    ],
)
def test_numbers_have_a_floor(schema, field, lowest):
    schema().load({**BASE[schema], field: lowest})
    assert list(load_errors(schema(), {**BASE[schema], field: lowest - 1})) == [field]


STRING_FIELDS = [
    (AcquireRequestSchema, "controller_id"),
    (AcquireRequestSchema, "host"),
    (AcquireRequestSchema, "metadata_json"),
    (AcquireRequestSchema, "instance_id"),
    (HeartbeatRequestSchema, "controller_id"),
    (HeartbeatRequestSchema, "host"),
    (HeartbeatRequestSchema, "role"),
    (HeartbeatRequestSchema, "status"),
    (HeartbeatRequestSchema, "version"),
    (HeartbeatRequestSchema, "instance_id"),
    (ReleaseRequestSchema, "controller_id"),
    (ReleaseRequestSchema, "instance_id"),
]


@pytest.mark.parametrize(("schema", "field"), STRING_FIELDS)
@pytest.mark.parametrize(
    ("value", "message"),
    [("a\ud800b", "Not valid Unicode."), ("\udfff", "Not valid Unicode."), ("a\0b", None)],
    ids=["lone-high", "lone-low", "nul"],
)
def test_no_string_may_carry_a_lone_surrogate_or_nul(schema, field, value, message):
    errors = load_errors(schema(), {**BASE[schema], field: value})
    assert list(errors) == [field]
    assert (message or "Must not contain NUL.") in errors[field]
    with pytest.raises(ValidationError):
        dump_request(schema(), {**BASE[schema], field: value})


def test_valid_non_ascii_text_is_fine():
    body = {**BASE[HeartbeatRequestSchema], "host": "mac-mini-künstler-😀"}
    assert HeartbeatRequestSchema().load(body).host == "mac-mini-künstler-😀"


# -- server strings that are not valid Unicode (issue 15) -----------------------------------------


@pytest.mark.parametrize("bad", ["\ud800", "mini-main\udc00", "a\0b", "x" * 256])
def test_a_holder_id_that_is_not_valid_text_is_missing_identity(bad):
    with pytest.raises(ControlApiError) as info:
        parse({"holder_id": bad, "term": 3, "lease_expires_at": 130, "is_leader": False})
    assert str(info.value) == MISSING


def test_other_invalid_server_strings_count_as_absent():
    result = parse(
        {
            "holder_id": "other-main",
            "holder_host": "\ud800",
            "term": 3,
            "lease_expires_at": 130,
            "operation": "renew\ud800",
            "holder_instance_id": "\udfff",
            "lease": {
                "lease_name": "\ud800",
                "holder_id": "\ud800",
                "holder_host": "h\0",
                "preferred_holder_id": "\ud800",
                "metadata_json": "\ud800",
                "term": 3,
                "lease_expires_at": 130,
                "renewed_at": 100,
            },
        }
    )
    assert result.holder_host == "unknown"
    assert result.operation == "acquire"
    assert result.holder_instance_id is None
    assert result.lease == LeaseRecord("global", "other-main", "unknown", 3, 130, 100, None, None)
    released = parse_release_result(
        {
            "released": True,
            "lease": {"holder_id": "\ud800", "term": 1, "lease_expires_at": 5, "renewed_at": 4},
        }
    )
    assert released == ReleaseResult(True, True, None)


def test_a_heartbeat_rides_on_an_acquire_and_its_acknowledgement_is_read():
    schema = AcquireRequestSchema()
    body = {"controller_id": "a", "host": "h", "ttl_sec": 5}
    ridden = {**body, "heartbeat": {"role": "primary", "status": "leader", "priority": 7}}
    assert schema.load(ridden)["heartbeat"] == {
        "role": "primary",
        "status": "leader",
        "priority": 7,
    }
    assert "heartbeat" in load_errors(schema, {**body, "heartbeat": {"status": "\ud800"}})
    assert "heartbeat" in load_errors(schema, {**body, "heartbeat": []})
    answer = {"holder_id": "a", "term": 1, "lease_expires_at": 5, "operation": "renew"}
    parse = parse_acquire_result
    assert parse(answer, controller_id="a", host="h", now=1).heartbeat_recorded is False
    recorded = parse({**answer, "heartbeat_recorded": True}, controller_id="a", host="h", now=1)
    assert recorded.heartbeat_recorded is True
    assert acquire_result_to_wire(recorded)["heartbeat_recorded"] is True
    plain = parse(answer, controller_id="a", host="h", now=1)
    assert "heartbeat_recorded" not in acquire_result_to_wire(plain)  # older clients see nothing
