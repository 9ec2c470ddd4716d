"""What the decider says is in force, as a fact on Kafka: the mitigation view of every
worker and ``stanch status``.

Why a fact on Kafka: the set of mitigated services (whose windows the detectors score
but must not learn from) used to live in the memory of the one process running the
decider, so with two or more workers the detectors elsewhere kept learning mitigated
traffic. The decider now writes its status (mode, open incidents, every action in
force with its lease, the services they shape) to the compacted one-partition topic
``<prefix>mitigation-state`` (agents.incidents.status_topic) whenever it changes and at
least once a second while it runs; every worker's ``MitigationView`` tails that topic.

Leases without a decider: the fact carries the decider's event clock and each action's
expires_at on that clock. A view judges a lease against that clock advanced by the
(local, monotonic) time since the fact arrived, so if the decider dies, its mitigations
stop counting once their leases run out, as they do at the sidecars; no producer's
timestamp is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from agents.incidents import STATUS_KEY, status_topic

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

#: A view that has read nothing for this long while its consumer runs is still healthy
#: (no decider may have run yet); a consumer loop that has not turned for this long is
#: stuck. 60 s: a loop turn waits at most ~0.5 s for data, a reconnect well under that.
STUCK_AFTER_S = 60.0
VIEW_FETCH_WAIT_MS = 500
#: `stanch status` calls a fact stale past this age: a running decider re-publishes
#: every second, so 10 s means it is gone or stuck (or the clocks of two hosts differ
#: by that much).
STALE_AFTER_S = 10.0


class MitigationView:
    """``view(service) -> bool``: is a live mitigation shaping ``service``'s traffic?

    The detector agent's mitigation hook (``app.stanch_mitigated``)."""

    def __init__(self, settings: Settings | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.monotonic = monotonic
        self.fact: dict[str, Any] | None = None
        self._received = 0.0
        self.stats: Counter[str] = Counter()
        self.failed: str | None = None
        self.last_loop: float | None = None

    # ---- the answer ---------------------------------------------------------------
    def update(self, fact: dict[str, Any]) -> None:
        """Take a newer fact (the decider's own process calls this directly too)."""
        if not isinstance(fact, dict) or not isinstance(fact.get("mitigated"), dict) or \
                not isinstance(fact.get("clock"), int | float):
            self.stats["unreadable"] += 1
            return
        self.fact = fact
        self._received = self.monotonic()
        self.stats["facts"] += 1

    def decider_clock(self) -> float | None:
        """The decider's event clock now: the fact's, advanced by the time since."""
        if self.fact is None:
            return None
        return float(self.fact["clock"]) + max(0.0, self.monotonic() - self._received)

    def __call__(self, service: str) -> bool:
        clock = self.decider_clock()
        if clock is None:
            return False
        expires = self.fact["mitigated"].get(service) if self.fact else None
        return isinstance(expires, int | float) and expires > clock

    def services(self) -> list[str]:
        """Every service mitigated right now (sorted)."""
        clock = self.decider_clock()
        if clock is None or self.fact is None:
            return []
        return sorted(s for s, e in self.fact["mitigated"].items() if e > clock)

    # ---- health ---------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        if self.failed:
            return {"state": "failed", "error": self.failed}
        if self.last_loop is None:
            return {"state": "starting"}
        idle = self.monotonic() - self.last_loop
        return {"state": "stuck" if idle > STUCK_AFTER_S else "running",
                "since_loop_s": round(idle, 1), "facts": self.stats["facts"]}

    # ---- the consumer ---------------------------------------------------------------
    async def run(self) -> None:
        """Tail the status topic from its newest fact (only the newest one counts)."""
        from agents.incidents import ensure_internal_topics

        assert self.settings is not None
        settings = self.settings
        try:
            await ensure_internal_topics(settings)
            # 500 ms: one fact a second does not need the pipeline's 50 ms polling (20
            # fetches/s per worker on a broker that answers a waiting fetch only when the
            # wait ends); the decider's own process gets each fact at once (update()),
            # and Kafka answers as soon as a fact is there anyway
            consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None,
                                        enable_auto_commit=False,
                                        fetch_max_wait_ms=VIEW_FETCH_WAIT_MS)
            await consumer.start()
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            raise
        try:
            tp = TopicPartition(status_topic(settings), 0)
            consumer.assign([tp])
            consumer.seek(tp, await last_offset(consumer, tp))
            while True:
                self.last_loop = self.monotonic()
                try:
                    batches = await consumer.getmany(timeout_ms=500)
                except KafkaError as exc:  # the broker away for a while: keep trying
                    log.warning("mitigation view: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                for records in batches.values():
                    for record in records:
                        if record.key != STATUS_KEY or not record.value:
                            continue
                        try:
                            self.update(orjson.loads(record.value))
                        except orjson.JSONDecodeError:
                            self.stats["unreadable"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("mitigation view failed")
            raise
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()


async def last_offset(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    """The offset of the last record of ``tp`` (its start when empty).

    The topic gets a fact a second; compaction (where the broker does it) keeps one, but
    reading them all back at every start is pointless. The listed end may be short of
    the true end on the embedded broker (agents.incidents.read_records); starting
    earlier than the last record is harmless: reading goes on to the true end."""
    begin = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]
    return int(max(begin, end - 1))


# ------------------------------------------------------------------------ stanch status
async def read_status(settings: Settings, timeout_s: float = 15.0) -> dict[str, Any] | None:
    """The newest status fact, or None when there is none (or no topic yet)."""
    topic = status_topic(settings)
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None,
                                enable_auto_commit=False,
                                fetch_max_wait_ms=settings.fetch_max_wait_ms)
    await consumer.start()
    try:
        if not consumer.partitions_for_topic(topic):
            return None
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, await last_offset(consumer, tp))
        newest: dict[str, Any] | None = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=500)
            for record in batches.get(tp, []):
                if record.key == STATUS_KEY and record.value:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        fact = orjson.loads(record.value)
                        newest = fact if isinstance(fact, dict) else newest
            high = consumer.highwater(tp)
            if high is not None and await consumer.position(tp) >= high:
                break
        return newest
    finally:
        # aiokafka may raise CancelledError from stopping a consumer that never fetched
        # (the no-topic case): the answer is already known, so it must not become a
        # traceback
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await consumer.stop()


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def with_remaining(fact: dict[str, Any], now: float) -> dict[str, Any]:
    """The fact plus each action's lease remaining, judged at wall time ``now``."""
    age = max(0.0, now - float(fact.get("at", now)))
    clock = float(fact.get("clock", 0.0)) + age
    out = dict(fact)
    out["age_s"] = round(age, 1)
    out["active"] = [{**a, "lease_remaining_s": round(max(0.0, a["expires_at"] - clock), 1)}
                     for a in fact.get("active", [])]
    return out


def format_status(fact: dict[str, Any], now: float) -> str:
    f = with_remaining(fact, now)
    mode = f.get("mode", {})
    lines = [
        f"mode: {'PAUSED (kill switch)' if mode.get('paused') else 'active'}, "
        f"dry-run {'on' if mode.get('dry_run') else 'off'}, "
        f"approval {'on' if mode.get('approval') else 'off'}",
        f"decider: {f.get('host', '?')} pid {f.get('pid', '?')}, event clock "
        f"{_when(float(f.get('clock', 0.0)))}, as of {f['age_s']:g} s ago"
        + (" (stale: the decider publishes every second; is a worker running?)"
           if f["age_s"] > STALE_AFTER_S else ""),
    ]
    changes = f.get("mode_changes", [])[-5:]
    if changes:
        lines.append("mode changes (latest last):")
        lines += [f"  {_when(c['at'])}  {c['by']}: {c['change']}" for c in changes]
    incidents = f.get("open_incidents", [])
    lines.append(f"open incidents: {len(incidents)}")
    lines += [f"  {i['id']}  {i['root_service']}  {i['state']}  opened "
              f"{_when(i['opened_at'])}" for i in incidents]
    active = f["active"]
    lines.append(f"actions in force: {len(active)}")
    for a in active:
        params = " ".join(f"{k}={v}" for k, v in sorted(a.get("params", {}).items()))
        lines.append(f"  {a['kind']} {a['service']} -> {a['target']} {params}  lease "
                     f"{a['lease_remaining_s']:g} s left  ({a['command_id']})")
    pending = f.get("pending", [])
    if pending:
        lines.append(f"awaiting approval: {len(pending)}")
        lines += [f"  {p['kind']} {p['service']} -> {p['target']}  (stanch approve "
                  f"{p['command_id']})" for p in pending]
    return "\n".join(lines)


def status_main(settings: Settings, as_json: bool = False) -> int:
    """The body of ``stanch status``; exit code (1: no status to show)."""
    import json
    import sys

    topic = status_topic(settings)
    try:
        fact = asyncio.run(read_status(settings))
    except Exception as exc:  # broker unreachable and friends
        print(f"stanch status: cannot read {topic} at {settings.bootstrap}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if fact is None:
        print(f"stanch status: no decider status on {topic} at {settings.bootstrap} yet "
              "(no worker has run with this topic prefix)", file=sys.stderr)
        return 1
    now = time.time()
    if as_json:
        print(json.dumps(with_remaining(fact, now)))
    else:
        print(format_status(fact, now))
    return 0
