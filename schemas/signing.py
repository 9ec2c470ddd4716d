"""Ed25519 signing and verification of enforcement commands and operator control.

Why this exists: a sidecar obeys commands that can throttle, shed, isolate or roll back
a production service. Only the mitigation agent holds a private key; sidecars hold
public keys only, so a compromised sidecar (or anyone who can write to the commands
topic) cannot forge a command. Several key ids may be trusted at once so keys can be
rotated without a flag day.

Wire form (DESIGN.md): the command dict carries ``signature = {kid, alg, sig}`` where
``alg == "ed25519"`` and ``sig`` is base64 of the Ed25519 signature over the canonical
JSON of every *other* field: orjson with sorted keys, no whitespace, UTF-8.

Operator control messages (stanch.control) are signed the same way, with operator keys
(a separate key set the worker trusts): ``sign_record`` / ``KeyRing.verify`` serve both.

Keys never live in code: they are PEM files (private key PKCS8, public key
SubjectPublicKeyInfo) whose paths come from settings.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ALG = "ed25519"
SIGNATURE_FIELD = "signature"
PUBLIC_KEY_SUFFIX = ".pub.pem"
PRIVATE_KEY_SUFFIX = ".key.pem"
_KID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SigningError(ValueError):
    """A command could not be signed or verified; ``reason`` is a short, stable text.

    The sidecar puts ``str(error)`` verbatim in the ``reason`` of a "rejected" ack, so the
    text names what is wrong (unknown kid, bad signature, wrong alg, malformed).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyFileError(SigningError):
    """A key file is missing, unreadable or not the expected kind of key."""


def validate_kid(kid: str) -> str:
    """Return ``kid`` if it is a safe key id (it becomes a file name), else raise."""
    if not isinstance(kid, str) or not _KID_RE.match(kid):
        raise SigningError(
            f"kid: {kid!r} is not a valid key id (1-64 chars of letters, digits, . _ -)"
        )
    return kid


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """Canonical bytes of every field except ``signature``: sorted keys, no whitespace.

    orjson output is deterministic for a given Python value (shortest float repr,
    UTF-8, no spaces), so signer and verifier agree byte for byte as long as they see
    the same JSON values. Verifiers must therefore hash the dict exactly as decoded from
    the wire, not a re-typed copy.
    """
    payload = {k: v for k, v in fields.items() if k != SIGNATURE_FIELD}
    try:
        return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # non-JSON value or non-str key
        raise SigningError(f"malformed: command is not JSON-serialisable ({exc})") from exc


def sign_command(
    fields: Mapping[str, Any], private_key: Ed25519PrivateKey, kid: str
) -> dict[str, Any]:
    """Return a copy of ``fields`` with ``signature = {kid, alg, sig}`` added.

    Any ``signature`` already present in ``fields`` is ignored and replaced. Works for
    any record signed this way (commands, control messages): see ``sign_record``.
    """
    validate_kid(kid)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SigningError("private_key: not an Ed25519 private key")
    message = canonical_json(fields)
    sig = base64.b64encode(private_key.sign(message)).decode("ascii")
    signed = {k: v for k, v in fields.items() if k != SIGNATURE_FIELD}
    signed[SIGNATURE_FIELD] = {"kid": kid, "alg": ALG, "sig": sig}
    return signed


#: The same operation for any signed record (an operator's control message).
sign_record = sign_command


# --------------------------------------------------------------------------- key files


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load a PKCS8 PEM Ed25519 private key (unencrypted) from ``path``."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM PKCS8 private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: private key is {type(key).__name__}, expected Ed25519")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a SubjectPublicKeyInfo PEM Ed25519 public key from ``path``."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM SubjectPublicKeyInfo public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: public key is {type(key).__name__}, expected Ed25519")
    return key


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS8 PEM bytes of a private key (unencrypted: protect the file with 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM bytes of a public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read_key_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror or exc})") from exc


# --------------------------------------------------------------------------- key ring


class KeyRing:
    """The public keys a sidecar trusts, by key id (several at once for rotation)."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for kid, key in (keys or {}).items():
            self.add(kid, key)

    @classmethod
    def from_dir(cls, directory: str | Path) -> KeyRing:
        """Trust every ``<kid>.pub.pem`` in ``directory`` (STANCH_TRUSTED_KEYS_DIR).

        An unreadable or wrong-kind file stops start-up with the file named, rather
        than silently trusting fewer keys than the operator meant.
        """
        root = Path(directory)
        if not root.is_dir():
            raise KeyFileError(f"{root}: trusted keys directory does not exist")
        ring = cls()
        for path in sorted(root.iterdir()):
            if path.name.endswith(PUBLIC_KEY_SUFFIX):
                kid = path.name[: -len(PUBLIC_KEY_SUFFIX)]
                ring.add(kid, load_public_key(path))
        return ring

    @classmethod
    def from_files(cls, files: Mapping[str, str | Path]) -> KeyRing:
        """Trust the public key files given as ``{kid: path}``."""
        return cls({kid: load_public_key(path) for kid, path in files.items()})

    def add(self, kid: str, key: Ed25519PublicKey) -> None:
        validate_kid(kid)
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{kid}: not an Ed25519 public key")
        self._keys[kid] = key

    def remove(self, kid: str) -> None:
        self._keys.pop(kid, None)

    @property
    def kids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def verify(self, command: Mapping[str, Any]) -> None:
        """Raise ``SigningError`` unless ``command`` carries a valid trusted signature.

        Reasons: "malformed: ...", "wrong alg: ...", "unknown kid: ...",
        "bad signature".
        """
        if not isinstance(command, Mapping):
            raise SigningError("malformed: command is not a JSON object")
        signature = command.get(SIGNATURE_FIELD)
        if not isinstance(signature, Mapping):
            raise SigningError("malformed: signature missing or not an object")
        kid, alg, sig = signature.get("kid"), signature.get("alg"), signature.get("sig")
        if not isinstance(kid, str) or not kid:
            raise SigningError("malformed: signature.kid missing")
        if not isinstance(sig, str) or not sig:
            raise SigningError("malformed: signature.sig missing")
        if alg != ALG:
            raise SigningError(f"wrong alg: {alg!r} (expected {ALG!r})")
        key = self._keys.get(kid)
        if key is None:
            raise SigningError(f"unknown kid: {kid!r}")
        try:
            raw = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SigningError("malformed: signature.sig is not base64") from exc
        if len(raw) != 64:
            raise SigningError("malformed: signature.sig is not 64 bytes")
        try:
            key.verify(raw, canonical_json(command))
        except InvalidSignature as exc:
            raise SigningError("bad signature") from exc


def keyring_from(keys: Iterable[tuple[str, Ed25519PublicKey]]) -> KeyRing:
    """Build a ring from ``(kid, public_key)`` pairs (handy in tests and wiring)."""
    return KeyRing(dict(keys))
