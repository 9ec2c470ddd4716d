"""``stanch bench mitigate``: seconds from incident onset to the signed command.

What is measured: the wall time from the labelled onset (the moment the simulated world
reaches it) to the moment the first command for the incident reached stanch.commands
(its broker timestamp), with 1 s windows. That is what an operator waits for: detection
(a few windows of evidence), the aggregation's grace, grouping, the policy's hysteresis,
signing and every Kafka hop. Each run also reports where the seconds went (``stages``):
the end of the first anomalous window the first finding rests on, when that anomaly
reached stanch.anomalies, and the command.

Why runs are paced the way they are: the detectors learn for 120 windows first. The
warm-up runs at 8x real time (as fast as possible floods a small machine); from
``PACE_BEFORE_S`` before the onset the fleet runs at real time, so event time and wall
time advance together and the figure is the real-time response. The run starts in the
past so that the warm-up ends where the simulated clock meets the wall clock: event time
then IS wall time (the worker's idle flush, which uses the wall clock, sees honest
lateness). Telemetry is published at the END of each ``TICK_S`` interval, as a sidecar
does after batching (0.15 s): publishing an interval at its start, as the bench did
before, put events on the topic up to a tick before they happened and flattered the
figure by up to that much. Each run uses a fresh worker, topic prefix and fleet (no
learned state, cooldown or open incident carried over).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
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
TICK_S = 0.15  # telemetry published per simulated interval, at its end, like a sidecar's
#               telemetry flush (app.sidecar: every 0.15 s)


async def _first_record(settings: Settings, topic_name: str, timeout_s: float,
                        accept: Callable[[dict[str, Any]], bool] = lambda _: True,
                        ) -> tuple[float, dict[str, Any]] | None:
    """(broker timestamp, record) of the earliest accepted record of a topic, reading
    from the beginning until one is found or ``timeout_s`` passes."""
    topic = settings.topic(topic_name)
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None,
                                fetch_max_wait_ms=settings.fetch_max_wait_ms)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        best: tuple[float, dict[str, Any]] | None = None
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    value = orjson.loads(r.value)
                    for rec in value if isinstance(value, list) else [value]:
                        ts = r.timestamp / 1000.0
                        if isinstance(rec, dict) and accept(rec) and (best is None
                                                                     or ts < best[0]):
                            best = (ts, rec)
            if best is not None:
                # partitions are read in parallel: one more poll for an earlier record
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for r in records:
                        value = orjson.loads(r.value)
                        for rec in value if isinstance(value, list) else [value]:
                            ts = r.timestamp / 1000.0
                            if isinstance(rec, dict) and accept(rec) and ts < best[0]:
                                best = (ts, rec)
                return best
        return None
    finally:
        await consumer.stop()


async def _count_late(settings: Settings, since: float) -> int:
    """Events with ``ts >= since`` the aggregation dead-lettered as late (the price of
    the grace period: each is telemetry that no window counted). Only the real-time part
    of the run counts: during the 8x warm-up the wall-clock idle flush closes the windows
    of sparse partitions (error events) long before the simulated clock gets there."""
    topic = settings.topic("deadletter")
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None)
    await consumer.start()
    late = 0
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        left = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + 30.0
        while left and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for r in records:
                    letter = orjson.loads(r.value)
                    if str(letter.get("reason", "")).startswith("late"):
                        try:
                            raw = orjson.loads(letter.get("raw") or "{}")
                        except orjson.JSONDecodeError:
                            raw = None
                        ts = raw.get("ts") if isinstance(raw, dict) else None
                        late += isinstance(ts, int | float) and ts >= since
                    if r.offset >= end[tp] - 1:
                        left.discard(tp)
        return late
    finally:
        await consumer.stop()


def _stages(onset: float, onset_wall: float, command_ts: float,
            anomaly: tuple[float, dict[str, Any]] | None, sim_to_wall: float
            ) -> dict[str, Any]:
    """Where the seconds went, each relative to the onset (s): the end of the first
    window of evidence of the first finding, its anomaly on stanch.anomalies, the command."""
    out: dict[str, Any] = {"command_s": round(command_ts - onset_wall, 3)}
    if anomaly is None:
        return out
    ts, rec = anomaly
    ws = float(rec.get("window_start", 0.0))
    window_s = float(rec.get("window_s") or 1.0)
    found = rec.get("evidence")
    evidence: dict[str, Any] = found if isinstance(found, dict) else {}
    listed = [float(w) for w in evidence.get("windows") or [] if isinstance(w, int | float)]
    pooled = int(evidence.get("pooled_windows") or 1)
    first = min(listed + [ws - (pooled - 1) * window_s])
    out.update({
        "first_anomaly": f"{rec.get('signal')} {rec.get('series')}",
        "evidence_from_s": round(first - onset, 3),
        "finding_window_end_s": round(ws + window_s - onset, 3),
        "anomaly_published_s": round(ts - onset_wall, 3),
        # window end -> anomaly on the topic: the grace, the close and the detector hop
        "close_and_detect_s": round(ts - (ws + window_s + sim_to_wall), 3),
        # anomaly -> command: grouping, hysteresis, signing, two hops
        "decide_s": round(command_ts - ts, 3),
    })
    return out


async def _one_run(settings: Settings, scenario: str, seed: int, keys_dir: Path
                   ) -> dict[str, Any] | None:
    from app.simulate import Tick, run_simulation

    duration = ONSET_S + WAIT_AFTER_S
    warmup_s = ONSET_S - PACE_BEFORE_S
    # the warm-up (simulated warmup_s at WARMUP_SPEED) ends where sim time meets wall time
    start_ts = round(time.time() - warmup_s + warmup_s / WARMUP_SPEED, 3)
    onset = start_ts + ONSET_S
    paced: dict[str, float] = {}
    enforcer = _Enforcer(settings, keys_dir)
    await enforcer.start()

    warm = {"wall": time.time(), "sim": start_ts}

    async def on_tick(tick: Tick) -> None:
        if tick.t0 >= onset - PACE_BEFORE_S:
            paced["events"] = paced.get("events", 0) + tick.output.request_count + len(
                tick.output.errors)
        if tick.t1 < onset - PACE_BEFORE_S:
            lag = (tick.t1 - warm["sim"]) / WARMUP_SPEED - (time.time() - warm["wall"])
        else:
            if "offset" not in paced:  # wall = sim + offset (>= 0: never ahead of the wall)
                paced["offset"] = max(0.0, time.time() - (tick.t1 + TICK_S))
            # the next interval [t1, t1 + TICK_S] is published once it has happened
            lag = tick.t1 + TICK_S + paced["offset"] - time.time()
        if lag > 0:
            await asyncio.sleep(lag)

    waiter = asyncio.create_task(_first_record(settings, "commands", duration + 60))
    try:
        await run_simulation(settings, scenario, seed=seed, duration_s=duration, speed=0.0,
                             on_tick=on_tick, start_ts=start_ts, onset_s=ONSET_S,
                             create_topics=False, tick_s=TICK_S)
        command = await waiter
    finally:
        waiter.cancel()
        await enforcer.stop()
    if command is None or "offset" not in paced:
        return None
    onset_wall = onset + paced["offset"]
    anomaly = await _first_record(
        settings, "anomalies", 10.0,
        lambda a: isinstance(a.get("window_start"), int | float)
        and a["window_start"] >= onset - 1.0)
    stages = _stages(onset, onset_wall, command[0], anomaly, paced["offset"])
    stages.update(paced_events=int(paced.get("events", 0)),
                  paced_late_events=await _count_late(settings, onset - PACE_BEFORE_S))
    return {"onset_to_command_s": command[0] - onset_wall, "stages": stages}


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
    stages: dict[str, list[dict[str, Any] | None]] = {s: [] for s in SCENARIOS}
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
                    run = asyncio.run(_one_run(settings, scenario, seed,
                                               local_keys_dir(settings)))
                finally:
                    worker.stop()
                value = None if run is None else run["onset_to_command_s"]
                results[scenario].append(value)
                stages[scenario].append(None if run is None else run["stages"])
                say(f"{scenario} seed {seed}: onset -> command "
                    f"{'none' if value is None else f'{value:.2f} s'}"
                    f"{'' if run is None else ' ' + orjson.dumps(run['stages']).decode()}")
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
        "stages": stages, "tick_s": TICK_S,
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
