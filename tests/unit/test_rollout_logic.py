import numpy as np

from stream.lifecycle.policy import HealthPolicy, ShadowStats, calibration_of, decide

POL = HealthPolicy(shadow_frames=32, min_frames=16)


def _stats(scores, errors=0, frames=None):
    return ShadowStats(scores=list(scores), frames=len(scores) if frames is None else frames, errors=errors)


def test_healthy_candidate_promoted():
    rng = np.random.default_rng(0)
    cal = rng.normal(0, 1, 200)
    d = decide(_stats(rng.normal(0, 1, 40)), cal, threshold=3.0, policy=POL)
    assert d.action == "promote", d.reasons
    assert d.stats["ks_p"] > 1e-3


def test_waits_for_window_then_needs_min_frames():
    rng = np.random.default_rng(1)
    cal = rng.normal(0, 1, 200)
    assert decide(_stats(rng.normal(0, 1, 10)), cal, 3.0, POL).action == "wait"
    d = decide(_stats(rng.normal(0, 1, 10)), cal, 3.0, POL, timed_out=True)
    assert d.action == "rollback" and "insufficient_shadow_traffic" in d.reasons[0]
    assert decide(_stats(rng.normal(0, 1, 20)), cal, 3.0, POL, timed_out=True).action == "promote"


def test_any_error_rolls_back():
    d = decide(ShadowStats(scores=[0.0] * 40, frames=40, errors=1, last_error="boom"), None, 1.0, POL)
    assert d.action == "rollback" and "inference_errors" in d.reasons[0] and "boom" in d.reasons[0]


def test_scores_off_calibration_roll_back():
    rng = np.random.default_rng(2)
    cal = rng.normal(0, 1, 200)
    d = decide(_stats(rng.normal(50, 1, 40)), cal, threshold=100.0, policy=POL)
    assert d.action == "rollback"
    assert any(r.startswith("score_distribution") for r in d.reasons)


def test_false_alarms_without_calibration():
    d = decide(_stats([5.0] * 40), None, threshold=1.0, policy=POL)
    assert d.action == "rollback" and d.reasons[0].startswith("false_alarms")
    assert decide(_stats([0.5] * 40), None, threshold=1.0, policy=POL).action == "promote"


def test_nan_and_no_good_frames():
    assert decide(_stats([float("nan")] * 40), None, 1.0, POL).reasons[0].startswith("non_finite")
    assert decide(ShadowStats(scores=[], frames=40), None, 1.0, POL).reasons[0].startswith("no_good_frames")


def test_calibration_of_spec_and_task():
    spec = {"threshold": 0.7, "calibration": {"scores": [1, 2, 3]},
            "tasks": {"cells": {"calibration_scores": [4, 5]}}}
    assert calibration_of(spec) == ([1.0, 2.0, 3.0], 0.7)
    assert calibration_of(spec, "cells") == ([4.0, 5.0], 0.7)
    assert calibration_of({}) == (None, 0.0)


def test_drift_hook_uses_spec_calibration_and_warmup():
    from contracts.envelope import InspectionResult
    from stream.lifecycle.drift import DriftConfig
    from stream.lifecycle.hooks import DriftHook

    rng = np.random.default_rng(3)
    spec = {"threshold": 3.0, "calibration": {"scores": rng.normal(0, 1, 200).tolist()}}

    def res(score, shadow=False):
        return InspectionResult(frame_id="f", camera="cam-1", line=None, model="m", model_version="2", task="",
                                routed=False, route_distance=None, score=score, threshold=3.0,
                                is_anomaly=score > 3.0, shadow=shadow)

    hook = DriftHook(DriftConfig(window=32, check_every=8, min_interval_s=0))
    assert sum(len(hook.observe(res(s), spec)) for s in rng.normal(0, 1, 64)) == 0
    assert sum(len(hook.observe(res(s, shadow=True), spec)) for s in rng.normal(9, 1, 64)) == 0
    got = [a for s in rng.normal(4, 1, 64) for a in hook.observe(res(s), spec)]
    assert {a.detector for a in got} >= {"score_shift"}
    warm = DriftHook(DriftConfig(window=32, check_every=8, min_interval_s=0), warmup=64)
    assert [a for s in rng.normal(0, 1, 64) for a in warm.observe(res(s), {})] == []
    assert warm.monitor.has_reference("m@2")
    assert [a for s in rng.normal(6, 1, 64) for a in warm.observe(res(s), {})]
