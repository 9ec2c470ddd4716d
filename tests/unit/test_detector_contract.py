"""River-style contract suite: every detector (and the series bundle) must pass it."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
from river import stats

from models.detectors import ErrorRateDetector, LatencyDetector, MetricDetector, TrafficDetector
from models.detectors.base import Detector, binomial_surprise, ew_update, normal_surprise
from models.series import DetectorConfig, SeriesDetector, state_size_bytes

GAMMA = (1 + 0.01) / (1 - 0.01)


def window(rng: np.random.Generator, t: float, *, rate: float = 40.0, median: float = 20.0,
           err: float = 0.01) -> dict:
    """One synthetic window summary shaped like DESIGN.md's."""
    n = int(rng.poisson(rate))
    lat = median * np.exp(0.3 * rng.standard_normal(n))
    idx, cnt = np.unique(np.ceil(np.log(lat) / math.log(GAMMA)).astype(int), return_counts=True)
    p50, p90, p99 = (np.percentile(lat, [50, 90, 99]) if n else (0.0, 0.0, 0.0))
    return {
        "service": "svc", "route": "/r", "window_start": t, "window_s": 1.0,
        "count": n, "errors": int(rng.binomial(n, err)) if n else 0,
        "p50": float(p50), "p90": float(p90), "p99": float(p99),
        "sketch": {"relative_accuracy": 0.01, "zero_count": 0,
                   "bins": {str(i): int(c) for i, c in zip(idx, cnt, strict=True)}},
        "version_counts": {"v1": n},
        "metrics": {"cpu": float(50 + 5 * rng.standard_normal())},
    }


def stream(seed: int, n: int = 300) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [window(rng, 1_700_000_000.0 + i) for i in range(n)]


DETECTORS = [
    pytest.param(LatencyDetector, id="latency"),
    pytest.param(ErrorRateDetector, id="errors"),
    pytest.param(TrafficDetector, id="traffic"),
    pytest.param(lambda: MetricDetector(name="cpu"), id="metric"),
]


def run(det: Detector, windows: list[dict]) -> list[float]:
    out = []
    for w in windows:
        out.append(det.score_one(w))
        det.learn_one(w)
    return out


@pytest.mark.parametrize("make", DETECTORS)
def test_pickle_round_trip_gives_identical_scores(make) -> None:
    windows = stream(1)
    det = make()
    run(det, windows[:200])
    clone = pickle.loads(pickle.dumps(det))
    restored = make()
    restored.from_state(det.to_state())
    assert run(clone, windows[200:]) == run(det, windows[200:]) == run(restored, windows[200:])


@pytest.mark.parametrize("make", DETECTORS)
def test_no_input_mutation_and_deterministic(make) -> None:
    windows = stream(2, 150)
    before = copy.deepcopy(windows)
    assert run(make(), windows) == run(make(), windows)
    assert windows == before


@pytest.mark.parametrize("make", DETECTORS)
def test_missing_and_bad_fields_tolerated(make) -> None:
    det = make()
    run(det, stream(3, 50))
    for bad in ({}, {"count": None}, {"count": "x", "p99": float("nan"), "metrics": None},
                {"count": -3, "errors": 5, "sketch": {"bins": "junk"}, "window_start": "x"},
                {"metrics": {"cpu": "high"}, "sketch": {"relative_accuracy": 2}}):
        s = det.score_one(bad)
        assert math.isfinite(s) and s >= 0.0
        det.learn_one(bad)
    assert all(math.isfinite(s) and s >= 0.0 for s in run(det, stream(4, 50)))


@pytest.mark.parametrize("make", DETECTORS)
def test_scores_finite_and_non_negative_and_state_is_numbers(make) -> None:
    det = make()
    scores = run(det, stream(5, 200))
    assert all(math.isfinite(s) and s >= 0.0 for s in scores)
    # numbers only (counts may be ints: they keep the series state inside its budget)
    assert all(isinstance(v, int | float) and not isinstance(v, bool)
               for v in det.to_state())
    with pytest.raises(ValueError):
        det.from_state((1.0, 2.0))


def test_warm_up_yields_no_finding_even_on_extreme_windows() -> None:
    det = SeriesDetector("svc|/r|", DetectorConfig(warmup_windows=50))
    rng = np.random.default_rng(6)
    for i in range(40):
        w = window(rng, 1_700_000_000.0 + i, median=20.0 if i < 30 else 500.0,
                   err=0.01 if i < 30 else 0.9)
        assert det.update(w) == []


def test_series_pickle_round_trip_and_budget() -> None:
    windows = stream(7, 400)
    det = SeriesDetector("svc|/r|")
    for w in windows[:300]:
        det.update(w)
    clone = pickle.loads(pickle.dumps(det))
    restored = SeriesDetector.restore("svc|/r|", det.to_state())
    for w in windows[300:]:
        a, b, c = det.update(w), clone.update(w), restored.update(w)
        assert a == b == c
        assert det.last_scores == clone.last_scores == restored.last_scores
    assert state_size_bytes(det) <= 2048


def test_ew_recurrence_matches_river() -> None:
    mean_r, var_r = stats.EWMean(0.1), stats.EWVar(0.1)
    xs = [5.0, 1.0, 3.0, 8.0, 2.5, 9.0]
    mean, var = xs[0], 0.0
    mean_r.update(xs[0])
    var_r.update(xs[0])
    for x in xs[1:]:
        mean, var = ew_update(mean, var, x, 0.1)
        mean_r.update(x)
        var_r.update(x)
        assert mean == pytest.approx(mean_r.get()) and var == pytest.approx(var_r.get())


def test_tail_helpers() -> None:
    # exact binomial: P(X >= 2 | n=3, p=0.5) = 0.5
    assert binomial_surprise(2, 3, 0.5) == pytest.approx(-math.log10(0.5))
    assert binomial_surprise(1, 10, 0.5) == 0.0
    assert normal_surprise(0.0) == pytest.approx(-math.log10(0.5))
    assert normal_surprise(40.0) > normal_surprise(20.0) > 80
