"""``stanch demo``: the closed loop end to end, with the summary the README promises."""

from __future__ import annotations

import orjson
import pytest

from app.demo import demo_main

pytestmark = pytest.mark.integration


def test_demo_bad_deploy_json_summary(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STANCH_KAFKA_BOOTSTRAP", kafka_bootstrap)
    assert demo_main("bad-deploy", as_json=True) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = orjson.loads(out[-1])  # progress goes to stderr; stdout ends with the JSON
    for key in ("time_to_detect_s", "time_to_mitigate_s", "time_to_recover_s",
                "errors_avoided"):
        assert key in summary
    assert [(c["kind"], c["service"], c["target"]) for c in summary["commands"]] == \
        [("rollback", "payments", "v41")]
    assert summary["acks"]["applied"] == 1
    assert 0 < summary["time_to_detect_s"] <= summary["time_to_mitigate_s"] <= 20
    assert summary["time_to_recover_s"] >= summary["time_to_mitigate_s"]
    assert summary["errors_avoided"] > 0
    assert summary["errors_without_stanch"] > summary["errors_with_stanch"]
    assert summary["wall_s"] < 180, "the demo must finish in under three minutes"
