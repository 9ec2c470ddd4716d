"""The detector table's value encoding: exact, compact, readable from older values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agents.detection import decode_state, encode_state, pack_floats, unpack_floats
from models.series import SeriesDetector
from tests.unit.test_series import clean_windows


def warmed_detector(n: int = 400) -> SeriesDetector:
    det = SeriesDetector("svc|/r|")
    rng = np.random.default_rng(3)
    for i, w in enumerate(clean_windows(seed=31, n=n)):
        w["window_start"] = 1.7e9 + 300.0 * i  # every time-of-day level gets learned
        w["metrics"] = {"cpu": float(rng.normal(50.0, 5.0))}
        det.update(w)
    return det


def test_packed_numbers_round_trip_exactly() -> None:
    values = [0.0, -0.0, 1e-308, 5e-324, 1.7976931348623157e308, math.inf, -math.inf,
              0.1 + 0.2, -123456.789, 2.0 ** 53 + 1]
    back = unpack_floats(pack_floats(values))
    assert [math.copysign(1.0, v) for v in back] == [math.copysign(1.0, v) for v in values]
    assert back == values
    assert math.isnan(unpack_floats(pack_floats([math.nan]))[0])
    assert unpack_floats(pack_floats([])) == []


def test_packed_numbers_reject_garbage() -> None:
    with pytest.raises(ValueError, match="base64"):
        unpack_floats("not base64!")
    with pytest.raises(ValueError, match="whole number"):
        unpack_floats("AAAA")  # 3 bytes


def test_table_value_restores_the_same_detector_and_is_smaller() -> None:
    det = warmed_detector()
    state = det.to_state()
    value = encode_state(1.7e9, 3, state)
    last, partition, decoded = decode_state(value)
    assert (last, partition) == (1.7e9, 3)
    restored = SeriesDetector.restore("svc|/r|", decoded)
    assert restored.to_state() == state
    # the same windows give the same decisions and scores
    more = list(clean_windows(seed=32, n=50))
    for i, w in enumerate(more):
        w["window_start"] = 1.8e9 + 300.0 * i
        w["metrics"] = {"cpu": 50.0 + (40.0 if i == 30 else 0.0)}
        assert det.update(w) == restored.update(w)
        assert det.last_scores == restored.last_scores
    plain = json.dumps([1.7e9, 3, state], separators=(",", ":")).encode()
    assert len(value) < 0.8 * len(plain)  # ~0.72 in steady state (bench detect)


def test_a_value_written_before_packing_still_reads() -> None:
    state = warmed_detector(200).to_state()
    old = json.dumps([1.7e9, 0, state], separators=(",", ":")).encode()
    _, _, decoded = decode_state(old)
    assert SeriesDetector.restore("svc|/r|", decoded).to_state() == state
    # and one already JSON-decoded (as a changelog recovery may hand it over)
    _, _, decoded = decode_state(json.loads(encode_state(1.7e9, 0, state)))
    assert SeriesDetector.restore("svc|/r|", decoded).to_state() == state


@pytest.mark.parametrize("value", [b"[1,2]", b"[1,0,[2,[[\"latency\",\"@@\",[0,0,0]]],[]]]",
                                   b"not json", b"[1,0,null]"])
def test_a_malformed_value_raises_value_or_type_error(value: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode_state(value)


def test_ttl_clock_is_capped_by_the_wall_clock() -> None:
    """A window stamped in the future cannot move the TTL clock past the wall clock (it
    expired every live baseline); a replay of the past keeps its own event time."""
    from agents.detection import DetectionAgent

    agent = DetectionAgent.__new__(DetectionAgent)
    agent.newest_window_start = 1_700_000_000.0 + 30 * 86_400
    assert agent.ttl_clock(now=1_700_000_000.0) == 1_700_000_000.0
    agent.newest_window_start = 1_600_000_000.0
    assert agent.ttl_clock(now=1_700_000_000.0) == 1_600_000_000.0
