"""The worker's web endpoints: health, Prometheus metrics and a JSON status page.

They run on Faust's own web server (``STANCH_WEB_PORT``), so nothing else listens. Every
agent module keeps a ``stats`` mapping of counters on an object it hangs on the app as
``app.stanch_<name>``; this module exports whatever it finds there, plus the dead-letter
counts by reason and, per agent, how long ago it last processed anything — the metric
that tells a silently stuck agent (faust-streaming #175) from an idle one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.faust_app import StanchApp

STARTED_AT = time.time()
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]+")


def _metric_name(text: str) -> str:
    return _NAME_RE.sub("_", text).strip("_").lower()


def agent_states(app: StanchApp) -> dict[str, Any]:
    """The ``app.stanch_<name>`` objects that carry agent statistics."""
    found = {}
    for attr in dir(app):
        if attr.startswith("stanch_") and attr != "stanch_deadletter_counts":
            value = getattr(app, attr, None)
            if value is not None and isinstance(getattr(value, "stats", None), Mapping):
                found[attr.removeprefix("stanch_")] = value
    return found


class StanchCollector(Collector):
    """Reads the live counters at scrape time (no double bookkeeping on the hot path)."""

    def __init__(self, app: StanchApp) -> None:
        self.app = app

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        dead = CounterMetricFamily(
            "stanch_deadletter", "Rejected input sent to the dead-letter topic", labels=["reason"]
        )
        for reason, count in sorted(getattr(self.app, "stanch_deadletter_counts", {}).items()):
            dead.add_metric([reason], count)
        yield dead
        for name, state in sorted(agent_states(self.app).items()):
            family = CounterMetricFamily(
                f"stanch_{_metric_name(name)}", f"Counters of the {name} agent", labels=["what"]
            )
            for key, value in sorted(state.stats.items()):
                if isinstance(value, int | float):
                    family.add_metric([_metric_name(str(key))], value)
            yield family
        uptime = GaugeMetricFamily("stanch_worker_uptime_seconds", "Seconds since start")
        uptime.add_metric([], time.time() - STARTED_AT)
        yield uptime


def task_health(app: StanchApp) -> dict[str, dict[str, Any]]:
    """Health of the long-running tasks that are not Faust agents: the incident decider
    and the mitigation view (each has ``health()``: state running/starting/stuck/failed)."""
    out = {}
    for name in ("decider", "mitigated"):
        obj = getattr(app, f"stanch_{name}", None)
        health = getattr(obj, "health", None)
        if callable(health):
            out["mitigation_view" if name == "mitigated" else name] = health()
    return out


def health(app: StanchApp) -> dict[str, Any]:
    """Failing when an agent crashed or a task failed or is stuck."""
    crashed = [agent.name for agent in app.agents.values() if agent.crashed]
    tasks = task_health(app)
    bad = sorted(name for name, h in tasks.items() if h.get("state") in ("failed", "stuck"))
    failing = bool(crashed or bad)
    return {"status": "failing" if failing else "ok", "crashed_agents": crashed,
            "failed_tasks": bad, "agents": sorted(agent.name for agent in app.agents.values()),
            "tasks": tasks}


def status(app: StanchApp) -> dict[str, Any]:
    settings = app.settings
    view = getattr(app, "stanch_mitigated", None)
    services = getattr(view, "services", None)
    return {
        "app_id": settings.app_id,
        "bootstrap": settings.bootstrap,
        "topic_prefix": settings.topic_prefix,
        "window_s": settings.window_s,
        "uptime_s": round(time.time() - STARTED_AT, 1),
        "agents": {name: dict(state.stats) for name, state in agent_states(app).items()},
        "deadletters": dict(getattr(app, "stanch_deadletter_counts", {})),
        "mitigated": services() if callable(services) else [],
        "tasks": task_health(app),
    }


def register(app: StanchApp) -> None:
    """Add /stanch/health, /stanch/status and /metrics to the worker's web server."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StanchCollector(app))

    @app.page("/stanch/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            body = health(app)
            return self.json(body, status=503 if body["status"] != "ok" else 200)

    @app.page("/stanch/status")
    class Status(View):
        async def get(self, request: Request) -> Response:
            return self.json(status(app))

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(registry),
                              content_type="text/plain; version=0.0.4")
