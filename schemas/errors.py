"""The one exception the wire contract raises: :class:`SchemaError`.

Every rejection names the record type, the dotted path of the offending field, a short
repr of the value and the reason in plain words, so that a dead-letter entry can be read
without the code at hand::

    request.latency_ms: -3.0: must be >= 0
    request[3].status: '200': must be an integer
    command.signature.kid: missing required field
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["SchemaError", "MISSING", "short_repr"]

MAX_REPR = 80


class _Missing:
    """Sentinel for "the field is absent" (distinct from an explicit null)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxdict = 6
_repr.maxlist = 8
_repr.maxtuple = 8
_repr.maxset = 6
_repr.maxstring = MAX_REPR
_repr.maxother = MAX_REPR
_repr.maxlong = 40


def short_repr(value: object, limit: int = MAX_REPR) -> str:
    """repr(value) cut to ``limit`` characters, without ever building a huge repr."""
    if isinstance(value, str | bytes | bytearray):
        r = repr(value[: limit + 1])
    else:
        try:
            r = _repr.repr(value)
        except Exception:  # a hostile __repr__ must not hide the real error
            r = f"<{type(value).__name__}>"
    if len(r) > limit:
        r = r[: limit - 3] + "..."
    return r


def join_path(prefix: str, field: str) -> str:
    """``join_path("signature", "kid") == "signature.kid"``; indexes attach without a dot."""
    if not prefix:
        return field
    if not field:
        return prefix
    if field.startswith("["):
        return prefix + field
    return prefix + "." + field


class SchemaError(ValueError):
    """Input that breaks the wire contract.

    Attributes:
        record: the record type name (``"request"``, ``"command"``, ...); empty when the
            input could not even be parsed as JSON.
        field: dotted path of the offending field (``"signature.kid"``,
            ``"[3].latency_ms"`` inside a batch); empty for the whole input.
        value: short repr of the offending value (at most 80 characters), or ``None`` when
            the field is missing.
        reason: what is wrong, in words (``"must be >= 0"``, ``"unknown field"``, ...).
    """

    record: str
    field: str
    value: str | None
    reason: str

    def __init__(self, record: str, field: str, value: object = MISSING, reason: str = "") -> None:
        value_repr = None if value is MISSING else short_repr(value)
        self._set(record, field, value_repr, reason)

    def _set(self, record: str, field: str, value_repr: str | None, reason: str) -> None:
        self.record = record
        self.field = field
        self.value = value_repr
        self.reason = reason
        self.args = (str(self),)

    @classmethod
    def _restore(cls, record: str, field: str, value_repr: str | None, reason: str) -> SchemaError:
        err = cls.__new__(cls)
        err._set(record, field, value_repr, reason)
        return err

    def __reduce__(self) -> tuple[Any, ...]:
        return (SchemaError._restore, (self.record, self.field, self.value, self.reason))

    def at(self, prefix: str) -> SchemaError:
        """A copy of this error whose field path is prefixed (``"[3]"``, ``"signature"``)."""
        return SchemaError._restore(
            self.record, join_path(prefix, self.field), self.value, self.reason
        )

    def for_record(self, record: str) -> SchemaError:
        """A copy of this error attributed to ``record``."""
        return SchemaError._restore(record, self.field, self.value, self.reason)

    @property
    def location(self) -> str:
        """``record.field`` (or ``record[3].field``), as shown first in ``str(e)``."""
        if not self.record:
            return self.field or "<input>"
        return join_path(self.record, self.field) if self.field else self.record

    def __str__(self) -> str:
        parts = [self.location]
        if self.value is not None:
            parts.append(self.value)
        parts.append(self.reason)
        return ": ".join(parts)

    def __repr__(self) -> str:
        return (
            f"SchemaError(record={self.record!r}, field={self.field!r}, "
            f"value={self.value!r}, reason={self.reason!r})"
        )
