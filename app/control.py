"""Operator control: ``stanch approve TARGET``, ``stanch pause``, ``stanch resume``, dry-run.

Why a topic and not an HTTP call to the worker: the one mitigation decision-maker may
move between workers (Kafka reassigns its input partition), and operator actions must
be applied in order and survive a restart of the worker. stanch.control has one
partition; the decider reads it in order and records the message in its snapshot.

Each message gets a unique id; ``at`` is the operator's wall clock (informational:
the decider applies control at its event time, in input order).
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from app.settings import Settings
from schemas.records import CONTROL_ACTIONS, ControlMessage

#: CLI spelling -> wire action.
ACTIONS: dict[str, str] = {
    "approve": "approve",
    "pause": "pause",
    "resume": "resume",
    "dry-run-on": "dry_run_on",
    "dry-run-off": "dry_run_off",
}


def build_control(action: str, *, target: str | None = None, operator: str | None = None,
                  reason: str | None = None, at: float | None = None) -> dict[str, Any]:
    """A validated control message; raises ValueError naming the problem."""
    import time

    wire = ACTIONS.get(action, action)
    if wire not in CONTROL_ACTIONS:
        raise ValueError(f"action={action!r}: must be one of {', '.join(ACTIONS)}")
    if wire == "approve" and not target:
        raise ValueError("approve needs a TARGET: an incident id or a command id")
    if operator is None:
        try:
            operator = getpass.getuser()
        except Exception:  # no user name in some containers
            operator = "operator"
    msg = ControlMessage(id=f"ctl-{uuid.uuid4().hex}", action=wire,
                         at=float(at if at is not None else time.time()),
                         target=target or None, operator=operator or None,
                         reason=reason or None)
    return msg.validate().to_dict()


async def publish_control(settings: Settings, action: str, *, target: str | None = None,
                          operator: str | None = None, reason: str | None = None
                          ) -> dict[str, Any]:
    """Publish one control message and wait until the broker has it."""
    message = build_control(action, target=target, operator=operator, reason=reason)
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic("control"), value=orjson.dumps(message),
                                     key=b"control")
    finally:
        await producer.stop()
    return message


def send_control(settings: Settings, action: str, *, target: str | None = None,
                 operator: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """Synchronous ``publish_control`` for the CLI."""
    return asyncio.run(publish_control(settings, action, target=target, operator=operator,
                                       reason=reason))


def control_main(settings: Settings, action: str, target: str | None = None,
                 reason: str | None = None) -> int:
    """The body of ``stanch approve|pause|resume`` (and dry-run toggles); exit code."""
    import sys

    try:
        message = send_control(settings, action, target=target, reason=reason)
    except ValueError as exc:
        print(f"stanch {action}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # broker unreachable and friends
        print(f"stanch {action}: could not publish to {settings.topic('control')} at "
              f"{settings.bootstrap}: {exc}", file=sys.stderr)
        return 1
    what = f" {message['target']}" if message.get("target") else ""
    print(f"{message['action']}{what}: sent ({message['id']})")
    return 0
