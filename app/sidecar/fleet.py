"""How many sidecar instances of this service are alive: heartbeats on stanch.heartbeats.

Why: a throttle caps the service's total admitted rate (DESIGN.md: the cap is the
service's), but each sidecar enforces alone, so N instances each admitting the whole
rate let N times the cap through (issue 10 saw 48.4 req/s through a 24.2 req/s cap with
two instances). Each sidecar publishes a small heartbeat every ``interval_s`` on the
compacted topic ``<prefix>heartbeats`` keyed ``service|instance``, reads every heartbeat
itself (no consumer group), counts the instances of its own service heard from within
``stale_after_s`` (itself included) and makes the enforcement table admit
``1/instances`` of every throttle (``EnforcementTable.set_instances``).

Fails safe: an instance that hears no other (Kafka down, topic missing, first seconds
after start) counts 1 and admits the whole cap, as before; the count follows a change
within ``stale_after_s`` plus one interval. A sidecar that stops cleanly publishes a
tombstone, so the others take back its share at once. Freshness is judged by when a
heartbeat was received (the local monotonic clock), so clocks of different hosts need
not agree; only heartbeats read from the backlog at start-up are judged by their
``at`` (wall clock), to skip those of instances long gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.settings import Settings
from models.enforcement import EnforcementTable

log = logging.getLogger(__name__)

#: Heartbeat period. 2 s: a new or vanished instance changes every share within ~8 s
#: (stale_after + one period), at one tiny message per instance every 2 s.
HEARTBEAT_INTERVAL_S = 2.0
#: An instance not heard from for 3 periods is gone: one or two heartbeats may be late
#: (a loaded host, a slow fetch) without the others taking its share back and over-admit.
STALE_PERIODS = 3
#: Messages read back per partition at start-up: covers the last few periods of up to
#: ~1,000 instances (on a broker that does not compact, the topic keeps every beat).
BACKLOG = 5000


class FleetMembership:
    """Publishes this instance's heartbeat and keeps the live instance count."""

    def __init__(
        self,
        settings: Settings,
        service: str,
        instance: str,
        table: EnforcementTable,
        *,
        clock: Callable[[], float] = time.time,
        interval_s: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self.service = service
        self.instance = instance
        self.table = table
        self.clock = clock  # leases' clock: re-sharing a bucket refills it up to "now"
        self.interval_s = interval_s
        self.stale_after_s = interval_s * STALE_PERIODS
        self.peers: dict[str, float] = {}  # other instance -> monotonic time last heard
        self.sent = 0
        self._topic = settings.topic("heartbeats")
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._warned = False

    @property
    def key(self) -> bytes:
        return f"{self.service}|{self.instance}".encode()

    def live_instances(self, now_mono: float | None = None) -> int:
        """This instance plus every other one heard from within ``stale_after_s``."""
        now = time.monotonic() if now_mono is None else now_mono
        return 1 + sum(1 for t in self.peers.values() if now - t <= self.stale_after_s)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._beat(), name="heartbeat"),
            loop.create_task(self._listen(), name="heartbeat-listen"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._producer is not None:  # leaving: the others take back the share now
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._producer.send_and_wait(self._topic, None, key=self.key), 2
                )
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.stop(), 5)
        self._consumer = self._producer = None

    # ------------------------------------------------------------------ publish
    async def _beat(self) -> None:
        while True:
            try:
                if self._producer is None:
                    producer = AIOKafkaProducer(**self.settings.aiokafka_kwargs(), linger_ms=0)
                    try:
                        await producer.start()
                    except Exception:
                        with contextlib.suppress(Exception):
                            await producer.stop()
                        raise
                    self._producer = producer
                value = orjson.dumps({"service": self.service, "instance": self.instance,
                                      "at": time.time(), "interval_s": self.interval_s})
                await asyncio.wait_for(
                    self._producer.send_and_wait(self._topic, value, key=self.key),
                    self.interval_s * 2,
                )
                self.sent += 1
                self._warned = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka down: the others see this instance go stale
                if not self._warned:
                    log.warning("fleet: heartbeat not sent (%s); retrying", exc or type(exc))
                    self._warned = True
            self._recount()
            await asyncio.sleep(self.interval_s)

    # ------------------------------------------------------------------ listen
    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # topic missing or broker down: alone until back
                log.info("fleet: cannot read %s (%s); retrying in %.1fs", self._topic, exc,
                         backoff)
                if self._consumer is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._consumer.stop(), 5)
                    self._consumer = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            **self.settings.aiokafka_kwargs(), group_id=None, enable_auto_commit=False,
            auto_offset_reset="latest", fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        self._consumer = consumer
        await consumer.start()
        await consumer.topics()
        parts = consumer.partitions_for_topic(self._topic)
        if not parts:
            raise RuntimeError(f"topic {self._topic} does not exist (yet)")
        tps = [TopicPartition(self._topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - BACKLOG))
        backlog = True
        while True:
            batches = await consumer.getmany(timeout_ms=int(self.interval_s * 1000))
            for records in batches.values():
                for record in records:
                    self._heard(record.key, record.value, backlog)
            if not batches:
                backlog = False  # caught up: from now on, received = alive
            self._recount()

    def _heard(self, key: bytes | None, value: bytes | None, backlog: bool) -> None:
        if key is None:
            return
        service, _, instance = key.decode("utf-8", "replace").partition("|")
        if service != self.service or not instance or instance == self.instance:
            return
        if value is None:  # tombstone: the instance left cleanly
            self.peers.pop(instance, None)
            return
        try:
            beat = orjson.loads(value)
            at = float(beat["at"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # not a heartbeat of ours: ignored (the topic is internal)
        age = max(0.0, time.time() - at) if backlog else 0.0  # a backlog beat is as old
        if age > self.stale_after_s:  # as its wall-clock stamp says; a live one is new
            return
        self.peers[instance] = time.monotonic() - age

    def _recount(self) -> None:
        now = time.monotonic()
        for instance in [i for i, t in self.peers.items() if now - t > self.stale_after_s * 4]:
            del self.peers[instance]  # long gone: forget it
        n = self.live_instances(now)
        if n != self.table.instances:
            log.info("fleet: %s has %d live instance(s); each admits 1/%d of a throttle",
                     self.service, n, n)
            self.table.set_instances(n, self.clock())
