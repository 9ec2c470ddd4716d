"""Canonical JSON, Ed25519 sign/verify, key files and key-ring rotation."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from app.keys import generate_keypair
from schemas.signing import (
    KeyFileError,
    KeyRing,
    SigningError,
    canonical_json,
    load_private_key,
    load_public_key,
    sign_command,
)


def command_fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "id": "inc-1:throttle:1",
        "kind": "throttle",
        "service": "checkout",
        "target": "checkout",
        "params": {"rate_per_s": 50.0, "route": "/orders/{id}"},
        "incident_id": "inc-1",
        "issued_at": 1_700_000_000.25,
        "expires_at": 1_700_000_060.25,
        "reason": "latency p99 x4 on /orders/{id}",
    }
    fields.update(overrides)
    return fields


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_canonical_json_is_sorted_compact_utf8_and_ignores_signature() -> None:
    data = {"b": 1, "a": {"z": "é", "y": [1, 2]}, "signature": {"kid": "x"}}
    assert canonical_json(data) == '{"a":{"y":[1,2],"z":"é"},"b":1}'.encode()


def test_canonical_json_rejects_non_json_values() -> None:
    with pytest.raises(SigningError, match="malformed"):
        canonical_json({"a": object()})


def test_sign_then_verify_roundtrip_through_the_wire(key: Ed25519PrivateKey) -> None:
    signed = sign_command(command_fields(), key, "k1")
    assert signed["signature"]["alg"] == "ed25519"
    assert signed["signature"]["kid"] == "k1"
    assert len(base64.b64decode(signed["signature"]["sig"])) == 64
    wire = orjson.loads(orjson.dumps(signed))  # what a sidecar decodes
    KeyRing({"k1": key.public_key()}).verify(wire)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "rollback"),
        ("service", "payments"),
        ("expires_at", 1_800_000_000.0),
        ("params", {"rate_per_s": 5000.0, "route": "/orders/{id}"}),
        ("id", "inc-1:throttle:2"),
    ],
)
def test_tampered_field_is_a_bad_signature(
    key: Ed25519PrivateKey, field: str, value: object
) -> None:
    signed = sign_command(command_fields(), key, "k1")
    signed[field] = value
    with pytest.raises(SigningError, match="bad signature"):
        KeyRing({"k1": key.public_key()}).verify(signed)


def test_forged_with_another_key_under_a_trusted_kid_is_rejected(
    key: Ed25519PrivateKey,
) -> None:
    forged = sign_command(command_fields(), Ed25519PrivateKey.generate(), "k1")
    with pytest.raises(SigningError, match="bad signature"):
        KeyRing({"k1": key.public_key()}).verify(forged)


def test_unknown_kid_wrong_alg_and_malformed(key: Ed25519PrivateKey) -> None:
    ring = KeyRing({"k1": key.public_key()})
    signed = sign_command(command_fields(), key, "k2")
    with pytest.raises(SigningError, match="unknown kid: 'k2'"):
        ring.verify(signed)
    wrong_alg = sign_command(command_fields(), key, "k1")
    wrong_alg["signature"]["alg"] = "rsa"
    with pytest.raises(SigningError, match="wrong alg"):
        ring.verify(wrong_alg)
    unsigned = command_fields()
    with pytest.raises(SigningError, match="malformed: signature missing"):
        ring.verify(unsigned)
    not_b64 = sign_command(command_fields(), key, "k1")
    not_b64["signature"]["sig"] = "***"
    with pytest.raises(SigningError, match="not base64"):
        ring.verify(not_b64)
    short = sign_command(command_fields(), key, "k1")
    short["signature"]["sig"] = base64.b64encode(b"x" * 10).decode()
    with pytest.raises(SigningError, match="64 bytes"):
        ring.verify(short)
    with pytest.raises(SigningError, match="not a JSON object"):
        ring.verify(["not", "a", "dict"])  # type: ignore[arg-type]


def test_key_ring_rotation_trusts_several_kids_then_retires_one() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ring = KeyRing({"old": old.public_key(), "new": new.public_key()})
    ring.verify(sign_command(command_fields(), old, "old"))
    ring.verify(sign_command(command_fields(), new, "new"))
    ring.remove("old")
    assert ring.kids == ["new"]
    with pytest.raises(SigningError, match="unknown kid"):
        ring.verify(sign_command(command_fields(), old, "old"))


def test_generate_keypair_files_load_and_are_private(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path / "keys", "mitigation-2024")
    assert private_path.name == "mitigation-2024.key.pem"
    assert public_path.name == "mitigation-2024.pub.pem"
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private_path.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public_path.read_bytes()
    private = load_private_key(private_path)
    ring = KeyRing.from_dir(tmp_path / "keys")
    assert ring.kids == ["mitigation-2024"]
    ring.verify(sign_command(command_fields(), private, "mitigation-2024"))
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "keys", "mitigation-2024")


def test_key_loading_errors_name_the_file(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path, "k1")
    with pytest.raises(KeyFileError, match="not a PEM SubjectPublicKeyInfo"):
        load_public_key(private_path)
    with pytest.raises(KeyFileError, match="not a PEM PKCS8"):
        load_private_key(public_path)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_public_key(tmp_path / "missing.pub.pem")
    with pytest.raises(KeyFileError, match="does not exist"):
        KeyRing.from_dir(tmp_path / "nope")
    with pytest.raises(SigningError, match="valid key id"):
        generate_keypair(tmp_path, "../escape")


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(params=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_any_json_params_survive_the_wire(params: dict[str, object]) -> None:
    key = _PROPERTY_KEY
    signed = sign_command(command_fields(params=params), key, "k1")
    KeyRing({"k1": key.public_key()}).verify(orjson.loads(orjson.dumps(signed)))


_PROPERTY_KEY = Ed25519PrivateKey.generate()
