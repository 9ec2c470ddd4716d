"""Settings: every bad value stops start-up with the variable's name and the problem."""

from __future__ import annotations

import pytest

from app.settings import TOPIC_NAMES, Settings, SettingsError, load_settings


def test_defaults_use_embedded_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("STANCH_"):
            monkeypatch.delenv(key)
    s = load_settings()
    assert s.embedded
    assert s.bootstrap == "127.0.0.1:9092"
    assert s.topic("requests") == "stanch.requests"
    assert s.window_s == 1.0
    assert s.aiokafka_kwargs() == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_env_vars_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", "k1:9093, k2:9094")
    monkeypatch.setenv("STANCH_TOPIC_PREFIX", "prod.")
    monkeypatch.setenv("STANCH_PARTITIONS", "12")
    monkeypatch.setenv("STANCH_WINDOW_S", "5")
    s = load_settings()
    assert s.bootstrap == "k1:9093,k2:9094"
    assert not s.embedded
    assert s.topic("anomalies") == "prod.anomalies"
    assert s.partitions == 12
    assert s.window_s == 5.0


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("STANCH_PARTITIONS", "0", "STANCH_PARTITIONS"),
        ("STANCH_PARTITIONS", "many", "STANCH_PARTITIONS"),
        ("STANCH_WINDOW_S", "-1", "STANCH_WINDOW_S"),
        ("STANCH_WINDOW_S", "nan", "STANCH_WINDOW_S"),
        ("STANCH_BROKER_PORT", "70000", "STANCH_BROKER_PORT"),
        ("STANCH_KAFKA_BOOTSTRAP", "no-port-here", "STANCH_KAFKA_BOOTSTRAP"),
        ("STANCH_KAFKA_BOOTSTRAP", "host:99999", "STANCH_KAFKA_BOOTSTRAP"),
        ("STANCH_TOPIC_PREFIX", "bad prefix!", "STANCH_TOPIC_PREFIX"),
        ("STANCH_SECURITY_PROTOCOL", "TLS", "STANCH_SECURITY_PROTOCOL"),
        ("STANCH_FETCH_MAX_WAIT_MS", "0", "STANCH_FETCH_MAX_WAIT_MS"),
        ("STANCH_POLICY_FILE", "/nonexistent/policy.toml", "STANCH_POLICY_FILE"),
    ],
)
def test_bad_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert expected in str(info.value)


def test_sasl_requires_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANCH_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(SettingsError, match="STANCH_SASL_MECHANISM"):
        load_settings()
    monkeypatch.setenv("STANCH_SASL_MECHANISM", "PLAIN")
    with pytest.raises(SettingsError, match="STANCH_SASL_USERNAME"):
        load_settings()
    monkeypatch.setenv("STANCH_SASL_USERNAME", "u")
    monkeypatch.setenv("STANCH_SASL_PASSWORD", "p")
    kwargs = load_settings().aiokafka_kwargs()
    assert kwargs["sasl_mechanism"] == "PLAIN"
    assert kwargs["sasl_plain_username"] == "u"


def test_heartbeat_must_fit_session_timeout() -> None:
    with pytest.raises(SettingsError, match="HEARTBEAT"):
        load_settings(session_timeout_s=3, heartbeat_interval_s=2)


def test_unknown_topic_name_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown topic"):
        Settings().topic("nope")
    assert len({Settings().topic(n) for n in TOPIC_NAMES}) == len(TOPIC_NAMES)


def test_unknown_stanch_variables_are_named_with_the_closest_known_one() -> None:
    from app.settings import describe_unknown, unknown_env_vars

    env = {"STANCH_WEB_PROT": "1", "STANCH_PARTITION": "2", "STANCH_FOO": "3",
           "STANCH_GRACE_S": "1", "stanch_kafka_bootstrap": "h:1", "STANCH_SERVICE": "x",
           "PATH": "/bin"}
    unknown = unknown_env_vars(env)
    assert unknown == [("STANCH_FOO", None), ("STANCH_PARTITION", "STANCH_PARTITIONS"),
                       ("STANCH_WEB_PROT", "STANCH_WEB_PORT")]
    line = describe_unknown(unknown)
    assert "\n" not in line
    assert "STANCH_WEB_PROT (did you mean STANCH_WEB_PORT?)" in line
    assert "STANCH_FOO" in line


def test_load_settings_warns_once_about_unknown_variables(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import app.settings as settings_module

    monkeypatch.setattr(settings_module, "_warned_unknown", False)
    monkeypatch.setenv("STANCH_WINDOW_SECONDS", "2")
    with caplog.at_level("WARNING", logger="app.settings"):
        load_settings()
        load_settings()
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.settings"]
    assert len(warnings) == 1
    assert "STANCH_WINDOW_SECONDS (did you mean STANCH_WINDOW_S?)" in warnings[0]
