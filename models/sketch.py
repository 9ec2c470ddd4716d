"""Latency sketches: DDSketch's logarithmic mapping, built from numpy arrays in one pass.

Why not ``ddsketch.DDSketch.add`` per value? It costs about a microsecond per call, and the
aggregation agent must spend a few microseconds per *event* in total. Here the bin index of
every latency of a (series, window) group is computed at once with numpy, using the same
mapping as ``ddsketch.mapping.LogarithmicMapping`` (``key(v) = ceil(log2(v) * m)`` with
``m = ln 2 / ln gamma``, ``gamma = (1 + a) / (1 - a)``), so bin ``i`` holds the values in
``(gamma**(i-1), gamma**i]`` and a sketch built here merges with one built by ddsketch
(:func:`to_ddsketch` / :func:`from_ddsketch` convert; a unit test checks the bins agree).

A sketch is kept in its wire shape (the window summary's ``sketch`` field)::

    {"relative_accuracy": 0.01, "bins": {"137": 12, "138": 40}, "zero_count": 0}

Bin keys are decimal strings in ascending numeric order, so the JSON encoding is
deterministic (a replayed window is byte-identical). Quantiles follow ddsketch's rank rule
(``rank = q * (count - 1)``, the value of a bin is ``2 * gamma**i / (1 + gamma)``), which is
within ``a`` relative error of the exact quantile of the values added.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

DEFAULT_RELATIVE_ACCURACY = 0.01

Sketch = dict[str, Any]


class SketchError(ValueError):
    """Two sketches that cannot be merged, or a sketch that is not in wire shape."""


def _mapping(relative_accuracy: float) -> tuple[float, float, float]:
    """(gamma, multiplier, min_possible) exactly as ddsketch's LogarithmicMapping has them."""
    if not 0.0 < relative_accuracy < 1.0:
        raise SketchError(f"relative_accuracy {relative_accuracy!r}: must be in (0, 1)")
    mantissa = 2 * relative_accuracy / (1 - relative_accuracy)
    gamma = 1 + mantissa
    multiplier = (1 / math.log1p(mantissa)) * math.log(2)
    return gamma, multiplier, sys.float_info.min * gamma


def empty(relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> Sketch:
    """A sketch with no values."""
    _mapping(relative_accuracy)
    return {"relative_accuracy": relative_accuracy, "bins": {}, "zero_count": 0}


def bin_counts(values: np.ndarray, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """(bin indices ascending, their counts, zero count) of non-negative ``values``."""
    _, multiplier, min_possible = _mapping(relative_accuracy)
    v = np.asarray(values, dtype=np.float64)
    positive = v > min_possible
    zero_count = int(v.size - np.count_nonzero(positive))
    if zero_count == v.size:
        return np.empty(0, np.int64), np.empty(0, np.int64), zero_count
    pos = v[positive] if zero_count else v
    # ddsketch: int(math.ceil(math.log(value, 2) * multiplier)); math.log(v, 2) is
    # ln(v) / ln(2), which np.log reproduces (np.log2 may differ in the last ulp).
    keys = np.ceil(np.log(pos) / math.log(2) * multiplier).astype(np.int64)
    idx, counts = np.unique(keys, return_counts=True)
    return idx, counts, zero_count


def build(values: np.ndarray | Iterable[float],
          relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> Sketch:
    """A wire-shape sketch of ``values`` (latencies in ms, all >= 0), vectorised."""
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values),
                     dtype=np.float64)
    if arr.size and (not np.isfinite(arr).all() or (arr < 0).any()):
        raise SketchError("values must be finite and >= 0")
    idx, counts, zero = bin_counts(arr, relative_accuracy)
    return {
        "relative_accuracy": relative_accuracy,
        "bins": {str(i): c for i, c in zip(idx.tolist(), counts.tolist(), strict=True)},
        "zero_count": zero,
    }


def _bins_of(sketch: Mapping[str, Any]) -> dict[int, int]:
    try:
        return {int(k): int(c) for k, c in sketch["bins"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SketchError(f"not a sketch in wire shape: {exc}") from exc


def merge(*sketches: Mapping[str, Any]) -> Sketch:
    """The sketch of the union of the values of ``sketches`` (same relative accuracy)."""
    if not sketches:
        return empty()
    accuracy = float(sketches[0]["relative_accuracy"])
    total: dict[int, int] = {}
    zero = 0
    for s in sketches:
        if float(s["relative_accuracy"]) != accuracy:
            raise SketchError(
                f"cannot merge sketches of relative accuracy {accuracy} and "
                f"{s['relative_accuracy']}"
            )
        for i, c in _bins_of(s).items():
            total[i] = total.get(i, 0) + c
        zero += int(s.get("zero_count", 0))
    return {
        "relative_accuracy": accuracy,
        "bins": {str(i): total[i] for i in sorted(total)},
        "zero_count": zero,
    }


def count(sketch: Mapping[str, Any]) -> int:
    """Values in the sketch, zero bucket included."""
    return int(sketch.get("zero_count", 0)) + sum(_bins_of(sketch).values())


def bin_value(index: int, relative_accuracy: float) -> float:
    """The value ddsketch reports for bin ``index`` (within ``a`` of every value in it)."""
    gamma, multiplier, _ = _mapping(relative_accuracy)
    return math.pow(2.0, index / multiplier) * (2.0 / (1 + gamma))


def quantiles(sketch: Mapping[str, Any], qs: Iterable[float]) -> list[float | None]:
    """Values at the quantiles ``qs`` (each in [0, 1]); None for an empty sketch."""
    accuracy = float(sketch["relative_accuracy"])
    bins = sorted(_bins_of(sketch).items())
    zero = int(sketch.get("zero_count", 0))
    n = zero + sum(c for _, c in bins)
    out: list[float | None] = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise SketchError(f"quantile {q!r}: must be in [0, 1]")
        if n == 0:
            out.append(None)
            continue
        rank = q * (n - 1)
        if rank < zero:
            out.append(0.0)
            continue
        running = zero
        key = bins[-1][0]
        for i, c in bins:
            running += c
            if running > rank:
                key = i
                break
        out.append(bin_value(key, accuracy))
    return out


def quantile(sketch: Mapping[str, Any], q: float) -> float | None:
    """Value at quantile ``q``; None for an empty sketch."""
    return quantiles(sketch, (q,))[0]


def count_above(sketch: Mapping[str, Any], threshold: float) -> int:
    """Values certainly greater than ``threshold``: whole bins whose lower edge is at or
    above it (a value in the bin holding ``threshold`` is not counted)."""
    accuracy = float(sketch["relative_accuracy"])
    bins = _bins_of(sketch)
    if threshold < 0:
        return count(sketch)
    if threshold == 0:
        return sum(bins.values())
    _, multiplier, _ = _mapping(accuracy)
    threshold_key = math.ceil(math.log(threshold, 2) * multiplier)
    return sum(c for i, c in bins.items() if i > threshold_key)


def to_ddsketch(sketch: Mapping[str, Any]) -> Any:
    """A ``ddsketch.DDSketch`` holding the same bins (for interoperability and tests)."""
    from ddsketch import DDSketch

    accuracy = float(sketch["relative_accuracy"])
    dd = DDSketch(accuracy)
    for i, c in sorted(_bins_of(sketch).items()):
        dd.add(bin_value(i, accuracy), float(c))
    zero = int(sketch.get("zero_count", 0))
    if zero:
        dd.add(0.0, float(zero))
    return dd


def from_ddsketch(dd: Any) -> Sketch:
    """The wire shape of a ``ddsketch.DDSketch`` (positive store and zero count)."""
    store = dd._store  # ddsketch keeps bins in a DenseStore: offset + list of counts
    bins = {
        str(store.offset + pos): int(c) for pos, c in enumerate(store.bins) if c
    }
    return {
        "relative_accuracy": float(dd._mapping.relative_accuracy),
        "bins": dict(sorted(bins.items(), key=lambda kv: int(kv[0]))),
        "zero_count": int(dd._zero_count),
    }
