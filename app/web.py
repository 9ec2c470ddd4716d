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
        if attr.startswith("stanch_") and attr not in ("stanch_deadletter_counts",
                                                       "stanch_mitigated"):
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


def status(app: StanchApp) -> dict[str, Any]:
    settings = app.settings
    return {
        "app_id": settings.app_id,
        "bootstrap": settings.bootstrap,
        "topic_prefix": settings.topic_prefix,
        "window_s": settings.window_s,
        "uptime_s": round(time.time() - STARTED_AT, 1),
        "agents": {name: dict(state.stats) for name, state in agent_states(app).items()},
        "deadletters": dict(getattr(app, "stanch_deadletter_counts", {})),
    }


def register(app: StanchApp) -> None:
    """Add /stanch/health, /stanch/status and /metrics to the worker's web server."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StanchCollector(app))

    @app.page("/stanch/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            crashed = [
                agent.name for agent in app.agents.values() if agent.crashed
            ]
            body = {"status": "failing" if crashed else "ok", "crashed_agents": crashed}
            return self.json(body, status=503 if crashed else 200)

    @app.page("/stanch/status")
    class Status(View):
        async def get(self, request: Request) -> Response:
            return self.json(status(app))

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(registry),
                              content_type="text/plain; version=0.0.4")
