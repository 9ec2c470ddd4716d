"""`python -m app.sidecar ...`: a dependency-free launcher (benchmark subprocesses, debugging).

The user-facing command is `stanch sidecar` (click, app/cli.py); this mirrors its
options with argparse so the sidecar can be started before or without the CLI.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from app.settings import load_settings
from app.sidecar.main import SidecarOptions, parse_clock_origin, parse_dependency, run_sidecar


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stanch sidecar")
    p.add_argument("--service", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--listen", default="0.0.0.0:8000")
    p.add_argument("--dependency", action="append", default=[], metavar="NAME=URL")
    p.add_argument("--instance")
    p.add_argument("--version", default="")
    p.add_argument("--region", default="")
    p.add_argument("--admin-host", default="127.0.0.1")
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--route-template", action="append", default=[])
    p.add_argument("--rollback-command")
    p.add_argument("--rollback-webhook")
    p.add_argument("--rollback-timeout", type=float, default=30.0)
    p.add_argument("--trusted-keys-dir", type=Path)
    p.add_argument("--clock-origin", metavar="SIM_TS@WALL_TS",
                   help="simulated fleets only: the clock reads SIM_TS at wall time WALL_TS")
    p.add_argument("--clock-speed", type=float, default=1.0,
                   help="simulated seconds per wall second (with --clock-origin)")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    options = SidecarOptions(
        service=args.service,
        upstream=args.upstream,
        listen=args.listen,
        dependencies=dict(parse_dependency(d) for d in args.dependency),
        instance=args.instance,
        version=args.version,
        region=args.region,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        route_templates=args.route_template,
        rollback_command=args.rollback_command,
        rollback_webhook=args.rollback_webhook,
        rollback_timeout_s=args.rollback_timeout,
        trusted_keys_dir=args.trusted_keys_dir,
        clock_origin=parse_clock_origin(args.clock_origin) if args.clock_origin else None,
        clock_speed=args.clock_speed,
    )
    run_sidecar(load_settings(), options, use_uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
