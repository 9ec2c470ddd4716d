"""Replay by time range on the real broker, including the fallback when the broker's
offsets_for_times answer is wrong."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from app.replay import ReplayRange, collect, run_replay
from app.settings import Settings

pytestmark = pytest.mark.integration

BASE_MS = 1_750_000_000_000


async def _produce(settings: Settings, name: str, count: int) -> None:
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs())
    await producer.start()
    try:
        for i in range(count):
            await producer.send_and_wait(
                settings.topic(name),
                orjson.dumps({"i": i}),
                key=f"k{i % 3}".encode(),
                timestamp_ms=BASE_MS + i * 1000,
            )
    finally:
        await producer.stop()


def _indices(values: list[bytes]) -> list[int]:
    return sorted(orjson.loads(v)["i"] for v in values)


def test_replay_reads_exactly_the_time_range(topics: Settings) -> None:
    asyncio.run(_produce(topics, "changes", 30))
    window = ReplayRange(BASE_MS + 10_000, BASE_MS + 20_000)
    assert _indices(asyncio.run(collect(topics, "changes", window))) == list(range(10, 20))
    assert _indices(asyncio.run(collect(topics, "changes", ReplayRange()))) == list(range(30))
    assert asyncio.run(collect(topics, "changes", ReplayRange(BASE_MS + 99_000_000))) == []


def test_replay_reads_multi_record_batches_to_the_end(topics: Settings) -> None:
    """The embedded broker's end offsets undercount batched records: read to the real end."""

    async def produce_batched() -> None:
        producer = AIOKafkaProducer(**topics.aiokafka_kwargs(), linger_ms=20)
        await producer.start()
        try:
            futures = [
                await producer.send(
                    topics.topic("control"), orjson.dumps({"i": i}), timestamp_ms=BASE_MS + i
                )
                for i in range(50)
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(produce_batched())
    window = ReplayRange(BASE_MS + 20, BASE_MS + 45)
    assert _indices(asyncio.run(collect(topics, "control", window))) == list(range(20, 45))


def test_republish_to_another_prefix(topics: Settings) -> None:
    asyncio.run(_produce(topics, "changes", 12))
    target_prefix = topics.topic_prefix.rstrip(".") + "-copy."
    window = ReplayRange(BASE_MS + 5_000, None)
    sent = run_replay(topics, "changes", window, target_prefix)
    assert sent == 7
    target = Settings(**{**topics.model_dump(), "topic_prefix": target_prefix})
    assert _indices(asyncio.run(collect(target, "changes", ReplayRange()))) == list(range(5, 12))
    with pytest.raises(ValueError, match="must differ"):
        run_replay(topics, "changes", window, topics.topic_prefix)


def test_replay_of_a_missing_topic_is_one_clear_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from app.cli import cli

    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", settings.bootstrap)
    monkeypatch.setenv("STANCH_TOPIC_PREFIX", settings.topic_prefix)  # no topics created
    target_prefix = f"{settings.topic_prefix}copy."  # unique to this test
    for args in (["replay", "--topic", "windows"],
                 ["replay", "--topic", "windows", "--to-prefix", target_prefix]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1
        assert "Traceback" not in result.output
        assert result.output.strip() == (
            f"stanch replay: topic {settings.topic('windows')} does not exist at "
            f"{settings.bootstrap}: nothing to replay (`stanch worker` creates the topics; "
            "check STANCH_TOPIC_PREFIX)")
    # the failed re-publish did not create the target's topics either
    from app.topics import missing_topics

    target = Settings(kafka_bootstrap=settings.bootstrap, topic_prefix=target_prefix)
    assert asyncio.run(missing_topics(target, [target.topic("windows")])) == [
        target.topic("windows")]
