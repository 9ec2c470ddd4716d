"""``stanch``: the one command line entry point (DESIGN.md, "Command line").

Each command reads the validated settings once; a bad setting stops it with a message
naming the variable. Heavy modules are imported inside the commands so ``stanch --help``
stays fast and one broken optional piece cannot take the others down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from app.settings import Settings, SettingsError, load_settings


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        click.echo(f"stanch: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Stanch: catch production incidents in seconds and contain them automatically."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


@cli.command()
@click.option("--port", type=int, default=None, help="Port (default STANCH_BROKER_PORT, 9092).")
def broker(port: int | None) -> None:
    """Start the embedded Kafka-compatible broker (Tansu, memory storage)."""
    from app.broker import BrokerError, EmbeddedBroker

    settings = _settings(broker_port=port)
    embedded = EmbeddedBroker(port=settings.broker_port)
    try:
        embedded.start()
    except BrokerError as exc:
        click.echo(f"stanch broker: {exc}", err=True)
        sys.exit(1)
    click.echo(f"embedded broker listening on {embedded.bootstrap} (Ctrl-C to stop)")

    def _stop(*_: object) -> None:
        embedded.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code = embedded.wait()
    click.echo(f"embedded broker exited with code {code}", err=True)
    sys.exit(1 if code else 0)


@cli.command()
@click.option("--loglevel", default="info", show_default=True)
def worker(loglevel: str) -> None:
    """The Faust worker running all agents."""
    from app.worker import run_worker

    run_worker(_settings(), loglevel=loglevel)


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sidecar(args: tuple[str, ...]) -> None:
    """The enforcement sidecar (reverse proxy + telemetry + command enforcement).

    `stanch sidecar --help` lists its options.
    """
    from app.sidecar.__main__ import main as sidecar_main
    from app.sidecar.main import OptionError

    _settings()  # a bad STANCH_* setting stops here, with its name
    try:
        sidecar_main(list(args))
    except OptionError as exc:
        click.echo(f"stanch sidecar: {exc}", err=True)
        sys.exit(2)


@cli.command()
@click.option("--scenario", default="bad-deploy", show_default=True,
              help="clean, latency-spike, error-burst, bad-deploy, traffic-surge, "
                   "dependency-failure, slow-degradation or telemetry-gap.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--speed", type=float, default=8.0, show_default=True,
              help="Simulated seconds per wall second.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def demo(scenario: str, seed: int, speed: float, as_json: bool) -> None:
    """Broker + worker + sidecars + simulated fleet: one scenario end to end, with a report."""
    from app.demo import demo_main

    sys.exit(demo_main(scenario, as_json, seed=seed, speed=speed))


def _parse_time(value: str | None) -> int | None:
    """Epoch seconds or ISO 8601 (UTC when no zone is given) -> epoch milliseconds."""
    if value is None:
        return None
    from datetime import UTC, datetime

    try:
        return int(float(value) * 1000)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither epoch seconds nor ISO 8601") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


@cli.command()
@click.option("--topic", "name", required=True,
              type=click.Choice(["requests", "errors", "changes", "windows", "anomalies",
                                 "incidents", "commands", "acks", "control", "deadletter",
                                 "labels"]),
              help="Logical topic name (the prefix comes from STANCH_TOPIC_PREFIX).")
@click.option("--from", "start", default=None, help="Start (epoch seconds or ISO 8601).")
@click.option("--to", "end", default=None, help="End, exclusive (epoch seconds or ISO 8601).")
@click.option("--to-prefix", default=None,
              help="Re-publish the range to the same topic under this prefix.")
def replay(name: str, start: str | None, end: str | None, to_prefix: str | None) -> None:
    """Re-publish a time range of a topic, or print it as JSON lines."""
    from app.replay import ReplayRange, collect, run_replay

    settings = _settings()
    window = ReplayRange(_parse_time(start), _parse_time(end))
    if to_prefix is not None:
        sent = run_replay(settings, name, window, to_prefix)
        click.echo(f"re-published {sent} records to {to_prefix}{name}", err=True)
        return
    for value in asyncio.run(collect(settings, name, window)):
        click.echo(value.decode("utf-8", errors="replace"))


@cli.command()
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False,
              path_type=Path), required=True)
@click.option("--output", "output_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True)
def backtest(input_dir: Path, output_dir: Path) -> None:
    """Run the detectors offline over CSV files (timestamp,value).

    Writes, at the same relative path under OUTPUT, timestamp,value,anomaly_score,label
    where label is 1 on the rows where the live pipeline would emit an anomaly.
    """
    import json

    from app.backtest import run_backtest

    summary = run_backtest(input_dir, output_dir)
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "per_file"}, indent=2))
    if summary.get("errors"):
        sys.exit(1)


@cli.group(invoke_without_command=True)
@click.pass_context
def incidents(ctx: click.Context) -> None:
    """List incidents; `show ID` prints the timeline and writes a plot."""
    if ctx.invoked_subcommand is None:
        from app.incidents_cli import incidents_list_main

        sys.exit(incidents_list_main(_settings()))


@incidents.command("list")
@click.option("--json", "as_json", is_flag=True)
def incidents_list(as_json: bool) -> None:
    """List incidents (from the incidents topic)."""
    from app.incidents_cli import incidents_list_main

    sys.exit(incidents_list_main(_settings(), as_json=as_json))


@incidents.command("show")
@click.argument("incident_id")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG path (default <ID>.png).")
@click.option("--no-plot", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def incidents_show(incident_id: str, output: Path | None, no_plot: bool, as_json: bool) -> None:
    """Print an incident's timeline and write a PNG plot of its series."""
    from app.incidents_cli import incidents_show_main

    sys.exit(incidents_show_main(_settings(), incident_id, plot_path=output, as_json=as_json,
                                 no_plot=no_plot))


def _control(action: str, target: str | None = None, reason: str | None = None) -> None:
    from app.control import control_main

    sys.exit(control_main(_settings(), action, target, reason))


@cli.command()
@click.argument("target")
@click.option("--reason", default=None)
def approve(target: str, reason: str | None) -> None:
    """Approve a pending command or incident (approval mode)."""
    _control("approve", target, reason)


@cli.command()
@click.option("--reason", default=None)
def pause(reason: str | None) -> None:
    """Kill switch: issue no command (leases lapse) until `stanch resume`."""
    _control("pause", None, reason)


@cli.command()
@click.option("--reason", default=None)
def resume(reason: str | None) -> None:
    """Undo `stanch pause`."""
    _control("resume", None, reason)


@cli.command("dry-run")
@click.argument("state", type=click.Choice(["on", "off"]))
def dry_run(state: str) -> None:
    """Record decisions on stanch.incidents without issuing commands (on), or stop (off)."""
    _control(f"dry-run-{state}")


@cli.group()
def bench() -> None:
    """The benchmarks; `--json` prints machine-readable figures."""


def _print_figures(result: dict[str, Any], as_json: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        click.echo(f"{key:>32}: {value}")


@bench.command("detect")
@click.option("--json", "as_json", is_flag=True)
@click.option("--events", type=int, default=1_000_000, show_default=True,
              help="Batched request events to push through aggregation + detection.")
def bench_detect(as_json: bool, events: int) -> None:
    """Events/s through aggregation + detection, detection delay, bytes per series."""
    from app.bench_detect import run_bench_detect

    _print_figures(run_bench_detect(n_batched=events), as_json)


@bench.command("mitigate")
@click.option("--json", "as_json", is_flag=True)
@click.option("--runs", type=int, default=3, show_default=True, help="Runs per scenario.")
def bench_mitigate(as_json: bool, runs: int) -> None:
    """Onset-to-signed-command time over bad-deploy and traffic-surge runs."""
    from app.bench_mitigate import bench_mitigate_main

    sys.exit(bench_mitigate_main(as_json, runs=runs))


@bench.command("scenarios")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option("--scenario", "scenarios", multiple=True,
              help="Only this scenario (repeatable); default: all eight.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds.")
def bench_scenarios(as_json: bool, scenarios: tuple[str, ...], seeds: str) -> None:
    """Every scenario x seed in the offline closed loop, each against no Stanch."""
    from app.bench_scenarios import bench_scenarios_main
    from models.scenarios import SCENARIO_NAMES

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: comma-separated integers",
                                 param_hint="--seeds") from None
    sys.exit(bench_scenarios_main(as_json, scenarios or SCENARIO_NAMES, seed_list))


@bench.command(
    "quality",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_quality(args: tuple[str, ...]) -> None:
    """Every scenario through the live models (detected? how fast?) and a clean 24 h day.

    Prints JSON; exits 1 when a scenario is missed or the clean day alarms.
    """
    from app.bench_quality import main as quality_main

    sys.exit(quality_main([a for a in args if a != "--json"]))


@bench.command("sidecar")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quick", is_flag=True, help="2 s phases instead of 5 s.")
def bench_sidecar(as_json: bool, quick: bool) -> None:
    """Latency the sidecar adds at 1,000 req/s, and the requests/s one sidecar passes."""
    from app.bench_sidecar import run_bench

    seconds = 2.0 if quick else 5.0
    _print_figures(run_bench(_settings(), duration_s=seconds, max_duration_s=seconds), as_json)


@bench.command("simulate")
@click.option("--json", "as_json", is_flag=True)
@click.option("--simulated-s", type=float, default=30.0, show_default=True)
@click.option("--rate", type=float, default=2000.0, show_default=True)
def bench_simulate(as_json: bool, simulated_s: float, rate: float) -> None:
    """Events/s one simulator process publishes to the broker."""
    from app.bench_simulate import measure
    from app.broker import EmbeddedBroker, free_port

    settings = _settings()
    if settings.embedded:
        with EmbeddedBroker(port=free_port()) as broker:
            local = Settings(**{**settings.model_dump(), "kafka_bootstrap": broker.bootstrap})
            result = asyncio.run(measure(local, simulated_s=simulated_s, rate=rate))
    else:
        result = asyncio.run(measure(settings, simulated_s=simulated_s, rate=rate))
    _print_figures(result, as_json)


@cli.group()
def keys() -> None:
    """Signing keys for enforcement commands."""


@keys.command("generate")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("keys"), show_default=True)
@click.option("--kid", default="k1", show_default=True, help="Key id (rotation: a new kid).")
@click.option("--overwrite", is_flag=True)
def keys_generate(out_dir: Path, kid: str, overwrite: bool) -> None:
    """Write <kid>.key.pem (private, mode 0600: the mitigation agent) and <kid>.pub.pem
    (public: every sidecar's STANCH_TRUSTED_KEYS_DIR)."""
    from app.keys import generate_keypair

    try:
        private, public = generate_keypair(out_dir, kid, overwrite=overwrite)
    except (FileExistsError, ValueError) as exc:
        click.echo(f"stanch keys generate: {exc}", err=True)
        sys.exit(2)
    click.echo(f"private key: {private}\npublic key:  {public}")


def _add_built_commands() -> None:
    """Commands whose modules build their own click command."""
    from app.simulate import build_simulate_command

    cli.add_command(build_simulate_command(), "simulate")


_add_built_commands()


def main() -> None:
    cli(prog_name="stanch")


if __name__ == "__main__":
    main()
