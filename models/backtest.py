"""Pure backtest helpers: feed a univariate series through the live SeriesDetector.

The backtest must run exactly what the live detector agent runs, so each row becomes a
window summary carrying ``metrics={"value": v}`` and goes through ``SeriesDetector.update``
(one row = one window, in row order: NAB timestamps are irregular and sometimes repeat).
``label`` is 1 where the live pipeline would emit an anomaly event for ``metric:value``;
``anomaly_score`` maps that signal's surprise to [0, 1] (0.5 at the threshold) and carries
the live decision's refractory period: it is 0 on the ``metric_refractory`` rows after a
finding, where the live pipeline stays silent whatever the surprise (except on a row where a
record escapes the refractory: that row fires, so its score is kept). So a threshold of 0.5
on ``anomaly_score`` reproduces ``label`` exactly, and a threshold sweep (NAB's
``--optimize``) scores at most one detection per episode instead of counting every
anomalous row after the first as a false positive. (Below 0.5 a sweep is an
approximation: rows that would have fired at that lower threshold do not start a
refractory of their own.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from models.series import DetectorConfig, SeriesDetector, anomaly_score

SIGNAL = "metric:value"


class TimestampError(ValueError):
    """A timestamp that is not 'YYYY-MM-DD HH:MM:SS' (or ISO 8601)."""


def parse_timestamp(text: str) -> float:
    """Epoch seconds of 'YYYY-MM-DD HH:MM:SS' read as UTC (naive times are UTC)."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise TimestampError(f"timestamp {text!r}: {exc}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def score_series(
    timestamps: Sequence[str | float],
    values: Sequence[float],
    config: DetectorConfig | None = None,
    series: str = "backtest||",
) -> tuple[list[float], list[int]]:
    """(anomaly_score per row, label per row) of one series through SeriesDetector."""
    if len(timestamps) != len(values):
        raise ValueError(f"{len(timestamps)} timestamps but {len(values)} values")
    cfg = config or DetectorConfig()
    det = SeriesDetector(series, cfg)
    scores: list[float] = []
    labels: list[int] = []
    since_fire = cfg.metric_refractory + 1  # rows since the last finding (as _Track does)
    for ts, v in zip(timestamps, values, strict=True):
        start = parse_timestamp(ts) if isinstance(ts, str) else float(ts)
        window = {"window_start": start, "metrics": {"value": v}}
        findings = det.update(window)
        fired = any(f.signal == SIGNAL for f in findings)
        since_fire = 0 if fired else since_fire + 1
        s = det.last_scores.get(SIGNAL, 0.0)
        live = math.isfinite(v) and (fired or since_fire > cfg.metric_refractory)
        scores.append(anomaly_score(s, cfg.metric_threshold) if live else 0.0)
        labels.append(int(fired))
    return scores, labels
