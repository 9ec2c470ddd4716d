"""Read a window's latency sketch (plain dict) without building a sketch object.

The window summary carries a DDSketch-style log-bucketed sketch as a dict:
``{"relative_accuracy": a, "bins": {"idx": count, ...}, "zero_count": n}`` with
``gamma = (1 + a) / (1 - a)`` and bin ``i`` holding values in ``(gamma**(i-1), gamma**i]``.
The latency detector only needs "how many requests were slower than T", so this module
answers that directly from the bins; it keeps models/detectors independent of how
models.sketch builds and merges sketches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _bins(sketch: Mapping[str, Any]) -> tuple[float, list[tuple[int, float]]] | None:
    try:
        a = float(sketch.get("relative_accuracy", 0.01))
        raw = sketch.get("bins") or {}
        if not 0.0 < a < 1.0 or not isinstance(raw, Mapping):
            return None
        bins = [(int(k), float(v)) for k, v in raw.items() if float(v) > 0.0]
    except (TypeError, ValueError, AttributeError):
        return None
    return math.log((1.0 + a) / (1.0 - a)), bins


def count_above(sketch: Mapping[str, Any], threshold: float) -> float | None:
    """Number of values greater than ``threshold`` (the straddling bin is split
    log-linearly). None when the sketch is unusable."""
    parsed = _bins(sketch)
    if parsed is None:
        return None
    log_gamma, bins = parsed
    if threshold <= 0.0:
        return float(sum(c for _, c in bins))
    pos = math.log(threshold) / log_gamma  # threshold sits in bin ceil(pos)
    total = 0.0
    for idx, c in bins:
        lower = idx - 1  # bin covers (lower, idx] in units of log_gamma
        if lower >= pos:
            total += c
        elif idx > pos:
            total += c * (idx - pos)
    return total


def total_count(sketch: Mapping[str, Any]) -> float | None:
    """Values in the sketch (zero bucket included)."""
    parsed = _bins(sketch)
    if parsed is None:
        return None
    try:
        zero = float(sketch.get("zero_count", 0) or 0)
    except (TypeError, ValueError):
        zero = 0.0
    return zero + sum(c for _, c in parsed[1])
