"""Detection quality on the simulator's scenarios, offline: ``python -m app.bench_quality``.

Why: the detection issue asks that every injected incident of every simulator scenario
is detected, and that the clean scenario raises no anomaly over 24 simulated hours at
default settings. Both are properties of the *pure* pipeline the live agents run -
``models.fleet.Fleet`` -> ``models.aggregation.WindowAggregator`` ->
``models.series.SeriesDetector`` per series - so they are measured here without a
broker, in one process, with the same code (records go through the same
``schemas.records`` parsers the aggregation agent uses).

What is measured (prints one JSON object):

* per scenario (``scenarios``): for each ground-truth label (``models.scenarios.labels_for``)
  whether it was detected - at least one anomaly on one of its ``affected_series`` between
  onset and end + ``allowance_s`` (for a telemetry gap: a traffic ``drop`` on a series of
  its root service, or the incident model's gap rule, ``detected_by``) - the first such
  anomaly (series, signal, window start) and the delay in windows, counted inclusively
  (an anomaly in the onset window = 1, as in ``stanch bench detect``). A telemetry gap
  is never seen by a detector: a silent service emits no window summaries at all, so
  there is no zero-count window to score; ``models.incidents`` notices the silence.
  ``false_before_onset`` counts anomalies on any series before the first onset (the
  baselines are warm by then: every one is a false alarm); ``other_findings`` counts
  anomalies outside every label's series and time span (load that travels, e.g. a
  surge's queueing latency, shows up there and is not an error by itself).
* ``clean``: the clean scenario for ``--clean-hours`` simulated hours (default 24) at a
  reduced traffic rate, the fleet generated in ``--clean-chunk-s`` chunks: series seen,
  series-windows scored, anomalies (all of them are false alarms), wall time.

Simplifications against the live system, each chosen to keep the figures about the
detectors: one aggregation partition per (topic, service) (the live topics hash several
services onto one partition; that only changes when windows close, not their content),
the idle flush runs on the simulated clock (as the agent's wall clock would at speed 1),
and
for the long clean run the fleet is generated in chunks longer than the simulator's
0.5 s tick (its per-tick rate noise then holds for a whole chunk: slower, not larger,
traffic wobble; the diurnal curve is evaluated once per chunk).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from models.aggregation import WindowAggregator, series_of
from models.fleet import Fleet, FleetConfig, FleetOutput, default_fleet_config
from models.incidents import IncidentBook
from models.scenarios import SCENARIO_NAMES, build_scenario, labels_for
from models.series import DetectorConfig, Finding, SeriesDetector
from schemas.records import ErrorEvent, parse_request

#: Incident kinds that hit at once (no ramp): the issue's "seconds, not minutes" applies.
ACUTE_KINDS = ("latency-spike", "error-burst", "bad-deploy")
#: Onset used by the quality runs: well after the 120-window warm-up, so every baseline
#: (alpha 0.01, a ~100-window memory) has settled before the incident starts.
QUALITY_ONSET_S = 300.0
#: Windows an anomaly may trail the label's end and still count (debounce + pooling).
ALLOWANCE_S = 10.0
#: A partition without input for this long closes its finished windows (the agent's
#: idle flush, agents.aggregation, on the simulated clock instead of the wall clock).
IDLE_FLUSH_S = 1.0


@dataclass
class PipelineRun:
    """What one offline run produced."""

    findings: list[Finding] = field(default_factory=list)
    windows: int = 0  # series-windows scored
    series: set[str] = field(default_factory=set)
    events: int = 0
    wall_s: float = 0.0
    simulated_s: float = 0.0
    #: (service, event-time clock) of every telemetry-gap incident the incident model
    #: opened (only when the run was asked to watch for gaps)
    gaps: list[tuple[str, float]] = field(default_factory=list)


class _GapWatch:
    """The incident model's telemetry-gap rule, fed the way the incident agent feeds it.

    Why here: a silent service produces *no* window summaries (the aggregator only emits
    windows that saw events), so no detector can score its silence; the live pipeline
    notices it in ``models.incidents.IncidentBook`` (no own window for
    ``telemetry_gap_s``). The agent moves its clock to the newest window_start and ticks
    the book whenever a window advances it; so does this watch."""

    def __init__(self) -> None:
        self.book = IncidentBook()
        self.clock = -math.inf
        self.gaps: list[tuple[str, float]] = []

    def on_window(self, summary: dict[str, Any], _found: list[Finding]) -> None:
        ws = float(summary["window_start"])
        advanced = ws > self.clock
        self.clock = max(self.clock, ws)
        self.book.on_window(summary, self.clock)
        if advanced:
            for entry in self.book.tick(self.clock):
                if entry.reason.startswith("telemetry gap"):
                    self.gaps.append((entry.root_service or entry.service, entry.at))


def _close_idle_at(agg: WindowAggregator, partition: Any, *, now: float) -> list[dict[str, Any]]:
    return agg.close_idle(partition, now)


class OfflinePipeline:
    """Aggregation and detection exactly as the agents chain them, fed one interval of
    fleet output at a time (``feed``): records go through the same ``schemas.records``
    parsers, windows close on the watermark and, after ``IDLE_FLUSH_S`` without input,
    on the simulated clock (the agent's idle flush), and every closed window is scored
    by its series' ``SeriesDetector`` in event-time order. ``mitigated(service)``
    is the detection agent's hook: windows of a mitigated service are scored, not
    learned. Used by ``run_pipeline`` and by the offline closed loop
    (``app.closed_loop``)."""

    def __init__(self, *, window_s: float = 1.0, grace_s: float = 2.0,
                 detector_config: DetectorConfig | None = None,
                 mitigated: Callable[[str], bool] | None = None) -> None:
        self.agg = WindowAggregator(window_s=window_s, grace_s=grace_s)
        self.cfg = detector_config or DetectorConfig()
        self.detectors: dict[str, SeriesDetector] = {}
        self.mitigated = mitigated
        self.windows = 0
        self.events = 0
        self._last_input: dict[str, float] = {}

    def _detect(self, summaries: list[dict[str, Any]]
                ) -> list[tuple[dict[str, Any], list[Finding]]]:
        scored = []
        for summary in summaries:
            key = series_of(summary)
            det = self.detectors.get(key)
            if det is None:
                det = self.detectors[key] = SeriesDetector(key, self.cfg)
            hook = self.mitigated
            found = det.update(summary, mitigated=bool(hook and hook(summary["service"])))
            self.windows += 1
            scored.append((summary, found))
        return scored

    @staticmethod
    def _closed(partitions: Sequence[str], close: Callable[[str], list[dict[str, Any]]]
                ) -> list[dict[str, Any]]:
        out = [s for p in partitions for s in close(p)]
        # several partitions close the same window: score in event-time order like a
        # worker reading them would (per series the order is what matters, and it is kept)
        out.sort(key=lambda s: s["window_start"])
        return out

    def feed(self, out: FleetOutput, t1: float) -> list[tuple[dict[str, Any], list[Finding]]]:
        """One interval of fleet output ending at ``t1``: the windows it closed, scored."""
        agg = self.agg
        touched: list[str] = []
        for service, batch in out.requests.items():
            part = f"requests:{service}"
            agg.add_requests(part, [parse_request(e) for e in batch], now=t1)
            self.events += len(batch)
            touched.append(part)
        errors_by_service: dict[str, list[ErrorEvent]] = {}
        for e in out.errors:
            errors_by_service.setdefault(e["service"], []).append(ErrorEvent.from_dict(e))
        for service, errs in errors_by_service.items():
            part = f"errors:{service}"
            agg.add_errors(part, errs, now=t1)
            self.events += len(errs)
            touched.append(part)
        for part in touched:
            self._last_input[part] = t1
        ready = self._closed(touched, agg.close_ready)
        # the idle flush, on simulated time (the live agent's wall clock at speed 1)
        idle = [p for p, at in self._last_input.items() if t1 - at >= IDLE_FLUSH_S]
        ready += self._closed(idle, functools.partial(_close_idle_at, agg, now=t1))
        ready.sort(key=lambda s: s["window_start"])
        return self._detect(ready)

    def finish(self) -> list[tuple[dict[str, Any], list[Finding]]]:
        """Close and score every window still open (the end of the run)."""
        return self._detect(self._closed(self.agg.partitions(),  # type: ignore[arg-type]
                                         self.agg.close_all))


def run_pipeline(config: FleetConfig, scenario_name: str, *, seed: int, duration_s: float,
                 tick_s: float = 0.5, onset_s: float = QUALITY_ONSET_S,
                 detector_config: DetectorConfig | None = None, window_s: float = 1.0,
                 grace_s: float = 2.0, watch_gaps: bool = False,
                 on_window: Callable[[dict[str, Any], list[Finding]], None] | None = None,
                 ) -> PipelineRun:
    """Run the fleet for ``duration_s`` simulated seconds through aggregation and
    detection, exactly as the agents chain them, and collect every finding.

    ``tick_s`` is the fleet's generation step (the simulator uses 0.5 s; longer chunks
    make long clean runs affordable). ``watch_gaps`` also runs the incident model's
    telemetry-gap rule over the windows (see ``_GapWatch``). ``on_window(summary,
    findings)`` sees every scored window (for diagnosis)."""
    scenario = build_scenario(scenario_name, config, onset_s=onset_s)
    fleet = Fleet(config, scenario, seed)
    pipeline = OfflinePipeline(window_s=window_s, grace_s=grace_s,
                               detector_config=detector_config)
    run = PipelineRun()
    watch = _GapWatch() if watch_gaps else None
    wall0 = time.perf_counter()

    def collect(scored: list[tuple[dict[str, Any], list[Finding]]]) -> None:
        for summary, found in scored:
            run.findings.extend(found)
            if watch is not None:
                watch.on_window(summary, found)
            if on_window is not None:
                on_window(summary, found)

    t = config.start_ts
    end = config.start_ts + duration_s
    while t < end - 1e-9:
        t1 = min(end, t + tick_s)
        collect(pipeline.feed(fleet.events_between(t, t1), t1))
        t = t1
    collect(pipeline.finish())
    run.windows, run.events = pipeline.windows, pipeline.events
    run.series = set(pipeline.detectors)
    run.gaps = watch.gaps if watch is not None else []
    run.wall_s = time.perf_counter() - wall0
    run.simulated_s = duration_s
    return run


# --------------------------------------------------------------------------- scoring


def _matches(label: dict[str, Any], f: Finding, allowance_s: float) -> bool:
    """Does finding ``f`` detect ``label``? On an affected series inside [onset, end +
    allowance); a telemetry gap also counts as seen through a traffic drop on its root
    service's series."""
    if not label["onset"] <= f.window_start < label["end"] + allowance_s:
        return False
    if f.series in label["affected_series"]:
        return True
    return (label["kind"] == "telemetry-gap" and f.signal == "traffic"
            and f.series.split("|", 1)[0] == label["root_service"]
            and f.evidence.get("direction") == "drop")


def _delay(at: float, onset: float, window_s: float) -> int:
    """Windows from the onset to ``at``, inclusive: the onset window itself is 1."""
    return int(math.floor((at - onset) / window_s + 1e-9)) + 1


def score_run(labels: list[dict[str, Any]], run: PipelineRun, *, window_s: float = 1.0,
              allowance_s: float = ALLOWANCE_S) -> dict[str, Any]:
    """Per label: detected, first matching finding, delay in windows (inclusive); plus
    the false alarms before the first onset and the findings no label explains."""
    per_label = []
    explained: set[str] = set()
    for label in labels:
        hits = sorted((f for f in run.findings if _matches(label, f, allowance_s)),
                      key=lambda f: (f.window_start, f.series, f.signal))
        explained.update(f.id for f in hits)
        first = hits[0] if hits else None
        at = None if first is None else first.window_start
        detected_by = None if first is None else "detector"
        if label["kind"] == "telemetry-gap":
            gap_at = min((t for svc, t in run.gaps if svc == label["root_service"]
                          and label["onset"] <= t < label["end"] + allowance_s), default=None)
            if gap_at is not None and (at is None or gap_at < at):
                at, detected_by = gap_at, "incident gap rule"
        per_label.append({
            "label_id": label["label_id"],
            "kind": label["kind"],
            "detected": at is not None,
            "detected_by": detected_by,
            "delay_windows": None if at is None else _delay(at, label["onset"], window_s),
            "first": None if first is None else {
                "series": first.series, "signal": first.signal,
                "window_start": first.window_start, "severity": first.severity,
                "direction": first.evidence.get("direction")},
            "findings": len(hits),
            "series_flagged": len({f.series for f in hits}),
            "signals": sorted({f.signal for f in hits}),
            "delay_by_signal": {
                sig: _delay(min(f.window_start for f in hits if f.signal == sig),
                            label["onset"], window_s)
                for sig in sorted({f.signal for f in hits})},
        })
    first_onset = min((label["onset"] for label in labels), default=math.inf)
    false_before = [f for f in run.findings if f.window_start < first_onset]
    others = [f for f in run.findings if f.id not in explained
              and f.window_start >= first_onset]
    return {
        "labels": per_label,
        "detected": all(p["detected"] for p in per_label),
        "false_before_onset": len(false_before),
        "false_before_onset_ids": [f.id for f in false_before[:10]],
        "other_findings": len(others),
        "other_findings_ids": sorted({f"{f.series}|{f.signal}" for f in others})[:20],
        "series": len(run.series),
        "windows": run.windows,
        "events": run.events,
        "wall_s": round(run.wall_s, 2),
    }


def run_scenario(name: str, *, seed: int = 1, base_rate_per_s: float = 200.0,
                 services: int | None = None, onset_s: float = QUALITY_ONSET_S,
                 allowance_s: float = ALLOWANCE_S,
                 detector_config: DetectorConfig | None = None) -> dict[str, Any]:
    """Run one scenario from its start to its last label's end + allowance, and score it."""
    config = default_fleet_config(services, base_rate_per_s=base_rate_per_s)
    labels = labels_for(build_scenario(name, config, onset_s=onset_s), config)
    last_end = max((label["end"] for label in labels), default=config.start_ts + onset_s)
    duration = last_end - config.start_ts + allowance_s + 5.0  # + grace to close windows
    run = run_pipeline(config, name, seed=seed, duration_s=duration, onset_s=onset_s,
                       detector_config=detector_config,
                       watch_gaps=any(label["kind"] == "telemetry-gap" for label in labels))
    result = score_run(labels, run, allowance_s=allowance_s)
    result.update(scenario=name, seed=seed, base_rate_per_s=base_rate_per_s)
    return result


def run_clean(hours: float, *, seed: int = 1, base_rate_per_s: float = 20.0,
              services: int | None = None, chunk_s: float = 60.0,
              detector_config: DetectorConfig | None = None) -> dict[str, Any]:
    """The clean scenario for ``hours`` simulated hours: every anomaly is a false alarm."""
    config = default_fleet_config(services, base_rate_per_s=base_rate_per_s)
    run = run_pipeline(config, "clean", seed=seed, duration_s=hours * 3600.0,
                       tick_s=chunk_s, detector_config=detector_config)
    by_signal: dict[str, int] = {}
    for f in run.findings:
        by_signal[f.signal] = by_signal.get(f.signal, 0) + 1
    return {
        "scenario": "clean", "hours": hours, "seed": seed, "base_rate_per_s": base_rate_per_s,
        "services": len(config.services), "chunk_s": chunk_s,
        "series": len(run.series), "windows": run.windows, "events": run.events,
        "anomalies": len(run.findings), "anomalies_by_signal": by_signal,
        "anomaly_ids": [f.id for f in run.findings[:20]],
        "wall_s": round(run.wall_s, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=200.0,
                        help="base_rate_per_s of the incident scenarios (fleet default 200)")
    parser.add_argument("--clean-hours", type=float, default=24.0)
    parser.add_argument("--clean-rate", type=float, default=20.0,
                        help="base_rate_per_s of the clean day (reduced to keep it short)")
    parser.add_argument("--clean-chunk-s", type=float, default=60.0)
    parser.add_argument("--onset-s", type=float, default=QUALITY_ONSET_S,
                        help="onset of the incident scenarios (simulated seconds)")
    parser.add_argument("--scenarios", default=",".join(n for n in SCENARIO_NAMES
                                                         if n != "clean"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    scenarios = {name: run_scenario(name, seed=args.seed, base_rate_per_s=args.rate,
                                    onset_s=args.onset_s)
                 for name in args.scenarios.split(",") if name}
    clean = (run_clean(args.clean_hours, seed=args.seed, base_rate_per_s=args.clean_rate,
                       chunk_s=args.clean_chunk_s) if args.clean_hours > 0 else None)
    result = {
        "benchmark": "scenario_quality",
        "detector_config": "DetectorConfig() defaults",
        "summary": {name: {"detected": r["detected"],
                           "delay_windows": [p["delay_windows"] for p in r["labels"]],
                           "delay_by_signal": [p["delay_by_signal"] for p in r["labels"]],
                           "false_before_onset": r["false_before_onset"]}
                    for name, r in scenarios.items()},
        "scenarios": scenarios,
        "clean": clean,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    ok = all(r["detected"] and r["false_before_onset"] == 0 for r in scenarios.values())
    return 0 if ok and (clean is None or clean["anomalies"] == 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
