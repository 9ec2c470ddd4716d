"""Tumbling-window aggregation of request telemetry, per series, on event time.

The aggregation agent calls this once per Kafka message (a batch of a few hundred
validated events) and then asks which windows are complete. Everything here is pure and
deterministic: time only enters as the events' ``ts`` and as a ``now`` argument, so a
replay of the same messages in the same order rebuilds byte-identical window summaries
(the property crash safety rests on, see docs/pipeline.md).

Rules, per Kafka partition (a series lives on one partition because the requests topic is
keyed by service):

* window index ``k = floor(ts / window_s)``; the window covers ``[k*w, (k+1)*w)``.
* watermark = min(largest ``ts`` seen, ``now``) - ``grace_s``; window ``k`` closes once
  ``(k + 1) * w <= watermark``. Closing is monotone: ``closed_k`` is the highest closed
  index and every window at or below it has been emitted. ``now`` is the robust clock the
  caller trusts (live: the worker's wall clock; a replay of finite input: +inf, pure
  event time). Event time may never run ahead of it, so one producer whose clock is
  ahead (by less than ``max_clock_skew_s``: beyond that it is rejected) cannot close the
  windows of everyone else on its partition: its own events wait in their windows until
  the clock reaches them, and every other producer keeps the full grace.
* an event whose window is already closed is *late* (rejected with reason ``"late"``);
  an event with ``ts > now + max_clock_skew_s`` is rejected with reason ``"clock skew"``
  (a clock far in the future would otherwise drag the watermark along and make every
  honest event late).
* forwarded events (an unkeyed producer's events, routed to their series' home partition
  by the agent: one more hop through Kafka) arrive behind the partition's own events by
  that hop's delay. :meth:`WindowAggregator.note_forward` measures it in event time (the
  partition's largest ``ts`` minus the forward's newest ``ts``), and the partition holds
  its windows back by twice the largest delay seen in the last one to two
  ``FORWARD_MEMORY_S`` of event time (the next hop may be as slow again as the slowest
  recent one), at most ``MAX_FORWARD_HOLD_S``. A partition that receives no forwards
  (keyed producers, the normal case) pays nothing. The hold is part of the stored
  progress, so a replay closes the same windows.
* :meth:`WindowAggregator.close_idle` is the one wall-clock rule: a partition that has had
  no input for a while closes the windows that ended more than ``grace_s`` before ``now``,
  so the last windows of a burst are not held forever.

Inputs are validated records (``schemas.records``): request events, error events (counted
on the series ``service|_errors|dependency``, as requests with no latency that all failed)
and window summaries that services pre-aggregated themselves (merged into the same
window: the sketches are mergeable).

Per-event work is a few dictionary operations; the latency sketch of each (series,
window) is built in one vectorised numpy pass when the window closes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models import sketch as sk
from schemas.records import ErrorEvent, RequestEvent, WindowSummary

#: Route of the series that counts error events (which have no route of their own).
ERROR_ROUTE = "_errors"
#: Version maps keep at most this many names (the wire limit is 64); the rest are summed
#: under OTHER_VERSION, so a service with a version per request cannot blow up a summary.
MAX_VERSIONS = 63
OTHER_VERSION = "_other"
QUANTILES = (0.5, 0.9, 0.99)

#: How long (event time) a measured forward delay keeps holding a partition's windows:
#: long enough to span many hops (a forward every few windows keeps it alive), short
#: enough that one slow moment does not slow the partition's decisions for good.
FORWARD_MEMORY_S = 60.0
#: The most a partition holds its windows for forwards. Beyond a few seconds the forward
#: path is broken rather than slow, and every decision on the partition would wait for it;
#: events later than this are dead-lettered as late, as any other.
MAX_FORWARD_HOLD_S = 5.0

LATE = "late"
CLOCK_SKEW = "clock skew"
BAD_WINDOW = "window does not fit the aggregation"


@dataclass(frozen=True, slots=True)
class Reject:
    """An input the aggregator refused: the reason and the record itself."""

    reason: str
    record: Any


class _Acc:
    """What one (series, window) has gathered so far."""

    __slots__ = ("service", "route", "dependency", "lat", "count", "errors", "vc", "ve",
                 "sketches", "given_p", "metrics")

    def __init__(self, service: str, route: str, dependency: str | None) -> None:
        self.service = service
        self.route = route
        self.dependency = dependency
        self.lat: list[float] = []
        self.count = 0  # beyond len(lat): error events and pre-aggregated counts
        self.errors = 0
        self.vc: dict[str, int] = {}
        self.ve: dict[str, int] = {}
        self.sketches: list[dict[str, Any]] = []
        self.given_p: list[tuple[float | None, float | None, float | None]] = []
        self.metrics: dict[str, float] = {}


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What :meth:`WindowAggregator.add_batch` did: the rejects, and the highest window
    index an accepted record went into (None when nothing was accepted). A message can be
    acknowledged once that window has closed."""

    rejects: list[Reject]
    max_k: int | None


@dataclass(slots=True)
class PartitionProgress:
    """How far a partition has got: what the agent stores to resume after a crash.

    ``closed_k``: every window index <= closed_k has been emitted. ``max_ts``: the largest
    event time seen (the watermark is ``max_ts - grace_s``).
    """

    closed_k: int | None = None
    max_ts: float = -math.inf
    #: the hold for forwarded events (module doc) as a sliding maximum over two
    #: ``FORWARD_MEMORY_S`` buckets of event time: the wanted hold of the previous bucket,
    #: of the current one, and where the current one began
    hold_prev: float = 0.0
    hold_cur: float = 0.0
    hold_since: float = -math.inf

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"closed_k": self.closed_k,
                             "max_ts": None if self.max_ts == -math.inf else self.max_ts}
        if self.hold_prev > 0 or self.hold_cur > 0:
            d["hold"] = [self.hold_prev, self.hold_cur, self.hold_since]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PartitionProgress:
        max_ts = d.get("max_ts")
        closed = d.get("closed_k")
        prev, cur, since = d.get("hold") or (0.0, 0.0, -math.inf)
        return cls(None if closed is None else int(closed),
                   -math.inf if max_ts is None else float(max_ts),
                   float(prev), float(cur), float(since))


class _Partition:
    __slots__ = ("progress", "open")

    def __init__(self) -> None:
        self.progress = PartitionProgress()
        # window index -> (service, route, dependency) -> accumulator
        self.open: dict[int, dict[tuple[str, str, str | None], _Acc]] = {}


def _capped(counts: dict[str, int]) -> dict[str, int] | None:
    if not counts:
        return None
    if len(counts) <= MAX_VERSIONS:
        return dict(sorted(counts.items()))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[:MAX_VERSIONS - 1])
    kept[OTHER_VERSION] = kept.get(OTHER_VERSION, 0) + sum(c for _, c in ranked[MAX_VERSIONS - 1:])
    return dict(sorted(kept.items()))


class WindowAggregator:
    """Per-partition tumbling windows with an event-time watermark and a grace period."""

    def __init__(
        self,
        window_s: float = 1.0,
        grace_s: float = 2.0,
        max_clock_skew_s: float = 300.0,
        relative_accuracy: float = sk.DEFAULT_RELATIVE_ACCURACY,
    ) -> None:
        if not window_s > 0 or grace_s < 0 or not max_clock_skew_s > 0:
            raise ValueError("window_s and max_clock_skew_s must be > 0, grace_s >= 0")
        self.window_s = float(window_s)
        self.grace_s = float(grace_s)
        self.max_clock_skew_s = float(max_clock_skew_s)
        self.relative_accuracy = relative_accuracy
        self._parts: dict[Hashable, _Partition] = {}
        self._max_k: int | None = None

    # -- state ---------------------------------------------------------------------
    def _part(self, partition: Hashable) -> _Partition:
        p = self._parts.get(partition)
        if p is None:
            p = self._parts[partition] = _Partition()
        return p

    def progress(self, partition: Hashable) -> PartitionProgress:
        p = self._part(partition).progress
        return PartitionProgress(p.closed_k, p.max_ts, p.hold_prev, p.hold_cur, p.hold_since)

    def closed_k(self, partition: Hashable) -> int | None:
        """The highest closed window index of a partition (None before the first)."""
        part = self._parts.get(partition)
        return part.progress.closed_k if part is not None else None

    def restore(self, partition: Hashable, progress: PartitionProgress) -> None:
        """Resume a partition from stored progress (open windows are rebuilt by replay)."""
        part = self._part(partition)
        part.progress = PartitionProgress(progress.closed_k, progress.max_ts,
                                          progress.hold_prev, progress.hold_cur,
                                          progress.hold_since)
        part.open.clear()

    def drop(self, partition: Hashable) -> None:
        """Forget a partition (it was revoked: its new owner replays what was open)."""
        self._parts.pop(partition, None)

    def partitions(self) -> list[Hashable]:
        return list(self._parts)

    def open_windows(self, partition: Hashable) -> int:
        part = self._parts.get(partition)
        return sum(len(v) for v in part.open.values()) if part else 0

    def window_start(self, k: int) -> float:
        return round(k * self.window_s, 6)

    def hold(self, partition: Hashable) -> float:
        """Seconds the partition currently holds its windows for forwarded events."""
        prog = self._part(partition).progress
        if prog.hold_cur or prog.hold_prev:
            self._roll_hold(prog)
        return max(prog.hold_prev, prog.hold_cur)

    @staticmethod
    def _roll_hold(prog: PartitionProgress) -> None:
        passed = prog.max_ts - prog.hold_since
        if passed >= 2 * FORWARD_MEMORY_S:
            prog.hold_prev, prog.hold_cur, prog.hold_since = 0.0, 0.0, prog.max_ts
        elif passed >= FORWARD_MEMORY_S:
            prog.hold_prev, prog.hold_cur = prog.hold_cur, 0.0
            prog.hold_since += FORWARD_MEMORY_S

    # -- input -----------------------------------------------------------------------
    def note_forward(self, partition: Hashable, newest_ts: float,
                     now: float = math.inf) -> None:
        """A forwarded batch whose newest event is ``newest_ts`` is about to be added:
        measure how far behind the partition's own events it arrived, and hold the
        partition's windows long enough for the next forward (module doc). Event time
        only, so a replay of the same messages holds the same windows; ``now`` caps the
        partition's event time as in the watermark (a producer ahead is no delay)."""
        prog = self._part(partition).progress
        lag = min(prog.max_ts, now) - newest_ts
        if not lag > 0 or lag == math.inf:
            return
        if prog.hold_since == -math.inf:
            prog.hold_since = prog.max_ts
        self._roll_hold(prog)
        prog.hold_cur = max(prog.hold_cur, min(2.0 * lag, MAX_FORWARD_HOLD_S))

    def add_batch(self, partition: Hashable, records: Sequence[Any], now: float) -> BatchResult:
        """Add validated records (requests, error events, window summaries) in order."""
        self._max_k = None
        rejects: list[Reject] = []
        run: list[RequestEvent] = []
        for r in records:
            if type(r) is RequestEvent:
                run.append(r)
                continue
            if run:
                rejects.extend(self.add_requests(partition, run, now))
                run = []
            if isinstance(r, ErrorEvent):
                rejects.extend(self.add_errors(partition, (r,), now))
            elif isinstance(r, WindowSummary):
                rejects.extend(self.add_windows(partition, (r,), now))
            else:
                raise TypeError(f"cannot aggregate {type(r).__name__}")
        if run:
            rejects.extend(self.add_requests(partition, run, now))
        return BatchResult(rejects, self._max_k)

    def _note_k(self, k: int) -> None:
        if self._max_k is None or k > self._max_k:
            self._max_k = k

    def add_requests(self, partition: Hashable, events: Iterable[RequestEvent],
                     now: float) -> list[Reject]:
        """The hot path: a few dict operations per event, no allocation beyond the key."""
        part = self._part(partition)
        prog = part.progress
        closed_k = prog.closed_k if prog.closed_k is not None else -(1 << 62)
        max_ts = prog.max_ts
        limit = now + self.max_clock_skew_s
        ws = self.window_s
        open_ = part.open
        rejects: list[Reject] = []
        cur_k = None
        cur: dict[tuple[str, str, str | None], _Acc] = {}
        top = -1 << 62
        for e in events:
            ts = e.ts
            if ts > limit:
                rejects.append(Reject(CLOCK_SKEW, e))
                continue
            k = int(ts // ws)
            if k <= closed_k:
                rejects.append(Reject(LATE, e))
                continue
            if ts > max_ts:
                max_ts = ts
            if k != cur_k:
                if k > top:
                    top = k
                cur = open_.get(k)  # type: ignore[assignment]
                if cur is None:
                    cur = open_[k] = {}
                cur_k = k
            key = (e.service, e.route, e.dependency)
            acc = cur.get(key)
            if acc is None:
                acc = cur[key] = _Acc(e.service, e.route, e.dependency)
            acc.lat.append(e.latency_ms)
            err = e.error
            if err is None:
                err = e.status >= 500
            v = e.version
            if v is not None:
                acc.vc[v] = acc.vc.get(v, 0) + 1
                if err:
                    acc.ve[v] = acc.ve.get(v, 0) + 1
            if err:
                acc.errors += 1
        prog.max_ts = max_ts
        if cur_k is not None:
            self._note_k(top)
        return rejects

    def _admit(self, part: _Partition, ts: float, now: float, record: Any,
               rejects: list[Reject]) -> int | None:
        """Window index for ``ts``, or None (and a reject) when skewed or late."""
        if ts > now + self.max_clock_skew_s:
            rejects.append(Reject(CLOCK_SKEW, record))
            return None
        k = int(ts // self.window_s)
        closed = part.progress.closed_k
        if closed is not None and k <= closed:
            rejects.append(Reject(LATE, record))
            return None
        if ts > part.progress.max_ts:
            part.progress.max_ts = ts
        self._note_k(k)
        return k

    def _acc(self, part: _Partition, k: int, service: str, route: str,
             dependency: str | None) -> _Acc:
        window = part.open.setdefault(k, {})
        key = (service, route, dependency)
        acc = window.get(key)
        if acc is None:
            acc = window[key] = _Acc(service, route, dependency)
        return acc

    def add_errors(self, partition: Hashable, events: Iterable[ErrorEvent],
                   now: float) -> list[Reject]:
        """Error events count on ``service|_errors|dependency`` (no latency, all failed)."""
        part = self._part(partition)
        rejects: list[Reject] = []
        for e in events:
            k = self._admit(part, e.ts, now, e, rejects)
            if k is None:
                continue
            acc = self._acc(part, k, e.service, ERROR_ROUTE, e.dependency)
            acc.lat.append(0.0)  # counts the event; error events have no latency
            acc.errors += 1
            if e.version is not None:
                acc.vc[e.version] = acc.vc.get(e.version, 0) + 1
                acc.ve[e.version] = acc.ve.get(e.version, 0) + 1
        return rejects

    def add_windows(self, partition: Hashable, windows: Iterable[WindowSummary],
                    now: float) -> list[Reject]:
        """Merge summaries that services aggregated themselves into the same windows.

        The summary must use this aggregator's window length, start on a window boundary
        and carry a sketch of the same relative accuracy; otherwise it cannot be merged
        and is rejected (reason names the mismatch).
        """
        part = self._part(partition)
        rejects: list[Reject] = []
        for w in windows:
            k = round(w.window_start / self.window_s)
            if (abs(w.window_s - self.window_s) > 1e-9
                    or abs(k * self.window_s - w.window_start) > 1e-6):
                rejects.append(Reject(
                    f"{BAD_WINDOW}: window_s={w.window_s} window_start={w.window_start} "
                    f"(aggregation uses {self.window_s} s windows)", w))
                continue
            if float(w.sketch["relative_accuracy"]) != self.relative_accuracy:
                rejects.append(Reject(
                    f"{BAD_WINDOW}: sketch relative_accuracy "
                    f"{w.sketch['relative_accuracy']} != {self.relative_accuracy}", w))
                continue
            # the window's last instant decides lateness, like its last request would
            kk = self._admit(part, w.window_start, now, w, rejects)
            if kk is None:
                continue
            acc = self._acc(part, k, w.service, w.route, w.dependency)
            acc.count += w.count
            acc.errors += w.errors
            if w.sketch["bins"] or w.sketch.get("zero_count"):
                acc.sketches.append(w.sketch)
            acc.given_p.append((w.p50, w.p90, w.p99))
            for src, dst in ((w.version_counts, acc.vc), (w.version_errors, acc.ve)):
                for name, c in (src or {}).items():
                    dst[name] = dst.get(name, 0) + c
            if w.metrics:
                acc.metrics.update(w.metrics)  # gauges: the latest summary wins
        return rejects

    # -- output ----------------------------------------------------------------------
    def watermark(self, partition: Hashable, now: float = math.inf) -> float:
        hold = self.hold(partition)
        return min(self._part(partition).progress.max_ts, now) - self.grace_s - hold

    def close_ready(self, partition: Hashable, now: float = math.inf) -> list[dict[str, Any]]:
        """Close every window that ended at or before the watermark
        (``min(max_ts, now) - grace_s``, less the forward hold); summaries in
        (window_start, series) order."""
        part = self._part(partition)
        wm = self.watermark(partition, now)
        if wm == -math.inf:
            return []
        return self._close_through(part, math.floor(wm / self.window_s) - 1)

    def close_idle(self, partition: Hashable, now: float) -> list[dict[str, Any]]:
        """Close windows that ended more than ``grace_s`` before wall-clock ``now``; the
        agent calls this when the partition has been idle (no input) for a while."""
        part = self._part(partition)
        if not part.open:
            return []
        through = math.floor((now - self.grace_s - self.hold(partition)) / self.window_s) - 1
        return self._close_through(part, through)

    def close_all(self, partition: Hashable) -> list[dict[str, Any]]:
        """Close every open window (end of a finite input, e.g. a replay)."""
        part = self._part(partition)
        if not part.open:
            return []
        return self._close_through(part, max(part.open))

    def _close_through(self, part: _Partition, through: int) -> list[dict[str, Any]]:
        prog = part.progress
        if prog.closed_k is not None and through <= prog.closed_k:
            return []
        out: list[dict[str, Any]] = []
        for k in sorted(i for i in part.open if i <= through):
            window = part.open.pop(k)
            for key in sorted(window, key=lambda t: (t[0], t[1], t[2] or "")):
                out.append(self._summary(k, window[key]))
        prog.closed_k = through
        return out

    def _summary(self, k: int, acc: _Acc) -> dict[str, Any]:
        a = self.relative_accuracy
        sketch = sk.build(np.asarray(acc.lat, dtype=np.float64), a) if acc.lat else sk.empty(a)
        if acc.sketches:
            sketch = sk.merge(sketch, *acc.sketches)
        count = len(acc.lat) + acc.count
        if count == 0:
            p: list[float | None] = [None, None, None]
        elif sketch["bins"] or sketch["zero_count"]:
            p = sk.quantiles(sketch, QUANTILES)
        else:  # pre-aggregated counts without a sketch: keep what the service said
            p = [max((float(v) for g in acc.given_p if (v := g[i]) is not None), default=0.0)
                 for i in range(3)]
        summary: dict[str, Any] = {
            "service": acc.service,
            "route": acc.route,
            "window_start": self.window_start(k),
            "window_s": self.window_s,
            "count": count,
            "errors": min(acc.errors, count),
            "sketch": sketch,
            "p50": p[0],
            "p90": p[1],
            "p99": p[2],
        }
        if acc.dependency is not None:
            summary["dependency"] = acc.dependency
        vc, ve = _capped(acc.vc), _capped(acc.ve)
        if vc:
            summary["version_counts"] = vc
        if ve:
            summary["version_errors"] = ve
        if acc.metrics:
            summary["metrics"] = dict(sorted(acc.metrics.items()))
        return summary


def series_of(summary: dict[str, Any]) -> str:
    """``service|route|dependency`` of a summary dict."""
    return f"{summary['service']}|{summary['route']}|{summary.get('dependency') or ''}"


def window_id_of(summary: dict[str, Any]) -> str:
    return f"{series_of(summary)}|{summary['window_start']:.3f}"
