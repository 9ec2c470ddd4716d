"""Bytes on the wire <-> records, with orjson.

* :func:`dumps` — a record (or a plain dict) to compact UTF-8 JSON.
* :func:`loads` — bytes to a JSON value; bad bytes raise SchemaError (reason "not JSON: ...").
* :func:`decode` — one message holding one record; raises SchemaError.
* :func:`decode_batch` — one message on ``requests`` / ``errors``: an object or an array
  of objects. Never raises: valid records come back, and each invalid element comes back
  with its error (field path ``[i]...``), ready for the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from schemas.errors import SchemaError
from schemas.records import (
    Ack,
    Anomaly,
    ChangeEvent,
    Command,
    ControlMessage,
    DeadLetter,
    ErrorEvent,
    IncidentEvent,
    Record,
    RequestEvent,
    ScenarioLabel,
    WindowSummary,
    parse_request,
)

__all__ = ["RECORD_TYPES", "MAX_BATCH", "dumps", "loads", "decode", "decode_batch"]

R = TypeVar("R", bound=Record)

#: Logical topic name -> record type (the topic prefix, ``stanch.`` by default, is not
#: part of the name).
RECORD_TYPES: dict[str, type[Record]] = {
    "requests": RequestEvent,
    "errors": ErrorEvent,
    "changes": ChangeEvent,
    "windows": WindowSummary,
    "anomalies": Anomaly,
    "incidents": IncidentEvent,
    "commands": Command,
    "acks": Ack,
    "control": ControlMessage,
    "deadletter": DeadLetter,
    "labels": ScenarioLabel,
}

#: Most elements one batch message may hold; a longer array is rejected whole.
MAX_BATCH = 10_000


def dumps(value: Record | dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON of a record (its ``to_dict()``) or of a plain dict."""
    if isinstance(value, Record):
        return orjson.dumps(value.to_dict())
    return orjson.dumps(value)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON. Anything that is not valid UTF-8 JSON raises SchemaError."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise SchemaError("", "", data, f"not JSON: {e}") from None
    except TypeError as e:  # not bytes-like at all (None, an int, ...)
        raise SchemaError("", "", data, f"not JSON: {e}") from None


def decode(data: bytes | bytearray | memoryview | str, record_type: type[R]) -> R:
    """One message holding one record. Raises SchemaError."""
    try:
        obj = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError) as e:
        raise SchemaError(record_type.NAME, "", data, f"not JSON: {e}") from None
    return record_type.from_dict(obj)


def decode_batch(
    data: bytes | bytearray | memoryview | str, record_type: type[R]
) -> tuple[list[R], list[tuple[object, SchemaError]]]:
    """Decode a message that is one object or a JSON array of objects.

    Returns ``(records, rejected)``. Each rejected element comes with its SchemaError,
    whose field path starts with the element's index (``[3].latency_ms``). When the
    message as a whole is unusable (not JSON, neither object nor array, more than
    :data:`MAX_BATCH` elements) ``rejected`` holds one entry: the raw ``data`` and the
    error (empty field path), and ``records`` is empty.
    """
    name = record_type.NAME
    try:
        obj = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError) as e:
        return [], [(data, SchemaError(name, "", data, f"not JSON: {e}"))]
    # requests are the hot topic: call the fast path without the classmethod hop
    from_dict: Callable[[object], R] = (
        parse_request if record_type is RequestEvent else record_type.from_dict  # type: ignore[assignment]
    )
    if type(obj) is dict:
        try:
            return [from_dict(obj)], []
        except SchemaError as e:
            return [], [(obj, e)]
    if type(obj) is not list:
        return [], [(data, SchemaError(name, "", obj, "must be an object or an array of objects"))]
    if len(obj) > MAX_BATCH:
        return [], [(data, SchemaError(name, "", obj, f"batch longer than {MAX_BATCH} elements"))]
    good: list[R] = []
    bad: list[tuple[object, SchemaError]] = []
    append = good.append
    for i, el in enumerate(obj):
        try:
            append(from_dict(el))
        except SchemaError as e:
            bad.append((el, e.at(f"[{i}]")))
    return good, bad
