"""A sidecar that lives through a broker outage: the broker is stopped, restarted empty
on the same port and the topics re-created (what an embedded broker restart does, and
what a lost Kafka cluster rebuilt from nothing looks like to a client).

Uses its own embedded broker (not the session one): the test stops it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.broker import EmbeddedBroker, free_port
from app.settings import Settings
from app.sidecar import Sidecar, SidecarOptions
from app.topics import ensure_topics
from tests.integration.test_sidecar import (
    SERVICE,
    Acks,
    Signer,
    keys_dir,
    publish,
    run,
    signer,
    start_app,
    upstream_app,
)

pytestmark = pytest.mark.integration

__all__ = ["keys_dir", "signer"]  # fixtures re-used from test_sidecar

#: Longer than the telemetry send timeout (5 s), so batches sent into the outage fail
#: and must be kept, not dropped; shorter than the issue's 20 s to keep the test quick.
OUTAGE_S = 8.0


async def request_events(settings: Settings, since: float) -> list[dict[str, Any]]:
    """Every request event on the (new) requests topic with ``ts >= since``."""
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100)
    await consumer.start()
    try:
        topic = settings.topic("requests")
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        events: list[dict[str, Any]] = []
        while True:
            batches = await consumer.getmany(timeout_ms=1500)
            if not batches:
                return [e for e in events if e["ts"] >= since]
            for records in batches.values():
                for record in records:
                    events.extend(orjson.loads(record.value))
    finally:
        await consumer.stop()


def test_sidecar_resumes_commands_and_keeps_telemetry_across_a_broker_restart(
    tmp_path: Path, keys_dir: Path, signer: Signer  # noqa: F811 (pytest fixtures)
) -> None:
    broker = EmbeddedBroker(port=free_port()).start()
    settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix="outage.",
                        data_dir=tmp_path / "data", partitions=2)

    async def scenario() -> None:
        await ensure_topics(settings)
        up, up_url = await start_app(upstream_app(SERVICE))
        sidecar = Sidecar(settings, SidecarOptions(
            service=SERVICE, upstream=up_url, listen="127.0.0.1:0", admin_port=0,
            instance="pod-1", trusted_keys_dir=keys_dir, telemetry_flush_s=0.05,
        ))
        await sidecar.start()
        sent_after: dict[str, int] = {"n": 0}
        stop_traffic = asyncio.Event()
        outage_started = 0.0

        async def traffic() -> None:  # ~50 req/s for the whole test
            async with aiohttp.ClientSession() as http:
                while not stop_traffic.is_set():
                    started = time.time()
                    async with http.get(f"{sidecar.ingress_url}/orders/1") as r:
                        await r.read()
                        assert r.status in (200, 429)
                    if outage_started and started >= outage_started:
                        sent_after["n"] += 1
                    await asyncio.sleep(0.02)

        try:
            await asyncio.wait_for(sidecar.commands.ready.wait(), 30)
            load = asyncio.get_running_loop().create_task(traffic())
            # one command (several commands move the consumer's offsets on) before
            before = [signer.command("throttle", params={"rate_per_s": 1000.0,
                                                         "route": f"/r{i}"}) for i in range(4)]
            async with Acks(settings) as acks:
                await publish(settings, *before)
                for command in before:
                    await acks.wait(command["id"], "applied")
            await asyncio.sleep(1.0)

            await asyncio.to_thread(broker.stop)
            # from here on nothing can reach a broker: every event must be kept
            outage_started = time.time()
            await asyncio.sleep(OUTAGE_S)
            # Restarted empty, topics re-created before any client gets in: blocking this
            # event loop (the sidecar's) meanwhile. Tansu auto-creates a topic on its
            # first produce and a later CreateTopics replaces it with its data, so a
            # sidecar racing the re-creation would lose what it sent first (a property of
            # the embedded broker, see docs/sidecar.md), not what this test is about.
            broker.start()
            recreate = threading.Thread(target=asyncio.run, args=(ensure_topics(settings),))
            recreate.start()
            recreate.join()

            after = [signer.command("throttle", params={"rate_per_s": 1000.0,
                                                        "route": f"/n{i}"}) for i in range(3)]
            async with Acks(settings) as acks:
                await publish(settings, *after)
                for command in after:  # every new command applied by the old sidecar
                    await acks.wait(command["id"], "applied", timeout=30)
                await acks.poll(1.0)
                # the re-read of the new topic does not ack anything twice
                assert sorted(a["command_id"] for a in acks.seen) == sorted(
                    c["id"] for c in after)
            active = {e.command_id for e in sidecar.table.active()}
            assert {c["id"] for c in after} <= active
            await asyncio.sleep(1.0)
            stop_traffic.set()
            await load
            deadline = time.monotonic() + 30
            while sidecar.telemetry.buffered and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # last deliveries
            events = await request_events(settings, since=outage_started)
            t = sidecar.telemetry
            assert t.dropped == 0, t.dropped  # the buffer (50,000) was never full
            assert t.published == t.recorded
            assert sent_after["n"] > 200
            # every request made since the outage began is on the new topic, once
            assert len(events) == sent_after["n"], (len(events), sent_after["n"])
        finally:
            stop_traffic.set()
            await sidecar.stop()
            await up.cleanup()

    try:
        run(scenario())
    finally:
        broker.stop()
