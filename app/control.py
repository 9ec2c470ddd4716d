"""Operator control: ``stanch approve TARGET``, ``stanch pause``, ``stanch resume``, dry-run.

Why a topic and not an HTTP call to the worker: the one mitigation decision-maker may
move between workers (Kafka reassigns its input partition), and operator actions must
be applied in order and survive a restart of the worker. stanch.control has one
partition; the decider reads it in order and records the message in its snapshot.

Why signed: whoever can write to stanch.control would otherwise be an operator (an
unsigned ``approve`` released a rollback at once). Every control message carries an
Ed25519 signature by an operator key (``schemas.signing``, the same canonical JSON as
commands); the worker trusts the public keys of STANCH_TRUSTED_OPERATOR_KEYS_DIR, a key
set separate from the mitigation key's (a sidecar's trusted keys cannot approve, an
operator key cannot sign a command). ``ControlGuard`` is the worker's check: unsigned,
forged or untrusted, replayed (an id seen before) and expired (``at`` too old, or too
far ahead, judged against the time the message reached the decider's input) control
is dead-lettered with the reason and changes nothing.

Without STANCH_TRUSTED_OPERATOR_KEYS_DIR the worker generates a local operator key pair
once in ``<data_dir>/keys/operator`` (private key mode 0600) and trusts it; the CLI on
the same host, with the same STANCH_DATA_DIR, signs with it. Elsewhere operators make
their own pair (``stanch keys generate --operator``) and set STANCH_OPERATOR_KEY_FILE.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.settings import Settings
from schemas.records import CONTROL_ACTIONS, ControlMessage
from schemas.signing import (
    PRIVATE_KEY_SUFFIX,
    SIGNATURE_FIELD,
    KeyRing,
    SigningError,
    load_private_key,
    sign_record,
    validate_kid,
)

log = logging.getLogger(__name__)

#: CLI spelling -> wire action.
ACTIONS: dict[str, str] = {
    "approve": "approve",
    "pause": "pause",
    "resume": "resume",
    "dry-run-on": "dry_run_on",
    "dry-run-off": "dry_run_off",
}
LOCAL_OPERATOR_KID = "operator-local"
#: Seen control ids kept before pruning (only ids that could still pass the age check
#: are kept after a prune; this bounds the work, not the protection).
SEEN_PRUNE_AT = 4096


# ------------------------------------------------------------------------------ keys
def local_operator_dir(settings: Settings) -> Path:
    """Where the worker's generated operator key pair lives (embedded/demo use)."""
    return Path(settings.data_dir) / "keys" / "operator"


def operator_signing_key(settings: Settings) -> tuple[Ed25519PrivateKey, str]:
    """(private key, kid) the CLI signs with; ValueError naming what to set if none."""
    if settings.operator_key_file is not None:
        path = Path(settings.operator_key_file)
        kid = settings.operator_kid or (path.name[: -len(PRIVATE_KEY_SUFFIX)]
                                        if path.name.endswith(PRIVATE_KEY_SUFFIX)
                                        else path.stem)
        try:
            return load_private_key(path), validate_kid(kid)
        except SigningError as exc:
            raise ValueError(f"STANCH_OPERATOR_KEY_FILE / STANCH_OPERATOR_KID: {exc}") from None
    kid = settings.operator_kid or LOCAL_OPERATOR_KID
    local = local_operator_dir(settings) / f"{kid}{PRIVATE_KEY_SUFFIX}"
    if not local.exists():
        raise ValueError(
            "no operator key: set STANCH_OPERATOR_KEY_FILE to a key made with `stanch keys "
            "generate --operator` (its .pub.pem in the worker's "
            f"STANCH_TRUSTED_OPERATOR_KEYS_DIR), or run on the worker's host ({local} missing)")
    try:
        return load_private_key(local), kid
    except SigningError as exc:
        raise ValueError(f"local operator key: {exc}") from None


def operator_keyring(settings: Settings) -> KeyRing:
    """The operator public keys the worker trusts (generates the local pair if needed)."""
    if settings.trusted_operator_keys_dir is not None:
        ring = KeyRing.from_dir(settings.trusted_operator_keys_dir)
        if not len(ring):
            log.warning("STANCH_TRUSTED_OPERATOR_KEYS_DIR=%s holds no *.pub.pem: every "
                        "control message will be dead-lettered",
                        settings.trusted_operator_keys_dir)
        return ring
    from app.keys import generate_keypair

    folder = local_operator_dir(settings)
    private = folder / f"{LOCAL_OPERATOR_KID}{PRIVATE_KEY_SUFFIX}"
    if not private.exists():
        generate_keypair(folder, LOCAL_OPERATOR_KID)
        log.warning("no STANCH_TRUSTED_OPERATOR_KEYS_DIR: generated operator key %s (kid %s); "
                    "the CLI on this host signs control with it", private, LOCAL_OPERATOR_KID)
    return KeyRing.from_dir(folder)


# --------------------------------------------------------------------------- the guard
class ControlRejected(ValueError):
    """A control message that must change nothing; ``category`` is the dead-letter key."""

    def __init__(self, reason: str, category: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


class ControlGuard:
    """The worker's check of one control message (see the module docstring).

    ``arrived`` is when the message reached the decider's input (the input record's
    timestamp), so the verdict is the same when the decider replays it after a restart.
    The seen ids are part of the decider's snapshot (``to_state``)."""

    def __init__(self, ring: KeyRing, max_age_s: float, max_skew_s: float) -> None:
        self.ring = ring
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self._seen: dict[str, float] = {}  # id -> at

    def check(self, item: Any, arrived: float) -> tuple[dict[str, Any], str]:
        """(validated control dict, signing kid), or raise ControlRejected/SchemaError."""
        if not isinstance(item, dict):
            raise ControlRejected("malformed: not a JSON object", "schema")
        if item.get(SIGNATURE_FIELD) is None:
            raise ControlRejected("unsigned: control must be signed by a trusted operator "
                                  "key (stanch keys generate --operator)", "unsigned")
        try:
            self.ring.verify(item)
        except SigningError as exc:
            raise ControlRejected(f"forged or untrusted: {exc.reason}", "forged") from None
        record = ControlMessage.from_dict(item).to_dict()
        at = float(record["at"])
        if at > arrived + self.max_skew_s:
            raise ControlRejected(f"future: at is {at - arrived:.0f} s after it arrived "
                                  f"(max skew {self.max_skew_s:g} s)", "future")
        if at < arrived - self.max_age_s:
            raise ControlRejected(f"expired: at is {arrived - at:.0f} s before it arrived "
                                  f"(max age {self.max_age_s:g} s)", "expired")
        if record["id"] in self._seen:
            raise ControlRejected(f"replayed: id {record['id']} was seen before", "replayed")
        self._seen[record["id"]] = at
        if len(self._seen) > SEEN_PRUNE_AT:
            # an id older than the max age is refused as expired anyway (at is signed)
            horizon = arrived - self.max_age_s - self.max_skew_s
            self._seen = {k: v for k, v in self._seen.items() if v >= horizon}
        return record, str(item[SIGNATURE_FIELD].get("kid"))

    def to_state(self) -> dict[str, float]:
        return dict(self._seen)

    def load_state(self, seen: dict[str, Any] | None) -> None:
        self._seen = {str(k): float(v) for k, v in (seen or {}).items()}


# ---------------------------------------------------------------------------- the CLI
def build_control(action: str, *, target: str | None = None, operator: str | None = None,
                  reason: str | None = None, at: float | None = None,
                  key: Ed25519PrivateKey | None = None, kid: str | None = None
                  ) -> dict[str, Any]:
    """A validated, signed control message; raises ValueError naming the problem.

    Without ``key`` the message is unsigned (only useful to show that the worker
    refuses it)."""
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
    fields = ControlMessage(id=f"ctl-{uuid.uuid4().hex}", action=wire,
                            at=float(at if at is not None else time.time()),
                            target=target or None, operator=operator or None,
                            reason=reason or None).to_dict()
    fields.pop(SIGNATURE_FIELD, None)
    if key is None:
        return fields
    signed = sign_record(fields, key, kid or LOCAL_OPERATOR_KID)
    ControlMessage.from_dict(signed)  # one the worker's schema would refuse is a bug here
    return signed


async def publish_control(settings: Settings, action: str, *, target: str | None = None,
                          operator: str | None = None, reason: str | None = None
                          ) -> dict[str, Any]:
    """Sign (operator key of ``settings``) and publish one control message; wait until
    the broker has it."""
    key, kid = operator_signing_key(settings)
    message = build_control(action, target=target, operator=operator, reason=reason,
                            key=key, kid=kid)
    await publish_raw_control(settings, message)
    return message


async def publish_raw_control(settings: Settings, message: dict[str, Any]) -> None:
    """Publish ``message`` as it is (tests use it for unsigned and forged control)."""
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic("control"), value=orjson.dumps(message),
                                     key=b"control")
    finally:
        await producer.stop()


def send_control(settings: Settings, action: str, *, target: str | None = None,
                 operator: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """Synchronous ``publish_control`` for the CLI."""
    return asyncio.run(publish_control(settings, action, target=target, operator=operator,
                                       reason=reason))


def describe(message: dict[str, Any]) -> str:
    """What a control message asks for, in words."""
    action = message["action"]
    if action == "approve":
        return f"approve {message.get('target')}"
    return {"pause": "pause mitigation (kill switch)", "resume": "resume mitigation",
            "dry_run_on": "turn dry-run on", "dry_run_off": "turn dry-run off"}[action]


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
    sig = message[SIGNATURE_FIELD]
    print(f"sent to {settings.topic('control')}: {describe(message)} as "
          f"{message.get('operator')} (id {message['id']}, signed with key {sig['kid']}); "
          "the decider applies it in order: `stanch status` shows the mode")
    return 0
