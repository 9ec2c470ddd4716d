"""Consumer of stanch.commands for one service: verify, enforce, ack; restart recovery.

Why every sidecar reads every partition itself (no consumer group): each instance of a
service must enforce every command of that service, so instances must not share
partitions. Commands are few; filtering by key is cheap.

Restart recovery: on start the sidecar re-reads stanch.acks (what *this* instance already
acked) and stanch.commands from the beginning of each partition up to the end offsets
seen at start (the embedded broker's offsets_for_times is unreliable, so no time seek).
Every command goes through the same gate as live ones, which rebuilds the replay set
and re-applies the leases still valid; a rollback this instance already acked
"applied" is marked done and never run again; acks are not repeated for commands this
instance already acked. Then it continues live.

Broker outages: a broker restarted empty (or a cluster rebuilt) re-creates the topic
with offsets from 0, while this consumer's position is still at the old end, so it would
skip every new command up to there (the issue saw 2 of 3 lost). Every
``probe_interval_s`` the consumer asks for the end offsets; when that failed (the broker
was unreachable) and then works again, or when the position lies beyond both the
listed end and the last fetch's high watermark, it re-reads the topic from the start in
recovery mode: commands already seen are dropped by the gate's replay set without a new
ack, new ones are enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.settings import Settings
from app.sidecar.rollback import RollbackHook
from models.enforcement import CommandGate, EnforcementTable, ParsedCommand, Verdict
from schemas.signing import KeyRing

log = logging.getLogger(__name__)


def _records_parser() -> Callable[[Any], Any] | None:
    """schemas.records.Command.from_dict when that module exists (strict contract check)."""
    try:
        from schemas.records import Command  # type: ignore[attr-defined]
    except ImportError:
        return None
    from_dict = getattr(Command, "from_dict", None)
    if from_dict is None:
        return None

    def parse(obj: Any) -> Any:
        try:
            return from_dict(obj)
        except ValueError:
            raise
        except Exception as exc:  # SchemaError may not be a ValueError: normalise it
            raise ValueError(str(exc)) from exc

    return parse


class CommandConsumer:
    """Feeds stanch.commands through the gate into the enforcement table and acks."""

    def __init__(
        self,
        settings: Settings,
        service: str,
        instance: str,
        keyring: KeyRing,
        table: EnforcementTable,
        hook: RollbackHook,
        *,
        clock: Callable[[], float] = time.time,
        expire_interval_s: float = 0.2,
        expired_ack_horizon_s: float = 900.0,
        probe_interval_s: float = 2.0,
    ) -> None:
        self.settings = settings
        self.service = service
        self.instance = instance
        self.table = table
        self.hook = hook
        self.gate = CommandGate(service, keyring.verify, max_lease_s=settings.max_lease_s,
                                max_skew_s=settings.max_clock_skew_s)
        self.clock = clock
        self.expire_interval_s = expire_interval_s
        self.expired_ack_horizon_s = expired_ack_horizon_s
        # 2 s: a restart is noticed within a few seconds of the broker's return, at the
        # cost of one ListOffsets request every 2 s per sidecar (commands are few)
        self.probe_interval_s = probe_interval_s
        self.rereads = 0  # times the topic was re-read from the start after a reset
        self._broker_lost = False
        self.ready = asyncio.Event()
        self.counts: dict[str, int] = {
            "applied": 0, "rejected": 0, "failed": 0, "expired": 0, "ignored": 0,
        }
        self.recovered = 0
        self.connected = False
        self.last_error = ""
        self._parse = _records_parser()
        self._topic = settings.topic("commands")
        self._acks_topic = settings.topic("acks")
        self._key = service.encode()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self._acked_by_me: dict[str, set[str]] = {}
        self._recovering = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="commands"),
            loop.create_task(self._expire_loop(), name="lease-expiry"),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._hook_tasks]:
            task.cancel()
        for task in [*self._tasks, *self._hook_tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.stop(), 5)
        self._consumer = self._producer = None

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._connect_and_recover()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker down or topic missing: retry, keep proxying
                self.last_error = str(exc) or type(exc).__name__
                log.warning("commands: cannot start (%s); retrying in %.1fs", exc, backoff)
                await self._close_clients()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        self.ready.set()
        await self._live()

    async def _close_clients(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.stop(), 5)
        self._consumer = self._producer = None

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            **self.settings.aiokafka_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )

    async def _partitions(self, consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
        await consumer.topics()  # refreshes cluster metadata
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise RuntimeError(f"topic {topic} does not exist (yet)")
        return [TopicPartition(topic, p) for p in sorted(parts)]

    async def _connect_and_recover(self) -> None:
        self._producer = AIOKafkaProducer(
            **self.settings.aiokafka_kwargs(), acks="all", linger_ms=0
        )
        await self._producer.start()
        self._acked_by_me = await self._read_my_acks()
        consumer = self._new_consumer()
        self._consumer = consumer
        await consumer.start()
        tps = await self._partitions(consumer, self._topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        self.connected = True
        self._recovering = True
        try:
            while await self._behind(consumer, tps, end):
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for records in batches.values():
                    for record in records:
                        await self._handle(record.key, record.value)
                        self.recovered += 1
        finally:
            self._recovering = False
        log.info(
            "commands: recovered %d messages, %d active enforcements",
            self.recovered,
            len(self.table),
        )

    @staticmethod
    async def _behind(
        consumer: AIOKafkaConsumer, tps: list[TopicPartition], end: dict[TopicPartition, int]
    ) -> bool:
        """True while some partition has not been read up to its end.

        The end is the larger of the end offset listed at start and the high watermark of
        the latest fetch: the embedded broker lists the first offset of the last producer
        batch + 1 as the end, which would hide the rest of that batch (a recovered
        sidecar must see every still-valid command).
        """
        for tp in tps:
            real_end = max(end[tp], consumer.highwater(tp) or 0)
            if await consumer.position(tp) < real_end:
                return True
        return False

    async def _read_my_acks(self) -> dict[str, set[str]]:
        """Ids (-> statuses) this instance of this service already acked."""
        consumer = self._new_consumer()
        await consumer.start()
        mine: dict[str, set[str]] = {}
        try:
            tps = await self._partitions(consumer, self._acks_topic)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            while await self._behind(consumer, tps, end):
                batches = await consumer.getmany(timeout_ms=200, max_records=1000)
                for records in batches.values():
                    for record in records:
                        if record.key != self._key:
                            continue
                        try:
                            ack = orjson.loads(record.value)
                        except orjson.JSONDecodeError:
                            continue
                        if (
                            isinstance(ack, dict)
                            and ack.get("service") == self.service
                            and ack.get("instance") == self.instance
                            and isinstance(ack.get("command_id"), str)
                        ):
                            mine.setdefault(ack["command_id"], set()).add(str(ack.get("status")))
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
        return mine

    async def _live(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self.probe_interval_s
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # transient broker trouble: aiokafka reconnects
                self.last_error = str(exc) or type(exc).__name__
                log.warning("commands: fetch failed (%s)", exc)
                await asyncio.sleep(0.5)
                batches = {}
            for records in batches.values():
                for record in records:
                    await self._handle(record.key, record.value)
            if loop.time() >= next_probe:
                if await self._topic_was_reset(consumer):
                    await self._reread(consumer)
                next_probe = loop.time() + self.probe_interval_s

    async def _topic_was_reset(self, consumer: AIOKafkaConsumer) -> bool:
        """True when the commands topic may have been re-created under this consumer."""
        tps = sorted(consumer.assignment())
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(tps), self.probe_interval_s * 2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._broker_lost:
                log.warning("commands: broker unreachable (%s); %s will be re-read from the "
                            "start when it answers again", exc or type(exc).__name__,
                            self._topic)
            self._broker_lost = True
            self.connected = False
            return False
        self.connected = True
        if self._broker_lost:
            return True
        for tp in tps:
            position = await consumer.position(tp)
            highwater = consumer.highwater(tp)
            if position > ends.get(tp, 0) and (highwater is None or position > highwater):
                return True
        return False

    async def _reread(self, consumer: AIOKafkaConsumer) -> None:
        """Read the commands topic again from its beginning (recovery mode: no new ack
        for what this instance already acked), then continue live."""
        self._recovering = True
        try:
            tps = await self._partitions(consumer, self._topic)
            consumer.assign(tps)  # fresh partition states: no stale high watermark
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            handled = 0
            while await self._behind(consumer, tps, end):
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for records in batches.values():
                    for record in records:
                        await self._handle(record.key, record.value)
                        handled += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # topic not re-created yet: try again at the next probe
            log.warning("commands: cannot re-read %s yet (%s)", self._topic, exc)
            self._broker_lost = True
            return
        finally:
            self._recovering = False
        self._broker_lost = False
        self.rereads += 1
        log.warning("commands: %s re-read from the start after a broker outage or reset "
                    "(%d messages, %d active enforcements)", self._topic, handled,
                    len(self.table))

    # ------------------------------------------------------------------ one command
    async def _handle(self, key: bytes | None, value: bytes | None) -> None:
        """Never raises: any problem with one message becomes a rejected ack or a log."""
        try:
            await self._handle_unsafe(key, value)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("commands: unexpected error handling a message")

    async def _handle_unsafe(self, key: bytes | None, value: bytes | None) -> None:
        message_key = key.decode("utf-8", "replace") if key is not None else None
        now = self.clock()
        try:
            obj = orjson.loads(value or b"")
        except orjson.JSONDecodeError as exc:
            if message_key == self.service:
                await self._ack("", "rejected", f"malformed: not JSON ({exc})")
            return
        verdict = self.gate.check(obj, message_key, now, parse=self._parse)
        await self._act(verdict, obj, now)

    async def _act(self, verdict: Verdict, obj: Any, now: float) -> None:
        cid = verdict.command_id
        already = self._acked_by_me.get(cid, set()) if self._recovering else set()
        if verdict.action == "ignore":
            self.counts["ignored"] += 1
            return
        if verdict.action == "reject":
            self.counts["rejected"] += 1
            if not already:
                await self._ack(cid, "rejected", verdict.reason)
            return
        cmd = verdict.command
        assert cmd is not None
        if verdict.action == "expire":
            self.counts["expired"] += 1
            if not already and now - cmd.issued_at <= self.expired_ack_horizon_s:
                await self._ack(cid, "expired", verdict.reason)
            return
        if cmd.kind == "rollback" and "applied" in already:
            self.table.mark_rollback_done(cid)
            return
        outcome = self.table.apply(cmd, now)
        if outcome.run_rollback:
            self.table.mark_rollback_done(cid)  # claimed: never started twice
            task = asyncio.get_running_loop().create_task(self._rollback(cmd))
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)
            return
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        if not already:
            await self._ack(cid, outcome.status, outcome.reason)

    async def _rollback(self, cmd: ParsedCommand) -> None:
        result = await self.hook.run(cmd.raw, self.service)
        status = "applied" if result.ok else "failed"
        self.counts[status] += 1
        await self._ack(cmd.id, status, result.detail)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expire_interval_s)
            for lifted in self.table.expire(self.clock()):
                log.info("commands: lease of %s %s ended, lifted", lifted.kind, lifted.key)
                await self._ack(lifted.command_id, "expired", "lease ended without renewal")

    async def _ack(self, command_id: str, status: str, reason: str) -> None:
        ack: Mapping[str, Any] = {
            "command_id": command_id,
            "service": self.service,
            "instance": self.instance,
            "status": status,
            "reason": reason,
            "at": self.clock(),
        }
        self._acked_by_me.setdefault(command_id, set()).add(status)
        if self._producer is None:
            log.warning("commands: no producer, ack lost: %s", ack)
            return
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(self._acks_topic, orjson.dumps(ack), key=self._key),
                10,
            )
        except Exception as exc:
            log.warning("commands: ack %s %s not sent (%s)", command_id, status, exc)
