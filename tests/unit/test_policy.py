"""The TOML policy: safe defaults, the example file, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from models.policy import Policy, PolicyError, load_policy, policy_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "policy.example.toml"


def test_no_file_means_safe_defaults() -> None:
    p = load_policy(None)
    assert p == Policy()
    assert p.safeguards.lease_s <= 120 and p.safeguards.renew_every_s < p.safeguards.lease_s
    assert p.safeguards.max_active >= 1 and p.safeguards.cooldown_s > 0
    assert 0 < p.safeguards.storm_share <= 1
    assert p.rollback.require_confirmed


def test_example_file_loads_and_sets_every_default_key() -> None:
    p = load_policy(EXAMPLE)
    raw = tomllib.loads(EXAMPLE.read_text())
    default = Policy()
    for section in ("incidents", "rollback", "throttle", "isolate", "shed", "restore",
                    "verify", "safeguards"):
        names = {f.name for f in dataclasses.fields(getattr(default, section))}
        assert names == set(raw[section]), f"example must document every key of [{section}]"
    assert p.shed.low_priority_routes["search"] == ("/suggest",)
    assert not p.allows("payments", "throttle") and p.allows("payments", "rollback")
    assert not p.allows("ledger", "rollback")
    assert p.headroom_for("search") == 0.5 and p.headroom_for("gateway") == 0.2
    assert p.cooldown_for("payments") == 600.0


def test_example_values_equal_the_defaults_for_the_fleet_wide_tables() -> None:
    p = load_policy(EXAMPLE)
    for section in ("incidents", "rollback", "throttle", "isolate", "restore", "verify",
                    "safeguards"):
        assert getattr(p, section) == getattr(Policy(), section), section


@pytest.mark.parametrize("raw, key, reason", [
    ({"safeguards": {"lease": 5}}, "safeguards.lease", "unknown key"),
    ({"mitigation": {}}, "mitigation", "unknown table"),
    ({"safeguards": {"max_active": -1}}, "safeguards.max_active", ">= 0"),
    ({"safeguards": {"max_active": 2.5}}, "safeguards.max_active", "integer"),
    ({"safeguards": {"dry_run": "yes"}}, "safeguards.dry_run", "true or false"),
    ({"safeguards": {"lease_s": 0}}, "safeguards.lease_s", "> 0"),
    ({"safeguards": {"storm_share": 1.5}}, "safeguards.storm_share", "<= 1"),
    ({"throttle": {"headroom": True}}, "throttle.headroom", "number"),
    ({"rollback": {"kinds": ["deploy", "reboot"]}}, "rollback.kinds[1]", "one of"),
    ({"rollback": {"kinds": "deploy"}}, "rollback.kinds", "array"),
    ({"shed": {"low_priority_routes": {"search": [1]}}}, "shed.low_priority_routes.search[0]",
     "string"),
    ({"restore": "fast"}, "restore", "table"),
    ({"services": {"payments": {"allow": ["nuke"]}}}, "services.payments.allow[0]", "one of"),
    ({"services": {"payments": {"colour": "red"}}}, "services.payments.colour", "unknown key"),
    ({"safeguards": {"renew_every_s": 60.0}}, "safeguards.renew_every_s", "lease_s"),
    ({"restore": {"step_factor": 1.0}}, "restore.step_factor", "> 1"),
])
def test_bad_values_name_the_key_and_the_problem(raw: dict, key: str, reason: str) -> None:
    with pytest.raises(PolicyError) as exc:
        policy_from_dict(raw)
    assert exc.value.key == key
    assert reason in exc.value.reason
    assert key in str(exc.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("[safeguards]\nmax_active = -3\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(bad)
    assert str(bad) in str(exc.value) and "safeguards.max_active" in str(exc.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("[safeguards\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(broken)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy(binary)


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[safeguards]\ndry_run = true\nmax_active = 2\n[throttle]\nheadroom = 1\n")
    p = load_policy(f)
    assert p.safeguards.dry_run and p.safeguards.max_active == 2
    assert p.throttle.headroom == 1.0 and isinstance(p.throttle.headroom, float)
    assert p.safeguards.lease_s == Policy().safeguards.lease_s
    assert p.rollback == Policy().rollback


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Policy().safeguards.dry_run = True  # type: ignore[misc]


def test_verify_section_is_validated() -> None:
    p = policy_from_dict({"verify": {"settle_s": 5.0, "compare_windows": 10},
                          "isolate": {"min_failure_share": 0.7}})
    assert p.verify.settle_s == 5.0 and p.verify.compare_windows == 10
    assert p.isolate.min_failure_share == 0.7
    with pytest.raises(PolicyError, match="verify.worse_z"):
        policy_from_dict({"verify": {"worse_z": 0}})
    with pytest.raises(PolicyError, match="verify.compare_windows"):
        policy_from_dict({"verify": {"compare_windows": 2.5}})
    with pytest.raises(PolicyError, match="isolate.min_failure_share"):
        policy_from_dict({"isolate": {"min_failure_share": 1.5}})
