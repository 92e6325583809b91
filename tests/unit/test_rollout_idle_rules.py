"""Issue #26 item 10: a release on a quiet line was rolled back ("insufficient_shadow_traffic: 0 frames < 16").

Idle is not failure. The rules of :func:`stream.lifecycle.policy.decide` over a shadow window
(:class:`stream.lifecycle.policy.Window`), pure; the real shape (controller + broker + tritonserver) is
tests/integration/test_rollout_idle.py:

- ``probes_only``: nothing serves the candidate's product (or MoLE-Flow task) yet: judged on its probe images
  as soon as they are scored, however few (no live frame can be compared with an incumbent);
- ``shadow_traffic``: a served product: judged once the window holds ``shadow_frames`` frames (probes + live),
  or, once live frames flow, after ``shadow_timeout_s`` of traffic with at least ``min_frames``; an idle line
  (no live frame) waits, "waiting for traffic";
- ``traffic_deadline``: at ``traffic_deadline_s`` (much longer) it is judged on what it has, or rolled back
  when that is under ``min_frames``.
"""

from __future__ import annotations

import numpy as np

from contracts.config import RolloutSettings
from stream.lifecycle.policy import HealthPolicy, ShadowStats, Window, decide

POL = HealthPolicy(shadow_frames=32, min_frames=16, shadow_timeout_s=120, traffic_deadline_s=3600)
CAL = list(np.random.default_rng(0).normal(0, 1, 200))


def _stats(n: int, live: int = 0, seed: int = 1) -> ShadowStats:
    scores = list(np.random.default_rng(seed).normal(0, 1, n))
    return ShadowStats(scores=scores, frames=n, live=live)


def test_the_traffic_deadline_is_a_setting_longer_than_the_window():
    r = RolloutSettings()
    assert r.traffic_deadline_s >= 10 * r.shadow_timeout_s
    assert HealthPolicy.from_settings(r.model_copy(update={"traffic_deadline_s": 99.0})).traffic_deadline_s == 99.0


def test_new_product_promotes_on_its_probes_alone():
    """8 probe images (< min_frames): the shape of the issue's MoLE-Flow release (before: wait, then
    insufficient_shadow_traffic)."""
    w = Window(new_product=True, probes=8, elapsed_s=1.0, live_s=None)
    assert decide(_stats(4), CAL, 3.0, POL, window=w).action == "wait"  # still scoring its probes
    d = decide(_stats(8), CAL, 3.0, POL, window=w)
    assert d.action == "promote" and d.rule == "probes_only", (d.action, d.reasons)
    assert d.stats["rule"] == "probes_only" and d.stats["probe_frames"] == 8 and d.stats["live_frames"] == 0
    bad = ShadowStats(scores=[50.0] * 8, frames=8)  # probes alone still judge: far off calibration, flagged
    d = decide(bad, CAL, 3.0, POL, window=w)
    assert d.action == "rollback" and d.rule == "probes_only"


def test_served_product_on_an_idle_line_waits_for_traffic():
    for elapsed in (1.0, 121.0, 1800.0, 3599.0):  # past the shadow window, before the deadline: waiting
        w = Window(new_product=False, probes=24, elapsed_s=elapsed, live_s=None)
        d = decide(_stats(24), CAL, 3.0, POL, window=w)
        assert d.action == "wait", (elapsed, d)
        assert bool(d.stats.get("waiting_for_traffic")) is (elapsed > POL.shadow_timeout_s)
    w = Window(new_product=False, probes=8, elapsed_s=500.0, live_s=None)
    assert decide(_stats(8), CAL, 3.0, POL, window=w).action == "wait"  # before: rollback, 8 frames < 16


def test_traffic_then_judged_on_the_window():
    w = Window(new_product=False, probes=24, elapsed_s=900.0, live_s=5.0)
    assert decide(_stats(30, live=6), CAL, 3.0, POL, window=w).action == "wait"
    d = decide(_stats(32, live=8), CAL, 3.0, POL, window=w)
    assert d.action == "promote" and d.rule == "shadow_traffic" and d.stats["live_frames"] == 8
    slow = Window(new_product=False, probes=8, elapsed_s=900.0, live_s=121.0)  # slow traffic: judged at the window
    d = decide(_stats(20, live=12), CAL, 3.0, POL, window=slow)
    assert d.action == "promote" and d.rule == "shadow_traffic"
    assert decide(_stats(12, live=4), CAL, 3.0, POL, window=slow).action == "wait"  # too little yet: keeps waiting


def test_deadline_judges_what_it_has_or_rolls_back():
    late = Window(new_product=False, probes=24, elapsed_s=3601.0, live_s=None)
    d = decide(_stats(24), CAL, 3.0, POL, window=late)
    assert d.action == "promote" and d.rule == "traffic_deadline"
    late8 = Window(new_product=False, probes=8, elapsed_s=3601.0, live_s=None)
    d = decide(_stats(8), CAL, 3.0, POL, window=late8)
    assert d.action == "rollback" and d.rule == "traffic_deadline"
    assert d.reasons[0].startswith("insufficient_shadow_traffic") and "0 live" in d.reasons[0]


def test_errors_decide_at_once_whatever_the_rule():
    s = ShadowStats(scores=[0.0] * 3, frames=3, errors=1, last_error="boom")
    for w in (Window(True, 8, 1.0, None), Window(False, 8, 1.0, None)):
        d = decide(s, CAL, 3.0, POL, window=w)
        assert d.action == "rollback" and d.rule == "inference_errors"


def test_new_product_without_probes_waits_for_its_own_traffic():
    w = Window(new_product=True, probes=0, elapsed_s=500.0, live_s=None)
    assert decide(ShadowStats(), CAL, 3.0, POL, window=w).action == "wait"


def test_rollout_status_says_waiting_and_which_rule_decided(capsys):
    from contracts.model_events import ModelEvent, fold_status
    from stream.ops.cli_lifecycle import print_status_line

    evs = [ModelEvent("released", "m", 2, artifact_uri="file:///x", sha256="0" * 64),
           ModelEvent("shadow_waiting", "m", 2, reasons=["waiting_for_traffic: no live frame of 'bottle' in 120 s"],
                      detail={"rule": "shadow_traffic", "deadline_s": 3600.0})]
    st = fold_status(evs)["m"]
    assert st["candidate_version"] == 2 and st["candidate_state"] == "waiting for traffic"
    print_status_line("m", st)
    assert "waiting for traffic" in capsys.readouterr().out
    evs.append(ModelEvent("promoted", "m", 2, detail={"rule": "shadow_traffic", "live_frames": 9}))
    st = fold_status(evs)["m"]
    assert st["candidate_version"] is None and st.get("candidate_state") is None
    assert st["decided_by"] == "shadow_traffic"
    print_status_line("m", st)
    out = capsys.readouterr().out
    assert "rule=shadow_traffic" in out and "waiting" not in out
