"""The offline closed loop (app.closed_loop) and ``stanch bench scenarios``.

No broker here on purpose: the loop is the live models chained in one process in event
time (the broker-based path is ``stanch demo``, tests/integration/test_demo.py). What is
asserted holds by construction: without a command the fleet with Stanch is the fleet
without (same seed, same events), a rollback of the bad deploy removes its errors, and
the summary counts what the runs say.
"""

from __future__ import annotations

import orjson
from click.testing import CliRunner

from app.cli import cli
from app.closed_loop import ONSET_S, run_scenario, summarise


def test_short_closed_loop_clean_and_bad_deploy() -> None:
    clean = run_scenario("clean", 1, duration_s=ONSET_S + 40.0)
    assert clean["actions_issued"] == 0 and clean["commands"] == []
    assert clean["time_to_mitigate_s"] is None
    # no command: the same seed gives the same traffic, errors and latencies
    assert clean["errors_with_stanch"] == clean["errors_without_stanch"]
    assert clean["slow_with_stanch"] == clean["slow_without_stanch"]
    assert clean["requests_with_stanch"] == clean["requests_without_stanch"] > 50_000
    assert clean["actions_in_force_at_end"] == 0

    bad = run_scenario("bad-deploy", 1, duration_s=ONSET_S + 60.0)
    assert bad["actions_by_kind"].get("rollback") == 1, bad["commands"]
    assert bad["acks"]["applied"] >= 1 and bad["acks"]["rejected"] == 0
    assert bad["time_to_detect_s"] is not None and bad["time_to_mitigate_s"] is not None
    assert 0 <= bad["time_to_detect_s"] <= bad["time_to_mitigate_s"]
    assert bad["errors_without_stanch"] > bad["errors_with_stanch"]
    assert bad["errors_avoided"] == bad["errors_without_stanch"] - bad["errors_with_stanch"]
    assert bad["dead_lettered"] == 0

    summary = summarise([clean, bad])
    assert summary["runs"] == 2
    assert summary["min_errors_avoided"] == 0  # the clean run
    assert summary["runs_worse_than_nothing"] == 0
    assert summary["scenarios_mitigated"] == ["bad-deploy"]
    assert summary["actions_in_force_at_end"] == (clean["actions_in_force_at_end"]
                                                  + bad["actions_in_force_at_end"])


def test_bench_scenarios_cli_prints_the_figures() -> None:
    result = CliRunner().invoke(cli, ["bench", "scenarios", "--json", "--scenario", "clean",
                                      "--seeds", "2"])
    assert result.exit_code == 0, result.output
    figures = orjson.loads(result.stdout.strip().splitlines()[-1])
    [run] = figures["runs"]
    assert (run["scenario"], run["seed"], run["actions_issued"]) == ("clean", 2, 0)
    for key in ("errors_with_stanch", "errors_without_stanch", "errors_avoided",
                "slow_with_stanch", "slow_without_stanch", "actions_in_force_at_end",
                "time_to_detect_s", "time_to_mitigate_s", "time_to_restore_s"):
        assert key in run
    assert set(figures["summary"]) >= {"min_errors_avoided", "runs_worse_than_nothing",
                                       "actions_in_force_at_end", "scenarios_mitigated"}
    bad = CliRunner().invoke(cli, ["bench", "scenarios", "--scenario", "nope"])
    assert bad.exit_code == 2 and "unknown" in bad.output


def test_ingress_log_counts_errors_and_slow_responses_against_the_healthy_tail() -> None:
    from app.closed_loop import SLOW_FACTOR, IngressLog
    from models.fleet import FleetOutput

    def out(latencies: list[float], status: int = 200) -> FleetOutput:
        return FleetOutput(requests={"a": [
            {"service": "a", "route": "/x", "status": status, "latency_ms": lat}
            for lat in latencies] + [
            {"service": "a", "route": "/x", "status": 200, "latency_ms": 1.0,
             "dependency": "b"}]})  # egress: never counted

    log = IngressLog()
    log.add(0.0, out([10.0] * 100))                 # healthy: p99 10 ms
    log.add(1.0, out([10.0 * SLOW_FACTOR + 1] * 3))  # after the onset: 3 slow
    log.add(2.0, out([5.0] * 2, status=503))         # 2 errors, fast
    thresholds = log.slow_thresholds(before=1.0)
    assert thresholds == {("a", "/x"): 10.0 * SLOW_FACTOR}
    assert log.slow(thresholds) == 3
    assert (log.errors, log.requests) == (2, 105)
    assert log.series() == [(0.0, 0, 100), (1.0, 0, 3), (2.0, 2, 2)]
