"""Stanch's wire contract: record types, strict validation, codec, JSON Schema files.

    >>> from schemas import RequestEvent, decode_batch
    >>> good, bad = decode_batch(message_bytes, RequestEvent)

Every record type has ``from_dict`` (strict; raises :class:`SchemaError`) and
``to_dict``. ``RECORD_TYPES`` maps logical topic names to record types. The JSON Schema
files under ``schemas/json/`` are generated from the same specs
(``python -m schemas.jsonschema --write``).
"""

from schemas.codec import MAX_BATCH, RECORD_TYPES, decode, decode_batch, dumps, loads
from schemas.errors import SchemaError
from schemas.records import (
    ACK_STATUSES,
    CHANGE_KINDS,
    COMMAND_KINDS,
    CONTROL_ACTIONS,
    INCIDENT_ENTRIES,
    INCIDENT_STATES,
    RECORD_CLASSES,
    SEVERITIES,
    SIGNATURE_ALGS,
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
    Signature,
    WindowSummary,
    anomaly_id,
    command_id,
    parse_request,
    series_key,
    window_id,
)

__all__ = [
    "SchemaError",
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
    "RECORD_TYPES",
    "RECORD_CLASSES",
    "MAX_BATCH",
    "dumps",
    "loads",
    "decode",
    "decode_batch",
    "parse_request",
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
