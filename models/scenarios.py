"""Injected incidents and their ground truth.

Why: a detector is only as good as the incidents it is judged on. Each scenario here
injects a known failure into the simulated fleet (``models.fleet``) at a known onset,
and describes it as a label — onset, end, affected series, root cause — so that
detection delay, precision and the mitigation's choice of target can be scored.

A scenario is a tuple of ``Injection`` records. The fleet asks the scenario, once per
tick, how a (service, route) behaves (``route_effect``), how much extra load a
service gets (``traffic_multiplier``), when its telemetry is missing
(``telemetry_gaps``) and which bad deploys to roll out (``deploys``). Everything is a
pure function of simulated time (seconds since the start of the run).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from models.fleet import FleetConfig, callers_of, own_series, upstream_series

SCENARIO_NAMES = (
    "clean",
    "latency-spike",
    "error-burst",
    "bad-deploy",
    "traffic-surge",
    "dependency-failure",
    "slow-degradation",
    "telemetry-gap",
)

DEFAULT_ONSET_S = 120.0  # leaves the detectors' warm-up clean
DEFAULT_DURATION_S = {
    "latency-spike": 60.0,
    "error-burst": 60.0,
    "bad-deploy": 240.0,
    "traffic-surge": 90.0,
    "dependency-failure": 90.0,
    "slow-degradation": 480.0,
    "telemetry-gap": 60.0,
}

# Preferred targets (service, routes); a fleet without the service falls back.
_DEFAULT_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "latency-spike": ("payments", ("/charge",)),
    "error-burst": ("inventory", ("/stock",)),
    "bad-deploy": ("payments", ()),
    "traffic-surge": ("search", ()),
    "dependency-failure": ("payments", ()),
    "slow-degradation": ("users", ("/users/{id}",)),
    "telemetry-gap": ("inventory", ()),
}


@dataclass(frozen=True)
class RouteEffect:
    """How an incident changes one route right now: multiply latency, add an error
    rate, and turn a share of the errors into timeouts of ``timeout_ms``."""

    latency_mult: float = 1.0
    error_rate: float = 0.0
    timeout_share: float = 0.0
    timeout_ms: float = 0.0


NO_EFFECT = RouteEffect()


@dataclass(frozen=True)
class Injection:
    """One injected incident. ``routes`` empty means every route of ``service``.
    ``ramp_s`` is how long the effect takes to reach full strength (linear)."""

    kind: str
    service: str
    routes: tuple[str, ...]
    onset_s: float
    duration_s: float
    latency_mult: float = 1.0
    error_rate: float = 0.0
    traffic_mult: float = 1.0
    ramp_s: float = 0.0
    timeout_share: float = 0.0
    timeout_ms: float = 0.0
    rollout_s: float = 6.0  # bad-deploy: time to reach every instance

    @property
    def end_s(self) -> float:
        return self.onset_s + self.duration_s

    def strength(self, offset_s: float) -> float:
        """0 outside [onset, end), ramping linearly to 1 over ``ramp_s`` inside."""
        if not self.onset_s <= offset_s < self.end_s:
            return 0.0
        if self.ramp_s <= 0.0:
            return 1.0
        return min(1.0, (offset_s - self.onset_s) / self.ramp_s)

    def covers(self, service: str, route: str) -> bool:
        return service == self.service and (not self.routes or route in self.routes)


@dataclass(frozen=True)
class Scenario:
    """A named set of injections; the fleet queries it, labels describe it."""

    name: str
    injections: tuple[Injection, ...] = ()

    def route_effect(self, service: str, route: str, offset_s: float) -> RouteEffect:
        latency_mult, error_rate, timeout_share, timeout_ms = 1.0, 0.0, 0.0, 0.0
        for inj in self.injections:
            if inj.kind not in ("latency-spike", "error-burst", "dependency-failure",
                                "slow-degradation") or not inj.covers(service, route):
                continue
            k = inj.strength(offset_s)
            if k <= 0.0:
                continue
            latency_mult *= 1.0 + (inj.latency_mult - 1.0) * k
            error_rate += inj.error_rate * k
            if inj.timeout_share > 0.0:
                timeout_share = max(timeout_share, inj.timeout_share)
                timeout_ms = max(timeout_ms, inj.timeout_ms)
        if latency_mult == 1.0 and error_rate == 0.0 and timeout_share == 0.0:
            return NO_EFFECT
        return RouteEffect(latency_mult, min(error_rate, 1.0), timeout_share, timeout_ms)

    def traffic_multiplier(self, service: str, offset_s: float) -> float:
        mult = 1.0
        for inj in self.injections:
            if inj.kind == "traffic-surge" and inj.service == service:
                mult *= 1.0 + (inj.traffic_mult - 1.0) * inj.strength(offset_s)
        return mult

    def telemetry_gaps(self, service: str) -> list[tuple[float, float]]:
        return [(inj.onset_s, inj.end_s) for inj in self.injections
                if inj.kind == "telemetry-gap" and inj.service == service]

    def deploys(self) -> list[Injection]:
        return [inj for inj in self.injections if inj.kind == "bad-deploy"]


def _pick_target(kind: str, config: FleetConfig, service: str | None,
                 route: str | None) -> tuple[str, tuple[str, ...]]:
    """The service (and routes) an injection hits: the caller's choice, else the
    preferred default, else a service that has callers, else the last service."""
    names = config.service_names
    if service is not None:
        if service not in names:
            raise ValueError(f"target={service!r}: not a service of the fleet {names}")
        chosen_routes: tuple[str, ...] = (route,) if route else ()
        if route and route not in {r.path for r in config.service(service).routes}:
            raise ValueError(f"route={route!r}: not a route of {service}")
        return service, chosen_routes
    preferred, routes = _DEFAULT_TARGETS[kind]
    if preferred in names:
        return preferred, routes
    called = [s for s in names[1:]
              if any(callers_of(config, s, r.path) for r in config.service(s).routes)]
    chosen = called[-1] if called else names[-1]
    return chosen, (config.service(chosen).routes[0].path,) if routes else ()


def make_injection(kind: str, config: FleetConfig, *, onset_s: float = DEFAULT_ONSET_S,
                   duration_s: float | None = None, service: str | None = None,
                   route: str | None = None) -> Injection:
    """One injection of ``kind`` with the magnitudes the issue asks for."""
    if kind not in DEFAULT_DURATION_S:
        raise ValueError(f"kind={kind!r}: must be one of {sorted(DEFAULT_DURATION_S)}")
    if onset_s < 0:
        raise ValueError(f"onset_s={onset_s!r}: must be >= 0")
    duration = DEFAULT_DURATION_S[kind] if duration_s is None else float(duration_s)
    if duration <= 0:
        raise ValueError(f"duration_s={duration_s!r}: must be > 0")
    target, routes = _pick_target(kind, config, service, route)
    base = Injection(kind, target, routes, float(onset_s), duration)
    if kind == "latency-spike":
        return replace(base, latency_mult=5.0)
    if kind == "error-burst":
        return replace(base, error_rate=0.2)
    if kind == "bad-deploy":
        return replace(base, error_rate=0.25, latency_mult=3.0, rollout_s=6.0)
    if kind == "traffic-surge":
        return replace(base, traffic_mult=5.0, ramp_s=15.0)
    if kind == "dependency-failure":
        return replace(base, error_rate=0.6, latency_mult=1.5, timeout_share=0.5,
                         timeout_ms=1000.0)
    if kind == "slow-degradation":
        return replace(base, latency_mult=4.0, ramp_s=duration)
    return base  # telemetry-gap


def build_scenario(name: str, config: FleetConfig, *, onset_s: float = DEFAULT_ONSET_S,
                   duration_s: float | None = None, service: str | None = None,
                   route: str | None = None, gap_s: float = 120.0) -> Scenario:
    """A scenario by name. ``name`` may list several kinds separated by commas
    (``latency-spike,bad-deploy``): they run one after another, ``gap_s`` apart."""
    kinds = [k.strip() for k in name.split(",") if k.strip()]
    if not kinds:
        raise ValueError(f"scenario={name!r}: expected one of {SCENARIO_NAMES}")
    unknown = [k for k in kinds if k not in SCENARIO_NAMES]
    if unknown:
        raise ValueError(f"scenario={name!r}: unknown {unknown}; expected {SCENARIO_NAMES}")
    injections: list[Injection] = []
    at = float(onset_s)
    for kind in kinds:
        if kind == "clean":
            continue
        inj = make_injection(kind, config, onset_s=at, duration_s=duration_s,
                             service=service, route=route)
        injections.append(inj)
        at = inj.end_s + gap_s
    return Scenario(",".join(kinds), tuple(injections))


def _root_cause(inj: Injection, config: FleetConfig) -> str:
    where = f"{inj.service} {' '.join(inj.routes)}".strip()
    if inj.kind == "bad-deploy":
        return f"deploy {inj.service} v{config.service(inj.service).version + 1}"
    return {
        "latency-spike": f"latency {where}",
        "error-burst": f"errors {where}",
        "traffic-surge": f"traffic {inj.service}",
        "dependency-failure": f"dependency {inj.service}",
        "slow-degradation": f"degradation {where}",
        "telemetry-gap": f"telemetry-gap {inj.service}",
    }[inj.kind]


def affected_series(inj: Injection, config: FleetConfig) -> list[str]:
    """The series that really show the incident. A telemetry gap silences the service's
    own series; every other kind shows on the hit routes and travels upstream along
    the calls (callers' egress to them, then the callers' own routes)."""
    if inj.kind == "telemetry-gap":
        return own_series(config, inj.service)
    routes: Iterable[str] = inj.routes or [r.path for r in config.service(inj.service).routes]
    return upstream_series(config, inj.service, routes)


def labels_for(scenario: Scenario, config: FleetConfig) -> list[dict[str, Any]]:
    """Ground truth, one label per injection, times in simulated epoch seconds. The
    shape is the ScenarioLabel record's: scenario, label_id, kind, onset, end,
    affected_series, root_cause, root_service, details."""
    labels = []
    for index, inj in enumerate(scenario.injections):
        onset = config.start_ts + inj.onset_s
        labels.append({
            "scenario": scenario.name,
            "label_id": f"{scenario.name}:{index}:{inj.kind}:{inj.service}",
            "kind": inj.kind,
            "onset": round(onset, 6),
            "end": round(onset + inj.duration_s, 6),
            "affected_series": affected_series(inj, config),
            "root_cause": _root_cause(inj, config),
            "root_service": inj.service,
            "details": _details(inj, config),
        })
    return labels


def _details(inj: Injection, config: FleetConfig) -> dict[str, Any]:
    """The injected magnitudes (only those that differ from 'no effect'), and for a bad
    deploy the change that caused it, so a scorer can match a rollback's target."""
    details: dict[str, Any] = {"routes": list(inj.routes)}
    for name, neutral in (("latency_mult", 1.0), ("error_rate", 0.0), ("traffic_mult", 1.0),
                          ("ramp_s", 0.0), ("timeout_share", 0.0), ("timeout_ms", 0.0)):
        value = getattr(inj, name)
        if value != neutral:
            details[name] = value
    if inj.kind == "bad-deploy":
        old = config.service(inj.service).version
        details.update(change_id=f"deploy:{inj.service}:v{old + 1}", from_version=f"v{old}",
                       to_version=f"v{old + 1}", rollout_s=inj.rollout_s)
    return details
