"""The mitigation policy: what Stanch may do on its own, read from a TOML file.

Why a policy file and not settings: the policy is the operators' contract with an
automated responder (which actions it may take, how hard, how often, on which
services). It is reviewed like code, so it lives in a file (deploy/policy.example.toml
documents every key), is validated once at start-up and a mistake stops the worker
with a message that names the key and says what is wrong. Every key has a safe
default, so a missing file means "mitigate conservatively": short leases (nothing
stays throttled if Stanch dies), a cooldown, a small fleet-wide cap and a storm
guard.

Shape: one frozen dataclass per TOML table. `load_policy(path)` reads a file,
`policy_from_dict(d)` validates an already-parsed mapping (tests, overrides).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

MITIGATION_KINDS: tuple[str, ...] = ("rollback", "throttle", "isolate", "shed")
CHANGE_KINDS: tuple[str, ...] = ("deploy", "config")


class PolicyError(ValueError):
    """A policy that cannot be used: names the key, the value and what is wrong."""

    def __init__(self, key: str, value: object, reason: str, source: str = "") -> None:
        self.key = key
        self.value = value
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}policy key '{key}' = {value!r}: {reason}")


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass(frozen=True)
class IncidentPolicy:
    """How anomalies become incidents and when an incident gives up on automation."""

    group_window_s: float = field(default=120.0, metadata=_num(0, 86400, lo_open=True))
    min_callers: int = field(default=2, metadata=_num(1, 1000))
    escalate_after_s: float = field(default=900.0, metadata=_num(0, 7 * 86400, lo_open=True))
    telemetry_gap_s: float = field(default=15.0, metadata=_num(0, 86400))
    gap_min_windows: int = field(default=30, metadata=_num(1, 10**9))
    gap_drop_ratio: float = field(default=0.05, metadata=_num(0, 1))
    max_open: int = field(default=1000, metadata=_num(1, 10**6))


@dataclass(frozen=True)
class RollbackPolicy:
    """Roll a suspect change back to its from_version once the evidence confirms it."""

    enabled: bool = True
    kinds: tuple[str, ...] = field(default=CHANGE_KINDS, metadata={"choices": CHANGE_KINDS})
    suspect_window_s: float = field(default=300.0, metadata=_num(0, 86400, lo_open=True))
    onset_slack_s: float = field(default=5.0, metadata=_num(0, 3600))
    require_confirmed: bool = True
    evidence_wait_s: float = field(default=30.0, metadata=_num(0, 3600))
    min_version_requests: int = field(default=20, metadata=_num(1, 10**9))
    min_error_ratio: float = field(default=2.0, metadata=_num(1, 1000))
    min_error_delta: float = field(default=0.02, metadata=_num(0, 1))
    min_latency_ratio: float = field(default=1.5, metadata=_num(1, 1000))


@dataclass(frozen=True)
class ThrottlePolicy:
    """Cap a surging service or route at its baseline rate plus headroom."""

    enabled: bool = True
    headroom: float = field(default=0.2, metadata=_num(0, 100))
    min_rate_per_s: float = field(default=1.0, metadata=_num(0, 10**9, lo_open=True))
    per_route: bool = True
    overload_metrics: tuple[str, ...] = ("cpu", "queue_depth", "saturation")


@dataclass(frozen=True)
class IsolatePolicy:
    """Open the circuit at each caller of a failing dependency."""

    enabled: bool = True
    half_open_share: float = field(default=0.1, metadata=_num(0, 1, lo_open=True))
    # An open circuit fails every call to the dependency. It is worth that only when the
    # calls mostly fail already: with a failure share f, isolating turns the (1 - f)
    # calls that would have succeeded into failures to spare the f that fail anyway (a
    # slow or partly failing dependency is better served as it is). 0.5 is that break-even.
    min_failure_share: float = field(default=0.5, metadata=_num(0, 1))


@dataclass(frozen=True)
class ShedPolicy:
    """Drop a share of low-priority routes when a service saturates."""

    enabled: bool = True
    share: float = field(default=0.5, metadata=_num(0, 1, lo_open=True))
    after_s: float = field(default=30.0, metadata=_num(0, 3600))
    low_priority_routes: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class RestorePolicy:
    """Undo mitigations gradually once the incident's signals are back within baseline."""

    stable_s: float = field(default=60.0, metadata=_num(0, 86400, lo_open=True))
    step_s: float = field(default=15.0, metadata=_num(0, 3600, lo_open=True))
    step_factor: float = field(default=2.0, metadata=_num(1, 100, lo_open=True))
    max_steps: int = field(default=4, metadata=_num(0, 100))


@dataclass(frozen=True)
class VerifyPolicy:
    """Before and after every throttle, isolation or shed: did it help, or harm?

    The measure is the error responses served by the action's scope: the service it
    runs on, its target (an isolated dependency) and every service upstream of it
    (their answers now carry its fail-fast or throttled answers)."""

    # When a command is decided at event time `now` (the start of the newest window
    # seen), that window closed at now + window (1 s) + grace (0.5 s); the command then
    # reaches the sidecars within ~1 s. So it takes effect ~2.5 s after `now`, and the
    # first window wholly after it starts 3 s after `now`: windows from then on are its
    # effect, and for that long after a lift windows still straddle the lift.
    settle_s: float = field(default=3.0, metadata=_num(0, 3600))
    # windows compared before and after an action (5 s at 1 s windows: enough requests
    # for a Poisson comparison at the fleet's rates, short enough to revert "at once")
    compare_windows: int = field(default=5, metadata=_num(1, 1000))
    # worse (or better) = the error responses per window rose (fell) by more than this
    # many standard deviations of the difference of two Poisson rates: 3 sigma, a chance
    # below 0.2 % that noise alone makes a harmless action look harmful
    worse_z: float = field(default=3.0, metadata=_num(0, 100, lo_open=True))
    # an action that neither made the incident recover nor brought its error responses
    # down this long after it was issued is lifted (fail open) and the incident escalated
    # to a human: 3 x restore.stable_s, since proving recovery alone takes stable_s after
    # the fault ends (see docs/mitigation.md)
    improve_within_s: float = field(default=180.0, metadata=_num(0, 86400, lo_open=True))


@dataclass(frozen=True)
class SafeguardPolicy:
    """The brakes: dry-run, approval, cooldown, hysteresis, cap, storm guard, leases."""

    dry_run: bool = False
    approval: bool = False
    cooldown_s: float = field(default=300.0, metadata=_num(0, 86400))
    min_anomalies: int = field(default=2, metadata=_num(1, 10**6))
    min_duration_s: float = field(default=0.0, metadata=_num(0, 86400))
    max_active: int = field(default=5, metadata=_num(0, 10**6))
    storm_share: float = field(default=0.5, metadata=_num(0, 1, lo_open=True))
    storm_min_services: int = field(default=3, metadata=_num(1, 10**6))
    storm_window_s: float = field(default=30.0, metadata=_num(0, 86400, lo_open=True))
    lease_s: float = field(default=60.0, metadata=_num(0, 86400, lo_open=True))
    renew_every_s: float = field(default=30.0, metadata=_num(0, 86400, lo_open=True))
    # The longest lease any command may carry (lease_s must not exceed it; sidecars
    # refuse longer ones, STANCH_MAX_LEASE_S, same default). 600 s: ten default leases,
    # room to raise lease_s, yet a dead Stanch lets everything lapse within 10 minutes.
    max_lease_s: float = field(default=600.0, metadata=_num(0, 86400, lo_open=True))


@dataclass(frozen=True)
class ServicePolicy:
    """Per-service overrides; unset (None) means "as the fleet-wide policy says"."""

    mitigate: bool = True
    allow: tuple[str, ...] = field(default=MITIGATION_KINDS, metadata={"choices": MITIGATION_KINDS})
    headroom: float | None = field(default=None, metadata=_num(0, 100))
    min_rate_per_s: float | None = field(default=None, metadata=_num(0, 10**9, lo_open=True))
    cooldown_s: float | None = field(default=None, metadata=_num(0, 86400))


@dataclass(frozen=True)
class Policy:
    """The whole policy. `Policy()` is the safe default."""

    incidents: IncidentPolicy = field(default_factory=IncidentPolicy)
    rollback: RollbackPolicy = field(default_factory=RollbackPolicy)
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    isolate: IsolatePolicy = field(default_factory=IsolatePolicy)
    shed: ShedPolicy = field(default_factory=ShedPolicy)
    restore: RestorePolicy = field(default_factory=RestorePolicy)
    verify: VerifyPolicy = field(default_factory=VerifyPolicy)
    safeguards: SafeguardPolicy = field(default_factory=SafeguardPolicy)
    services: dict[str, ServicePolicy] = field(default_factory=dict)

    def service(self, name: str) -> ServicePolicy:
        """The overrides of one service (defaults when it has none)."""
        return self.services.get(name) or ServicePolicy()

    def allows(self, service: str, kind: str) -> bool:
        """Whether `kind` may be used on `service` (fleet switch and service overrides)."""
        section = getattr(self, kind, None)
        if section is None or not getattr(section, "enabled", False):
            return False
        sp = self.service(service)
        return sp.mitigate and kind in sp.allow

    def headroom_for(self, service: str) -> float:
        sp = self.service(service)
        return self.throttle.headroom if sp.headroom is None else sp.headroom

    def min_rate_for(self, service: str) -> float:
        sp = self.service(service)
        return self.throttle.min_rate_per_s if sp.min_rate_per_s is None else sp.min_rate_per_s

    def cooldown_for(self, service: str) -> float:
        sp = self.service(service)
        return self.safeguards.cooldown_s if sp.cooldown_s is None else sp.cooldown_s

    def low_priority_routes(self, service: str) -> tuple[str, ...]:
        return self.shed.low_priority_routes.get(service, ())


_SECTIONS: dict[str, type] = {
    "incidents": IncidentPolicy,
    "rollback": RollbackPolicy,
    "throttle": ThrottlePolicy,
    "isolate": IsolatePolicy,
    "shed": ShedPolicy,
    "restore": RestorePolicy,
    "verify": VerifyPolicy,
    "safeguards": SafeguardPolicy,
}


def _type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _check_number(key: str, value: object, meta: dict, *, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        want = "an integer" if integer else "a number"
        raise PolicyError(key, value, f"must be {want}, got {_type_name(value)}")
    if integer and not isinstance(value, int):
        raise PolicyError(key, value, "must be an integer, got float")
    if not math.isfinite(value):
        raise PolicyError(key, value, "must be finite")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None:
        if meta.get("lo_open") and value <= lo:
            raise PolicyError(key, value, f"must be > {lo}")
        if value < lo:
            raise PolicyError(key, value, f"must be >= {lo}")
    if hi is not None and value > hi:
        raise PolicyError(key, value, f"must be <= {hi}")
    return value if integer else float(value)


def _check_str_list(key: str, value: object, choices: tuple[str, ...] | None) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise PolicyError(key, value, f"must be an array of strings, got {_type_name(value)}")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise PolicyError(f"{key}[{i}]", item, "must be a non-empty string")
        if choices is not None and item not in choices:
            raise PolicyError(f"{key}[{i}]", item, f"must be one of {', '.join(choices)}")
        out.append(item)
    return tuple(out)


def _check_value(key: str, f: Any, value: object) -> object:
    meta = dict(f.metadata)
    t = str(f.type)
    if t == "bool":
        if not isinstance(value, bool):
            raise PolicyError(key, value, f"must be true or false, got {_type_name(value)}")
        return value
    if t.startswith("int"):
        return _check_number(key, value, meta, integer=True)
    if t.startswith("float"):
        return _check_number(key, value, meta, integer=False)
    if t.startswith("tuple[str"):
        return _check_str_list(key, value, meta.get("choices"))
    if t.startswith("dict[str, tuple[str"):
        if not isinstance(value, dict):
            raise PolicyError(key, value, f"must be a table, got {_type_name(value)}")
        return {str(k): _check_str_list(f"{key}.{k}", v, None) for k, v in value.items()}
    raise PolicyError(key, value, f"unsupported field type {t}")  # pragma: no cover


def _build_section(cls: type, prefix: str, raw: object) -> Any:
    if not isinstance(raw, dict):
        raise PolicyError(prefix, raw, f"must be a table, got {_type_name(raw)}")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, object] = {}
    for key, value in raw.items():
        if key not in known:
            raise PolicyError(f"{prefix}.{key}", value,
                              f"unknown key (known: {', '.join(sorted(known))})")
        values[key] = _check_value(f"{prefix}.{key}", known[key], value)
    return cls(**values)


def _cross_checks(p: Policy) -> None:
    sg = p.safeguards
    if sg.renew_every_s >= sg.lease_s:
        raise PolicyError("safeguards.renew_every_s", sg.renew_every_s,
                          f"must be < safeguards.lease_s ({sg.lease_s}) or leases lapse "
                          "before they are renewed")
    if sg.lease_s > sg.max_lease_s:
        raise PolicyError("safeguards.lease_s", sg.lease_s,
                          f"must be <= safeguards.max_lease_s ({sg.max_lease_s}): sidecars "
                          "refuse longer leases")
    if p.restore.step_s >= sg.lease_s:
        raise PolicyError("restore.step_s", p.restore.step_s,
                          f"must be < safeguards.lease_s ({sg.lease_s})")
    for name in p.shed.low_priority_routes:
        if not name:
            raise PolicyError("shed.low_priority_routes", name, "service name must not be empty")


def policy_from_dict(raw: object, source: str = "") -> Policy:
    """Validate a parsed TOML mapping into a Policy (unknown keys are errors)."""
    try:
        if not isinstance(raw, dict):
            raise PolicyError("<root>", raw, "must be a table")
        sections: dict[str, Any] = {}
        services: dict[str, ServicePolicy] = {}
        for key, value in raw.items():
            if key in _SECTIONS:
                sections[key] = _build_section(_SECTIONS[key], key, value)
            elif key == "services":
                if not isinstance(value, dict):
                    raise PolicyError("services", value, "must be a table of [services.NAME]")
                for name, sub in value.items():
                    services[name] = _build_section(ServicePolicy, f"services.{name}", sub)
            else:
                known = sorted([*_SECTIONS, "services"])
                raise PolicyError(key, value, f"unknown table (known: {', '.join(known)})")
        policy = replace(Policy(), **sections, services=services)
        _cross_checks(policy)
        return policy
    except PolicyError as exc:
        if source and not exc.source:
            raise PolicyError(exc.key, exc.value, exc.reason, source) from None
        raise


def load_policy(path: Path | str | None) -> Policy:
    """Read and validate the policy file; None means the safe defaults."""
    if path is None:
        return Policy()
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise PolicyError("<file>", str(p), f"cannot read policy file: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError("<file>", str(p), "policy file is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError("<file>", str(p), f"not valid TOML: {exc}") from None
    return policy_from_dict(raw, source=str(p))
