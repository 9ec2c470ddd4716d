"""The live pipeline on a real broker: batched requests with bad elements -> windows,
dead letters with reasons, and a worker that stays up."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app.settings import Settings
from models import sketch as sk
from models.aggregation import WindowAggregator, window_id_of
from schemas.records import RequestEvent, WindowSummary
from tests.processes import start_worker


# ------------------------------------------------------------------ broker helpers
async def produce(settings: Settings, topic: str,
                  messages: Iterable[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), max_request_size=4_194_304)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send(settings.topic(topic), value=value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def consume_until(settings: Settings, topic: str,
                        done: Callable[[list[Any]], bool], timeout: float = 40.0,
                        quiet_s: float = 0.0) -> list[Any]:
    """Every message value (JSON-decoded; arrays flattened) of ``topic`` from the start,
    until ``done(values)`` holds (then ``quiet_s`` more seconds) or the timeout."""
    consumer = AIOKafkaConsumer(settings.topic(topic), **settings.aiokafka_kwargs(),
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    values: list[Any] = []
    deadline = time.monotonic() + timeout
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    v = orjson.loads(r.value)
                    values.extend(v if isinstance(v, list) else [v])
            if quiet_until is None and done(values):
                quiet_until = time.monotonic() + quiet_s
            if quiet_until is not None and time.monotonic() >= quiet_until:
                break
    finally:
        await consumer.stop()
    return values


def request(ts: float, service: str, route: str, latency: float, status: int = 200,
            **extra: Any) -> dict[str, Any]:
    return {"ts": ts, "service": service, "route": route, "status": status,
            "latency_ms": latency, **extra}


def reference_windows(batches: list[tuple[str, list[dict[str, Any]]]],
                      settings: Settings, now: float) -> dict[str, dict[str, Any]]:
    """What the pure aggregator makes of the same valid input, one partition per service
    (the agent's partitions may group services differently; the input is built so that
    does not change any window)."""
    agg = WindowAggregator(settings.window_s, settings.grace_s, settings.max_clock_skew_s)
    out: dict[str, dict[str, Any]] = {}
    for service, events in batches:
        records = [RequestEvent.from_dict(e) if "window_start" not in e
                   else WindowSummary.from_dict(e) for e in events]
        agg.add_batch(service, records, now)
        for w in agg.close_ready(service):
            out[window_id_of(w)] = w
    for service in {s for s, _ in batches}:
        for w in agg.close_all(service):
            out[window_id_of(w)] = w
    return out


# ----------------------------------------------------------------------------- test
@pytest.mark.integration
def test_pipeline_windows_and_dead_letters(topics: Settings, tmp_path: Path) -> None:
    settings = topics
    rng = np.random.default_rng(7)
    now = time.time()
    base = math.floor(now) - 60.0  # a minute ago: far from any clock-skew limit
    series = [("svc-a", "/x", None), ("svc-a", "/y", None), ("svc-b", "/z", "db")]
    valid: list[tuple[str, list[dict[str, Any]]]] = []
    messages: list[tuple[bytes | None, bytes]] = []
    for k in range(6):
        for service in ("svc-a", "svc-b"):
            events = []
            for svc, route, dep in series:
                if svc != service:
                    continue
                for _ in range(40):
                    e = request(base + k + float(rng.uniform(0, 0.99)), svc, route,
                                float(rng.lognormal(3, 0.5)),
                                int(rng.choice([200, 200, 200, 503])), version="v1")
                    if dep:
                        e["dependency"] = dep
                    events.append(e)
            valid.append((service, events))
            messages.append((service.encode(), orjson.dumps(events)))
    # a window summary svc-b pre-aggregated itself joins the same window
    own = sk.build([5.0, 6.0, 7.0])
    summary = {"service": "svc-b", "route": "/z", "dependency": "db", "window_start": base + 5,
               "window_s": settings.window_s, "count": 3, "errors": 1, "sketch": own,
               "p50": 6.0, "p90": 7.0, "p99": 7.0}
    good = request(base + 5.5, "svc-a", "/x", 12.0)
    bad_batch = [
        good,
        request(base + 5.2, "svc-a", "/x", math.nan),  # NaN latency (a bare NaN token)
        request(base + 5.2, "svc-a", "/x", 3.0, bogus="field"),  # unknown field
        request(base + 5.2, "svc-a", "/x", -3.0),  # negative latency
        request(now + 10_000, "svc-a", "/x", 3.0),  # clock skew
    ]
    valid.append(("svc-a", [good]))
    valid.append(("svc-b", [summary]))
    messages.append((b"svc-a", json.dumps(bad_batch).encode()))  # json writes NaN
    messages.append((b"svc-a", b"{this is not json"))
    messages.append((b"svc-b", orjson.dumps(summary)))  # same key: same partition
    late = request(base + 0.5, "svc-a", "/x", 9.0)
    messages.append((b"svc-a", orjson.dumps([late])))

    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        asyncio.run(produce(settings, "requests", messages))
        expected = reference_windows(valid, settings, now)
        total = sum(w["count"] for w in expected.values())
        windows = asyncio.run(consume_until(
            settings, "windows", lambda vs: sum(v["count"] for v in vs) >= total,
            timeout=45, quiet_s=2.0))
        dead = asyncio.run(consume_until(settings, "deadletter", lambda vs: len(vs) >= 6,
                                         timeout=15, quiet_s=1.0))
        assert worker.proc.poll() is None, "worker died"
    finally:
        worker.stop()

    got = {window_id_of(w): w for w in windows}
    assert len(got) == len(windows), "a window was emitted twice"
    assert set(got) == set(expected)
    for wid, w in got.items():
        assert WindowSummary.from_dict(w).to_dict() == w  # valid on the wire
        assert w == expected[wid], wid
    # independent check of the numbers against the raw events
    lat: dict[str, list[float]] = {}
    errs: dict[str, int] = {}
    for _, events in valid:
        for e in events:
            if "window_start" in e:
                continue
            wid = f"{e['service']}|{e['route']}|{e.get('dependency') or ''}|" \
                  f"{math.floor(e['ts']):.3f}"
            lat.setdefault(wid, []).append(e["latency_ms"])
            errs[wid] = errs.get(wid, 0) + int(e["status"] >= 500)
    own_wid = f"svc-b|/z|db|{base + 5:.3f}"
    for wid, values in lat.items():
        w = got[wid]
        extra = 3 if wid == own_wid else 0
        assert w["count"] == len(values) + extra
        assert w["errors"] == errs[wid] + (1 if wid == own_wid else 0)
        if not extra:
            for q, key in ((0.5, "p50"), (0.99, "p99")):
                exact = float(np.quantile(values, q, method="lower"))
                assert w[key] == pytest.approx(exact, rel=0.05), (wid, key)

    reasons = [d["reason"] for d in dead]
    assert all(d["source_topic"] == settings.topic("requests") for d in dead)
    assert any(r.startswith("not JSON") for r in reasons), reasons
    assert any("latency_ms" in r and "finite" in r for r in reasons), reasons
    assert any("bogus" in r and "unknown field" in r for r in reasons), reasons
    assert any("latency_ms" in r and ">= 0" in r for r in reasons), reasons
    assert any(r.startswith("clock skew") for r in reasons), reasons
    late_letters = [d for d in dead if d["reason"].startswith("late")]
    assert len(late_letters) == 1 and json.loads(late_letters[0]["raw"])["ts"] == late["ts"]
