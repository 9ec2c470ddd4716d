"""schemas.codec: dumps / loads / decode / decode_batch."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas import (
    MAX_BATCH,
    RECORD_CLASSES,
    RECORD_TYPES,
    ErrorEvent,
    RequestEvent,
    SchemaError,
    decode,
    decode_batch,
    dumps,
    loads,
)
from schemas.examples import example, minimal


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
def test_dumps_record_and_dict_alike(cls: Any) -> None:
    rec = cls.from_dict(example(cls.NAME))
    data = dumps(rec)
    assert isinstance(data, bytes)
    assert data == dumps(rec.to_dict()) == orjson.dumps(example(cls.NAME))
    assert b" " not in data.replace(b'" ', b"").split(b'"')[0]  # compact
    assert decode(data, cls) == rec
    assert cls.from_dict(loads(data)) == rec


def test_loads_accepts_bytes_like_and_str() -> None:
    for data in (b'{"a":1}', bytearray(b'{"a":1}'), memoryview(b'{"a":1}'), '{"a":1}'):
        assert loads(data) == {"a": 1}


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[1,", b"NaN", b"Infinity", b'{"a":1}x', b"\xff\xfe", b'"\xed\xa0\x80"',
     b"{'a': 1}", b"1e400", None, 5],
)  # fmt: skip
def test_loads_rejects_non_json(data: Any) -> None:
    with pytest.raises(SchemaError) as info:
        loads(data)
    assert info.value.reason.startswith("not JSON: ")
    assert str(info.value).startswith("<input>: ")


def test_decode_names_record_on_bad_json() -> None:
    with pytest.raises(SchemaError) as info:
        decode(b"\xff", RequestEvent)
    assert info.value.record == "request"
    assert info.value.reason.startswith("not JSON: ")
    assert str(info.value).startswith("request: b'\\xff': not JSON: ")


def test_decode_rejects_batch_for_single_record_topics() -> None:
    with pytest.raises(SchemaError, match="must be an object"):
        decode(orjson.dumps([example("command")]), RECORD_TYPES["commands"])


# -------------------------------------------------------------------- decode_batch


def _req(i: int, **kw: Any) -> dict[str, Any]:
    return minimal("request") | {"ts": 1_700_000_000.0 + i} | kw


def test_batch_single_object() -> None:
    good, bad = decode_batch(orjson.dumps(_req(0)), RequestEvent)
    assert good == [RequestEvent.from_dict(_req(0))] and bad == []
    good, bad = decode_batch(orjson.dumps(_req(0, status=42)), RequestEvent)
    assert good == [] and len(bad) == 1
    obj, err = bad[0]
    assert obj == _req(0, status=42)
    assert (err.record, err.field) == ("request", "status")


def test_batch_mixed_good_and_bad_elements() -> None:
    elements = [
        _req(0),
        _req(1, latency_ms=-3.0),
        "not an object",
        _req(3, extra=True),
        _req(4, method="GET", dependency="db"),
        _req(5) | {"service": None},
        [1, 2],
        _req(7, error=True),
    ]
    good, bad = decode_batch(orjson.dumps(elements), RequestEvent)
    assert [r.ts for r in good] == [1_700_000_000.0, 1_700_000_004.0, 1_700_000_007.0]
    assert [(e.field, e.reason) for _, e in bad] == [
        ("[1].latency_ms", "must be >= 0"),
        ("[2]", "must be an object"),
        ("[3].extra", "unknown field"),
        ("[5].service", "must be a string"),
        ("[6]", "must be an object"),
    ]
    assert [obj for obj, _ in bad] == [elements[i] for i in (1, 2, 3, 5, 6)]
    assert str(bad[0][1]) == "request[1].latency_ms: -3.0: must be >= 0"


def test_batch_of_error_events() -> None:
    elements = [minimal("error"), minimal("error") | {"error_type": ""}]
    good, bad = decode_batch(orjson.dumps(elements), ErrorEvent)
    assert good == [ErrorEvent.from_dict(minimal("error"))]
    assert [(e.record, e.field, e.reason) for _, e in bad] == [
        ("error", "[1].error_type", "must not be empty")
    ]


def test_batch_empty_array() -> None:
    assert decode_batch(b"[]", RequestEvent) == ([], [])


def test_batch_limit() -> None:
    at_limit = orjson.dumps([_req(0)] * MAX_BATCH)
    good, bad = decode_batch(at_limit, RequestEvent)
    assert len(good) == MAX_BATCH == 10_000 and bad == []
    over = orjson.dumps([_req(0)] * (MAX_BATCH + 1))
    good, bad = decode_batch(over, RequestEvent)
    assert good == [] and len(bad) == 1
    raw, err = bad[0]
    assert raw == over
    assert (err.record, err.field) == ("request", "")
    assert err.reason == "batch longer than 10000 elements"


@pytest.mark.parametrize("data", [b"5", b'"x"', b"null", b"true", b"1.5"])
def test_batch_of_scalar_is_one_error(data: bytes) -> None:
    good, bad = decode_batch(data, RequestEvent)
    assert good == [] and len(bad) == 1
    assert bad[0][0] == data
    assert bad[0][1].reason == "must be an object or an array of objects"


@pytest.mark.parametrize("data", [b"", b"[{", b"\xff", b"[NaN]", None])
def test_batch_of_non_json_is_one_error(data: Any) -> None:
    good, bad = decode_batch(data, RequestEvent)
    assert good == [] and len(bad) == 1
    raw, err = bad[0]
    assert raw is data or raw == data
    assert err.record == "request" and err.field == ""
    assert err.reason.startswith("not JSON: ")


def test_batch_accepts_bytes_like() -> None:
    data = orjson.dumps([_req(0), _req(1)])
    for d in (bytearray(data), memoryview(data), data.decode()):
        good, bad = decode_batch(d, RequestEvent)
        assert len(good) == 2 and bad == []
