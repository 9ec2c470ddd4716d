"""The wire contract, field by field.

The tables below are written by hand from the contract (DESIGN.md and the schemas brief),
NOT derived from the specs in schemas/records.py, so a wrong bound in a spec fails here.
For every field of every record: values that must pass, and values that must fail with
the field named and the reason given. A test checks that the tables cover every field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from schemas import (
    RECORD_CLASSES,
    RECORD_TYPES,
    Command,
    DeadLetter,
    Record,
    RequestEvent,
    SchemaError,
    Signature,
    WindowSummary,
    anomaly_id,
    command_id,
    series_key,
    window_id,
)
from schemas.examples import example, minimal
from schemas.jsonschema import iter_errors, load
from schemas.records import parse_request, validate_with_spec

NaN = float("nan")
INF = float("inf")
T = 1_700_000_000.0
HUGE = "x" * 100_000
BY_NAME: dict[str, type[Record]] = {c.NAME: c for c in RECORD_CLASSES}


@dataclass
class Case:
    """Good values, and bad ones as (value, reason substring[, reported path])."""

    good: list[Any]
    bad: list[tuple[Any, ...]]
    optional: bool = False
    kind: str = ""  # "number" / "integer": the normalised type to expect
    extra_bad: list[tuple[Any, ...]] = field(default_factory=list)


WRONG_FOR_STRING = [(5, "must be a string"), (1.5, "must be a string"),
                    (True, "must be a string"), (["a"], "must be a string"),
                    ({"a": 1}, "must be a string")]  # fmt: skip
WRONG_FOR_NUMBER = [("12", "must be a number"), (True, "must be a number"),
                    (False, "must be a number"), ([1], "must be a number"),
                    ({}, "must be a number"), (NaN, "not a finite number"),
                    (INF, "not a finite number"), (-INF, "not a finite number"),
                    (10**400, "not a finite number")]  # fmt: skip
WRONG_FOR_INTEGER = [("1", "must be an integer"), (True, "must be an integer"),
                     (1.5, "must be an integer"), ([1], "must be an integer"),
                     (NaN, "not a finite number"), (INF, "not a finite number")]  # fmt: skip


def _req(bad: list[tuple[Any, ...]], optional: bool, none_reason: str) -> list[tuple[Any, ...]]:
    return bad if optional else [*bad, (None, none_reason)]


def token(hi: int, optional: bool = False) -> Case:
    return Case(
        good=["a", "x" * hi, "svc-1.2_3:a/b@c", "dienst-ü", "服务", "e\u0301"],
        bad=_req([
            ("", "must not be empty"),
            ("x" * (hi + 1), f"longer than {hi} characters"),
            (HUGE, f"longer than {hi} characters"),
            ("a b", "white space or control"),
            (" a", "white space or control"),
            ("a\tb", "white space or control"),
            ("a\nb", "white space or control"),
            ("a\u00a0b", "white space or control"),
            ("a\u3000b", "white space or control"),
            ("a\ufeffb", "white space or control"),
            ("a\x00b", "white space or control"),
            ("a\x7fb", "white space or control"),
            ("a\u0085b", "white space or control"),
            ("a\u2028b", "white space or control"),
            ("a\ud800b", "lone surrogate"),
            *WRONG_FOR_STRING,
        ], optional, "must be a string"),
        optional=optional,
    )  # fmt: skip


def line(hi: int, optional: bool = False) -> Case:
    return Case(
        good=["a", "x" * hi, "GET /api/v1/users/{id}", "ユーザー/設定", "a|b|c", " padded "],
        bad=_req([
            ("", "must not be empty"),
            ("x" * (hi + 1), f"longer than {hi} characters"),
            (HUGE, f"longer than {hi} characters"),
            ("a\nb", "control characters"),
            ("a\rb", "control characters"),
            ("\t", "control characters"),
            ("\x1b[31mred", "control characters"),
            ("a\x7f", "control characters"),
            ("a\u2029", "control characters"),
            ("\udfff", "lone surrogate"),
            *WRONG_FOR_STRING,
        ], optional, "must be a string"),
        optional=optional,
    )  # fmt: skip


def text(hi: int, optional: bool = False) -> Case:
    return Case(
        good=["", "line one\nline two\ttabbed", "x" * hi, "emoji 😀 ok", "\x00 nul is text"],
        bad=_req([
            ("x" * (hi + 1), f"longer than {hi} characters"),
            (HUGE, f"longer than {hi} characters"),
            ("\ud800", "lone surrogate"),
            *WRONG_FOR_STRING,
        ], optional, "must be a string"),
        optional=optional,
    )  # fmt: skip


def enum(values: tuple[str, ...], optional: bool = False) -> Case:
    return Case(
        good=list(values),
        bad=_req([
            ("", "must be one of"),
            (values[0].upper(), "must be one of"),
            (values[0] + " ", "must be one of"),
            ("nonsense", "must be one of"),
            (HUGE, "must be one of"),
            *WRONG_FOR_STRING,
        ], optional, "must be a string"),
        optional=optional,
    )  # fmt: skip


def ts(optional: bool = False) -> Case:
    return Case(
        good=[946_684_800, 946_684_800.0, T, T + 0.123456, 4_102_444_800],
        bad=_req([
            (946_684_799.999, "must be >= 946684800"),
            (0, "must be >= 946684800"),
            (-T, "must be >= 946684800"),
            (4_102_444_800.001, "must be <= 4102444800"),
            (T * 1000, "must be <= 4102444800"),  # milliseconds by mistake
            *WRONG_FOR_NUMBER,
        ], optional, "must be a number"),
        optional=optional,
        kind="number",
    )  # fmt: skip


def count(hi: int = 2**53 - 1, lo: int = 0, optional: bool = False) -> Case:
    return Case(
        good=[lo, lo + 5, 7.0 + lo, hi],
        bad=_req([
            (lo - 1, f"must be >= {lo}"),
            (hi + 1, f"must be <= {hi}"),
            (10**30, f"must be <= {hi}"),
            *WRONG_FOR_INTEGER,
        ], optional, "must be an integer"),
        optional=optional,
        kind="integer",
    )  # fmt: skip


def finite(optional: bool = False) -> Case:
    return Case(
        good=[0, -5.5, 7, 1e300, -1e-300],
        bad=_req(list(WRONG_FOR_NUMBER), optional, "must be a number"),
        optional=optional,
        kind="number",
    )


def nonneg(optional: bool = False) -> Case:
    return Case(
        good=[0, 0.0, 6.4, 1e9],
        bad=_req([(-0.001, "must be >= 0"), (-1, "must be >= 0"), *WRONG_FOR_NUMBER],
                 optional, "must be a number"),
        optional=optional,
        kind="number",
    )  # fmt: skip


def window_s(optional: bool = False) -> Case:
    return Case(
        good=[0.001, 1, 10.0, 3600],
        bad=_req([(0, "must be > 0"), (-1, "must be > 0"), (3600.001, "must be <= 3600"),
                  (86400, "must be <= 3600"), *WRONG_FOR_NUMBER], optional, "must be a number"),
        optional=optional,
        kind="number",
    )  # fmt: skip


def boolean(optional: bool = False) -> Case:
    return Case(
        good=[True, False],
        bad=_req([(0, "must be a boolean"), (1, "must be a boolean"), ("true", "must be a boolean"),
                  ("false", "must be a boolean"), ([], "must be a boolean")],
                 optional, "must be a boolean"),
        optional=optional,
    )  # fmt: skip


def _nested(depth: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for _ in range(depth - 1):
        d = {"a": d}
    return d


def free(optional: bool = False, path: str = "") -> Case:
    return Case(
        good=[{}, {"a": [1, 2.5, None, True, "x", {"b": {}}], "n": -(2**63), "u": 2**64 - 1},
              _nested(32), {"s": "x" * 16_000}],
        bad=_req([
            ("x", "must be an object"),
            ([], "must be an object"),
            (5, "must be an object"),
            ({"a": NaN}, "not a finite number", f"{path}.a"),
            ({"a": [1, INF]}, "not a finite number", f"{path}.a[1]"),
            ({"a": {1, 2}}, "not a JSON value", f"{path}.a"),
            ({"a": b"bytes"}, "not a JSON value", f"{path}.a"),
            ({1: "x"}, "keys must be strings"),
            ({"a": 2**64}, "64-bit range", f"{path}.a"),
            ({"a": "\ud800"}, "lone surrogate", f"{path}.a"),
            ({"s": "x" * 16_400}, "larger than 16384 bytes"),
            ({"k": [{"v": "x" * 100}] * 200}, "larger than 16384 bytes"),
            (_nested(33), "nested deeper than 32 levels", f"{path}.a*"),
        ], optional, "must be an object"),
        optional=optional,
    )  # fmt: skip


def array_of_tokens(hi_items: int, optional: bool = False, path: str = "") -> Case:
    return Case(
        good=[[], ["a", "b"], ["x"] * hi_items, ("a", "b")],
        bad=_req([
            ("a", "must be an array"),
            ({"a": 1}, "must be an array"),
            (["a"] * (hi_items + 1), f"more than {hi_items} items"),
            (["a", "b c"], "white space or control", f"{path}[1]"),
            (["a", 5], "must be a string", f"{path}[1]"),
            (["a", None], "must be a string", f"{path}[1]"),
            (["a", ""], "must not be empty", f"{path}[1]"),
        ], optional, "must be an array"),
        optional=optional,
    )  # fmt: skip


def array_of_lines(hi_items: int, hi_len: int, optional: bool = False, path: str = "") -> Case:
    return Case(
        good=[[], ["a b", "c|d|"], ["x" * hi_len] * 3],
        bad=_req([
            ("a", "must be an array"),
            (["a"] * (hi_items + 1), f"more than {hi_items} items"),
            (["a", "x" * (hi_len + 1)], f"longer than {hi_len}", f"{path}[1]"),
            (["a\nb"], "control characters", f"{path}[0]"),
            ([5], "must be a string", f"{path}[0]"),
        ], optional, "must be an array"),
        optional=optional,
    )  # fmt: skip


def version_map(path: str) -> Case:
    return Case(
        good=[{}, {"v1": 0, "v2": 5}, {f"v{i}": i for i in range(64)}, {"v1": 3.0}],
        bad=[
            ({"v1": -1}, "must be >= 0", f"{path}.v1"),
            ({"v1": 1.5}, "must be an integer", f"{path}.v1"),
            ({"v1": True}, "must be an integer", f"{path}.v1"),
            ({"v1": "3"}, "must be an integer", f"{path}.v1"),
            ({"v1": 2**53}, "must be <=", f"{path}.v1"),
            ({"": 1}, "key must not be empty", f"{path}['']"),
            ({"a b": 1}, "key must not contain white space", f"{path}['a b']"),
            ({"x" * 65: 1}, "key longer than 64 characters", f"{path}['xxx*"),
            ({f"v{i}": 1 for i in range(65)}, "more than 64 entries"),
            ([1], "must be an object"),
            ("v1", "must be an object"),
        ],
        optional=True,
    )


SKETCH_OK = {"relative_accuracy": 0.01, "bins": {"1": 1}, "zero_count": 0}
SIG_OK = {"kid": "k1", "alg": "ed25519", "sig": "AAAA"}

CASES: dict[str, dict[str, Case]] = {
    "request": {
        "ts": ts(),
        "service": token(128),
        "route": line(256),
        "status": Case(
            good=[100, 200, 404, 599, 503.0],
            bad=[
                (99, "must be >= 100"),
                (600, "must be <= 599"),
                (0, "must be >= 100"),
                (-200, "must be >= 100"),
                (200.5, "must be an integer"),
                (None, "must be an integer"),
                *WRONG_FOR_INTEGER,
            ],
            kind="integer",
        ),
        "latency_ms": Case(
            good=[0, 0.0, 0.001, 12.5, 3_600_000, 3_600_000.0],
            bad=[
                (-3.0, "must be >= 0"),
                (-0.0001, "must be >= 0"),
                (3_600_000.5, "must be <= 3600000"),
                (1e12, "must be <= 3600000"),
                (None, "must be a number"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "method": token(16, optional=True),
        "instance": token(128, optional=True),
        "version": token(64, optional=True),
        "region": token(64, optional=True),
        "dependency": token(128, optional=True),
        "error": boolean(optional=True),
    },
    "error": {
        "ts": ts(),
        "service": token(128),
        "error_type": line(128),
        "message": text(4096, optional=True),
        "instance": token(128, optional=True),
        "version": token(64, optional=True),
        "dependency": token(128, optional=True),
    },
    "change": {
        "ts": ts(),
        "service": token(128),
        "change_id": line(128),
        "kind": enum(("deploy", "config")),
        "from_version": token(64),
        "to_version": token(64),
        "author": line(128, optional=True),
        "description": text(4096, optional=True),
    },
    "window": {
        "service": token(128),
        "route": line(256),
        "window_start": ts(),
        "window_s": window_s(),
        "count": Case(  # the example has errors = 3
            good=[3, 120, 5.0, 2**53 - 1],
            bad=[
                (-1, "must be >= 0"),
                (2**53, "must be <="),
                (2, "must be <= count (2)", "errors"),
                (None, "must be an integer"),
                *WRONG_FOR_INTEGER,
            ],
            kind="integer",
        ),
        "errors": Case(  # the example has count = 120
            good=[0, 3, 120, 7.0],
            bad=[
                (-1, "must be >= 0"),
                (121, "must be <= count (120)"),
                (2**53, "must be <="),
                (None, "must be an integer"),
                *WRONG_FOR_INTEGER,
            ],
            kind="integer",
        ),
        "sketch": Case(
            good=[SKETCH_OK, {"relative_accuracy": 0.02, "bins": {}, "zero_count": 5}],
            bad=[
                ("x", "must be an object"),
                (None, "must be an object"),
                ([], "must be an object"),
                (
                    {"relative_accuracy": 0.01, "bins": {}},
                    "missing required field",
                    "sketch.zero_count",
                ),
                ({**SKETCH_OK, "gamma": 1.02}, "unknown field", "sketch.gamma"),
            ],
        ),
        "sketch.relative_accuracy": Case(
            good=[0.0001, 0.01, 0.4999],
            bad=[
                (0, "must be > 0"),
                (-0.01, "must be > 0"),
                (0.5, "must be < 0.5"),
                (1, "must be < 0.5"),
                (None, "must be a number"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "sketch.bins": Case(
            good=[
                {},
                {"0": 1, "-5": 3, "9999999999": 1, "-9999999999": 2},
                {str(i): 1 for i in range(-2048, 2048)},
                {"7": 2.0},
            ],
            bad=[
                ({"01": 1}, "key must be an integer index", "sketch.bins.01"),
                ({"-0": 1}, "key must be", "sketch.bins.-0"),
                ({"1.5": 1}, "key must be", "sketch.bins['1.5']"),
                ({"a": 1}, "key must be", "sketch.bins.a"),
                ({"": 1}, "key must be", "sketch.bins['']"),
                ({" 1": 1}, "key must be", "sketch.bins[' 1']"),
                ({"+1": 1}, "key must be", "sketch.bins['+1']"),
                ({"12345678901": 1}, "key must be", "sketch.bins.12345678901"),
                ({"-123456789012": 1}, "key longer than 11", "sketch.bins.-123456789012"),
                ({"1": 0}, "must be >= 1", "sketch.bins.1"),
                ({"1": -1}, "must be >= 1", "sketch.bins.1"),
                ({"1": 1.5}, "must be an integer", "sketch.bins.1"),
                ({"1": True}, "must be an integer", "sketch.bins.1"),
                ({"1": 2**53}, "must be <=", "sketch.bins.1"),
                ({str(i): 1 for i in range(4097)}, "more than 4096 entries"),
                ([], "must be an object"),
                (None, "must be an object"),
            ],
        ),
        "sketch.zero_count": count(),
        "p50": Case(
            good=[0, 12.1, 1e6],
            bad=[
                (-0.1, "must be >= 0"),
                (None, "must be a number when count > 0"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "p90": Case(
            good=[0, 19.8],
            bad=[
                (-1, "must be >= 0"),
                (None, "must be a number when count > 0"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "p99": Case(
            good=[0, 98.7],
            bad=[
                (-1, "must be >= 0"),
                (None, "must be a number when count > 0"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "dependency": token(128, optional=True),
        "version_counts": version_map("version_counts"),
        "version_errors": version_map("version_errors"),
        "metrics": Case(
            good=[
                {},
                {"cpu": 0.5, "queue_depth": 12, "temp": -3.5},
                {f"m{i}": i for i in range(64)},
                {"x" * 64: 1.0},
            ],
            bad=[
                ({"cpu": NaN}, "not a finite number", "metrics.cpu"),
                ({"cpu": INF}, "not a finite number", "metrics.cpu"),
                ({"cpu": "0.5"}, "must be a number", "metrics.cpu"),
                ({"cpu": True}, "must be a number", "metrics.cpu"),
                ({"cpu": None}, "must be a number", "metrics.cpu"),
                ({"": 1.0}, "key must not be empty", "metrics['']"),
                ({"x" * 65: 1.0}, "key longer than 64", "metrics['xxx*"),
                ({"cpu load": 1.0}, "key must not contain white space", "metrics['cpu load']"),
                ({f"m{i}": 1 for i in range(65)}, "more than 64 entries"),
                ([1.0], "must be an object"),
            ],
            optional=True,
        ),
    },
    "anomaly": {
        "id": line(1024),
        "service": token(128),
        "series": line(512),
        "signal": Case(
            good=[
                "latency",
                "errors",
                "traffic",
                "metric:cpu",
                "metric:queue.depth",
                "metric:" + "x" * 64,
            ],
            bad=[
                ("", "must be latency, errors, traffic or metric:<name>"),
                ("Latency", "must be latency"),
                ("latency ", "must be latency"),
                ("cpu", "must be latency"),
                ("metric:", "must be latency"),
                ("metric:a b", "must be latency"),
                ("metric:" + "x" * 65, "longer than 71"),
                ("errors\n", "must be latency"),
                (HUGE, "longer than"),
                (None, "must be a string"),
                *WRONG_FOR_STRING,
            ],
        ),
        "window_start": ts(),
        "observed": finite(),
        "expected": finite(),
        "score": nonneg(),
        "severity": enum(("minor", "major", "critical")),
        "evidence": free(path="evidence"),
        "route": line(256, optional=True),
        "dependency": token(128, optional=True),
        "window_s": window_s(optional=True),
        "detected_at": ts(optional=True),
    },
    "incident": {
        "id": line(1024),
        "incident_id": line(1024),
        "service": token(128),
        "state": enum(("open", "mitigating", "monitoring", "resolved", "escalated")),
        "entry": enum(
            (
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
        ),
        "at": ts(),
        "reason": text(4096),
        "root_service": token(128, optional=True),
        "services": array_of_tokens(256, optional=True, path="services"),
        "anomaly_ids": array_of_lines(1024, 1024, optional=True, path="anomaly_ids"),
        "suspect_change": free(optional=True, path="suspect_change"),
        "command_id": line(1024, optional=True),
        "details": free(optional=True, path="details"),
        "opened_at": ts(optional=True),
    },
    "command": {
        "id": line(1024),
        "kind": enum(("throttle", "rollback", "isolate", "restore", "shed")),
        "service": token(128),
        "target": line(256),
        "params": free(path="params"),
        "incident_id": line(1024),
        # the example has issued_at = T + 11, expires_at = T + 311
        "issued_at": Case(
            good=[946_684_800, T, T + 310.999],
            bad=[
                (T + 311, "must be > issued_at", "expires_at"),
                (4_102_444_800, "must be > issued_at", "expires_at"),
                (946_684_799, "must be >= 946684800"),
                (4_102_444_801, "must be <= 4102444800"),
                (None, "must be a number"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "expires_at": Case(
            good=[T + 11.001, T + 86_400, 4_102_444_800],
            bad=[
                (T + 11, "must be > issued_at"),
                (T, "must be > issued_at"),
                (946_684_800, "must be > issued_at"),
                (4_102_444_801, "must be <= 4102444800"),
                (None, "must be a number"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "reason": text(4096),
        "signature": Case(
            good=[SIG_OK],
            bad=[
                ("x", "must be an object"),
                (None, "must be an object"),
                ({"kid": "k", "alg": "ed25519"}, "missing required field", "signature.sig"),
                ({**SIG_OK, "extra": 1}, "unknown field", "signature.extra"),
            ],
        ),
        "signature.kid": token(64),
        "signature.alg": enum(("ed25519",)),
        "signature.sig": Case(
            good=["AAAA", "A" * 86 + "==", "ab+/" * 64, "AAA=", "abc/AB=="],
            bad=[
                ("", "shorter than 4"),
                ("AAA", "shorter than 4"),
                ("AAAAA", "base64"),
                ("AA=A", "base64"),
                ("AA-_", "base64"),
                ("AAAA\n", "base64"),
                ("A===", "base64"),
                ("AAAA" * 65, "longer than 256"),
                (HUGE, "longer than 256"),
                (None, "must be a string"),
                *WRONG_FOR_STRING,
            ],
        ),
    },
    "ack": {
        "command_id": line(1024),
        "service": token(128),
        "instance": token(128),
        "status": enum(("applied", "rejected", "failed", "expired")),
        "reason": text(4096),
        "at": ts(),
    },
    "control": {
        "id": line(1024),
        "action": enum(("approve", "pause", "resume", "dry_run_on", "dry_run_off")),
        "at": ts(),
        "target": line(1024, optional=True),
        "operator": line(128, optional=True),
        "reason": text(4096, optional=True),
        # signed like a command (the same signature object)
        "signature": Case(good=[SIG_OK], bad=[("x", "must be an object"),
                                              (None, "must be an object")]),
        "signature.kid": token(64),
        "signature.alg": enum(("ed25519",)),
        "signature.sig": Case(good=["AAAA", "A" * 86 + "=="],
                              bad=[("AAA", "shorter than 4"), ("AA-_", "base64")]),
    },
    "deadletter": {
        "source_topic": line(256),
        "agent": line(128),
        "reason": text(4096),
        "raw": text(8192),
        "at": ts(),
        "partition": count(hi=2**31 - 1, optional=True),
        "offset": count(hi=2**63 - 1, optional=True),
        "key": text(1024, optional=True),
    },
    "label": {
        "scenario": line(128),
        "label_id": line(1024),
        "kind": line(64),
        # the example has onset = T, end = T + 300
        "onset": Case(
            good=[946_684_800, T, T + 300],
            bad=[
                (T + 300.5, "must be >= onset", "end"),
                (0, "must be >= 946684800"),
                (None, "must be a number"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "end": Case(
            good=[T, T + 0.5, 4_102_444_800],
            bad=[
                (T - 0.001, "must be >= onset"),
                (946_684_800, "must be >= onset"),
                (4_102_444_801, "must be <= 4102444800"),
                (None, "must be a number"),
                *WRONG_FOR_NUMBER,
            ],
            kind="number",
        ),
        "affected_series": array_of_lines(1024, 512, path="affected_series"),
        "root_cause": Case(
            good=["deploy-4711", "x" * 4096, "two\nlines"],
            bad=[
                ("", "must not be empty"),
                ("x" * 4097, "longer than 4096"),
                (None, "must be a string"),
                *WRONG_FOR_STRING,
            ],
        ),
        "root_service": token(128, optional=True),
        "details": free(optional=True, path="details"),
    },
}


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = path.split(".")
    target = obj
    for p in parents:
        target = target[p]
    target[last] = value
    return obj


def _get(rec: Any, path: str) -> Any:
    for p in path.split("."):
        rec = rec[p] if isinstance(rec, dict) else getattr(rec, p)
    return rec


def _good_params() -> list[Any]:
    out = []
    for name, fields in CASES.items():
        for path, case in fields.items():
            for i, v in enumerate(case.good):
                out.append(pytest.param(name, path, v, case.kind, id=f"{name}.{path}-good{i}"))
    return out


def _bad_params() -> list[Any]:
    out = []
    for name, fields in CASES.items():
        for path, case in fields.items():
            for i, (v, reason, *where) in enumerate(case.bad):
                out.append(
                    pytest.param(
                        name,
                        path,
                        v,
                        reason,
                        where[0] if where else path,
                        id=f"{name}.{path}-bad{i}",
                    )
                )
    return out


def _optional_params() -> list[Any]:
    return [
        pytest.param(name, path, id=f"{name}.{path}")
        for name, fields in CASES.items()
        for path, case in fields.items()
        if case.optional
    ]


# ------------------------------------------------------------------------- coverage


def _spec_paths(cls: type[Record]) -> dict[str, bool]:
    """Every field path of a record (nested fixed objects too) -> required."""
    out: dict[str, bool] = {}
    for f in cls.SPEC.props or ():
        out[f.name] = f.required
        if f.type == "object" and f.props is not None:
            for sub in f.props:
                out[f"{f.name}.{sub.name}"] = sub.required
    return out


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
def test_tables_cover_every_field_and_pin_required(cls: type[Record]) -> None:
    paths = _spec_paths(cls)
    assert set(CASES[cls.NAME]) == set(paths)
    for path, required in paths.items():
        assert required == (not CASES[cls.NAME][path].optional), path
    assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in cls.SPEC.props or ()]  # type: ignore[arg-type]


def test_record_types_map_every_topic() -> None:
    assert {
        "requests": RequestEvent, "errors": BY_NAME["error"], "changes": BY_NAME["change"],
        "windows": WindowSummary, "anomalies": BY_NAME["anomaly"],
        "incidents": BY_NAME["incident"], "commands": Command, "acks": BY_NAME["ack"],
        "control": BY_NAME["control"], "deadletter": DeadLetter, "labels": BY_NAME["label"],
    } == RECORD_TYPES  # fmt: skip
    for topic, cls in RECORD_TYPES.items():
        assert topic == cls.TOPIC


# ------------------------------------------------------------------------ the tables


def _walker_accepts(name: str, obj: Any) -> bool | None:
    """The JSON Schema file's verdict, or None when obj is not representable as JSON."""
    try:
        as_json = orjson.loads(orjson.dumps(obj))
    except (TypeError, orjson.JSONEncodeError):
        return None
    if as_json != obj or _has_non_finite(obj):
        return None  # tuples, NaN -> null, ...: not the same value once sent as JSON
    return not any(True for _ in iter_errors(load(name), as_json))


def _has_non_finite(v: Any) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, dict):
        return any(_has_non_finite(x) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_has_non_finite(x) for x in v)
    return False


# reasons JSON Schema cannot express (stated in the files' $comment instead)
PYTHON_ONLY = ("larger than", "nested deeper", "must be <= count", "must be > issued_at",
               "must be >= onset", "lone surrogate", "64-bit range")  # fmt: skip


@pytest.mark.parametrize(("name", "path", "value", "kind"), _good_params())
def test_good_value_is_accepted(name: str, path: str, value: Any, kind: str) -> None:
    cls = BY_NAME[name]
    obj = _set(example(name), path, copy.deepcopy(value))
    rec = cls.from_dict(obj)
    got = _get(rec, path)
    if isinstance(got, Signature):
        got = got.to_dict()
    if isinstance(got, tuple):
        assert list(got) == list(value)
    else:
        assert got == value
    if kind == "number":  # kept as given, so re-encoding reproduces the input
        assert type(got) is type(value) and type(got) in (int, float)
    elif kind == "integer":
        assert type(got) is int
    # the record survives the wire unchanged
    assert cls.from_dict(orjson.loads(orjson.dumps(rec.to_dict()))) == rec
    # and the JSON Schema file agrees
    assert _walker_accepts(name, obj) in (True, None)


@pytest.mark.parametrize(("name", "path", "value", "reason", "where"), _bad_params())
def test_bad_value_is_rejected_naming_the_field(
    name: str, path: str, value: Any, reason: str, where: str
) -> None:
    cls = BY_NAME[name]
    obj = _set(example(name), path, copy.deepcopy(value))
    with pytest.raises(SchemaError) as info:
        cls.from_dict(obj)
    e = info.value
    assert e.record == name
    if where.endswith("*"):
        assert e.field.startswith(where[:-1]), str(e)
    else:
        assert e.field == where, str(e)
    assert reason in e.reason, str(e)
    assert str(e).startswith(f"{name}.{where.rstrip('*')}"), str(e)
    assert e.value is None or len(e.value) <= 80
    if not any(p in e.reason for p in PYTHON_ONLY):
        assert _walker_accepts(name, obj) in (False, None), f"JSON Schema accepts: {e}"


@pytest.mark.parametrize(("name", "path"), _optional_params())
def test_optional_field_may_be_absent_or_null(name: str, path: str) -> None:
    cls = BY_NAME[name]
    absent = example(name)
    *parents, last = path.split(".")
    holder = _get(absent, ".".join(parents)) if parents else absent
    del holder[last]
    assert _get(cls.from_dict(absent), path) is None
    assert last not in cls.from_dict(absent).to_dict()
    null = _set(example(name), path, None)
    assert cls.from_dict(null) == cls.from_dict(absent)


# ------------------------------------------------------- whole records, every record


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
def test_example_round_trips(cls: type[Record]) -> None:
    obj = example(cls.NAME)
    rec = cls.from_dict(obj)
    assert type(rec) is cls
    assert rec.to_dict() == obj
    assert cls.from_dict(rec.to_dict()) == rec
    assert cls.from_dict(orjson.loads(orjson.dumps(rec.to_dict()))) == rec
    assert rec.validate() == rec
    small = cls.from_dict(minimal(cls.NAME))
    assert cls.from_dict(small.to_dict()) == small
    assert small.to_dict() == minimal(cls.NAME)


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
def test_records_are_frozen_and_slotted(cls: type[Record]) -> None:
    rec = cls.from_dict(example(cls.NAME))
    first = dataclasses.fields(rec)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(rec, first, None)
    assert not hasattr(rec, "__dict__")


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
def test_unknown_field_is_rejected(cls: type[Record]) -> None:
    obj = example(cls.NAME) | {"bogus": 1}
    with pytest.raises(SchemaError) as info:
        cls.from_dict(obj)
    assert (info.value.record, info.value.field, info.value.reason) == (
        cls.NAME,
        "bogus",
        "unknown field",
    )
    assert str(info.value) == f"{cls.NAME}.bogus: 1: unknown field"


def _required_params() -> list[Any]:
    return [
        pytest.param(cls, f.name, id=f"{cls.NAME}.{f.name}")
        for cls in RECORD_CLASSES
        for f in cls.SPEC.props or ()
        if f.required
    ]


@pytest.mark.parametrize(("cls", "name"), _required_params())
def test_missing_required_field_is_rejected(cls: type[Record], name: str) -> None:
    obj = example(cls.NAME)
    del obj[name]
    with pytest.raises(SchemaError) as info:
        cls.from_dict(obj)
    e = info.value
    assert (e.record, e.field, e.value, e.reason) == (
        cls.NAME,
        name,
        None,
        "missing required field",
    )
    assert str(e) == f"{cls.NAME}.{name}: missing required field"


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
@pytest.mark.parametrize("value", [None, [], "x", 5, 1.5, True, b"{}", [{}]])
def test_non_object_is_rejected(cls: type[Record], value: Any) -> None:
    with pytest.raises(SchemaError) as info:
        cls.from_dict(value)
    assert (info.value.record, info.value.field, info.value.reason) == (
        cls.NAME,
        "",
        "must be an object",
    )


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
def test_input_is_not_mutated_nor_shared(cls: type[Record]) -> None:
    obj = example(cls.NAME)
    before = copy.deepcopy(obj)
    rec = cls.from_dict(obj)
    assert obj == before
    for f in dataclasses.fields(rec):  # type: ignore[arg-type]
        v = getattr(rec, f.name)
        if isinstance(v, dict | list):
            assert v is not obj[f.name], f.name


# ----------------------------------------------------------------- cross-field rules


def test_window_errors_cannot_exceed_count() -> None:
    obj = example("window") | {"count": 5, "errors": 6}
    with pytest.raises(SchemaError) as info:
        WindowSummary.from_dict(obj)
    assert str(info.value) == "window.errors: 6: must be <= count (5)"


def test_window_percentiles_are_null_iff_count_is_zero() -> None:
    empty = example("window") | {"count": 0, "errors": 0, "p50": None, "p90": None, "p99": None}
    rec = WindowSummary.from_dict(empty)
    assert rec.p50 is None and rec.to_dict()["p99"] is None  # required: kept as null
    for p in ("p50", "p90", "p99"):
        with pytest.raises(SchemaError) as info:
            WindowSummary.from_dict(empty | {p: 0.0})
        assert (info.value.field, info.value.reason) == (p, "must be null when count is 0")
        with pytest.raises(SchemaError) as info:
            WindowSummary.from_dict(example("window") | {p: None})
        assert (info.value.field, info.value.reason) == (p, "must be a number when count > 0")
        missing = example("window")
        del missing[p]
        with pytest.raises(SchemaError, match="missing required field"):
            WindowSummary.from_dict(missing)


def test_command_must_expire_after_issue() -> None:
    obj = example("command")
    obj["expires_at"] = obj["issued_at"]
    with pytest.raises(SchemaError) as info:
        Command.from_dict(obj)
    assert info.value.field == "expires_at"
    assert info.value.reason.startswith("must be > issued_at")


def test_label_end_not_before_onset() -> None:
    obj = example("label")
    obj["end"] = obj["onset"] - 1
    with pytest.raises(SchemaError, match=r"^label\.end: .*must be >= onset"):
        BY_NAME["label"].from_dict(obj)


# -------------------------------------------------------------------- record helpers


def test_request_is_error_and_series() -> None:
    base = minimal("request")
    assert not RequestEvent.from_dict(base | {"status": 499}).is_error
    assert RequestEvent.from_dict(base | {"status": 500}).is_error
    assert RequestEvent.from_dict(base | {"status": 200, "error": True}).is_error
    assert not RequestEvent.from_dict(base | {"status": 503, "error": False}).is_error
    assert RequestEvent.from_dict(base).series == "checkout|/api/cart/{id}|"
    assert (
        RequestEvent.from_dict(base | {"dependency": "db"}).series == "checkout|/api/cart/{id}|db"
    )


def test_window_series_and_id() -> None:
    rec = WindowSummary.from_dict(example("window") | {"window_start": 1_700_000_000.1234})
    assert rec.series == "checkout|/api/cart/{id}|payments"
    assert rec.id == "checkout|/api/cart/{id}|payments|1700000000.123"
    assert rec.id == window_id(rec.series, rec.window_start)
    no_dep = minimal("window")
    assert WindowSummary.from_dict(no_dep).series == "checkout|/api/cart/{id}|"
    assert series_key("a", "/r") == "a|/r|" and series_key("a", "/r", "b") == "a|/r|b"
    assert anomaly_id("a|/r|", "latency", 1.0) == "a|/r||latency|1.000"
    assert command_id("inc-1", "rollback", 2) == "inc-1:rollback:2"


def test_window_keeps_sketch_as_plain_wire_dict() -> None:
    rec = WindowSummary.from_dict(example("window") | {"sketch": {
        "relative_accuracy": 0.01, "bins": {"-3": 2.0, "10": 1}, "zero_count": 0}})  # fmt: skip
    assert rec.sketch == {"relative_accuracy": 0.01, "bins": {"-3": 2, "10": 1}, "zero_count": 0}
    assert type(rec.sketch["bins"]["-3"]) is int


def test_command_signature_and_signed_payload() -> None:
    rec = Command.from_dict(example("command"))
    assert rec.signature == Signature(kid="stanch-2024-01", alg="ed25519", sig="A" * 86 + "==")
    payload = rec.signed_payload()
    assert "signature" not in payload
    assert payload == {k: v for k, v in example("command").items() if k != "signature"}
    assert rec.to_dict()["signature"] == example("command")["signature"]
    unsigned = dataclasses.replace(rec, signature=Signature("k2", "ed25519", "QUJD"))
    assert unsigned.signed_payload() == payload


def test_reencoding_reproduces_the_signed_json() -> None:
    # a signer may have used int timestamps: the record must not turn them into floats,
    # or a command re-published from its record would no longer match its signature
    signed = example("command") | {"issued_at": 1_700_000_011, "expires_at": 1_700_000_311}
    signed["params"] = {"fraction": 1, "limit": 2.5}
    rec = Command.from_dict(signed)
    canonical = orjson.dumps(signed, option=orjson.OPT_SORT_KEYS)
    assert orjson.dumps(rec.to_dict(), option=orjson.OPT_SORT_KEYS) == canonical
    assert orjson.dumps(rec.signed_payload(), option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        {k: v for k, v in signed.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS
    )
    req = RequestEvent.from_dict(minimal("request") | {"ts": 1_700_000_000, "latency_ms": 12})
    assert orjson.dumps(req.to_dict()) == orjson.dumps(
        minimal("request") | {"ts": 1_700_000_000, "latency_ms": 12}
    )


def test_numbers_beyond_64_bits_become_floats() -> None:
    rec = BY_NAME["anomaly"].from_dict(example("anomaly") | {"observed": 10**30})
    assert rec.observed == 1e30 and type(rec.observed) is float  # type: ignore[attr-defined]
    orjson.dumps(rec.to_dict())


def test_incident_arrays_become_tuples() -> None:
    rec = BY_NAME["incident"].from_dict(example("incident"))
    assert rec.services == ("checkout", "frontend")  # type: ignore[attr-defined]
    assert rec.to_dict()["services"] == ["checkout", "frontend"]


def test_free_form_is_normalised_copy() -> None:
    evidence = {"t": ("a", 1), "nested": {"k": [1.5]}}
    rec = BY_NAME["anomaly"].from_dict(example("anomaly") | {"evidence": evidence})
    assert rec.evidence == {"t": ["a", 1], "nested": {"k": [1.5]}}  # type: ignore[attr-defined]
    evidence["nested"]["k"].append(2)  # type: ignore[index]
    assert rec.evidence["nested"]["k"] == [1.5]  # type: ignore[attr-defined]


def test_str_enum_and_int_subclasses_are_normalised() -> None:
    import enum

    class Kind(enum.StrEnum):
        DEPLOY = "deploy"

    class Code(enum.IntEnum):
        OK = 200

    rec = BY_NAME["change"].from_dict(example("change") | {"kind": Kind.DEPLOY})
    assert type(rec.kind) is str and rec.kind == "deploy"  # type: ignore[attr-defined]
    req = RequestEvent.from_dict(minimal("request") | {"status": Code.OK})
    assert type(req.status) is int and req.status == 200


# ------------------------------------------------------------------------ SchemaError


def test_schema_error_reads_well_and_pickles() -> None:
    with pytest.raises(SchemaError) as info:
        RequestEvent.from_dict(minimal("request") | {"latency_ms": -3.0})
    e = info.value
    assert str(e) == "request.latency_ms: -3.0: must be >= 0"
    assert (e.record, e.field, e.value, e.reason) == (
        "request",
        "latency_ms",
        "-3.0",
        "must be >= 0",
    )
    assert isinstance(e, ValueError)
    back = pickle.loads(pickle.dumps(e))
    assert (back.record, back.field, back.value, back.reason, str(back)) == (
        e.record,
        e.field,
        e.value,
        e.reason,
        str(e),
    )
    assert e.at("[3]").field == "[3].latency_ms"
    assert str(e.at("[3]")) == "request[3].latency_ms: -3.0: must be >= 0"


def test_schema_error_value_is_truncated() -> None:
    with pytest.raises(SchemaError) as info:
        RequestEvent.from_dict(minimal("request") | {"route": "é" * 1_000_000})
    assert info.value.value is not None and len(info.value.value) <= 80
    assert info.value.value.endswith("...")


def test_nested_error_paths() -> None:
    cmd = example("command")
    cmd["signature"]["kid"] = "a b"
    with pytest.raises(SchemaError) as info:
        Command.from_dict(cmd)
    assert info.value.field == "signature.kid"
    assert str(info.value).startswith("command.signature.kid: 'a b': ")
    inc = example("incident") | {"services": ["ok", "bad one"]}
    with pytest.raises(SchemaError) as info:
        BY_NAME["incident"].from_dict(inc)
    assert info.value.field == "services[1]"
    ev = example("anomaly") | {"evidence": {"a": {"b": [0, NaN]}}}
    with pytest.raises(SchemaError) as info:
        BY_NAME["anomaly"].from_dict(ev)
    assert info.value.field == "evidence.a.b[1]"


# ------------------------------------------------------- fast path == generic path


def _request_cases() -> list[Any]:
    out: list[Any] = []
    for path, case in CASES["request"].items():
        for i, v in enumerate(case.good):
            out.append(pytest.param(_set(example("request"), path, v), id=f"{path}-good{i}"))
        for i, (v, *_rest) in enumerate(case.bad):
            out.append(pytest.param(_set(example("request"), path, v), id=f"{path}-bad{i}"))
        if case.optional:
            obj = minimal("request")
            out.append(pytest.param(obj | {path: None}, id=f"{path}-null"))
    out += [
        pytest.param(minimal("request"), id="minimal"),
        pytest.param(example("request") | {"bogus": 1}, id="unknown"),
        pytest.param({k: v for k, v in example("request").items() if k != "ts"}, id="no-ts"),
        pytest.param(
            {"ts": None, "service": None, "route": None, "status": None, "latency_ms": None},
            id="all-null",
        ),  # fmt: skip
        pytest.param([], id="list"),
        pytest.param(None, id="none"),
        pytest.param({}, id="empty"),
        pytest.param({1: 2, "ts": T}, id="int-key"),
    ]
    return out


def _outcome(fn: Any, obj: Any) -> tuple[str, Any]:
    try:
        rec = fn(obj)
    except SchemaError as e:
        return "error", (e.record, e.field, e.value, e.reason)
    return "ok", (type(rec), rec, rec.to_dict())


@pytest.mark.parametrize("obj", _request_cases())
def test_fast_request_path_matches_generic_validator(obj: Any) -> None:
    fast = _outcome(parse_request, copy.deepcopy(obj))
    slow = _outcome(lambda o: validate_with_spec(RequestEvent, o), copy.deepcopy(obj))
    assert fast == slow
    assert _outcome(RequestEvent.from_dict, copy.deepcopy(obj)) == slow
    if fast[0] == "ok":
        rec = fast[1][1]
        assert type(rec) is RequestEvent
        assert hash(rec) == hash(slow[1][1])
        with pytest.raises(dataclasses.FrozenInstanceError):
            rec.ts = 0.0  # type: ignore[misc]


# ---------------------------------------------------------------------- dead letters


def test_deadletter_make_cuts_and_decodes() -> None:
    raw = b'{"x": "' + "é".encode() * 5000 + b'"}' + b"\xff\xfe"
    dl = DeadLetter.make("stanch.requests", "aggregate", SchemaError("request", "x", 1, "bad"),
                         raw, T, partition=1, offset=2, key=b"checkout\xff")  # fmt: skip
    assert len(dl.raw) <= 8192
    assert dl.raw.startswith('{"x": "éé')
    assert dl.reason == "request.x: 1: bad"
    assert dl.key == "checkout\ufffd"
    assert DeadLetter.from_dict(dl.to_dict()) == dl
    assert dl.validate() == dl
    # a split multi-byte character at the 8 KiB cut becomes U+FFFD, not an error
    cut = DeadLetter.make("t", "a", "r", b"a" + "€".encode() * 5000, T)
    assert cut.raw == "a" + "€" * 2730 + "\ufffd"
    # parsed values (a bad batch element) are encoded as JSON
    el = DeadLetter.make("t", "a", "r", {"ts": NaN, "n": [1, 2]}, T)
    assert el.raw == '{"ts":null,"n":[1,2]}'
    assert DeadLetter.make("t", "a", "r" * 10_000, "x" * 10_000, T).validate().raw == "x" * 8192
