"""``stanch bench mitigate``: seconds from incident onset to the signed command.

What is measured: the wall time from the moment the simulated fleet published the
first interval at or after the labelled onset to the moment the first command for
the incident reached stanch.commands (its broker timestamp), with 1 s windows. That
is what an operator waits for: detection (a few windows of evidence), grouping, the
policy's hysteresis, signing and every Kafka hop.

Why runs are paced the way they are: the detectors learn for 120 windows first. The
warm-up runs at 8x real time (as fast as possible floods a small machine); from
``PACE_BEFORE_S`` before the onset the fleet runs at real time (speed 1), so event
time and wall time advance together and the figure is the real-time response. Each
run uses a fresh worker, topic prefix and fleet (no learned state, cooldown or open
incident carried over).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.demo import DemoError, _Enforcer, start_worker
from app.settings import Settings, load_settings

SCENARIOS = ("bad-deploy", "traffic-surge")
ONSET_S = 130.0
PACE_BEFORE_S = 20.0
WARMUP_SPEED = 8.0  # as fast as possible floods a 2-core machine: the pipeline falls behind
WAIT_AFTER_S = 30.0


async def _first_command_ts(settings: Settings, timeout_s: float) -> float | None:
    topic = settings.topic("commands")
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None,
                                fetch_max_wait_ms=settings.fetch_max_wait_ms)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    return r.timestamp / 1000.0
        return None
    finally:
        await consumer.stop()


async def _one_run(settings: Settings, scenario: str, seed: int, keys_dir: Path) -> float | None:
    from app.simulate import Tick, run_simulation

    duration = ONSET_S + WAIT_AFTER_S
    start_ts = round(time.time() - ONSET_S - 5.0, 3)
    onset = start_ts + ONSET_S
    paced: dict[str, float] = {}
    enforcer = _Enforcer(settings, keys_dir)
    await enforcer.start()

    warm = {"wall": time.time(), "sim": start_ts}

    async def on_tick(tick: Tick) -> None:
        if tick.t1 < onset - PACE_BEFORE_S:
            lag = (tick.t1 - warm["sim"]) / WARMUP_SPEED - (time.time() - warm["wall"])
            if lag > 0:
                await asyncio.sleep(lag)
        else:
            if "wall" not in paced:
                paced["wall"], paced["sim"] = time.time(), tick.t1
            lag = (tick.t1 - paced["sim"]) - (time.time() - paced["wall"])
            if lag > 0:
                await asyncio.sleep(lag)
        if tick.t1 >= onset and "onset_wall" not in paced:
            paced["onset_wall"] = time.time()

    waiter = asyncio.create_task(_first_command_ts(settings, duration + 60))
    try:
        await run_simulation(settings, scenario, seed=seed, duration_s=duration, speed=0.0,
                             on_tick=on_tick, start_ts=start_ts, onset_s=ONSET_S,
                             create_topics=False)
        command_ts = await waiter
    finally:
        waiter.cancel()
        await enforcer.stop()
    if command_ts is None or "onset_wall" not in paced:
        return None
    return command_ts - paced["onset_wall"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_bench(runs: int = 3, out: Any = None) -> dict[str, Any]:
    """``runs`` runs of each scenario; returns the figures."""
    from agents.mitigation import local_keys_dir
    from app.broker import EmbeddedBroker, free_port
    from app.topics import ensure_topics

    say = out or (lambda line: print(line, file=sys.stderr, flush=True))
    base = load_settings()
    work = Path(tempfile.mkdtemp(prefix="stanch-bench-mitigate-"))
    broker = None
    results: dict[str, list[float | None]] = {s: [] for s in SCENARIOS}
    try:
        if base.kafka_bootstrap is None:
            broker = EmbeddedBroker(port=free_port(), log_path=work / "broker.log").start()
        bootstrap = broker.bootstrap if broker else base.kafka_bootstrap
        for scenario in SCENARIOS:
            for seed in range(1, runs + 1):
                run_id = uuid.uuid4().hex[:8]
                settings = base.model_copy(update={
                    "kafka_bootstrap": bootstrap, "topic_prefix": f"bench{run_id}.",
                    "app_id": f"stanch-bench-{run_id}", "data_dir": work / run_id,
                    "window_s": 1.0, "web_port": free_port(), "signing_key_file": None,
                    "trusted_keys_dir": None})
                asyncio.run(ensure_topics(settings))
                worker = start_worker(settings, work / f"{run_id}.log")
                try:
                    value = asyncio.run(_one_run(settings, scenario, seed,
                                                 local_keys_dir(settings)))
                finally:
                    worker.stop()
                results[scenario].append(value)
                say(f"{scenario} seed {seed}: onset -> command "
                    f"{'none' if value is None else f'{value:.2f} s'}")
    finally:
        if broker is not None:
            broker.stop()
    values = [v for vs in results.values() for v in vs if v is not None]
    missed = sum(v is None for vs in results.values() for v in vs)
    figures: dict[str, Any] = {
        "runs": sum(len(v) for v in results.values()), "missed": missed,
        "onset_to_command_p50_s": round(statistics.median(values), 3) if values else None,
        "onset_to_command_p99_s": round(_percentile(values, 0.99), 3) if values else None,
        "target_p99_s": 5.0, "window_s": 1.0,
        "per_scenario": {s: [None if v is None else round(v, 3) for v in vs]
                         for s, vs in results.items()},
        "note": "wall seconds on a shared machine; noisy",
    }
    return figures


def bench_mitigate_main(as_json: bool, runs: int = 3) -> int:
    """The body of ``stanch bench mitigate``; returns the exit code."""
    try:
        figures = run_bench(runs)
    except DemoError as exc:
        print(f"stanch bench mitigate: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(orjson.dumps(figures).decode())
    else:
        print(f"onset -> signed command over {figures['runs']} runs ({figures['missed']} "
              f"without command): p50 {figures['onset_to_command_p50_s']} s, p99 "
              f"{figures['onset_to_command_p99_s']} s (target <= 5 s)")
    return 0
