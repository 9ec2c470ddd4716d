"""models.aggregation: tumbling windows, watermark + grace, late, clock skew, idle flush,
pre-aggregated summaries, determinism."""

from __future__ import annotations

import random

import orjson
import pytest

from models import sketch as sk
from models.aggregation import (
    CLOCK_SKEW,
    ERROR_ROUTE,
    LATE,
    PartitionProgress,
    WindowAggregator,
    window_id_of,
)
from schemas.records import ErrorEvent, RequestEvent, WindowSummary

T0 = 1_700_000_000.0
NOW = T0 + 100


def req(ts: float, latency: float = 10.0, status: int = 200, service: str = "s",
        route: str = "/r", **kw: object) -> RequestEvent:
    return RequestEvent.from_dict({"ts": ts, "service": service, "route": route,
                                   "status": status, "latency_ms": latency, **kw})


def test_windows_count_errors_quantiles_versions() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=2.0)
    events = [req(T0 + 0.1 * i, latency=float(i + 1), status=500 if i % 5 == 0 else 200,
                  version="v2" if i < 3 else "v1") for i in range(10)]
    events.append(req(T0 + 0.5, dependency="db", latency=7.0))
    res = agg.add_batch(0, events, NOW)
    assert res.rejects == [] and res.max_k == int(T0)
    assert agg.close_ready(0) == []  # watermark T0 + 0.9 - 2 has not passed T0 + 1
    agg.add_batch(0, [req(T0 + 3.0)], NOW)
    out = agg.close_ready(0)
    assert [window_id_of(w) for w in out] == [f"s|/r||{T0:.3f}", f"s|/r|db|{T0:.3f}"]
    w = out[0]
    assert w["count"] == 10 and w["errors"] == 2
    assert w["version_counts"] == {"v1": 7, "v2": 3}
    assert w["version_errors"] == {"v1": 1, "v2": 1}
    assert w["p50"] == pytest.approx(5.0, rel=0.01) and w["p99"] == pytest.approx(9.0, rel=0.01)
    assert sk.count(w["sketch"]) == 10
    assert out[1]["dependency"] == "db" and out[1]["count"] == 1
    for summary in out:
        assert WindowSummary.from_dict(summary).to_dict() == summary


def test_grace_merges_late_within_and_rejects_beyond() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=2.0)
    agg.add_batch(0, [req(T0 + 0.5), req(T0 + 2.5)], NOW)
    # watermark T0 + 0.5: window T0 still open, an out-of-order event joins it
    assert agg.add_batch(0, [req(T0 + 0.9)], NOW).rejects == []
    agg.add_batch(0, [req(T0 + 3.5)], NOW)  # watermark T0 + 1.5 closes window T0
    closed = agg.close_ready(0)
    assert [w["count"] for w in closed] == [2]
    res = agg.add_batch(0, [req(T0 + 0.7), req(T0 + 3.6)], NOW)
    assert [r.reason for r in res.rejects] == [LATE]
    assert res.max_k == int(T0) + 3


def test_clock_skew_is_rejected_and_does_not_move_the_watermark() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=2.0, max_clock_skew_s=60)
    res = agg.add_batch(0, [req(NOW + 61), req(T0)], NOW)
    assert [r.reason for r in res.rejects] == [CLOCK_SKEW]
    assert agg.watermark(0) == T0 - 2.0
    assert res.max_k == int(T0)


def test_idle_flush_closes_only_windows_finished_before_now_minus_grace() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=2.0)
    agg.add_batch(0, [req(T0 + 0.5), req(T0 + 1.5), req(T0 + 2.5)], NOW)
    assert agg.close_ready(0) == []
    out = agg.close_idle(0, now=T0 + 4.2)  # windows ending <= T0 + 2.2: T0 and T0+1
    assert [w["window_start"] for w in out] == [T0, T0 + 1]
    assert [r.reason for r in agg.add_batch(0, [req(T0 + 1.9)], NOW).rejects] == [LATE]
    assert [w["window_start"] for w in agg.close_all(0)] == [T0 + 2]


def test_partitions_are_independent() -> None:
    agg = WindowAggregator()
    agg.add_batch("a", [req(T0 + 10)], NOW)
    assert agg.add_batch("b", [req(T0)], NOW).rejects == []
    agg.add_batch("a", [req(T0 + 20)], NOW)
    assert [w["window_start"] for w in agg.close_ready("a")] == [T0 + 10]
    assert agg.close_ready("b") == []


def test_error_events_and_pre_aggregated_summaries() -> None:
    agg = WindowAggregator()
    err = ErrorEvent.from_dict({"ts": T0 + 0.2, "service": "s", "error_type": "Boom",
                                "version": "v1"})
    own = WindowSummary.from_dict({
        "service": "s", "route": "/r", "window_start": T0, "window_s": 1.0, "count": 3,
        "errors": 1, "sketch": sk.build([1.0, 2.0, 300.0]), "p50": 2.0, "p90": 300.0,
        "p99": 300.0, "metrics": {"cpu": 0.5},
    })
    misfit = WindowSummary.from_dict({**own.to_dict(), "window_s": 10.0})
    res = agg.add_batch(0, [req(T0 + 0.1, latency=5.0), err, own, misfit], NOW)
    assert len(res.rejects) == 1 and "window_s=10.0" in res.rejects[0].reason
    out = {window_id_of(w): w for w in agg.close_all(0)}
    merged = out[f"s|/r||{T0:.3f}"]
    assert merged["count"] == 4 and merged["errors"] == 1 and merged["metrics"] == {"cpu": 0.5}
    assert merged["sketch"] == sk.merge(sk.build([5.0]), own.sketch)
    errors = out[f"s|{ERROR_ROUTE}||{T0:.3f}"]
    assert errors["count"] == errors["errors"] == 1
    assert errors["version_errors"] == {"v1": 1}
    for w in out.values():
        WindowSummary.from_dict(w)


def test_many_versions_are_capped() -> None:
    agg = WindowAggregator()
    agg.add_batch(0, [req(T0, version=f"v{i}") for i in range(100)], NOW)
    (w,) = agg.close_all(0)
    assert len(w["version_counts"]) <= 64 and sum(w["version_counts"].values()) == 100
    WindowSummary.from_dict(w)


def _run(events: list[RequestEvent], batch: int, restore_at: int | None = None) -> list[bytes]:
    """Feed events in batches, closing after each; optionally 'crash' and restore."""
    agg = WindowAggregator(window_s=0.5, grace_s=1.0)
    out: list[bytes] = []
    for i in range(0, len(events), batch):
        agg.add_batch(0, events[i:i + batch], NOW)
        out.extend(orjson.dumps(w, option=orjson.OPT_SORT_KEYS) for w in agg.close_ready(0))
    out.extend(orjson.dumps(w, option=orjson.OPT_SORT_KEYS) for w in agg.close_all(0))
    return out


def test_deterministic_and_batching_independent() -> None:
    rnd = random.Random(5)
    events = [req(T0 + i * 0.01 + rnd.uniform(0, 0.5), latency=rnd.expovariate(0.1),
                  service=rnd.choice("abc")) for i in range(2000)]
    first = _run(events, 100)
    assert first == _run(events, 100)
    # windows emitted by a different batching hold the same content whenever the same
    # events were on time (here: the watermark moves the same way)
    assert len(first) > 20
    assert {orjson.loads(w)["window_start"] for w in first} == {
        orjson.loads(w)["window_start"] for w in _run(events, 1)}


def test_restore_progress_skips_emitted_windows() -> None:
    agg = WindowAggregator(window_s=1.0, grace_s=1.0)
    agg.add_batch(0, [req(T0 + 0.5), req(T0 + 2.5)], NOW)
    emitted = agg.close_ready(0)
    assert [w["window_start"] for w in emitted] == [T0]
    stored = PartitionProgress.from_dict(orjson.loads(orjson.dumps(agg.progress(0).to_dict())))
    fresh = WindowAggregator(window_s=1.0, grace_s=1.0)
    fresh.restore(0, stored)
    res = fresh.add_batch(0, [req(T0 + 0.5), req(T0 + 2.5)], NOW)  # the replay
    assert [r.reason for r in res.rejects] == [LATE]
    assert fresh.close_ready(0) == []
    assert [w["count"] for w in fresh.close_all(0)] == [1]


def test_forward_delay_holds_the_partition_so_the_next_forward_is_on_time() -> None:
    """A forward (an unkeyed producer's events, one more hop) that arrived 0.8 s behind
    the partition's own events makes the partition hold its windows back by 1.6 s; the
    next forward, as slow, is counted instead of dead-lettered as late."""
    from models.aggregation import FORWARD_MEMORY_S

    agg = WindowAggregator(window_s=1.0, grace_s=0.5)
    agg.add_batch(0, [req(T0 + 0.1), req(T0 + 1.6)], NOW)
    assert [w["window_start"] for w in agg.close_ready(0, NOW)] == [T0]
    agg.note_forward(0, T0 + 0.8, NOW)  # the first slow forward: too late for window T0
    assert [r.reason for r in agg.add_batch(0, [req(T0 + 0.8)], NOW).rejects] == [LATE]
    assert agg.hold(0) == pytest.approx(1.6)
    agg.add_batch(0, [req(T0 + 2.7)], NOW)  # without the hold, window T0+1 would close
    assert agg.close_ready(0, NOW) == []
    agg.note_forward(0, T0 + 1.9, NOW)  # 0.8 s behind again: in time now
    assert agg.add_batch(0, [req(T0 + 1.9)], NOW).rejects == []
    agg.add_batch(0, [req(T0 + 4.2)], NOW)
    closed = agg.close_ready(0, NOW)
    assert [(w["window_start"], w["count"]) for w in closed] == [(T0 + 1, 2)]
    # the stored progress carries the hold: a restarted worker closes the same windows
    stored = PartitionProgress.from_dict(orjson.loads(orjson.dumps(agg.progress(0).to_dict())))
    fresh = WindowAggregator(window_s=1.0, grace_s=0.5)
    fresh.restore(0, stored)
    assert fresh.hold(0) == pytest.approx(1.6)
    # a partition with no forwards for two memory spans holds nothing any more
    agg.add_batch(0, [req(T0 + 5 + 2 * FORWARD_MEMORY_S)], NOW + 200)
    assert agg.hold(0) == 0.0


def test_forward_hold_is_bounded_and_ignores_a_producer_ahead() -> None:
    from models.aggregation import MAX_FORWARD_HOLD_S

    agg = WindowAggregator(window_s=1.0, grace_s=0.5)
    agg.add_batch(0, [req(NOW - 1)], NOW)
    agg.note_forward(0, NOW - 100, NOW)  # a forward path that is broken, not slow
    assert agg.hold(0) == MAX_FORWARD_HOLD_S
    other = WindowAggregator(window_s=1.0, grace_s=0.5)
    other.add_batch(0, [req(NOW + 120)], NOW)  # one producer's clock 120 s ahead
    other.note_forward(0, NOW - 0.1, NOW)  # the forward is only 0.1 s behind the clock
    assert other.hold(0) == pytest.approx(0.2)
    none = WindowAggregator(window_s=1.0, grace_s=0.5)
    none.note_forward(0, NOW, NOW)  # nothing of its own yet: no delay to measure
    assert none.hold(0) == 0.0 and none.progress(0).to_dict() == {"closed_k": None,
                                                                  "max_ts": None}


# -- the agent's offset discipline (duplicates, lost messages), with a fake Faust ------
def _fake_agent() -> tuple[object, list[dict], list[int], list[int]]:
    import asyncio
    from types import SimpleNamespace

    from agents.aggregation import AggregationAgent, parse_request_element

    emitted: list[dict] = []
    seeks: list[int] = []
    agent = AggregationAgent.__new__(AggregationAgent)
    agent.settings = SimpleNamespace(grace_s=2.0, max_clock_skew_s=1e12, partitions=1)
    agent.agg = WindowAggregator(1.0, 2.0, 1e12)
    agent.lock = asyncio.Lock()
    agent.states = {}
    agent.parsers = {"requests": parse_request_element}
    agent.stats = {"events": 0, "windows": 0, "messages": 0, "forwarded": 0,
                   "duplicate forwards": 0}
    agent._homes = {}
    agent._to_forward = {}

    async def seek(tp: object, offset: int) -> None:
        seeks.append(offset)

    async def sent(*_: object, **__: object) -> None:
        return None

    async def delivered(*_: object, **__: object) -> object:
        return asyncio.sleep(0)

    agent.app = SimpleNamespace(consumer=SimpleNamespace(seek=seek))
    agent.deadletters = SimpleNamespace(send=sent)
    agent.progress = SimpleNamespace(get=lambda key: None, data={},
                                     changelog_topic=SimpleNamespace(send=delivered))

    def send_windows(windows: list[dict]) -> list[object]:
        emitted.extend(windows)
        return []

    agent._send_windows = send_windows  # type: ignore[attr-defined]
    return agent, emitted, [], seeks


def _messages(n: int) -> list[bytes]:
    rnd = random.Random(5)
    return [orjson.dumps([{"ts": 1.7e9 + i * 0.1 + rnd.random() * 0.05, "service": "s",
                           "route": "/r", "status": 200, "latency_ms": 1.0 + rnd.random()}
                          for _ in range(5)]) for i in range(n)]


def _drive(order: list[int], values: list[bytes]) -> tuple[list[dict], list[int], list[int]]:
    import asyncio
    from types import SimpleNamespace

    agent, emitted, acks, seeks = _fake_agent()

    async def ack(event: object) -> None:
        acks.append(event.message.offset)  # type: ignore[attr-defined]

    stream = SimpleNamespace(ack=ack)

    async def run() -> None:
        for off in order:
            msg = SimpleNamespace(topic="requests", partition=0, offset=off,
                                  value=values[off], key=b"s", headers=[])
            await agent.handle(stream, SimpleNamespace(message=msg, value=msg.value))
            await asyncio.sleep(0)
        for st in agent.states.values():
            if st.finisher is not None:
                await st.finisher

    asyncio.run(run())
    return emitted, acks, seeks


def _reference(values: list[bytes]) -> list[dict]:
    agg = WindowAggregator(1.0, 2.0, 1e12)
    out: list[dict] = []
    for v in values:
        agg.add_batch("p", [RequestEvent.from_dict(e) for e in orjson.loads(v)], 1e9)
        out.extend(agg.close_ready("p"))
    return out


def test_agent_ignores_duplicates_and_rereads_lost_messages() -> None:
    values = _messages(80)
    ref = _reference(values)
    assert len(ref) >= 4
    clean, clean_acks, _ = _drive(list(range(80)), values)
    assert clean == ref
    # a duplicate of the newest message (seen from Faust after a restart) and of an old
    # one: nothing is aggregated twice, nothing is lost
    dup, dup_acks, _ = _drive(list(range(50)) + [49, 10] + list(range(50, 80)), values)
    assert dup == ref
    assert sorted(set(dup_acks)) == sorted(set(clean_acks))
    # offset 30 never reaches the agent: it seeks back to 30 and drops what still
    # arrives from before the seek, then the re-read fills the hole
    lost, lost_acks, seeks = _drive(list(range(30)) + [31, 32, 33] + list(range(30, 80)),
                                    values)
    assert seeks == [30]
    assert lost == ref
    assert lost_acks == sorted(lost_acks)  # in offset order, no hole
    assert lost_acks == list(range(lost_acks[-1] + 1))


def test_agent_forwards_events_to_their_series_partition_and_drops_second_copies() -> None:
    import asyncio
    from types import SimpleNamespace

    from agents.aggregation import FORWARD_HEADER, windows_partition

    agent, emitted, _, _ = _fake_agent()
    agent.settings.partitions = 2
    away = next(s for s in ("a", "b", "c", "d") if windows_partition(s, 2) == 1)
    sent: list[dict] = []

    async def send(**kw: object) -> object:
        sent.append(kw)
        return asyncio.sleep(0)

    agent.forward_topics = {"requests": SimpleNamespace(send=send)}
    acks: list[int] = []

    async def ack(event: object) -> None:
        acks.append(event.message.offset)  # type: ignore[attr-defined]

    stream = SimpleNamespace(ack=ack)
    t = 1.7e9

    def event(partition: int, offset: int, service: str, headers: list) -> object:
        value = orjson.dumps([{"ts": t + 0.1 * offset, "service": service, "route": "/r",
                               "status": 200, "latency_ms": 1.0}])
        msg = SimpleNamespace(topic="requests", partition=partition, offset=offset,
                              value=value, key=None, headers=headers)
        return SimpleNamespace(message=msg, value=value)

    async def run() -> None:
        # on partition 0, an event of a service whose home is partition 1: forwarded
        await agent.handle(stream, event(0, 0, away, []))
        # on partition 1: the forward, then a second copy of it (the source replayed)
        header = [(FORWARD_HEADER, b"requests:0:0")]
        await agent.handle(stream, event(1, 0, away, header))
        await agent.handle(stream, event(1, 1, away, header))
        for st in agent.states.values():
            if st.finisher is not None:
                await st.finisher

    asyncio.run(run())
    assert len(sent) == 1 and sent[0]["partition"] == 1 and sent[0]["key"] == away.encode()
    assert sent[0]["headers"] == [(FORWARD_HEADER, b"requests:0:0")]
    assert agent.stats["events"] == 1  # aggregated once, on partition 1
    assert agent.stats["duplicate forwards"] == 1
    assert agent.agg.open_windows("requests:0") == 0
    assert agent.agg.open_windows("requests:1") == 1


def test_event_time_never_runs_ahead_of_the_robust_clock() -> None:
    """A producer 240 s ahead (inside the skew) on the partition closes nobody's window:
    the watermark is min(max ts, now) - grace; its own window waits for the clock."""
    agg = WindowAggregator(1.0, 0.5, 300.0)
    now = T0 + 10.2
    agg.add_batch(0, [req(T0 + 10.0, service="honest"), req(now + 240.0, service="ahead")],
                  now)
    assert agg.close_ready(0, now) == []  # window T0+10 ends after now - grace
    assert agg.add_batch(0, [req(T0 + 10.1, service="honest")], now).rejects == []
    later = T0 + 11.6
    out = agg.close_ready(0, later)
    assert [(w["service"], w["count"]) for w in out] == [("honest", 2)]
    assert agg.open_windows(0) == 1  # the ahead producer's window waits for the clock
    out = agg.close_idle(0, now + 241.6)  # (nothing later on the partition)
    assert [(w["service"], w["count"]) for w in out] == [("ahead", 1)]
    # without a clock (a finite replay) event time alone decides, as before
    replay = WindowAggregator(1.0, 0.5, 300.0)
    replay.add_batch(0, [req(T0 + 10.0), req(T0 + 250.0)], T0 + 300)
    assert [w["window_start"] for w in replay.close_ready(0)] == [T0 + 10.0]


def test_forwards_seen_takes_reordered_originals_and_drops_copies() -> None:
    """Forwards of one source overtaking one another are all aggregated (a high mark
    dropped the overtaken one: 5 events lost in a CI run); a source replayed after a
    crash sends copies, dropped; our own replay re-reads the first copies, aggregated."""
    from agents.aggregation import FORWARDS_REMEMBERED, ForwardsSeen

    seen = ForwardsSeen()
    assert not seen.duplicate(13, 25)
    assert not seen.duplicate(12, 26)  # overtaken by 13: an original, not a copy
    assert seen.duplicate(12, 40) and seen.duplicate(13, 41)  # the source's replay
    assert not seen.duplicate(12, 26)  # our replay reads the first copy again
    stored = ForwardsSeen.from_json(orjson.loads(orjson.dumps(seen.to_json())))
    assert stored.duplicate(13, 42) and not stored.duplicate(14, 43)
    for i in range(100, 100 + 2 * FORWARDS_REMEMBERED):
        assert not stored.duplicate(i, i + 1000)
    assert len(stored.seen) == FORWARDS_REMEMBERED
    assert stored.duplicate(14, 5000)  # below what is remembered: seen long ago
    assert ForwardsSeen.from_json([12, 26]).duplicate(11, 30)  # the former stored form
