"""Property tests (hypothesis) for the wire contract.

* from_dict never raises anything but SchemaError, whatever JSON value it gets;
* whatever it accepts survives to_dict / JSON / from_dict unchanged;
* the hand-written request fast path returns exactly what the generic validator returns;
* decode_batch never raises on arbitrary bytes.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import RECORD_CLASSES, Record, RequestEvent, SchemaError, decode_batch
from schemas.examples import example, minimal
from schemas.records import parse_request, validate_with_spec

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities too: Python callers can pass them
    | st.text()
    | st.sampled_from(["", " ", "a b", "\x00", "\ud800", "x" * 300, "metric:cpu", "ed25519"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
records = st.sampled_from(RECORD_CLASSES)


def _field_names(cls: type[Record]) -> list[str]:
    return [f.name for f in cls.SPEC.props or ()]


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[type[Record], Any]:
    """A valid example with a few fields replaced, dropped, or nested parts broken."""
    cls = draw(records)
    obj: dict[str, Any] = example(cls.NAME) if draw(st.booleans()) else minimal(cls.NAME)
    names = _field_names(cls)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        action = draw(st.integers(0, 9))
        name = draw(st.sampled_from(names))
        if action == 0:
            obj.pop(name, None)
        elif action == 1:
            obj[draw(st.text(max_size=6))] = draw(json_values)
        elif action == 2 and isinstance(obj.get(name), dict) and obj[name]:
            key = draw(st.sampled_from(sorted(obj[name])))
            obj[name][key] = draw(json_values)
        else:
            obj[name] = draw(json_values)
    return cls, obj


def _try(cls: type[Record], obj: Any) -> Record | None:
    try:
        return cls.from_dict(obj)
    except SchemaError as e:
        assert e.record == cls.NAME
        assert isinstance(e.field, str) and isinstance(e.reason, str) and e.reason
        assert e.value is None or len(e.value) <= 80
        str(e)
        return None


@SETTINGS
@given(records, json_values)
def test_from_dict_only_raises_schema_error_on_any_json(cls: type[Record], value: Any) -> None:
    _try(cls, value)


@SETTINGS
@given(records, st.dictionaries(st.text(max_size=12), json_values, max_size=8))
def test_from_dict_only_raises_schema_error_on_any_object(
    cls: type[Record], value: dict[str, Any]
) -> None:
    _try(cls, value)


@SETTINGS
@given(near_valid())
def test_accepted_records_round_trip(case: tuple[type[Record], Any]) -> None:
    cls, obj = case
    before = copy.deepcopy(obj)
    rec = _try(cls, obj)
    assert repr(obj) == repr(before)  # input untouched (repr: NaN != NaN)
    if rec is None:
        return
    assert cls.from_dict(rec.to_dict()) == rec
    wire = orjson.dumps(rec.to_dict())
    assert cls.from_dict(orjson.loads(wire)) == rec
    assert orjson.dumps(cls.from_dict(orjson.loads(wire)).to_dict()) == wire


# ------------------------------------------------------------ request fast path

_tokens = st.sampled_from(["checkout", "GET", "v1.2.3", "eu-west-1", "db", "a b", "", "ü",
                           "x" * 16, "x" * 17, "x" * 64, "x" * 65, "x" * 128, "x" * 129,
                           "\t", "a\x7f", "服务"])  # fmt: skip
_field_values = {
    "ts": st.one_of(st.sampled_from([946_684_800, 946_684_799.9, 4_102_444_800, 4.2e9, 1.7e9]),
                    st.floats(), st.integers(), json_scalars),
    "service": st.one_of(_tokens, st.text(max_size=5), json_scalars),
    "route": st.one_of(st.sampled_from(["/a", "GET /a b", "", "x" * 256, "x" * 257, "/é",
                                        "a\nb"]), st.text(max_size=5), json_scalars),
    "status": st.one_of(st.sampled_from([99, 100, 200, 599, 600, 200.0, 200.5, True]),
                        st.integers(), json_scalars),
    "latency_ms": st.one_of(st.sampled_from([0, -0.0, 3_600_000, 3_600_000.5, -1]),
                            st.floats(), st.integers(), json_scalars),
    "method": st.one_of(_tokens, json_scalars),
    "instance": st.one_of(_tokens, json_scalars),
    "version": st.one_of(_tokens, json_scalars),
    "region": st.one_of(_tokens, json_scalars),
    "dependency": st.one_of(_tokens, json_scalars),
    "error": st.one_of(st.booleans(), json_scalars),
}  # fmt: skip


@st.composite
def request_like(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)
    obj: dict[str, Any] = {}
    for name, values in _field_values.items():
        required = name in ("ts", "service", "route", "status", "latency_ms")
        roll = draw(st.integers(0, 9))
        if roll == 0 or (not required and roll < 6):
            continue  # absent
        obj[name] = example("request")[name] if roll < 5 else draw(values)
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=6))] = draw(json_scalars)
    return obj


def _outcome(fn: Any, obj: Any) -> tuple[Any, ...]:
    try:
        rec = fn(obj)
    except SchemaError as e:
        return ("error", e.record, e.field, e.value, e.reason)
    return ("ok", type(rec), repr(rec), orjson.dumps(rec.to_dict()))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_like())
def test_request_fast_path_equals_generic(obj: Any) -> None:
    fast = _outcome(parse_request, copy.deepcopy(obj))
    slow = _outcome(lambda o: validate_with_spec(RequestEvent, o), copy.deepcopy(obj))
    assert fast == slow


# ------------------------------------------------------------------ decode_batch


@SETTINGS
@given(st.binary(max_size=200))
def test_decode_batch_never_raises_on_bytes(data: bytes) -> None:
    good, bad = decode_batch(data, RequestEvent)
    assert all(type(r) is RequestEvent for r in good)
    assert all(isinstance(e, SchemaError) for _, e in bad)


@SETTINGS
@given(st.lists(request_like(), max_size=20))
def test_decode_batch_splits_like_from_dict(elements: list[Any]) -> None:
    try:
        data = orjson.dumps(elements)
    except (TypeError, orjson.JSONEncodeError):
        return
    parsed = orjson.loads(data)
    good, bad = decode_batch(data, RequestEvent)
    expect_good, expect_bad = [], []
    for i, el in enumerate(parsed):
        try:
            expect_good.append(RequestEvent.from_dict(el))
        except SchemaError as e:
            expect_bad.append(
                (
                    el,
                    f"[{i}]"
                    + ("." + e.field if e.field and not e.field.startswith("[") else e.field),
                )
            )
    assert good == expect_good
    assert [(el, e.field) for el, e in bad] == expect_bad
