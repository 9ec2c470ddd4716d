"""``stanch incidents``: list incidents, and ``show ID``: the timeline and a plot.

Why read the topics and not ask the worker: stanch.incidents is the record of what
happened (kept 90 days), readable while the worker is down and after it moved. Entries
are de-duplicated by id (the decider may re-send an entry after a crash).

The plot shows, for each series and signal the incident's anomalies named, the value
computed from the window summaries (error rate, p99 latency, request rate or the
metric), a baseline band (mean +- 3 standard deviations of that value over the
windows before the incident opened: what "normal" looked like just before), the
anomalies as red marks, and each command, restore step and the resolution as
vertical lines.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agents.incidents import read_records
from app.settings import Settings

MAX_PANELS = 6
BASELINE_S = 300.0


async def read_topic(settings: Settings, name: str) -> list[dict[str, Any]]:
    """Every JSON object on a Stanch topic, from the beginning to its current end.

    Messages holding a JSON array contribute each object; undecodable ones are skipped."""
    out: list[dict[str, Any]] = []
    for record in await read_records(settings, settings.topic(name)):
        try:
            value = orjson.loads(record.value or b"")
        except orjson.JSONDecodeError:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out.append(item)
    return out


# --------------------------------------------------------------------------- timelines
def _seq(entry_id: str) -> int:
    tail = entry_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


@dataclass
class IncidentView:
    """One incident as its timeline entries tell it."""

    id: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return str(self.entries[-1]["state"]) if self.entries else "?"

    @property
    def root_service(self) -> str:
        return str(self.entries[-1].get("root_service") or self.entries[-1]["service"])

    @property
    def services(self) -> list[str]:
        return list(self.entries[-1].get("services") or [self.root_service])

    @property
    def opened_at(self) -> float:
        first = self.entries[0]
        return float(first.get("opened_at") or first["at"])

    @property
    def last_at(self) -> float:
        return float(self.entries[-1]["at"])

    def first(self, entry: str, state: str | None = None) -> dict[str, Any] | None:
        for e in self.entries:
            if e["entry"] == entry and (state is None or e["state"] == state):
                return e
        return None

    def first_state(self, state: str) -> float | None:
        return next((float(e["at"]) for e in self.entries if e["state"] == state), None)

    def command_ids(self) -> list[str]:
        return [e["command_id"] for e in self.entries
                if e["entry"] in ("command", "restore_step") and e.get("command_id")]

    def durations(self) -> dict[str, float | None]:
        """Seconds from opening to the first command, monitoring, resolved, escalated."""
        t0 = self.opened_at
        cmd = self.first("command")

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 3)

        return {
            "to_first_command_s": rel(float(cmd["at"]) if cmd else None),
            "to_monitoring_s": rel(self.first_state("monitoring")),
            "to_resolved_s": rel(self.first_state("resolved")),
            "to_escalated_s": rel(self.first_state("escalated")),
        }

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "root_service": self.root_service,
                "services": self.services, "opened_at": self.opened_at,
                "last_at": self.last_at, "commands": len(self.command_ids()),
                "reason": self.entries[-1]["reason"], **self.durations()}


def build_views(entries: Iterable[dict[str, Any]], acks: Iterable[dict[str, Any]] = (),
                commands: Iterable[dict[str, Any]] = ()) -> dict[str, IncidentView]:
    """Incident id -> view, entries de-duplicated by id and in timeline order."""
    seen: dict[str, dict[str, Any]] = {}
    for e in entries:
        if isinstance(e.get("id"), str) and isinstance(e.get("incident_id"), str):
            seen.setdefault(e["id"], e)
    views: dict[str, IncidentView] = {}
    for e in sorted(seen.values(), key=lambda e: (e["incident_id"], _seq(e["id"]))):
        views.setdefault(e["incident_id"], IncidentView(e["incident_id"])).entries.append(e)
    for c in commands:
        view = views.get(str(c.get("incident_id")))
        if view is not None and isinstance(c.get("id"), str):
            view.commands.setdefault(c["id"], c)
    for a in acks:
        cid = a.get("command_id")
        inc = cid.rsplit(":", 2)[0] if isinstance(cid, str) and cid.count(":") >= 2 else None
        if inc in views:
            views[inc].acks.append(a)
    return views


async def load_views(settings: Settings) -> dict[str, IncidentView]:
    entries, acks, commands = await asyncio.gather(
        read_topic(settings, "incidents"), read_topic(settings, "acks"),
        read_topic(settings, "commands"))
    return build_views(entries, acks, commands)


def format_list(views: dict[str, IncidentView]) -> str:
    if not views:
        return "no incidents"
    rows = [("INCIDENT", "STATE", "ROOT", "OPENED (UTC)", "CMDS", "LAST REASON")]
    import datetime as dt

    for view in sorted(views.values(), key=lambda v: v.opened_at):
        opened = dt.datetime.fromtimestamp(view.opened_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((view.id, view.state, view.root_service, opened,
                     str(len(view.command_ids())), view.entries[-1]["reason"][:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True))
                     + "  " + r[5] for r in rows)


def format_timeline(view: IncidentView) -> str:
    """The timeline as text: offset from opening, entry, state, reason; acks inline."""
    t0 = view.opened_at
    lines = [f"incident {view.id}: {view.state}, root {view.root_service}, services "
             f"{', '.join(view.services)}"]
    acks_by_cmd: dict[str, list[dict[str, Any]]] = {}
    for a in view.acks:
        acks_by_cmd.setdefault(str(a.get("command_id")), []).append(a)
    ack_lines_on_timeline = {e.get("command_id") for e in view.entries if e["entry"] == "ack"}
    for e in view.entries:
        at = float(e["at"])
        lines.append(f"  {at - t0:+8.1f}s  {e['entry']:<12} {e['state']:<10} {e['reason']}")
        cid = e.get("command_id")
        if e["entry"] in ("command", "restore_step") and cid:
            cmd = view.commands.get(cid)
            if cmd is not None:
                lines.append(f"  {'':9}  {'':12} {'':10}   id {cid}, expires "
                             f"{float(cmd['expires_at']) - float(cmd['issued_at']):g} s after "
                             f"issue, signed by {cmd.get('signature', {}).get('kid')}")
            if cid not in ack_lines_on_timeline:
                for a in sorted(acks_by_cmd.get(cid, []), key=lambda a: a.get("at", 0)):
                    lines.append(f"  {'':9}  {'ack':<12} {'':10} {a.get('service')}/"
                                 f"{a.get('instance')}: {a.get('status')} {a.get('reason', '')}")
    d = view.durations()
    parts = [f"{k.replace('_s', '').replace('_', ' ')} {v:g} s" for k, v in d.items()
             if v is not None]
    lines.append("durations from opening: " + ("; ".join(parts) if parts else "-"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plotting
def _value(window: dict[str, Any], signal: str) -> float | None:
    count = window.get("count") or 0
    if signal == "errors":
        return (window.get("errors", 0) / count) if count else None
    if signal == "latency":
        return window.get("p99")
    if signal == "traffic":
        return count / float(window.get("window_s") or 1.0)
    if signal.startswith("metric:"):
        return (window.get("metrics") or {}).get(signal.split(":", 1)[1])
    return None


_UNITS = {"errors": "error rate", "latency": "p99 ms", "traffic": "requests/s"}
_COLOURS = {"rollback": "tab:purple", "throttle": "tab:orange", "isolate": "tab:brown",
            "shed": "tab:olive", "restore": "tab:green"}


def plot_incident(view: IncidentView, windows: list[dict[str, Any]],
                  anomalies: list[dict[str, Any]], path: Path) -> Path:
    """Write the PNG described in the module docstring; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = {aid for e in view.entries for aid in (e.get("anomaly_ids") or [])}
    mine = [a for a in anomalies if a.get("id") in ids]
    panels: list[tuple[str, str]] = []
    for a in sorted(mine, key=lambda a: a.get("window_start", 0)):
        key = (str(a["series"]), str(a["signal"]))
        if key not in panels:
            panels.append(key)
    if not panels:  # no anomaly known (e.g. telemetry gap): show the root's traffic
        panels = [(f"{view.root_service}|*|", "traffic")]
    panels = panels[:MAX_PANELS]
    t0 = view.opened_at
    start, end = t0 - BASELINE_S, view.last_at + 60.0
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.4 * len(panels) + 0.6),
                             sharex=True, squeeze=False)
    for ax, (series, signal) in zip(axes[:, 0], panels, strict=True):
        svc, route, dep = (series.split("|") + ["", "", ""])[:3]
        pts: dict[float, dict[str, Any]] = {}
        for w in windows:
            ws = w.get("window_start")
            if w.get("service") != svc or not isinstance(ws, int | float) or \
                    not start <= ws <= end or (w.get("dependency") or "") != dep:
                continue
            if route not in ("*", w.get("route")):
                continue
            agg = pts.setdefault(float(ws), {"count": 0, "errors": 0, "p99": None,
                                             "window_s": w.get("window_s", 1.0),
                                             "metrics": w.get("metrics")})
            agg["count"] += w.get("count", 0)
            agg["errors"] += w.get("errors", 0)
            p99 = w.get("p99")
            if p99 is not None:
                agg["p99"] = p99 if agg["p99"] is None else max(agg["p99"], p99)
        xs = sorted(pts)
        ys = [_value(pts[x], signal) for x in xs]
        xy = [(x - t0, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if xy:
            ax.plot([p[0] for p in xy], [p[1] for p in xy], lw=1, color="tab:blue",
                    label=signal)
        before = [y for x, y in xy if x < 0]
        if len(before) >= 3:
            mean = sum(before) / len(before)
            sd = math.sqrt(sum((y - mean) ** 2 for y in before) / (len(before) - 1))
            ax.axhspan(max(0.0, mean - 3 * sd), mean + 3 * sd, color="tab:blue", alpha=0.12,
                       label="baseline (mean ± 3 sd before opening)")
        marks = [(float(a["window_start"]) - t0,
                  _value(pts[float(a["window_start"])], signal)
                  if float(a["window_start"]) in pts else None)
                 for a in mine if a["series"] == series and a["signal"] == signal]
        mx = [m for m in marks if m[1] is not None]
        if mx:
            ax.scatter([m[0] for m in mx], [m[1] for m in mx], color="tab:red", s=14,
                       zorder=3, label="anomaly")
        for e in view.entries:
            if e["entry"] in ("command", "restore_step"):
                kind = (e.get("details") or {}).get("kind") or \
                    str(e.get("command_id", "::")).rsplit(":", 2)[-2]
                ax.axvline(float(e["at"]) - t0, color=_COLOURS.get(kind, "grey"), ls="--",
                           lw=1)
            elif e["entry"] in ("resolved", "escalated"):
                ax.axvline(float(e["at"]) - t0, color="black", lw=1.2)
        ax.set_ylabel(_UNITS.get(signal, signal), fontsize=8)
        ax.set_title(f"{series} {signal}", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    from matplotlib.lines import Line2D

    for kind, colour in _COLOURS.items():
        handles[kind] = Line2D([0], [0], color=colour, ls="--", lw=1)
    axes[0, 0].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", ncol=4)
    axes[-1, 0].set_xlabel("seconds from incident opening (event time)")
    fig.suptitle(f"{view.id}: {view.state}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI bodies
def _not_ready(settings: Settings, command: str) -> str | None:
    """A one-line reason when the incidents cannot be read at all (Kafka unreachable, no
    topics yet), else None. Checked first: reading a missing topic failed deep inside the
    Kafka client with a traceback."""
    from app.topics import missing_topics

    topic = settings.topic("incidents")
    try:
        missing = asyncio.run(missing_topics(settings, [topic]))
    except RuntimeError as exc:
        return f"{command}: {exc}"
    if missing:
        return (f"{command}: no topic {topic} at {settings.bootstrap} yet: no worker has run "
                "against this broker (`stanch worker` creates the topics; check "
                "STANCH_TOPIC_PREFIX)")
    return None


def incidents_list_main(settings: Settings, as_json: bool = False) -> int:
    """``stanch incidents`` / ``stanch incidents list``; returns the exit code."""
    problem = _not_ready(settings, "stanch incidents")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    try:
        views = asyncio.run(load_views(settings))
    except (Exception, asyncio.CancelledError) as exc:  # aiokafka's stop() can raise the latter
        print(f"stanch incidents: cannot read {settings.topic('incidents')} at "
              f"{settings.bootstrap}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(orjson.dumps([v.summary() for v in sorted(views.values(),
                                                         key=lambda v: v.opened_at)]).decode())
    else:
        print(format_list(views))
    return 0


async def show_incident(settings: Settings, incident_id: str, plot_path: Path | None
                        ) -> tuple[IncidentView | None, Path | None]:
    views = await load_views(settings)
    view = views.get(incident_id)
    if view is None:
        return None, None
    if plot_path is None:
        return view, None
    windows, anomalies = await asyncio.gather(read_topic(settings, "windows"),
                                              read_topic(settings, "anomalies"))
    services = set(view.services)
    windows = [w for w in windows if w.get("service") in services]
    return view, plot_incident(view, windows, anomalies, plot_path)


def incidents_show_main(settings: Settings, incident_id: str, plot_path: Path | None = None,
                        as_json: bool = False, no_plot: bool = False) -> int:
    """``stanch incidents show ID``: the timeline on stdout and a PNG (default
    ``<ID>.png`` in the current directory); returns the exit code."""
    if plot_path is None and not no_plot:
        plot_path = Path(f"{incident_id.replace('/', '_')}.png")
    problem = _not_ready(settings, "stanch incidents show")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    try:
        view, written = asyncio.run(show_incident(settings, incident_id,
                                                  None if no_plot else plot_path))
    except (Exception, asyncio.CancelledError) as exc:
        print(f"stanch incidents show: {exc}", file=sys.stderr)
        return 1
    if view is None:
        print(f"stanch incidents show: no incident {incident_id!r} on "
              f"{settings.topic('incidents')}", file=sys.stderr)
        return 1
    if as_json:
        print(orjson.dumps({**view.summary(), "entries": view.entries, "acks": view.acks,
                            "plot": str(written) if written else None}).decode())
    else:
        print(format_timeline(view))
        if written:
            print(f"plot written to {written}")
    return 0
