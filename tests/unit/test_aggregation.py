"""models.aggregation: tumbling windows, watermark + grace, late, clock skew, idle flush,
pre-aggregated summaries, determinism."""

from __future__ import annotations

import random

import orjson
import pytest

from models import sketch as sk
from models.aggregation import (
    CLOCK_SKEW,
    ERROR_ROUTE,
    LATE,
    PartitionProgress,
    WindowAggregator,
    window_id_of,
)
from schemas.records import ErrorEvent, RequestEvent, WindowSummary

T0 = 1_700_000_000.0
NOW = T0 + 100


def req(ts: float, latency: float = 10.0, status: int = 200, service: str = "s",
        route: str = "/r", **kw: object) -> RequestEvent:
    return RequestEvent.from_dict({"ts": ts, "service": service, "route": route,
                                   "status": status, "latency_ms": latency, **kw})


def test_windows_count_errors_quantiles_versions() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=2.0)
    events = [req(T0 + 0.1 * i, latency=float(i + 1), status=500 if i % 5 == 0 else 200,
                  version="v2" if i < 3 else "v1") for i in range(10)]
    events.append(req(T0 + 0.5, dependency="db", latency=7.0))
    res = agg.add_batch(0, events, NOW)
    assert res.rejects == [] and res.max_k == int(T0)
    assert agg.close_ready(0) == []  # watermark T0 + 0.9 - 2 has not passed T0 + 1
    agg.add_batch(0, [req(T0 + 3.0)], NOW)
    out = agg.close_ready(0)
    assert [window_id_of(w) for w in out] == [f"s|/r||{T0:.3f}", f"s|/r|db|{T0:.3f}"]
    w = out[0]
    assert w["count"] == 10 and w["errors"] == 2
    assert w["version_counts"] == {"v1": 7, "v2": 3}
    assert w["version_errors"] == {"v1": 1, "v2": 1}
    assert w["p50"] == pytest.approx(5.0, rel=0.01) and w["p99"] == pytest.approx(9.0, rel=0.01)
    assert sk.count(w["sketch"]) == 10
    assert out[1]["dependency"] == "db" and out[1]["count"] == 1
    for summary in out:
        assert WindowSummary.from_dict(summary).to_dict() == summary


def test_grace_merges_late_within_and_rejects_beyond() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=2.0)
    agg.add_batch(0, [req(T0 + 0.5), req(T0 + 2.5)], NOW)
    # watermark T0 + 0.5: window T0 still open, an out-of-order event joins it
    assert agg.add_batch(0, [req(T0 + 0.9)], NOW).rejects == []
    agg.add_batch(0, [req(T0 + 3.5)], NOW)  # watermark T0 + 1.5 closes window T0
    closed = agg.close_ready(0)
    assert [w["count"] for w in closed] == [2]
    res = agg.add_batch(0, [req(T0 + 0.7), req(T0 + 3.6)], NOW)
    assert [r.reason for r in res.rejects] == [LATE]
    assert res.max_k == int(T0) + 3


def test_clock_skew_is_rejected_and_does_not_move_the_watermark() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=2.0, max_clock_skew_s=60)
    res = agg.add_batch(0, [req(NOW + 61), req(T0)], NOW)
    assert [r.reason for r in res.rejects] == [CLOCK_SKEW]
    assert agg.watermark(0) == T0 - 2.0
    assert res.max_k == int(T0)


def test_idle_flush_closes_only_windows_finished_before_now_minus_grace() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=2.0)
    agg.add_batch(0, [req(T0 + 0.5), req(T0 + 1.5), req(T0 + 2.5)], NOW)
    assert agg.close_ready(0) == []
    out = agg.close_idle(0, now=T0 + 4.2)  # windows ending <= T0 + 2.2: T0 and T0+1
    assert [w["window_start"] for w in out] == [T0, T0 + 1]
    assert [r.reason for r in agg.add_batch(0, [req(T0 + 1.9)], NOW).rejects] == [LATE]
    assert [w["window_start"] for w in agg.close_all(0)] == [T0 + 2]


def test_partitions_are_independent() -> None:
    agg = WindowAggregator()
    agg.add_batch("a", [req(T0 + 10)], NOW)
    assert agg.add_batch("b", [req(T0)], NOW).rejects == []
    agg.add_batch("a", [req(T0 + 20)], NOW)
    assert [w["window_start"] for w in agg.close_ready("a")] == [T0 + 10]
    assert agg.close_ready("b") == []


def test_error_events_and_pre_aggregated_summaries() -> None:
    agg = WindowAggregator()
    err = ErrorEvent.from_dict({"ts": T0 + 0.2, "service": "s", "error_type": "Boom",
                                "version": "v1"})
    own = WindowSummary.from_dict({
        "service": "s", "route": "/r", "window_start": T0, "window_s": 1.0, "count": 3,
        "errors": 1, "sketch": sk.build([1.0, 2.0, 300.0]), "p50": 2.0, "p90": 300.0,
        "p99": 300.0, "metrics": {"cpu": 0.5},
    })
    misfit = WindowSummary.from_dict({**own.to_dict(), "window_s": 10.0})
    res = agg.add_batch(0, [req(T0 + 0.1, latency=5.0), err, own, misfit], NOW)
    assert len(res.rejects) == 1 and "window_s=10.0" in res.rejects[0].reason
    out = {window_id_of(w): w for w in agg.close_all(0)}
    merged = out[f"s|/r||{T0:.3f}"]
    assert merged["count"] == 4 and merged["errors"] == 1 and merged["metrics"] == {"cpu": 0.5}
    assert merged["sketch"] == sk.merge(sk.build([5.0]), own.sketch)
    errors = out[f"s|{ERROR_ROUTE}||{T0:.3f}"]
    assert errors["count"] == errors["errors"] == 1
    assert errors["version_errors"] == {"v1": 1}
    for w in out.values():
        WindowSummary.from_dict(w)


def test_many_versions_are_capped() -> None:
    agg = WindowAggregator()
    agg.add_batch(0, [req(T0, version=f"v{i}") for i in range(100)], NOW)
    (w,) = agg.close_all(0)
    assert len(w["version_counts"]) <= 64 and sum(w["version_counts"].values()) == 100
    WindowSummary.from_dict(w)


def _run(events: list[RequestEvent], batch: int, restore_at: int | None = None) -> list[bytes]:
    """Feed events in batches, closing after each; optionally 'crash' and restore."""
    agg = WindowAggregator(window_s=0.5, grace_s=1.0)
    out: list[bytes] = []
    for i in range(0, len(events), batch):
        agg.add_batch(0, events[i:i + batch], NOW)
        out.extend(orjson.dumps(w, option=orjson.OPT_SORT_KEYS) for w in agg.close_ready(0))
    out.extend(orjson.dumps(w, option=orjson.OPT_SORT_KEYS) for w in agg.close_all(0))
    return out


def test_deterministic_and_batching_independent() -> None:
    rnd = random.Random(5)
    events = [req(T0 + i * 0.01 + rnd.uniform(0, 0.5), latency=rnd.expovariate(0.1),
                  service=rnd.choice("abc")) for i in range(2000)]
    first = _run(events, 100)
    assert first == _run(events, 100)
    # windows emitted by a different batching hold the same content whenever the same
    # events were on time (here: the watermark moves the same way)
    assert len(first) > 20
    assert {orjson.loads(w)["window_start"] for w in first} == {
        orjson.loads(w)["window_start"] for w in _run(events, 1)}


def test_restore_progress_skips_emitted_windows() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=1.0)
    agg.add_batch(0, [req(T0 + 0.5), req(T0 + 2.5)], NOW)
    emitted = agg.close_ready(0)
    assert [w["window_start"] for w in emitted] == [T0]
    stored = PartitionProgress.from_dict(orjson.loads(orjson.dumps(agg.progress(0).to_dict())))
    fresh = WindowAggregator(window_s=1.0, grace_s=1.0)
    fresh.restore(0, stored)
    res = fresh.add_batch(0, [req(T0 + 0.5), req(T0 + 2.5)], NOW)  # the replay
    assert [r.reason for r in res.rejects] == [LATE]
    assert fresh.close_ready(0) == []
    assert [w["count"] for w in fresh.close_all(0)] == [1]
