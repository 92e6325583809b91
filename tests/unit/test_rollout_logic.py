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


# ---------------------------------------------------------------- operating points (issue 24 item 5)

_MT_SPEC = {"model": "moleflow", "detector": "moleflow", "threshold": 0.0, "tasks": {
    "bottle": {"calibration_scores": [1, 2], "operating_point": {
        "threshold": 2.5, "score_scale": 1.0, "target_false_alarm_rate": 0.01, "estimated_false_alarm_rate": 0.008,
        "estimated_recall": 0.935, "estimated_recall_by_family": {"scratch": 0.9, "stain": 0.97}, "n_good": 120,
        "n_synthetic": 300, "method": "held-out good + synthetic"}},
    "cable": {"calibration_scores": [3, 4]}}}


def test_calibration_of_uses_the_tasks_operating_point():
    assert calibration_of(_MT_SPEC, "bottle") == ([1.0, 2.0], 2.5)
    assert calibration_of(_MT_SPEC, "cable") == ([3.0, 4.0], 0.0)  # no operating point: the spec's threshold
    assert calibration_of({"threshold": 1.0, "operating_point": {"threshold": 4.0}}) == (None, 4.0)


def test_drift_hook_skips_warm_up_frames_and_expects_the_target_false_alarm_rate():
    from contracts.envelope import InspectionResult
    from stream.lifecycle.drift import DriftConfig
    from stream.lifecycle.hooks import DriftHook

    spec = {"threshold": 3.0, "calibration": {"scores": list(np.linspace(-2, 2, 50))},
            "operating_point": {"threshold": 3.0, "target_false_alarm_rate": 0.05}}
    hook = DriftHook(DriftConfig(window=32, check_every=8, min_interval_s=0))
    r = InspectionResult(frame_id="f", camera="warmup", line=None, model="m", model_version="1", task="",
                         routed=False, route_distance=None, score=9.0, threshold=3.0, is_anomaly=True, warmup=True)
    assert hook.observe(r, spec) == [] and not hook.monitor.has_reference("m@1")
    r.warmup = False
    hook.observe(r, spec)
    assert hook.monitor._references["m@1"]["expected_anomaly_rate"] == 0.05


def test_operating_point_summaries_per_task_in_events_and_rollout_status(capsys):
    from contracts.model_events import ModelEvent, fold_status
    from stream.lifecycle.operating import attach_to_status, describe, operating_points
    from stream.ops.cli_lifecycle import print_operating_points

    ops = operating_points(_MT_SPEC)
    assert set(ops) == {"bottle", "cable"}
    b = ops["bottle"]
    assert b["stated"] and b["target_false_alarm_rate"] == 0.01 and b["estimated_recall"] == 0.935
    assert b["n_good"] == 120 and b["estimated_recall_by_family"]["scratch"] == 0.9
    assert not ops["cable"]["stated"]
    assert set(operating_points(_MT_SPEC, "cable")) == {"cable"}
    assert set(operating_points({"model": "efficientad_bottle", "product": "bottle", "threshold": 1.0})) == {"bottle"}
    line = describe(b)
    assert "target FAR 1%" in line and "est. FAR 0.8%" in line and "recall 93.5%" in line and "n_good 120" in line
    assert "scratch 90%" in line and "older version" in describe(ops["cable"])

    evs = [ModelEvent("released", "moleflow", 2, artifact_uri="file:///x", sha256="0" * 64,
                      detail={"operating_point": ops}),
           ModelEvent("promoted", "moleflow", 2, detail={"operating_point": ops}),
           ModelEvent("released", "moleflow", 3, artifact_uri="file:///x", sha256="1" * 64,
                      detail={"operating_point": {"bottle": {**b, "estimated_recall": 0.95}}})]
    st = attach_to_status(fold_status(evs), evs)["moleflow"]
    assert st["operating_point"]["bottle"]["estimated_recall"] == 0.935
    assert st["candidate_operating_point"]["bottle"]["estimated_recall"] == 0.95
    print_operating_points(st)
    out = capsys.readouterr().out
    assert "v2 bottle: target FAR 1%" in out and "v2 cable: no operating point" in out
    assert "candidate v3 bottle:" in out and "recall 95%" in out


def test_controller_outcome_events_carry_the_artifacts_operating_point():
    from types import SimpleNamespace

    from contracts.model_events import ModelEvent
    from stream.lifecycle.controller import RolloutController

    async def publish(ev):
        return None

    ctl = RolloutController("127.0.0.1:1", "/tmp/none", publish)
    rel = ModelEvent("released", "moleflow", 2, task="bottle", artifact_uri="file:///x", sha256="0" * 64)
    art = SimpleNamespace(metadata=_MT_SPEC, product=None, detector="moleflow")
    ev = ctl._event("promoted", rel, [], 1, {"frames": 40}, art)
    assert ev.detail["frames"] == 40 and ev.detail["operating_point"]["bottle"]["target_false_alarm_rate"] == 0.01
    assert "operating_point" not in ctl._event("refused", rel, ["x"], 1).detail
