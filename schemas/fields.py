"""Declarative field specs: the single source of both the validators and the JSON Schemas.

Every record on the wire is described once, as a tuple of :class:`Field` objects (see
``schemas/records.py``). :func:`compile_object` turns such a description into a strict
validator; ``schemas/jsonschema.py`` turns the very same description into a JSON Schema
(draft 2020-12). Nothing else defines what is valid, so the two cannot drift.

Rules shared by every field (the JSON Schema says the same):

* ``number`` accepts JSON numbers (Python ``int`` or ``float``, never ``bool``), must be
  finite, and comes back as given: an int stays an int (so re-encoding a record
  reproduces its JSON, and signatures over it still verify), a float stays a float.
* ``integer`` accepts integers and integral floats (``200.0``, as JSON Schema does), never
  ``bool``, and comes back as ``int``. Every integer field has explicit bounds.
* ``string`` lengths count code points (as JSON Schema's ``maxLength`` does); patterns are
  anchored ``^...$``, use only syntax that means the same in Python ``re`` and ECMA-262
  (character classes with ``\\uXXXX`` escapes, groups, alternation, ``{m,n}``) and never
  match a line feed (Python's ``$`` also matches before a final ``"\\n"``; the JSON
  Schema forbids ``"\\n"`` explicitly so that every engine gives the same verdict).
* An optional field may be absent or ``null``; both mean "not given".
* Objects reject unknown keys (``additionalProperties: false``).
* Free-form objects (evidence, params, details) must hold plain JSON values only (finite
  numbers, 64-bit integers, string keys), nest at most :data:`FREE_MAX_DEPTH` levels
  deep and encode to at most ``max_bytes`` bytes of compact JSON.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from schemas.errors import MISSING, SchemaError

__all__ = [
    "JsonType",
    "Field",
    "Check",
    "Validator",
    "compile_field",
    "compile_object",
    "TS_MIN",
    "TS_MAX",
    "MAX_SAFE_INT",
    "FREE_MAX_DEPTH",
    "TOKEN_PATTERN",
    "LINE_PATTERN",
    "TOKEN_CLASS",
    "LINE_CLASS",
]

JsonType = Literal["string", "integer", "number", "boolean", "object", "array"]

#: Earliest and latest accepted epoch timestamps (2000-01-01 and 2100-01-01 UTC).
TS_MIN = 946_684_800
TS_MAX = 4_102_444_800
#: Largest integer every JSON consumer (JavaScript included) reads exactly.
MAX_SAFE_INT = 2**53 - 1
#: Deepest nesting accepted inside a free-form object.
FREE_MAX_DEPTH = 32

# Character classes, written so that Python ``re`` and ECMA-262 read them the same way.
# Control characters: C0, DEL, C1, and the two Unicode line/paragraph separators.
_CONTROL = "\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029"
# White space (Unicode White_Space outside the control ranges above, plus BOM/ZWNBSP).
_SPACE = "\\u0020\\u00a0\\u1680\\u2000-\\u200a\\u202f\\u205f\\u3000\\ufeff"
#: One character of a token (service, instance, version, ...): no white space, no control.
TOKEN_CLASS = f"[^{_CONTROL}{_SPACE}]"
#: One character of a single-line label (route, ids, ...): no control characters.
LINE_CLASS = f"[^{_CONTROL}]"
TOKEN_PATTERN = f"^{TOKEN_CLASS}*$"
LINE_PATTERN = f"^{LINE_CLASS}*$"

_PATTERN_REASONS = {
    TOKEN_PATTERN: "must not contain white space or control characters",
    LINE_PATTERN: "must not contain control characters",
}

Validator = Callable[[Any], Any]


@dataclass(frozen=True)
class Check:
    """A rule that involves several fields of one object.

    ``test(values)`` receives the validated field values (absent optionals are ``None``)
    and returns ``None`` when the rule holds, else the reason, reported on ``field``; or a
    ``(field, reason)`` pair to report on another field. ``schema`` is the same rule as a
    JSON Schema fragment, or ``None`` when JSON Schema cannot express it (then the rule is
    stated in the schema's ``$comment``).
    """

    field: str
    description: str
    test: Callable[[Mapping[str, Any]], str | tuple[str, str] | None]
    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class Field:
    """One field of a record (or of a nested object, an array item or a map value).

    Objects come in three kinds: fixed (``props`` given: known keys only), map
    (``values`` given: any keys matching ``keys``, values matching ``values``) and
    free-form (neither: any JSON, bounded by ``max_bytes``).
    """

    name: str
    type: JsonType
    required: bool = True
    nullable: bool = False
    description: str = ""
    # numbers and integers
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    # strings
    enum: tuple[str, ...] | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    pattern_reason: str | None = None
    # arrays
    items: Field | None = None
    max_items: int | None = None
    # objects
    props: tuple[Field, ...] | None = None
    checks: tuple[Check, ...] = ()
    build: Callable[[dict[str, Any]], Any] | None = None
    keys: Field | None = None
    values: Field | None = None
    max_properties: int | None = None
    max_bytes: int | None = None

    @property
    def accepts_null(self) -> bool:
        """Whether ``null`` is valid here (optional fields and nullable ones)."""
        return self.nullable or not self.required

    @property
    def object_kind(self) -> Literal["fixed", "map", "free"]:
        if self.props is not None:
            return "fixed"
        if self.values is not None:
            return "map"
        return "free"

    def reason_for_pattern(self) -> str:
        if self.pattern_reason:
            return self.pattern_reason
        return _PATTERN_REASONS.get(self.pattern or "", "has the wrong format")


def fmt_bound(b: float) -> str:
    """``3600000`` rather than ``3600000.0``; ``0.5`` stays ``0.5``."""
    return str(int(b)) if float(b).is_integer() else repr(float(b))


def _key_segment(key: str) -> str:
    """The path segment for a map key: ``v1`` plainly, anything odd as ``['...']``."""
    if 0 < len(key) <= 64 and re.fullmatch(r"[A-Za-z0-9_\-]+", key):
        return key
    return "[" + repr(key[:40]) + "]"


# --------------------------------------------------------------------------- compiling


def compile_field(f: Field, record: str) -> Validator:
    """A function ``value -> normalised value`` that raises :class:`SchemaError`.

    Errors raised by the returned function carry ``record`` and a path relative to the
    field (empty for the field itself); containers prefix it.
    """
    base = _compile_type(f, record)
    if not f.accepts_null:
        return base

    def nullable(v: Any) -> Any:
        if v is None:
            return None
        return base(v)

    return nullable


def _compile_type(f: Field, record: str) -> Validator:
    if f.type == "string":
        return _compile_string(f, record)
    if f.type == "number":
        return _compile_number(f, record)
    if f.type == "integer":
        return _compile_integer(f, record)
    if f.type == "boolean":
        return _compile_boolean(f, record)
    if f.type == "array":
        return _compile_array(f, record)
    if f.type == "object":
        kind = f.object_kind
        if kind == "fixed":
            return compile_object(f, record)
        if kind == "map":
            return _compile_map(f, record)
        return _compile_free(f, record)
    raise ValueError(f"field {f.name!r}: unknown type {f.type!r}")


def _check_unicode(v: str, record: str) -> None:
    """Reject lone surrogates: they cannot be encoded as UTF-8, hence not sent as JSON."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise SchemaError(record, "", v, "not valid Unicode (lone surrogate)") from None


def _compile_string(f: Field, record: str) -> Validator:
    lo = f.min_length or 0
    hi = f.max_length
    if hi is None and f.enum is None:
        raise ValueError(f"string field {f.name!r} needs max_length or enum")
    enum = frozenset(f.enum) if f.enum is not None else None
    enum_reason = "must be one of: " + ", ".join(f.enum) if f.enum is not None else ""
    if f.pattern is not None and not (f.pattern.startswith("^") and f.pattern.endswith("$")):
        raise ValueError(f"pattern of {f.name!r} must be anchored ^...$")
    rx = re.compile(f.pattern) if f.pattern is not None else None
    rx_reason = f.reason_for_pattern()
    short_reason = "must not be empty" if lo == 1 else f"shorter than {lo} characters"

    def check(v: Any) -> str:
        if type(v) is not str:
            if not isinstance(v, str):
                raise SchemaError(record, "", v, "must be a string")
            v = str.__str__(v)  # a str subclass (StrEnum, ...) becomes a plain str
        n = len(v)
        if n < lo:
            raise SchemaError(record, "", v, short_reason)
        if hi is not None and n > hi:
            raise SchemaError(record, "", v, f"longer than {hi} characters")
        if not v.isascii():
            _check_unicode(v, record)
        if enum is not None and v not in enum:
            raise SchemaError(record, "", v, enum_reason)
        if rx is not None and rx.fullmatch(v) is None:
            raise SchemaError(record, "", v, rx_reason)
        return v

    return check


def _bounds_check(f: Field, record: str) -> Callable[[Any, float], None]:
    lo, hi = f.minimum, f.maximum
    xlo, xhi = f.exclusive_minimum, f.exclusive_maximum

    def bounds(raw: Any, x: float) -> None:
        if lo is not None and not x >= lo:
            raise SchemaError(record, "", raw, f"must be >= {fmt_bound(lo)}")
        if xlo is not None and not x > xlo:
            raise SchemaError(record, "", raw, f"must be > {fmt_bound(xlo)}")
        if hi is not None and not x <= hi:
            raise SchemaError(record, "", raw, f"must be <= {fmt_bound(hi)}")
        if xhi is not None and not x < xhi:
            raise SchemaError(record, "", raw, f"must be < {fmt_bound(xhi)}")

    return bounds


def _to_number(v: Any, record: str) -> float:
    """A JSON number, finite, as given (int or float), or SchemaError.

    Ints are kept as ints so that re-encoding a record reproduces the JSON it came from
    (signatures over canonical JSON survive a round trip); only an int beyond 64 bits,
    which orjson cannot encode, becomes a float.
    """
    t = type(v)
    if t is float:
        if not math.isfinite(v):
            raise SchemaError(record, "", v, "not a finite number")
        return v  # type: ignore[no-any-return]
    if t is int:
        if _INT64_MIN <= v <= _UINT64_MAX:
            return v  # type: ignore[no-any-return]
    elif isinstance(v, bool) or not isinstance(v, int | float):
        raise SchemaError(record, "", v, "must be a number")
    elif isinstance(v, int):  # IntEnum and other subclasses
        return _to_number(int(v), record)
    try:
        x = float(v)  # float subclasses (numpy.float64, ...) and very large ints
    except OverflowError:
        raise SchemaError(record, "", v, "not a finite number") from None
    if not math.isfinite(x):
        raise SchemaError(record, "", v, "not a finite number")
    return x


def _compile_number(f: Field, record: str) -> Validator:
    bounds = _bounds_check(f, record)

    def check(v: Any) -> float:
        x = _to_number(v, record)
        bounds(v, x)
        return x

    return check


def _to_int(v: Any, record: str) -> int:
    """A JSON integer (an int, or a float with no fractional part) as int, or SchemaError."""
    if type(v) is int:
        return v
    if isinstance(v, bool):
        raise SchemaError(record, "", v, "must be an integer")
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise SchemaError(record, "", v, "not a finite number")
        if not v.is_integer():
            raise SchemaError(record, "", v, "must be an integer")
        return int(v)
    raise SchemaError(record, "", v, "must be an integer")


def _compile_integer(f: Field, record: str) -> Validator:
    if f.minimum is None and f.exclusive_minimum is None:
        raise ValueError(f"integer field {f.name!r} needs a lower bound")
    if f.maximum is None and f.exclusive_maximum is None:
        raise ValueError(f"integer field {f.name!r} needs an upper bound")
    bounds = _bounds_check(f, record)

    def check(v: Any) -> int:
        x = _to_int(v, record)
        bounds(v, x)
        return x

    return check


def _compile_boolean(f: Field, record: str) -> Validator:
    def check(v: Any) -> bool:
        if v is True or v is False:
            return v
        raise SchemaError(record, "", v, "must be a boolean")

    return check


def _compile_array(f: Field, record: str) -> Validator:
    if f.items is None or f.max_items is None:
        raise ValueError(f"array field {f.name!r} needs items and max_items")
    item = compile_field(f.items, record)
    max_items = f.max_items

    def check(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list | tuple):
            raise SchemaError(record, "", v, "must be an array")
        if len(v) > max_items:
            raise SchemaError(record, "", v, f"more than {max_items} items")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except SchemaError as e:
                raise e.at(f"[{i}]") from None
        return tuple(out)

    return check


def _compile_map(f: Field, record: str) -> Validator:
    assert f.values is not None  # narrowed by object_kind
    if f.max_properties is None:
        raise ValueError(f"map field {f.name!r} needs max_properties")
    key_check = compile_field(f.keys, record) if f.keys is not None else None
    value_check = compile_field(f.values, record)
    max_props = f.max_properties
    quick = _quick_map_check(f)

    def check(v: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise SchemaError(record, "", v, "must be an object")
        if len(v) > max_props:
            raise SchemaError(record, "", v, f"more than {max_props} entries")
        if quick is not None and quick(v):
            return dict(v)
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise SchemaError(record, "", k, "keys must be strings")
            if key_check is not None:
                try:
                    k = key_check(k)
                except SchemaError as e:
                    raise SchemaError(record, "", k, "key " + e.reason).at(
                        _key_segment(k)
                    ) from None
            try:
                out[k] = value_check(x)
            except SchemaError as e:
                raise e.at(_key_segment(k)) from None
        return out

    return check


def _quick_map_check(f: Field) -> Callable[[dict[Any, Any]], bool] | None:
    """For maps of ASCII string keys with a pattern to bounded integers (sketch bins,
    version counts): one pass that says "every entry is certainly valid", or None when
    the map has another shape.

    Why: a window summary's sketch carries ~100 bins, and the detector validates every
    summary it reads; the generic path (two validator calls per entry) cost ~1 µs per bin,
    more than the detectors themselves. When the quick pass says no, the generic path runs
    and names the entry and the reason exactly as before.
    """
    kf, vf = f.keys, f.values
    if (kf is None or vf is None or kf.type != "string" or kf.pattern is None
            or kf.enum is not None or kf.max_length is None or vf.type != "integer"
            or vf.minimum is None or vf.maximum is None
            or vf.exclusive_minimum is not None or vf.exclusive_maximum is not None):
        return None
    match = re.compile(kf.pattern).fullmatch
    klo, khi = kf.min_length or 0, kf.max_length
    vlo, vhi = vf.minimum, vf.maximum

    def quick(v: dict[Any, Any]) -> bool:
        for k, x in v.items():
            if (type(k) is not str or not klo <= len(k) <= khi or not k.isascii()
                    or match(k) is None or type(x) is not int or not vlo <= x <= vhi):
                return False
        return True

    return quick


_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


def _free_value(v: Any, depth: int, record: str) -> Any:
    """A plain-JSON copy of ``v`` (base types only), or SchemaError."""
    if v is None or v is True or v is False:
        return v
    t = type(v)
    if t is str:
        if not v.isascii():
            _check_unicode(v, record)
        return v
    if t is int:
        if not _INT64_MIN <= v <= _UINT64_MAX:
            raise SchemaError(record, "", v, "integer out of 64-bit range")
        return v
    if t is float:
        if not math.isfinite(v):
            raise SchemaError(record, "", v, "not a finite number")
        return v
    if t is dict or t is list or t is tuple:
        if depth >= FREE_MAX_DEPTH:
            raise SchemaError(record, "", v, f"nested deeper than {FREE_MAX_DEPTH} levels")
        if t is dict:
            out: dict[str, Any] = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise SchemaError(record, "", k, "keys must be strings")
                if not k.isascii():
                    _check_unicode(k, record)
                try:
                    out[str.__str__(k)] = _free_value(x, depth + 1, record)
                except SchemaError as e:
                    raise e.at(_key_segment(k)) from None
            return out
        items = []
        for i, x in enumerate(v):
            try:
                items.append(_free_value(x, depth + 1, record))
            except SchemaError as e:
                raise e.at(f"[{i}]") from None
        return items
    # subclasses of the JSON types (StrEnum, IntEnum, numpy.float64, OrderedDict, ...)
    if isinstance(v, str):
        return _free_value(str.__str__(v), depth, record)
    if isinstance(v, int):
        return _free_value(int(v), depth, record)
    if isinstance(v, float):
        return _free_value(float(v), depth, record)
    if isinstance(v, dict):
        return _free_value(dict(v), depth, record)
    if isinstance(v, list | tuple):
        return _free_value(list(v), depth, record)
    raise SchemaError(record, "", v, f"not a JSON value ({type(v).__name__})")


def _compile_free(f: Field, record: str) -> Validator:
    if f.max_bytes is None:
        raise ValueError(f"free-form object {f.name!r} needs max_bytes")
    max_bytes = f.max_bytes

    def check(v: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise SchemaError(record, "", v, "must be an object")
        out = _free_value(v, 0, record)
        size = len(orjson.dumps(out))
        if size > max_bytes:
            raise SchemaError(record, "", v, f"larger than {max_bytes} bytes encoded ({size})")
        return out  # type: ignore[no-any-return]

    return check


def compile_object(f: Field, record: str) -> Validator:
    """Validator for an object with fixed fields (a record, or a nested one).

    Order of checks, so that errors are deterministic: the value is an object; no unknown
    key (the first in input order is reported); each field in spec order (missing
    required, then its own rules); then the cross-field checks in spec order. The
    validated values are passed as keyword arguments to ``f.build`` (default: ``dict``),
    absent optionals as ``None``.
    """
    assert f.props is not None
    props = f.props
    known = frozenset(p.name for p in props)
    if len(known) != len(props):
        raise ValueError(f"object {f.name!r} has duplicate fields")
    plan = [(p.name, p.required, compile_field(p, record)) for p in props]
    checks = f.checks
    build = f.build
    optional = frozenset(p.name for p in props if not p.required)

    def check(v: Any) -> Any:
        if not isinstance(v, dict):
            raise SchemaError(record, "", v, "must be an object")
        if not v.keys() <= known:
            for k in v:
                if k not in known:
                    seg = _key_segment(k) if isinstance(k, str) else "[" + repr(k)[:40] + "]"
                    raise SchemaError(record, seg, v[k], "unknown field")
        values: dict[str, Any] = {}
        for name, required, validate in plan:
            x = v.get(name, MISSING)
            if x is MISSING:
                if required:
                    raise SchemaError(record, name, MISSING, "missing required field")
                values[name] = None
                continue
            try:
                values[name] = validate(x)
            except SchemaError as e:
                raise e.at(name) from None
        for c in checks:
            broken = c.test(values)
            if broken is not None:
                where, reason = (c.field, broken) if isinstance(broken, str) else broken
                raise SchemaError(record, where, values.get(where), reason)
        if build is None:
            # a plain dict in wire shape: absent optionals are left out
            return {k: x for k, x in values.items() if x is not None or k not in optional}
        return build(values)

    return check
