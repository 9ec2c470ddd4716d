"""Aggregation agent: requests + errors -> one window summary per series per window.

Thin wiring around :class:`models.aggregation.WindowAggregator` (see docs/pipeline.md for
the whole design). What this module adds is the Kafka side of crash safety:

* Messages are read as raw bytes with ``stream.noack()``: a message is acknowledged only
  once every window it contributed to has been emitted *and* delivered, and Faust commits
  only contiguous acknowledged offsets (after flushing the producer). A SIGKILL therefore
  replays exactly the messages whose windows were still open.
* Per input partition, the progress (highest closed window index, largest event time,
  offset of the message that closed it) is written to a changelogged Faust table after
  the windows are delivered and before the messages are acknowledged: one write per
  closing, not per event. A restarted worker restores it, so replayed events of windows
  that were already emitted are skipped (not emitted again with partial content, not
  dead-lettered twice), and the watermark resumes where it was: the replay rebuilds the
  still-open windows exactly as the first run would have.
* Window summaries go to the windows topic as a JSON array per message, grouped by the
  partition the series key hashes to (Kafka's default murmur2 partitioner), so every
  series always reaches the same detector partition and one message carries many
  summaries (the detector pays Faust's per-message cost once per batch).
* Every offset of a partition is aggregated exactly once, in order, whatever Faust
  delivers: duplicates are not aggregated again, and a lost message (a jump in offsets)
  makes the agent seek the partition back and re-read it (``_redelivered``, ``_gap``).
* Events are aggregated on their series' home partition whatever their Kafka key: an
  element whose service does not hash (murmur2, as Kafka's default partitioner does with
  the service as key) to the partition it arrived on is forwarded there, keyed by its
  service, with a header naming its source offset; the home partition drops a second
  copy of a forward (a source replayed after a crash), so one series is never
  aggregated on two partitions and never twice.
* Robust clock: the worker's wall clock bounds event time (``close_ready(..., now)``),
  so a producer ahead of it cannot close anyone's windows; an idle partition closes its
  windows on the furthest event time the consumer has delivered on any partition (capped
  by the wall clock), not on the wall clock alone, so a worker reading a backlog or a
  fleet on a simulated clock behind the wall clock does not make their events late.
* Every message is processed or dead-lettered: a tombstone (null value) with category
  ``tombstone``. Dead letters are delivered before the progress that covers their
  message is recorded, and a replayed message (offset at or below the recorded one) is
  not dead-lettered again.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust
import orjson
from aiokafka.partitioner import murmur2
from faust.types import TP

from agents.deadletter import DeadLetters
from models.aggregation import CLOCK_SKEW, LATE, PartitionProgress, WindowAggregator
from schemas.errors import SchemaError
from schemas.records import ErrorEvent, WindowSummary, parse_request

if TYPE_CHECKING:
    from app.faust_app import StanchApp

log = logging.getLogger(__name__)

AGENT = "aggregation"
PROGRESS_TABLE = "aggregation-progress"
#: Summaries per message on the windows topic (keeps messages well under 1 MiB).
WINDOWS_PER_MESSAGE = 500
#: A partition with no input for this long (wall clock) closes its finished windows.
IDLE_FLUSH_S = 1.0
_IDLE_TICK_S = 0.25
#: Forwards of one source partition remembered one by one (``ForwardsSeen``): far more
#: than can be in flight at once, few enough to store with every progress record.
FORWARDS_REMEMBERED = 64
#: Header of a message the agent forwarded to its series' home partition:
#: ``topic:partition:offset`` of the message it came from.
FORWARD_HEADER = "stanch-forwarded-from"
#: Services whose home partition is remembered (a dict lookup instead of murmur2 per
#: event); beyond this the map starts over (only a cost, never a different answer).
HOME_CACHE_SIZE = 100_000
#: A lost message is re-read by seeking back; the seek is retried after this long if
#: what arrives still comes from before it, and a gap still there after SEEK_TRIES
#: re-reads is taken as real.
SEEK_RETRY_S = 5.0
SEEK_TRIES = 2


def windows_partition(series: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for key ``series``."""
    return (murmur2(series.encode("utf-8")) & 0x7FFFFFFF) % partitions


def decode_message(value: bytes | None) -> tuple[list[Any] | None, str | None]:
    """(elements, None) or (None, reason): one JSON object or an array of them.

    orjson first; if it refuses (e.g. a bare ``NaN`` token that Python's json writes),
    the standard library parses it so that the *element* is rejected by validation with a
    precise reason and the rest of the batch survives.
    """
    if value is None:
        return None, "not JSON: empty message"
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            data = json.loads(value)
        except (ValueError, RecursionError):
            return None, f"not JSON: {exc}"
    if type(data) is list:
        return data, None
    if type(data) is dict:
        return [data], None
    return None, "must be an event object or a JSON array of event objects"


def _event_time(record: Any) -> float:
    """An event's time, or a pre-aggregated window's end."""
    ts = getattr(record, "ts", None)
    return float(ts) if ts is not None else record.window_start + record.window_s


def _forwarded_from(headers: Any) -> tuple[str, int] | None:
    """(source "topic:partition", source offset) of a forwarded message, else None."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    for name, raw in items:
        if name == FORWARD_HEADER:
            try:
                src, _, off = bytes(raw).decode().rpartition(":")
                return src, int(off)
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def parse_request_element(obj: Any) -> Any:
    """A request event, or a window summary a service aggregated itself."""
    if type(obj) is dict and "window_start" in obj:
        return WindowSummary.from_dict(obj)
    return parse_request(obj)


class ForwardsSeen:
    """The forwards of one source partition aggregated on this one: (source offset ->
    our offset) of the latest ``FORWARDS_REMEMBERED``, and the newest pair forgotten.

    Forwards of one source may arrive out of order (each is its own send; seen when the
    first sends of a topic wait for its metadata together), so a source offset below the
    highest seen is not by itself a copy. A copy is a source offset aggregated before at
    an offset of ours below this one: a replay of the source after a crash sends its
    forwards again. A replay of *our* partition re-reads the first copy at the same
    offset of ours, and that one must be aggregated again (it rebuilds the open windows).
    Below the remembered ones, every source offset is taken as seen (a reordering across
    hundreds of sends does not happen; a source replay reaches back that far).
    """

    __slots__ = ("seen", "floor")

    def __init__(self, seen: dict[int, int] | None = None,
                 floor: tuple[int, int] = (-1, -1)) -> None:
        self.seen: dict[int, int] = seen or {}
        self.floor = floor

    def duplicate(self, src_offset: int, offset: int) -> bool:
        first = self.seen.get(src_offset)
        if first is None and src_offset <= self.floor[0]:
            first = self.floor[1]
        if first is not None and offset > first:
            return True
        if first is None:
            self.seen[src_offset] = offset
            if len(self.seen) > FORWARDS_REMEMBERED:
                oldest = min(self.seen)
                self.floor = (oldest, max(self.floor[1], self.seen.pop(oldest)))
        return False

    def to_json(self) -> dict[str, Any]:
        return {"seen": sorted(self.seen.items()), "floor": list(self.floor)}

    @classmethod
    def from_json(cls, v: Any) -> ForwardsSeen:
        if isinstance(v, list):  # the former (source offset, our offset) high mark
            return cls(floor=(int(v[0]), int(v[1])))
        return cls({int(a): int(b) for a, b in v.get("seen", [])},
                   tuple(v.get("floor", (-1, -1))))  # type: ignore[arg-type]


@dataclass
class _TpState:
    """Per input partition: progress as stored, messages waiting for their windows."""

    key: str
    partition: int
    replay_until: int = -1  # offsets <= this were processed before a restart
    last_offset: int = -1
    #: the offset the next message must have (-1: unknown). A fresh state expects the
    #: stored ``resume`` offset at the latest: the oldest message an open window used.
    expect: int = -1
    #: while > -1: we asked the consumer to go back to this offset (a message was not
    #: delivered) and drop what still arrives from before the seek
    seek_to: int = -1
    seek_high: int = -1
    seek_at: float = 0.0
    seek_tries: int = 0
    pending: deque[tuple[Any, int | None]] = field(default_factory=deque)
    #: forwards aggregated here, per source "topic:partition"
    fwd: dict[str, ForwardsSeen] = field(default_factory=dict)
    finisher: asyncio.Future[None] | None = None  # the last delivery/ack step scheduled
    last_input: float = field(default_factory=time.monotonic)


class AggregationAgent:
    """State and behaviour of the aggregation agent of one worker process."""

    def __init__(self, app: StanchApp) -> None:
        s = app.settings
        self.app = app
        self.settings = s
        self.agg = WindowAggregator(s.window_s, s.grace_s, s.max_clock_skew_s)
        self.windows_topic = app.topic(
            s.topic("windows"), key_serializer="raw", value_serializer="raw"
        )
        self.source = app.topic(
            s.topic("requests"), s.topic("errors"), key_serializer="raw",
            value_serializer="raw",
        )
        self.progress = app.Table(
            PROGRESS_TABLE, default=None, partitions=s.partitions,
            schema=faust.Schema(key_serializer="json", value_serializer="json"),
        )
        self.deadletters = DeadLetters(app, AGENT)
        self.lock = asyncio.Lock()
        self.states: dict[tuple[str, int], _TpState] = {}
        self.forward_topics = {
            name: app.topic(name, key_serializer="raw", value_serializer="raw")
            for name in (s.topic("requests"), s.topic("errors"))
        }
        self._homes: dict[str, int] = {}
        self._to_forward: dict[str, list[Any]] = {}
        self.parsers: dict[str, Callable[[Any], Any]] = {
            s.topic("requests"): parse_request_element,
            s.topic("errors"): ErrorEvent.from_dict,
        }
        #: figures for status pages, tests and the benchmark
        self.stats = {"events": 0, "windows": 0, "messages": 0, "forwarded": 0,
                      "duplicate forwards": 0}

    # -- partition state -------------------------------------------------------------
    def _state(self, topic: str, partition: int) -> _TpState:
        tp = (topic, partition)
        st = self.states.get(tp)
        if st is None:
            key = f"{topic}:{partition}"
            st = _TpState(key, partition)
            stored = self.progress.get(key)
            if stored:
                self.agg.restore(key, PartitionProgress.from_dict(stored))
                st.replay_until = int(stored.get("offset", -1))
                st.expect = int(stored.get("resume", -1))
                st.fwd = {k: ForwardsSeen.from_json(v)
                          for k, v in (stored.get("fwd") or {}).items()}
            else:
                self.agg.drop(key)
            self.states[tp] = st
        return st

    def keep_only(self, assigned: set[tuple[str, int]]) -> None:
        """Forget the partitions that are no longer ours."""
        for tp in list(self.states):
            if tp not in assigned:
                self.agg.drop(self.states.pop(tp).key)

    # -- one message -----------------------------------------------------------------
    async def handle(self, stream: Any, event: Any) -> None:
        msg = event.message
        topic, partition, offset = msg.topic, msg.partition, msg.offset
        value = msg.value
        # the bytes are not needed once decoded; the event waits in `pending` for a while
        event.value = msg.value = None
        async with self.lock:
            st = self._state(topic, partition)
            if offset <= st.last_offset:
                self._redelivered(stream, st, event, offset)
                return
            if offset > st.expect >= 0 and not self._gap(st, topic, partition, offset):
                return  # dropped: it comes again after the seek back
            st.last_input = time.monotonic()
            st.last_offset = offset
            st.expect = offset + 1
            st.seek_to = -1
            # queued first: whatever happens below, the message is acked in offset order
            st.pending.append((event, None))
            self.stats["messages"] += 1
            replaying = offset <= st.replay_until
            futures: list[Any] = []  # dead letters and forwards, delivered before the ack

            async def dead(category: str, reason: Any, raw: Any) -> None:
                if replaying:  # written (and delivered) before the restart
                    return
                fut = await self.deadletters.send(category, reason, raw, source_topic=topic,
                                                  partition=partition, offset=offset,
                                                  key=msg.key)
                if fut is not None:
                    futures.append(fut)

            if value is None:
                await dead("tombstone", "null value (tombstone): nothing to aggregate", None)
                elements: list[Any] | None = []
            else:
                elements, problem = decode_message(value)
                if problem is not None:
                    await dead("not json" if problem.startswith("not JSON") else "schema",
                               problem, value)
                    elements = []
            source = _forwarded_from(msg.headers)
            if source is not None and self._duplicate_forward(st, source, offset):
                elements = []
            parse = self.parsers[topic]
            records = []
            homes = self._homes
            local = partition if source is None else -1  # a forward is never sent on
            for i, obj in enumerate(elements):  # type: ignore[arg-type]
                try:
                    record = parse(obj)
                except SchemaError as exc:
                    where = exc.at(f"[{i}]") if len(elements) > 1 else exc  # type: ignore[arg-type]
                    await dead("schema", where, obj)
                    continue
                if local >= 0:
                    home = homes.get(record.service)
                    if home is None:
                        home = self._home(record.service)
                    if home != local:
                        self._forward_later(obj, record.service)
                        continue
                records.append(record)
            if self._to_forward:
                futures.extend(self._send_forwards(topic, partition, offset))
            now = time.time()
            if source is not None and records:
                self.agg.note_forward(st.key, max(map(_event_time, records)), now)
            result = self.agg.add_batch(st.key, records, now)
            self.stats["events"] += len(records) - len(result.rejects)
            for rej in result.rejects:
                if rej.reason == LATE and replaying:
                    continue  # its window was emitted before the restart
                fut = await self._reject(rej.reason, rej.record, topic, partition, offset,
                                         msg.key, now, replaying)
                if fut is not None:
                    futures.append(fut)
            if futures:  # delivered before anything later of this partition is acked
                st.finisher = asyncio.ensure_future(
                    self._finish(stream, st, st.finisher, futures, None, []))
            max_k = result.max_k
            st.pending[-1] = (event, max_k)
            before = self.agg.closed_k(st.key)
            windows = self.agg.close_ready(st.key, now)
            closed = self.agg.closed_k(st.key)
            if (windows or closed != before
                    or (len(st.pending) == 1
                        and (max_k is None or (closed is not None and max_k <= closed)))):
                self._close(stream, st, windows, offset)

    # -- routing by series ---------------------------------------------------------
    def _home(self, service: str) -> int:
        """The partition Kafka's default partitioner gives a message keyed ``service``."""
        home = self._homes.get(service)
        if home is None:
            if len(self._homes) >= HOME_CACHE_SIZE:
                self._homes.clear()
            home = self._homes[service] = windows_partition(service, self.settings.partitions)
        return home

    def _forward_later(self, obj: Any, service: str) -> None:
        self._to_forward.setdefault(service, []).append(obj)

    def _send_forwards(self, topic: str, partition: int, offset: int) -> list[Any]:
        """Send the elements that belong to other partitions there, one message per
        service keyed by it, with the source offset in a header (module doc)."""
        groups, self._to_forward = self._to_forward, {}
        header = [(FORWARD_HEADER, f"{topic}:{partition}:{offset}".encode())]
        out = []
        for service, objs in sorted(groups.items()):
            self.stats["forwarded"] += len(objs)
            out.append(asyncio.ensure_future(self.forward_topics[topic].send(
                key=service.encode(), value=orjson.dumps(objs), partition=self._home(service),
                headers=header, force=True)))
        return out

    def _duplicate_forward(self, st: _TpState, source: tuple[str, int], offset: int) -> bool:
        """True for a second copy of a forward (its source was replayed after a crash)."""
        src, src_offset = source
        seen = st.fwd.get(src)
        if seen is None:
            seen = st.fwd[src] = ForwardsSeen()
        if seen.duplicate(src_offset, offset):
            self.stats["duplicate forwards"] += 1
            return True
        return False

    def _redelivered(self, stream: Any, st: _TpState, event: Any, offset: int) -> None:
        """A message at or below the last offset this partition processed came again.

        Either the consumer went back (a rebalance seeks to the committed offset, and
        Faust forgets the acks it had not committed yet) or the fetcher delivered the
        same record twice. Both are the same message: the state already holds its
        events, so it is never aggregated again. (Starting the partition over from its
        stored progress would be wrong for a duplicate: the messages between the oldest
        unemitted one and the duplicate would not come again, and the windows they fed
        would be lost or emitted with partial content.)

        * Its original still waits in ``pending``: nothing to do, the original's ack (in
          offset order, once its windows are delivered) covers this offset.
        * Its original was released (acked, or being acked by the delivery chain): ack
          this copy too, after the chain, so that after a rebalance Faust can commit past
          it again. Acking an offset Faust already knows is a no-op.
        """
        pending = st.pending
        if pending and offset >= pending[0][0].message.offset:
            return
        st.finisher = asyncio.ensure_future(
            self._finish(stream, st, st.finisher, [], None, [event])
        )

    def _gap(self, st: _TpState, topic: str, partition: int, offset: int) -> bool:
        """A message arrived beyond the next expected offset: True to aggregate it anyway
        (the gap is real), False to drop it because the consumer is sent back.

        The offsets of our input topics are contiguous, yet Faust's consumer can lose a
        message on its way to the stream (seen around the seek it does when partitions
        are assigned); Faust would then commit past it (it tolerates a one-offset hole in
        the acks) and its windows would miss its events for good. So the partition is
        sought back to the expected offset and what still arrives from before the seek is
        dropped (not acked: it comes again). A gap still there after a re-read (e.g. the
        control records of a transactional producer) is accepted.
        """
        now = time.monotonic()
        if st.seek_to == st.expect:  # we already went back for this very offset
            if offset > st.seek_high and now - st.seek_at < SEEK_RETRY_S:
                st.seek_high = offset  # still in flight from before the seek
                return False
            if st.seek_tries >= SEEK_TRIES:
                log.warning("aggregation: %s offsets %d..%d are not in the log; going on",
                            st.key, st.expect, offset - 1)
                st.seek_to = -1
                return True
        else:
            st.seek_tries = 0
        st.seek_tries += 1
        st.seek_to, st.seek_high, st.seek_at = st.expect, offset, now
        log.warning("aggregation: %s got offset %d, expected %d: seeking back", st.key,
                    offset, st.expect)
        target = st.expect

        async def seek() -> None:
            try:
                consumer = self.app.consumer
                rewind = getattr(consumer, "rewind", None)  # app.faust_app._Consumer
                await (rewind or consumer.seek)(TP(topic, partition), target)
            except Exception:  # retried when the next message shows the gap again
                log.exception("aggregation: seeking %s back to %d failed", st.key, target)

        asyncio.ensure_future(seek())
        return False

    async def _reject(self, reason: str, record: Any, topic: str, partition: int,
                      offset: int, key: Any, now: float, replaying: bool) -> Any:
        """Dead-letter one refused record; the delivery future (None during a replay:
        the first run wrote it)."""
        if replaying:
            return None
        if reason == LATE:
            text = (f"late: window already closed (watermark "
                    f"{self.agg.watermark(f'{topic}:{partition}', now):.3f}, grace "
                    f"{self.settings.grace_s} s)")
        elif reason == CLOCK_SKEW:
            text = (f"clock skew: ts {record.ts:.3f} is more than "
                    f"{self.settings.max_clock_skew_s} s in the future")
        else:
            text = reason
        category = reason if reason in (LATE, CLOCK_SKEW) else "window"
        return await self.deadletters.send(category, text, record.to_dict(),
                                           source_topic=topic, partition=partition,
                                           offset=offset, key=key)

    def _close(self, stream: Any, st: _TpState, windows: list[dict[str, Any]],
               offset: int) -> None:
        """Send the closed windows now; deliver, record progress and ack in the background.

        The three steps must happen in this order (module doc), and the acks of a
        partition in offset order, so each step waits for the previous one of its
        partition; the agent meanwhile goes on with the next messages.
        """
        ready = self._pop_ready(st)
        if not windows and not ready:
            return
        futures = self._send_windows(windows) if windows else []
        prog = None
        if windows:
            prog = self.agg.progress(st.key).to_dict()
            prog["offset"] = max(offset, st.replay_until)
            # where a restarted worker must start reading at the latest: the oldest
            # message that contributed to a window still open
            prog["resume"] = st.pending[0][0].message.offset if st.pending else offset + 1
            if st.fwd:
                prog["fwd"] = {src: v.to_json() for src, v in st.fwd.items()}
            self.stats["windows"] += len(windows)
        st.finisher = asyncio.ensure_future(
            self._finish(stream, st, st.finisher, futures, prog, ready)
        )

    def _send_windows(self, windows: list[dict[str, Any]]) -> list[Any]:
        parts = self.settings.partitions
        groups: dict[int, list[dict[str, Any]]] = {}
        for w in windows:
            series = f"{w['service']}|{w['route']}|{w.get('dependency') or ''}"
            groups.setdefault(windows_partition(series, parts), []).append(w)
        futures = []
        for p, ws in sorted(groups.items()):
            for i in range(0, len(ws), WINDOWS_PER_MESSAGE):
                chunk = ws[i:i + WINDOWS_PER_MESSAGE]
                first = chunk[0]
                key = f"{first['service']}|{first['route']}|{first.get('dependency') or ''}"
                # force=True: publish now, not when the current event is acked (Faust's
                # attachments), because the ack itself waits for this delivery.
                futures.append(asyncio.ensure_future(self.windows_topic.send(
                    key=key.encode(), value=orjson.dumps(chunk, option=orjson.OPT_SORT_KEYS),
                    partition=p, force=True,
                )))
        return futures

    async def _finish(self, stream: Any, st: _TpState, previous: asyncio.Future[None] | None,
                      futures: list[Any], prog: dict[str, Any] | None,
                      ready: list[Any]) -> None:
        try:
            if previous is not None:
                await previous
            # 1. the windows are delivered ...
            for fut in await asyncio.gather(*futures):
                if inspect.isawaitable(fut):  # a send's delivery future
                    await fut
            # 2. ... before the progress says they were emitted ...
            if prog is not None:
                self.progress.data[st.key] = prog
                await (await self.progress.changelog_topic.send(
                    key=st.key, value=prog, partition=st.partition, key_serializer="json",
                    value_serializer="json", force=True,
                ))
            # 3. ... before their messages may be committed.
            for event in ready:
                await stream.ack(event)
        except Exception:
            log.exception("aggregation: delivering windows of %s failed; their messages stay "
                          "unacknowledged and will be replayed", st.key)
            raise

    def _pop_ready(self, st: _TpState) -> list[Any]:
        """Messages all of whose windows are closed, oldest first."""
        closed = self.agg.closed_k(st.key)
        pending = st.pending
        ready = []
        while pending:
            event, max_k = pending[0]
            if max_k is not None and (closed is None or max_k > closed):
                break
            pending.popleft()
            ready.append(event)
        return ready

    # -- idle flush ------------------------------------------------------------------
    @staticmethod
    def _replaying(st: _TpState) -> bool:
        """True while the partition has not yet re-read every message it had processed
        before a restart: those messages certainly exist, so the
        partition is not idle whatever the clock says. (No high-water marks: the
        embedded broker's are not reliable enough to decide "nothing left to read".)"""
        return st.last_offset < st.replay_until

    def _backlog(self, st: _TpState) -> bool:
        """True when the consumer knows of messages of this partition beyond the last
        one processed. Only ever used to hold a flush back: a high-water mark can be
        stale (too low), never too high, so "backlog" is certain, "none" is not."""
        try:
            high = self.app.consumer.highwater(TP(st.key.rpartition(":")[0], st.partition))
        except Exception:  # no consumer yet, partition not assigned: nothing known
            return False
        return isinstance(high, int) and high > st.last_offset + 1

    def delivered_clock(self, now: float, now_mono: float) -> float:
        """How far event time has demonstrably been delivered: the largest event time
        (capped by the wall clock ``now``) of the partitions that had input within
        ``IDLE_FLUSH_S``; ``now`` when none had (the consumer is caught up everywhere).

        This, not the wall clock alone, is what an idle partition may close its windows
        against: a fleet on a clock behind the wall clock (the demo's simulated time) or a
        worker catching up a backlog delivers the events of an idle partition along with
        the others', so closing them by the wall clock made them all late."""
        clock = -math.inf
        for st in self.states.values():
            if now_mono - st.last_input < IDLE_FLUSH_S:
                clock = max(clock, min(self.agg.progress(st.key).max_ts, now))
        return now if clock == -math.inf else clock

    async def flush_idle(self, stream: Any, now_mono: float | None = None) -> None:
        """Close finished windows of partitions that have had no input for a while."""
        if stream is None:
            return
        now_mono = time.monotonic() if now_mono is None else now_mono
        async with self.lock:
            clock = self.delivered_clock(time.time(), now_mono)
            for st in list(self.states.values()):
                if not st.pending or now_mono - st.last_input < IDLE_FLUSH_S:
                    continue
                if self._replaying(st) or st.seek_to >= 0 or self._backlog(st):
                    continue  # not idle: more of it is known to exist
                windows = self.agg.close_idle(st.key, clock)
                self._close(stream, st, windows, st.last_offset)


def register(app: StanchApp) -> AggregationAgent:
    """Wire the aggregation agent (and its idle-flush timer) onto ``app``."""
    # With manual acks a message may wait for its window; Faust must not block a
    # rebalance until every message is acked (the new owner replays them instead).
    app.conf.stream_wait_empty = False
    state = AggregationAgent(app)
    app.stanch_aggregation = state  # type: ignore[attr-defined]
    current: dict[str, Any] = {"stream": None}

    @app.agent(state.source, name="stanch-aggregation")
    async def aggregate(stream: Any) -> None:
        noack = stream.noack()
        current["stream"] = noack
        async for event in noack.events():
            try:
                await state.handle(noack, event)
            except Exception:  # never let one message stop the agent (it stays queued
                # for an in-order ack: acking out of order could commit past others)
                log.exception("aggregation failed on %s[%s]@%s", event.message.topic,
                              event.message.partition, event.message.offset)

    @app.timer(_IDLE_TICK_S)
    async def idle_flush() -> None:
        await state.flush_idle(current["stream"])

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode's signal typing
    async def on_assigned(app: Any, assigned: Any, **_: Any) -> None:
        # Partitions we keep through a rebalance keep their state: Faust does not deliver
        # again what it already read. Partitions we lost are forgotten; their new owner
        # replays them from the committed offset.
        async with state.lock:
            state.keep_only({(tp.topic, tp.partition) for tp in assigned})

    return state
