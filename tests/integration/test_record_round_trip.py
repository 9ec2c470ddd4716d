"""Every record type survives a produce-consume round trip through the real broker."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app.settings import Settings
from schemas.codec import RECORD_TYPES, decode, dumps
from schemas.examples import EXAMPLES

pytestmark = pytest.mark.integration

#: Logical topic -> name of its example in schemas.examples.
EXAMPLE_OF_TOPIC = {
    "requests": "request",
    "errors": "error",
    "changes": "change",
    "windows": "window",
    "anomalies": "anomaly",
    "incidents": "incident",
    "commands": "command",
    "acks": "ack",
    "control": "control",
    "deadletter": "deadletter",
    "labels": "label",
}


def test_every_record_type_round_trips_through_its_topic(topics: Settings) -> None:
    assert set(EXAMPLE_OF_TOPIC) == set(RECORD_TYPES)
    assert set(EXAMPLE_OF_TOPIC.values()) <= set(EXAMPLES)
    sent = {
        name: RECORD_TYPES[name].from_dict(EXAMPLES[example])
        for name, example in EXAMPLE_OF_TOPIC.items()
    }

    async def round_trip() -> dict[str, object]:
        producer = AIOKafkaProducer(**topics.aiokafka_kwargs())
        consumer = AIOKafkaConsumer(
            *(topics.topic(n) for n in sent),
            **topics.aiokafka_kwargs(),
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        await producer.start()
        await consumer.start()
        try:
            for name, record in sent.items():
                await producer.send_and_wait(topics.topic(name), dumps(record), key=b"k")
            received: dict[str, object] = {}
            deadline = asyncio.get_running_loop().time() + 30
            while len(received) < len(sent) and asyncio.get_running_loop().time() < deadline:
                for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                    name = tp.topic.removeprefix(topics.topic_prefix)
                    for message in messages:
                        received[name] = decode(message.value, RECORD_TYPES[name])
            return received
        finally:
            await consumer.stop()
            await producer.stop()

    received = asyncio.run(round_trip())
    assert received == sent
