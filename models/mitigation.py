"""Mitigation decisions and safeguards: what to do about each incident, and when not to.

Why pure: the mitigation agent only turns Decisions into signed commands; every
judgement (which action, how hard, whether a safeguard forbids it, when to renew a
lease, how to ramp back) lives here, event-time driven and deterministic, so the
scenarios are unit-tested and a restarted worker re-decides exactly what it decided
before. Command ids are f"{incident_id}:{kind}:{seq}" with seq counted per incident
and kind; the counters are part of the snapshot, so a re-decision after a restart
reuses the id and the sidecar (which rejects replays) or the agent (which skips ids
already on stanch.commands) drops the duplicate.

Rules (first match per incident):
- rollback: a confirmed suspect change (models.changes) and the policy allows it:
  roll its service back to from_version, once per incident and per change (it is then
  no suspect anywhere) with the service's rollback cooldown; nothing a version causes
  is piled on afterwards, but a surge is judged on its own (throttled). While a
  suspect is still unconfirmed, other actions wait `rollback.evidence_wait_s`.
- isolate: callers fail on the incident's root (a failing dependency): one isolate per
  caller, target = the dependency (its circuit opens at the caller), when most of the
  caller's calls fail already (`isolate.min_failure_share`: an open circuit fails them
  all). Not when the root itself surges: then the callers' failures are the overload's
  symptom and the root is throttled instead (isolating would also cut its legitimate
  traffic).
- throttle: a traffic surge on an ingress series: rate = the baseline rate (the
  anomaly's expected count per window / window_s) * (1 + headroom), per route.
- shed: saturation (latency anomalies on a surging service) when throttling is not
  allowed there, or has been active `shed.after_s` and latency is still anomalous: drop
  `shed.share` of the routes the policy marks low priority.

Restore: once the book says the incident recovered (stable for `restore.stable_s` with
telemetry present) the incident goes to monitoring and each mitigation is undone in
steps of `restore.step_s`: throttles rise by `step_factor` per step for `max_steps`
steps (each step is a new throttle command that replaces the previous one at the
sidecar) and are then removed with a `restore` command; isolations go half-open
(`isolate` with {"half_open_share": ...}) before a `restore` closes them; shedding is
removed at once. An anomaly during the ramp steps back one level. When nothing is
left, the incident is resolved and the per-service cooldown starts.

No harm (docs/mitigation.md): services upstream of an action in force are shaped
(the book records their anomalies without counting them, detectors do not learn from
them); an isolation probes half-open once its target is quiet for `restore.step_s`;
each throttle, isolation or shed is judged on its scope's error responses before and
after it (`[verify]`): worse is reverted at once, not better within `improve_within_s`
is lifted and escalated; no renewal without fresh telemetry of the action's service.

Leases: every command carries expires_at = now + lease_s; while a mitigation is still
needed it is renewed every `renew_every_s` with a NEW command (next seq, same kind,
target and params), so a dead Stanch lets everything lapse within one lease.

Safeguards: dry-run (decisions become 'decision' entries, no command), approval
(decisions wait until an approve control message names the incident or command id),
cooldown, hysteresis (min_anomalies anomalous windows, counting the windows of evidence
a traffic finding rests on, and min_duration_s before acting; a confirmed suspect change needs
only the first anomaly), a fleet-wide cap
(max_active), the storm guard (escalate new incidents, no new command), the kill
switch (pause: nothing is issued, not even renewals, so active mitigations lapse at
their lease; pending approvals are dropped and re-proposed after resume).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from models.errors import ModelInputError
from models.incidents import Incident, IncidentBook, TimelineEntry
from models.policy import Policy

CONTROL_ACTIONS = ("approve", "pause", "resume", "dry_run_on", "dry_run_off")
LEASED_KINDS = ("throttle", "isolate", "shed")


class MitigationInputError(ModelInputError):
    """A control message the mitigator cannot use."""


@dataclass(frozen=True)
class Decision:
    """One command to issue; the agent signs `to_command(now)` and publishes it."""

    kind: str
    service: str
    target: str
    params: dict[str, Any]
    incident_id: str
    reason: str
    lease_s: float
    seq: int

    @property
    def command_id(self) -> str:
        return f"{self.incident_id}:{self.kind}:{self.seq}"

    def to_command(self, issued_at: float) -> dict[str, Any]:
        """The unsigned command record (DESIGN.md shape without `signature`)."""
        return {"id": self.command_id, "kind": self.kind, "service": self.service,
                "target": self.target, "params": dict(self.params),
                "incident_id": self.incident_id, "issued_at": issued_at,
                "expires_at": issued_at + self.lease_s, "reason": self.reason}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Active:
    """A mitigation in force: what the last command for it said and its lease."""

    kind: str
    service: str
    target: str
    params: dict[str, Any]
    incident_id: str
    issued_at: float
    expires_at: float
    command_id: str
    step: int = 0  # restore steps taken (throttle ramp level; isolate 1 = half-open)
    last_step_at: float | None = None  # event time of the last restore step (None: never)
    base_rate: float | None = None
    since: float = 0.0  # when this mitigation was first issued (renewals keep it)
    #: the services whose answers it changes: where it runs, its target (isolate) and
    #: everything upstream (see VerifyPolicy)
    scope: list[str] = field(default_factory=list)
    onset: float | None = None  # its incident's onset (leased kinds: it gets judged)
    #: [error responses, windows] of the scope over the windows before it was issued
    before: list[float] | None = None
    verdict: str = ""  # "" (not judged yet), "worse", "better", "same", "unknown"

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.service}|{self.target}"


@dataclass
class StepResult:
    """What one step produced: commands to issue and timeline entries to publish."""

    decisions: list[Decision] = field(default_factory=list)
    entries: list[TimelineEntry] = field(default_factory=list)

    def add(self, entry: TimelineEntry | None) -> None:
        """Keep an entry (lifecycle calls return None when nothing changed)."""
        if entry is not None:
            self.entries.append(entry)


@dataclass(frozen=True)
class _Proposal:
    kind: str
    service: str
    target: str
    params: dict[str, Any]
    reason: str

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.service}|{self.target}"


class Mitigator:
    """Decides commands for the book's incidents under the policy's safeguards."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.dry_run = self.policy.safeguards.dry_run
        self.approval = self.policy.safeguards.approval
        self.paused = False
        self._active: dict[str, Active] = {}
        self._seq: dict[str, int] = {}
        self._pending: dict[str, Decision] = {}
        self._approved: set[str] = set()
        self._noted: set[str] = set()
        self._cooldown: dict[str, float] = {}
        self._rolled_back: set[str] = set()
        self._reverted: set[str] = set()  # f"{incident_id}|{action key}": never again
        self._lifted: dict[str, float] = {}  # service -> when an action shaping it ended

    # ---- control -------------------------------------------------------------------
    def apply_control(self, msg: dict, now: float) -> str:
        """Apply an operator control message; returns a one-line description."""
        if not isinstance(msg, dict):
            raise MitigationInputError("<control>", msg, "must be an object")
        action = msg.get("action")
        if action not in CONTROL_ACTIONS:
            raise MitigationInputError("action", action,
                                       f"must be one of {', '.join(CONTROL_ACTIONS)}")
        who = msg.get("operator") or "operator"
        if action == "approve":
            target = msg.get("target")
            if not isinstance(target, str) or not target:
                raise MitigationInputError("target", target,
                                           "approve needs an incident id or command id")
            self._approved.add(target)
            return f"{who} approved {target}"
        if action == "pause":
            self.paused = True
            self._pending.clear()
            return f"{who} paused mitigation (kill switch)"
        if action == "resume":
            self.paused = False
            return f"{who} resumed mitigation"
        self.dry_run = action == "dry_run_on"
        return f"{who} turned dry-run {'on' if self.dry_run else 'off'}"

    def mode(self) -> dict[str, bool]:
        """The operator-visible mode: paused (kill switch), dry-run, approval."""
        return {"paused": self.paused, "dry_run": self.dry_run, "approval": self.approval}

    def reset_mode_from_policy(self) -> None:
        """Start-up: the policy file's approval and dry-run hold over saved state (a later
        operator toggle holds until the next); pause is the operator's only."""
        self.dry_run = self.policy.safeguards.dry_run
        self.approval = self.policy.safeguards.approval

    # ---- queries -------------------------------------------------------------------
    def mitigated_services(self, now: float) -> set[str]:
        """Services whose traffic a live mitigation shapes: their baselines must not learn
        (the isolated dependency too: its callers no longer reach it; and every service
        upstream, which serves the action's fail-fast or throttled answers), until
        ``verify.settle_s`` after the action ended (windows straddling the lift)."""
        out: set[str] = set()
        for act in self._active.values():
            if act.expires_at > now:
                out.add(act.service)
                out.update(act.scope)  # upstream: they serve the action's answers
                if act.kind == "isolate":
                    out.add(act.target)
        settle = self.policy.verify.settle_s
        out.update(s for s, until in self._lifted.items() if now < until + settle)
        return out

    def active(self) -> list[Active]:
        return [a for _, a in sorted(self._active.items())]

    def pending(self) -> list[Decision]:
        return [d for _, d in sorted(self._pending.items())]

    # ---- the step ------------------------------------------------------------------
    def step(self, book: IncidentBook, now: float) -> StepResult:
        """Decide for every incident at event time `now` (call after each input batch)."""
        res = StepResult()
        self._expire(book, now, res)
        storm, roots, known = book.storm_status(now)
        if storm:
            for inc in book.open_incidents():
                if inc.state == "open" and not self._acts(inc.id):
                    res.add(book.escalate(
                        inc.id, now, f"storm: suspect telemetry pipeline ({roots} of {known} "
                                     "services anomalous at once)"))
        for inc in book.incidents():
            if not inc.active:
                self._forget_pending(inc.id)
        for inc in book.open_incidents():
            self._handle(book, inc, now, storm, res)
        self._sync_shaped(book, now)
        return res

    def _sync_shaped(self, book: IncidentBook, now: float) -> None:
        """Tell the book which services are upstream of each incident's actions in force
        (their anomalies are the action's doing), and remember lifts for the detectors."""
        current: dict[str, dict[str, float]] = {}
        for act in self._active.values():
            if act.kind not in LEASED_KINDS or act.expires_at <= now:
                continue
            scope = self._scope(book, act.kind, act.service, act.target)
            act.scope = scope
            mine = current.setdefault(act.incident_id, {})
            for svc in scope:
                if svc not in (act.service, act.target):
                    mine[svc] = min(mine.get(svc, act.since), act.since)
        for inc in book.incidents():
            if inc.id in current or any(span[1] is None for span in inc.shaped.values()):
                before = {svc for svc, span in inc.shaped.items() if span[1] is None}
                book.set_shaped(inc.id, current.get(inc.id, {}), now)
                for svc in before - set(current.get(inc.id, {})):
                    self._lifted[svc] = now
        settle = self.policy.verify.settle_s
        for svc in [s for s, until in self._lifted.items() if now >= until + settle]:
            del self._lifted[svc]

    def _lifted_now(self, book: IncidentBook, act: Active, now: float) -> None:
        """An action ended: its own services' windows of its period and until settle_s
        after it are its doing (stragglers never open an incident of their own), and the
        detectors do not learn from them."""
        own = [act.service] + ([act.target] if act.kind == "isolate" else [])
        book.note_lifted(act.incident_id, own, act.since, now)
        for svc in own:
            self._lifted[svc] = max(self._lifted.get(svc, now), now)

    @staticmethod
    def _scope(book: IncidentBook, kind: str, service: str, target: str) -> list[str]:
        """The services whose answers an action changes: it runs on ``service``, an
        isolation cuts ``target``, and every caller upstream serves what they return."""
        out = {service} | book.upstream(service)
        if kind == "isolate":
            out.add(target)
        return sorted(out)

    def _acts(self, incident_id: str) -> list[Active]:
        return [a for _, a in sorted(self._active.items()) if a.incident_id == incident_id]

    def _forget_pending(self, incident_id: str) -> None:
        for cid in [c for c, d in self._pending.items() if d.incident_id == incident_id]:
            del self._pending[cid]

    def _expire(self, book: IncidentBook, now: float, res: StepResult) -> None:
        """Leases that lapsed (not renewed: paused, escalated, or Stanch was down)."""
        for key, act in sorted(self._active.items()):
            if act.expires_at <= now:
                del self._active[key]
                if act.kind in LEASED_KINDS:
                    self._lifted_now(book, act, now)
                if book.get(act.incident_id) is not None and act.kind in LEASED_KINDS:
                    res.add(book.record(
                        act.incident_id, "decision", now,
                        f"lease of {act.kind} {act.service} -> {act.target} expired",
                        command_id=act.command_id))

    def _handle(self, book: IncidentBook, inc: Incident, now: float, storm: bool,
                res: StepResult) -> None:
        acts = self._acts(inc.id)
        if book.is_recovered(inc, now):
            self._restore(book, inc, acts, now, res)
            return
        if self.paused:
            self._note(book, inc, "paused", now, "paused: no command until resume", res)
            return
        self._regress(book, inc, acts, now, res)
        self._probe(book, inc, self._acts(inc.id), now, res)
        if self._judge(book, inc, now, res):
            return  # the incident was escalated: humans take over
        acts = self._acts(inc.id)
        self._renew(book, inc, acts, now, res)
        self._issue_approved(book, inc, now, res)
        if storm:
            return
        if not self._hysteresis_met(inc, now):
            return
        notes: list[tuple[str, str]] = []
        for prop in self._propose(inc, now, notes):
            self._consider(book, inc, prop, now, res)
        for key, reason in notes:
            self._note(book, inc, key, now, reason, res)
        self._mask(book, inc)

    def _mask(self, book: IncidentBook, inc: Incident) -> None:
        """Tell the book which edges this incident isolates, fully and at any step."""
        isolates = [a for a in self._acts(inc.id) if a.kind == "isolate"]
        book.set_masked(inc.id, {f"{a.service}>{a.target}" for a in isolates if a.step == 0},
                        {f"{a.service}>{a.target}" for a in isolates})

    def _hysteresis_met(self, inc: Incident, now: float) -> bool:
        """``min_anomalies`` anomalous windows and ``min_duration_s`` since onset, except
        that a *confirmed* suspect change is enough with the incident's first anomaly.

        The windows are counted by the book (``Incident.anomalous_windows``), for a
        traffic finding including the windows of evidence it rests on: a surge's first
        finding already needed ``debounce_k`` (2) anomalous windows, or a test that pooled
        two windows, so with the default ``min_anomalies = 2`` the throttle acts on it
        (counting only the anomalies' own windows made it wait one more window, 1 s, for
        the same evidence; docs/mitigation.md); a policy asking for more
        (``min_anomalies = 3``) still waits. Error and latency findings count their own
        windows only: on a caller they may be the symptom of a change about to be rolled
        back, and isolating on them one window earlier raced the rollback.

        Why the confirmed suspect is an exception too: the confirmation is evidence of
        its own (the new version's error rate or p99 against the old version's, over
        ``min_version_requests`` requests), so it acts on the first anomaly even when that
        carries one window of evidence (bad-deploy onset -> command 4.2 s -> 3.3 s).
        Unconfirmed suspects, isolations and throttles keep the full hysteresis."""
        sg = self.policy.safeguards
        if now - inc.onset < sg.min_duration_s or inc.anomalous_windows < 1:
            return False
        if inc.anomalous_windows >= sg.min_anomalies:
            return True
        sus = inc.suspect
        return bool(sus and sus.get("confirmed")) and inc.id not in self._rolled_back

    # ---- proposals -----------------------------------------------------------------
    def _propose(self, inc: Incident, now: float,
                 notes: list[tuple[str, str]]) -> list[_Proposal]:
        p = self.policy
        sus = inc.suspect
        if inc.id in self._rolled_back:
            # A rollback is the fix under test for what a version does (errors, latency):
            # nothing is piled on for those. It cannot undo demand: a surge is judged on
            # its own and throttled.
            return self._throttles(inc)
        if sus is not None:
            c = sus["change"]
            if sus.get("confirmed") or not p.rollback.require_confirmed:
                if p.allows(c["service"], "rollback") and c.get("from_version"):
                    ev = sus.get("evidence") or {}
                    return [_Proposal("rollback", c["service"], c["from_version"],
                                      {"change_id": c["change_id"],
                                       "from_version": c["to_version"],
                                       "to_version": c["from_version"]},
                                      f"suspect {c['kind']} {c['change_id']}: "
                                      f"{ev.get('reason', 'confirmed')}")]
            elif now - inc.onset < p.rollback.evidence_wait_s:
                return []  # evidence on the suspect is still coming in
        out: list[_Proposal] = []
        root = inc.root_service
        surges = self._surges(inc)
        surging = {s for s, _ in surges}
        # A surging root fails its callers because it is overloaded, not broken: their
        # egress errors and latency are a symptom. Opening their circuits would cut the
        # legitimate share of its traffic too; the cure is the throttle at the root below.
        if root not in surging:
            for caller in inc.callers_of(root):
                share = self._failure_share(inc, caller, root)
                if caller != root and p.allows(caller, "isolate") and \
                        share >= p.isolate.min_failure_share:
                    out.append(_Proposal("isolate", caller, root, {"state": "open"},
                                         f"dependency failure: {caller} fails {share:.0%} "
                                         f"of its calls to {root}"))
                elif caller != root and p.allows(caller, "isolate"):
                    notes.append((f"no-isolate|{caller}>{root}",
                                  f"no isolation of {root} at {caller}: {share:.0%} of its "
                                  f"calls fail (< {p.isolate.min_failure_share:.0%}); an "
                                  "open circuit would fail them all"))
        out += self._throttles(inc)
        for svc in sorted({s for s, _ in surges} | self._overloaded(inc)):
            if self._saturated(inc, svc, now) and p.allows(svc, "shed") and \
                    p.low_priority_routes(svc):
                out.append(_Proposal("shed", svc, "*",
                                     {"share": p.shed.share,
                                      "routes": list(p.low_priority_routes(svc))},
                                     f"saturation on {svc}: shed {p.shed.share:.0%} of "
                                     "low-priority routes"))
        return out

    def _throttles(self, inc: Incident) -> list[_Proposal]:
        p = self.policy
        out: list[_Proposal] = []
        for (svc, target), (rate, route) in sorted(self._surges(inc).items()):
            if p.allows(svc, "throttle"):
                params: dict[str, Any] = {"rate_per_s": rate}
                if route is not None:
                    params["route"] = route
                out.append(_Proposal("throttle", svc, target, params,
                                     f"traffic surge on {svc} {target}: cap at baseline "
                                     f"+{p.headroom_for(svc):.0%} = {rate:g}/s"))
        return out

    @staticmethod
    def _failure_share(inc: Incident, caller: str, dep: str) -> float:
        """The share of the caller's calls to ``dep`` that fail: the latest error rate
        its egress error finding observed (0 when its calls were only slow)."""
        rates = [float(sig["observed"]) for sig in inc.signals.values()
                 if sig["service"] == caller and sig["dependency"] == dep
                 and sig["signal"] == "errors" and sig["observed"] is not None]
        return min(1.0, max(rates)) if rates else 0.0

    def _surges(self, inc: Incident) -> dict[tuple[str, str], tuple[float, str | None]]:
        """(service, target) -> (rate_per_s, route) for surging ingress series."""
        out: dict[tuple[str, str], tuple[float, str | None]] = {}
        per_route = self.policy.throttle.per_route
        for _, sig in sorted(inc.signals.items()):
            if sig["signal"] != "traffic" or sig["direction"] != "surge" or sig["dependency"]:
                continue
            expected, window_s = sig["expected"], sig["window_s"] or 1.0
            if expected is None or expected <= 0:
                continue
            svc = sig["service"]
            route = sig["route"] if per_route and sig["route"] else None
            target = route or "*"
            rate = max(expected / window_s * (1 + self.policy.headroom_for(svc)),
                       self.policy.min_rate_for(svc))
            rate = round(rate, 3)
            old = out.get((svc, target))
            if old is None or rate > old[0]:
                out[(svc, target)] = (rate, route)
        return out

    def _overloaded(self, inc: Incident) -> set[str]:
        names = {f"metric:{m}" for m in self.policy.throttle.overload_metrics}
        return {s["service"] for s in inc.signals.values()
                if s["signal"] in names and not s["dependency"]}

    def _saturated(self, inc: Incident, svc: str, now: float) -> bool:
        """Latency anomalous on svc and throttling can't help (not allowed) or didn't."""
        lat = [s for s in inc.signals.values()
               if s["service"] == svc and s["signal"] == "latency" and not s["dependency"]]
        if not lat:
            return False
        if not self.policy.allows(svc, "throttle"):
            return True
        throttles = [a for a in self._acts(inc.id) if a.kind == "throttle" and a.service == svc]
        if not throttles:
            return False
        since = min(a.since for a in throttles)
        last_latency = max(s["last"] for s in lat)
        return now - since >= self.policy.shed.after_s and last_latency > since

    # ---- safeguards around one proposal --------------------------------------------
    def _consider(self, book: IncidentBook, inc: Incident, prop: _Proposal, now: float,
                  res: StepResult) -> None:
        if f"{inc.id}|{prop.key}" in self._reverted:
            return  # it made this incident worse once: never again for it
        if prop.key in self._active or any(
                f"{d.kind}|{d.service}|{d.target}" == prop.key and d.incident_id == inc.id
                for d in self._pending.values()):
            return
        ended = self._cooldown.get(f"{prop.service}|{prop.kind}")
        cooldown = self.policy.cooldown_for(prop.service)
        if ended is not None and now - ended < cooldown:
            self._note(book, inc, f"cooldown|{prop.key}", now,
                       f"cooldown: {prop.kind} of {prop.service} ended {now - ended:g} s ago "
                       f"(< {cooldown:g} s)", res)
            return
        if len(self._active) + len(self._pending) >= self.policy.safeguards.max_active:
            self._note(book, inc, f"cap|{prop.key}", now,
                       f"cap: {self.policy.safeguards.max_active} mitigations already active, "
                       f"not {prop.kind} {prop.service} -> {prop.target}", res)
            return
        if self.dry_run:
            self._note(book, inc, f"dry|{prop.key}", now,
                       f"dry-run: would {prop.kind} {prop.service} -> {prop.target} "
                       f"({prop.reason})", res,
                       details={"kind": prop.kind, "service": prop.service,
                                "target": prop.target, "params": prop.params})
            return
        decision = self._decision(inc.id, prop.kind, prop.service, prop.target, prop.params,
                                  prop.reason)
        if self.approval:
            self._pending[decision.command_id] = decision
            res.add(book.record(
                inc.id, "decision", now,
                f"awaiting approval: {prop.kind} {prop.service} -> {prop.target} "
                f"({prop.reason}); approve {inc.id} or {decision.command_id}",
                command_id=decision.command_id, details=decision.to_dict()))
            return
        self._issue(book, inc, decision, now, res)

    def _note(self, book: IncidentBook, inc: Incident, key: str, now: float, reason: str,
              res: StepResult, details: dict | None = None) -> None:
        """A 'decision' entry recorded once per incident and reason key (no spam)."""
        k = f"{inc.id}|{key}"
        if k in self._noted:
            return
        self._noted.add(k)
        res.add(book.record(inc.id, "decision", now, reason, details=details))

    def _decision(self, incident_id: str, kind: str, service: str, target: str,
                  params: dict[str, Any], reason: str) -> Decision:
        k = f"{incident_id}:{kind}"
        self._seq[k] = self._seq.get(k, 0) + 1
        return Decision(kind, service, target, dict(params), incident_id, reason,
                        self.policy.safeguards.lease_s, self._seq[k])

    def _issue_approved(self, book: IncidentBook, inc: Incident, now: float,
                        res: StepResult) -> None:
        for cid, d in sorted(self._pending.items()):
            if d.incident_id == inc.id and (cid in self._approved or inc.id in self._approved):
                del self._pending[cid]
                self._issue(book, inc, d, now, res, note=" (approved)")

    def _issue(self, book: IncidentBook, inc: Incident, d: Decision, now: float,
               res: StepResult, note: str = "") -> None:
        res.decisions.append(d)
        if d.kind == "rollback":
            # once per incident, once per change (it stops being a suspect), and the
            # service's rollback cooldown starts now: the rollback is the fix under test
            self._rolled_back.add(inc.id)
            book.mark_rolled_back(str(d.params.get("change_id")), now)
            self._cooldown[f"{d.service}|rollback"] = now
        if d.kind != "restore":
            prev = self._active.get(f"{d.kind}|{d.service}|{d.target}")
            act = Active(d.kind, d.service, d.target, dict(d.params), inc.id, now,
                         now + d.lease_s, d.command_id,
                         base_rate=d.params.get("rate_per_s") if prev is None
                         else prev.base_rate, since=now)
            if prev is not None:
                act.step, act.last_step_at, act.since = prev.step, prev.last_step_at, prev.since
                act.scope, act.before, act.verdict = prev.scope, prev.before, prev.verdict
                act.onset = prev.onset
            elif d.kind in LEASED_KINDS:
                act.scope = self._scope(book, d.kind, d.service, d.target)
                act.onset = inc.onset
            self._active[act.key] = act
        if inc.state == "open":
            res.add(book.transition(inc.id, "mitigating", now,
                                               f"first command {d.command_id}"))
        res.add(book.record(
            inc.id, "command", now, f"{d.kind} {d.service} -> {d.target}{note}: {d.reason}",
            command_id=d.command_id,
            details={"kind": d.kind, "target": d.target, "params": d.params,
                     "expires_at": now + d.lease_s}))

    # ---- leases and restore --------------------------------------------------------
    def _renew(self, book: IncidentBook, inc: Incident, acts: list[Active], now: float,
               res: StepResult) -> None:
        every = self.policy.safeguards.renew_every_s
        for act in acts:
            if act.kind in LEASED_KINDS and now - act.issued_at >= every:
                if self._telemetry_stale(book, inc, act, now, res):
                    return
                d = self._decision(inc.id, act.kind, act.service, act.target, act.params,
                                   f"lease renewal of {act.command_id}")
                self._issue(book, inc, d, now, res)

    def _telemetry_stale(self, book: IncidentBook, inc: Incident, act: Active, now: float,
                         res: StepResult) -> bool:
        """No renewal without fresh telemetry: when the service the action runs on has
        sent no window for ``incidents.telemetry_gap_s`` (the bound that defines a
        telemetry gap; ``lease_s`` when gap detection is off), Stanch can no longer see
        what its action does. It stops renewing (the lease lapses, the sidecars fail
        open) and escalates. Returns whether it did."""
        bound = self.policy.incidents.telemetry_gap_s or self.policy.safeguards.lease_s
        last = book.last_window_of(act.service)
        if last is not None and now - last <= bound:
            return False
        silent = "no window ever" if last is None else f"no window for {now - last:g} s"
        res.add(book.escalate(
            inc.id, now, f"telemetry of {act.service} stopped ({silent}): not renewing "
                         f"{act.kind} {act.service} -> {act.target}, its lease lapses at "
                         f"{act.expires_at:g}"))
        return True

    # ---- before / after ------------------------------------------------------------
    def _window_s(self, inc: Incident) -> float:
        sizes = [float(s.get("window_s") or 1.0) for s in inc.signals.values()]
        return min(sizes) if sizes else 1.0

    def _judge(self, book: IncidentBook, inc: Incident, now: float, res: StepResult) -> bool:
        """Compare every action's scope with what it was before; revert what made things
        worse, lift what has not helped within ``verify.improve_within_s``. Returns True
        when the incident was escalated (it is then no longer the automation's)."""
        vp = self.policy.verify
        span = vp.compare_windows * self._window_s(inc)
        for act in self._acts(inc.id):
            if act.kind not in LEASED_KINDS or act.onset is None:
                continue
            if not act.verdict:
                t0 = act.since + vp.settle_s
                if now < t0 + span:
                    continue
                e_a, _, n_a = book.errors_between(act.scope, t0, t0 + span)
                if n_a < vp.compare_windows and now < t0 + 2 * span:
                    continue  # windows still arriving (the decider merges topics)
                # what the scope served before: the windows since onset, at most
                # verify.compare_windows of them, up to the one it was decided on (the
                # newest window seen then: closed before the decision, so wholly before)
                w = self._window_s(inc)
                e_b, _, n_b = book.errors_between(
                    act.scope, max(act.onset, act.since + w - span), act.since + w)
                act.before = [e_b, float(n_b)]
                act.verdict = _verdict(e_b, n_b, e_a, n_a, vp.worse_z)
                res.add(book.record(
                    inc.id, "decision", now,
                    f"verify {act.kind} {act.service} -> {act.target}: error responses of "
                    f"{', '.join(act.scope)} {_per(e_b, n_b)}/window before, {_per(e_a, n_a)}"
                    f"/window after: {act.verdict}", command_id=act.command_id,
                    details={"verdict": act.verdict, "kind": act.kind,
                             "service": act.service, "target": act.target,
                             "scope": list(act.scope), "before": [e_b, n_b],
                             "after": [e_a, n_a]}))
                if act.verdict == "worse":
                    self._reverted.add(f"{inc.id}|{act.key}")
                    self._lift(book, inc, act, now, res,
                               "made things worse: reverted at once", "worse")
                    continue
            elif act.verdict in ("same", "unknown") and act.before is not None:
                e_now, _, n_now = book.errors_between(act.scope, now - span, now)
                if _verdict(act.before[0], act.before[1], e_now, n_now,
                            vp.worse_z) == "better":
                    act.verdict = "better"
        stuck = [a for a in self._acts(inc.id) if a.kind in LEASED_KINDS
                 and a.verdict != "better" and now - a.since >= vp.improve_within_s]
        if not stuck:
            return False
        for act in self._acts(inc.id):
            if act.kind in LEASED_KINDS:
                self._lift(book, inc, act, now, res,
                           f"no improvement within {vp.improve_within_s:g} s: lifted "
                           "(fail open)", "no improvement")
        res.add(book.escalate(
            inc.id, now, f"not improved by {', '.join(sorted({a.kind for a in stuck}))} "
                         f"within {vp.improve_within_s:g} s: lifted, humans take over"))
        return True

    def _lift(self, book: IncidentBook, inc: Incident, act: Active, now: float,
              res: StepResult, why: str, verdict: str) -> None:
        """Remove an action at once with a final ``restore`` (the sidecars fail open)."""
        d = self._decision(inc.id, "restore", act.service, act.target,
                           {"kind": act.kind, **({"route": act.params["route"]}
                                                 if "route" in act.params else {})},
                           f"restore: remove {act.kind} {act.service} -> {act.target}: {why}")
        del self._active[act.key]
        self._lifted_now(book, act, now)
        self._cooldown[f"{act.service}|{act.kind}"] = now
        res.decisions.append(d)
        res.add(book.record(inc.id, "restore_step", now, d.reason, command_id=d.command_id,
                            details={"kind": act.kind, "final": True, "verdict": verdict,
                                     "lifted": act.command_id}))
        self._mask(book, inc)

    def _regress(self, book: IncidentBook, inc: Incident, acts: list[Active], now: float,
                 res: StepResult) -> None:
        """Signals left the baseline during the ramp: go back one level (isolations:
        see _probe, which judges them by their target alone)."""
        for act in acts:
            if act.kind == "isolate" or act.step == 0 or not self._step_due(act, now):
                continue
            act.step -= 1
            act.last_step_at = now
            params = self._level_params(act)
            d = self._decision(inc.id, act.kind, act.service, act.target, params,
                               f"restore step back to level {act.step}: signals out of "
                               "baseline")
            self._issue(book, inc, d, now, res)

    def _probe(self, book: IncidentBook, inc: Incident, acts: list[Active], now: float,
               res: StepResult) -> None:
        """The circuit breaker's own exit, while the incident goes on: an isolation is
        about its target, so it is judged by the target alone. Once the target has had
        no counted anomaly for ``restore.step_s`` (its other callers and its own
        telemetry show it healthy) the circuit goes half-open; the probes' outcome (the
        caller's calls to it, no longer masked) and the target stay quiet for another
        step: the circuit closes. A counted anomaly of either while half-open re-opens
        it at once (a failing probe). Waiting for the whole incident to look stable for
        ``restore.stable_s`` kept callers failing fast on a dependency that had
        recovered (dependency-failure: ~75 s of every call failing)."""
        sp = self.policy.restore.step_s
        for act in acts:
            if act.kind != "isolate":
                continue
            keys = [act.target] + ([f"{act.service}>{act.target}"] if act.step >= 1 else [])
            last = max(inc.last_counted.get(k, -math.inf) for k in keys)
            since = act.since if act.last_step_at is None else act.last_step_at
            if act.step >= 1 and last >= since:
                act.step, act.last_step_at = 0, now
                d = self._decision(inc.id, "isolate", act.service, act.target,
                                   self._level_params(act),
                                   f"half-open probe failed: {act.target} still failing, "
                                   "circuit open again")
                self._issue(book, inc, d, now, res)
                continue
            if now - max(last, since) < sp:
                continue
            if act.step == 0:
                act.step, act.last_step_at = 1, now
                params = self._level_params(act)
                d = self._decision(inc.id, "isolate", act.service, act.target, params,
                                   f"probe: {act.target} quiet for {sp:g} s, half-open")
                res.decisions.append(d)
                act.params, act.issued_at = params, now
                act.expires_at, act.command_id = now + d.lease_s, d.command_id
                res.add(book.record(inc.id, "restore_step", now,
                                    f"isolate {act.service} -> {act.target}: {d.reason}",
                                    command_id=d.command_id,
                                    details={"params": params, "step": act.step}))
            else:
                self._lift(book, inc, act, now, res,
                           f"probes through to {act.target} succeeded for {sp:g} s",
                           "recovered")
        self._mask(book, inc)

    def _step_due(self, act: Active, now: float) -> bool:
        return act.last_step_at is None or now - act.last_step_at >= self.policy.restore.step_s

    def _level_params(self, act: Active) -> dict[str, Any]:
        params = dict(act.params)
        if act.kind == "throttle" and act.base_rate is not None:
            params["rate_per_s"] = round(act.base_rate * self.policy.restore.step_factor
                                         ** act.step, 3)
        if act.kind == "isolate":
            params.pop("half_open_share", None)
            if act.step >= 1:
                params["half_open_share"] = self.policy.isolate.half_open_share
        return params

    def _restore(self, book: IncidentBook, inc: Incident, acts: list[Active], now: float,
                 res: StepResult) -> None:
        rp = self.policy.restore
        if not acts:
            self._forget_pending(inc.id)
            how = "after mitigation" if inc.state != "open" else "without mitigation"
            res.add(book.resolve(
                inc.id, now, f"recovered {how}: signals within baseline for "
                             f"{rp.stable_s:g} s"))
            return
        if inc.state != "monitoring":
            res.add(book.transition(
                inc.id, "monitoring", now, f"signals within baseline for {rp.stable_s:g} s"))
        if self.paused:
            return
        for act in acts:
            if not inc.active:
                return  # escalated on the way (telemetry of an action stopped)
            if act.kind == "rollback":
                del self._active[act.key]
                continue
            if not self._step_due(act, now):
                if act.kind in LEASED_KINDS and \
                        now - act.issued_at >= self.policy.safeguards.renew_every_s:
                    self._renew(book, inc, [act], now, res)
                continue
            done = (act.kind == "shed"
                    or (act.kind == "isolate" and act.step >= 1)
                    or (act.kind == "throttle" and (act.step >= rp.max_steps
                                                    or act.base_rate is None)))
            if done:
                d = self._decision(inc.id, "restore", act.service, act.target,
                                   {"kind": act.kind, **({"route": act.params["route"]}
                                                         if "route" in act.params else {})},
                                   f"restore: remove {act.kind} {act.service} -> {act.target}")
                del self._active[act.key]
                self._lifted_now(book, act, now)
                self._cooldown[f"{act.service}|{act.kind}"] = now
                res.decisions.append(d)
                res.add(book.record(inc.id, "restore_step", now, d.reason,
                                               command_id=d.command_id,
                                               details={"kind": act.kind, "final": True}))
                continue
            act.step += 1
            act.last_step_at = now
            params = self._level_params(act)
            what = ("half-open" if act.kind == "isolate"
                    else f"rate {params.get('rate_per_s')}/s")
            d = self._decision(inc.id, act.kind, act.service, act.target, params,
                               f"restore step {act.step}: {what}")
            res.decisions.append(d)
            act.params, act.issued_at = params, now
            act.expires_at, act.command_id = now + d.lease_s, d.command_id
            res.add(book.record(inc.id, "restore_step", now,
                                           f"{act.kind} {act.service} -> {act.target}: "
                                           f"{d.reason}", command_id=d.command_id,
                                           details={"params": params, "step": act.step}))
        self._mask(book, inc)
        if not self._acts(inc.id):
            res.add(book.resolve(
                inc.id, now, "restored: every mitigation removed and signals stable"))

    # ---- state ---------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable snapshot: with the book's, a restart re-decides identically."""
        return {
            "dry_run": self.dry_run, "approval": self.approval, "paused": self.paused,
            "active": {k: asdict(a) for k, a in self._active.items()},
            "seq": dict(self._seq),
            "pending": {k: d.to_dict() for k, d in self._pending.items()},
            "approved": sorted(self._approved), "noted": sorted(self._noted),
            "cooldown": dict(self._cooldown), "rolled_back": sorted(self._rolled_back),
            "reverted": sorted(self._reverted), "lifted": dict(self._lifted),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any], policy: Policy | None = None) -> Mitigator:
        m = cls(policy)
        m.dry_run, m.approval, m.paused = d["dry_run"], d["approval"], d["paused"]
        m._active = {k: Active(**a) for k, a in d["active"].items()}
        m._seq = dict(d["seq"])
        m._pending = {k: Decision(**x) for k, x in d["pending"].items()}
        m._approved = set(d["approved"])
        m._noted = set(d["noted"])
        m._cooldown = dict(d["cooldown"])
        m._rolled_back = set(d["rolled_back"])
        m._reverted = set(d.get("reverted", ()))
        m._lifted = {str(k): float(v) for k, v in d.get("lifted", {}).items()}
        return m


def _per(errors: float, windows: float) -> str:
    return f"{errors / windows:.3g}" if windows else "?"


def _verdict(e_b: float, n_b: float, e_a: float, n_a: float, z_limit: float) -> str:
    """worse / better / same: error responses per window after against before, as two
    Poisson rates (variance = count / windows^2); "unknown" without windows on a side."""
    if n_b <= 0 or n_a <= 0:
        return "unknown"
    r_b, r_a = e_b / n_b, e_a / n_a
    var = e_b / (n_b * n_b) + e_a / (n_a * n_a)
    if var <= 0.0:
        return "same"
    z = (r_a - r_b) / var ** 0.5
    return "worse" if z >= z_limit else "better" if z <= -z_limit else "same"
