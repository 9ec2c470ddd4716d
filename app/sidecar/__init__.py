"""The enforcement sidecar: reverse/forward proxy, telemetry and command enforcement."""

from app.sidecar.main import Sidecar, SidecarOptions, parse_dependency, run_sidecar

__all__ = ["Sidecar", "SidecarOptions", "parse_dependency", "run_sidecar"]
