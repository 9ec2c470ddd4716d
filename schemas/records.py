"""The record types on Stanch's topics: one frozen dataclass per topic.

Each record type is described once, as a tuple of :class:`~schemas.fields.Field` specs
(``_REQUEST_FIELDS`` and friends below). From that description come
``Record.from_dict`` (strict validation, :class:`~schemas.errors.SchemaError` on any
breach), ``Record.to_dict`` (wire shape, optionals that are ``None`` left out) and the
JSON Schema files under ``schemas/json/`` (``python -m schemas.jsonschema --write``).

The one exception to "everything generic" is :func:`parse_request`, the hand-written fast
path for request events (the aggregation agent reads ~200,000 of them a second). It
accepts only inputs it can check completely with cheap tests; anything else, valid or
not, goes to the generic validator, which then decides and names the error. So the fast
path can only be slower than the spec, never more lenient, and the tests check that it
returns exactly what the generic validator returns.

Constructing a record directly (``WindowSummary(...)``) does not validate; producers that
build records by hand can call ``record.validate()`` before publishing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import orjson

from schemas.fields import (
    LINE_PATTERN,
    MAX_SAFE_INT,
    TOKEN_CLASS,
    TOKEN_PATTERN,
    TS_MAX,
    TS_MIN,
    Check,
    Field,
    Validator,
    compile_object,
)

__all__ = [
    "Record",
    "RequestEvent",
    "ErrorEvent",
    "ChangeEvent",
    "WindowSummary",
    "Anomaly",
    "IncidentEvent",
    "Command",
    "Signature",
    "Ack",
    "ControlMessage",
    "DeadLetter",
    "ScenarioLabel",
    "RECORD_CLASSES",
    "parse_request",
    "validate_with_spec",
    "series_key",
    "window_id",
    "anomaly_id",
    "command_id",
    "CHANGE_KINDS",
    "SEVERITIES",
    "INCIDENT_STATES",
    "INCIDENT_ENTRIES",
    "COMMAND_KINDS",
    "ACK_STATUSES",
    "CONTROL_ACTIONS",
    "SIGNATURE_ALGS",
]

# ----------------------------------------------------------------------------- limits
SERVICE_MAX = 128
ROUTE_MAX = 256
ID_MAX = 1024
SERIES_MAX = 512
TEXT_MAX = 4096  # reason, message, description
RAW_MAX = 8192  # dead-letter raw input, in characters (the bytes are cut to 8 KiB first)
KEY_MAX = 1024  # dead-letter Kafka key, decoded
FREE_MAX_BYTES = 16 * 1024  # evidence, details, params, suspect_change
LATENCY_MAX_MS = 3_600_000
WINDOW_MAX_S = 3600
MAX_BINS = 4096
MAX_MAP_KEYS = 64
MAX_SERVICES = 256
MAX_IDS = 1024
MAX_PARTITION = 2**31 - 1
MAX_OFFSET = 2**63 - 1

CHANGE_KINDS = ("deploy", "config")
SEVERITIES = ("minor", "major", "critical")
INCIDENT_STATES = ("open", "mitigating", "monitoring", "resolved", "escalated")
INCIDENT_ENTRIES = (
    "opened",
    "anomaly",
    "suspect",
    "decision",
    "command",
    "ack",
    "restore_step",
    "state",
    "resolved",
    "escalated",
)
COMMAND_KINDS = ("throttle", "rollback", "isolate", "restore", "shed")
ACK_STATUSES = ("applied", "rejected", "failed", "expired")
CONTROL_ACTIONS = ("approve", "pause", "resume", "dry_run_on", "dry_run_off")
SIGNATURE_ALGS = ("ed25519",)

SIGNAL_PATTERN = f"^(?:latency|errors|traffic|metric:{TOKEN_CLASS}{{1,64}})$"
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
BIN_INDEX_PATTERN = "^(?:0|-?[1-9][0-9]{0,9})$"


# ------------------------------------------------------------------- field shorthands
def _token(name: str, hi: int, required: bool = True, desc: str = "") -> Field:
    """A name-like string: 1..hi characters, no white space, no control characters."""
    return Field(
        name,
        "string",
        required,
        min_length=1,
        max_length=hi,
        pattern=TOKEN_PATTERN,
        description=desc,
    )


def _line(name: str, hi: int, required: bool = True, desc: str = "") -> Field:
    """A single-line label: 1..hi characters, no control characters (spaces allowed)."""
    return Field(
        name,
        "string",
        required,
        min_length=1,
        max_length=hi,
        pattern=LINE_PATTERN,
        description=desc,
    )


def _text(name: str, hi: int = TEXT_MAX, required: bool = True, desc: str = "") -> Field:
    """Free text, possibly empty, possibly several lines."""
    return Field(name, "string", required, max_length=hi, description=desc)


def _enum(name: str, values: tuple[str, ...], required: bool = True, desc: str = "") -> Field:
    return Field(name, "string", required, enum=values, description=desc)


def _ts(name: str, required: bool = True, desc: str = "") -> Field:
    return Field(
        name,
        "number",
        required,
        minimum=TS_MIN,
        maximum=TS_MAX,
        description=desc or "Unix epoch seconds (2000-01-01 .. 2100-01-01).",
    )


def _count(name: str, required: bool = True, desc: str = "", lo: int = 0) -> Field:
    return Field(name, "integer", required, minimum=lo, maximum=MAX_SAFE_INT, description=desc)


def _finite(name: str, required: bool = True, desc: str = "") -> Field:
    return Field(name, "number", required, description=desc or "Any finite number.")


def _free(name: str, required: bool = True, desc: str = "") -> Field:
    return Field(
        name,
        "object",
        required,
        max_bytes=FREE_MAX_BYTES,
        description=(desc + " " if desc else "")
        + f"Free-form JSON object; at most {FREE_MAX_BYTES} bytes as compact JSON.",
    )


def _window_s(required: bool = True) -> Field:
    return Field(
        "window_s",
        "number",
        required,
        exclusive_minimum=0,
        maximum=WINDOW_MAX_S,
        description="Window length in seconds.",
    )


_SERVICE = _token("service", SERVICE_MAX, desc="The service the record is about.")


# -------------------------------------------------------------------------- base class
class Record:
    """Base of every record type. Subclasses are frozen, slotted dataclasses."""

    __slots__ = ()

    #: record type name, used in errors and as ``schemas/json/<NAME>.schema.json``
    NAME: ClassVar[str]
    #: logical topic name (``"requests"``); the prefix (``stanch.``) is added by app.topics
    TOPIC: ClassVar[str]
    #: the object spec: ``SPEC.props`` are the record's fields
    SPEC: ClassVar[Field]
    _validate: ClassVar[Validator]
    _to_dict_plan: ClassVar[tuple[tuple[str, bool, int], ...]]

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """Validate ``obj`` (parsed JSON) strictly and return the record.

        Raises SchemaError naming the field, the value and the reason.
        """
        return cls._validate(obj)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        """The wire shape: a JSON-ready dict, optionals that are ``None`` left out."""
        out: dict[str, Any] = {}
        for name, required, kind in self._to_dict_plan:
            v = getattr(self, name)
            if v is None and not required:
                continue
            if kind == _AS_LIST and v is not None:
                v = list(v)
            elif kind == _NESTED and v is not None:
                v = v.to_dict()
            out[name] = v
        return out

    def validate(self) -> Self:
        """Check a record built by hand; returns the normalised record or raises."""
        return type(self).from_dict(self.to_dict())


_PLAIN, _AS_LIST, _NESTED = 0, 1, 2


def _register(
    cls: type[Record],
    name: str,
    topic: str,
    fields: tuple[Field, ...],
    checks: tuple[Check, ...] = (),
    description: str = "",
) -> None:
    """Attach the spec, the compiled validator and the to_dict plan to a record class."""
    dc_names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    spec_names = [f.name for f in fields]
    if dc_names != spec_names:
        raise TypeError(f"{cls.__name__}: dataclass fields {dc_names} != spec {spec_names}")
    cls.NAME = name
    cls.TOPIC = topic
    cls.SPEC = Field(
        name,
        "object",
        props=fields,
        checks=checks,
        build=lambda values: cls(**values),
        description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
    )
    cls._validate = compile_object(cls.SPEC, name)
    cls._to_dict_plan = tuple(
        (
            f.name,
            f.required,
            _AS_LIST if f.type == "array" else _NESTED if f.build is not None else _PLAIN,
        )
        for f in fields
    )


def validate_with_spec(cls: type[Record], obj: object) -> Record:
    """The generic validator of ``cls`` (what ``from_dict`` does, minus any fast path)."""
    return cls._validate(obj)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------ id helpers
def series_key(service: str, route: str, dependency: str | None = None) -> str:
    """``service|route|dependency`` (dependency empty for ingress traffic)."""
    return f"{service}|{route}|{dependency or ''}"


def window_id(series: str, window_start: float) -> str:
    return f"{series}|{window_start:.3f}"


def anomaly_id(series: str, signal: str, window_start: float) -> str:
    return f"{series}|{signal}|{window_start:.3f}"


def command_id(incident_id: str, kind: str, seq: int) -> str:
    return f"{incident_id}:{kind}:{seq}"


# ============================================================================ requests
_REQUEST_FIELDS = (
    _ts("ts", desc="When the request finished, Unix epoch seconds."),
    _SERVICE,
    _line("route", ROUTE_MAX, desc="Route template or operation name."),
    Field("status", "integer", minimum=100, maximum=599, description="HTTP-style status."),
    Field(
        "latency_ms",
        "number",
        minimum=0,
        maximum=LATENCY_MAX_MS,
        description="Duration in milliseconds.",
    ),
    _token("method", 16, required=False),
    _token("instance", SERVICE_MAX, required=False),
    _token("version", 64, required=False),
    _token("region", 64, required=False),
    _token(
        "dependency",
        SERVICE_MAX,
        required=False,
        desc="Set for an egress call from service to this dependency.",
    ),
    Field(
        "error",
        "boolean",
        required=False,
        description="Whether the request failed; when absent, status >= 500 is an error.",
    ),
)


@dataclass(frozen=True, slots=True)
class RequestEvent(Record):
    """One request served (or one egress call made) by a service (topic ``requests``)."""

    ts: float
    service: str
    route: str
    status: int
    latency_ms: float
    method: str | None = None
    instance: str | None = None
    version: str | None = None
    region: str | None = None
    dependency: str | None = None
    error: bool | None = None

    @property
    def is_error(self) -> bool:
        return self.error if self.error is not None else self.status >= 500

    @property
    def series(self) -> str:
        return f"{self.service}|{self.route}|{self.dependency or ''}"

    @classmethod
    def from_dict(cls, obj: object) -> RequestEvent:
        return parse_request(obj)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "ts": self.ts,
            "service": self.service,
            "route": self.route,
            "status": self.status,
            "latency_ms": self.latency_ms,
        }
        if self.method is not None:
            d["method"] = self.method
        if self.instance is not None:
            d["instance"] = self.instance
        if self.version is not None:
            d["version"] = self.version
        if self.region is not None:
            d["region"] = self.region
        if self.dependency is not None:
            d["dependency"] = self.dependency
        if self.error is not None:
            d["error"] = self.error
        return d


_register(RequestEvent, "request", "requests", _REQUEST_FIELDS)


@dataclass(slots=True)
class _MutableRequest(Record):
    """Same slots as RequestEvent, but a plain (fast) ``__init__``.

    A frozen dataclass's ``__init__`` goes through ``object.__setattr__`` once per field,
    which costs more than a microsecond for eleven fields. The fast path builds this twin
    and then switches its class to RequestEvent (same base, same slots in the same order,
    so CPython allows it): the result is an ordinary, frozen, equal RequestEvent.
    """

    ts: float
    service: str
    route: str
    status: int
    latency_ms: float
    method: str | None = None
    instance: str | None = None
    version: str | None = None
    region: str | None = None
    dependency: str | None = None
    error: bool | None = None


assert _MutableRequest.__slots__ == RequestEvent.__slots__  # type: ignore[attr-defined]

_validate_request_generic = RequestEvent._validate

# Strings already known to pass the ASCII fast-lane tests below. Service names, routes,
# versions, regions and instances repeat endlessly, and a set lookup is several times
# cheaper than re-checking every character. Bounded: cleared when full.
_TOKEN_SEEN: set[str] = set()
_LINE_SEEN: set[str] = set()
_SEEN_MAX = 1 << 16


def _token_ok(s: str) -> bool:
    """A 1..128-character ASCII token (printable, no space): surely valid for the spec."""
    if 0 < len(s) <= SERVICE_MAX and s.isascii() and s.isprintable() and " " not in s:
        if len(_TOKEN_SEEN) >= _SEEN_MAX:
            _TOKEN_SEEN.clear()
        _TOKEN_SEEN.add(s)
        return True
    return False


def _line_ok(s: str) -> bool:
    """A 1..256-character ASCII label (printable, spaces allowed): surely a valid route."""
    if 0 < len(s) <= ROUTE_MAX and s.isascii() and s.isprintable():
        if len(_LINE_SEEN) >= _SEEN_MAX:
            _LINE_SEEN.clear()
        _LINE_SEEN.add(s)
        return True
    return False


def parse_request(obj: object) -> RequestEvent:
    """RequestEvent.from_dict, hand-written for the hot path.

    Takes the fast lane only for inputs it fully checks with cheap tests (exact types,
    ASCII strings, no nulls); everything else goes to the generic validator, which has the
    final word and names the error. The rules are therefore exactly the spec's.
    """
    if type(obj) is dict:
        g = obj.get
        ts = g("ts")
        service = g("service")
        route = g("route")
        status = g("status")
        lat = g("latency_ms")
        tt = type(ts)
        tl = type(lat)
        if (
            (tt is float or tt is int)
            and TS_MIN <= ts <= TS_MAX  # type: ignore[operator]
            and type(service) is str
            and (service in _TOKEN_SEEN or _token_ok(service))
            and type(route) is str
            and (route in _LINE_SEEN or _line_ok(route))
            and type(status) is int
            and 100 <= status <= 599
            and (tl is float or tl is int)
            and 0 <= lat <= LATENCY_MAX_MS  # type: ignore[operator]
        ):
            n = len(obj)
            if n == 5:  # the five required keys and nothing else
                r = _MutableRequest(ts, service, route, status, lat)  # type: ignore[arg-type]
                r.__class__ = RequestEvent  # type: ignore[assignment]
                return r  # type: ignore[return-value]
            method = g("method")
            instance = g("instance")
            version = g("version")
            region = g("region")
            dependency = g("dependency")
            error = g("error")
            given = 5
            ok = True
            if method is not None:
                given += 1
                ok = (
                    type(method) is str
                    and len(method) <= 16
                    and (method in _TOKEN_SEEN or _token_ok(method))
                )
            if ok and instance is not None:
                given += 1
                ok = type(instance) is str and (instance in _TOKEN_SEEN or _token_ok(instance))
            if ok and version is not None:
                given += 1
                ok = (
                    type(version) is str
                    and len(version) <= 64
                    and (version in _TOKEN_SEEN or _token_ok(version))
                )
            if ok and region is not None:
                given += 1
                ok = (
                    type(region) is str
                    and len(region) <= 64
                    and (region in _TOKEN_SEEN or _token_ok(region))
                )
            if ok and dependency is not None:
                given += 1
                ok = type(dependency) is str and (
                    dependency in _TOKEN_SEEN or _token_ok(dependency)
                )
            if ok and error is not None:
                given += 1
                ok = error is True or error is False
            # given == n: no unknown key and no explicit null (those take the slow lane)
            if ok and given == n:
                r = _MutableRequest(
                    ts,  # type: ignore[arg-type]
                    service,
                    route,
                    status,
                    lat,  # type: ignore[arg-type]
                    method,
                    instance,
                    version,
                    region,
                    dependency,
                    error,
                )
                r.__class__ = RequestEvent  # type: ignore[assignment]
                return r  # type: ignore[return-value]
    return _validate_request_generic(obj)  # type: ignore[no-any-return]


# ============================================================================== errors
_ERROR_FIELDS = (
    _ts("ts"),
    _SERVICE,
    _line("error_type", 128, desc="Exception class or error code."),
    _text("message", required=False),
    _token("instance", SERVICE_MAX, required=False),
    _token("version", 64, required=False),
    _token("dependency", SERVICE_MAX, required=False),
)


@dataclass(frozen=True, slots=True)
class ErrorEvent(Record):
    """An error not tied to one request: an exception, a crash (topic ``errors``)."""

    ts: float
    service: str
    error_type: str
    message: str | None = None
    instance: str | None = None
    version: str | None = None
    dependency: str | None = None


_register(ErrorEvent, "error", "errors", _ERROR_FIELDS)


# ============================================================================= changes
_CHANGE_FIELDS = (
    _ts("ts"),
    _SERVICE,
    _line("change_id", 128),
    _enum("kind", CHANGE_KINDS),
    _token("from_version", 64),
    _token("to_version", 64),
    _line("author", 128, required=False),
    _text("description", required=False),
)


@dataclass(frozen=True, slots=True)
class ChangeEvent(Record):
    """A deploy or config change: something that can be rolled back (topic ``changes``)."""

    ts: float
    service: str
    change_id: str
    kind: str
    from_version: str
    to_version: str
    author: str | None = None
    description: str | None = None


_register(ChangeEvent, "change", "changes", _CHANGE_FIELDS)


# ============================================================================= windows
_PERCENTILES = ("p50", "p90", "p99")

_SKETCH = Field(
    "sketch",
    "object",
    description=(
        "DDSketch with a logarithmic mapping: bin i holds values v with "
        "gamma^(i-1) < v <= gamma^i, gamma = (1 + a) / (1 - a)."
    ),
    props=(
        Field(
            "relative_accuracy",
            "number",
            exclusive_minimum=0,
            exclusive_maximum=0.5,
            description="a, the relative accuracy of the mapping.",
        ),
        Field(
            "bins",
            "object",
            max_properties=MAX_BINS,
            keys=Field(
                "index",
                "string",
                max_length=11,
                pattern=BIN_INDEX_PATTERN,
                pattern_reason="must be an integer index written in decimal",
            ),
            values=Field("count", "integer", minimum=1, maximum=MAX_SAFE_INT),
            description="Bin index (decimal string) -> count of values in the bin.",
        ),
        _count("zero_count", desc="Count of values equal to zero."),
    ),
)


def _check_errors_le_count(v: Mapping[str, Any]) -> str | None:
    if v["errors"] > v["count"]:
        return f"must be <= count ({v['count']})"
    return None


def _check_percentiles(v: Mapping[str, Any]) -> tuple[str, str] | None:
    empty = v["count"] == 0
    for p in _PERCENTILES:
        if empty and v[p] is not None:
            return p, "must be null when count is 0"
        if not empty and v[p] is None:
            return p, "must be a number when count > 0"
    return None


_WINDOW_CHECKS = (
    Check("errors", "errors <= count", _check_errors_le_count),
    Check(
        "p50",
        "p50, p90 and p99 are null if and only if count is 0",
        _check_percentiles,
        schema={
            "if": {"required": ["count"], "properties": {"count": {"const": 0}}},
            "then": {"properties": {p: {"type": "null"} for p in _PERCENTILES}},
            "else": {"properties": {p: {"type": "number"} for p in _PERCENTILES}},
        },
    ),
)


def _version_map(name: str, desc: str) -> Field:
    return Field(
        name,
        "object",
        required=False,
        max_properties=MAX_MAP_KEYS,
        keys=_token("version", 64),
        values=_count("count"),
        description=desc,
    )


_WINDOW_FIELDS = (
    _SERVICE,
    _line("route", ROUTE_MAX),
    _ts("window_start", desc="Start of the window, Unix epoch seconds."),
    _window_s(),
    _count("count", desc="Requests in the window."),
    _count("errors", desc="Failed requests in the window (<= count)."),
    _SKETCH,
    *(
        Field(
            p,
            "number",
            nullable=True,
            minimum=0,
            description=f"{p} latency in ms from the sketch; null when count is 0.",
        )
        for p in _PERCENTILES
    ),
    _token("dependency", SERVICE_MAX, required=False),
    _version_map("version_counts", "Requests per version."),
    _version_map("version_errors", "Failed requests per version."),
    Field(
        "metrics",
        "object",
        required=False,
        max_properties=MAX_MAP_KEYS,
        keys=Field("name", "string", min_length=1, max_length=64, pattern=TOKEN_PATTERN),
        values=_finite("value"),
        description="Free-form gauges (cpu, queue depth, ...), each detected on its own.",
    ),
)


@dataclass(frozen=True, slots=True)
class WindowSummary(Record):
    """One summary per series per window (topic ``windows``).

    The sketch is kept in its wire shape (a plain dict); models/sketch.py does the math.
    """

    service: str
    route: str
    window_start: float
    window_s: float
    count: int
    errors: int
    sketch: dict[str, Any]
    p50: float | None
    p90: float | None
    p99: float | None
    dependency: str | None = None
    version_counts: dict[str, int] | None = None
    version_errors: dict[str, int] | None = None
    metrics: dict[str, float] | None = None

    @property
    def series(self) -> str:
        return f"{self.service}|{self.route}|{self.dependency or ''}"

    @property
    def id(self) -> str:
        return f"{self.series}|{self.window_start:.3f}"


_register(WindowSummary, "window", "windows", _WINDOW_FIELDS, _WINDOW_CHECKS)


# =========================================================================== anomalies
_ANOMALY_FIELDS = (
    _line("id", ID_MAX, desc="series|signal|window_start (3 decimals): idempotent."),
    _SERVICE,
    _line("series", SERIES_MAX, desc="service|route|dependency"),
    Field(
        "signal",
        "string",
        max_length=6 + 1 + 64,
        pattern=SIGNAL_PATTERN,
        pattern_reason="must be latency, errors, traffic or metric:<name>",
        description="latency | errors | traffic | metric:<NAME>",
    ),
    _ts("window_start"),
    _finite("observed"),
    _finite("expected"),
    Field("score", "number", minimum=0, description="How anomalous; >= 0."),
    _enum("severity", SEVERITIES),
    _free("evidence"),
    _line("route", ROUTE_MAX, required=False),
    _token("dependency", SERVICE_MAX, required=False),
    _window_s(required=False),
    _ts("detected_at", required=False),
)


@dataclass(frozen=True, slots=True)
class Anomaly(Record):
    """An anomaly found on one series, with its evidence (topic ``anomalies``)."""

    id: str
    service: str
    series: str
    signal: str
    window_start: float
    observed: float
    expected: float
    score: float
    severity: str
    evidence: dict[str, Any]
    route: str | None = None
    dependency: str | None = None
    window_s: float | None = None
    detected_at: float | None = None


_register(Anomaly, "anomaly", "anomalies", _ANOMALY_FIELDS)


# =========================================================================== incidents
_INCIDENT_FIELDS = (
    _line("id", ID_MAX, desc="Timeline entry id: idempotent."),
    _line("incident_id", ID_MAX),
    _SERVICE,
    _enum("state", INCIDENT_STATES),
    _enum("entry", INCIDENT_ENTRIES),
    _ts("at"),
    _text("reason"),
    _token("root_service", SERVICE_MAX, required=False),
    Field(
        "services",
        "array",
        required=False,
        items=_token("service", SERVICE_MAX),
        max_items=MAX_SERVICES,
        description="Services affected by the incident.",
    ),
    Field(
        "anomaly_ids",
        "array",
        required=False,
        items=_line("anomaly_id", ID_MAX),
        max_items=MAX_IDS,
    ),
    _free("suspect_change", required=False, desc="The change suspected of causing it."),
    _line("command_id", ID_MAX, required=False),
    _free("details", required=False),
    _ts("opened_at", required=False),
)


@dataclass(frozen=True, slots=True)
class IncidentEvent(Record):
    """One incident lifecycle or timeline entry (topic ``incidents``)."""

    id: str
    incident_id: str
    service: str
    state: str
    entry: str
    at: float
    reason: str
    root_service: str | None = None
    services: tuple[str, ...] | None = None
    anomaly_ids: tuple[str, ...] | None = None
    suspect_change: dict[str, Any] | None = None
    command_id: str | None = None
    details: dict[str, Any] | None = None
    opened_at: float | None = None


_register(IncidentEvent, "incident", "incidents", _INCIDENT_FIELDS)


# ============================================================================ commands
@dataclass(frozen=True, slots=True)
class Signature:
    """Ed25519 signature over the canonical JSON of a command's other fields."""

    kid: str
    alg: str
    sig: str

    def to_dict(self) -> dict[str, str]:
        return {"kid": self.kid, "alg": self.alg, "sig": self.sig}


_SIGNATURE = Field(
    "signature",
    "object",
    props=(
        _token("kid", 64, desc="Key id."),
        _enum("alg", SIGNATURE_ALGS),
        Field(
            "sig",
            "string",
            min_length=4,
            max_length=256,
            pattern=BASE64_PATTERN,
            pattern_reason="must be base64 (standard alphabet, padded)",
            description="The signature, base64.",
        ),
    ),
    build=lambda values: Signature(**values),
    description="Signature over the canonical JSON (sorted keys, no white space) of "
    "every other field.",
)


def _check_expiry(v: Mapping[str, Any]) -> str | None:
    if not v["expires_at"] > v["issued_at"]:
        return f"must be > issued_at ({v['issued_at']!r})"
    return None


_COMMAND_FIELDS = (
    _line("id", ID_MAX, desc="incident_id:kind:seq — idempotent."),
    _enum("kind", COMMAND_KINDS),
    _SERVICE,
    _line("target", ROUTE_MAX, desc='A route, a dependency, a version or "*".'),
    _free("params"),
    _line("incident_id", ID_MAX),
    _ts("issued_at"),
    _ts("expires_at", desc="Must be later than issued_at."),
    _text("reason"),
    _SIGNATURE,
)


@dataclass(frozen=True, slots=True)
class Command(Record):
    """A signed enforcement command for the sidecars of one service (topic ``commands``)."""

    id: str
    kind: str
    service: str
    target: str
    params: dict[str, Any]
    incident_id: str
    issued_at: float
    expires_at: float
    reason: str
    signature: Signature

    def signed_payload(self) -> dict[str, Any]:
        """Every field but the signature, in wire form: what the signature covers.

        Numbers come back as they were decoded (ints stay ints), so for a command read
        from the wire this is the signed payload. schemas.signing canonicalises it.
        """
        d = self.to_dict()
        del d["signature"]
        return d


_register(
    Command,
    "command",
    "commands",
    _COMMAND_FIELDS,
    (Check("expires_at", "expires_at > issued_at", _check_expiry),),
)


# ================================================================================ acks
_ACK_FIELDS = (
    _line("command_id", ID_MAX),
    _SERVICE,
    _token("instance", SERVICE_MAX),
    _enum("status", ACK_STATUSES),
    _text("reason"),
    _ts("at"),
)


@dataclass(frozen=True, slots=True)
class Ack(Record):
    """What one sidecar did with one command (topic ``acks``)."""

    command_id: str
    service: str
    instance: str
    status: str
    reason: str
    at: float


_register(Ack, "ack", "acks", _ACK_FIELDS)


# ============================================================================= control
_CONTROL_FIELDS = (
    _line("id", ID_MAX),
    _enum("action", CONTROL_ACTIONS),
    _ts("at"),
    _line("target", ID_MAX, required=False, desc="A command id, an incident id or a service."),
    _line("operator", 128, required=False),
    _text("reason", required=False),
    _SIGNATURE,
)


@dataclass(frozen=True, slots=True)
class ControlMessage(Record):
    """An operator's instruction: approve, pause/resume, dry-run (topic ``control``),
    signed by an operator key the worker trusts (a key set separate from the mitigation
    key's): unsigned or untrusted control changes nothing."""

    id: str
    action: str
    at: float
    target: str | None = None
    operator: str | None = None
    reason: str | None = None
    #: required on the wire (the schema says so); None only while a CLI builds one
    signature: Signature | None = None

    def signed_payload(self) -> dict[str, Any]:
        """Every field but the signature, in wire form: what the signature covers."""
        d = self.to_dict()
        del d["signature"]
        return d


_register(ControlMessage, "control", "control", _CONTROL_FIELDS)


# ========================================================================== deadletter
_DEADLETTER_FIELDS = (
    _line("source_topic", 256),
    _line("agent", 128),
    _text("reason"),
    _text(
        "raw", RAW_MAX, desc="The offending input, UTF-8 decoded (errors replaced), cut to 8 KiB."
    ),
    _ts("at"),
    Field("partition", "integer", required=False, minimum=0, maximum=MAX_PARTITION),
    Field("offset", "integer", required=False, minimum=0, maximum=MAX_OFFSET),
    _text("key", KEY_MAX, required=False, desc="The message key, UTF-8 decoded."),
)


def _clip_text(data: object, limit: int) -> str:
    """Bytes or anything else as text of at most ``limit`` characters."""
    if isinstance(data, bytes | bytearray | memoryview):
        text = bytes(data[:limit]).decode("utf-8", errors="replace")
    elif isinstance(data, str):
        text = data
    else:
        try:
            text = orjson.dumps(
                data, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY, default=repr
            ).decode("utf-8")
        except Exception:
            text = repr(data)
    text = text[:limit]
    # lone surrogates cannot be sent as JSON
    return text.encode("utf-8", errors="replace").decode("utf-8")


@dataclass(frozen=True, slots=True)
class DeadLetter(Record):
    """Input an agent rejected, with the reason (topic ``deadletter``)."""

    source_topic: str
    agent: str
    reason: str
    raw: str
    at: float
    partition: int | None = None
    offset: int | None = None
    key: str | None = None

    @classmethod
    def make(
        cls,
        source_topic: str,
        agent: str,
        reason: str | BaseException,
        raw: object,
        at: float,
        partition: int | None = None,
        offset: int | None = None,
        key: object = None,
    ) -> DeadLetter:
        """Build a valid dead letter from whatever the agent has at hand.

        ``raw`` may be the message bytes (decoded as UTF-8 with errors replaced, cut to
        8 KiB), a string, or a parsed value (encoded as JSON); ``reason`` may be the
        exception itself. Over-long text is cut to the limits of the record.
        """
        return cls(
            source_topic=source_topic,
            agent=agent,
            reason=_clip_text(str(reason), TEXT_MAX),
            raw=_clip_text(raw, RAW_MAX),
            at=float(at),
            partition=partition,
            offset=offset,
            key=None if key is None else _clip_text(key, KEY_MAX),
        )


_register(DeadLetter, "deadletter", "deadletter", _DEADLETTER_FIELDS)


# ============================================================================== labels
def _check_end(v: Mapping[str, Any]) -> str | None:
    if not v["end"] >= v["onset"]:
        return f"must be >= onset ({v['onset']!r})"
    return None


_LABEL_FIELDS = (
    _line("scenario", 128),
    _line("label_id", ID_MAX),
    _line("kind", 64, desc="What was injected (bad_deploy, dependency_outage, ...)."),
    _ts("onset"),
    _ts("end", desc="Must not be earlier than onset."),
    Field(
        "affected_series",
        "array",
        items=_line("series", SERIES_MAX),
        max_items=MAX_IDS,
        description="Series (service|route|dependency) the injection affects.",
    ),
    Field(
        "root_cause",
        "string",
        min_length=1,
        max_length=TEXT_MAX,
        description="What caused it, in words or as a change id.",
    ),
    _token("root_service", SERVICE_MAX, required=False),
    _free("details", required=False),
)


@dataclass(frozen=True, slots=True)
class ScenarioLabel(Record):
    """The simulator's ground truth: what was injected, where, when (topic ``labels``)."""

    scenario: str
    label_id: str
    kind: str
    onset: float
    end: float
    affected_series: tuple[str, ...]
    root_cause: str
    root_service: str | None = None
    details: dict[str, Any] | None = None


_register(
    ScenarioLabel,
    "label",
    "labels",
    _LABEL_FIELDS,
    (Check("end", "end >= onset", _check_end),),
)


#: Every record class, in topic order.
RECORD_CLASSES: tuple[type[Record], ...] = (
    RequestEvent,
    ErrorEvent,
    ChangeEvent,
    WindowSummary,
    Anomaly,
    IncidentEvent,
    Command,
    Ack,
    ControlMessage,
    DeadLetter,
    ScenarioLabel,
)
