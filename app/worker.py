"""``stanch worker``: the Faust worker process that runs every agent."""

from __future__ import annotations

import asyncio
import logging

import faust

from app.faust_app import create_app
from app.settings import Settings
from app.topics import ensure_topics

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, loglevel: str = "info") -> None:
    """Create the topics, then run the worker until SIGINT/SIGTERM (does not return)."""
    asyncio.run(ensure_topics(settings))
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
