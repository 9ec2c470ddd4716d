"""Detector agent: window summaries -> per-series SeriesDetector -> anomaly events.

* Input: the windows topic (summaries from the aggregation agent, or from services that
  aggregate themselves), one summary object or a JSON array of them per message. Every
  summary is validated with ``WindowSummary``; a bad one is dead-lettered, the rest of
  the batch goes on.
* State: one entry per series in a changelogged Faust table (``detector-state``), written
  once per series per window - never per event. The value is the detector's compact state
  (``SeriesDetector.to_state()``) with the last processed window start, encoded with
  Python's json (no pickle: a changelog must not be able to run code), each detector's
  numbers packed as 8-byte floats in base64 (exact, NaN/inf included; ~11 characters a
  number where JSON spells a learned float in ~18). A restarted or rebalanced worker
  restores it and resumes with its baselines; a value it cannot read (corrupt, or from an
  incompatible version) is logged and the series starts afresh.
* Idempotence: a window whose ``window_start`` is not after the series' last processed one
  is skipped, so replays and duplicates are harmless; anomaly ids are
  ``series|signal|window_start`` so downstream dedupes as well.
* TTL: a timer drops series whose last window is ``series_ttl_s`` older (event time) than
  the robust clock: the newest window this worker has seen, but never beyond the wall
  clock (tombstone in the changelog). A window stamped in the future cannot expire live
  baselines; one more than ``max_clock_skew_s`` ahead is dead-lettered (``clock skew``),
  since it would also make every real window of its series look like a replay.
* A null-valued (tombstone) message is dead-lettered with category ``tombstone``.
* Mitigation hook: ``app.stanch_mitigated`` may be a set of services or a callable
  ``service -> bool``; windows of mitigated services are scored but not learned.

The pure detector is ``models.series.SeriesDetector`` - the same code ``stanch backtest``
runs - called with the validated summary dict ``WindowSummary.to_dict()``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import faust
import orjson

from agents.aggregation import decode_message
from agents.deadletter import DeadLetters
from models.series import DetectorConfig, Finding, SeriesDetector
from schemas.errors import SchemaError
from schemas.records import Anomaly, WindowSummary

if TYPE_CHECKING:
    from app.faust_app import StanchApp

log = logging.getLogger(__name__)

AGENT = "detection"
STATE_TABLE = "detector-state"
_TTL_TICK_S = 30.0
#: Detectors kept decoded in memory (most recently used series); the rest are decoded
#: from the table when their next window arrives.
DETECTOR_CACHE_SIZE = 20_000


def pack_floats(numbers: Any) -> str:
    """Numbers as little-endian 8-byte floats in base64: exact, and shorter than JSON."""
    values = [float(v) for v in numbers]
    return base64.b64encode(struct.pack(f"<{len(values)}d", *values)).decode("ascii")


def unpack_floats(text: str) -> list[float]:
    """Inverse of :func:`pack_floats`; ValueError on anything else."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"packed numbers: not base64 ({exc})") from exc
    if len(raw) % 8:
        raise ValueError(f"packed numbers: {len(raw)} bytes is not a whole number of floats")
    return list(struct.unpack(f"<{len(raw) // 8}d", raw))


def encode_state(last_window_start: float, partition: int, state: Any) -> bytes:
    """Table value: ``[last_window_start, partition, state]`` as compact JSON bytes, each
    signal's detector numbers packed (:func:`pack_floats`)."""
    version, signals, starts = state
    packed = [version, [[sig, pack_floats(nums), list(track)] for sig, nums, track in signals],
              list(starts)]
    return json.dumps([last_window_start, partition, packed], separators=(",", ":")).encode()


def decode_state(value: bytes | list[Any]) -> tuple[float, int, Any]:
    """Inverse of :func:`encode_state` (a value recovered from the changelog may arrive
    already JSON-decoded; a value written before the numbers were packed, a plain list,
    still reads). ValueError or TypeError on a value of another shape."""
    last, partition, state = json.loads(value) if isinstance(value, bytes | str) else value
    version, signals, starts = state
    signals = [[sig, unpack_floats(nums) if isinstance(nums, str) else nums, track]
               for sig, nums, track in signals]
    return float(last), int(partition), [version, signals, starts]


def last_window_start(value: bytes | list[Any]) -> float:
    """The first number of a table value, without decoding the whole state."""
    if isinstance(value, bytes):
        return float(value[1:value.index(b",")])
    return float(value[0])


def finding_to_anomaly(f: Finding, window: WindowSummary, detected_at: float) -> Anomaly:
    """The wire record of a finding (validated: a bad one raises SchemaError)."""
    return Anomaly(
        id=f.id,
        service=window.service,
        series=f.series,
        signal=f.signal,
        window_start=f.window_start,
        observed=_finite(f.observed),
        expected=_finite(f.expected),
        score=_finite(f.score),
        severity=f.severity,
        evidence=dict(f.evidence),
        route=window.route,
        dependency=window.dependency,
        window_s=window.window_s,
        detected_at=detected_at,
    ).validate()


def _finite(x: float) -> float:
    x = float(x)
    if math.isfinite(x):
        return x
    return math.copysign(1e300, x) if not math.isnan(x) else 0.0


class DetectionAgent:
    """State and behaviour of the detector agent of one worker process."""

    def __init__(self, app: StanchApp, config: DetectorConfig | None = None) -> None:
        s = app.settings
        self.app = app
        self.settings = s
        self.config = config or DetectorConfig()
        self.source = app.topic(s.topic("windows"), key_serializer="raw",
                                value_serializer="raw")
        self.anomalies = app.topic(s.topic("anomalies"), key_serializer="raw",
                                   value_serializer="raw")
        self.table = app.Table(
            STATE_TABLE, default=None, partitions=s.partitions,
            schema=faust.Schema(key_serializer="json", value_serializer="raw"),
        )
        self.deadletters = DeadLetters(app, AGENT)
        self.newest_window_start = -math.inf
        self.stats: Counter[str] = Counter()
        #: series -> (table value we wrote, its window_start, the detector it encodes):
        #: a window of a series seen recently skips decoding and restoring its state.
        #: Valid only while the table still holds that very value object (a restore or
        #: rebalance puts new objects there), and bounded (least recently used evicted).
        self._cache: dict[str, tuple[bytes, float, SeriesDetector]] = {}
        self.cache_size = DETECTOR_CACHE_SIZE

    def is_mitigated(self, service: str) -> bool:
        hook = getattr(self.app, "stanch_mitigated", None)
        if hook is None:
            return False
        if callable(hook):
            return bool(hook(service))
        return service in hook

    async def handle(self, event: Any) -> None:
        msg = event.message
        if msg.value is None:
            await self.deadletters.send(
                "tombstone", "null value (tombstone): no window summary", None,
                source_topic=msg.topic, partition=msg.partition, offset=msg.offset,
                key=msg.key,
            )
            return
        elements, problem = decode_message(msg.value)
        if problem is not None:
            await self.deadletters.send(
                "not json" if problem.startswith("not JSON") else "schema", problem,
                msg.value, source_topic=msg.topic, partition=msg.partition,
                offset=msg.offset, key=msg.key,
            )
            return
        for i, obj in enumerate(elements):  # type: ignore[arg-type]
            try:
                window = WindowSummary.from_dict(obj)
            except SchemaError as exc:
                where = exc.at(f"[{i}]") if len(elements) > 1 else exc  # type: ignore[arg-type]
                await self.deadletters.send(
                    "schema", where, obj, source_topic=msg.topic, partition=msg.partition,
                    offset=msg.offset, key=msg.key,
                )
                continue
            limit = time.time() + self.settings.max_clock_skew_s
            if window.window_start > limit:
                await self.deadletters.send(
                    "clock skew", f"clock skew: window_start {window.window_start:.3f} is "
                    f"more than {self.settings.max_clock_skew_s} s in the future", obj,
                    source_topic=msg.topic, partition=msg.partition, offset=msg.offset,
                    key=msg.key,
                )
                continue
            await self.detect(window, msg.partition)

    async def detect(self, window: WindowSummary, partition: int) -> list[Anomaly]:
        """Run the series' detector on one validated window; emit its anomalies."""
        series = window.series
        store = self.table.data
        stored = store.get(series)
        cached = self._cache.pop(series, None)
        if stored is None:
            det = SeriesDetector(series, self.config)
        elif cached is not None and cached[0] is stored:
            # the table still holds what we wrote with this detector: no need to decode
            if window.window_start <= cached[1]:
                self._cache[series] = cached
                self.stats["duplicate windows"] += 1
                return []
            det = cached[2]
        else:
            try:
                last, _, state = decode_state(stored)
                if window.window_start <= last:
                    self.stats["duplicate windows"] += 1
                    return []
                det = SeriesDetector.restore(series, state, self.config)
            except (ValueError, TypeError) as exc:
                log.error("detector state of %s unreadable (%s): starting afresh", series, exc)
                self.stats["unreadable states"] += 1
                det = SeriesDetector(series, self.config)
        # (a detector that raised half-way is not cached: the next window decodes the table)
        findings = det.update(window.to_dict(), mitigated=self.is_mitigated(window.service))
        # Anomalies are delivered before the state that says this window was processed is
        # written: after a SIGKILL the replayed window is either re-scored (state not
        # written) or its anomalies are already on the broker (written). The other order
        # lost the anomalies of windows whose state reached the changelog first.
        out = []
        if findings:
            now = time.time()
            sends = []
            for f in findings:
                try:
                    anomaly = finding_to_anomaly(f, window, now)
                except SchemaError as exc:
                    await self.deadletters.send(
                        "detector", f"anomaly does not fit the contract: {exc}", f.evidence,
                        source_topic=self.settings.topic("windows"), partition=partition,
                    )
                    continue
                sends.append(await self.anomalies.send(
                    key=window.service.encode(), value=orjson.dumps(anomaly.to_dict()),
                    force=True))
                self.stats["anomalies"] += 1
                out.append(anomaly)
            for fut in sends:
                await fut
        value = encode_state(window.window_start, partition, det.to_state())
        self.table[series] = value
        cache = self._cache
        cache[series] = (value, window.window_start, det)
        if len(cache) > self.cache_size:
            del cache[next(iter(cache))]  # the least recently used series
        self.stats["windows"] += 1
        if window.window_start > self.newest_window_start:
            self.newest_window_start = window.window_start
        return out

    def ttl_clock(self, now: float | None = None) -> float:
        """Event time the TTL is judged against: the newest window seen, capped by the
        wall clock (a replay of the past keeps its own event time; a window stamped in
        the future cannot move it)."""
        return min(self.newest_window_start, time.time() if now is None else now)

    def expire_idle(self, now: float | None = None) -> int:
        """Drop series idle for ``series_ttl_s`` of event time; returns how many."""
        if self.newest_window_start == -math.inf:
            return 0
        horizon = self.ttl_clock(now) - self.settings.series_ttl_s
        expired: list[tuple[Any, int | None]] = []
        for key, value in list(self.table.data.items()):
            try:
                if last_window_start(value) < horizon:
                    expired.append((key, decode_state(value)[1]))
            except (ValueError, TypeError):
                expired.append((key, None))
        for key, partition in expired:
            self.table.data.pop(key, None)
            self._cache.pop(key, None)
            if partition is not None:
                self.table.send_changelog(partition, key, None)
        self.stats["expired series"] += len(expired)
        return len(expired)


def register(app: StanchApp, config: DetectorConfig | None = None) -> DetectionAgent:
    """Wire the detector agent and its TTL timer onto ``app``."""
    state = DetectionAgent(app, config)
    app.stanch_detection = state  # type: ignore[attr-defined]

    @app.agent(state.source, name="stanch-detection")
    async def detect(stream: Any) -> None:
        async for event in stream.events():
            try:
                await state.handle(event)
            except Exception:  # never let one message stop the agent
                log.exception("detection failed on %s[%s]@%s", event.message.topic,
                              event.message.partition, event.message.offset)

    @app.timer(min(_TTL_TICK_S, app.settings.series_ttl_s / 4))
    async def expire() -> None:
        state.expire_idle()

    return state

