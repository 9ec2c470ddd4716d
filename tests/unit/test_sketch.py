"""models.sketch: DDSketch-compatible bins, relative-accuracy quantiles, merge, count_above."""

from __future__ import annotations

import numpy as np
import pytest
from ddsketch import DDSketch

from models import sketch as sk


@pytest.fixture(scope="module")
def latencies() -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.concatenate([rng.lognormal(3, 1, 20_000), rng.uniform(0.01, 5, 2_000), [0.0] * 7])


def test_bins_are_exactly_ddsketchs(latencies: np.ndarray) -> None:
    dd = DDSketch(0.01)
    for v in latencies:
        dd.add(float(v))
    assert sk.build(latencies) == sk.from_ddsketch(dd)


@pytest.mark.parametrize("accuracy", [0.01, 0.02, 0.05])
def test_quantiles_within_relative_accuracy(latencies: np.ndarray, accuracy: float) -> None:
    s = sk.build(latencies, accuracy)
    for q in (0.1, 0.5, 0.9, 0.99, 0.999):
        exact = float(np.quantile(latencies, q, method="lower"))
        got = sk.quantile(s, q)
        assert got is not None
        assert abs(got - exact) <= accuracy * exact + 1e-12, (q, got, exact)


def test_quantile_matches_ddsketch(latencies: np.ndarray) -> None:
    s = sk.build(latencies)
    dd = sk.to_ddsketch(s)
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert sk.quantile(s, q) == pytest.approx(dd.get_quantile_value(q), rel=1e-12)


def test_merge_equals_build_of_concatenation(latencies: np.ndarray) -> None:
    a, b, c = np.split(latencies[:21_000], 3)
    assert sk.merge(sk.build(a), sk.build(b), sk.build(c)) == sk.build(np.concatenate([a, b, c]))
    assert sk.count(sk.merge(sk.build(a), sk.empty())) == a.size


def test_merge_refuses_other_accuracy() -> None:
    with pytest.raises(sk.SketchError):
        sk.merge(sk.build([1.0]), sk.build([1.0], 0.02))


def test_count_above(latencies: np.ndarray) -> None:
    s = sk.build(latencies)
    for t in (1.0, 20.0, 100.0, 1000.0):
        exact = int((latencies > t).sum())
        got = sk.count_above(s, t)
        # only the one bin holding t is uncertain: its values are not counted
        assert got <= exact
        near = int(((latencies > t) & (latencies <= t * (1 + 0.01) / (1 - 0.01))).sum())
        assert exact - got <= near
    assert sk.count_above(s, -1) == latencies.size
    assert sk.count_above(s, 0) == latencies.size - 7


def test_empty_and_zero_only() -> None:
    assert sk.quantile(sk.empty(), 0.5) is None
    s = sk.build([0.0, 0.0])
    assert s["zero_count"] == 2 and s["bins"] == {}
    assert sk.quantile(s, 0.99) == 0.0


def test_bad_values_are_refused() -> None:
    with pytest.raises(sk.SketchError):
        sk.build([1.0, float("nan")])
    with pytest.raises(sk.SketchError):
        sk.build([-1.0])


def test_wire_shape_is_deterministic() -> None:
    s = sk.build([3.0, 1.0, 200.0, 1.0])
    keys = list(s["bins"])
    assert keys == sorted(keys, key=int)
    assert all(isinstance(c, int) for c in s["bins"].values())
