"""The topic registry and the worker against the real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app.broker import EmbeddedBroker, free_port, port_open
from app.settings import TOPIC_NAMES, Settings
from app.topics import TOPIC_SPECS, describe_partitions, ensure_topics
from tests.processes import start_worker

pytestmark = pytest.mark.integration


def test_ensure_topics_creates_every_topic_once(settings: Settings) -> None:
    created = asyncio.run(ensure_topics(settings))
    assert sorted(created) == sorted(settings.topic(n) for n in TOPIC_NAMES)
    assert asyncio.run(ensure_topics(settings)) == []
    partitions = asyncio.run(describe_partitions(settings))
    for name in TOPIC_NAMES:
        expected = TOPIC_SPECS[name].partitions or settings.partitions
        assert partitions[settings.topic(name)] == expected


def test_embedded_broker_starts_and_stops() -> None:
    broker = EmbeddedBroker(port=free_port()).start()
    try:
        assert port_open(broker.host, broker.port)
        with pytest.raises(Exception, match="already in use"):
            EmbeddedBroker(port=broker.port).start()
    finally:
        broker.stop()
    assert not port_open(broker.host, broker.port)


def test_worker_is_ready_quickly_and_stops_cleanly(topics: Settings, tmp_path: Path) -> None:
    started = time.monotonic()
    worker = start_worker(topics, tmp_path / "worker.log")
    ready_s = time.monotonic() - started
    try:
        # On the embedded broker with the default session timeout the worker is ready in
        # seconds, not the 30 s Faust's defaults would cost (half the session timeout).
        assert ready_s < 30, f"worker took {ready_s:.1f} s"
    finally:
        code = worker.stop()
    assert code == 0, "".join(worker.lines[-30:])


def test_fetch_wait_is_short_so_a_hop_costs_milliseconds(topics: Settings) -> None:
    """A plain consume with the worker's fetch wait answers in well under Faust's 1.5 s."""

    async def round_trip() -> float:
        producer = AIOKafkaProducer(**topics.aiokafka_kwargs())
        consumer = AIOKafkaConsumer(
            topics.topic("control"),
            **topics.aiokafka_kwargs(),
            auto_offset_reset="earliest",
            fetch_max_wait_ms=topics.fetch_max_wait_ms,
        )
        await producer.start()
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=500)  # join + first empty fetch
            sent = time.monotonic()
            await producer.send_and_wait(topics.topic("control"), orjson.dumps({"x": 1}))
            msg = await asyncio.wait_for(consumer.getone(), 10)
            assert orjson.loads(msg.value) == {"x": 1}
            return time.monotonic() - sent
        finally:
            await consumer.stop()
            await producer.stop()

    assert asyncio.run(round_trip()) < 1.0


def test_worker_serves_health_status_and_metrics(topics: Settings, tmp_path: Path) -> None:
    import urllib.request

    from app.broker import free_port as _free_port

    port = _free_port()
    worker = start_worker(topics, tmp_path / "worker.log", STANCH_WEB_PORT=str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/stanch/health", timeout=10) as response:
            assert response.status == 200
            assert orjson.loads(response.read())["status"] == "ok"
        with urllib.request.urlopen(f"{base}/stanch/status", timeout=10) as response:
            body = orjson.loads(response.read())
        assert body["topic_prefix"] == topics.topic_prefix
        assert "aggregation" in body["agents"]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert "stanch_worker_uptime_seconds" in text
        assert 'stanch_aggregation_total{what="messages"}' in text
    finally:
        worker.stop()


def test_incidents_before_any_topic_exists_is_one_clear_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from app.cli import cli

    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", settings.bootstrap)
    monkeypatch.setenv("STANCH_TOPIC_PREFIX", settings.topic_prefix)  # nothing created
    for args in (["incidents"], ["incidents", "list", "--json"],
                 ["incidents", "show", "inc-1", "--no-plot"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        [line] = [x for x in result.output.splitlines() if x.strip()]
        assert f"no topic {settings.topic('incidents')} at {settings.bootstrap} yet" in line
        assert "stanch worker" in line


def test_embedded_broker_restarts_on_the_same_port_within_seconds() -> None:
    broker = EmbeddedBroker(port=free_port())
    started = time.monotonic()
    broker.start()
    try:
        assert time.monotonic() - started < 10  # accepts connections at once (~0.1 s)
        settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix="restart.")
        asyncio.run(ensure_topics(settings))

        async def connected_client_then_stop() -> float:
            # a client connected: Tansu alone drains for ~5 s on SIGTERM
            producer = AIOKafkaProducer(**settings.aiokafka_kwargs())
            await producer.start()
            await producer.send_and_wait(settings.topic("changes"), b"{}")
            stopping = time.monotonic()
            await asyncio.to_thread(broker.stop)
            took = time.monotonic() - stopping
            await producer.stop()
            return took

        assert asyncio.run(connected_client_then_stop()) < 5
        assert not port_open("127.0.0.1", broker.port)
        broker.start()  # the same port again, empty
        from app.topics import missing_topics

        names = [settings.topic(n) for n in TOPIC_NAMES]
        assert asyncio.run(missing_topics(settings, names)) == names
    finally:
        broker.stop()
