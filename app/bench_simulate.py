"""Throughput check for ``stanch simulate``: events per second from one process.

Why: the issue asks for at least 50,000 events/s to the embedded broker, and figures
only mean something when anyone can re-measure them. Run
``python -m app.bench_simulate`` (starts an embedded broker on a free port unless
``STANCH_KAFKA_BOOTSTRAP`` is set) and it prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from app.settings import Settings
from app.simulate import run_simulation


async def measure(settings: Settings, *, simulated_s: float, rate: float,
                  scenario: str = "bad-deploy", seed: int = 7,
                  verify: bool = True) -> dict[str, Any]:
    """One as-fast-as-possible run; figures are wall-clock and therefore noisy."""
    report = await run_simulation(
        settings, scenario, seed=seed, duration_s=simulated_s, speed=0.0,
        base_rate_per_s=rate, onset_s=min(120.0, simulated_s / 3), start_ts=time.time())
    result = {
        "benchmark": "simulate_publish",
        "bootstrap": settings.bootstrap,
        "simulated_s": report.simulated_s,
        "wall_s": round(report.wall_s, 3),
        "events": report.events,
        "messages": report.messages,
        "events_per_s": round(report.events_per_s),
        "requests_published": report.requests,
    }
    if verify:
        result["requests_read_back"] = await _requests_on_broker(settings, report.requests)
    return result


async def _requests_on_broker(settings: Settings, expected: int,
                              timeout_s: float = 120.0) -> int:
    """Read the requests topic back and count the events: a check that 'published'
    means stored. (End offsets are not used: the embedded broker's can lag.)"""
    consumer = AIOKafkaConsumer(
        settings.topic("requests"), **settings.aiokafka_kwargs(), group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=100)
    await consumer.start()
    count = 0
    deadline = time.monotonic() + timeout_s
    try:
        while count < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                count += sum(len(orjson.loads(r.value)) for r in records)
        return count
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--simulated-s", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="peak external requests/s of a share-1 service")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reading the requests back from the broker")
    args = parser.parse_args()
    bootstrap = os.environ.get("STANCH_KAFKA_BOOTSTRAP", "").strip()
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    if bootstrap:
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
        result = asyncio.run(measure(settings, simulated_s=args.simulated_s, rate=args.rate,
                                     verify=not args.no_verify))
    else:
        from app.broker import EmbeddedBroker, free_port

        with EmbeddedBroker(port=free_port()) as broker:
            settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=prefix)
            result = asyncio.run(measure(settings, simulated_s=args.simulated_s,
                                         rate=args.rate, verify=not args.no_verify))
            result["broker"] = "embedded"
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
