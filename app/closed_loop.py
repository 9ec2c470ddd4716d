"""The closed loop offline: fleet -> aggregation -> detection -> decisions -> sidecars -> fleet.

Why: "does mitigation make an incident better, and never worse?" needs every scenario
on several seeds, each against the same seed without Stanch. The live path (``stanch
demo``: broker, worker, real sidecars) takes minutes per run; this runs the same models
in one process, in event time, with no broker and no I/O, so the 24 runs of ``stanch
bench scenarios`` take minutes in all. The pieces are exactly the live ones:

* ``models.fleet.Fleet`` makes the traffic (same seed, same events);
* ``app.bench_quality.OfflinePipeline``: ``models.aggregation.WindowAggregator`` with the
  live ``window_s``/``grace_s`` (``app.settings.Settings`` defaults) and one
  ``models.series.SeriesDetector`` per series, told which services are mitigated (the
  detection agent's hook, fed by the decider as live);
* ``agents.incidents.DecisionEngine`` (the decider's pure core) with the policy's
  ``models.mitigation.Mitigator``, fed windows, anomalies (``finding_to_anomaly``),
  changes and acks as the decider's input topic would carry them;
* each decision is signed (``agents.mitigation.make_signer``, a throwaway Ed25519 key)
  and delivered at the next tick to ``models.fleet.FleetSidecars``: the sidecar's own
  gate and enforcement table, whose acks go back to the engine.

What is left out: transport delays (a command reaches the fleet at the start of the
tick after the decision: <= one tick, 0.5 s, where Kafka takes milliseconds), idle
ticks (the fleet never goes fully silent) and the snapshots (a crash is not simulated).

Measured per run (``run_scenario``): ingress error responses (status >= 500, shed 503s
included, throttled 429s not) and slow responses with and without Stanch, the commands
issued, the enforcements still in force at the end, and the times (simulated seconds
from the labelled onset, taken when the incident entry or command was produced, as the
demo takes them) to detect, to mitigate, to recover (the 10 s error rate back within the
pre-onset baseline for good) and to restore (no leased action in force any more).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agents.detection import finding_to_anomaly
from agents.incidents import DecisionEngine, Output
from agents.mitigation import make_signer
from app.bench_quality import OfflinePipeline
from app.settings import Settings
from models.fleet import Fleet, FleetConfig, FleetOutput, FleetSidecars, default_fleet_config
from models.mitigation import Mitigator
from models.policy import Policy
from models.scenarios import DEFAULT_DURATION_S, build_scenario
from schemas.records import WindowSummary
from schemas.signing import KeyRing

TICK_S = 0.5  # the simulator's generation step (app.simulate.DEFAULT_TICK_S)
#: Onset of the incident: after the detectors' 120-window warm-up, as in ``stanch demo``.
ONSET_S = 150.0
#: Simulated seconds run after the incident's end: two leases (policy default 60 s) and
#: a stable period (60 s) fit in it, so whatever is still in force at the end was kept
#: there by the loop, not by a lease that had no time to run out.
TAIL_S = 180.0
#: The clean scenario (no incident) runs as long as the shortest incident scenario.
CLEAN_INCIDENT_S = 60.0
#: A response is "slow" above this multiple of its route's p99 before the onset (the
#: same seed without Stanch): twice the healthy tail, far from the noise of a p99.
SLOW_FACTOR = 2.0
KID = "bench-closed-loop"


def _ingress(out: FleetOutput) -> list[dict[str, Any]]:
    return [e for events in out.requests.values() for e in events if not e.get("dependency")]


class IngressLog:
    """The ingress responses of one run, per tick, kept compact (route index, status,
    latency as numpy arrays): enough to count errors and slow responses afterwards,
    with thresholds known only once the run is over. Used here and by ``stanch demo``."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], int] = {}
        self.ticks: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, t0: float, out: FleetOutput) -> None:
        ingress = _ingress(out)
        n = len(ingress)
        routes = self.routes
        idx = np.fromiter((routes.setdefault((e["service"], e["route"]), len(routes))
                           for e in ingress), dtype=np.int32, count=n)
        status = np.fromiter((e["status"] for e in ingress), dtype=np.int16, count=n)
        latency = np.fromiter((e["latency_ms"] for e in ingress), dtype=np.float64, count=n)
        self.ticks.append((t0, idx, status, latency))

    def series(self) -> list[tuple[float, int, int]]:
        """Per tick: (t0, error responses, responses)."""
        return [(t0, int((st >= 500).sum()), len(st)) for t0, _, st, _ in self.ticks]

    @property
    def errors(self) -> int:
        return sum(int((st >= 500).sum()) for _, _, st, _ in self.ticks)

    @property
    def requests(self) -> int:
        return sum(len(st) for _, _, st, _ in self.ticks)

    def slow_thresholds(self, before: float) -> dict[tuple[str, str], float]:
        """(service, route) -> SLOW_FACTOR x the p99 latency of its successful
        responses in the ticks that started before ``before`` (the healthy tail)."""
        names = {i: k for k, i in self.routes.items()}
        lat: dict[int, list[np.ndarray]] = {}
        for t0, idx, st, la in self.ticks:
            if t0 >= before:
                break
            ok = st < 400
            for r in np.unique(idx[ok]).tolist():
                lat.setdefault(r, []).append(la[ok & (idx == r)])
        return {names[r]: SLOW_FACTOR * float(np.percentile(np.concatenate(v), 99))
                for r, v in lat.items()}

    def slow(self, thresholds: dict[tuple[str, str], float]) -> int:
        """Responses slower than their route's threshold (a route without one: none)."""
        limit = np.full(len(self.routes), np.inf)
        for key, i in self.routes.items():
            limit[i] = thresholds.get(key, np.inf)
        return sum(int((la > limit[idx]).sum()) for _, idx, _, la in self.ticks)


def recovery_time(series: list[tuple[float, int, int]], onset: float,
                  after: float | None) -> float | None:
    """First time >= ``after`` from which the 10 s error rate stays within the pre-onset
    baseline (max(2 x baseline, baseline + 1 %)) until the end of the run (the demo's
    definition, ``app.demo.recovery_time``)."""
    if after is None:
        return None
    before = [(e, n) for t, e, n in series if t < onset]
    base = sum(e for e, _ in before) / max(1, sum(n for _, n in before))
    limit = max(2 * base, base + 0.01)
    span = max(1, int(round(10.0 / TICK_S)))
    ok_from: float | None = None
    for i, (t, _, _) in enumerate(series):
        if t < after:
            continue
        chunk = series[i:i + span]
        errs, reqs = sum(c[1] for c in chunk), sum(c[2] for c in chunk)
        good = reqs == 0 or errs / reqs <= limit
        if good and ok_from is None:
            ok_from = t
        elif not good:
            ok_from = None
    return ok_from


def restore_time(leased_at: list[tuple[float, int]]) -> float | None:
    """From when on no leased enforcement was in force until the end, given (time,
    enforcements in force) per tick; None if one still is, or none ever was (a
    rollback-only mitigation leaves nothing to lift)."""
    if not any(n for _, n in leased_at) or leased_at[-1][1] != 0:
        return None
    last_busy = max(t for t, n in leased_at if n)
    return next(t for t, n in leased_at if t > last_busy)


def duration_for(scenario: str, onset_s: float = ONSET_S) -> float:
    """Simulated seconds of a run: onset, the incident, then ``TAIL_S``."""
    return onset_s + DEFAULT_DURATION_S.get(scenario, CLEAN_INCIDENT_S) + TAIL_S


class ClosedLoop:
    """One scenario, one seed, with Stanch in the loop (see the module docstring)."""

    def __init__(self, config: FleetConfig, scenario: str, seed: int, *,
                 onset_s: float = ONSET_S, policy: Policy | None = None,
                 settings: Settings | None = None) -> None:
        live = settings or Settings()
        self.policy = policy or Policy()
        self.fleet = Fleet(config, build_scenario(scenario, config, onset_s=onset_s), seed)
        key = Ed25519PrivateKey.generate()
        self.sign = make_signer(key, KID)
        self.sidecars = FleetSidecars(self.fleet, KeyRing({KID: key.public_key()}).verify)
        self.engine = DecisionEngine(self.policy, Mitigator(self.policy))
        self.mitigated: set[str] = set()
        self.pipeline = OfflinePipeline(window_s=live.window_s, grace_s=live.grace_s,
                                        mitigated=self.mitigated.__contains__)
        self.pending: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.entries: list[dict[str, Any]] = []
        #: fleet time (end of the tick) at which each entry / command was produced: what
        #: the demo measures (the wall time its record reached the broker, on the
        #: simulated clock); ``at``/``issued_at`` are the decider's event time, which
        #: trails it by the window and the grace
        self.produced_at: dict[str, float] = {}
        self.now = -float("inf")
        self.acks: list[dict[str, Any]] = []
        self.rejected: list[tuple[str, str]] = []

    def step(self, t: float, t1: float) -> FleetOutput:
        """One tick: deliver the commands decided so far, let the fleet run, feed what it
        produced through the pipeline and the decider."""
        self.now = t1
        acks: list[dict[str, Any]] = []
        for command in self.pending:
            acks += self.sidecars.deliver(command, command["service"], t)
        self.pending = []
        out = self.fleet.events_between(t, t1)
        acks += self.sidecars.expiry_acks(t)
        for change in out.changes:
            self._feed("change", change)
        for ack in acks:
            self.acks.append(ack)
            self._feed("ack", ack)
        for summary, findings in self.pipeline.feed(out, t1):
            self._window(summary, findings, t1)
        return out

    def finish(self, t: float) -> None:
        for summary, findings in self.pipeline.finish():
            self._window(summary, findings, t)

    def _window(self, summary: dict[str, Any], findings: list[Any], now: float) -> None:
        window = WindowSummary.from_dict(summary)
        for f in findings:
            self._feed("anomaly", finding_to_anomaly(f, window, now).to_dict())
        self._feed("window", summary)

    def _feed(self, kind: str, record: dict[str, Any]) -> None:
        out: Output = self.engine.feed(kind, orjson.dumps(record), self.engine.clock)
        self.rejected += out.rejected
        for entry in out.entries:
            self.entries.append(entry.to_dict())
            self.produced_at.setdefault(entry.id, self.now)
        for issued_at, decision in out.decisions:
            command = self.sign(decision, issued_at)
            self.commands.append(command)
            self.produced_at.setdefault(command["id"], self.now)
            self.pending.append(command)
        if out.entries or out.decisions:
            self.mitigated.clear()
            self.mitigated.update(self.engine.mitigated_services())


def run_scenario(scenario: str, seed: int, *, onset_s: float = ONSET_S,
                 duration_s: float | None = None, policy: Policy | None = None,
                 services: int | None = None,
                 on_tick: Callable[[ClosedLoop, float], None] | None = None) -> dict[str, Any]:
    """``scenario`` on ``seed`` with Stanch in the loop and without; the run's figures."""
    config = default_fleet_config(services)
    duration = duration_s if duration_s is not None else duration_for(scenario, onset_s)
    start, end = config.start_ts, config.start_ts + duration
    onset = start + onset_s
    loop = ClosedLoop(config, scenario, seed, onset_s=onset_s, policy=policy)
    plain = Fleet(config, build_scenario(scenario, config, onset_s=onset_s), seed)
    with_s, without = IngressLog(), IngressLog()
    leased_at: list[tuple[float, int]] = []  # (t, enforcements in force after the tick)
    t = start
    while t < end - 1e-9:
        t1 = min(end, t + TICK_S)
        with_s.add(t, loop.step(t, t1))
        without.add(t, plain.events_between(t, t1))
        leased_at.append((t1, sum(len(tb) for tb in loop.fleet.tables.values())))
        if on_tick is not None:
            on_tick(loop, t1)
        t = t1
    loop.finish(end)
    in_force = [{"service": name, **e.to_status(end)}
                for name, table in loop.fleet.tables.items() for e in table.active()
                if e.expires_at > end]
    return _figures(scenario, seed, onset, end, loop, with_s, without, in_force, leased_at)


def _rel(value: float | None, onset: float) -> float | None:
    return None if value is None else round(value - onset, 2)


def _figures(scenario: str, seed: int, onset: float, end: float, loop: ClosedLoop,
             with_s: IngressLog, without: IngressLog, in_force: list[dict[str, Any]],
             leased_at: list[tuple[float, int]]) -> dict[str, Any]:
    # as the demo counts them: from when the record existed (fleet time), incidents
    # opened and commands issued from 5 s before the onset on
    at = loop.produced_at
    opened = [at[e["id"]] for e in loop.entries
              if e.get("entry") == "opened" and at[e["id"]] >= onset - 5.0]
    first_cmd = min((at[c["id"]] for c in loop.commands if at[c["id"]] >= onset - 5.0),
                    default=None)
    recovered = recovery_time(with_s.series(), onset, first_cmd)
    slow_ms = without.slow_thresholds(onset)  # the healthy tails, without Stanch
    restored = restore_time(leased_at)
    kinds: dict[str, int] = {}
    for c in loop.commands:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    states: dict[str, str] = {}
    for e in loop.entries:
        states[e["incident_id"]] = e["state"]
    return {
        "scenario": scenario, "seed": seed,
        "errors_with_stanch": with_s.errors, "errors_without_stanch": without.errors,
        "errors_avoided": without.errors - with_s.errors,
        "slow_with_stanch": with_s.slow(slow_ms),
        "slow_without_stanch": without.slow(slow_ms),
        "slow_avoided": without.slow(slow_ms) - with_s.slow(slow_ms),
        "requests_with_stanch": with_s.requests, "requests_without_stanch": without.requests,
        "actions_issued": len(loop.commands), "actions_by_kind": kinds,
        "actions_in_force_at_end": len(in_force), "in_force_at_end": in_force,
        "time_to_detect_s": _rel(min(opened), onset) if opened else None,
        "time_to_mitigate_s": _rel(first_cmd, onset),
        "time_to_recover_s": _rel(recovered, onset),
        "time_to_restore_s": _rel(restored, onset),
        "commands": [{"id": c["id"], "kind": c["kind"], "service": c["service"],
                      "target": c["target"], "issued_s": _rel(at[c["id"]], onset),
                      "params": c.get("params") or {}} for c in loop.commands],
        "acks": {s: sum(a["status"] == s for a in loop.acks)
                 for s in ("applied", "rejected", "failed", "expired")},
        "incidents": states,
        "dead_lettered": len(loop.rejected),
        "simulated_s": round(end - loop.fleet.config.start_ts, 1),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The bench's summary over every run (see ``app.bench_scenarios``)."""
    avoided = [r["errors_avoided"] for r in runs]
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_scenario.setdefault(r["scenario"], []).append(r)
    return {
        "runs": len(runs),
        "min_errors_avoided": min(avoided) if avoided else None,
        "runs_worse_than_nothing": sum(a < 0 for a in avoided),
        "actions_in_force_at_end": sum(r["actions_in_force_at_end"] for r in runs),
        # mitigated: on every seed Stanch acted and served fewer errors than nothing
        "scenarios_mitigated": sorted(
            s for s, rs in by_scenario.items()
            if all(r["actions_issued"] > 0 and r["errors_avoided"] > 0 for r in rs)),
        "errors_avoided_total": sum(avoided),
        "slow_avoided_total": sum(r["slow_avoided"] for r in runs),
    }


