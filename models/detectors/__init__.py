"""River-shaped detectors, one per signal (latency, errors, traffic, metric:NAME).

Each scores a window summary (a plain dict shaped like DESIGN.md's window summary) with a
surprise, -log10 of a one-sided p-value, and learns it afterwards unless told not to.
"""

from models.detectors.base import Assessment, Detector
from models.detectors.errors import ErrorRateDetector
from models.detectors.latency import LatencyDetector
from models.detectors.metric import MetricDetector
from models.detectors.traffic import TrafficDetector

__all__ = [
    "Assessment",
    "Detector",
    "ErrorRateDetector",
    "LatencyDetector",
    "MetricDetector",
    "TrafficDetector",
]
