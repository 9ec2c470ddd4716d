"""Incident grouping and lifecycle: many anomalies, one incident per cause.

Why: a failing dependency makes every caller anomalous too. Paging (or mitigating)
once per anomalous series would throttle the victims and miss the cause, so anomalies
are grouped by cause before anyone acts:

- the same service within `group_window_s` joins the incident it is already part of;
- an egress anomaly of A on calls to B (series "A|route|B") joins the incident that B
  belongs to; the incident's *root candidate* moves downstream to B when B is itself
  anomalous or `min_callers` callers fail on B (A and C erroring on B while B is
  anomalous is one incident rooted at B, not three). The root is re-derived on every
  anomaly as the farthest qualified service reachable from the current root along
  failing calls, so the arrival order of the anomalies does not matter;
- an ingress anomaly of A while A's calls to B are failing belongs to B's incident.

Lifecycle: open -> mitigating -> monitoring -> resolved, or escalated. Every change
is a TimelineEntry (the IncidentEvent record of stanch.incidents) with its event time
and reason. Everything is event-time driven (`now` is passed in, never read from a
clock) and deterministic: incident ids derive from the first anomaly
(f"inc-{root}-{int(window_start)}") and entry ids are f"{incident_id}:{seq}", so a
restarted worker that replays the same input from its last snapshot (`to_state` /
`from_state`) produces identical entries, which consumers de-duplicate by id.

Recovery rule (documented in docs/mitigation.md): an incident has recovered when no
anomaly counted against it arrived for `restore.stable_s` seconds of event time
(measured on window_start) AND windows of its services are still arriving (so silence
caused by missing telemetry never looks like health). Anomalies that a mitigation
itself causes (a caller failing fast on an isolated dependency) are recorded on the
timeline but do not reset the stable clock while that isolation is fully open.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from models.changes import Change, ChangeInputError, ChangeLog
from models.errors import ModelInputError
from models.policy import Policy

STATES: tuple[str, ...] = ("open", "mitigating", "monitoring", "resolved", "escalated")
ACTIVE_STATES: frozenset[str] = frozenset({"open", "mitigating", "monitoring"})
MAX_ANOMALY_IDS = 1024
MAX_SIGNALS = 256
SEEN_IDS = 20_000
MAX_EVIDENCE_WINDOWS = 30
#: Windows of errors/requests kept per service and per call edge for the before/after
#: judgement of actions (verify.compare_windows before, settle + compare after, and the
#: rolling check of improvement): 60 windows (a minute at 1 s) covers the default 2 + 5
#: with room for a policy asking for longer comparisons.
LEDGER_WINDOWS = 60


class IncidentInputError(ModelInputError):
    """An anomaly, change or window the incident book cannot use."""


@dataclass(frozen=True)
class TimelineEntry:
    """One line of an incident's timeline: the IncidentEvent record on stanch.incidents."""

    id: str
    incident_id: str
    service: str
    state: str
    entry: str
    at: float
    reason: str
    root_service: str | None = None
    services: list[str] | None = None
    anomaly_ids: list[str] | None = None
    suspect_change: dict | None = None
    command_id: str | None = None
    details: dict | None = None
    opened_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire shape: optional fields left out when unset."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Incident:
    """One incident's grouping and lifecycle state (plain data, snapshottable)."""

    id: str
    root_service: str
    onset: float
    opened_at: float
    state: str = "open"
    state_since: float = 0.0
    seq: int = 0
    members: set[str] = field(default_factory=set)
    anomalous: set[str] = field(default_factory=set)
    edges: dict[str, dict[str, float]] = field(default_factory=dict)
    anomaly_ids: list[str] = field(default_factory=list)
    anomaly_count: int = 0
    # windows with an anomaly (hysteresis): distinct window_starts, and at least the
    # windows of evidence the largest single finding rests on (_evidence_windows)
    anomalous_windows: int = 0
    last_ws: float = 0.0
    last_any_ws: float = 0.0
    last_window_ts: float | None = None
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)
    suspect: dict[str, Any] | None = None
    masked_edges: set[str] = field(default_factory=set)
    #: edges under any isolation step, full or half-open (masked_edges: full only)
    isolated_edges: set[str] = field(default_factory=set)
    #: services upstream of this incident's actions: service -> [since, until or None].
    #: Their anomalies in that period (and for verify.settle_s after it) are the action's
    #: doing: recorded on this timeline, never counted, grouped or blamed
    shaped: dict[str, list] = field(default_factory=dict)
    #: newest window of a *counted* anomaly per "service" (ingress) or "caller>dep"
    #: (egress): the half-open probe of an isolation is gated on its target's
    last_counted: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def callers_of(self, dep: str) -> list[str]:
        """Services whose calls to `dep` were anomalous in this incident (sorted)."""
        return sorted(c for c, deps in self.edges.items() if dep in deps)

    def services(self) -> list[str]:
        return sorted(self.members | {self.root_service})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["members"] = sorted(self.members)
        d["anomalous"] = sorted(self.anomalous)
        d["masked_edges"] = sorted(self.masked_edges)
        d["isolated_edges"] = sorted(self.isolated_edges)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Incident:
        d = dict(d)
        d["members"] = set(d.get("members", ()))
        d["anomalous"] = set(d.get("anomalous", ()))
        d["masked_edges"] = set(d.get("masked_edges", ()))
        # (a snapshot from before this field knew only the fully isolated edges)
        d["isolated_edges"] = set(d.get("isolated_edges", d["masked_edges"]))
        d["edges"] = {c: dict(deps) for c, deps in d.get("edges", {}).items()}
        d["shaped"] = {k: list(v) for k, v in d.get("shaped", {}).items()}
        d["last_counted"] = dict(d.get("last_counted", {}))
        d["signals"] = {k: dict(v) for k, v in d.get("signals", {}).items()}
        return cls(**d)


def _num(d: dict, key: str, required: bool = True) -> float | None:
    v = d.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise IncidentInputError(key, v, "must be a finite number")
    return float(v)


def _req_num(d: dict, key: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise IncidentInputError(key, v, "must be a finite number")
    return float(v)


def _str(d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise IncidentInputError(key, v, "required non-empty string")
    return v


def parse_anomaly(a: object) -> dict[str, Any]:
    """Validate the fields grouping needs; returns a normalised copy."""
    if not isinstance(a, dict):
        raise IncidentInputError("<anomaly>", a, "must be an object")
    series = _str(a, "series")
    parts = series.split("|")
    if len(parts) != 3:
        raise IncidentInputError("series", series, "must be 'service|route|dependency'")
    evidence = a.get("evidence") or {}
    if not isinstance(evidence, dict):
        raise IncidentInputError("evidence", evidence, "must be an object")
    return {
        "id": _str(a, "id"),
        "service": _str(a, "service"),
        "series": series,
        "signal": _str(a, "signal"),
        "window_start": _req_num(a, "window_start"),
        "observed": _num(a, "observed", required=False),
        "expected": _num(a, "expected", required=False),
        "severity": str(a.get("severity") or "minor"),
        "route": a.get("route") or parts[1],
        "dependency": a.get("dependency") or parts[2] or None,
        "window_s": _num(a, "window_s", required=False) or 1.0,
        "direction": evidence.get("direction"),
        "evidence_windows": _evidence_windows(evidence, _req_num(a, "window_start")),
    }


def _evidence_windows(evidence: dict, ws: float) -> int:
    """How many windows of evidence the detector's finding rests on: its anomalous
    windows (``evidence.windows``, the k of its k-of-n debounce) or the windows its test
    pooled (``evidence.pooled_windows``), whichever is more; 1 when it says neither.

    Why: the hysteresis (``min_anomalies`` anomalous windows) counted distinct
    window_starts of anomalies, so a surge finding that already needed two anomalous
    windows in the detector counted as one and the throttle waited for the next window
    (1 s; traffic-surge onset -> throttle, see docs/mitigation.md). The book uses it for
    traffic findings only (see the comment in ``IncidentBook._add``). Capped at
    ``MAX_EVIDENCE_WINDOWS`` (the detector's n is at most 30)."""
    windows = evidence.get("windows")
    listed = 0
    if isinstance(windows, list):
        listed = sum(1 for w in windows if isinstance(w, int | float)
                     and not isinstance(w, bool) and math.isfinite(w) and w <= ws)
    pooled = evidence.get("pooled_windows")
    if isinstance(pooled, bool) or not isinstance(pooled, int | float) or \
            not math.isfinite(pooled):
        pooled = 1
    return max(1, min(max(listed, int(pooled)), MAX_EVIDENCE_WINDOWS))


class IncidentBook:
    """Groups anomalies into incidents and keeps their timelines (pure, event-time)."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.changes = ChangeLog()
        self._incidents: dict[str, Incident] = {}
        self._seen: deque[str] = deque()
        self._seen_set: set[str] = set()
        self._ingress_seen: dict[str, float] = {}  # service -> last own anomaly window
        self._callers: dict[str, dict[str, float]] = {}  # dep -> caller -> last window
        self._known: dict[str, float] = {}  # service -> last seen (window or anomaly)
        self._windows_seen: dict[str, int] = {}  # service -> windows seen (gap detection)
        # Telemetry presence, for the telemetry-gap rule: only a service's OWN windows
        # say its telemetry arrives (an anomaly of a caller on calls to it does not), and
        # silence is measured on the clock of the windows themselves, not on `now`: the
        # decider merges topics, and anomalies (or changes) may run ahead of the windows
        # in its input (a backlog being forwarded, a detector on another partition), so
        # `now` minus a service's last window is not silence (see _gap_clock).
        self._last_window: dict[str, float] = {}  # service -> newest own window_start
        self._window_clock = -math.inf  # newest window_start of any window (or on_idle)
        self._clock = 0.0
        # Errors and requests per window, per service (ingress) and per edge "caller>dep"
        # (egress): [[window_start, errors, requests], ...], for judging actions
        self._ledger: dict[str, deque[list]] = {}
        # The call graph as the egress windows show it: dependency -> caller -> last window
        self._calls: dict[str, dict[str, float]] = {}

    # ---- queries -----------------------------------------------------------------
    def open_incidents(self) -> list[Incident]:
        """Incidents not yet resolved or escalated, in id order."""
        return [i for _, i in sorted(self._incidents.items()) if i.active]

    def incidents(self) -> list[Incident]:
        return [i for _, i in sorted(self._incidents.items())]

    def get(self, incident_id: str) -> Incident | None:
        return self._incidents.get(incident_id)

    def is_recovered(self, inc: Incident, now: float) -> bool:
        """No counted anomaly for stable_s of event time while windows keep arriving."""
        if inc.last_window_ts is None:
            return False
        stable = inc.last_window_ts - inc.last_ws >= self.policy.restore.stable_s
        present = now - inc.last_window_ts <= max(self.policy.incidents.telemetry_gap_s,
                                                  self.policy.restore.step_s)
        return stable and present

    def storm_status(self, now: float) -> tuple[bool, int, int]:
        """(storm?, independent causes, known services) within storm_window_s.

        Independent causes = incidents with anomalies in the window (grouping already
        folded a dependency failure seen by many callers into one), so a cascade
        counts once while a broken telemetry pipeline makes many unrelated ones."""
        sg = self.policy.safeguards
        roots = sum(1 for i in self._incidents.values()
                    if i.state != "resolved" and now - i.last_any_ws <= sg.storm_window_s)
        horizon = max(600.0, self.policy.incidents.group_window_s)
        known = sum(1 for t in self._known.values() if now - t <= horizon)
        storm = roots >= sg.storm_min_services and known > 0 and roots / known >= sg.storm_share
        return storm, roots, known

    # ---- input: anomalies ----------------------------------------------------------
    def on_anomaly(self, anomaly: dict, now: float) -> list[TimelineEntry]:
        """Group one anomaly; returns the timeline entries it caused (may be empty)."""
        a = parse_anomaly(anomaly)
        if a["id"] in self._seen_set:
            return []
        self._remember(a["id"])
        self._clock = max(self._clock, now)
        svc, dep, ws = a["service"], a["dependency"], a["window_start"]
        self._known[svc] = max(self._known.get(svc, ws), ws)
        if dep:
            self._known[dep] = max(self._known.get(dep, ws), ws)
        entries: list[TimelineEntry | None] = []
        # the finding rests on its evidence windows: the earliest may predate a lift
        first = ws - (a["evidence_windows"] - 1) * a["window_s"]
        shaper = self._shaped_by(svc, first, ws)
        if shaper is not None:
            # Upstream of an action in force: what it sees are the action's answers
            # (fail-fast, throttled), not a new fault. Recorded, not counted, not grouped.
            entries.append(self._entry(
                shaper, "anomaly", now,
                f"{a['signal']} on {a['series']} (severity {a['severity']}): upstream of a "
                "mitigation in force, not counted", anomaly_ids=[a["id"]],
                details={"series": a["series"], "signal": a["signal"],
                         "observed": a["observed"], "expected": a["expected"],
                         "window_start": ws, "counted": False, "shaped": True}))
            return [e for e in entries if e is not None]
        if dep:
            self._callers.setdefault(dep, {})[svc] = ws
        else:
            self._ingress_seen[svc] = ws
        inc = self._find(svc, dep, ws)
        if inc is None:
            root = dep if dep and self._dep_qualified(dep, ws, None) else svc
            inc = self._open(root, a, now, entries)
        self._add(inc, a)
        if dep:
            self._absorb_callers_incident(inc, svc, now, entries)
        entries.append(self._entry(inc, "anomaly", now,
                                   f"{a['signal']} on {a['series']} (severity {a['severity']})",
                                   anomaly_ids=[a["id"]],
                                   details={"series": a["series"], "signal": a["signal"],
                                            "observed": a["observed"],
                                            "expected": a["expected"],
                                            "window_start": ws,
                                            "counted": not self._is_masked(inc, a)}))
        self._reroot(inc, ws, now, entries)
        self._check_gap_anomaly(inc, a, now, entries)
        if inc.state == "monitoring" and not self._is_masked(inc, a):
            entries.append(self.transition(inc.id, "mitigating", now,
                                           f"signals out of baseline again: {a['series']}"))
        self._evict()
        return [e for e in entries if e is not None]

    def _remember(self, anomaly_id: str) -> None:
        self._seen.append(anomaly_id)
        self._seen_set.add(anomaly_id)
        while len(self._seen) > SEEN_IDS:
            self._seen_set.discard(self._seen.popleft())

    def _joinable(self, ws: float) -> list[Incident]:
        gw = self.policy.incidents.group_window_s
        return [i for _, i in sorted(self._incidents.items())
                if i.active or (i.state == "escalated" and ws - i.last_any_ws <= gw)]

    def _find(self, svc: str, dep: str | None, ws: float) -> Incident | None:
        cands = self._joinable(ws)
        order: list[list[Incident]]
        if dep:
            order = [[i for i in cands if dep in i.members],
                     [i for i in cands if svc in i.members]]
        else:
            order = [[i for i in cands if i.edges.get(svc)],
                     [i for i in cands if svc in i.members]]
        for group in order:
            if group:
                return min(group, key=lambda i: (i.onset, i.id))
        return None

    def _dep_qualified(self, dep: str, ws: float, inc: Incident | None) -> bool:
        """B is a root candidate: itself anomalous, or enough callers fail on it."""
        gw = self.policy.incidents.group_window_s
        if inc is not None and dep in inc.anomalous:
            return True
        if ws - self._ingress_seen.get(dep, -math.inf) <= gw:
            return True
        callers = {c for c, t in self._callers.get(dep, {}).items() if ws - t <= gw}
        if inc is not None:
            callers |= set(inc.callers_of(dep))
        return len(callers) >= self.policy.incidents.min_callers

    def _open(self, root: str, a: dict, now: float, entries: list) -> Incident:
        base = f"inc-{root}-{int(a['window_start'])}"
        iid, n = base, 1
        while iid in self._incidents:
            n += 1
            iid = f"{base}-{n}"
        inc = Incident(id=iid, root_service=root, onset=a["window_start"], opened_at=now,
                       state_since=now, last_ws=a["window_start"],
                       last_any_ws=a["window_start"])
        inc.members.add(root)
        self._incidents[iid] = inc
        entries.append(self._entry(inc, "opened", now,
                                   f"{a['signal']} anomaly on {a['series']}",
                                   opened_at=now))
        self._find_suspect(inc, now, entries)
        return inc

    def _add(self, inc: Incident, a: dict) -> None:
        svc, dep, ws = a["service"], a["dependency"], a["window_start"]
        inc.members.add(svc)
        if dep:
            inc.members.add(dep)
            inc.edges.setdefault(svc, {})[dep] = ws
        else:
            inc.anomalous.add(svc)
        if len(inc.anomaly_ids) < MAX_ANOMALY_IDS:
            inc.anomaly_ids.append(a["id"])
        if inc.anomaly_count == 0 or ws > inc.last_any_ws:
            inc.anomalous_windows += 1
        if a["signal"] == "traffic":
            # only a surge acts on its evidence windows: an error or latency finding on a
            # caller may be the symptom of a change about to be rolled back, so an
            # isolation keeps the extra window (seen: isolations racing the rollback)
            inc.anomalous_windows = max(inc.anomalous_windows, a["evidence_windows"])
        inc.anomaly_count += 1
        inc.last_any_ws = max(inc.last_any_ws, ws)
        if not self._is_masked(inc, a):
            inc.last_ws = max(inc.last_ws, ws)
            k = f"{svc}>{dep}" if dep else svc
            inc.last_counted[k] = max(inc.last_counted.get(k, ws), ws)
        key = f"{a['series']}|{a['signal']}"
        sig = inc.signals.get(key)
        if sig is None and len(inc.signals) < MAX_SIGNALS:
            sig = inc.signals[key] = {
                "service": svc, "route": a["route"], "dependency": dep, "signal": a["signal"],
                "direction": a["direction"], "expected": a["expected"],
                "observed": a["observed"], "window_s": a["window_s"], "count": 0,
                "first": ws, "last": ws, "severity": a["severity"]}
        if sig is not None:
            sig["count"] += 1
            sig["last"] = max(sig["last"], ws)
            sig["observed"] = a["observed"]
            if a["direction"]:
                sig["direction"] = a["direction"]

    def _absorb_callers_incident(self, inc: Incident, caller: str, now: float,
                                 entries: list) -> None:
        """The caller's own young incident (still open: nothing was done for it) turns
        out to be a symptom of the dependency's: fold it in, so one cause stays one
        incident whatever order the anomalies arrived in."""
        for other in self.open_incidents():
            if other.id == inc.id or other.state != "open" or other.root_service != caller:
                continue
            inc.members |= other.members
            inc.anomalous |= other.anomalous
            for c, deps in other.edges.items():
                for d, t in deps.items():
                    mine = inc.edges.setdefault(c, {})
                    mine[d] = max(mine.get(d, t), t)
            room = MAX_ANOMALY_IDS - len(inc.anomaly_ids)
            inc.anomaly_ids += other.anomaly_ids[:max(room, 0)]
            inc.anomaly_count += other.anomaly_count
            inc.anomalous_windows = max(inc.anomalous_windows, other.anomalous_windows)
            inc.onset = min(inc.onset, other.onset)
            inc.last_ws = max(inc.last_ws, other.last_ws)
            inc.last_any_ws = max(inc.last_any_ws, other.last_any_ws)
            for k, sig in other.signals.items():
                if k not in inc.signals and len(inc.signals) < MAX_SIGNALS:
                    inc.signals[k] = sig
            reason = f"merged into {inc.id}: {caller} fails on calls to {inc.root_service}"
            entries.append(self.transition(other.id, "resolved", now, reason,
                                           details={"merged_into": inc.id}))
            entries.append(self._entry(inc, "state", now, f"absorbed {other.id}",
                                       anomaly_ids=other.anomaly_ids[:MAX_ANOMALY_IDS],
                                       details={"merged_from": other.id}))

    def _is_masked(self, inc: Incident, a: dict) -> bool:
        """Anomalies an isolation itself causes. The caller's egress to a fully isolated
        dependency (half-open, that series carries the probes' outcome: not masked, a
        failing probe must reopen the circuit), the caller's own error rate while any
        isolation step is in force (full or half-open, most of its calls still fail fast:
        judged by it, a dependency that has recovered would never pass its half-open step
        and the isolation would outlive the incident), and the dependency's traffic (its
        callers' calls no longer reach it). Services upstream of the caller are handled
        before grouping (``shaped``)."""
        svc, dep = a["service"], a["dependency"]
        if dep:
            return f"{svc}>{dep}" in inc.masked_edges
        if a["signal"] == "traffic" and any(e.endswith(f">{svc}") for e in inc.isolated_edges):
            return True  # an isolated dependency loses its callers' calls: that is no fault
        return a["signal"] == "errors" and any(
            e.startswith(f"{svc}>") for e in inc.isolated_edges)

    def _reroot(self, inc: Incident, ws: float, now: float, entries: list) -> None:
        """Move the root downstream to the farthest qualified service (BFS on edges)."""
        best, best_dist = inc.root_service, 0
        seen = {inc.root_service}
        frontier = [inc.root_service]
        dist = 0
        while frontier:
            dist += 1
            nxt: list[str] = []
            for node in frontier:
                for dep in sorted(inc.edges.get(node, {})):
                    if dep in seen:
                        continue
                    seen.add(dep)
                    nxt.append(dep)
                    if self._dep_qualified(dep, ws, inc) and (
                            dist > best_dist or (dist == best_dist and dep < best)):
                        best, best_dist = dep, dist
            frontier = sorted(nxt)
        if best != inc.root_service:
            previous = inc.root_service
            inc.root_service = best
            callers = ", ".join(inc.callers_of(best)) or "-"
            entries.append(self._entry(inc, "state", now,
                                       f"root candidate is now {best} (callers failing on it: "
                                       f"{callers})", details={"previous_root": previous}))
            if inc.suspect is None:
                self._find_suspect(inc, now, entries)

    def _check_gap_anomaly(self, inc: Incident, a: dict, now: float, entries: list) -> None:
        """Traffic falling to ~zero before any mitigation looks like lost telemetry."""
        if a["signal"] != "traffic" or a["direction"] != "drop" or inc.state != "open":
            return
        expected, observed = a["expected"], a["observed"]
        ratio = self.policy.incidents.gap_drop_ratio
        if expected and observed is not None and observed <= ratio * expected:
            entries.append(self.escalate(
                inc.id, now, f"telemetry gap: traffic of {a['service']} fell to "
                             f"{observed:g} against {expected:g} expected"))

    # ---- input: changes, windows, acks ---------------------------------------------
    def on_change(self, change: dict, now: float | None = None) -> list[TimelineEntry]:
        """Record a change; an open incident without a suspect may gain one (late change)."""
        try:
            c, new = self.changes.add(change)
        except ChangeInputError as exc:
            raise IncidentInputError(exc.field, exc.value, exc.reason) from None
        entries: list[TimelineEntry | None] = []
        if not new:
            return []
        at = self._clock if now is None else now
        for inc in self.open_incidents():
            if inc.suspect is None and c.service in inc.members:
                self._find_suspect(inc, at, entries)
        return [e for e in entries if e is not None]

    def on_window(self, window: dict, now: float | None = None) -> list[TimelineEntry]:
        """Track telemetry presence, recovery clocks and suspect-version evidence."""
        if not isinstance(window, dict):
            raise IncidentInputError("<window>", window, "must be an object")
        svc = _str(window, "service")
        ws = _req_num(window, "window_start")
        at = ws if now is None else now
        self._clock = max(self._clock, at)
        self._known[svc] = max(self._known.get(svc, ws), ws)
        self._last_window[svc] = max(self._last_window.get(svc, ws), ws)
        self._window_clock = max(self._window_clock, ws)
        self._windows_seen[svc] = self._windows_seen.get(svc, 0) + 1
        dep = window.get("dependency")
        if isinstance(dep, str) and dep:
            self._calls.setdefault(dep, {})[svc] = ws
            self._tally(f"{svc}>{dep}", ws, window)
        else:
            self._tally(svc, ws, window)
        try:
            self.changes.add_window(window)
        except ChangeInputError as exc:
            raise IncidentInputError(exc.field, exc.value, exc.reason) from None
        entries: list[TimelineEntry | None] = []
        for inc in self.open_incidents():
            if svc in inc.members:
                inc.last_window_ts = ws if inc.last_window_ts is None else max(
                    inc.last_window_ts, ws)
                if inc.suspect and not inc.suspect.get("confirmed") and \
                        inc.suspect["change"]["service"] == svc:
                    self._update_evidence(inc, at, entries)
        return [e for e in entries if e is not None]

    def on_ack(self, ack: dict, now: float) -> list[TimelineEntry]:
        """Put a sidecar's ack on the timeline; a failed rollback escalates."""
        if not isinstance(ack, dict):
            raise IncidentInputError("<ack>", ack, "must be an object")
        cid = _str(ack, "command_id")
        parts = cid.rsplit(":", 2)
        inc = self._incidents.get(parts[0]) if len(parts) == 3 else None
        if inc is None:
            return []
        status = str(ack.get("status", ""))
        entries: list[TimelineEntry | None] = [self._entry(inc, "ack", now,
                               f"{ack.get('service')}/{ack.get('instance')}: {status} "
                               f"{ack.get('reason', '')}".strip(), command_id=cid,
                               details={"status": status, "instance": ack.get("instance")})]
        if parts[1] == "rollback" and status in ("rejected", "failed") and inc.active:
            entries.append(self.escalate(inc.id, now, f"rollback {status}: {ack.get('reason')}"))
        return [e for e in entries if e is not None]

    def _tally(self, key: str, ws: float, window: dict) -> None:
        errors, count = window.get("errors"), window.get("count")
        if isinstance(errors, bool) or not isinstance(errors, int | float) or \
                not math.isfinite(errors):
            errors = 0
        if isinstance(count, bool) or not isinstance(count, int | float) or \
                not math.isfinite(count):
            count = 0
        q = self._ledger.setdefault(key, deque(maxlen=LEDGER_WINDOWS))
        for row in reversed(q):  # several routes of one window: merge
            if row[0] == ws:
                row[1] += max(0.0, float(errors))
                row[2] += max(0.0, float(count))
                return
            if row[0] < ws:
                break
        q.append([ws, max(0.0, float(errors)), max(0.0, float(count))])
        if len(q) > 1 and q[-2][0] > ws:  # a late window: keep time order
            rows = sorted(q, key=lambda r: r[0])
            q.clear()
            q.extend(rows)

    # ---- queries for the mitigator ----------------------------------------------------
    def errors_between(self, keys: list[str], t0: float, t1: float) -> tuple[float, float, int]:
        """(error responses, requests, distinct windows) of ``keys`` (services, or edges
        "caller>dep") over windows starting in [t0, t1)."""
        errors = requests = 0.0
        starts: set[float] = set()
        for key in keys:
            for ws, e, n in self._ledger.get(key, ()):
                if t0 <= ws < t1:
                    errors += e
                    requests += n
                    starts.add(ws)
        return errors, requests, len(starts)

    def upstream(self, service: str) -> set[str]:
        """Every service that calls ``service``, directly or through others (the call
        graph of the egress windows seen), without ``service`` itself."""
        out: set[str] = set()
        frontier = [service]
        while frontier:
            nxt = []
            for node in frontier:
                for caller in sorted(self._calls.get(node, {})):
                    if caller not in out and caller != service:
                        out.add(caller)
                        nxt.append(caller)
            frontier = nxt
        return out

    def last_window_of(self, service: str) -> float | None:
        """The newest window_start of the service's own telemetry (None: never seen)."""
        return self._last_window.get(service)

    def mark_rolled_back(self, change_id: str, at: float) -> None:
        """A change was rolled back: it is no incident's suspect from now on."""
        self.changes.mark_rolled_back(change_id, at)

    def set_shaped(self, incident_id: str, current: dict[str, float], now: float) -> None:
        """Services upstream of the incident's actions in force now (service -> since);
        a service no longer in ``current`` is closed at ``now`` (its windows until
        verify.settle_s later still straddle the lift)."""
        inc = self._incidents.get(incident_id)
        if inc is None:
            return
        for svc, span in inc.shaped.items():
            if span[1] is None and svc not in current:
                span[1] = now
        for svc, since in current.items():
            old = inc.shaped.get(svc)
            if old is None or old[1] is not None:
                inc.shaped[svc] = [since if old is None else min(since, old[0]), None]

    def note_lifted(self, incident_id: str, services: list[str], since: float,
                    until: float) -> None:
        """An action of the incident on ``services`` (where it ran, its target) was in
        force from ``since`` to ``until``: anomalies of their windows from that period
        (stragglers arriving after the lift, or the windows straddling it) are its doing."""
        inc = self._incidents.get(incident_id)
        if inc is None:
            return
        for svc in services:
            span = inc.shaped.get(svc)
            if span is None or span[1] is not None:
                inc.shaped[svc] = [since if span is None else min(since, span[0]),
                                   until if span is None else max(until, span[1])]

    def _shaped_by(self, svc: str, first: float, ws: float) -> Incident | None:
        """The incident whose action shaped ``svc``'s windows ``first``..``ws`` (the
        windows a finding rests on), or None when none of them was shaped."""
        settle = self.policy.verify.settle_s
        for _, inc in sorted(self._incidents.items()):
            span = inc.shaped.get(svc)
            if span is not None and span[0] <= ws and (span[1] is None
                                                       or first < span[1] + settle):
                return inc
        return None

    # ---- timers --------------------------------------------------------------------
    def tick(self, now: float) -> list[TimelineEntry]:
        """Escalation timeouts and telemetry gaps (no windows from a steady service)."""
        self._clock = max(self._clock, now)
        entries: list[TimelineEntry | None] = []
        limit = self.policy.incidents.escalate_after_s
        for inc in self.open_incidents():
            if now - inc.opened_at >= limit and not self.is_recovered(inc, now):
                entries.append(self.escalate(
                    inc.id, now, f"not recovered after {limit:g} s of automation"))
        gap = self.policy.incidents.telemetry_gap_s
        if gap > 0:
            ref = min(now, self._window_clock)
            for svc, last in sorted(self._last_window.items()):
                if (self._windows_seen.get(svc, 0) >= self.policy.incidents.gap_min_windows
                        and ref - last >= gap and not self._has_gap_incident(svc)):
                    entries.extend(self._open_gap_incident(svc, last, ref, now))
        self._evict()
        return [e for e in entries if e is not None]

    def on_idle(self, now: float) -> None:
        """No input at all arrives (every producer or the pipeline is down) and the
        caller moves the event clock on by itself: the windows' clock follows, so the
        silence of every service that used to send windows counts as a gap."""
        self._clock = max(self._clock, now)
        self._window_clock = max(self._window_clock, now)

    def _has_gap_incident(self, svc: str) -> bool:
        """A gap incident already covers the current silence (its windows did not
        come back since)."""
        return any(i.root_service == svc and i.reason.startswith("telemetry gap")
                   and (i.active or i.state == "escalated")
                   and i.last_any_ws >= self._last_window.get(svc, 0.0)
                   for i in self._incidents.values())

    def _open_gap_incident(self, svc: str, last: float, ref: float,
                           now: float) -> list[TimelineEntry | None]:
        entries: list[TimelineEntry | None] = []
        a = {"window_start": last, "signal": "telemetry", "series": f"{svc}||"}
        inc = self._open(svc, a, now, entries)
        inc.last_any_ws = last
        entries.append(self.escalate(inc.id, now, f"telemetry gap: no windows from {svc} "
                                                  f"for {ref - last:g} s"))
        return entries

    # ---- lifecycle -----------------------------------------------------------------
    def transition(self, incident_id: str, state: str, now: float, reason: str,
                   **extra: Any) -> TimelineEntry | None:
        """Move an incident to `state` (a no-op when it is already there)."""
        if state not in STATES:
            raise IncidentInputError("state", state, f"must be one of {', '.join(STATES)}")
        inc = self._incidents.get(incident_id)
        if inc is None or inc.state == state or not inc.active:
            return None
        inc.state = state
        inc.state_since = now
        entry = {"resolved": "resolved", "escalated": "escalated"}.get(state, "state")
        if state in ("resolved", "escalated"):
            inc.reason = reason
        return self._entry(inc, entry, now, reason, **extra)

    def escalate(self, incident_id: str, now: float, reason: str) -> TimelineEntry | None:
        return self.transition(incident_id, "escalated", now, reason)

    def resolve(self, incident_id: str, now: float, reason: str) -> TimelineEntry | None:
        return self.transition(incident_id, "resolved", now, reason)

    def record(self, incident_id: str, entry: str, now: float, reason: str,
               **extra: Any) -> TimelineEntry:
        """A timeline entry that does not change state (decision, command, restore_step)."""
        return self._entry(self._incidents[incident_id], entry, now, reason, **extra)

    def set_masked(self, incident_id: str, full: set[str], any_step: set[str]) -> None:
        """Edges "caller>dep" a mitigation isolates fully, and at any step (full or
        half-open; see _is_masked)."""
        inc = self._incidents.get(incident_id)
        if inc is not None:
            inc.masked_edges = set(full)
            inc.isolated_edges = set(any_step)

    def _entry(self, inc: Incident, entry: str, now: float, reason: str,
               **extra: Any) -> TimelineEntry:
        inc.seq += 1
        return TimelineEntry(id=f"{inc.id}:{inc.seq}", incident_id=inc.id,
                             service=inc.root_service, state=inc.state, entry=entry, at=now,
                             reason=reason[:4096], root_service=inc.root_service,
                             services=inc.services(), **extra)

    # ---- suspects ------------------------------------------------------------------
    def _find_suspect(self, inc: Incident, now: float, entries: list) -> None:
        order = [inc.root_service, *sorted(inc.members - {inc.root_service})]
        for deps in [inc.edges.get(inc.root_service, {})]:
            order += [d for d in sorted(deps) if d not in order]
        c = self.changes.suspect(order, inc.onset, self.policy.rollback)
        if c is None:
            return
        inc.suspect = {"change": c.to_dict(), "confirmed": False, "evidence": None}
        self._update_evidence(inc, now, entries, announce=True)

    def _update_evidence(self, inc: Incident, now: float, entries: list,
                         announce: bool = False) -> None:
        if inc.suspect is None:
            return
        c = Change(**inc.suspect["change"])
        ev = self.changes.evidence(c, self.policy.rollback)
        inc.suspect["evidence"] = ev.to_dict()
        if ev.confirmed or announce:
            inc.suspect["confirmed"] = ev.confirmed
            state = "confirmed" if ev.confirmed else "suspected"
            entries.append(self._entry(
                inc, "suspect", now,
                f"{c.kind} {c.change_id} of {c.service} {c.from_version} -> {c.to_version} "
                f"{c.ts - inc.onset:+.1f} s from onset ({state}): {ev.reason}",
                suspect_change=dict(inc.suspect)))

    # ---- housekeeping --------------------------------------------------------------
    def _evict(self) -> None:
        """Bound memory: forget the oldest closed incidents beyond max_open."""
        limit = self.policy.incidents.max_open
        if len(self._incidents) <= limit:
            return
        closed = sorted((i for i in self._incidents.values() if not i.active),
                        key=lambda i: (i.state_since, i.id))
        for inc in closed[: len(self._incidents) - limit]:
            del self._incidents[inc.id]

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable snapshot (for a changelogged table or a checkpoint)."""
        return {
            "incidents": {k: v.to_dict() for k, v in self._incidents.items()},
            "seen": list(self._seen),
            "ingress_seen": dict(self._ingress_seen),
            "callers": {d: dict(c) for d, c in self._callers.items()},
            "known": dict(self._known),
            "windows_seen": dict(self._windows_seen),
            "last_window": dict(self._last_window),
            "window_clock": self._window_clock if math.isfinite(self._window_clock) else None,
            "clock": self._clock,
            "changes": self.changes.to_state(),
            "ledger": {k: [list(r) for r in q] for k, q in self._ledger.items()},
            "calls": {d: dict(c) for d, c in self._calls.items()},
        }

    @classmethod
    def from_state(cls, d: dict[str, Any], policy: Policy | None = None) -> IncidentBook:
        book = cls(policy)
        book._incidents = {k: Incident.from_dict(v) for k, v in d["incidents"].items()}
        book._seen = deque(d.get("seen", ()))
        book._seen_set = set(book._seen)
        book._ingress_seen = dict(d.get("ingress_seen", {}))
        book._callers = {k: dict(v) for k, v in d.get("callers", {}).items()}
        book._known = dict(d.get("known", {}))
        book._windows_seen = dict(d.get("windows_seen", {}))
        # snapshots from before the split: `known` is the best guess of presence
        book._last_window = dict(d.get("last_window", d.get("known", {})))
        wc = d.get("window_clock", max(book._last_window.values(), default=None))
        book._window_clock = float(wc) if wc is not None else -math.inf
        book._clock = float(d.get("clock", 0.0))
        book.changes.load_state(d.get("changes", {}))
        book._ledger = {k: deque((list(r) for r in rows), maxlen=LEDGER_WINDOWS)
                        for k, rows in d.get("ledger", {}).items()}
        book._calls = {k: dict(v) for k, v in d.get("calls", {}).items()}
        return book
