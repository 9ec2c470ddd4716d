"""Pure enforcement logic of the sidecar: what to do with a command, and with a request.

Why pure: the sidecar's behaviour under attack (forged, replayed, expired commands)
and under load (throttle, shed, isolate) must be provable with fast deterministic
tests. Nothing here does I/O, reads a clock or draws random numbers: time is passed in
as ``now`` (epoch seconds), signature verification is an injected callable, and
"a share of requests" is realised with a deterministic accumulator (exactly
``share`` of the requests, evenly spread) instead of a random draw.

Pieces:
- ``RouteMatcher``: path -> bounded route template (telemetry cardinality, throttle keys).
- ``TokenBucket``: per-route rate limiting with a Retry-After.
- ``CommandGate``: the validation state machine (other service -> ignore; key mismatch,
  bad signature, malformed, replayed -> reject; expires_at past -> expire; else apply).
- ``EnforcementTable``: active enforcements, each with a lease (the command's
  expires_at); renewal, restore/ramp, expiry (fail open) and the O(1) per-request
  decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Tolerance for float time arithmetic on epoch seconds (resolution ~1e-7 near 1.7e9).
_EPS = 1e-6
KINDS = ("throttle", "rollback", "isolate", "restore", "shed")
LEASED_KINDS = ("throttle", "isolate", "shed")
ALL = "*"


# --------------------------------------------------------------------------- routes


class RouteMatcher:
    """Map a request path to a route template so series cardinality stays bounded.

    Templates look like ``/orders/{id}``: ``{name}`` matches one non-empty segment,
    anything else must match literally. A path no template matches falls back to its
    first segment (``/orders/*`` or ``/orders``); once ``max_fallbacks`` distinct first
    segments have been seen, further unknown ones collapse to ``/*`` so a scan of random
    paths cannot create unbounded series. Results are cached per path (bounded).
    """

    def __init__(
        self,
        templates: Iterable[str] = (),
        *,
        max_fallbacks: int = 1000,
        cache_size: int = 8192,
    ) -> None:
        self._by_len: dict[int, list[tuple[str, tuple[str | None, ...]]]] = {}
        self.templates: list[str] = []
        for template in templates:
            self._add(template)
        self._fallbacks: set[str] = set()
        self._max_fallbacks = max_fallbacks
        self._cache: dict[str, str] = {}
        self._cache_size = cache_size

    def _add(self, template: str) -> None:
        if not isinstance(template, str) or not template.startswith("/"):
            raise ValueError(f"route template: {template!r} must start with '/'")
        segments = _segments(template)
        pattern = tuple(
            None if (s.startswith("{") and s.endswith("}")) else s for s in segments
        )
        self._by_len.setdefault(len(segments), []).append((template, pattern))
        self.templates.append(template)

    def match(self, path: str) -> str:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        result = self._match_uncached(path)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[path] = result
        return result

    def _match_uncached(self, path: str) -> str:
        segments = _segments(path)
        for template, pattern in self._by_len.get(len(segments), ()):
            if all(p is None or p == s for p, s in zip(pattern, segments, strict=True)):
                return template
        if not segments:
            return "/"
        head = segments[0]
        if head not in self._fallbacks:
            if len(self._fallbacks) >= self._max_fallbacks:
                return "/*"
            self._fallbacks.add(head)
        return f"/{head}/*" if len(segments) > 1 else f"/{head}"


def _segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Decision:
    """What the proxy does with one request. ``status == 0`` means forward it."""

    status: int = 0
    reason: str = ""
    retry_after_s: int = 0
    isolated: str = ""

    @property
    def passes(self) -> bool:
        return self.status == 0


PASS = Decision()
SHED = Decision(503, "shed")


class TokenBucket:
    """Classic token bucket: ``rate_per_s`` refill, ``burst`` capacity, starts full."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.last = now

    def set_rate(self, rate_per_s: float, burst: float, now: float) -> None:
        self._refill(now)
        self.rate = rate_per_s
        self.burst = burst
        self.tokens = min(self.tokens, burst)

    def _refill(self, now: float) -> None:
        elapsed = now - self.last
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.last = now

    def take(self, now: float) -> float:
        """Take one token; return 0.0 if allowed, else the seconds until one is there."""
        self._refill(now)
        if self.tokens >= 1.0 - _EPS:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (1.0 - self.tokens) / self.rate


class ShareGate:
    """Selects exactly ``share`` of the calls, evenly spread (deterministic)."""

    __slots__ = ("acc", "share")

    def __init__(self, share: float) -> None:
        self.share = share
        self.acc = 0.0

    def hit(self) -> bool:
        self.acc += self.share
        if self.acc >= 1.0 - _EPS:
            self.acc -= 1.0
            return True
        return False


# --------------------------------------------------------------------------- commands


class CommandError(ValueError):
    """A command is structurally invalid; the message names field, value and reason."""


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """The fields of a command the enforcement logic needs, type-checked."""

    id: str
    kind: str
    service: str
    target: str
    params: Mapping[str, Any]
    incident_id: str
    issued_at: float
    expires_at: float
    reason: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)


def parse_command(obj: Any) -> ParsedCommand:
    """Check the shape of a command dict and the params of its kind."""
    if not isinstance(obj, Mapping):
        raise CommandError("command: not a JSON object")

    def text(name: str, *, required: bool = True) -> str:
        value = obj.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value):
            raise CommandError(f"{name}: {value!r} must be a non-empty string")
        return value

    def number(name: str) -> float:
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            raise CommandError(f"{name}: {value!r} must be a finite number (epoch seconds)")
        return float(value)

    kind = text("kind")
    if kind not in KINDS:
        raise CommandError(f"kind: {kind!r} must be one of {', '.join(KINDS)}")
    params = obj.get("params")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise CommandError(f"params: {params!r} must be an object")
    target = obj.get("target")
    if target is None:
        target = ""
    if not isinstance(target, str):
        raise CommandError(f"target: {target!r} must be a string")
    cmd = ParsedCommand(
        id=text("id"),
        kind=kind,
        service=text("service"),
        target=target,
        params=params,
        incident_id=text("incident_id", required=False),
        issued_at=number("issued_at"),
        expires_at=number("expires_at"),
        reason=text("reason", required=False),
        raw=obj,
    )
    _check_params(cmd)
    return cmd


def _share(params: Mapping[str, Any], name: str, default: float | None = None) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise CommandError(f"params.{name}: {value!r} must be a number in [0, 1]")
    return float(value)


def _positive(params: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = params.get(name)
    if value is None and not required:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise CommandError(f"params.{name}: {value!r} must be a finite number >= 0")
    return float(value)


def _check_params(cmd: ParsedCommand) -> None:
    p = cmd.params
    if cmd.kind == "throttle":
        _positive(p, "rate_per_s", required=True)
        _positive(p, "burst", required=False)
        route = p.get("route")
        if route is not None and not isinstance(route, str):
            raise CommandError(f"params.route: {route!r} must be a route template string")
    elif cmd.kind == "shed":
        _share(p, "share")
        routes = p.get("routes", [])
        if routes is None:
            routes = []
        if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
            raise CommandError(f"params.routes: {routes!r} must be a list of route templates")
    elif cmd.kind == "isolate":
        if not cmd.target:
            raise CommandError("target: isolate needs the dependency name as target")
        if "half_open_share" in p:
            _share(p, "half_open_share")
    elif cmd.kind == "rollback":
        if not cmd.target:
            raise CommandError("target: rollback needs the version to roll back to")
    elif cmd.kind == "restore":
        kind = p.get("kind")
        if kind not in LEASED_KINDS:
            raise CommandError(
                f"params.kind: {kind!r} must be one of {', '.join(LEASED_KINDS)}"
            )
        if p.get("step") is not None and _share(p, "step") == 0:
            raise CommandError("params.step: 0 must be in (0, 1]")
        _positive(p, "rate_per_s", required=False)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome of the gate: ``action`` is apply | ignore | reject | expire."""

    action: str
    reason: str = ""
    command: ParsedCommand | None = None
    command_id: str = ""


class CommandGate:
    """Validation state machine for incoming commands of one service.

    Order matters: a command for someone else is ignored before anything else (no ack:
    it is not ours to judge); a key/service mismatch, a bad signature or a malformed
    body is rejected; only a *verified* id is remembered, so forged messages cannot
    poison the replay set; a verified id seen before is "replayed"; a verified, new
    command whose lease is already over is "expired".
    """

    def __init__(self, service: str, verify: Callable[[Mapping[str, Any]], None]) -> None:
        self.service = service
        self._verify = verify
        self._seen: dict[str, float] = {}  # id -> expires_at, pruned after expiry
        self._prune_at = 1024

    def seen(self, command_id: str) -> bool:
        return command_id in self._seen

    def remember(self, command_id: str, expires_at: float) -> None:
        self._seen[command_id] = expires_at

    def check(
        self,
        obj: Any,
        message_key: str | None,
        now: float,
        *,
        parse: Callable[[Any], Any] | None = None,
    ) -> Verdict:
        """Judge one decoded command. ``parse`` is an extra schema check (records)."""
        own = self.service
        service = obj.get("service") if isinstance(obj, Mapping) else None
        command_id = obj.get("id") if isinstance(obj, Mapping) else None
        command_id = command_id if isinstance(command_id, str) else ""
        key_ok = message_key is None or message_key == own
        if service != own:
            if message_key == own:
                return Verdict(
                    "reject",
                    f"service {service!r} does not match message key {message_key!r}",
                    command_id=command_id,
                )
            return Verdict("ignore", "other service", command_id=command_id)
        if not key_ok:
            return Verdict(
                "reject",
                f"service {service!r} does not match message key {message_key!r}",
                command_id=command_id,
            )
        try:
            self._verify(obj)
        except ValueError as exc:
            return Verdict("reject", str(exc), command_id=command_id)
        try:
            if parse is not None:
                parse(obj)
            cmd = parse_command(obj)
        except ValueError as exc:
            return Verdict("reject", f"malformed: {exc}", command_id=command_id)
        if cmd.id in self._seen:
            return Verdict("reject", "replayed", cmd, cmd.id)
        self._remember_pruning(cmd.id, cmd.expires_at, now)
        if cmd.expires_at <= now:
            return Verdict("expire", "expired before arrival", cmd, cmd.id)
        return Verdict("apply", "", cmd, cmd.id)

    def _remember_pruning(self, command_id: str, expires_at: float, now: float) -> None:
        self._seen[command_id] = expires_at
        if len(self._seen) > self._prune_at:
            # An expired id can go: a replay of it is refused as expired anyway, since
            # expires_at is covered by the signature.
            self._seen = {k: v for k, v in self._seen.items() if v > now}
            self._prune_at = max(1024, 2 * len(self._seen))


# --------------------------------------------------------------------------- enforcements


@dataclass(slots=True)
class Enforcement:
    """One active, leased enforcement (throttle, shed or isolate)."""

    kind: str
    key: str  # throttle: route template or "*"; shed: command target; isolate: dependency
    command_id: str
    target: str
    params: dict[str, Any]
    issued_at: float
    expires_at: float
    bucket: TokenBucket | None = None
    gate: ShareGate | None = None
    routes: tuple[str, ...] = ()

    def to_status(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "key": self.key,
            "command_id": self.command_id,
            "target": self.target,
            "params": dict(self.params),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "lease_remaining_s": round(max(0.0, self.expires_at - now), 3),
        }
        if self.bucket is not None:
            out["rate_per_s"] = self.bucket.rate
            out["burst"] = self.bucket.burst
        if self.gate is not None:
            out["share"] = self.gate.share
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of applying a command: ack ``status`` (applied/failed/rejected) + reason."""

    status: str
    reason: str = ""
    run_rollback: bool = False


class EnforcementTable:
    """Active enforcements of one sidecar and the per-request decision.

    Each enforcement lives until its lease (expires_at); a later command of the same
    kind and key renews or changes it; when the lease passes without renewal the
    enforcement is lifted (fail open). ``decide_ingress``/``decide_egress`` are O(1):
    dict lookups plus a token bucket or an accumulator.
    """

    def __init__(self) -> None:
        self.throttles: dict[str, Enforcement] = {}
        self.sheds: dict[str, Enforcement] = {}
        self.isolates: dict[str, Enforcement] = {}
        self._shed_index: dict[str, Enforcement] = {}
        self._shed_all: Enforcement | None = None
        self.rollbacks_done: set[str] = set()

    # ------------------------------------------------------------------ queries
    def active(self) -> list[Enforcement]:
        return [*self.throttles.values(), *self.sheds.values(), *self.isolates.values()]

    def __len__(self) -> int:
        return len(self.throttles) + len(self.sheds) + len(self.isolates)

    def status(self, now: float) -> list[dict[str, Any]]:
        return [e.to_status(now) for e in self.active()]

    def _table(self, kind: str) -> dict[str, Enforcement]:
        return {"throttle": self.throttles, "shed": self.sheds, "isolate": self.isolates}[kind]

    # ------------------------------------------------------------------ commands
    def apply(self, cmd: ParsedCommand, now: float) -> Outcome:
        if cmd.kind == "rollback":
            if cmd.id in self.rollbacks_done:
                return Outcome("applied", "rollback already done")
            return Outcome("applied", run_rollback=True)
        if cmd.kind == "restore":
            return self._restore(cmd, now)
        key = self._key_of(cmd)
        table = self._table(cmd.kind)
        current = table.get(key)
        if current is not None and current.expires_at > now and cmd.issued_at < current.issued_at:
            return Outcome("rejected", f"superseded by {current.command_id}")
        if cmd.kind == "throttle":
            rate = float(cmd.params["rate_per_s"])
            burst = _burst(cmd.params, rate)
            if current is not None and current.bucket is not None and current.expires_at > now:
                bucket = current.bucket
                bucket.set_rate(rate, burst, now)
            else:
                bucket = TokenBucket(rate, burst, now)
            entry = self._entry(cmd, key)
            entry.bucket = bucket
        elif cmd.kind == "shed":
            entry = self._entry(cmd, key)
            entry.gate = ShareGate(float(cmd.params["share"]))
            entry.routes = tuple(cmd.params.get("routes") or ())
        else:  # isolate
            entry = self._entry(cmd, key)
            entry.gate = ShareGate(float(cmd.params.get("half_open_share", 0.0)))
        table[key] = entry
        if cmd.kind == "shed":
            self._reindex_sheds()
        renewed = " (renewed)" if current is not None and current.expires_at > now else ""
        return Outcome("applied", f"{cmd.kind} {key}{renewed}")

    def mark_rollback_done(self, command_id: str) -> None:
        self.rollbacks_done.add(command_id)

    @staticmethod
    def _key_of(cmd: ParsedCommand) -> str:
        if cmd.kind == "throttle":
            return cmd.params.get("route") or ALL
        if cmd.kind == "isolate":
            return cmd.target
        return cmd.target or ALL  # shed

    @staticmethod
    def _entry(cmd: ParsedCommand, key: str) -> Enforcement:
        return Enforcement(
            kind=cmd.kind,
            key=key,
            command_id=cmd.id,
            target=cmd.target,
            params=dict(cmd.params),
            issued_at=cmd.issued_at,
            expires_at=cmd.expires_at,
        )

    def _restore(self, cmd: ParsedCommand, now: float) -> Outcome:
        """Lift, or ramp by ``step``, the named enforcement(s).

        What to restore: ``params.target``, else ``params.route``, else the restore
        command's own ``target`` (the mitigation agent sends the target of the command it
        undoes); it matches an enforcement's key or its command target, and "" or "*"
        matches every enforcement of that kind. ``step`` in (0, 1) ramps instead of
        lifting: shed share and isolate blocked share shrink by that fraction, a throttle
        rate grows by it (or is set to ``params.rate_per_s`` when given).
        """
        p = cmd.params
        kind = p["kind"]
        wanted = p.get("target") or p.get("route") or cmd.target
        step = p.get("step")
        table = self._table(kind)
        matches = [
            e
            for e in table.values()
            if wanted in (None, "", ALL) or wanted in (e.key, e.target)
        ]
        if not matches:
            return Outcome("applied", f"nothing active to restore ({kind} {wanted or ALL})")
        new_rate = p.get("rate_per_s")
        fraction = float(step) if step is not None else 1.0
        ramp = 0 < fraction < 1 or (kind == "throttle" and new_rate is not None)
        for e in matches:
            if not ramp:
                del table[e.key]
            elif kind == "throttle" and e.bucket is not None:
                rate = (
                    float(new_rate) if new_rate is not None else e.bucket.rate * (1.0 + fraction)
                )
                e.bucket.set_rate(rate, _burst({"burst": None}, rate), now)
                e.params["rate_per_s"] = rate
            elif e.gate is not None:
                if kind == "shed":
                    e.gate.share *= 1.0 - fraction
                else:  # isolate: let a larger share through
                    passed = e.gate.share + (1.0 - e.gate.share) * fraction
                    e.gate.share = passed
                e.params["share" if kind == "shed" else "half_open_share"] = e.gate.share
        if kind == "shed":
            self._reindex_sheds()
        verb = "ramped" if ramp else "lifted"
        return Outcome("applied", f"{verb} {kind} {', '.join(e.key for e in matches)}")

    def expire(self, now: float) -> list[Enforcement]:
        """Remove and return every enforcement whose lease has passed (fail open)."""
        lifted: list[Enforcement] = []
        for table in (self.throttles, self.sheds, self.isolates):
            for key in [k for k, e in table.items() if e.expires_at <= now]:
                lifted.append(table.pop(key))
        if any(e.kind == "shed" for e in lifted):
            self._reindex_sheds()
        return lifted

    def _reindex_sheds(self) -> None:
        index: dict[str, Enforcement] = {}
        shed_all: Enforcement | None = None
        for e in self.sheds.values():
            assert e.gate is not None
            if not e.routes:
                if shed_all is None or e.gate.share > _share_of(shed_all):
                    shed_all = e
                continue
            for route in e.routes:
                have = index.get(route)
                if have is None or e.gate.share > _share_of(have):
                    index[route] = e
        self._shed_index = index
        self._shed_all = shed_all

    # ------------------------------------------------------------------ requests
    def decide_ingress(self, route: str, now: float) -> Decision:
        if self._shed_index or self._shed_all is not None:
            shed = self._shed_index.get(route) or self._shed_all
            if shed is not None and shed.expires_at > now and shed.gate and shed.gate.hit():
                return SHED
        if self.throttles:
            for key in (route, ALL):
                entry = self.throttles.get(key)
                if entry is None or entry.expires_at <= now or entry.bucket is None:
                    continue
                wait = entry.bucket.take(now)
                if wait > 0:
                    if math.isinf(wait):
                        wait = entry.expires_at - now
                    return Decision(429, "throttled", max(1, math.ceil(wait)))
        return PASS

    def decide_egress(self, dependency: str, now: float) -> Decision:
        if self.isolates:
            entry = self.isolates.get(dependency)
            if entry is not None and entry.expires_at > now:
                if entry.gate is not None and entry.gate.share > 0 and entry.gate.hit():
                    return PASS  # half-open probe
                return Decision(503, "isolated", isolated=dependency)
        return PASS

    # ------------------------------------------------------------------ batches
    def ingress_active(self, route: str, now: float) -> bool:
        """Could any enforcement in force at ``now`` refuse a request on ``route``?"""
        if any(e.expires_at > now for e in (self._shed_index.get(route), self._shed_all)
               if e is not None):
            return True
        return any(e.expires_at > now for e in (self.throttles.get(route),
                                                 self.throttles.get(ALL)) if e is not None)

    def admit_ingress(self, routes: Sequence[str], times: Sequence[float]) -> list[int]:
        """Decide a batch of arrivals, in the order given (callers sort by time): the
        status of each (0 = forwarded, 429 throttled, 503 shed), exactly what
        ``decide_ingress`` answers request by request, token buckets and share
        accumulators included. A route nothing can refuse skips the per-request path
        (it would only answer PASS and touch no state)."""
        out = [0] * len(times)
        if not (self.throttles or self.sheds):
            return out
        quiet: dict[str, bool] = {}
        for i, (route, now) in enumerate(zip(routes, times, strict=True)):
            # Nothing in force at a route's first arrival stays so for the later ones
            # (times ascend; commands only arrive between batches); a lease that ends
            # mid-batch is judged per request by decide_ingress itself.
            still = quiet.get(route)
            if still is None:
                still = quiet[route] = not self.ingress_active(route, now)
            if not still:
                out[i] = self.decide_ingress(route, now).status
        return out

    def admit_egress(self, dependency: str, times: Sequence[float]) -> list[bool]:
        """Which calls of a batch to ``dependency`` go out (True) or fail fast (False),
        in the order given: exactly ``decide_egress`` request by request (the half-open
        share included)."""
        entry = self.isolates.get(dependency)
        if entry is None:
            return [True] * len(times)
        return [self.decide_egress(dependency, now).passes for now in times]


def _share_of(entry: Enforcement) -> float:
    return entry.gate.share if entry.gate is not None else 0.0


def _burst(params: Mapping[str, Any], rate: float) -> float:
    burst = params.get("burst")
    if burst is None:
        return max(1.0, rate)  # one second's worth, at least one request
    return max(1.0, float(burst))
