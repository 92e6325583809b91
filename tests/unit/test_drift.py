"""Drift detectors: a shifted stream alerts within the window, a clean one of equal length does not."""

import numpy as np
import pytest

from stream.lifecycle.drift import DriftConfig, DriftMonitor, population_stability_index


def _monitor(**kw):
    t = [0.0]
    m = DriftMonitor(DriftConfig(**kw), clock=lambda: t[0])
    return m, t


def test_psi_zero_for_same_distribution_and_large_for_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    assert population_stability_index(ref, rng.normal(size=5000)) < 0.02
    assert population_stability_index(ref, rng.normal(loc=2.0, size=5000)) > 1.0


def test_clean_stream_raises_no_alert_and_shifted_stream_does():
    rng = np.random.default_rng(1)
    ref = rng.normal(1.0, 0.1, size=200)
    m, _ = _monitor(window=64, check_every=16)
    m.set_reference("bottle", ref, expected_anomaly_rate=0.01)
    clean = [a for s in rng.normal(1.0, 0.1, size=256) for a in m.observe("cam1", "bottle", s, s > 1.4)]
    assert clean == []
    shifted = [a for s in rng.normal(1.6, 0.1, size=64) for a in m.observe("cam2", "bottle", s, s > 1.4)]
    detectors = {a.detector for a in shifted}
    assert "score_shift" in detectors and "anomaly_rate" in detectors
    alert = next(a for a in shifted if a.detector == "score_shift")
    assert alert.p_value < 1e-3 and alert.window == 64 and alert.key == "camera=cam2|task=bottle"


def test_route_ood_and_rate_limit():
    rng = np.random.default_rng(2)
    m, clock = _monitor(window=32, check_every=8, min_interval_s=60.0)
    m.set_reference("bottle", rng.normal(size=100), route_distance_threshold=10.0)
    alerts = []
    for _ in range(64):
        alerts += m.observe("cam", "bottle", float(rng.normal()), False, route_distance=25.0)
    assert [a.detector for a in alerts] == ["route_ood"]  # rate-limited: one alert per minute
    clock[0] = 61.0
    alerts = []
    for _ in range(8):
        alerts += m.observe("cam", "bottle", float(rng.normal()), False, route_distance=25.0)
    assert [a.detector for a in alerts] == ["route_ood"]


def test_reference_needs_enough_scores():
    m, _ = _monitor()
    with pytest.raises(ValueError, match=">= 10 scores"):
        m.set_reference("t", [1.0, 2.0])
    assert m.observe("cam", "unknown-task", 1.0, False) == []


def test_snapshot_restore_continues_the_window_on_another_worker():
    """A camera's windows move with its partition: the new owner alerts exactly when the old one would have."""
    import orjson

    rng = np.random.default_rng(3)
    ref = rng.normal(1.0, 0.1, size=200)
    shifted = rng.normal(1.6, 0.1, size=64)
    one, _ = _monitor(window=64, check_every=16)
    one.set_reference("bottle", ref)
    alone = [[a.detector for a in one.observe("cam", "bottle", s, False)] for s in shifted]
    a, _ = _monitor(window=64, check_every=16)
    b, _ = _monitor(window=64, check_every=16)
    for m in (a, b):
        m.set_reference("bottle", ref)
    first = [[x.detector for x in a.observe("cam", "bottle", s, False)] for s in shifted[:40]]
    snap = orjson.loads(orjson.dumps(a.snapshot("cam")))  # through JSON, as on the drift-state topic
    assert b.restore("cam", snap) == 1
    rest = [[x.detector for x in b.observe("cam", "bottle", s, False)] for s in shifted[40:]]
    assert first + rest == alone and any(alone)
    fresh, _ = _monitor(window=64, check_every=16)
    fresh.set_reference("bottle", ref)
    assert not any(fresh.observe("cam", "bottle", s, False) for s in shifted[40:])  # without it: nothing yet


def test_tracks_are_bounded_and_dropped_per_camera():
    m = DriftMonitor(DriftConfig(window=8, check_every=8), max_tracks=3)
    m.set_reference("t", np.linspace(0, 1, 20))
    for cam in ("c1", "c2", "c3", "c4"):
        m.observe(cam, "t", 0.5, False)
    assert m.snapshot("c1") == {} and set(m.snapshot("c4")) == {"task=t"}  # least recent dropped
    m.drop("c4")
    assert m.snapshot("c4") == {}
