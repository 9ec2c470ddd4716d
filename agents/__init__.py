"""Faust agents: thin wiring of topics -> models -> topics.

Each module exposes ``register(app)``; ``register_all`` wires every agent that exists.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.faust_app import StanchApp

log = logging.getLogger(__name__)

#: Agent modules in pipeline order.
AGENT_MODULES: tuple[str, ...] = (
    "agents.aggregation",
    "agents.detection",
    "agents.incidents",
    "agents.mitigation",
)


def register_all(app: StanchApp) -> None:
    for name in AGENT_MODULES:
        importlib.import_module(name).register(app)
