"""``stanch replay``: read a time range of a Stanch topic and re-publish it or re-detect it.

Analysts use it to see what happened (``--print``), to feed last week's telemetry into a
staging pipeline under another topic prefix (``--to-prefix``), or to re-run the
detectors over recorded windows with other settings (``--redetect``).

Finding where a time range starts: Kafka's ``offsets_for_times`` is the right tool, but
the embedded broker answers it unreliably (and reports end offsets that undercount
multi-record batches), so every answer is checked against the records around it and,
when wrong, the partition is scanned from its beginning with the time filter applied to
each record. Reading always continues to the real end of the partition (until a fetch
comes back empty) because producer timestamps need not grow monotonically.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import click
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from app.settings import Settings

log = logging.getLogger(__name__)


class ReplayError(click.ClickException):
    """Nothing to replay (topic missing, Kafka unreachable): one line, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"stanch replay: {self.format_message()}", err=True)


@dataclass(frozen=True)
class ReplayRange:
    """Half-open range [start_ms, end_ms) of record timestamps; None = unbounded."""

    start_ms: int | None = None
    end_ms: int | None = None

    def contains(self, ts_ms: int) -> bool:
        if self.start_ms is not None and ts_ms < self.start_ms:
            return False
        return self.end_ms is None or ts_ms < self.end_ms


async def _timestamp_at(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> int | None:
    consumer.seek(tp, offset)
    batch = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
    records = batch.get(tp, [])
    return records[0].timestamp if records else None


async def start_offsets(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], start_ms: int | None
) -> dict[TopicPartition, int]:
    """Offset to start from on each partition for records at or after ``start_ms``."""
    beginnings = await consumer.beginning_offsets(partitions)
    if start_ms is None:
        return dict(beginnings)
    try:
        answers = await consumer.offsets_for_times({tp: start_ms for tp in partitions})
    except Exception as exc:  # the embedded broker may not answer at all
        log.info("offsets_for_times failed (%s); scanning from the beginning", exc)
        answers = {}
    result: dict[TopicPartition, int] = {}
    for tp in partitions:
        low = beginnings[tp]
        answer = answers.get(tp)
        if answer is not None and answer.offset >= low and await _is_boundary(
            consumer, tp, answer.offset, start_ms, low
        ):
            result[tp] = answer.offset
        else:
            result[tp] = low  # scan: the per-record time filter does the rest
    return result


async def _is_boundary(
    consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, start_ms: int, low: int
) -> bool:
    """True when ``offset`` is the first record at or after ``start_ms``."""
    here = await _timestamp_at(consumer, tp, offset)
    if here is not None and here < start_ms:
        return False
    if offset == low:
        return True
    before = await _timestamp_at(consumer, tp, offset - 1)
    return before is not None and before < start_ms


async def require_topic(settings: Settings, topic: str) -> None:
    """Raise :class:`ReplayError` (one line) when Kafka is unreachable or ``topic`` is
    missing; reading a missing topic used to end in a traceback from the Kafka client."""
    from app.topics import missing_topics

    try:
        missing = await missing_topics(settings, [topic])
    except RuntimeError as exc:
        raise ReplayError(str(exc)) from None
    if missing:
        raise ReplayError(f"topic {topic} does not exist at {settings.bootstrap}: nothing to "
                          "replay (`stanch worker` creates the topics; check "
                          "STANCH_TOPIC_PREFIX)")


async def read_range(
    settings: Settings, topic: str, window: ReplayRange
) -> AsyncIterator[ConsumerRecord]:
    """Every record of ``topic`` whose timestamp lies in ``window``, partition by partition."""
    await require_topic(settings, topic)
    consumer = AIOKafkaConsumer(
        **settings.aiokafka_kwargs(), enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()  # topic created just now
            parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            raise ReplayError(f"topic {topic} has no partitions at {settings.bootstrap}")
        partitions = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(partitions)
        starts = await start_offsets(consumer, partitions, window.start_ms)
        for tp in partitions:
            consumer.seek(tp, starts[tp])
            while True:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
                records = batch.get(tp, [])
                if not records:
                    break
                for record in records:
                    if window.contains(record.timestamp):
                        yield record
    finally:
        await consumer.stop()


async def republish(
    settings: Settings, name: str, window: ReplayRange, target: Settings
) -> int:
    """Copy a time range of topic ``name`` to the same topic under ``target``'s prefix."""
    from app.topics import ensure_topics

    await require_topic(settings, settings.topic(name))  # before creating the target's
    await ensure_topics(target)
    producer = AIOKafkaProducer(**target.aiokafka_kwargs(), linger_ms=5)
    await producer.start()
    sent = 0
    try:
        async for record in read_range(settings, settings.topic(name), window):
            await producer.send(
                target.topic(name),
                value=record.value,
                key=record.key,
                timestamp_ms=record.timestamp,
            )
            sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def run_replay(settings: Settings, name: str, window: ReplayRange, to_prefix: str) -> int:
    target = Settings(**{**settings.model_dump(), "topic_prefix": to_prefix})
    if target.topic(name) == settings.topic(name):
        raise ValueError("--to-prefix must differ from the source prefix (a replay loop)")
    return asyncio.run(republish(settings, name, window, target))


async def collect(settings: Settings, name: str, window: ReplayRange) -> list[bytes]:
    """The raw values of a time range of topic ``name`` (for printing and re-detection)."""
    return [r.value async for r in read_range(settings, settings.topic(name), window)]
