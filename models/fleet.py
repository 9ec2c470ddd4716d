"""A simulated fleet of services: the traffic Stanch watches, and the system it protects.

Why a model and not a load generator: the detectors, the incident grouping and the
mitigation policy can only be judged against ground truth, and ground truth needs a
fleet whose behaviour is known exactly. This module is that fleet, kept pure (no I/O,
no clock, no asyncio) so that the same seed always gives the same events, and the
runner in ``app.simulate`` only has to publish them.

The model, in one breath:

* services with routes; a route may call routes of other services (a DAG); each
  service runs a few instances, each on a version (``v41``);
* external traffic follows a diurnal curve (a raised cosine over the simulated day,
  minimum ~30 % of the peak) with per-tick noise; arrivals are Poisson;
* traffic flows top-down: a caller's accepted requests become the callee's arrivals,
  so the egress events a caller emits mirror the callee's own ingress events;
* latency flows bottom-up: a request's latency is a log-normal draw for its route,
  scaled by instance variation, version behaviour, injected effects and a queueing
  factor ``1 / (1 - utilisation)``, plus the latency of the downstream calls it made;
* errors: a background rate, injected rates, bad versions, overload, and downstream
  errors that propagate with a fixed probability;
* commands (rollback, throttle, isolate, shed, restore) change that behaviour the way
  an enforcement sidecar in front of the service would, and expire on time.

Events are generated per (service, route, tick) with numpy arrays, then turned into
dicts in bulk, which keeps generation well above 50,000 events per second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from models.enforcement import (
    CommandError,
    CommandGate,
    Enforcement,
    EnforcementTable,
    ParsedCommand,
    parse_command,
)

if TYPE_CHECKING:  # scenarios imports this module at run time; only types flow back.
    from models.scenarios import Scenario

REJECT_LATENCY_MS = (0.3, 1.5)  # a sidecar refusing a request answers in about a millisecond
FAIL_FAST_LATENCY_MS = (0.5, 1.5)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Call:
    """A dependency call: each request on the owning route calls ``service``'s ``route``
    with the given probability."""

    service: str
    route: str
    probability: float = 1.0


@dataclass(frozen=True)
class RouteSpec:
    """One route of a service. ``weight`` is its share of the service's external traffic;
    latency is log-normal with the given median and sigma (of the log)."""

    path: str
    method: str = "GET"
    weight: float = 1.0
    median_ms: float = 40.0
    sigma: float = 0.4
    calls: tuple[Call, ...] = ()


@dataclass(frozen=True)
class ServiceSpec:
    """A service: its routes, the share of the base rate it receives from outside the
    fleet, its instance count and its current version number."""

    name: str
    routes: tuple[RouteSpec, ...]
    external_share: float = 0.5
    instances: int = 3
    version: int = 41

    def route(self, path: str) -> RouteSpec:
        for route in self.routes:
            if route.path == path:
                return route
        raise KeyError(f"service {self.name!r} has no route {path!r}")


@dataclass(frozen=True)
class FleetConfig:
    """Everything that shapes the fleet's normal behaviour. Validated on construction:
    a bad value raises ``ValueError`` naming the field, the value and the reason."""

    services: tuple[ServiceSpec, ...]
    base_rate_per_s: float = 200.0  # external arrivals per second at the diurnal peak (share 1)
    diurnal_min_fraction: float = 0.3
    diurnal_peak_hour: float = 15.0
    start_hour: float = 12.0  # simulated time of day at offset 0: runs start near the peak
    rate_noise: float = 0.05  # sigma of the per-tick multiplicative noise on external rates
    background_error_rate: float = 0.003
    instance_variation: float = 0.08  # sigma of the per-instance latency/error factors
    peak_utilisation: float = 0.18  # utilisation at the diurnal peak with no incident
    max_queue_factor: float = 20.0
    error_propagation: float = 0.5  # chance a downstream error fails the caller's request
    network_ms: float = 0.8
    error_event_share: float = 0.2  # share of 5xx answers that also log an error event
    start_ts: float = 1_700_000_000.0  # epoch seconds of simulated offset 0

    def __post_init__(self) -> None:
        _validate_config(self)

    def service(self, name: str) -> ServiceSpec:
        for spec in self.services:
            if spec.name == name:
                return spec
        raise KeyError(f"no service {name!r} in the fleet")

    @property
    def service_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.services)


def _validate_config(config: FleetConfig) -> None:
    def bad(name: str, value: object, reason: str) -> ValueError:
        return ValueError(f"FleetConfig.{name}={value!r}: {reason}")

    if not config.services:
        raise bad("services", config.services, "at least one service is needed")
    names = [s.name for s in config.services]
    if len(set(names)) != len(names):
        raise bad("services", names, "service names must be unique")
    for fname in ("base_rate_per_s", "peak_utilisation", "network_ms"):
        value = getattr(config, fname)
        if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
            raise bad(fname, value, "must be a positive finite number")
    for fname in ("diurnal_min_fraction", "background_error_rate", "error_propagation",
                  "error_event_share"):
        value = getattr(config, fname)
        if not (0.0 <= value <= 1.0):
            raise bad(fname, value, "must be within [0, 1]")
    if not config.peak_utilisation < 1.0:
        raise bad("peak_utilisation", config.peak_utilisation, "must be below 1")
    by_name = {s.name: s for s in config.services}
    for spec in config.services:
        if spec.instances < 1:
            raise bad("services", spec.name, f"instances={spec.instances} must be >= 1")
        if not spec.routes:
            raise bad("services", spec.name, "a service needs at least one route")
        paths = [r.path for r in spec.routes]
        if len(set(paths)) != len(paths):
            raise bad("services", spec.name, f"route paths must be unique: {paths}")
        for route in spec.routes:
            if route.median_ms <= 0 or route.sigma < 0 or route.weight < 0:
                raise bad("services", f"{spec.name}{route.path}",
                          "median_ms > 0, sigma >= 0 and weight >= 0 are required")
            callees = [c.service for c in route.calls]
            if len(set(callees)) != len(callees):
                raise bad("services", f"{spec.name}{route.path}",
                          "a route calls each dependency at most once")
            for call in route.calls:
                callee = by_name.get(call.service)
                if callee is None or call.route not in {r.path for r in callee.routes}:
                    raise bad("services", f"{spec.name}{route.path}",
                              f"calls unknown route {call.service}{call.route}")
                if not 0.0 <= call.probability <= 1.0:
                    raise bad("services", f"{spec.name}{route.path}",
                              f"call probability {call.probability} outside [0, 1]")
    topological_order(config)  # raises on a cycle


def topological_order(config: FleetConfig) -> tuple[str, ...]:
    """Services ordered callers first. Traffic is computed in this order and latency in
    the reverse one, which is why the dependency graph must be acyclic."""
    edges = {s.name: {c.service for r in s.routes for c in r.calls} for s in config.services}
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ValueError(f"FleetConfig.services: dependency cycle {' -> '.join(trail)}")
        state[name] = 1
        for callee in sorted(edges[name]):
            visit(callee, (*trail, callee))
        state[name] = 2
        order.append(name)

    for spec in config.services:
        visit(spec.name, (spec.name,))
    return tuple(reversed(order))


def series_key(service: str, route: str, dependency: str = "") -> str:
    """The series id used everywhere in Stanch: ``service|route|dependency``."""
    return f"{service}|{route}|{dependency}"


def callers_of(config: FleetConfig, service: str, route: str) -> list[tuple[str, str]]:
    """(caller service, caller route) pairs whose route calls ``service``'s ``route``."""
    return [
        (spec.name, r.path)
        for spec in config.services
        for r in spec.routes
        for c in r.calls
        if c.service == service and c.route == route
    ]


def upstream_series(config: FleetConfig, service: str, routes: Iterable[str]) -> list[str]:
    """The series an effect on ``service``'s ``routes`` reaches: the routes themselves,
    every caller's egress series to them and, transitively, the callers' own ingress
    series (latency adds up and errors propagate along calls). Sorted, no duplicates."""
    found: set[str] = set()
    pending = [(service, r) for r in routes]
    seen: set[tuple[str, str]] = set()
    while pending:
        svc, path = pending.pop()
        if (svc, path) in seen:
            continue
        seen.add((svc, path))
        found.add(series_key(svc, path))
        for caller, caller_route in callers_of(config, svc, path):
            found.add(series_key(caller, path, svc))
            pending.append((caller, caller_route))
    return sorted(found)


def own_series(config: FleetConfig, service: str) -> list[str]:
    """Every series a service itself reports: its ingress routes and its egress calls."""
    spec = config.service(service)
    keys = {series_key(service, r.path) for r in spec.routes}
    keys |= {series_key(service, c.route, c.service) for r in spec.routes for c in r.calls}
    return sorted(keys)


def _core_services() -> tuple[ServiceSpec, ...]:
    """Six services of a small shop. Order matters: a fleet of N keeps the first N."""
    return (
        ServiceSpec("gateway", external_share=1.0, version=41, routes=(
            RouteSpec("/api/search", "GET", 0.35, 25.0, 0.35, (Call("search", "/search"),)),
            RouteSpec("/api/checkout", "POST", 0.2, 30.0, 0.35,
                      (Call("checkout", "/checkout"),)),
            RouteSpec("/api/account", "GET", 0.25, 20.0, 0.3,
                      (Call("users", "/users/{id}"),)),
            RouteSpec("/api/home", "GET", 0.2, 40.0, 0.4,
                      (Call("users", "/users/{id}", 0.5),
                       Call("search", "/recommendations"))),
        )),
        ServiceSpec("checkout", external_share=0.3, version=57, routes=(
            RouteSpec("/checkout", "POST", 0.5, 80.0, 0.4,
                      (Call("payments", "/charge"), Call("inventory", "/reserve"))),
            RouteSpec("/cart", "GET", 0.5, 30.0, 0.35, (Call("inventory", "/stock", 0.5),)),
        )),
        ServiceSpec("payments", external_share=0.4, version=41, routes=(
            RouteSpec("/charge", "POST", 0.6, 120.0, 0.45),
            RouteSpec("/refund", "POST", 0.1, 100.0, 0.45),
            RouteSpec("/status", "GET", 0.3, 20.0, 0.3),
        )),
        ServiceSpec("inventory", external_share=0.3, version=23, routes=(
            RouteSpec("/stock", "GET", 0.6, 25.0, 0.3),
            RouteSpec("/reserve", "POST", 0.4, 45.0, 0.4),
        )),
        ServiceSpec("search", external_share=0.3, version=112, routes=(
            RouteSpec("/search", "GET", 0.6, 60.0, 0.45),
            RouteSpec("/recommendations", "GET", 0.4, 90.0, 0.5,
                      (Call("inventory", "/stock", 0.3),)),
        )),
        ServiceSpec("users", external_share=0.4, version=8, routes=(
            RouteSpec("/users/{id}", "GET", 0.6, 20.0, 0.3),
            RouteSpec("/login", "POST", 0.25, 70.0, 0.4),
            RouteSpec("/users/{id}/billing", "GET", 0.15, 35.0, 0.35,
                      (Call("payments", "/status"),)),
        )),
    )


def _extra_service(index: int, earlier: list[str]) -> ServiceSpec:
    """A synthetic service for fleets larger than the core six; its layout depends only
    on its index, so a fleet of N always contains the same services."""
    rng = np.random.default_rng(10_000 + index)
    name = f"svc{index:02d}"
    routes = []
    for j in range(int(rng.integers(2, 5))):
        calls: tuple[Call, ...] = ()
        if earlier and rng.random() < 0.4:
            callee = earlier[int(rng.integers(0, len(earlier)))]
            calls = (Call(callee, "/r0", float(round(rng.uniform(0.2, 1.0), 2))),)
        routes.append(RouteSpec(f"/r{j}", "GET", float(round(rng.uniform(0.1, 1.0), 2)),
                                float(round(rng.uniform(20, 120), 1)),
                                float(round(rng.uniform(0.3, 0.5), 2)), calls))
    return ServiceSpec(name, tuple(routes), external_share=float(round(rng.uniform(0.3, 1.0), 2)),
                       version=int(rng.integers(3, 90)))


def default_fleet_config(services: int | None = None, **overrides: Any) -> FleetConfig:
    """The default fleet: the core six services, or the first ``services`` of them, or
    the six plus synthetic ones (``svc06``...). Calls to services left out are dropped."""
    core = list(_core_services())
    count = len(core) if services is None else int(services)
    if count < 1:
        raise ValueError(f"services={services!r}: at least one service is needed")
    specs = core[:count]
    extra_names: list[str] = []
    for index in range(len(core), count):
        specs.append(_extra_service(index, extra_names))
        extra_names.append(f"svc{index:02d}")
    kept = {s.name for s in specs}
    pruned = tuple(
        ServiceSpec(s.name, tuple(
            RouteSpec(r.path, r.method, r.weight, r.median_ms, r.sigma,
                      tuple(c for c in r.calls if c.service in kept))
            for r in s.routes), s.external_share, s.instances, s.version)
        for s in specs
    )
    return FleetConfig(services=pruned, **overrides)


def diurnal_factor(config: FleetConfig, offset_s: float) -> float:
    """Share of the peak rate at simulated offset ``offset_s``: a raised cosine over the
    day with its top at ``diurnal_peak_hour`` and its bottom (``diurnal_min_fraction``)
    twelve hours away. Smooth, so detectors see a realistic slow trend."""
    hour = (config.start_hour + offset_s / 3600.0) % 24.0
    phase = 2.0 * math.pi * (hour - config.diurnal_peak_hour) / 24.0
    low = config.diurnal_min_fraction
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(phase))


# --------------------------------------------------------------------------- output


@dataclass
class FleetOutput:
    """Events for one interval. ``requests`` is batched per service (the Kafka key) and
    holds both ingress events and egress events (``dependency`` set)."""

    requests: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def request_count(self) -> int:
        return sum(len(batch) for batch in self.requests.values())

    @property
    def event_count(self) -> int:
        return self.request_count + len(self.errors) + len(self.changes)


@dataclass(frozen=True)
class CommandResult:
    """What the fleet did with a command, shaped like an ack's status and reason."""

    status: str  # applied | rejected | expired
    reason: str = ""


@dataclass
class _Batch:
    """One (service, route) for one tick: arrivals in pass 1, outcomes in pass 2."""

    service: str
    route: RouteSpec
    ts: np.ndarray
    pre_status: np.ndarray  # 0 = accepted, else the status the sidecar answered with
    sources: dict[tuple[str, str], tuple[int, int]]  # (caller, caller route) -> slice
    calls: list[tuple[Call, np.ndarray, bool]] = field(default_factory=list)
    latency: np.ndarray = field(default_factory=lambda: np.empty(0))
    status: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    instance: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    timeout: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    # per call made: (call, caller indexes, egress latency, egress status, refused: cut
    # by an isolation)
    egress: list[tuple[Call, np.ndarray, np.ndarray, np.ndarray, bool]] = field(
        default_factory=list)


# --------------------------------------------------------------------------- fleet


class Fleet:
    """The simulated fleet. Call ``events_between`` with consecutive intervals of
    simulated epoch time; call ``apply_command`` whenever a command arrives.

    Deterministic: the same config, scenario, seed and sequence of calls give the same
    events. Not thread-safe (one runner drives it)."""

    def __init__(self, config: FleetConfig, scenario: Scenario, seed: int) -> None:
        self.config = config
        self.scenario = scenario
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._order = topological_order(config)
        self._specs = {s.name: s for s in config.services}
        self._instance_names = {
            s.name: np.array([f"{s.name}-{i}" for i in range(s.instances)], dtype=object)
            for s in config.services
        }
        spread = config.instance_variation
        self._instance_latency = {
            s.name: np.exp(self._rng.normal(0.0, spread, s.instances))
            for s in config.services
        }
        self._instance_errors = {
            s.name: np.exp(self._rng.normal(0.0, 2 * spread, s.instances))
            for s in config.services
        }
        self._versions = {s.name: np.full(s.instances, s.version, dtype=np.int64)
                          for s in config.services}
        self._stable_version = {s.name: s.version for s in config.services}
        # (service, version) -> (added error rate, latency multiplier)
        self._version_profile: dict[tuple[str, int], tuple[float, float]] = {}
        # timeline of scheduled state changes: (ts, seq, action, payload)
        self._timeline: list[tuple[float, int, str, dict[str, Any]]] = []
        self._seq = 0
        self._pending_changes: list[dict[str, Any]] = []
        # what the sidecars in front of each service enforce: one table per service, the
        # fleet-wide budget of its instances (a throttle caps the service's total rate)
        self.tables = {s.name: EnforcementTable() for s in config.services}
        self._lifted: list[tuple[str, Enforcement]] = []
        self._capacity = self._peak_capacity()
        self._now = config.start_ts
        for deploy in scenario.deploys():
            self._schedule_bad_deploy(deploy)

    # ------------------------------------------------------------------ public

    @property
    def now(self) -> float:
        """End of the last generated interval (simulated epoch seconds)."""
        return self._now

    def version_of(self, service: str) -> list[str]:
        """Current version tag of each instance of ``service``."""
        return [f"v{v}" for v in self._versions[service].tolist()]

    def active_commands(self, service: str, now: float) -> list[dict[str, Any]]:
        """Commands still in force on ``service`` at ``now`` (for status pages and tests)."""
        return [
            {"id": e.command_id, "kind": e.kind, "target": e.target, "params": dict(e.params),
             "expires_at": e.expires_at}
            for e in self.tables[service].active() if e.expires_at > now
        ]

    def expected_rate(self, service: str, offset_s: float) -> float:
        """Expected external arrivals per second at ``service`` with no incident: the
        diurnal curve without generating events (used to check the curve cheaply)."""
        spec = self._specs[service]
        return self.config.base_rate_per_s * spec.external_share * diurnal_factor(
            self.config, offset_s)

    def events_between(self, t0: float, t1: float) -> FleetOutput:
        """All events with ``t0 <= ts < t1`` (simulated epoch seconds). Intervals must be
        consecutive and short (0.05-2 s): effects are evaluated once per interval."""
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            raise ValueError(f"events_between: need finite t0 < t1, got t0={t0!r} t1={t1!r}")
        out = FleetOutput()
        for name, table in self.tables.items():
            self._lifted.extend((name, e) for e in table.expire(t0))
        self._run_timeline(t0, out)
        out.changes.extend(self._pending_changes)
        self._pending_changes = []
        dt = t1 - t0
        offset = 0.5 * (t0 + t1) - self.config.start_ts
        batches, utilisation = self._arrivals(t0, dt, offset)
        self._outcomes(batches, utilisation, offset)
        self._emit(batches, t0, t1, out)
        self._now = t1
        return out

    def apply_command(self, command: Mapping[str, Any], now: float) -> CommandResult:
        """Apply an enforcement command (a dict shaped like DESIGN.md's command) the way
        a sidecar in front of the service does once its gate let it through: through
        ``models.enforcement.EnforcementTable`` (one per service: the fleet-wide budget
        of its instances). The signature is the gate's business (``FleetSidecars``), not
        checked here. Never raises: a bad command comes back as ``rejected`` with the
        field and the reason; a rollback the fleet cannot run as ``failed``."""
        try:
            cmd = parse_command(command)
        except CommandError as exc:
            return CommandResult("rejected", f"bad command: {exc}")
        return self.apply_parsed(cmd, now)

    def apply_parsed(self, cmd: ParsedCommand, now: float, *,
                     run_rollback: bool = True) -> CommandResult:
        """``apply_command`` for a command already parsed (and verified by a gate).
        ``run_rollback=False`` leaves a rollback to someone else (the demo's real
        sidecars run it through their webhook)."""
        table = self.tables.get(cmd.service)
        if table is None:
            return CommandResult("rejected", f"service={cmd.service!r}: not in this fleet")
        if cmd.expires_at <= now:
            return CommandResult("expired", f"expires_at={cmd.expires_at} <= now={now}")
        outcome = table.apply(cmd, now)
        if not outcome.run_rollback:
            return CommandResult(outcome.status, outcome.reason)
        if not run_rollback:  # not claimed: the hook's own apply_command runs it
            return CommandResult("applied", "rollback left to the sidecar's hook")
        table.mark_rollback_done(cmd.id)  # claimed: never started twice, as the sidecar
        return self._rollback(cmd.service, cmd.target, cmd.id, now)

    def take_lifted(self) -> list[tuple[str, Enforcement]]:
        """(service, enforcement) whose lease passed since the last call: lifted (fail
        open) at the start of the tick that passed it, as the sidecar's expiry loop
        does (the answer feeds the expiry acks)."""
        lifted, self._lifted = self._lifted, []
        return lifted

    # ------------------------------------------------------------------ commands

    def _rollback(self, service: str, target: Any, command_id: str, now: float) -> CommandResult:
        version = _parse_version(target) if target is not None else self._stable_version[service]
        if version is None:
            return CommandResult("failed", f"target={target!r}: expected a version like 'v41'")
        current = self._versions[service]
        if bool(np.all(current == version)):
            return CommandResult("applied", f"{service} already on v{version}")
        from_version = int(current[np.argmax(current != version)])
        self._timeline = [e for e in self._timeline
                          if not (e[2] == "switch" and e[3]["service"] == service)]
        current[:] = version
        self._stable_version[service] = version
        self._pending_changes.append({
            "ts": round(now, 6), "service": service, "change_id": f"rollback:{command_id}",
            "kind": "deploy", "from_version": f"v{from_version}", "to_version": f"v{version}",
            "author": "stanch", "description": f"rollback by command {command_id}",
        })
        return CommandResult("applied", f"{service} rolled back to v{version}")

    # ------------------------------------------------------------------ deploys

    def _schedule(self, ts: float, action: str, payload: dict[str, Any]) -> None:
        self._seq += 1
        self._timeline.append((ts, self._seq, action, payload))
        self._timeline.sort(key=lambda e: (e[0], e[1]))

    def _schedule_bad_deploy(self, deploy: Any) -> None:
        """A deploy of v(N+1) at onset, rolled out one instance at a time; the new
        version errors and is slow, the old one keeps its behaviour. At the end of the
        incident an on-call engineer rolls back if nobody did before."""
        spec = self._specs[deploy.service]
        new = spec.version + 1
        self._version_profile[(deploy.service, new)] = (deploy.error_rate, deploy.latency_mult)
        onset = self.config.start_ts + deploy.onset_s
        step = deploy.rollout_s / max(1, spec.instances - 1) if spec.instances > 1 else 0.0
        self._schedule(onset, "change", {
            "service": deploy.service, "change_id": f"deploy:{deploy.service}:v{new}",
            "kind": "deploy", "from_version": f"v{spec.version}", "to_version": f"v{new}",
            "author": "ci-bot", "description": f"release v{new} of {deploy.service}"})
        for i in range(spec.instances):
            self._schedule(onset + i * step, "switch",
                           {"service": deploy.service, "instance": i, "version": new})
        self._schedule(onset + deploy.duration_s, "manual-rollback",
                       {"service": deploy.service, "bad": new, "good": spec.version})

    def _run_timeline(self, t0: float, out: FleetOutput) -> None:
        """Apply scheduled changes due by ``t0``: they take effect from this tick on, so
        nothing shows before its onset."""
        while self._timeline and self._timeline[0][0] <= t0:
            ts, _, action, payload = self._timeline.pop(0)
            service = payload["service"]
            if action == "change":
                out.changes.append({"ts": round(ts, 6), **payload})
            elif action == "switch":
                self._versions[service][payload["instance"]] = payload["version"]
            elif action == "manual-rollback" and bool(
                    np.any(self._versions[service] == payload["bad"])):
                self._timeline = [e for e in self._timeline
                                  if not (e[2] == "switch" and e[3]["service"] == service)]
                self._versions[service][:] = payload["good"]
                out.changes.append({
                    "ts": round(ts, 6), "service": service,
                    "change_id": f"rollback:{service}:v{payload['good']}", "kind": "deploy",
                    "from_version": f"v{payload['bad']}", "to_version": f"v{payload['good']}",
                    "author": "on-call", "description": "manual rollback"})

    # ------------------------------------------------------------------ traffic

    def _peak_capacity(self) -> dict[str, float]:
        """Requests per second each service can take: its expected load at the diurnal
        peak with no incident, divided by ``peak_utilisation``."""
        arrivals: dict[tuple[str, str], float] = {}
        for name in self._order:
            spec = self._specs[name]
            total_weight = sum(r.weight for r in spec.routes) or 1.0
            for route in spec.routes:
                rate = arrivals.get((name, route.path), 0.0) + (
                    self.config.base_rate_per_s * spec.external_share * route.weight / total_weight)
                arrivals[(name, route.path)] = rate
                for call in route.calls:
                    key = (call.service, call.route)
                    arrivals[key] = arrivals.get(key, 0.0) + rate * call.probability
        return {
            name: max(1e-9, sum(arrivals[(name, r.path)] for r in self._specs[name].routes))
            / self.config.peak_utilisation
            for name in self._order
        }

    def _arrivals(self, t0: float, dt: float, offset: float
                  ) -> tuple[dict[tuple[str, str], _Batch], dict[str, float]]:
        """Pass 1, callers first: who arrives where, what the sidecar lets in, and which
        accepted requests call which dependency. Expected rates ride along to give each
        service its utilisation without the noise of one tick's counts."""
        rng = self._rng
        cfg = self.config
        diurnal = diurnal_factor(cfg, offset)
        noise = np.exp(rng.normal(0.0, cfg.rate_noise, len(self._order)))
        incoming: dict[tuple[str, str], list[tuple[str, str, np.ndarray]]] = {}
        expected_in: dict[tuple[str, str], float] = {}
        batches: dict[tuple[str, str], _Batch] = {}
        utilisation: dict[str, float] = {}
        for index, name in enumerate(self._order):
            spec = self._specs[name]
            table = self.tables[name]
            total_weight = sum(r.weight for r in spec.routes) or 1.0
            surge = self.scenario.traffic_multiplier(name, offset)
            offered: dict[str, float] = {}
            arrived: list[tuple[RouteSpec, np.ndarray, dict[tuple[str, str], tuple[int, int]]]]
            arrived = []
            for route in spec.routes:
                key = (name, route.path)
                external = (cfg.base_rate_per_s * spec.external_share * route.weight
                            / total_weight * diurnal * float(noise[index]))
                normal = external + expected_in.get(key, 0.0)
                offered[route.path] = normal * surge
                extra = offered[route.path] - expected_in.get(key, 0.0)
                n_ext = int(rng.poisson(max(0.0, extra) * dt))
                parts = [t0 + rng.random(n_ext) * dt]
                sources: dict[tuple[str, str], tuple[int, int]] = {}
                start = n_ext
                for caller, caller_route, ts in incoming.get(key, []):
                    parts.append(ts)
                    sources[(caller, caller_route)] = (start, start + len(ts))
                    start += len(ts)
                arrived.append((route, np.concatenate(parts) if len(parts) > 1 else parts[0],
                                sources))
            pres = self._admit(table, arrived)
            accepted_total = 0.0
            for (route, ts_all, sources), pre in zip(arrived, pres, strict=True):
                n = len(ts_all)
                accepted = pre == 0
                # the share the sidecar let in, applied to the expected rate (utilisation
                # and the callees' expected arrivals stay free of one tick's noise)
                accepted_rate = offered[route.path] * (float(accepted.mean()) if n else 1.0)
                accepted_total += accepted_rate
                batch = _Batch(name, route, ts_all, pre, sources)
                for call in route.calls:
                    idx = np.flatnonzero(accepted & (rng.random(n) < call.probability))
                    out = np.asarray(table.admit_egress(call.service, ts_all[idx].tolist()),
                                     dtype=bool) if len(idx) else np.ones(0, dtype=bool)
                    cut, idx = idx[~out], idx[out]
                    if len(cut):
                        batch.calls.append((call, cut, True))
                    batch.calls.append((call, idx, False))
                    ckey = (call.service, call.route)
                    delay = cfg.network_ms / 1000.0 * (0.5 + rng.random(len(idx)))
                    incoming.setdefault(ckey, []).append(
                        (name, route.path, ts_all[idx] + delay))
                    passed = float(out.mean()) if len(out) else 1.0
                    expected_in[ckey] = (expected_in.get(ckey, 0.0)
                                         + accepted_rate * call.probability * passed)
                batches[(name, route.path)] = batch
            utilisation[name] = accepted_total / self._capacity[name]
        return batches, utilisation

    @staticmethod
    def _admit(table: EnforcementTable,
               arrived: list[tuple[RouteSpec, np.ndarray, Any]]) -> list[np.ndarray]:
        """The sidecar's ingress decision for every arrival of one service this tick, in
        time order across its routes (a service-wide throttle shares one bucket): the
        status it answered, 0 where the request went in."""
        pres = [np.zeros(len(ts), dtype=np.int64) for _, ts, _ in arrived]
        if not (table.throttles or table.sheds) or not any(len(p) for p in pres):
            return pres
        times = np.concatenate([ts for _, ts, _ in arrived])
        which = np.concatenate([np.full(len(ts), i) for i, (_, ts, _) in enumerate(arrived)])
        order = np.argsort(times, kind="stable")
        paths = [arrived[i][0].path for i in which[order].tolist()]
        status = np.empty(len(times), dtype=np.int64)
        status[order] = table.admit_ingress(paths, times[order].tolist())
        bounds = np.cumsum([0] + [len(p) for p in pres])
        return [status[bounds[i]:bounds[i + 1]] for i in range(len(pres))]

    def _queue_factor(self, utilisation: float) -> float:
        """Latency multiplier from queueing, relative to an idle service: 1/(1-u) (M/M/1),
        capped so a saturated service is very slow rather than infinitely slow."""
        u = min(max(utilisation, 0.0), 0.97)
        return min(self.config.max_queue_factor, 1.0 / (1.0 - u))

    def _outcomes(self, batches: dict[tuple[str, str], _Batch],
                  utilisation: dict[str, float], offset: float) -> None:
        """Pass 2, callees first: latency and status of every request, then of the
        callers that waited on them."""
        rng = self._rng
        cfg = self.config
        for name in reversed(self._order):
            spec = self._specs[name]
            q = self._queue_factor(utilisation[name])
            overload = max(0.0, utilisation[name] - 0.9) * 2.0
            versions = self._versions[name]
            v_err = np.array([self._version_profile.get((name, int(v)), (0.0, 1.0))[0]
                              for v in versions])
            v_lat = np.array([self._version_profile.get((name, int(v)), (0.0, 1.0))[1]
                              for v in versions])
            inst_lat = self._instance_latency[name] * v_lat
            inst_err = self._instance_errors[name] * cfg.background_error_rate + v_err
            for route in spec.routes:
                b = batches[(name, route.path)]
                n = len(b.ts)
                effect = self.scenario.route_effect(name, route.path, offset)
                inst = rng.integers(0, spec.instances, n)
                lat = rng.lognormal(math.log(route.median_ms), route.sigma, n)
                lat *= inst_lat[inst] * (effect.latency_mult * q)
                p_err = inst_err[inst] + (effect.error_rate + overload)
                failed = rng.random(n) < p_err
                status = np.where(failed, 500, 200)
                timeout = np.zeros(n, dtype=bool)
                if effect.timeout_share > 0.0:
                    timeout = failed & (rng.random(n) < effect.timeout_share)
                    lat[timeout] = effect.timeout_ms * (1.0 + 0.5 * rng.random(int(timeout.sum())))
                    status[timeout] = 504
                for call, idx, cut in b.calls:
                    if cut:
                        e_lat = rng.uniform(*FAIL_FAST_LATENCY_MS, len(idx))
                        e_status = np.full(len(idx), 503)
                    else:
                        callee = batches[(call.service, call.route)]
                        lo, hi = callee.sources[(name, route.path)]
                        e_lat = callee.latency[lo:hi] + cfg.network_ms
                        e_status = callee.status[lo:hi]
                    b.egress.append((call, idx, e_lat, e_status, cut))
                    lat[idx] += e_lat
                    spread = (e_status >= 500) & (rng.random(len(idx)) < cfg.error_propagation)
                    hit = idx[spread]
                    status[hit[status[hit] == 200]] = 502
                rejected = b.pre_status != 0
                if rejected.any():
                    status[rejected] = b.pre_status[rejected]
                    lat[rejected] = rng.uniform(*REJECT_LATENCY_MS, int(rejected.sum()))
                    timeout[rejected] = False
                b.latency, b.status, b.instance, b.timeout = lat, status, inst, timeout

    # ------------------------------------------------------------------ emission

    def _emit(self, batches: dict[tuple[str, str], _Batch], t0: float, t1: float,
              out: FleetOutput) -> None:
        """Turn arrays into event dicts in bulk; drop what a telemetry gap hides and
        sample error events from the 5xx answers."""
        for name in self._order:
            spec = self._specs[name]
            names = self._instance_names[name]
            version_tags = np.array([f"v{v}" for v in self._versions[name].tolist()],
                                    dtype=object)
            gaps = [(self.config.start_ts + a, self.config.start_ts + b)
                    for a, b in self.scenario.telemetry_gaps(name)
                    if self.config.start_ts + a < t1 and self.config.start_ts + b > t0]
            events: list[dict[str, Any]] = []
            for route in spec.routes:
                b = batches[(name, route.path)]
                keep = _visible(b.ts, gaps)
                events.extend(_ingress_dicts(name, route, b, names, version_tags, keep))
                self._error_events(name, route, b, names, version_tags, keep, out)
                for call, idx, e_lat, e_status, refused in b.egress:
                    if len(idx) == 0:
                        continue
                    callee_route = self._specs[call.service].route(call.route)
                    ts = b.ts[idx]
                    e_keep = _visible(ts, gaps)
                    events.extend(_egress_dicts(
                        name, callee_route, call.service, ts, e_lat, e_status,
                        names[b.instance[idx]], version_tags[b.instance[idx]], e_keep,
                        refused))
            if events:
                out.requests[name] = events

    def _error_events(self, name: str, route: RouteSpec, b: _Batch, names: np.ndarray,
                      version_tags: np.ndarray, keep: np.ndarray | None,
                      out: FleetOutput) -> None:
        faulty = (b.status >= 500) & (b.pre_status == 0)
        if keep is not None:
            faulty &= keep
        faulty &= self._rng.random(len(b.status)) < self.config.error_event_share
        for i in np.flatnonzero(faulty).tolist():
            status = int(b.status[i])
            version = str(version_tags[b.instance[i]])
            if status == 504 or b.timeout[i]:
                error_type, message = "TimeoutError", f"{route.path} timed out"
            elif status == 502:
                error_type, message = "DownstreamError", f"{route.path}: dependency failed"
            elif (name, _parse_version(version) or -1) in self._version_profile:
                error_type, message = "UnhandledException", f"{route.path} crashed on {version}"
            else:
                error_type, message = "InternalServerError", f"{route.path} failed"
            out.errors.append({
                "ts": round(float(b.ts[i]), 6), "service": name, "error_type": error_type,
                "message": message, "instance": str(names[b.instance[i]]), "version": version,
            })


def _visible(ts: np.ndarray, gaps: list[tuple[float, float]]) -> np.ndarray | None:
    """Mask of events outside every telemetry gap; None when nothing is hidden."""
    if not gaps:
        return None
    keep = np.ones(len(ts), dtype=bool)
    for start, end in gaps:
        keep &= ~((ts >= start) & (ts < end))
    return keep


def _ingress_dicts(service: str, route: RouteSpec, b: _Batch, names: np.ndarray,
                   version_tags: np.ndarray, keep: np.ndarray | None) -> list[dict[str, Any]]:
    order = np.argsort(b.ts, kind="stable")
    if keep is not None:
        order = order[keep[order]]
    inst = b.instance[order]
    path, method = route.path, route.method
    events = [
        {"ts": ts, "service": service, "route": path, "method": method, "status": st,
         "latency_ms": lat, "instance": i, "version": v}
        for ts, st, lat, i, v in zip(
            np.round(b.ts[order], 6).tolist(), b.status[order].tolist(),
            np.round(b.latency[order], 3).tolist(), names[inst].tolist(),
            version_tags[inst].tolist(), strict=True)
    ]
    # refused by a throttle or shed: error false, as the sidecar reports it
    for k in np.flatnonzero(b.pre_status[order] != 0).tolist():
        events[k]["error"] = False
    return events


def _egress_dicts(service: str, route: RouteSpec, dependency: str, ts: np.ndarray,
                  latency: np.ndarray, status: np.ndarray, instances: np.ndarray,
                  versions: np.ndarray, keep: np.ndarray | None,
                  refused: bool = False) -> list[dict[str, Any]]:
    """Egress events; calls ``refused`` by an isolation carry error false, as the
    sidecar reports its own fail-fast answers."""
    order = np.argsort(ts, kind="stable")
    if keep is not None:
        order = order[keep[order]]
    path, method = route.path, route.method
    extra = {"error": False} if refused else {}
    return [
        {"ts": t, "service": service, "route": path, "method": method, "status": st,
         "latency_ms": lat, "instance": i, "version": v, "dependency": dependency, **extra}
        for t, st, lat, i, v in zip(
            np.round(ts[order], 6).tolist(), status[order].tolist(),
            np.round(latency[order], 3).tolist(), instances[order].tolist(),
            versions[order].tolist(), strict=True)
    ]


def _parse_version(value: Any) -> int | None:
    """'v41' or 41 -> 41; anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value[1:] if value[:1] in ("v", "V") else value
        if text.isdigit():
            return int(text)
    return None


class FleetSidecars:
    """The sidecars in front of the simulated fleet, in-process: per service the
    sidecar's ``CommandGate`` (signature, service, replay and expiry checks) in front
    of the fleet's ``EnforcementTable``, and the acks a sidecar sends. Only the
    transport (Kafka, the proxy) is left out; every decision is the sidecar's code.

    ``verify`` raises ``ValueError`` on a bad signature (``schemas.signing.KeyRing``).
    ``run_rollbacks=False`` leaves rollbacks to real sidecars' webhooks (the demo)."""

    def __init__(self, fleet: Fleet, verify: Callable[[Mapping[str, Any]], None], *,
                 run_rollbacks: bool = True) -> None:
        self.fleet = fleet
        self.gates = {name: CommandGate(name, verify) for name in fleet.tables}
        self.run_rollbacks = run_rollbacks
        self.counts: dict[str, int] = {}

    def deliver(self, command: Any, message_key: str | None, now: float
                ) -> list[dict[str, Any]]:
        """One message of the commands topic, seen by every service's sidecar; returns
        the acks sent (none from the sidecars it is not for)."""
        acks: list[dict[str, Any]] = []
        for service, gate in self.gates.items():
            verdict = gate.check(command, message_key, now)
            self.counts[verdict.action] = self.counts.get(verdict.action, 0) + 1
            if verdict.action == "ignore":
                continue
            if verdict.action != "apply" or verdict.command is None:
                status = "rejected" if verdict.action == "reject" else "expired"
                acks.append(_ack(verdict.command_id, service, status, verdict.reason, now))
                continue
            result = self.fleet.apply_parsed(verdict.command, now,
                                             run_rollback=self.run_rollbacks)
            acks.append(_ack(verdict.command_id, service, result.status, result.reason, now))
        return acks

    def expiry_acks(self, now: float) -> list[dict[str, Any]]:
        """The acks of leases that passed without renewal (the sidecar's expiry loop)."""
        return [_ack(e.command_id, service, "expired", "lease ended without renewal", now)
                for service, e in self.fleet.take_lifted()]


def _ack(command_id: str, service: str, status: str, reason: str, now: float
         ) -> dict[str, Any]:
    return {"command_id": command_id[:1024], "service": service,
            "instance": f"{service}-sim", "status": status, "reason": reason[:4096],
            "at": now}
