"""SIGKILL the worker mid-stream, restart it: no window is lost, and every copy of a
window id on the windows topic is identical (replays re-emit, never re-compute)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from app.settings import Settings
from models.aggregation import window_id_of
from tests.integration.test_detection_pipeline import (
    consume_until,
    reference_windows,
    request,
)
from tests.processes import start_worker

#: The restarted worker waits for the broker to expire the killed member's session:
#: a short session keeps the wait ~4 s instead of ~20 s.
FAST_REJOIN = {"STANCH_SESSION_TIMEOUT_S": "4", "STANCH_HEARTBEAT_INTERVAL_S": "1"}

SERVICES = ("alpha", "beta", "gamma", "delta")
ROUTES = ("/a", "/b")


def _stream(settings: Settings, duration_s: float, sent: list[tuple[str, list[Any]]],
            stop: threading.Event) -> None:
    """Live-like telemetry: every 50 ms one batch per service, stamped with the clock."""

    async def run() -> None:
        rng = np.random.default_rng(11)
        producer = AIOKafkaProducer(**settings.aiokafka_kwargs())
        await producer.start()
        try:
            end = time.time() + duration_s
            while time.time() < end and not stop.is_set():
                for service in SERVICES:
                    now = time.time()
                    events = [
                        request(now - float(rng.uniform(0, 0.05)), service,
                                ROUTES[int(rng.integers(0, 2))], float(rng.lognormal(3, 0.7)),
                                int(rng.choice([200, 200, 200, 200, 500])))
                        for _ in range(20)
                    ]
                    await producer.send(settings.topic("requests"), orjson.dumps(events),
                                        key=service.encode())
                    sent.append((service, events))
                await asyncio.sleep(0.05)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(run())


@pytest.mark.integration
def test_sigkill_loses_no_window_and_never_changes_one(topics: Settings,
                                                        tmp_path: Path) -> None:
    settings = topics
    sent: list[tuple[str, list[Any]]] = []
    stop = threading.Event()
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log, **FAST_REJOIN)
    producer = threading.Thread(target=_stream, args=(settings, 22.0, sent, stop))
    producer.start()
    kills = 0
    try:
        rnd = random.Random()
        for _ in range(2):
            time.sleep(rnd.uniform(1.0, 4.0))
            worker.kill()
            kills += 1
            worker = start_worker(settings, log, **FAST_REJOIN)
        producer.join(60)
        assert not producer.is_alive()
        expected = reference_windows(sent, settings, time.time())
        total = sum(w["count"] for w in expected.values())
        windows = asyncio.run(consume_until(
            settings, "windows",
            lambda vs: sum(v["count"] for v in {window_id_of(w): w for w in vs}.values())
            >= total,
            timeout=60, quiet_s=2.0))
        assert worker.proc.poll() is None, "worker died"
    finally:
        stop.set()
        producer.join(10)
        worker.stop()

    assert kills == 2
    copies: dict[str, list[bytes]] = {}
    for w in windows:
        copies.setdefault(window_id_of(w), []).append(orjson.dumps(w, option=orjson.OPT_SORT_KEYS))
    missing = set(expected) - set(copies)
    assert not missing, f"{len(missing)} windows lost, e.g. {sorted(missing)[:3]}"
    assert set(copies) == set(expected)
    changed = [wid for wid, vs in copies.items() if len(set(vs)) > 1]
    assert not changed, f"windows emitted with different content: {changed[:3]}"
    for wid, vs in copies.items():
        assert orjson.loads(vs[0]) == expected[wid], wid


def _shop_windows(seed: int, service: str) -> list[dict[str, Any]]:
    from tests.integration.test_live_equals_backtest import request_windows

    return [{**w, "service": service} for w in request_windows(np.random.default_rng(seed))]


@pytest.mark.integration
def test_sigkill_keeps_the_anomalies_of_an_uninterrupted_run(topics: Settings,
                                                            tmp_path: Path) -> None:
    """Window summaries stream in while the worker is SIGKILLed twice: the anomaly ids on
    the broker are exactly those the uninterrupted (offline) detector finds."""
    from tests.integration.test_detection_pipeline import produce
    from tests.integration.test_live_equals_backtest import offline_ids

    settings = topics
    streams = [_shop_windows(seed, f"shop{seed}") for seed in range(4)]
    expected = set().union(*(offline_ids(ws) for ws in streams))
    assert any("|latency|" in i for i in expected) and any("|errors|" in i for i in expected)
    stop = threading.Event()

    def feed() -> None:  # 10 summaries per series per message, ~4 s per 100 windows
        for i in range(0, len(streams[0]), 10):
            if stop.is_set():
                return
            asyncio.run(produce(settings, "windows", [
                (ws[0]["service"].encode() + b"|/buy|", orjson.dumps(ws[i:i + 10]))
                for ws in streams]))
            time.sleep(0.4)

    log = tmp_path / "worker.log"
    worker = start_worker(settings, log, **FAST_REJOIN)
    producer = threading.Thread(target=feed)
    producer.start()
    try:
        rnd = random.Random()
        for _ in range(2):
            time.sleep(rnd.uniform(2.0, 6.0))
            worker.kill()
            worker = start_worker(settings, log, **FAST_REJOIN)
        producer.join(120)
        assert not producer.is_alive()
        anomalies = asyncio.run(consume_until(
            settings, "anomalies", lambda vs: {a["id"] for a in vs} >= expected,
            timeout=60, quiet_s=3.0))
        assert worker.proc.poll() is None, "worker died"
    finally:
        stop.set()
        producer.join(10)
        worker.stop()
    live = {a["id"] for a in anomalies}
    assert live - expected == set(), "anomalies the uninterrupted run does not make"
    assert expected - live == set(), "anomalies of the uninterrupted run missing"
