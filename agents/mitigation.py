"""The mitigation agent: Mitigator decisions -> signed commands on stanch.commands.

Why it is wired into the incident decider rather than running on its own: the
Mitigator reads and writes the IncidentBook (it moves incidents to mitigating,
monitoring, resolved) and both must see the same inputs in the same order, so they
share one snapshot and one input partition (agents.incidents explains the replay
guarantees). This module adds what only mitigation needs:

- the policy's Mitigator (``models.mitigation``), created on every (re)assignment and
  restored from the decider's snapshot, so a restarted worker re-decides with the same
  sequence counters and therefore the same command ids;
- the signing key. Only this agent holds a private key. It comes from
  STANCH_SIGNING_KEY_FILE (+ STANCH_SIGNING_KID, default: the file name without
  ``.key.pem``); with none configured a key pair is generated once into
  ``<data_dir>/keys`` (kid ``stanch-local``) and reused on restart, and the log says
  where the public key is so sidecars can trust it;
- operator control: stanch.control is forwarded onto the decider's input, in order;
  every message must be signed by an operator key of STANCH_TRUSTED_OPERATOR_KEYS_DIR
  (or the local operator key, app.control), checked by the decider.

Clock of the commands: ``issued_at`` is the event time of the decision (the latest
window_start the decider saw), ``expires_at = issued_at + lease_s``. Enforcers compare
leases with the clock of the data they serve: sidecars with the wall clock (event
time there is wall time, a few seconds behind), the simulator with its simulated
clock, which is what the event time is when the simulator produces the data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agents.incidents import Decider, forward_topic
from models.mitigation import Decision, Mitigator
from models.policy import Policy
from schemas.records import Command
from schemas.signing import (
    PRIVATE_KEY_SUFFIX,
    PUBLIC_KEY_SUFFIX,
    SigningError,
    load_private_key,
    sign_command,
    validate_kid,
)

if TYPE_CHECKING:
    from app.faust_app import StanchApp
    from app.settings import Settings

log = logging.getLogger(__name__)

LOCAL_KID = "stanch-local"


def local_keys_dir(settings: Settings) -> Path:
    """Where the generated (embedded/demo) key pair lives."""
    return Path(settings.data_dir) / "keys"


def load_signing_key(settings: Settings) -> tuple[Ed25519PrivateKey, str]:
    """(private key, kid) from settings, or a generated local pair (logged clearly)."""
    if settings.signing_key_file is not None:
        path = Path(settings.signing_key_file)
        kid = settings.signing_kid
        if kid is None:
            name = path.name
            kid = name[: -len(PRIVATE_KEY_SUFFIX)] if name.endswith(PRIVATE_KEY_SUFFIX) \
                else path.stem
        try:
            validate_kid(kid)
            return load_private_key(path), kid
        except SigningError as exc:
            raise SystemExit(f"stanch: STANCH_SIGNING_KEY_FILE / STANCH_SIGNING_KID: {exc}") \
                from None
    from app.keys import generate_keypair

    kid = settings.signing_kid or LOCAL_KID
    folder = local_keys_dir(settings)
    private = folder / f"{kid}{PRIVATE_KEY_SUFFIX}"
    if not private.exists():
        private, public = generate_keypair(folder, kid)
        log.warning("no STANCH_SIGNING_KEY_FILE: generated signing key %s (kid %s); sidecars "
                    "must trust %s (STANCH_TRUSTED_KEYS_DIR=%s)", private, kid, public, folder)
    else:
        log.warning("no STANCH_SIGNING_KEY_FILE: using local signing key %s (kid %s); public "
                    "key %s", private, kid, folder / f"{kid}{PUBLIC_KEY_SUFFIX}")
    try:
        return load_private_key(private), kid
    except SigningError as exc:
        raise SystemExit(f"stanch: local signing key: {exc}") from None


def make_signer(private_key: Ed25519PrivateKey, kid: str) -> Any:
    """decision, issued_at -> the signed command dict (validated against the schema).

    Ed25519 signatures are deterministic, so the same decision at the same event time
    gives byte-identical commands: a replay after a crash re-sends the same thing."""

    def sign(decision: Decision, issued_at: float) -> dict[str, Any]:
        signed = sign_command(decision.to_command(issued_at), private_key, kid)
        Command.from_dict(signed)  # a command the sidecars would reject is a bug here
        return signed

    return sign


def register(app: StanchApp) -> None:
    """Attach the Mitigator and the signer to the decider; forward stanch.control."""
    decider: Decider | None = getattr(app, "stanch_decider", None)
    if decider is None:
        raise RuntimeError("agents.mitigation needs agents.incidents registered first")
    private_key, kid = load_signing_key(app.settings)
    decider.signer = make_signer(private_key, kid)
    from app.control import operator_keyring

    try:
        decider.operator_keys = operator_keyring(app.settings)
    except SigningError as exc:
        raise SystemExit(f"stanch: STANCH_TRUSTED_OPERATOR_KEYS_DIR: {exc}") from None

    def new_mitigator(policy: Policy) -> Mitigator:
        return Mitigator(policy)

    decider.mitigator_factory = new_mitigator
    forward_topic(app, "control", "control")
    log.info("mitigation agent: signing with kid %s; policy dry_run=%s approval=%s (they "
             "hold at start-up; operator toggles after that); operator keys: %s",
             kid, decider.policy.safeguards.dry_run, decider.policy.safeguards.approval,
             ", ".join(decider.operator_keys.kids) or "none")
