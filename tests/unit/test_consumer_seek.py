"""The seek to the committed offsets that ends a rebalance must not skip records.

Faust's recovery seeks the stream partitions while the flow runs and then clears the
streams' queues; records fetched in between were handed to the streams (then cleared)
while the fetch position moved past them, so they were lost. ``_Consumer.perform_seek``
stops the flow for the seek and rewinds a partition whose first record after it lies
past the committed offset. These tests drive the consumer object without a broker; the
killed-worker test in tests/integration/test_incident_agents.py shows it on one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from app.faust_app import create_app
from app.settings import Settings

WINDOWS = TP("t.windows", 0)


def _record(offset: int) -> Any:
    return SimpleNamespace(offset=offset, topic=WINDOWS.topic)


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    app = create_app(Settings(kafka_bootstrap="127.0.0.1:1", data_dir=tmp_path))
    consumer = app.consumer
    seeks: list[tuple[TP, int]] = []

    async def _seek(tp: TP, offset: int) -> None:
        seeks.append((tp, offset))

    async def seek_to_committed() -> dict[TP, int]:
        return {WINDOWS: 480}

    monkeypatch.setattr(consumer, "_seek", _seek)
    monkeypatch.setattr(consumer, "seek_to_committed", seek_to_committed)
    consumer.test_seeks = seeks
    return consumer


def _fetches(monkeypatch: pytest.MonkeyPatch, batches: Iterable[list[int]]) -> None:
    """Make the driver's getmany yield these offsets of WINDOWS, one batch per call."""
    pending = list(batches)

    async def getmany(self: Any, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        for offset in pending.pop(0):
            yield WINDOWS, _record(offset)

    monkeypatch.setattr(faust_aiokafka.Consumer, "getmany", getmany)


async def _read(consumer: Any, calls: int) -> list[int]:
    got = []
    for _ in range(calls):
        async for _tp, message in consumer.getmany(timeout=0.1):
            got.append(message.offset)
    return got


def test_the_seek_stops_the_flow_until_the_caller_resumes_it(consumer: Any) -> None:
    async def main() -> None:
        consumer.resume_flow()
        await consumer.perform_seek()
        assert not consumer.flow_active, "records would be handed to queues being cleared"
        assert consumer._read_offset[WINDOWS] == 480

    asyncio.run(main())


def test_records_skipped_during_the_seek_are_read_again(
        consumer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # 480..509 were handed to the streams while the seek ran (and then cleared from
    # their queues); the fetch position had moved on, so the next fetch starts at 510.
    _fetches(monkeypatch, [[510, 511, 512], [480, 481, 482]])

    async def main() -> None:
        await consumer.perform_seek()
        consumer.resume_flow()
        assert await _read(consumer, 2) == [480, 481, 482]
        assert consumer.test_seeks[-1] == (WINDOWS, 480)

    asyncio.run(main())


def test_a_partition_that_resumes_at_its_committed_offset_is_left_alone(
        consumer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _fetches(monkeypatch, [[480, 481], [482, 490]])  # a later gap is not the seek's

    async def main() -> None:
        await consumer.perform_seek()
        consumer.resume_flow()
        seeks_before = list(consumer.test_seeks)
        assert await _read(consumer, 2) == [480, 481, 482, 490]
        assert consumer.test_seeks == seeks_before

    asyncio.run(main())


def test_a_real_gap_after_the_committed_offset_is_accepted_after_one_rewind(
        consumer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # 480..499 are gone (retention): the re-read starts at 500 again and is accepted.
    _fetches(monkeypatch, [[500, 501], [500, 501, 502]])

    async def main() -> None:
        await consumer.perform_seek()
        consumer.resume_flow()
        assert await _read(consumer, 2) == [500, 501, 502]
        assert [s for s in consumer.test_seeks if s == (WINDOWS, 480)] == [(WINDOWS, 480)]

    asyncio.run(main())
