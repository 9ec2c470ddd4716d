"""One valid example of every record type, in wire shape (for docs and tests).

``example(name)`` returns a fresh deep copy, so callers may mutate it::

    >>> from schemas.examples import example
    >>> bad = example("request") | {"latency_ms": -1}

Every example is complete: it sets every optional field too, so that tests which drop or
alter one field at a time reach all of them.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["EXAMPLES", "example", "minimal"]

_T = 1_700_000_000.0

EXAMPLES: dict[str, dict[str, Any]] = {
    "request": {
        "ts": _T + 0.125,
        "service": "checkout",
        "route": "/api/cart/{id}",
        "status": 200,
        "latency_ms": 12.5,
        "method": "GET",
        "instance": "checkout-7f9c-1",
        "version": "v1.4.2",
        "region": "eu-west-1",
        "dependency": "payments",
        "error": False,
    },
    "error": {
        "ts": _T,
        "service": "checkout",
        "error_type": "TimeoutError",
        "message": "upstream payments timed out after 2000 ms\nretrying",
        "instance": "checkout-7f9c-1",
        "version": "v1.4.2",
        "dependency": "payments",
    },
    "change": {
        "ts": _T,
        "service": "checkout",
        "change_id": "deploy-4711",
        "kind": "deploy",
        "from_version": "v1.4.1",
        "to_version": "v1.4.2",
        "author": "ci-bot",
        "description": "bump cart cache TTL",
    },
    "window": {
        "service": "checkout",
        "route": "/api/cart/{id}",
        "window_start": _T,
        "window_s": 10.0,
        "count": 120,
        "errors": 3,
        "sketch": {
            "relative_accuracy": 0.01,
            "bins": {"-3": 1, "0": 2, "125": 100, "230": 16},
            "zero_count": 1,
        },
        "p50": 12.1,
        "p90": 19.8,
        "p99": 98.7,
        "dependency": "payments",
        "version_counts": {"v1.4.1": 20, "v1.4.2": 100},
        "version_errors": {"v1.4.1": 0, "v1.4.2": 3},
        "metrics": {"cpu": 0.72, "queue_depth": 14.0},
    },
    "anomaly": {
        "id": f"checkout|/api/cart/{{id}}|payments|latency|{_T:.3f}",
        "service": "checkout",
        "series": "checkout|/api/cart/{id}|payments",
        "signal": "latency",
        "window_start": _T,
        "observed": 98.7,
        "expected": 21.0,
        "score": 6.4,
        "severity": "major",
        "evidence": {"p99": 98.7, "baseline_p99": 21.0, "z": 6.4, "versions": ["v1.4.2"]},
        "route": "/api/cart/{id}",
        "dependency": "payments",
        "window_s": 10.0,
        "detected_at": _T + 10.5,
    },
    "incident": {
        "id": "inc-checkout-1700000000:suspect:1",
        "incident_id": "inc-checkout-1700000000",
        "service": "checkout",
        "state": "mitigating",
        "entry": "suspect",
        "at": _T + 11.0,
        "reason": "latency of checkout rose 4.7x right after deploy-4711",
        "root_service": "checkout",
        "services": ["checkout", "frontend"],
        "anomaly_ids": [f"checkout|/api/cart/{{id}}|payments|latency|{_T:.3f}"],
        "suspect_change": {"change_id": "deploy-4711", "to_version": "v1.4.2", "score": 0.9},
        "command_id": "inc-checkout-1700000000:rollback:1",
        "details": {"note": "first bad window 10 s after the deploy"},
        "opened_at": _T + 10.6,
    },
    "command": {
        "id": "inc-checkout-1700000000:rollback:1",
        "kind": "rollback",
        "service": "checkout",
        "target": "v1.4.2",
        "params": {"to_version": "v1.4.1", "fraction": 1.0},
        "incident_id": "inc-checkout-1700000000",
        "issued_at": _T + 11.0,
        "expires_at": _T + 311.0,
        "reason": "roll back deploy-4711: p99 latency 4.7x baseline",
        "signature": {
            "kid": "stanch-2024-01",
            "alg": "ed25519",
            "sig": "A" * 86 + "==",
        },
    },
    "ack": {
        "command_id": "inc-checkout-1700000000:rollback:1",
        "service": "checkout",
        "instance": "checkout-7f9c-1",
        "status": "applied",
        "reason": "",
        "at": _T + 11.2,
    },
    "control": {
        "id": "ctl-0001",
        "action": "approve",
        "at": _T + 12.0,
        "target": "inc-checkout-1700000000:rollback:1",
        "operator": "alice",
        "reason": "looks right",
        "signature": {
            "kid": "op-alice",
            "alg": "ed25519",
            "sig": "A" * 86 + "==",
        },
    },
    "deadletter": {
        "source_topic": "stanch.requests",
        "agent": "aggregate",
        "reason": "request.latency_ms: -3.0: must be >= 0",
        "raw": '{"ts":1700000000,"service":"checkout","latency_ms":-3}',
        "at": _T + 1.0,
        "partition": 3,
        "offset": 123456,
        "key": "checkout",
    },
    "label": {
        "scenario": "bad_deploy",
        "label_id": "bad_deploy-1",
        "kind": "bad_deploy",
        "onset": _T,
        "end": _T + 300.0,
        "affected_series": ["checkout|/api/cart/{id}|", "frontend|/cart|checkout"],
        "root_cause": "deploy-4711",
        "root_service": "checkout",
        "details": {"latency_factor": 5.0},
    },
}


def example(name: str) -> dict[str, Any]:
    """A fresh, complete, valid example of record type ``name`` (``"request"``, ...)."""
    return copy.deepcopy(EXAMPLES[name])


def minimal(name: str) -> dict[str, Any]:
    """The example reduced to its required fields."""
    from schemas.records import RECORD_CLASSES

    cls = next(c for c in RECORD_CLASSES if name == c.NAME)
    required = {f.name for f in cls.SPEC.props or () if f.required}
    return {k: v for k, v in example(name).items() if k in required}
