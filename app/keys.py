"""Key pair generation for command and operator signing (`stanch keys generate`).

Why: the mitigation agent needs a private key and every sidecar the matching public
key; operators must be able to make a pair without writing code or copying keys from
the repository. The private key file is created with mode 0600 from the start (never
world-readable, not even briefly).
"""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.signing import (
    PRIVATE_KEY_SUFFIX,
    PUBLIC_KEY_SUFFIX,
    private_key_pem,
    public_key_pem,
    validate_kid,
)


def generate_keypair(
    out_dir: str | Path, kid: str, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``<kid>.key.pem`` (0600, PKCS8) and ``<kid>.pub.pem`` in ``out_dir``.

    Returns ``(private_path, public_path)``. Refuses to overwrite an existing private
    key unless ``overwrite`` (losing a live signing key is an outage of mitigation).
    """
    validate_kid(kid)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    private_path = root / f"{kid}{PRIVATE_KEY_SUFFIX}"
    public_path = root / f"{kid}{PUBLIC_KEY_SUFFIX}"
    if private_path.exists() and not overwrite:
        raise FileExistsError(f"{private_path}: key already exists (use overwrite)")
    key = Ed25519PrivateKey.generate()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(private_path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing file
        os.write(fd, private_key_pem(key))
    finally:
        os.close(fd)
    public_path.write_bytes(public_key_pem(key.public_key()))
    return private_path, public_path


def default_operator_kid() -> str:
    """``op-<user>``: a kid that says whose key signed a control message."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "operator"
    return validate_kid(("op-" + re.sub(r"[^A-Za-z0-9._-]", "-", user))[:64])
