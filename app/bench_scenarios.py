"""``stanch bench scenarios``: does mitigation help, and never harm, on every scenario?

Every simulator scenario (``models.scenarios.SCENARIO_NAMES``) on several seeds, each
run twice from the same seed: once with Stanch in the closed loop, offline and in
event time through the live models and the sidecar's enforcement code
(``app.closed_loop``), and once without Stanch. Prints one JSON object (``--json``) or a
table: per run the error and slow responses with and without, the actions issued and
still in force at the end, and the times to detect, mitigate, recover and restore; the
summary gives min_errors_avoided, runs_worse_than_nothing, actions_in_force_at_end and
scenarios_mitigated. ``stanch demo --scenario S --json`` runs one scenario through a
real broker, worker and sidecars instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from app.closed_loop import ONSET_S, SLOW_FACTOR, TAIL_S, TICK_S, run_scenario, summarise
from models.scenarios import SCENARIO_NAMES

DEFAULT_SEEDS = (1, 2, 3)


def run_bench(scenarios: Sequence[str] = SCENARIO_NAMES, seeds: Sequence[int] = DEFAULT_SEEDS,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every scenario x seed; the figures (see the module docstring)."""
    unknown = [s for s in scenarios if s not in SCENARIO_NAMES]
    if unknown:
        raise ValueError(f"scenarios: unknown {unknown}; known: {', '.join(SCENARIO_NAMES)}")
    wall0 = time.perf_counter()
    runs = []
    for scenario in scenarios:
        for seed in seeds:
            t0 = time.perf_counter()
            run = run_scenario(scenario, seed)
            run["wall_s"] = round(time.perf_counter() - t0, 1)
            runs.append(run)
            if say is not None:
                say(_row(run))
    return {
        "benchmark": "scenarios",
        "method": "offline closed loop in event time (app.closed_loop): fleet -> "
                  "aggregation -> detection -> DecisionEngine + Mitigator (default policy) "
                  "-> signed commands -> sidecar gate + EnforcementTable; each run against "
                  "the same seed without Stanch",
        "onset_s": ONSET_S, "tail_s": TAIL_S, "tick_s": TICK_S,
        "slow": f"ingress response slower than {SLOW_FACTOR:g} x its route's pre-onset p99 "
                "(same seed, without Stanch)",
        "errors": "ingress responses with status >= 500 served by any service (shed 503s "
                  "count, throttled 429s do not)",
        "seeds": list(seeds),
        "summary": summarise(runs),
        "runs": runs,
        "wall_s": round(time.perf_counter() - wall0, 1),
    }


def _t(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


HEADER = ("scenario | seed | errors with / without | avoided | slow with / without | "
          "actions | in force at end | detect / mitigate / recover / restore (s)")


def _row(r: dict[str, Any]) -> str:
    return (f"{r['scenario']} | {r['seed']} | {r['errors_with_stanch']} / "
            f"{r['errors_without_stanch']} | {r['errors_avoided']} | {r['slow_with_stanch']} / "
            f"{r['slow_without_stanch']} | {r['actions_issued']} | "
            f"{r['actions_in_force_at_end']} | {_t(r['time_to_detect_s'])} / "
            f"{_t(r['time_to_mitigate_s'])} / {_t(r['time_to_recover_s'])} / "
            f"{_t(r['time_to_restore_s'])}")


def bench_scenarios_main(as_json: bool, scenarios: Sequence[str] = SCENARIO_NAMES,
                         seeds: Sequence[int] = DEFAULT_SEEDS) -> int:
    """The body of ``stanch bench scenarios``; returns the exit code."""
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if as_json else print
    if not as_json:
        print(HEADER)
    try:
        figures = run_bench(scenarios, seeds, say)
    except ValueError as exc:
        print(f"stanch bench scenarios: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(orjson.dumps(figures).decode())
    else:
        s = figures["summary"]
        print(f"summary: {s['runs']} runs, min errors avoided {s['min_errors_avoided']}, "
              f"worse than nothing {s['runs_worse_than_nothing']}, actions in force at end "
              f"{s['actions_in_force_at_end']}, mitigated: "
              f"{', '.join(s['scenarios_mitigated']) or 'none'} ({figures['wall_s']} s)")
    return 0
