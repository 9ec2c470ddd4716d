"""``stanch worker``: the Faust worker process that runs every agent."""

from __future__ import annotations

import asyncio
import logging
import sys

import faust

from app.faust_app import create_app
from app.settings import Settings
from app.topics import ensure_topics

log = logging.getLogger(__name__)


def check_policy(settings: Settings) -> None:
    """Validate the mitigation policy before anything connects: a bad policy stops start-up."""
    from models.policy import PolicyError, load_policy

    try:
        load_policy(settings.policy_file)
    except PolicyError as exc:
        print(f"stanch worker: bad policy (STANCH_POLICY_FILE): {exc}", file=sys.stderr)
        sys.exit(2)


def run_worker(settings: Settings, *, loglevel: str = "info") -> None:
    """Check the policy, create the topics, then run until SIGINT/SIGTERM (does not return)."""
    check_policy(settings)
    try:
        asyncio.run(ensure_topics(settings))
    except RuntimeError as exc:
        hint = (
            " Start the embedded broker with `stanch broker`, or set STANCH_KAFKA_BOOTSTRAP."
            if settings.embedded
            else ""
        )
        print(f"stanch worker: {exc}.{hint}", file=sys.stderr)
        sys.exit(1)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
