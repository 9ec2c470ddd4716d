"""Suspect-change correlation: which deploy or config change probably caused an incident.

Why: most incidents follow a change, and rolling back is the fastest safe mitigation,
but rolling back an innocent change costs a deploy and hides the real cause. So a
change is only *suspect* when it touched the incident's root service (or a service it
depends on) shortly before onset, and only *confirmed* when the window summaries show
the new version doing clearly worse than the old one: its error rate at least
`min_error_ratio` times and `min_error_delta` above the old one's (with at least
`min_version_requests` requests on the new version), or its p99 `min_latency_ratio`
times the old one's when per-version latency is known (`version_p99`). When the old
version has no requests to compare with (the rollout finished), the comparison falls
back to the service's error rate and p99 before the change.

Everything here is event-time and bounded: at most `max_per_service` changes and
`max_windows` per-service window tallies are kept.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from models.errors import ModelInputError
from models.policy import RollbackPolicy

#: Rolled-back change ids remembered. A change is a suspect only within
#: suspect_window_s (300 s) of an onset, so only the rollbacks of the last few minutes
#: matter; 1024 is far above any fleet's rollbacks in that time and bounds the memory.
MAX_ROLLED_BACK = 1024


class ChangeInputError(ModelInputError):
    """A change or window the change log cannot use."""


def _req_str(d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise ChangeInputError(key, v, "required non-empty string")
    return v


def _req_time(d: dict, key: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ChangeInputError(key, v, "required finite number (epoch seconds)")
    return float(v)


@dataclass(frozen=True)
class Change:
    """A deploy or config change, as published on stanch.changes."""

    ts: float
    service: str
    change_id: str
    kind: str
    from_version: str
    to_version: str

    @classmethod
    def from_dict(cls, d: dict) -> Change:
        if not isinstance(d, dict):
            raise ChangeInputError("<change>", d, "must be an object")
        kind = _req_str(d, "kind")
        if kind not in ("deploy", "config"):
            raise ChangeInputError("kind", kind, "must be deploy or config")
        return cls(ts=_req_time(d, "ts"), service=_req_str(d, "service"),
                   change_id=_req_str(d, "change_id"), kind=kind,
                   from_version=str(d.get("from_version") or ""),
                   to_version=str(d.get("to_version") or ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VersionEvidence:
    """New version against old one, from window summaries of the changed service."""

    new_requests: int
    new_errors: int
    old_requests: int
    old_errors: int
    old_basis: str  # "concurrent" (old version after the change), "before" or "none"
    new_p99: float | None
    old_p99: float | None
    confirmed: bool
    reason: str

    @property
    def new_error_rate(self) -> float | None:
        return self.new_errors / self.new_requests if self.new_requests else None

    @property
    def old_error_rate(self) -> float | None:
        return self.old_errors / self.old_requests if self.old_requests else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["new_error_rate"] = self.new_error_rate
        d["old_error_rate"] = self.old_error_rate
        return d


def _int_map(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    out: dict[str, int] = {}
    for k, v in value.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            out[str(k)] = int(v)
    return out


def _opt_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class ChangeLog:
    """Recent changes and per-version window tallies, per service (bounded)."""

    def __init__(self, max_per_service: int = 16, max_windows: int = 900) -> None:
        self.max_per_service = max_per_service
        self.max_windows = max_windows
        self._changes: dict[str, deque[Change]] = {}
        # service -> deque of [window_start, {version: [count, errors]}, count, errors, p99]
        self._tallies: dict[str, deque[list]] = {}
        # change_id -> event time it was rolled back: never a suspect again (a rolled-back
        # change no longer runs, so later anomalies are not its doing)
        self._rolled_back: dict[str, float] = {}

    # ---- input -------------------------------------------------------------------
    def add(self, change: dict | Change) -> tuple[Change, bool]:
        """Record a change; returns it and whether it was new (duplicates are ignored)."""
        c = change if isinstance(change, Change) else Change.from_dict(change)
        q = self._changes.setdefault(c.service, deque(maxlen=self.max_per_service))
        if any(x.change_id == c.change_id for x in q):
            return c, False
        q.append(c)
        if len(q) > 1 and q[-2].ts > c.ts:  # keep time order for "latest before onset"
            ordered = sorted(q, key=lambda x: (x.ts, x.change_id))
            q.clear()
            q.extend(ordered)
        return c, True

    def add_window(self, window: dict) -> None:
        """Tally one window summary of a service's ingress series (egress is skipped:
        its versions are the caller's, its errors the dependency's)."""
        if window.get("dependency"):
            return
        service = _req_str(window, "service")
        ws = _req_time(window, "window_start")
        counts = _int_map(window.get("version_counts"))
        errors = _int_map(window.get("version_errors"))
        count = _int_map({"c": window.get("count")}).get("c", 0)
        errs = _int_map({"e": window.get("errors")}).get("e", 0)
        p99 = _opt_float(window.get("p99"))
        q = self._tallies.setdefault(service, deque(maxlen=self.max_windows))
        if q and q[-1][0] == ws:  # several routes of the same window: merge
            row = q[-1]
        else:
            row = [ws, {}, 0, 0, None]
            q.append(row)
        for version, n in counts.items():
            slot = row[1].setdefault(version, [0, 0])
            slot[0] += n
            slot[1] += min(errors.get(version, 0), n)
        row[2] += count
        row[3] += errs
        if p99 is not None and count > 0:
            row[4] = p99 if row[4] is None else max(row[4], p99)

    def mark_rolled_back(self, change_id: str, at: float) -> None:
        """The change was rolled back at ``at``: it stops being a suspect."""
        if change_id not in self._rolled_back:
            self._rolled_back[change_id] = at
            while len(self._rolled_back) > MAX_ROLLED_BACK:
                del self._rolled_back[next(iter(self._rolled_back))]

    def rolled_back(self, change_id: str) -> bool:
        return change_id in self._rolled_back

    # ---- queries -----------------------------------------------------------------
    def suspect(self, services: list[str], onset: float, policy: RollbackPolicy) -> Change | None:
        """The latest change of one of `services` in [onset - window, onset + slack].

        `services` is in preference order (root first): a change of the root wins over
        a change of a dependency at a similar time only through recency, because the
        latest change before onset is the likeliest cause."""
        lo, hi = onset - policy.suspect_window_s, onset + policy.onset_slack_s
        best: Change | None = None
        for s in services:
            for c in self._changes.get(s, ()):
                if c.kind in policy.kinds and lo <= c.ts <= hi and \
                        c.change_id not in self._rolled_back and (
                        best is None or (c.ts, c.change_id) > (best.ts, best.change_id)):
                    best = c
        return best

    def evidence(self, change: Change, policy: RollbackPolicy) -> VersionEvidence:
        """Compare the new version with the old one around `change`."""
        rows = list(self._tallies.get(change.service, ()))
        after = [r for r in rows if r[0] >= change.ts]
        before = [r for r in rows if r[0] < change.ts]
        new_n = sum(r[1].get(change.to_version, [0, 0])[0] for r in after)
        new_e = sum(r[1].get(change.to_version, [0, 0])[1] for r in after)
        old_n = sum(r[1].get(change.from_version, [0, 0])[0] for r in after)
        old_e = sum(r[1].get(change.from_version, [0, 0])[1] for r in after)
        basis = "concurrent"
        if old_n < policy.min_version_requests:
            old_n = sum(r[1].get(change.from_version, [0, 0])[0] for r in before)
            old_e = sum(r[1].get(change.from_version, [0, 0])[1] for r in before)
            basis = "before"
            if old_n == 0:  # windows without a version mix: the service before the change
                old_n = sum(r[2] for r in before)
                old_e = sum(r[3] for r in before)
            if old_n == 0:
                basis = "none"
        p99_after = [r[4] for r in after if r[4] is not None]
        p99_before = [r[4] for r in before if r[4] is not None]
        new_p99 = _median(p99_after)
        old_p99 = _median(p99_before)
        confirmed, reason = _judge(new_n, new_e, old_n, old_e, basis, new_p99, old_p99, policy)
        return VersionEvidence(new_n, new_e, old_n, old_e, basis, new_p99, old_p99,
                               confirmed, reason)

    # ---- state -------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "changes": {s: [c.to_dict() for c in q] for s, q in self._changes.items()},
            "tallies": {s: [[r[0], {v: list(x) for v, x in r[1].items()}, r[2], r[3], r[4]]
                            for r in q] for s, q in self._tallies.items()},
            "rolled_back": dict(self._rolled_back),
        }

    def load_state(self, d: dict[str, Any]) -> None:
        self._changes = {s: deque((Change(**c) for c in cs), maxlen=self.max_per_service)
                         for s, cs in d.get("changes", {}).items()}
        self._tallies = {s: deque(([r[0], {v: list(x) for v, x in r[1].items()}, r[2], r[3],
                                    r[4]] for r in rows), maxlen=self.max_windows)
                         for s, rows in d.get("tallies", {}).items()}
        self._rolled_back = {str(k): float(v) for k, v in d.get("rolled_back", {}).items()}


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[len(s) // 2]


def _judge(new_n: int, new_e: int, old_n: int, old_e: int, basis: str,
           new_p99: float | None, old_p99: float | None,
           policy: RollbackPolicy) -> tuple[bool, str]:
    if new_n < policy.min_version_requests:
        return False, f"too few requests on the new version yet ({new_n})"
    new_rate = new_e / new_n
    old_rate = old_e / old_n if old_n else 0.0
    if (new_rate >= policy.min_error_delta + old_rate
            and new_rate >= policy.min_error_ratio * old_rate):
        return True, (f"new version error rate {new_rate:.3f} vs old {old_rate:.3f} "
                      f"({basis})")
    if (new_p99 is not None and old_p99 is not None and old_p99 > 0
            and new_p99 >= policy.min_latency_ratio * old_p99):
        return True, f"p99 {new_p99:.1f} ms after the change vs {old_p99:.1f} ms before"
    return False, f"new version error rate {new_rate:.3f} vs old {old_rate:.3f}: not clearly worse"
