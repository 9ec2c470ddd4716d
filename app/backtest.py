"""`stanch backtest`: run the live detectors over CSV files (NAB format) offline.

Reads every ``*.csv`` under the input folder (recursively; CRLF tolerated) with columns
``timestamp,value`` and writes, at the same relative path under the output folder,
``timestamp,value,anomaly_score,label`` (DESIGN.md, "Backtest file format"). The scoring
itself is models.backtest.score_series, i.e. the same SeriesDetector the live agent runs.
A bad file never stops the run: it is reported in the summary with the reason.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from models.backtest import TimestampError, parse_timestamp, score_series
from models.series import DetectorConfig


class BacktestInputError(ValueError):
    """A CSV that cannot be backtested (file, row, reason)."""


def read_series(path: Path) -> tuple[list[str], list[float]]:
    """(timestamp texts, values) of a timestamp,value CSV; raises BacktestInputError."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if "timestamp" not in header or "value" not in header:
            raise BacktestInputError(f"{path}: header {header!r} lacks timestamp,value")
        ti, vi = header.index("timestamp"), header.index("value")
        stamps: list[str] = []
        values: list[float] = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                text = row[ti].strip()
                parse_timestamp(text)
                value = float(row[vi])
            except (IndexError, ValueError, TimestampError) as exc:
                raise BacktestInputError(f"{path}:{lineno}: {row!r}: {exc}") from exc
            stamps.append(text)
            values.append(value if math.isfinite(value) else math.nan)
    return stamps, values


def run_backtest(input_dir: Path, output_dir: Path,
                 config: DetectorConfig | None = None) -> dict[str, Any]:
    """Backtest every CSV under ``input_dir`` into ``output_dir``; returns a summary:
    ``{"files", "rows", "anomalies", "errors": [{"file", "reason"}], "per_file": {...}}``."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise BacktestInputError(f"--input {input_dir}: not a directory")
    summary: dict[str, Any] = {"files": 0, "rows": 0, "anomalies": 0, "errors": [],
                               "per_file": {}}
    for path in sorted(input_dir.rglob("*.csv")):
        rel = path.relative_to(input_dir)
        try:
            stamps, values = read_series(path)
        except (BacktestInputError, OSError, UnicodeDecodeError) as exc:
            summary["errors"].append({"file": str(rel), "reason": str(exc)})
            continue
        scores, labels = score_series(stamps, values, config, series=f"backtest|{rel}|")
        out = output_dir / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["timestamp", "value", "anomaly_score", "label"])
            for ts, v, s, lab in zip(stamps, values, scores, labels, strict=True):
                writer.writerow([ts, repr(v) if math.isfinite(v) else "", f"{s:.6f}", lab])
        n_anom = sum(labels)
        summary["files"] += 1
        summary["rows"] += len(stamps)
        summary["anomalies"] += n_anom
        summary["per_file"][str(rel)] = {"rows": len(stamps), "anomalies": n_anom}
    return summary
